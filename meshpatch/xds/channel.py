"""The gRPC channel to an xDS server: plaintext, TLS, and TLS + a bearer token.

Where no istio-agent is injected, a proxyless client talks to istiod itself on
port 15012: TLS verified against the mesh root certificate, and the pod's
service-account token (audience ``istio-ca``) sent as ``authorization: Bearer
<token>`` on the stream, which is how istiod authenticates a workload that has
no client certificate yet.  The token file is re-read whenever it changes
(Kubernetes rotates projected tokens), so a long-lived process never presents
an expired token on a reconnect.
"""

from __future__ import annotations

import os
import threading
from typing import Any, List, Optional, Tuple

from meshpatch.bootstrap import XdsServer

# (ca_certificate_file, private_key_file, certificate_file) for TLS channel creds
_TLS_KEYS = ("ca_certificate_file", "private_key_file", "certificate_file")


class TokenFile:
    """Reads a JWT from a file, again whenever the file's mtime or size changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: Optional[Tuple[float, int]] = None
        self._token = ""

    def token(self) -> str:
        st = os.stat(self.path)
        stamp = (st.st_mtime, st.st_size)
        with self._lock:
            if stamp != self._stamp:
                with open(self.path, "r", encoding="utf-8") as fh:
                    self._token = fh.read().strip()
                self._stamp = stamp
            return self._token


class _BearerPlugin:
    """grpc.AuthMetadataPlugin: adds ``authorization: Bearer <token>`` to the stream."""

    def __init__(self, token_file: TokenFile) -> None:
        self._file = token_file

    def __call__(self, context: Any, callback: Any) -> None:
        try:
            token = self._file.token()
        except OSError as exc:
            callback((), exc)  # the stream fails with UNAVAILABLE and is retried with backoff
            return
        callback((("authorization", "Bearer " + token),), None)


def _read(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def channel_options(server: XdsServer) -> List[Tuple[str, Any]]:
    options: List[Tuple[str, Any]] = [("grpc.keepalive_time_ms", 30_000), ("grpc.enable_retries", 0)]
    if server.server_name:
        options.append(("grpc.ssl_target_name_override", server.server_name))
        options.append(("grpc.default_authority", server.server_name))
    return options


def make_channel(grpc: Any, server: XdsServer) -> Any:
    options = channel_options(server)
    if server.creds_type != "tls":
        return grpc.insecure_channel(server.target, options=options)
    cfg = server.creds_config
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(cfg.get("ca_certificate_file")),
        private_key=_read(cfg.get("private_key_file")),
        certificate_chain=_read(cfg.get("certificate_file")),
    )
    if server.token_file:
        call_creds = grpc.metadata_call_credentials(_BearerPlugin(TokenFile(server.token_file)), name="meshpatch-token")
        creds = grpc.composite_channel_credentials(creds, call_creds)
    return grpc.secure_channel(server.target, creds, options=options)
