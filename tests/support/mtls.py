"""mTLS "pods": HTTP and gRPC servers that present a SPIFFE workload
certificate, require a client certificate from the mesh CA and report the
client's identity in every reply (``peer`` = the client's URI SANs).

    with mtls_http_server("v1", "127.0.0.2", ca.issue("default", "reviews")) as s:
        ...  # reply JSON has "peer": ["spiffe://cluster.local/ns/default/sa/client"]
    with mtls_grpc_server("v1", "127.0.0.2", workload) as g: ...

Built on :mod:`tests.support.servers` (same reply shape, counters and knobs).
"""

from __future__ import annotations

import contextlib
import json
import ssl
import threading
from concurrent import futures
from typing import Any, Iterator, List, Optional

from meshpatch.security.providers import pem_file
from tests.support import servers
from tests.support.pki import Workload

_local = threading.local()


def server_ssl_context(workload: Workload, require_client: bool = True) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pem_file(workload.chain_pem, workload.key_pem) as path:
        context.load_cert_chain(path)
    context.load_verify_locations(cadata=workload.root_pem.decode())
    context.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_OPTIONAL
    return context


def cert_serial(pem: bytes) -> Optional[str]:
    """A PEM certificate's serial as Python's getpeercert() prints it (hex, upper case)."""
    if not pem:
        return None
    from cryptography import x509

    return format(x509.load_pem_x509_certificate(pem).serial_number, "X")


def _uri_sans(peercert: Optional[dict]) -> List[str]:
    return [value for kind, value in (peercert or {}).get("subjectAltName", ()) if kind == "URI"]


class _MtlsHandler(servers._Handler):
    def setup(self) -> None:
        super().setup()
        peer, serial = None, None
        if isinstance(self.connection, ssl.SSLSocket):
            cert = self.connection.getpeercert()
            peer = _uri_sans(cert)
            serial = (cert or {}).get("serialNumber")
        _local.peer = peer
        _local.serial = serial


class MtlsHttpServer(servers.HttpServer):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.handshake_failures = 0

    def _record(self, info: dict) -> None:
        info["peer"] = getattr(_local, "peer", None)
        info["peer_serial"] = getattr(_local, "serial", None)  # which client certificate (rotation)
        super()._record(info)


class _MtlsServer(servers._Server):
    def get_request(self) -> Any:
        try:
            return super().get_request()
        except (ssl.SSLError, OSError):
            self.state.handshake_failures += 1  # type: ignore[attr-defined]
            raise


@contextlib.contextmanager
def mtls_http_server(name: str, host: str, workload: Workload, port: int = 0,
                     require_client: bool = True) -> Iterator[MtlsHttpServer]:
    """HTTPS/1.1 with keep-alive, presenting ``workload``; rejects clients
    without a certificate from the same CA (TLS handshake failure)."""
    server = _MtlsServer((host, port), _MtlsHandler)
    state = MtlsHttpServer(name, host, server.server_address[1], "https")
    server.state = state  # type: ignore[attr-defined]
    server.sni_by_socket = {}  # type: ignore[attr-defined]
    server.socket = server_ssl_context(workload, require_client).wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name=f"mtls-http-{name}")
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@contextlib.contextmanager
def mtls_grpc_server(name: str, host: str, workload: Workload, port: int = 0) -> Iterator[servers.GrpcServer]:
    """A gRPC server with :data:`servers.UNARY` etc. over mTLS (client
    certificate required); replies add ``peer`` = the client's SPIFFE ID."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"mtls-grpc-{name}"))
    credentials = grpc.ssl_server_credentials([(workload.key_pem, workload.chain_pem)],
                                              root_certificates=workload.root_pem, require_client_auth=True)
    bound = server.add_secure_port(f"{host}:{port}", credentials)
    if not bound:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    state = servers.GrpcServer(name, host, bound)

    def unary(request: bytes, context: Any) -> bytes:
        info = json.loads(state._describe(context, servers.UNARY, request))
        auth = context.auth_context()
        info["peer"] = [v.decode() for v in auth.get("peer_uri", [])]
        info["peer_serial"] = cert_serial(auth.get("x509_pem_cert", [b""])[0])
        return json.dumps(info).encode()

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        servers.SERVICE, {"Unary": grpc.unary_unary_rpc_method_handler(unary)}),))
    server.start()
    try:
        yield state
    finally:
        server.stop(grace=None).wait(5)
