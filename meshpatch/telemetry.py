"""OpenTelemetry spans and metrics for routed calls, through the API only.

meshpatch speaks the app's own observability language: the OpenTelemetry API,
which is a no-op until the app (or ``opentelemetry-instrument``) installs an
SDK.  The router and :class:`~meshpatch.routing.call.Call` call in here at the
few points that matter — routing decided, attempt started, attempt ended, call
ended — so the library hooks stay thin.

Spans.  A routed call is described on *the* client span of that call, never on
a second one:

* when the current span is a recording CLIENT span (requests/grpc
  instrumentation, or httpx instrumentation applied after meshpatch), the
  attributes go on it at each attempt;
* when an instrumentation starts its CLIENT span *inside* meshpatch's attempt
  (httpx/grpc instrumented before meshpatch patched, grpc.aio interceptors on
  the endpoint channels), a span processor added to the SDK's provider puts the
  attributes on that span as it starts;
* only when neither happened does meshpatch record a short CLIENT span of its
  own, spanning the call, once it ended.

Attributes: ``server.address``/``server.port`` and ``network.peer.address``/
``network.peer.port`` = the picked endpoint, ``meshpatch.authority`` (the
logical host:port), ``meshpatch.route``, ``meshpatch.cluster``,
``meshpatch.locality``, ``meshpatch.retries``, ``meshpatch.lane`` and
``meshpatch.passthrough`` (true on the client span of a call meshpatch left
untouched).

Metrics (meter ``meshpatch``): see :func:`_instruments`.  With no SDK the cost
on the request path is a couple of module-global reads (``bench/bench_telemetry.py``).
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any, Dict, Iterable, Optional, Tuple

log = logging.getLogger("meshpatch.telemetry")

try:
    from opentelemetry import metrics as _otel_metrics
    from opentelemetry import trace as _otel_trace
    from opentelemetry.trace import SpanKind as _SpanKind

    _CLIENT = _SpanKind.CLIENT
    _AVAILABLE = True
except ImportError:  # opentelemetry-api is a dependency, but an app env may lack it: telemetry off
    _otel_metrics = _otel_trace = None  # type: ignore[assignment]
    _CLIENT = None
    _AVAILABLE = False

SCOPE = "meshpatch"

#: The routed call whose attempt is in progress in this context: spans that an
#: instrumentation starts inside the attempt are annotated by the span processor.
_ATTEMPT: ContextVar[Any] = ContextVar("meshpatch_attempt", default=None)

_tracing = False  # a real TracerProvider is set (checked per call until it is)
_metering = False  # a real MeterProvider is set
_instr: Any = None  # the instruments, once created
_tracer: Any = None
_processor_for: Any = None  # the provider our span processor was added to
_attr_cache: Dict[Tuple[Any, ...], Dict[str, Any]] = {}
_ATTR_CACHE_MAX = 10_000


# -- is an SDK there? ------------------------------------------------------------------


# Where the API keeps the global providers (None until the app sets one): read
# directly on the request path, so that with no SDK each entry point costs one
# or two attribute reads.  Other API layouts take the slower general check.
_metrics_internal = getattr(_otel_metrics, "_internal", None) if _AVAILABLE else None
_FAST = (_AVAILABLE and hasattr(_otel_trace, "_TRACER_PROVIDER")
         and hasattr(_metrics_internal, "_METER_PROVIDER"))
#: For the router, which reads it inline once per request so that without an
#: SDK nothing in this module is called: the two modules whose provider globals
#: stay None while no SDK is set (None when the API's layout is not the known
#: one, and then the router always calls ``routed``).
IDLE_PROBE = (_otel_trace, _metrics_internal) if _FAST else None


def _nothing_set() -> bool:
    """True while no provider is set at all (the no-SDK fast path)."""
    if _tracing or _metering:
        return False
    if _FAST:
        return _otel_trace._TRACER_PROVIDER is None and _metrics_internal._METER_PROVIDER is None
    return not _AVAILABLE


def _providers_set() -> Tuple[bool, bool]:
    """(tracing, metering): whether the app installed real providers.  The API's
    globals are set once and never unset, so once True stays True."""
    global _tracing, _metering
    if not _AVAILABLE:
        return False, False
    if not _tracing:
        provider = getattr(_otel_trace, "_TRACER_PROVIDER", None)
        if provider is not None:
            _tracing = True
            _on_tracer_provider(provider)
    if not _metering:
        internal = getattr(_otel_metrics, "_internal", None)
        if getattr(internal, "_METER_PROVIDER", None) is not None:
            _metering = True
            _ensure_instruments()
    return _tracing, _metering


def refresh() -> None:
    """Look for providers set through OTEL_PYTHON_*_PROVIDER (the API loads those
    lazily on the first get_*_provider call) and create the instruments."""
    if not _AVAILABLE:
        return
    try:
        _otel_trace.get_tracer_provider()
        _otel_metrics.get_meter_provider()
    except Exception as exc:
        _internal("telemetry.providers", exc)
    _providers_set()


def _on_tracer_provider(provider: Any) -> None:
    global _tracer, _processor_for
    try:
        import meshpatch

        _tracer = provider.get_tracer(SCOPE, meshpatch.__version__)
        add = getattr(provider, "add_span_processor", None)
        if add is not None and _processor_for is not provider:
            add(_make_processor())
            _processor_for = provider
    except Exception as exc:
        _internal("telemetry.tracer", exc)


def _make_processor() -> Any:
    """A span processor (an SDK interface, so it is built only once an SDK
    provider is known) that annotates CLIENT spans started inside an attempt."""
    from opentelemetry.sdk.trace import SpanProcessor

    class MeshpatchSpanProcessor(SpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            call = _ATTEMPT.get()
            if call is None:
                return
            try:
                if getattr(span, "kind", None) is not _CLIENT:
                    return
                if call.__class__ is _Passthrough:
                    if not call.used and call.host in _span_hosts(span):
                        call.used = True
                        span.set_attribute("meshpatch.passthrough", True)
                    return
                if call.tel_open != call.attempts or call.tel_inner == call.attempts:
                    return
                call.tel_inner = call.attempts
                _annotate(span, call)
            except Exception as exc:
                _internal("telemetry.processor", exc)

        def on_end(self, span: Any) -> None:
            pass

    return MeshpatchSpanProcessor()


class _Passthrough:
    """Marks a call meshpatch left untouched, for a client span an instrumentation
    starts below meshpatch; only a span naming the same host takes it, once."""

    __slots__ = ("host", "used")

    def __init__(self, host: str) -> None:
        self.host = host
        self.used = False


def _span_hosts(span: Any) -> Tuple[Any, ...]:
    attributes = getattr(span, "attributes", None) or {}
    url = attributes.get("url.full") or attributes.get("http.url")
    url_host = None
    if isinstance(url, str):
        from urllib.parse import urlsplit

        try:
            url_host = urlsplit(url).hostname
        except ValueError:
            pass
    return (attributes.get("server.address"), attributes.get("net.peer.name"), attributes.get("http.host"), url_host)


# -- instruments ----------------------------------------------------------------------------


class _Instruments:
    def __init__(self, meter: Any) -> None:
        self.calls = meter.create_counter(
            "meshpatch.client.calls", unit="{call}",
            description="Routed calls, by cluster, final endpoint and result (success/failure)")
        self.failures = meter.create_counter(
            "meshpatch.client.failures", unit="{call}",
            description="Routed calls that failed, by cluster, endpoint and error.type")
        self.attempts = meter.create_counter(
            "meshpatch.client.attempts", unit="{attempt}",
            description="Attempts (first tries and retries), by cluster, endpoint and result")
        self.retries = meter.create_counter(
            "meshpatch.client.retries", unit="{retry}", description="Retries, by cluster")
        self.passthrough = meter.create_counter(
            "meshpatch.client.passthrough", unit="{call}",
            description="Calls meshpatch saw and left untouched (not in the mesh)")
        self.pick_duration = meter.create_histogram(
            "meshpatch.pick.duration", unit="s",
            description="Time to route a call and choose its cluster (includes a new host's first resolution)")
        self.rejections = meter.create_counter(
            "meshpatch.circuit_breaker.rejections", unit="{call}",
            description="Calls refused by a cluster's circuit breaker, by cluster and limit")
        self.ejections = meter.create_counter(
            "meshpatch.outlier.ejections", unit="{ejection}",
            description="Endpoints ejected by outlier detection, by cluster and endpoint")
        meter.create_observable_counter(
            "meshpatch.xds.updates", callbacks=[_observe_xds("updates")], unit="{response}",
            description="xDS responses received, by type")
        meter.create_observable_counter(
            "meshpatch.xds.acks", callbacks=[_observe_xds("acks")], unit="{response}",
            description="xDS responses accepted (ACK), by type")
        meter.create_observable_counter(
            "meshpatch.xds.nacks", callbacks=[_observe_xds("nacks")], unit="{response}",
            description="xDS responses rejected (NACK), by type")
        meter.create_observable_counter(
            "meshpatch.xds.reconnects", callbacks=[_observe_reconnects], unit="{stream}",
            description="xDS streams opened after the first one")
        meter.create_observable_gauge(
            "meshpatch.xds.config_age", callbacks=[_observe_config_age], unit="s",
            description="Seconds since the config in force of each type was accepted")
        meter.create_observable_gauge(
            "meshpatch.xds.connected", callbacks=[_observe_connected], unit="1",
            description="1 while the xDS stream is up")


def _ensure_instruments() -> Any:
    global _instr
    if _instr is None and _AVAILABLE:
        try:
            import meshpatch

            _instr = _Instruments(_otel_metrics.get_meter(SCOPE, meshpatch.__version__))
        except Exception as exc:
            _internal("telemetry.instruments", exc)
    return _instr


def _attrs(*pairs: Any) -> Dict[str, Any]:
    """Attribute dicts are cached per value tuple: metrics take them per call."""
    found = _attr_cache.get(pairs)
    if found is None:
        found = {pairs[i]: pairs[i + 1] for i in range(0, len(pairs), 2)}
        if len(_attr_cache) < _ATTR_CACHE_MAX:
            _attr_cache[pairs] = found
    return found


# -- xDS observations ---------------------------------------------------------------------


def _xds_client() -> Any:
    from meshpatch import agent as agent_module

    agent = getattr(agent_module, "_agent", None)
    return getattr(agent, "client", None) if agent is not None else None


def _observe_xds(field: str) -> Any:
    def callback(options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        client = _xds_client()
        if client is None:
            return []
        from meshpatch.xds.type_urls import SHORT_NAMES
        from meshpatch.xds.client import TYPE_ORDER

        out = []
        for type_url in TYPE_ORDER:
            stats = client.type_stats(type_url)
            value = stats["acks"] + stats["nacks"] if field == "updates" else stats[field]
            out.append(Observation(value, _attrs("xds.type", SHORT_NAMES.get(type_url, type_url))))
        return out

    return callback


def _observe_reconnects(options: Any) -> Iterable[Any]:
    from opentelemetry.metrics import Observation

    client = _xds_client()
    if client is None:
        return []
    opened = getattr(client.transport, "streams_opened", 0)
    return [Observation(max(0, opened - 1))]


def _observe_config_age(options: Any) -> Iterable[Any]:
    from opentelemetry.metrics import Observation

    client = _xds_client()
    if client is None:
        return []
    from meshpatch.xds.client import TYPE_ORDER
    from meshpatch.xds.type_urls import SHORT_NAMES

    now = time.time()
    out = []
    for type_url in TYPE_ORDER:
        accepted = client.type_stats(type_url).get("accepted_at")
        if accepted:
            out.append(Observation(now - accepted, _attrs("xds.type", SHORT_NAMES.get(type_url, type_url))))
    return out


def _observe_connected(options: Any) -> Iterable[Any]:
    from opentelemetry.metrics import Observation

    client = _xds_client()
    if client is None:
        return []
    return [Observation(1 if client.connected else 0)]


# -- the request path ------------------------------------------------------------------------


def routed(call: Any, began: float, host: str = "") -> bool:
    """The router decided (``call`` None = not in the mesh: passed through).
    True when a provider is set: the call then carries its telemetry state and
    reports its attempts; otherwise (no SDK) it never calls here again."""
    if _nothing_set():
        return False
    if call is not None:
        call.tel_span = None  # the client span described (current at an attempt's start)
        call.tel_inner = -1  # last attempt whose inner client span was described
        call.tel_open = -1  # attempt in progress (for the span processor)
        call.tel_done = False
        call.tel_lane = None
        if call.deadline is None:  # a Call notes its start time only when it has a deadline
            call.started = time.monotonic() - (time.perf_counter() - began)
    tracing, metering = _providers_set()
    if metering:
        instr = _instr
        elapsed = time.perf_counter() - began
        if call is None:
            instr.passthrough.add(1)
            instr.pick_duration.record(elapsed, _attrs("meshpatch.result", "passthrough"))
        else:
            instr.pick_duration.record(elapsed, _attrs("meshpatch.result", "routed"))
    if tracing and call is None:
        span = _otel_trace.get_current_span()
        if span.is_recording() and getattr(span, "kind", None) is _CLIENT:
            span.set_attribute("meshpatch.passthrough", True)
        elif host:
            _ATTEMPT.set(_Passthrough(host))
    return True


def rejected(error: Exception) -> None:
    """The router refused the call (circuit breaker, no route)."""
    _tracing_on, metering = _providers_set()
    if not metering:
        return
    from meshpatch.api import CircuitBreakerOpen, NoRouteMatched

    if isinstance(error, CircuitBreakerOpen):
        _instr.rejections.add(1, _attrs("meshpatch.cluster", error.cluster, "meshpatch.limit", error.limit))
        _instr.failures.add(1, _attrs("meshpatch.cluster", error.cluster, "meshpatch.endpoint", "",
                                      "error.type", "circuit_breaker_open"))
    elif isinstance(error, NoRouteMatched):
        _instr.failures.add(1, _attrs("meshpatch.cluster", "", "meshpatch.endpoint", "", "error.type", "no_route"))


def attempt_started(call: Any) -> None:
    """The call's next attempt (``call.endpoint``) is about to be sent (from ``Call.next_endpoint``)."""
    if not _tracing and (_FAST and _otel_trace._TRACER_PROVIDER is None or not _providers_set()[0]):
        return
    try:
        span = _otel_trace.get_current_span()
        call.tel_open = call.attempts
        if span.is_recording() and getattr(span, "kind", None) is _CLIENT:
            call.tel_span = span
            _annotate(span, call)
        else:
            _ATTEMPT.set(call)
    except Exception as exc:
        _internal("telemetry.attempt", exc)


