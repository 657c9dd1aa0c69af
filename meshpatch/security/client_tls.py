"""Client mTLS material per (cluster TLS config, certificate generation).

The hooks ask :func:`client_tls` for the picked cluster's
:class:`~meshpatch.security.model.UpstreamTls` on every attempt; the answer is
a cached :class:`ClientTls` until a provider's generation changes, then a new
one (new SSL context, new grpc sub-channel key).  Connections made with an old
entry stay valid; new connections use the new certificate, so a rotation never
fails a request.

Peer authorization.  Workload certificates name a SPIFFE identity in a URI
SAN, never the pod IP that was dialled, so OpenSSL's hostname check is off and
the SAN check runs right after the handshake, before a byte of the request is
written: :class:`MeshSSLContext` makes ``wrap_socket`` / ``wrap_bio`` return
socket/object classes whose ``do_handshake`` calls the cluster's
:class:`~meshpatch.security.san.SanVerifier`.  That one hook covers urllib3
(requests), httpcore's sync stream and anyio's TLS stream (httpx async).  The
context is *sealed*: urllib3 sets ``verify_mode``/``check_hostname`` on every
connect and may load extra CA files; a sealed context keeps CERT_REQUIRED and
trusts only the mesh CA whatever a library tries.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any, Dict, Optional, Tuple

from meshpatch.security import providers
from meshpatch.security.model import UpstreamTls
from meshpatch.security.san import SanVerifier


def _verify_after_handshake(sock: Any) -> None:
    context = sock.context
    verifier = getattr(context, "_meshpatch_verifier", None)
    if verifier is None:
        return
    if context.verify_mode != ssl.CERT_REQUIRED:  # cannot happen with a sealed context; fail closed anyway
        raise ssl.SSLCertVerificationError(1, "meshpatch: mesh TLS context lost CERT_REQUIRED")
    peer = ""
    try:
        address = sock.getpeername() if hasattr(sock, "getpeername") else None
        if address:
            peer = f"{address[0]}:{address[1]}"
    except OSError:
        pass
    verifier.check(sock.getpeercert(), peer)


class MeshSSLSocket(ssl.SSLSocket):
    """Blocking sockets (urllib3, httpcore sync): SAN check ends the handshake."""

    def do_handshake(self, block: bool = False) -> None:  # type: ignore[override]
        super().do_handshake(block)
        _verify_after_handshake(self)


class MeshSSLObject(ssl.SSLObject):
    """Memory-BIO TLS (anyio / asyncio streams): same check once the handshake completes."""

    def do_handshake(self) -> None:  # type: ignore[override]
        super().do_handshake()  # raises SSLWantReadError until done
        _verify_after_handshake(self)


class MeshSSLContext(ssl.SSLContext):
    sslsocket_class = MeshSSLSocket
    sslobject_class = MeshSSLObject

    _meshpatch_sealed = False
    _meshpatch_verifier: Optional[SanVerifier] = None

    # Sealing: ignore attempts to weaken or widen the trust of a mesh context.
    @property  # type: ignore[override]
    def verify_mode(self) -> ssl.VerifyMode:
        return super().verify_mode

    @verify_mode.setter
    def verify_mode(self, value: Any) -> None:
        if self._meshpatch_sealed and value != ssl.CERT_REQUIRED:
            return
        super(MeshSSLContext, MeshSSLContext).verify_mode.__set__(self, value)  # type: ignore[attr-defined]

    @property  # type: ignore[override]
    def check_hostname(self) -> bool:
        return super().check_hostname

    @check_hostname.setter
    def check_hostname(self, value: bool) -> None:
        if self._meshpatch_sealed and value:
            return
        super(MeshSSLContext, MeshSSLContext).check_hostname.__set__(self, value)  # type: ignore[attr-defined]

    def load_verify_locations(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if not self._meshpatch_sealed:
            super().load_verify_locations(*args, **kwargs)

    def load_default_certs(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if not self._meshpatch_sealed:
            super().load_default_certs(*args, **kwargs)

    def set_default_verify_paths(self) -> None:  # type: ignore[override]
        if not self._meshpatch_sealed:
            super().set_default_verify_paths()

    def load_cert_chain(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        if not self._meshpatch_sealed:
            super().load_cert_chain(*args, **kwargs)


class ClientTls:
    """Everything a hook needs to originate mTLS for one (config, generation)."""

    __slots__ = ("tls", "identity", "ca", "verifier", "generation", "channel_key", "_ssl_context", "_lock")

    def __init__(self, tls: UpstreamTls, identity: Optional[providers.Material], ca: providers.Material) -> None:
        self.tls = tls
        self.identity = identity
        self.ca = ca
        self.verifier = SanVerifier(tls.sans)
        self.generation: Tuple[int, int] = (identity.generation if identity else 0, ca.generation)
        # Distinguishes connection pools / sub-channels across configs and rotations.
        self.channel_key = (tls.key, self.generation)
        self._ssl_context: Optional[MeshSSLContext] = None
        self._lock = threading.Lock()

    @property
    def ssl_context(self) -> MeshSSLContext:
        context = self._ssl_context
        if context is None:
            with self._lock:
                context = self._ssl_context
                if context is None:
                    context = self._ssl_context = self._build_context()
        return context

    def _build_context(self) -> MeshSSLContext:
        context = MeshSSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = False
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=self.ca.ca_pem.decode("ascii"))  # type: ignore[union-attr]
        if self.identity is not None:
            with providers.pem_file(self.identity.chain_pem, self.identity.key_pem) as path:
                context.load_cert_chain(path)
        context._meshpatch_verifier = self.verifier
        context._meshpatch_sealed = True
        return context

    def __repr__(self) -> str:
        return f"ClientTls({self.tls.describe_sans()}, generation {self.generation})"


_cache: Dict[str, ClientTls] = {}
_cache_lock = threading.Lock()


def client_tls(tls: UpstreamTls) -> ClientTls:
    """The current material for ``tls``; raises
    :class:`~meshpatch.security.providers.CertificateUnavailable` when a
    provider has nothing usable (the call then fails instead of going out in
    plaintext)."""
    identity = None
    if tls.identity is not None:
        provider = providers.get(tls.identity.instance)
        if provider is None:
            raise providers.CertificateUnavailable(providers.why_unknown(tls.identity.instance))
        identity = provider.material()
    ca_provider = providers.get(tls.ca.instance)
    if ca_provider is None:
        raise providers.CertificateUnavailable(providers.why_unknown(tls.ca.instance))
    ca = ca_provider.material()
    entry = _cache.get(tls.key)
    if entry is not None and entry.ca is ca and entry.identity is identity:
        return entry
    with _cache_lock:
        entry = _cache.get(tls.key)
        if entry is None or entry.ca is not ca or entry.identity is not identity:
            entry = ClientTls(tls, identity, ca)
            _cache[tls.key] = entry
    return entry


def _after_fork_in_child() -> None:
    global _cache_lock
    _cache_lock = threading.Lock()
    for entry in list(_cache.values()):
        entry._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
