"""RBAC for managed gRPC servers, with gRPC A41 semantics.

The inbound listener's HTTP filters carry Envoy RBAC configs (istiod: an
``envoy.filters.http.rbac.DENY`` filter, then an ``envoy.filters.http.rbac``
ALLOW filter).  They run in filter order on every call: a DENY engine denies
when any policy matches; an ALLOW engine denies when none does.  A policy
matches when any of its permissions and any of its principals match.

What a gRPC call offers the matchers (A41): ``url_path`` and ``:path`` are the
full method name; headers are the call metadata (multi-valued joined with
``,``), plus ``:method`` = POST, ``:authority`` (``host`` is the same header),
``content-type`` = application/grpc; ``te`` never matches; ``metadata``
never matches; ``requested_server_name`` is ""; ``authenticated`` matches TLS
peers, its ``principal_name`` is checked against the certificate's URI SANs,
else DNS SANs, else the subject, else "".
"""

from __future__ import annotations

import ipaddress
import threading
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from meshpatch.routing.matchers import HeaderMatcher, StringMatcher


class RbacRequest:
    """The per-call facts the matchers look at."""

    __slots__ = ("path", "headers", "authenticated", "principals", "peer_ip", "local_ip", "local_port")

    def __init__(self, path: str, headers: Dict[str, str], authenticated: bool, principals: Sequence[str],
                 peer_ip: Optional[str], local_ip: Optional[str], local_port: Optional[int]) -> None:
        self.path = path
        self.headers = headers
        self.authenticated = authenticated
        self.principals = principals  # URI SANs, else DNS SANs, else [subject], else [""]
        self.peer_ip = peer_ip
        self.local_ip = local_ip
        self.local_port = local_port

    def header(self, name: str) -> Optional[str]:
        if name == "te":
            return None
        if name == "host":
            name = ":authority"
        return self.headers.get(name)


# -- matchers ---------------------------------------------------------------------


class Matcher:
    __slots__ = ()
    uses_destination = False

    def matches(self, request: RbacRequest) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class AnyMatcher(Matcher):
    __slots__ = ()

    def matches(self, request: RbacRequest) -> bool:
        return True


class NeverMatcher(Matcher):
    """``metadata``: gRPC has no Envoy dynamic metadata, so it never matches."""

    __slots__ = ()

    def matches(self, request: RbacRequest) -> bool:
        return False


class AndMatcher(Matcher):
    __slots__ = ("children", "uses_destination")

    def __init__(self, children: Sequence[Matcher]) -> None:
        self.children = tuple(children)
        self.uses_destination = any(c.uses_destination for c in self.children)

    def matches(self, request: RbacRequest) -> bool:
        return all(c.matches(request) for c in self.children)


class OrMatcher(Matcher):
    __slots__ = ("children", "uses_destination")

    def __init__(self, children: Sequence[Matcher]) -> None:
        self.children = tuple(children)
        self.uses_destination = any(c.uses_destination for c in self.children)

    def matches(self, request: RbacRequest) -> bool:
        return any(c.matches(request) for c in self.children)


class NotMatcher(Matcher):
    __slots__ = ("child", "uses_destination")

    def __init__(self, child: Matcher) -> None:
        self.child = child
        self.uses_destination = child.uses_destination

    def matches(self, request: RbacRequest) -> bool:
        return not self.child.matches(request)


class HeaderRule(Matcher):
    __slots__ = ("matcher",)

    def __init__(self, matcher: HeaderMatcher) -> None:
        self.matcher = matcher

    def matches(self, request: RbacRequest) -> bool:
        return self.matcher.matches(request.header(self.matcher.name))


class PathRule(Matcher):
    __slots__ = ("matcher",)

    def __init__(self, matcher: StringMatcher) -> None:
        self.matcher = matcher

    def matches(self, request: RbacRequest) -> bool:
        return self.matcher.matches(request.path)


