"""One routed call: the matched route's policy, turned into decisions for the hooks.

The router matches a request once and returns a :class:`Call`.  The hook then
asks it, in Envoy's order: answer locally (direct response, redirect)?  inject a
fault (delay, abort)?  which headers / path / host to send?  (``call.plain``
says in one test that there is none of that) and runs the attempt loop:
``next_endpoint()`` (the attempt begins) → send → ``attempt_done(outcome)`` (the
attempt is reported; a delay means retry) or ``finish(outcome)`` (the call ends
with this attempt).  The library-specific parts (sending, building a response,
mapping errors) stay in the hooks; every policy decision is here, so requests,
httpx and grpc behave the same for the same xDS.
"""

from __future__ import annotations

import random
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from meshpatch import telemetry
from meshpatch.api import CircuitBreakerOpen, NoHealthyUpstream, Pick
from meshpatch.lanes import LanePicker, call_lane
from meshpatch.routing.outcome import CANCELLED, CONNECT_FAILURE, OK, RESET, TIMEOUT, Outcome
from meshpatch.routing.route_policy import (
    ADD_IF_ABSENT,
    APPEND_IF_EXISTS_OR_ADD,
    OVERWRITE_IF_EXISTS,
    OVERWRITE_IF_EXISTS_OR_ADD,
    NO_HEADER_OPS,
    HeaderOps,
    regex_substitute,
)

_active_faults: Dict[int, int] = {}
_fault_lock = threading.Lock()


class FaultDecision:
    __slots__ = ("delay", "abort_http", "abort_grpc", "_key")

    def __init__(self, delay: float, abort_http: Optional[int], abort_grpc: Optional[int], key: Optional[int]) -> None:
        self.delay = delay
        self.abort_http = abort_http
        self.abort_grpc = abort_grpc
        self._key = key

    def done(self) -> None:
        """Release the max_active_faults slot this fault held."""
        if self._key is not None:
            with _fault_lock:
                _active_faults[self._key] -= 1
            self._key = None


