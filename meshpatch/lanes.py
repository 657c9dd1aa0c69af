"""Canary lanes: a tag on one entry request steers the whole call chain.

A lane (``gray``, ``blue``...) arrives on an inbound request, in the lane header
(``x-mesh-lane``) or in W3C baggage (``mesh.lane``), as MSE and OpenSergo colour
traffic.  The server hooks put it in a ContextVar (and in OTel Baggage when the
API is there), so it follows the request into asyncio tasks (they copy the
context), thread pools and threads (patched here once a lane was first seen:
``ThreadPoolExecutor.submit`` and ``Thread.start``/``run`` carry it, as OTel's
threading instrumentation does), and the client hooks:

* send it on: every outbound HTTP request / gRPC call of that context gets the
  lane header and a ``baggage`` entry, so the next service sees it and Istio
  ``VirtualService`` header matches on the lane header work at every hop;
* prefer endpoints in that lane: an endpoint's lane is its label
  ``MESHPATCH_LANE_LABEL`` (default ``lane``), read from EDS endpoint metadata
  ``filter_metadata["meshpatch"]["labels"]`` (the local control plane passes
  WorkloadEntry / ServiceEntry endpoint labels there; registry instances carry
  their labels in the same place).  A tagged call goes to endpoints of its lane
  and falls back to the baseline (endpoints with no lane label) when its lane
  has none in that cluster; an untagged call goes to the baseline.  If the
  preferred set is empty every endpoint is used: lanes never fail a call.

Nothing here runs per request unless a lane is in play: clusters with no lane
labels keep their plain picker, and the outbound check is one ContextVar read.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from meshpatch.config import LaneSettings, is_token
from meshpatch.routing.lb import EmptyPicker, Picker
from meshpatch.routing.model import Endpoint, EndpointsConfig, LocalityEndpoints

_LANE: ContextVar[Optional[str]] = ContextVar("meshpatch_lane", default=None)

_settings: Optional[LaneSettings] = None
_threads_patched = False


def settings() -> LaneSettings:
    global _settings
    current = _settings
    if current is None:
        try:
            current = LaneSettings()
        except Exception:  # reported at activation; here lanes just stay off
            current = LaneSettings({"MESHPATCH_LANES": "0"})
        _settings = current
    return current


def configure(value: Optional[LaneSettings]) -> None:
    """Replace the settings (tests; None = read the environment again)."""
    global _settings
    _settings = value


# -- the lane of the current context ----------------------------------------------


def current_lane() -> Optional[str]:
    """The lane of this context: meshpatch's ContextVar, else OTel Baggage."""
    lane = _LANE.get()
    if lane is not None:
        return lane
    return _baggage_lane()


def _baggage_lane() -> Optional[str]:
    read = _CURRENT_CONTEXT or _context_reader()
    if read is None:
        return None
    try:
        current = read()
        if not current:  # empty Context: no baggage (the common, cheap case)
            return None
        from opentelemetry import baggage

        value = baggage.get_baggage(settings().baggage_key, current)
    except Exception:
        return None
    return value if isinstance(value, str) and is_token(value) else None


_OTEL_CONTEXT: Any = False  # False = not looked up yet, None = not installed
_CURRENT_CONTEXT: Any = None  # reads OTel's current Context; set once OTel is imported


def _context_reader() -> Any:
    """How to read OTel's current Context on every outbound call: the API's
    ContextVar's own ``get`` when its runtime context has the usual layout (one C
    call), else the public ``get_current``."""
    global _CURRENT_CONTEXT
    otel_context = _otel_context()
    if otel_context is None:
        return None
    var = getattr(getattr(otel_context, "_RUNTIME_CONTEXT", None), "_current_context", None)
    _CURRENT_CONTEXT = var.get if callable(getattr(var, "get", None)) else otel_context.get_current
    return _CURRENT_CONTEXT


def _otel_context() -> Any:
    global _OTEL_CONTEXT
    module = _OTEL_CONTEXT
    if module is False:
        import sys

        # Only once the app (or meshpatch's telemetry) imported OTel: importing
        # it here would cost every app ~30 ms for nothing.
        module = sys.modules.get("opentelemetry.context")
        if module is None:
            return None
        _OTEL_CONTEXT = module
    return module


def enter(lane: Optional[str]) -> Any:
    """Make ``lane`` current for one inbound request (server hooks); returns a
    token for :func:`leave`, or None when nothing had to change."""
    if lane is None:
        if _LANE.get() is None:
            return None
        return (_LANE.set(None), None)
    _ensure_thread_patches()
    return (_LANE.set(lane), _attach_baggage(lane))