def _annotate(span: Any, call: Any) -> None:
    pick = call.pick
    endpoint = pick.endpoint
    attributes = {
        "server.address": pick.address,
        "server.port": pick.port,
        "network.peer.address": pick.address,
        "network.peer.port": pick.port,
        "meshpatch.authority": call.authority,
        "meshpatch.route": pick.route or "",
        "meshpatch.cluster": pick.cluster,
        "meshpatch.locality": getattr(endpoint, "locality", "") or "",
        "meshpatch.retries": call.attempts - 1,
        "meshpatch.passthrough": False,
    }
    lane = call.tel_lane
    if lane:
        attributes["meshpatch.lane"] = lane
    span.set_attributes(attributes)


def _result(outcome: Any) -> Tuple[bool, str]:
    """(failed, error.type) of an outcome, from the mesh's point of view."""
    if outcome is None:
        return True, "local"
    if outcome.kind == "cancelled" or outcome.is_success:
        return False, ""
    if outcome.grpc_status is not None and outcome.grpc_status != "OK":
        return True, outcome.grpc_status
    if outcome.http_status is not None and outcome.kind == "ok":
        return True, str(outcome.http_status)
    return True, outcome.kind


def attempt_ended(call: Any, outcome: Any) -> None:
    call.tel_open = -1
    if not _metering and (_FAST and _metrics_internal._METER_PROVIDER is None or not _providers_set()[1]):
        return
    pick = call.pick
    if pick is None:
        return
    failed, _ = _result(outcome)
    _instr.attempts.add(1, _attrs("meshpatch.cluster", pick.cluster, "meshpatch.endpoint",
                                  f"{pick.address}:{pick.port}", "meshpatch.result",
                                  "failure" if failed else "success"))


