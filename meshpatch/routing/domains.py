"""Virtual-host selection by domain, as Envoy and gRPC (A27) do it.

Most specific wins: an exact domain, then the longest ``*.suffix`` wildcard,
then the longest ``prefix*`` wildcard, then ``*``.  Matching is
case-insensitive.  The authority is tried as ``host:port`` first (istiod lists
both forms for proxyless clients) and then as bare ``host``.
"""

from __future__ import annotations

from typing import Optional, Sequence, TypeVar

from meshpatch.routing.model import VirtualHost

V = TypeVar("V", bound=VirtualHost)

# (rank, length): lower rank is more specific; longer wildcard wins within a rank.
_NO_MATCH = (9, 0)


def _score(domain: str, authority: str) -> tuple:
    if domain == "*":
        return (3, 0)
    if domain.startswith("*"):
        suffix = domain[1:]
        if len(authority) > len(suffix) and authority.endswith(suffix):
            return (1, -len(suffix))
        return _NO_MATCH
    if domain.endswith("*"):
        prefix = domain[:-1]
        if len(authority) > len(prefix) and authority.startswith(prefix):
            return (2, -len(prefix))
        return _NO_MATCH
    return (0, 0) if domain == authority else _NO_MATCH


def select_virtual_host(vhosts: Sequence[V], host: str, port: Optional[int]) -> Optional[V]:
    host = host.lower()
    candidates = [f"{host}:{port}", host] if port is not None else [host]
    for authority in candidates:
        best: Optional[V] = None
        best_score = _NO_MATCH
        for vhost in vhosts:
            for domain in vhost.domains:
                score = _score(domain.lower(), authority)
                if score < best_score:
                    best, best_score = vhost, score
        if best is not None:
            return best
    return None
