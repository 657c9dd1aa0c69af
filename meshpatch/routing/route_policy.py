"""Route-level traffic policy: retries, hashing, mirroring, header changes, rewrites,
redirects, direct responses and fault injection — as Envoy's RouteAction and
HTTP fault filter define them.

Built once at decode time and read by :mod:`meshpatch.routing.call` per request.
Nothing here imports a patched library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Pattern, Tuple

from meshpatch.routing.matchers import StringMatcher

# HeaderValueOption.append_action
APPEND_IF_EXISTS_OR_ADD = 0
ADD_IF_ABSENT = 1
OVERWRITE_IF_EXISTS_OR_ADD = 2
OVERWRITE_IF_EXISTS = 3

# retry_on conditions that apply to HTTP responses/failures; gRPC status names apply to gRPC calls.
HTTP_RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "connect-failure", "refused-stream", "retriable-4xx",
    "retriable-status-codes", "envoy-ratelimited", "reset-before-request", "http3-post-connect-failure",
    "retriable-headers",
})
GRPC_RETRY_ON = {
    "cancelled": "CANCELLED",
    "deadline-exceeded": "DEADLINE_EXCEEDED",
    "internal": "INTERNAL",
    "resource-exhausted": "RESOURCE_EXHAUSTED",
    "unavailable": "UNAVAILABLE",
}


@dataclass(frozen=True, slots=True)
class QueryMatcher:
    """``QueryParameterMatcher``: a string matcher on the value, or presence."""

    name: str
    string: Optional[StringMatcher] = None
    present: bool = False

    def matches(self, values: Tuple[str, ...]) -> bool:
        if self.string is None:
            return bool(values) == self.present
        return any(self.string.matches(v) for v in values)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retry_on: frozenset
    grpc_codes: frozenset
    num_retries: int = 1
    per_try_timeout: float = 0.0
    base_interval: float = 0.025
    max_interval: float = 0.25
    retriable_status_codes: frozenset = frozenset()


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """One RouteAction.hash_policy entry; ``kind`` is header/cookie/source_ip/query."""

    kind: str
    name: str = ""
    terminal: bool = False
    regex: Optional[Pattern[str]] = None
    substitution: str = ""


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    cluster: str
    fraction: Optional[float] = None  # None = always
    shadow_suffix: bool = True


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Request and response header mutations, already in application order."""

    request_add: Tuple[Tuple[str, str, int], ...] = ()
    request_remove: Tuple[str, ...] = ()
    response_add: Tuple[Tuple[str, str, int], ...] = ()
    response_remove: Tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.request_add or self.request_remove or self.response_add or self.response_remove)

    def then(self, other: "HeaderOps") -> "HeaderOps":
        if not other:
            return self
        if not self:
            return other
        return HeaderOps(
            self.request_add + other.request_add,
            self.request_remove + other.request_remove,
            self.response_add + other.response_add,
            self.response_remove + other.response_remove,
        )


NO_HEADER_OPS = HeaderOps()


@dataclass(frozen=True, slots=True)
class Redirect:
    scheme: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    path: Optional[str] = None
    prefix_rewrite: Optional[str] = None
    regex: Optional[Pattern[str]] = None
    substitution: str = ""
    code: int = 301
    strip_query: bool = False


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Fault:
    """HTTP fault filter config for a route (delay then abort, independent draws)."""

    delay: float = 0.0
    delay_fraction: float = 0.0
    abort_http: Optional[int] = None
    abort_grpc: Optional[int] = None
    abort_fraction: float = 0.0
    max_active: Optional[int] = None


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """Everything a matched route asks of the call besides picking a cluster."""

    retry: Optional[RetryPolicy] = None
    hash_policies: Tuple[HashPolicy, ...] = ()
    mirrors: Tuple[MirrorPolicy, ...] = ()
    header_ops: HeaderOps = NO_HEADER_OPS
    prefix_rewrite: Optional[str] = None
    regex_rewrite: Optional[Tuple[Pattern[str], str]] = None
    host_rewrite: Optional[str] = None
    redirect: Optional[Redirect] = None
    direct: Optional[DirectResponse] = None
    fault: Optional[Fault] = None
    query: Tuple[QueryMatcher, ...] = ()
    # per weighted cluster header mutations (cluster name → ops), most specific level
    cluster_header_ops: Tuple[Tuple[str, HeaderOps], ...] = field(default_factory=tuple)
    #: Nothing to do for a forwarded call besides picking and the retry decision:
    #: no fault, header mutation, rewrite, mirror or per-try timeout.  Computed
    #: once here so the hooks skip those steps with one test per call: each step
    #: reads policy objects, and between two real requests every object read is
    #: a likely cache miss (bench/bench_in_situ.py).
    plain: bool = field(init=False, default=False, compare=False)

    def __post_init__(self) -> None:
        retry = self.retry
        plain = (self.fault is None and not self.mirrors and (self.header_ops is NO_HEADER_OPS or not self.header_ops)
                 and not self.cluster_header_ops and self.prefix_rewrite is None and self.regex_rewrite is None
                 and (retry is None or retry.per_try_timeout <= 0))
        object.__setattr__(self, "plain", plain)


NO_POLICY = RoutePolicy()


def regex_substitute(pattern: Pattern[str], substitution: str, text: str) -> str:
    """Envoy's RegexMatchAndSubstitute: replace every match; ``\\1`` refers to a group,
    in RE2 and in Python alike."""
    return pattern.sub(substitution, text)