class StringRule(Matcher):
    """A StringMatcher on a fixed value (``requested_server_name`` is always "")."""

    __slots__ = ("matcher", "value")

    def __init__(self, matcher: StringMatcher, value: str) -> None:
        self.matcher = matcher
        self.value = value

    def matches(self, request: RbacRequest) -> bool:
        return self.matcher.matches(self.value)


class CidrRule(Matcher):
    __slots__ = ("network", "which", "uses_destination")

    def __init__(self, network: Any, which: str) -> None:
        self.network = network
        self.which = which  # "peer" | "local"
        self.uses_destination = which == "local"

    def matches(self, request: RbacRequest) -> bool:
        text = request.peer_ip if self.which == "peer" else request.local_ip
        if not text:
            return False
        try:
            return ipaddress.ip_address(text) in self.network
        except ValueError:
            return False


class PortRule(Matcher):
    __slots__ = ("low", "high")
    uses_destination = True

    def __init__(self, low: int, high: int) -> None:
        self.low = low
        self.high = high  # exclusive

    def matches(self, request: RbacRequest) -> bool:
        port = request.local_port
        return port is not None and self.low <= port < self.high


class AuthenticatedRule(Matcher):
    __slots__ = ("matcher",)

    def __init__(self, matcher: Optional[StringMatcher]) -> None:
        self.matcher = matcher

    def matches(self, request: RbacRequest) -> bool:
        if not request.authenticated:
            return False  # plaintext peers are never "authenticated", whatever the name matcher
        if self.matcher is None:
            return True
        return any(self.matcher.matches(p) for p in request.principals)


# -- engines ----------------------------------------------------------------------


class Policy:
    __slots__ = ("name", "permissions", "principals")

    def __init__(self, name: str, permissions: Matcher, principals: Matcher) -> None:
        self.name = name
        self.permissions = permissions
        self.principals = principals

    def matches(self, request: RbacRequest) -> bool:
        return self.permissions.matches(request) and self.principals.matches(request)


class Engine:
    """One RBAC filter: ``action`` ALLOW or DENY and its policies (sorted by
    name, as Envoy evaluates the policy map)."""

    __slots__ = ("filter_name", "action", "policies", "uses_destination", "signature")

    def __init__(self, filter_name: str, action: str, policies: Iterable[Policy], signature: bytes = b"") -> None:
        self.filter_name = filter_name
        self.signature = signature  # the filter config as received: equal configs, equal signatures
        self.action = action
        self.policies = tuple(sorted(policies, key=lambda p: p.name))
        self.uses_destination = any(p.permissions.uses_destination or p.principals.uses_destination
                                    for p in self.policies)

    def denies(self, request: RbacRequest) -> Optional[str]:
        """The reason this engine denies the call, or None."""
        for policy in self.policies:
            if policy.matches(request):
                return f"{self.filter_name}: matched DENY policy {policy.name}" if self.action == "DENY" else None
        if self.action == "ALLOW":
            return f"{self.filter_name}: no ALLOW policy matched"
        return None


def evaluate(engines: Sequence[Engine], request: RbacRequest) -> Optional[str]:
    """Run the filters in order; the first denial wins (None = allowed)."""
    for engine in engines:
        reason = engine.denies(request)
        if reason is not None:
            return reason
    return None


# -- counters ---------------------------------------------------------------------


class Counters:
    """Allowed / denied calls per server port (status output, metrics, tests)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.allowed: Dict[str, int] = {}
        self.denied: Dict[str, int] = {}
        self.last_denied: List[Tuple[str, str, str]] = []  # (listener, method, reason), latest 50

    def count(self, listener: str, method: str, reason: Optional[str]) -> None:
        with self._lock:
            if reason is None:
                self.allowed[listener] = self.allowed.get(listener, 0) + 1
            else:
                self.denied[listener] = self.denied.get(listener, 0) + 1
                self.last_denied.append((listener, method, reason))
                del self.last_denied[:-50]

    def snapshot(self) -> Dict[str, Any]:
        with self._lock:
            return {"allowed": dict(self.allowed), "denied": dict(self.denied),
                    "denied_total": sum(self.denied.values()), "last_denied": list(self.last_denied)}


COUNTERS = Counters()