def leave(token: Any) -> None:
    if token is None:
        return
    lane_token, otel_token = token
    if otel_token is not None:
        try:
            from opentelemetry import context

            context.detach(otel_token)
        except Exception:
            pass
    _LANE.reset(lane_token)


def _attach_baggage(lane: str) -> Any:
    """Also put the lane in OTel Baggage, so the app (and OTel's own propagators)
    see it; only when the OTel API is installed."""
    try:
        from opentelemetry import baggage, context
    except ImportError:
        return None
    try:
        return context.attach(baggage.set_baggage(settings().baggage_key, lane))
    except Exception:
        return None


# -- parsing and propagation ------------------------------------------------------------


def valid(value: Any) -> Optional[str]:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value if is_token(value) else None


def from_baggage_header(header: Optional[str], key: str) -> Optional[str]:
    """The value of ``key`` in a W3C ``baggage`` header (``k=v;prop,k2=v2``)."""
    if not header:
        return None
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    for member in str(header).split(","):
        name, sep, rest = member.partition("=")
        if sep and name.strip() == key:
            from urllib.parse import unquote

            return valid(unquote(rest.split(";", 1)[0]))
    return None


def inbound_lane(get_header: Callable[[str], Any]) -> Optional[str]:
    """The lane of an inbound request, from ``get_header(lower_case_name)``."""
    conf = settings()
    if not conf.enabled:
        return None
    lane = valid(get_header(conf.header))
    if lane is None:
        lane = from_baggage_header(get_header("baggage"), conf.baggage_key)
    return lane


def _baggage_with(existing: Optional[str], key: str, lane: str) -> Optional[str]:
    """``existing`` plus ``key=lane``; None when ``key`` is already there."""
    if not existing:
        return f"{key}={lane}"
    for member in existing.split(","):
        if member.partition("=")[0].strip() == key:
            return None
    return f"{existing},{key}={lane}"


def outbound_http(headers: Any) -> None:
    """Add the current lane to an outbound request's headers (a mutable,
    case-insensitive mapping: requests' CaseInsensitiveDict, httpx.Headers)
    unless the app set a lane header itself.  One ContextVar read when no lane."""
    lane = _LANE.get()
    if lane is None:
        lane = _baggage_lane()
        if lane is None:
            return
    conf = _settings or settings()
    if not conf.enabled or conf.header in headers:
        return
    headers[conf.header] = lane
    baggage = _baggage_with(headers.get("baggage"), conf.baggage_key, lane)
    if baggage is not None:
        headers["baggage"] = baggage


def outbound_grpc(metadata: Any) -> Any:
    """gRPC call metadata with the current lane added (a new tuple; the app's
    sequence is never mutated); ``metadata`` unchanged when there is no lane or
    the app set the lane header itself."""
    lane = _LANE.get()
    if lane is None:
        lane = _baggage_lane()
        if lane is None:
            return metadata
    conf = _settings or settings()
    if not conf.enabled:
        return metadata
    items = tuple(metadata or ())
    baggage = None
    for item in items:
        key = item[0].lower() if isinstance(item[0], str) else item[0]
        if key == conf.header:
            return metadata
        if key == "baggage":
            baggage = item[1]
    added: Tuple[Tuple[str, str], ...] = ((conf.header, lane),)
    merged = _baggage_with(baggage if isinstance(baggage, str) else None, conf.baggage_key, lane)
    if merged is not None:
        items = tuple(item for item in items if not (isinstance(item[0], str) and item[0].lower() == "baggage"))
        added += (("baggage", merged),)
    return items + added


def call_lane(headers: Any) -> Optional[str]:
    """The lane a routed call prefers: its own lane header (the hooks copied the
    context's lane there, or the app set one), else the context's lane."""
    conf = _settings or settings()
    if not conf.enabled:
        return None
    if headers is not None:
        try:
            value = headers.get(conf.header)
        except Exception:
            value = None
        if value is not None:
            return valid(value)
    return current_lane()


# -- threads ------------------------------------------------------------------------------


def _ensure_thread_patches() -> None:
    """Carry the lane into ThreadPoolExecutor tasks and new threads.  Patched on
    the first inbound request (a lane can only exist after that), so processes
    that never serve pay nothing."""
    global _threads_patched
    if _threads_patched:
        return
    _threads_patched = True
    try:
        _patch_threads()
    except Exception as exc:
        from meshpatch.safety import internal_error

        internal_error("lanes.threads", exc)


