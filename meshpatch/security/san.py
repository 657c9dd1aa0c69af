"""Server authorization: does the peer's leaf certificate carry an acceptable SAN?

In a mesh the server certificate names a workload identity
(``spiffe://cluster.local/ns/echo/sa/echo``), not the host that was dialled, so
hostname verification is off and the cluster's ``match_subject_alt_names``
decide instead — the same rule gRPC applies with xds credentials (A29): the
peer is accepted when any of its DNS, URI, email or IP SANs satisfies any
matcher; no matchers means any certificate from the mesh CA will do.  DNS SANs
may be wildcards (``*.example.com``), which an ``exact`` matcher honours.
"""

from __future__ import annotations

import ipaddress
from typing import Iterable, List, Optional, Sequence, Tuple

from meshpatch.routing.matchers import StringMatcher
from meshpatch.security.model import SanMatcher

#: Python's getpeercert() SAN type names → the xDS SAN type.
_PY_TYPES = {"DNS": "DNS", "URI": "URI", "email": "EMAIL", "IP Address": "IP"}


def peer_sans(peercert: Optional[dict]) -> List[Tuple[str, str]]:
    """(type, value) SANs from :meth:`ssl.SSLSocket.getpeercert` (verified form)."""
    if not peercert:
        return []
    out = []
    for kind, value in peercert.get("subjectAltName", ()):
        mapped = _PY_TYPES.get(kind)
        if mapped == "IP":
            value = _normal_ip(value)
        if mapped is not None:
            out.append((mapped, value))
    return out


def _normal_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        return text.strip()


def _dns_wildcard_match(san: str, name: str) -> bool:
    """RFC 6125 style, case-insensitive: ``*.example.com`` matches exactly one left-most label."""
    san, name = san.lower().rstrip("."), name.lower().rstrip(".")
    if not san.startswith("*.") or "*" in san[1:]:
        return False
    suffix = san[1:]
    if not name.endswith(suffix):
        return False
    label = name[: -len(suffix)]
    return bool(label) and "." not in label


class SanVerifier:
    """Compiled matchers of one UpstreamTls; ``accepts`` is called once per
    new connection (handshake), never per request."""

    __slots__ = ("_matchers", "description")

    def __init__(self, matchers: Sequence[SanMatcher]) -> None:
        self._matchers = tuple((m, StringMatcher(m.kind, m.value, m.ignore_case)) for m in matchers)
        self.description = ", ".join(m.describe() for m in matchers) or "any SAN"

    def accepts(self, sans: Iterable[Tuple[str, str]]) -> bool:
        if not self._matchers:
            return True
        sans = list(sans)
        for spec, matcher in self._matchers:
            for kind, value in sans:
                if spec.san_type and spec.san_type != kind:
                    continue
                if kind == "IP" and spec.kind == "exact":
                    if _normal_ip(spec.value) == value:
                        return True
                    continue
                if matcher.matches(value):
                    return True
                if kind == "DNS" and spec.kind == "exact" and value.startswith("*.") and \
                        _dns_wildcard_match(value, spec.value):
                    return True
                if kind == "DNS" and spec.kind == "exact" and value.lower() == spec.value.lower():
                    return True  # DNS comparison is case-insensitive
        return False

    def check(self, peercert: Optional[dict], peer: str = "") -> None:
        """Raise :class:`ssl.SSLCertVerificationError` unless the peer is acceptable."""
        sans = peer_sans(peercert)
        if self.accepts(sans):
            return
        import ssl

        shown = ", ".join(f"{k}:{v}" for k, v in sans) or "none"
        where = f" of {peer}" if peer else ""
        error = ssl.SSLCertVerificationError(
            1, f"meshpatch: the certificate{where} has SANs [{shown}], none matches the cluster's "
               f"match_subject_alt_names ({self.description})")
        error.verify_message = "SAN mismatch"  # type: ignore[attr-defined]
        raise error
