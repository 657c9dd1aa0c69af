"""Decoded TLS settings from CDS (UpstreamTlsContext) and LDS (DownstreamTlsContext).

Plain frozen values: two decodes of the same xDS config compare equal, so an
unchanged push does not rebuild SSL contexts or sub-channels, and ``key`` (a
string, whose hash Python caches) indexes per-config caches on the request path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

#: SAN types of ``match_typed_subject_alt_names``; "" = any of them (``match_subject_alt_names``).
SAN_TYPES = ("", "DNS", "URI", "EMAIL", "IP")


@dataclass(frozen=True)
class ProviderRef:
    """A certificate provider plugin instance from the bootstrap and the
    certificate it names (ignored by ``file_watcher``, as in gRPC)."""

    instance: str
    certificate: str = ""


@dataclass(frozen=True)
class SanMatcher:
    """One ``match_subject_alt_names`` entry: an Envoy StringMatcher, optionally
    restricted to one SAN type."""

    kind: str  # exact / prefix / suffix / contains / regex
    value: str
    ignore_case: bool = False
    san_type: str = ""

    def describe(self) -> str:
        where = f"{self.san_type} " if self.san_type else ""
        return f"{where}{self.kind} {self.value!r}"


@dataclass(frozen=True)
class UpstreamTls:
    """mTLS origination for a cluster: the client certificate to present (None
    = plain TLS, no client certificate), the CA that must sign the peer and the
    SAN matchers the peer's leaf certificate must satisfy (empty = any)."""

    identity: Optional[ProviderRef]
    ca: ProviderRef
    sans: Tuple[SanMatcher, ...] = ()
    key: str = field(default="", compare=False)

    @staticmethod
    def make(identity: Optional[ProviderRef], ca: ProviderRef, sans: Tuple[SanMatcher, ...]) -> "UpstreamTls":
        ident = f"{identity.instance}/{identity.certificate}" if identity else "-"
        key = "|".join([ident, f"{ca.instance}/{ca.certificate}"] + [f"{m.san_type}:{m.kind}:{int(m.ignore_case)}:{m.value}" for m in sans])
        return UpstreamTls(identity, ca, sans, key)

    def describe_sans(self) -> str:
        return ", ".join(m.describe() for m in self.sans) or "any SAN"


@dataclass(frozen=True)
class DownstreamTls:
    """mTLS termination on a server port: the workload certificate, the CA
    client certificates must chain to, and whether a client certificate is required."""

    identity: ProviderRef
    ca: Optional[ProviderRef]
    require_client_certificate: bool
