"""The one routing contract between the core and the library hooks.

Hooks never look at xDS, registries or load balancers: they describe a call
(scheme, host, port, method, path, headers) and get back either ``None``
("not in the mesh: make the original call untouched") or a :class:`Pick`
naming the endpoint to connect to.  Keeping the contract this small is what
lets a new hook be one short file.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

if TYPE_CHECKING:  # pragma: no cover
    from typing import Protocol

    class HeaderLookup(Protocol):
        """Anything with ``get(lower_case_name)``: requests' CaseInsensitiveDict,
        httpx.Headers or a plain dict with lower-case keys (gRPC metadata)."""

        def get(self, key: str, default: Any = None) -> Any: ...


class MeshError(Exception):
    """Base of the errors meshpatch deliberately raises into the application.

    Everything else raised inside meshpatch is a bug: hooks catch it, log it
    once, count it and make the original call instead.
    """


class NoHealthyUpstream(MeshError):
    """The host is in the mesh and a route matched, but the chosen cluster has
    no endpoint that can take the call (Envoy answers 503 "no healthy
    upstream", gRPC fails with UNAVAILABLE).  Hooks turn it into the library's
    own connection error so the app's existing error handling applies."""

    def __init__(self, host: str, port: int, cluster: str, detail: str = "") -> None:
        self.host = host
        self.port = port
        self.cluster = cluster
        msg = f"meshpatch: no healthy upstream for {host}:{port} (cluster {cluster})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


class NoRouteMatched(MeshError):
    """The host is in the mesh but no route of its virtual host matches the
    request (Envoy: 404 NR; gRPC: UNAVAILABLE)."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.host = host
        self.port = port
        self.path = path
        super().__init__(f"meshpatch: no route matched {path!r} for {host}:{port}")


class MeshUnavailable(MeshError):
    """``MESHPATCH_FAIL_MODE=closed``: the host looks like a mesh name (a short
    name or ``*.svc[.cluster.local]``) but no xDS config for it could be had in
    time (control plane unreachable or silent).  Failing fast is the choice of
    apps that must never reach a mesh service unrouted (no mTLS, no policy)."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        super().__init__(f"meshpatch: no xDS config for {host}:{port} ({reason}); MESHPATCH_FAIL_MODE=closed")


class CircuitBreakerOpen(MeshError):
    """A cluster's circuit breaker refused the call (max_requests, max_pending_requests
    or max_retries reached): Envoy answers 503 with ``x-envoy-overloaded``, gRPC
    fails with UNAVAILABLE.  Raised before anything is sent, so failing fast."""

    def __init__(self, cluster: str, limit: str) -> None:
        self.cluster = cluster
        self.limit = limit
        super().__init__(f"meshpatch: circuit breaker open for cluster {cluster} ({limit} reached)")


class Pick:
    """Where one call goes.  Created once per routed call; kept tiny.

    ``address``/``port`` are the endpoint to connect to; ``authority`` is the
    logical ``host[:port]`` the app asked for (used for Host / :authority and
    TLS server name); ``cluster`` and ``metadata`` describe the choice for
    telemetry and later policies (read from the cluster handle and the
    endpoint when asked: a pick references as few objects as it can, since
    every reference taken on the request path touches that object's memory).
    """

    __slots__ = ("address", "port", "authority", "route", "endpoint", "handle")

    def __init__(self, address: str, port: int, authority: str, route: str = "", endpoint: Any = None,
                 handle: Any = None) -> None:
        self.address = address
        self.port = port
        self.authority = authority
        self.route = route
        self.endpoint = endpoint
        self.handle = handle

    @property
    def cluster(self) -> str:
        return self.handle.name if self.handle is not None else ""

    @property
    def metadata(self) -> Mapping[str, Any]:
        return self.endpoint.metadata if self.endpoint is not None else {}

    def started(self) -> None:
        """The attempt to this endpoint begins (hooks call it right before sending)."""
        if self.handle is not None:
            self.handle.on_attempt_start(self.endpoint)

    def finished(self, outcome: Any) -> None:
        """The attempt ended with ``outcome`` (a :class:`meshpatch.routing.outcome.Outcome`)."""
        if self.handle is not None:
            self.handle.on_attempt_end(self.endpoint, outcome)

    def __repr__(self) -> str:
        return f"Pick({self.address}:{self.port} cluster={self.cluster!r} route={self.route!r})"


def pick(
    scheme: str,
    host: str,
    port: Optional[int],
    method: str,
    path: str,
    headers: Optional["HeaderLookup"] = None,
) -> Optional[Pick]:
    """Route one call.  ``None`` means "not in the mesh": make the call as is.

    ``scheme`` is ``http``, ``https`` or ``grpc``; ``port`` ``None`` means the
    scheme's default (80 / 443).  For gRPC, ``path`` is ``/Service/Method`` and
    ``headers`` the call metadata.  May raise :class:`MeshError`; any other
    exception is an internal bug the hook must contain.
    """
    from meshpatch.agent import get_agent

    agent = get_agent()
    if agent is None:
        return None
    return agent.router.pick(scheme, host, port, method, path, headers)