def retried(call: Any) -> None:
    if not _metering and not _providers_set()[1]:
        return
    _instr.retries.add(1, _attrs("meshpatch.cluster", call.handle.name))


def call_ended(call: Any, outcome: Any, error_type: Optional[str] = None) -> None:
    """The call is over: ``outcome`` of its last attempt (None when it failed
    before sending, with ``error_type`` saying why)."""
    if call.tel_done:
        return
    call.tel_done = True
    if _nothing_set():
        return
    tracing, metering = _providers_set()
    if not tracing and not metering:
        return
    try:
        pick = call.pick
        cluster = pick.cluster if pick is not None else (call.handle.name if call.handle is not None else "")
        endpoint = f"{pick.address}:{pick.port}" if pick is not None else ""
        if error_type is not None:
            failed, kind = True, error_type
        else:
            failed, kind = _result(outcome)
        if metering:
            _instr.calls.add(1, _attrs("meshpatch.cluster", cluster, "meshpatch.endpoint", endpoint,
                                       "meshpatch.result", "failure" if failed else "success"))
            if failed:
                _instr.failures.add(1, _attrs("meshpatch.cluster", cluster, "meshpatch.endpoint", endpoint,
                                              "error.type", kind))
        if tracing and call.tel_span is None and call.tel_inner < 0 and pick is not None:
            _own_span(call, failed, kind)
    except Exception as exc:
        _internal("telemetry.call_ended", exc)


