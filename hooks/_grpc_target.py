"""gRPC target strings: which ones can be mesh names, and sub-channel options.

Shared by the sync and ``grpc.aio`` hooks.  The rule is conservative: only a
plain ``host[:port]`` or ``dns:///host[:port]`` naming a DNS-style host is
routed.  IP literals, ``localhost``, ``unix:``, ``xds:`` and every other scheme
keep the channel the app asked for, untouched.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

#: gRPC's default port when a target has none (what grpc itself would dial for TLS).
DEFAULT_GRPC_PORT = 443


class MeshTarget:
    """A routable target: ``host``, ``port`` (None = default) and the
    ``authority`` gRPC would have sent (``host[:port]`` as the app wrote it)."""

    __slots__ = ("host", "port", "authority")

    def __init__(self, host: str, port: Optional[int], authority: str) -> None:
        self.host = host
        self.port = port
        self.authority = authority

    def __repr__(self) -> str:
        return f"MeshTarget({self.authority!r})"


def parse_target(target: Any) -> Optional[MeshTarget]:
    """The mesh view of a channel target, or None when it cannot be a mesh name."""
    if isinstance(target, bytes):
        target = target.decode("ascii", "replace")
    if not isinstance(target, str):
        return None
    text = target.strip()
    if text.startswith("dns:"):
        rest = text[4:]
        if rest.startswith("//"):
            slash = rest.find("/", 2)
            if slash != 2:  # dns://<dns-server>/name pins a resolver: leave it alone
                return None
            rest = rest[3:]
        text = rest
    if not text or text.startswith("[") or "/" in text or "@" in text:
        return None
    host, sep, port_text = text.partition(":")
    port: Optional[int] = None
    if sep:
        if not port_text.isdigit():
            return None  # some other scheme (unix:, xds:, ipv4:, vsock:, passthrough:, ...)
        port = int(port_text)
        if not 0 < port < 65536:
            return None
    if not _is_dns_name(host):
        return None
    return MeshTarget(host, port, text)


def _is_dns_name(host: str) -> bool:
    lowered = host.lower()
    if not lowered or lowered == "localhost" or lowered.endswith(".localhost"):
        return False
    if lowered.replace(".", "").isdigit():  # IPv4 literal (or a bare number)
        return False
    return all(ch.isalnum() or ch in "-._" for ch in lowered)


def endpoint_target(address: str, port: int) -> str:
    if ":" in address:
        return f"ipv6:[{address}]:{port}"
    return f"{address}:{port}"


def subchannel_options(options: Optional[Sequence[Tuple[str, Any]]], authority: str, tls_host: Optional[str]) -> List[Tuple[str, Any]]:
    """The app's options plus the logical name for ``:authority`` (and TLS
    server-name checks on secure channels) unless the app set its own."""
    merged = list(options or ())
    names = {item[0] for item in merged if isinstance(item, (tuple, list)) and item}
    if "grpc.default_authority" not in names:
        merged.append(("grpc.default_authority", authority))
    if tls_host is not None and "grpc.ssl_target_name_override" not in names:
        merged.append(("grpc.ssl_target_name_override", tls_host))
    return merged


def metadata_headers(metadata: Any) -> Any:
    """Call metadata as the header lookup the router expects (lower-case keys).

    With duplicate keys the first value wins, matching how a proxy's header
    matcher sees a single value.
    """
    if not metadata:
        return _EMPTY
    headers = {}
    for item in metadata:
        key = item[0].lower()
        if key not in headers:
            headers[key] = item[1]
    return headers


class _Empty(dict):  # a dict the router may read; never written
    __slots__ = ()


_EMPTY = _Empty()
