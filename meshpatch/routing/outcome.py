"""What happened to one attempt, as the hooks report it to the cluster.

Hooks translate their library's result into an :class:`Outcome`; the cluster
uses it for in-flight accounting (least request, circuit breaking), outlier
detection and retries, and telemetry reads it too.  Kept free of any patched
library so every hook reports the same way.
"""

from __future__ import annotations

from typing import Optional

OK = "ok"  # a response arrived (any HTTP status / gRPC OK or an application status)
CONNECT_FAILURE = "connect_failure"  # could not connect / refused
RESET = "reset"  # connection reset or closed before a complete response
TIMEOUT = "timeout"  # the attempt hit its timeout
CANCELLED = "cancelled"  # the app cancelled; says nothing about the endpoint
LOCAL = "local"  # failed before leaving the process (meshpatch or library error)

# Envoy treats these HTTP statuses as "gateway errors" (consecutive_gateway_failure).
GATEWAY_STATUSES = frozenset({502, 503, 504})
# gRPC status names that map onto upstream failures for outlier detection,
# following Envoy's gRPC → HTTP mapping (UNAVAILABLE → 503, DEADLINE_EXCEEDED → 504, ...).
GRPC_AS_HTTP = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


class Outcome:
    """``kind`` is one of the constants above; for ``ok`` the status says more."""

    __slots__ = ("kind", "http_status", "grpc_status")

    def __init__(self, kind: str, http_status: Optional[int] = None, grpc_status: Optional[str] = None) -> None:
        self.kind = kind
        self.http_status = http_status
        self.grpc_status = grpc_status

    @property
    def status_as_http(self) -> Optional[int]:
        """The HTTP status, or the gRPC status mapped like Envoy maps it."""
        if self.http_status is not None:
            return self.http_status
        if self.grpc_status is not None:
            return GRPC_AS_HTTP.get(self.grpc_status, 500)
        return None

    @property
    def is_5xx(self) -> bool:
        """Envoy's consecutive_5xx counts 5xx responses and local-origin failures."""
        if self.kind in (CONNECT_FAILURE, RESET, TIMEOUT):
            return True
        status = self.status_as_http
        return status is not None and 500 <= status < 600

    @property
    def is_gateway_failure(self) -> bool:
        if self.kind in (CONNECT_FAILURE, RESET, TIMEOUT):
            return True
        return self.status_as_http in GATEWAY_STATUSES

    @property
    def is_success(self) -> bool:
        return self.kind == OK and not self.is_5xx

    def __repr__(self) -> str:
        detail = self.http_status if self.http_status is not None else self.grpc_status
        return f"Outcome({self.kind}{'' if detail is None else ' ' + str(detail)})"


SUCCESS = Outcome(OK, 200)


class _HttpAnswers(dict):
    """status → the shared Outcome of an attempt answered with that HTTP status
    (outcomes are never mutated): ``HTTP_ANSWERS[status]`` is a plain dict hit on
    the request path, no Python call and no allocation; a new status is filled
    in by ``__missing__``."""

    def __missing__(self, status: int) -> Outcome:
        outcome = self[status] = Outcome(OK, status)
        return outcome


HTTP_ANSWERS: dict = _HttpAnswers()


def http_answer(status: int) -> Outcome:
    """The shared Outcome of an attempt answered with HTTP ``status``."""
    return HTTP_ANSWERS[status]