def _own_span(call: Any, failed: bool, kind: str) -> None:
    """No instrumentation described this call: record a CLIENT span for it."""
    tracer = _tracer
    if tracer is None:
        return
    now_ns = time.time_ns()
    started_ns = now_ns - int((time.monotonic() - call.started) * 1e9)
    name = call.path.split("?", 1)[0].lstrip("/") if call.is_grpc else call.method
    span = tracer.start_span(name or "meshpatch", kind=_CLIENT, start_time=started_ns)
    try:
        _annotate(span, call)
        if failed:
            from opentelemetry.trace import Status, StatusCode

            span.set_attribute("error.type", kind)
            span.set_status(Status(StatusCode.ERROR, kind))
    finally:
        span.end(end_time=now_ns)


def ejection(cluster: str, address: str, port: int) -> None:
    """Outlier detection ejected an endpoint (for the cluster's load balancer to call)."""
    if not _metering and not _providers_set()[1]:
        return
    _instr.ejections.add(1, _attrs("meshpatch.cluster", cluster, "meshpatch.endpoint", f"{address}:{port}"))


def _internal(site: str, exc: BaseException) -> None:
    from meshpatch.safety import internal_error

    internal_error(site, exc)


def state() -> Dict[str, Any]:
    """For the status view."""
    tracing, metering = _providers_set()
    return {
        "opentelemetry_api": _AVAILABLE,
        "tracer_provider": type(getattr(_otel_trace, "_TRACER_PROVIDER", None)).__name__ if tracing else None,
        "meter_provider": type(_otel_metrics._internal._METER_PROVIDER).__name__ if metering else None,
        "span_processor_added": _processor_for is not None,
    }