def _run_in_lane(lane: Optional[str], fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    token = _LANE.set(lane)
    # the OTel Baggage too, so app code in the thread sees the lane through the API
    otel_token = _attach_baggage(lane) if lane is not None and _otel_context() is not None else None
    try:
        return fn(*args, **kwargs)
    finally:
        if otel_token is not None:
            _otel_context().detach(otel_token)
        _LANE.reset(token)


def _patch_threads() -> None:
    import threading
    from concurrent.futures import thread as futures_thread

    executor = futures_thread.ThreadPoolExecutor
    if getattr(executor.submit, "_meshpatch_lane", False):
        return
    original_submit = executor.submit

    def submit(self: Any, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        # Always set (possibly None): a pool thread started while a lane was
        # current must not leak it into later, untagged tasks.
        return original_submit(self, _run_in_lane, current_lane(), fn, *args, **kwargs)

    submit._meshpatch_lane = True  # type: ignore[attr-defined]
    submit.__wrapped__ = original_submit  # type: ignore[attr-defined]
    executor.submit = submit  # type: ignore[method-assign]

    worker = getattr(futures_thread, "_worker", None)
    original_start = threading.Thread.start
    original_run = threading.Thread.run

    def start(self: Any) -> None:
        if getattr(self, "_target", None) is not worker:
            lane = current_lane()
            if lane is not None:
                self._meshpatch_lane = lane
        original_start(self)

    def run(self: Any) -> None:
        lane = self.__dict__.get("_meshpatch_lane")
        if lane is None:
            return original_run(self)
        return _run_in_lane(lane, original_run, self)

    start.__wrapped__ = original_start  # type: ignore[attr-defined]
    run.__wrapped__ = original_run  # type: ignore[attr-defined]
    threading.Thread.start = start  # type: ignore[method-assign]
    threading.Thread.run = run  # type: ignore[method-assign]


# -- endpoints ------------------------------------------------------------------------


def endpoint_lane(endpoint: Endpoint, label: str) -> Optional[str]:
    ours = endpoint.metadata.get("meshpatch") if endpoint.metadata else None
    if not isinstance(ours, dict):
        return None
    labels = ours.get("labels")
    if not isinstance(labels, dict):
        return None
    value = labels.get(label)
    return value if isinstance(value, str) and value else None


def _subset(config: EndpointsConfig, keep: Callable[[Endpoint], bool]) -> EndpointsConfig:
    localities: List[LocalityEndpoints] = []
    for loc in config.localities:
        endpoints = tuple(ep for ep in loc.endpoints if keep(ep))
        if endpoints:
            localities.append(LocalityEndpoints(loc.locality, loc.weight, loc.priority, endpoints))
    return EndpointsConfig(config.cluster_name, tuple(localities))


class LanePicker(Picker):
    """Per-lane pickers of one cluster, built when EDS (or a registry) changes."""

    __slots__ = ("by_lane", "baseline", "everything")

    def __init__(self, by_lane: Dict[str, Picker], baseline: Optional[Picker], everything: Picker) -> None:
        self.by_lane = by_lane
        self.baseline = baseline
        self.everything = everything

    def pick_in_lane(self, lane: Optional[str], request_hash: Optional[int] = None, exclude: Any = None) -> Any:
        if lane is not None:
            picker = self.by_lane.get(lane)
            if picker is not None:
                return picker.pick(request_hash, exclude)
        picker = self.baseline if self.baseline is not None else self.everything
        return picker.pick(request_hash, exclude)

    def pick(self, request_hash: Optional[int] = None, exclude: Any = None) -> Any:
        return self.pick_in_lane(current_lane(), request_hash, exclude)

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return self.everything.endpoints

    @property
    def reason(self) -> str:
        return getattr(self.everything, "reason", "")

    def lanes(self) -> Sequence[str]:
        return sorted(self.by_lane)


def build(config: Optional[EndpointsConfig], build_picker: Callable[[Optional[EndpointsConfig]], Picker]) -> Picker:
    """The cluster's picker: ``build_picker(config)`` as is when no endpoint has a
    lane label, else a :class:`LanePicker` over per-lane pickers built the same way."""
    everything = build_picker(config)
    if config is None:
        return everything
    conf = settings()
    if not conf.enabled:
        return everything
    label = conf.label
    names = {endpoint_lane(ep, label) for loc in config.localities for ep in loc.endpoints}
    names.discard(None)
    if not names:
        return everything
    by_lane: Dict[str, Picker] = {}
    for name in sorted(names):  # type: ignore[type-var]
        picker = build_picker(_subset(config, lambda ep, name=name: endpoint_lane(ep, label) == name))
        if picker.endpoints:  # a lane whose endpoints are all unhealthy falls back like an absent one
            by_lane[name] = picker  # type: ignore[index]
    baseline: Optional[Picker] = build_picker(_subset(config, lambda ep: endpoint_lane(ep, label) is None))
    if isinstance(baseline, EmptyPicker) or not baseline.endpoints:  # type: ignore[union-attr]
        baseline = None
    return LanePicker(by_lane, baseline, everything)