class Call:
    __slots__ = (
        "scheme", "host", "port", "method", "path", "headers", "authority", "compiled", "policy", "handle",
        "request_hash", "tried", "retries", "started", "deadline", "is_grpc", "_in_retry", "attempts", "plain",
        # telemetry (meshpatch.telemetry) and lanes (meshpatch.lanes); ``tel``: an OTel
        # provider was set when the call was routed (the tel_* fields exist only then)
        "endpoint", "_state", "tel", "tel_span", "tel_inner", "tel_open", "tel_done", "tel_lane",
    )

    def __init__(self, scheme: str, host: str, port: int, method: str, path: str, headers: Any, authority: str,
                 compiled: Any, handle: Any, request_hash: Optional[int]) -> None:
        """``compiled``: the matched route's :class:`~meshpatch.routing.target.CompiledRoute`."""
        self.scheme = scheme
        self.host = host
        self.port = port
        self.method = method
        self.path = path  # as the app sent it, query included
        self.headers = headers
        self.authority = authority
        self.compiled = compiled
        self.policy = compiled.policy
        self.handle = handle
        self.request_hash = request_hash
        self.is_grpc = scheme == "grpc"
        self.tried: Any = None  # the first attempt's endpoint; a set of (address, port) once retries start
        self.retries = 0
        self.attempts = 0
        self._in_retry = False
        #: the current attempt's endpoint (None before the first); ``pick`` describes it
        self.endpoint: Any = None
        self.tel = False  # the router sets it (telemetry.routed), with the tel_* fields
        timeout = compiled.grpc_timeout if self.is_grpc else compiled.timeout
        if timeout > 0:
            # ``started`` exists when a deadline or telemetry needs it (telemetry.routed)
            self.started = time.monotonic()
            self.deadline = self.started + timeout
            self.plain = False
        else:
            self.deadline = None
            #: nothing but pick, send and the retry decision: the hooks skip fault,
            #: header ops, rewrites, mirrors and attempt timeouts (RoutePolicy.plain)
            self.plain = compiled.plain

    # -- what kind of call ------------------------------------------------

    @property
    def route(self) -> Any:
        """The matched :class:`~meshpatch.routing.model.Route`."""
        return self.compiled.route

    @property
    def kind(self) -> str:
        """``forward``, ``redirect`` or ``direct``."""
        kind = self.compiled.action.kind
        return kind if kind in ("redirect", "direct") else "forward"

    @property
    def timeout(self) -> float:
        """Seconds for the whole call (0 = none).  gRPC uses max_stream_duration
        when set (A31); HTTP uses the route timeout."""
        compiled = self.compiled
        return compiled.grpc_timeout if self.is_grpc else compiled.timeout

    def attempt_timeout(self) -> Optional[float]:
        """Timeout for the next attempt: per_try_timeout bounded by what is left
        of the call's timeout; None = no limit from the mesh."""
        retry = self.policy.retry
        limit = retry.per_try_timeout if retry is not None and retry.per_try_timeout > 0 else None
        if self.deadline is not None:
            left = max(self.deadline - time.monotonic(), 0.001)
            return left if limit is None or left < limit else limit
        return limit

    # -- attempts -----------------------------------------------------------

    @property
    def pick(self) -> Optional[Pick]:
        """The current attempt as a :class:`~meshpatch.api.Pick` (None before the
        first): built when asked, since the hooks read the endpoint itself."""
        endpoint = self.endpoint
        if endpoint is None:
            return None
        return Pick(endpoint.address, endpoint.port, self.authority, self.compiled.name, endpoint, self.handle)

    def next_endpoint(self, begin: bool = True) -> Any:
        """Choose the next attempt's endpoint and (``begin``) count the attempt
        as started: the hook sends right after, and must end it with
        :meth:`attempt_done` / :meth:`finish` even when sending fails.
        ``begin=False`` leaves ``Pick.started`` to the caller (Router.pick).
        Returns the :class:`~meshpatch.routing.model.Endpoint` (address, port)."""
        handle = self.handle
        tried = self.tried
        if tried is not None and type(tried) is not set:
            tried = self.tried = {(tried.address, tried.port)}
        picker = handle.picker
        if picker.__class__ is LanePicker:
            lane = call_lane(self.headers)
            if self.tel:
                self.tel_lane = lane
            endpoint = picker.pick_in_lane(lane, self.request_hash, tried)
        else:
            endpoint = picker.pick(self.request_hash, tried)
        if endpoint is None:
            if self.tel:
                telemetry.call_ended(self, None, "no_healthy_upstream")
            raise NoHealthyUpstream(self.host, self.port, handle.name, getattr(handle.picker, "reason", ""))
        if tried is None:
            self.tried = endpoint  # made a set of keys only if a retry needs it
        else:
            tried.add((endpoint.address, endpoint.port))
        self.attempts += 1
        self.endpoint = endpoint
        # the endpoint's tracked state, handed back when the attempt ends (None: not begun here)
        self._state = handle.attempt_began(endpoint) if begin else None
        if self.tel:
            telemetry.attempt_started(self)
        return endpoint

    def next_pick(self, begin: bool = True) -> Pick:
        """:meth:`next_endpoint` as a :class:`~meshpatch.api.Pick`."""
        self.next_endpoint(begin)
        return self.pick  # type: ignore[return-value]

    def _ended(self, outcome: Optional[Outcome]) -> None:
        self.handle.attempt_ended(self._state, outcome)
        if self._in_retry:
            self._in_retry = False
            self.handle.retry_finished()

    def attempt_done(self, outcome: Outcome) -> Optional[float]:
        """The current attempt ended with ``outcome``: report it to the cluster
        and decide about a retry, for the hooks' attempt loops."""
        self._ended(outcome)
        if self.tel:
            return self.retry_delay(outcome)
        return self._retry_delay(outcome)

    def finish(self, outcome: Optional[Outcome]) -> None:
        """The current attempt ended with ``outcome`` and the call ends with it,
        no retry considered (streams, futures, errors the hook re-raises, an
        attempt that could not be sent)."""
        self._ended(outcome)
        if self.tel:
            telemetry.attempt_ended(self, outcome)
            telemetry.call_ended(self, outcome)

    def aborted(self, status: Any) -> None:
        """A fault-filter abort answered the call before any attempt."""
        if self.tel:
            telemetry.call_ended(self, None, f"fault_abort_{status}")

    def retriable(self, outcome: Outcome) -> bool:
        retry = self.policy.retry
        if retry is None or outcome.kind == CANCELLED:
            return False
        if self.is_grpc:
            if outcome.grpc_status is not None and outcome.grpc_status in retry.grpc_codes:
                return True
            return outcome.kind == CONNECT_FAILURE and "connect-failure" in retry.retry_on
        on = retry.retry_on
        kind = outcome.kind
        if kind == CONNECT_FAILURE:
            return bool(on & {"5xx", "gateway-error", "connect-failure", "reset"})
        if kind in (RESET, TIMEOUT):
            return bool(on & {"5xx", "gateway-error", "reset"})
        if kind != OK or outcome.http_status is None:
            return False
        status = outcome.http_status
        if "5xx" in on and 500 <= status < 600:
            return True
        if "gateway-error" in on and status in (502, 503, 504):
            return True
        if "retriable-4xx" in on and status == 409:
            return True
        return "retriable-status-codes" in on and status in retry.retriable_status_codes

    def retry_delay(self, outcome: Outcome) -> Optional[float]:
        """Seconds to wait before retrying, or None when the call is done.

        Envoy semantics: up to ``num_retries`` retries on a ``retry_on``
        condition, within the call's timeout, admitted by the cluster's
        max_retries budget, with fully jittered exponential backoff
        (25 ms base, 10x cap by default)."""
        delay = self._retry_delay(outcome)
        if self.tel:
            telemetry.attempt_ended(self, outcome)
            if delay is None:
                telemetry.call_ended(self, outcome)
            else:
                telemetry.retried(self)
        return delay

    def _retry_delay(self, outcome: Outcome) -> Optional[float]:
        retry = self.policy.retry
        if retry is None:
            return None
        if outcome.kind == OK:  # fast path for the common case: a non-error answer
            status = outcome.http_status
            if (status is not None and status < 409) or outcome.grpc_status == "OK":
                return None
        if self.is_grpc:
            # gRPC's own retry semantics (A44), so a gRPC call behaves as grpcio's
            # native xDS client would: at most 5 attempts, exponential backoff with
            # +/-20 % jitter (C-core's BackOff), no concurrent-retry budget.
            if self.retries >= min(retry.num_retries, 4) or not self.retriable(outcome):
                return None
            delay = min(retry.base_interval * (2 ** self.retries), retry.max_interval) * random.uniform(0.8, 1.2)
            if self.deadline is not None and time.monotonic() + delay >= self.deadline:
                return None
            self.retries += 1
            return delay
        if self.retries >= retry.num_retries or not self.retriable(outcome):
            return None
        bound = min(retry.base_interval * (2 ** self.retries), retry.max_interval)
        delay = random.uniform(0, bound)  # Envoy: fully jittered exponential backoff
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        if self.handle.admit_retry() is not None:
            return None  # retry budget (circuit breaker max_retries) exhausted
        self.retries += 1
        self._in_retry = True
        return delay

    # -- faults ---------------------------------------------------------------

    def fault(self) -> Optional[FaultDecision]:
        """Independent draws for delay and abort, as Envoy's fault filter does."""
        spec = self.policy.fault
        if spec is None:
            return None
        delay = spec.delay if spec.delay_fraction and random.random() < spec.delay_fraction else 0.0
        abort = spec.abort_fraction and random.random() < spec.abort_fraction
        if not delay and not abort:
            return None
        key = None
        if spec.max_active is not None:
            key = id(spec)
            with _fault_lock:
                if _active_faults.get(key, 0) >= spec.max_active:
                    return None
                _active_faults[key] = _active_faults.get(key, 0) + 1
        return FaultDecision(delay, spec.abort_http if abort else None, spec.abort_grpc if abort else None, key)

    # -- HTTP request shaping ------------------------------------------------------

    def header_ops(self) -> Optional[HeaderOps]:
        """The request/response header mutations of this call; None when there
        are none (the common case, answered without building anything)."""
        policy = self.policy
        if policy.cluster_header_ops and self.handle is not None:
            for name, ops in policy.cluster_header_ops:
                if name == self.handle.name:
                    return ops.then(policy.header_ops) or None
        ops = policy.header_ops
        return None if ops is NO_HEADER_OPS or not ops else ops

    def rewritten_path(self) -> Optional[str]:
        """The upstream path after prefix / regex rewrite, query kept; None = unchanged."""
        policy = self.policy
        if policy.prefix_rewrite is None and policy.regex_rewrite is None:
            return None
        path, sep, query = self.path.partition("?")
        if policy.regex_rewrite is not None:
            pattern, substitution = policy.regex_rewrite
            path = regex_substitute(pattern, substitution, path)
        else:
            matcher = self.route.match.path
            prefix = matcher.value if matcher.kind in ("prefix", "path") else ""
            if matcher.kind == "prefix" and not matcher.case_sensitive:
                prefix = path[: len(prefix)]
            path = policy.prefix_rewrite + path[len(prefix):] if path.startswith(prefix) else path
        return path + sep + query

    def redirect_location(self) -> str:
        spec = self.policy.redirect
        path, sep, query = self.path.partition("?")
        if spec.path is not None:
            path = spec.path
        elif spec.prefix_rewrite is not None:
            matcher = self.route.match.path
            prefix = matcher.value if matcher.kind == "prefix" else ""
            path = spec.prefix_rewrite + path[len(prefix):]
        elif spec.regex is not None:
            path = regex_substitute(spec.regex, spec.substitution, path)
        scheme = spec.scheme or ("https" if self.scheme == "https" else "http")
        host = spec.host or self.host
        default = 443 if scheme == "https" else 80
        if spec.port:
            port: Optional[int] = spec.port
        elif spec.scheme and spec.scheme != self.scheme:
            port = None  # scheme change drops the port, as Envoy does
        else:
            port = self.port
        netloc = host if port in (None, default) else f"{host}:{port}"
        keep_query = query and not spec.strip_query
        return f"{scheme}://{netloc}{path}{'?' + query if keep_query else ''}"

    def mirror_picks(self, router: Any) -> List[Pick]:
        """Endpoints for this call's shadow copies (fire and forget)."""
        picks = []
        for mirror in self.policy.mirrors:
            if mirror.fraction is not None and random.random() >= mirror.fraction:
                continue
            handle = router.clusters.get(mirror.cluster)
            if handle is None:
                continue
            endpoint = handle.picker.pick(None, None)
            if endpoint is None:
                continue
            authority = self.authority
            if mirror.shadow_suffix:
                host, _, port = authority.rpartition(":")
                authority = f"{host}-shadow:{port}" if host else f"{authority}-shadow"
            picks.append(Pick(endpoint.address, endpoint.port, authority, self.compiled.name, endpoint, handle))
        return picks


def apply_header_ops(headers: Any, adds: Tuple[Tuple[str, str, int], ...], removes: Tuple[str, ...]) -> None:
    """Apply Envoy header mutations to a mutable, case-insensitive header mapping
    (requests' CaseInsensitiveDict, httpx.Headers).  Multiple values are joined
    with ``,`` since these header objects hold one value per name."""
    for name in removes:
        if name in headers:
            del headers[name]
    for name, value, action in adds:
        present = name in headers
        if action == APPEND_IF_EXISTS_OR_ADD:
            headers[name] = f"{headers[name]},{value}" if present else value
        elif action == ADD_IF_ABSENT:
            if not present:
                headers[name] = value
        elif action == OVERWRITE_IF_EXISTS_OR_ADD:
            headers[name] = value
        elif action == OVERWRITE_IF_EXISTS and present:
            headers[name] = value


__all__ = ["Call", "FaultDecision", "apply_header_ops", "CircuitBreakerOpen", "NO_HEADER_OPS"]
