"""Real HTTP(S) and gRPC servers on loopback that say who answered.

Hook and end-to-end tests need "pods": servers bound to 127.0.0.2, 127.0.0.3 …
whose replies name the server, the address it is bound to and what the client
sent (Host / :authority, path, TLS server name), so a test can check *where*
each call went and *what name* it carried.  Everything is a context manager
with a free port, daemon threads and socket timeouts, so a failing test cannot
leave a server running or hang the suite.

    with http_server("v1", "127.0.0.2") as v1:
        requests.get(v1.url + "/x").json()
        # {"server": "v1", "bind": "127.0.0.2:PORT", "host": "127.0.0.2:PORT",
        #  "path": "/x", "method": "GET", "sni": None, "connection": 1}

    with tls_identity("reviews.example") as ident, http_server("v1", "127.0.0.2", tls=ident) as v1:
        ...  # cert names only reviews.example; client verifies with ident.ca_path

    with grpc_server("v1", "127.0.0.2") as g:
        channel.unary_unary(UNARY)(b"hi")  # -> JSON bytes with server, authority, method, metadata
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import socket
import ssl
import tempfile
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Sequence

#: gRPC methods served by :func:`grpc_server` (bytes in, JSON bytes out).
SERVICE = "meshtest.Echo"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI_STREAM = f"/{SERVICE}/BidiStream"

#: Idle keep-alive connections are closed after this long, so server shutdown never waits on them.
SOCKET_TIMEOUT = 10.0


# -- TLS ------------------------------------------------------------------------


class TlsIdentity:
    """A throw-away CA and a server certificate for ``hostnames`` only (no IP SANs),
    so a client can only pass verification if it checks the logical name."""

    def __init__(self, directory: str, hostnames: Sequence[str]) -> None:
        self.hostnames = list(hostnames)
        self.ca_path = os.path.join(directory, "ca.pem")
        self.cert_path = os.path.join(directory, "server.pem")
        self.key_path = os.path.join(directory, "server.key")
        self.ca_pem, self.cert_pem, self.key_pem = _make_certificates(self.hostnames)
        for path, data in ((self.ca_path, self.ca_pem), (self.cert_path, self.cert_pem), (self.key_path, self.key_pem)):
            with open(path, "wb") as handle:
                handle.write(data)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def _make_certificates(hostnames: Sequence[str]) -> "tuple[bytes, bytes, bytes]":
    try:
        import cryptography  # noqa: F401
    except ImportError:  # not a test dependency everywhere; the openssl CLI makes the same certificates
        return _make_certificates_openssl(hostnames)
    return _make_certificates_cryptography(hostnames)


def _make_certificates_openssl(hostnames: Sequence[str]) -> "tuple[bytes, bytes, bytes]":
    import subprocess

    with tempfile.TemporaryDirectory(prefix="meshpatch-openssl-") as work:
        def path(name: str) -> str:
            return os.path.join(work, name)

        def run(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        run("req", "-x509", *ec, "-keyout", path("ca.key"), "-out", path("ca.pem"), "-days", "1",
            "-subj", "/CN=meshpatch test CA",
            "-addext", "basicConstraints=critical,CA:TRUE,pathlen:0",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        run("req", *ec, "-keyout", path("server.key"), "-out", path("server.csr"), "-subj", f"/CN={hostnames[0]}")
        with open(path("ext.cnf"), "w") as handle:
            handle.write("subjectAltName=" + ",".join(f"DNS:{name}" for name in hostnames) + "\n")
            handle.write("basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n")
            handle.write("authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
        run("x509", "-req", "-in", path("server.csr"), "-CA", path("ca.pem"), "-CAkey", path("ca.key"),
            "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "1",
            "-extfile", path("ext.cnf"), "-out", path("server.pem"))
        run("pkcs8", "-topk8", "-nocrypt", "-in", path("server.key"), "-out", path("server.pk8"))

        def read(name: str) -> bytes:
            with open(path(name), "rb") as handle:
                return handle.read()

        return read("ca.pem"), read("server.pem"), read("server.pk8")


def _make_certificates_cryptography(hostnames: Sequence[str]) -> "tuple[bytes, bytes, bytes]":
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshpatch test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name) for name in hostnames]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca_cert.public_bytes(pem), cert.public_bytes(pem), key_pem


@contextlib.contextmanager
def tls_identity(*hostnames: str) -> Iterator[TlsIdentity]:
    with tempfile.TemporaryDirectory(prefix="meshpatch-tls-") as directory:
        yield TlsIdentity(directory, hostnames)


# -- HTTP -----------------------------------------------------------------------


class HttpServer:
    """A running server: ``name``, ``host``, ``port``, ``url``; counters of
    ``requests`` and ``connections`` (one handler per TCP connection, so with
    keep-alive many requests share one connection)."""

    def __init__(self, name: str, host: str, port: int, scheme: str) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.scheme = scheme
        self.url = f"{scheme}://{host}:{port}"
        self.requests = 0
        self.connections = 0
        self.seen: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        self._sockets: List[socket.socket] = []
        self._server: Any = None
        # Failure knobs for retry / outlier tests: answer every request with
        # this status, or drop the connection without answering, or stall.
        self.fail_status: Optional[int] = None
        self.reset = False
        self.delay = 0.0

    def _count_connection(self, sock: Any = None) -> int:
        with self._lock:
            self.connections += 1
            if sock is not None:
                self._sockets.append(sock)
            return self.connections

    def kill(self) -> None:
        """Die like a pod: stop listening (new connections are refused) and reset
        every open keep-alive connection."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.shutdown()
        server.server_close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _record(self, info: Dict[str, Any]) -> None:
        with self._lock:
            self.requests += 1
            self.seen.append(info)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    timeout = SOCKET_TIMEOUT
    # Headers and body leave in one segment: unbuffered small writes plus Nagle
    # and delayed ACKs would add ~40 ms to every keep-alive request.
    wbufsize = 64 * 1024
    disable_nagle_algorithm = True
    server_version = "meshtest"

    def setup(self) -> None:
        super().setup()
        self.connection_number = self.server.state._count_connection(self.connection)  # type: ignore[attr-defined]
        sni = None
        if isinstance(self.connection, ssl.SSLSocket):
            sni = getattr(self.connection, "_meshtest_sni", None)
            if sni is None:
                sni = self.server.sni_by_socket.pop(id(self.connection), None)  # type: ignore[attr-defined]
        self.sni = sni

    def _answer(self) -> None:
        state: HttpServer = self.server.state  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        info = {
            "server": state.name,
            "bind": f"{state.host}:{state.port}",
            "host": self.headers.get("Host"),
            "path": self.path,
            "method": self.command,
            "sni": self.sni,
            "connection": self.connection_number,
            "body": body.decode("utf-8", "replace"),
            "headers": {k.lower(): v for k, v in self.headers.items()},
        }
        state._record(info)
        if state.delay:
            import time

            time.sleep(state.delay)
        if state.reset:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        status = state.fail_status or 200
        if self.path.startswith("/status/"):  # /status/<code>
            status = int(self.path.split("/")[2].split("?")[0])
        if self.path.startswith("/slow/"):  # /slow/<milliseconds>
            import time

            time.sleep(int(self.path.split("/")[2].split("?")[0]) / 1000)
        if self.path.startswith("/redirect"):
            # /redirect?to=<absolute-or-relative location>
            location = self.path.partition("to=")[2] or "/"
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = json.dumps(info).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


@contextlib.contextmanager
def http_server(name: str, host: str = "127.0.0.2", port: int = 0, tls: Optional[TlsIdentity] = None) -> Iterator[HttpServer]:
    """Serve HTTP/1.1 (keep-alive) on ``host:port``; https when ``tls`` is given."""
    server = _Server((host, port), _Handler)
    state = HttpServer(name, host, server.server_address[1], "https" if tls else "http")
    server.state = state  # type: ignore[attr-defined]
    state._server = server
    server.sni_by_socket = {}  # type: ignore[attr-defined]
    if tls is not None:
        context = tls.server_context()

        def remember_sni(sock: ssl.SSLObject, server_name: Optional[str], _context: ssl.SSLContext) -> None:
            try:
                sock._meshtest_sni = server_name  # type: ignore[union-attr]
            except AttributeError:
                server.sni_by_socket[id(sock)] = server_name  # type: ignore[attr-defined]

        context.sni_callback = remember_sni
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                              name=f"http-{name}")
    thread.start()
    try:
        yield state
    finally:
        if state._server is not None:
            state._server = None
            server.shutdown()
            server.server_close()
        thread.join(timeout=5)


# -- gRPC -----------------------------------------------------------------------


class GrpcServer:
    def __init__(self, name: str, host: str, port: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.address = f"{host}:{port}"
        self.calls = 0
        self.seen: List[Dict[str, Any]] = []
        self._lock = threading.Lock()
        # Failure knobs: abort every call with this grpc.StatusCode, or stall.
        self.fail_code: Any = None
        self.delay = 0.0

    def _describe(self, context: Any, method: str, request: bytes) -> bytes:
        metadata = {key: value for key, value in context.invocation_metadata() if not key.endswith("-bin")}
        info = {
            "server": self.name,
            "bind": self.address,
            "authority": _authority(context),
            "method": method,
            "peer": context.peer(),
            "metadata": metadata,
            "request": request.decode("utf-8", "replace"),
        }
        with self._lock:
            self.calls += 1
            self.seen.append(info)
        if self.delay:
            import time

            time.sleep(self.delay)
        if self.fail_code is not None:
            context.abort(self.fail_code, f"{self.name} fails on purpose")
        return json.dumps(info).encode()


def _authority(context: Any) -> Optional[str]:
    # grpcio does not expose :authority publicly; the server call details carry it.
    try:
        host = context._rpc_event.call_details.host
        return host.decode() if isinstance(host, bytes) else host
    except AttributeError:
        return None


@contextlib.contextmanager
def grpc_server(name: str, host: str = "127.0.0.2", port: int = 0, tls: Optional[TlsIdentity] = None) -> Iterator[GrpcServer]:
    """A real gRPC server with bytes-in/JSON-bytes-out methods :data:`UNARY`,
    :data:`SERVER_STREAM` (3 replies), :data:`CLIENT_STREAM` and :data:`BIDI_STREAM`
    (one reply per request); replies name the server and the ``:authority`` it saw.
    With ``tls`` the server presents ``tls``'s certificate."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix=f"grpc-{name}"))
    if tls is not None:
        credentials = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    state = GrpcServer(name, host, bound)

    def unary(request: bytes, context: Any) -> bytes:
        return state._describe(context, UNARY, request)

    def server_stream(request: bytes, context: Any) -> Iterator[bytes]:
        for _ in range(3):
            yield state._describe(context, SERVER_STREAM, request)

    def client_stream(requests: Iterator[bytes], context: Any) -> bytes:
        joined = b",".join(requests)
        return state._describe(context, CLIENT_STREAM, joined)

    def bidi_stream(requests: Iterator[bytes], context: Any) -> Iterator[bytes]:
        for request in requests:
            yield state._describe(context, BIDI_STREAM, request)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "BidiStream": grpc.stream_stream_rpc_method_handler(bidi_stream),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    server.start()
    try:
        yield state
    finally:
        server.stop(grace=None).wait(5)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


# -- patched apps -----------------------------------------------------------------


class AppRun:
    """The outcome of :func:`run_app`: exit code, output, and the JSON the app
    printed on a line starting with ``RESULT `` (None if it printed none)."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.result: Any = None
        for line in stdout.splitlines():
            if line.startswith("RESULT "):
                self.result = json.loads(line[len("RESULT "):])

    def __repr__(self) -> str:
        return f"AppRun(rc={self.returncode}, stdout={self.stdout[-2000:]!r}, stderr={self.stderr[-4000:]!r})"


def venv_bin() -> str:
    """The bin dir of the interpreter running the tests (its meshpatch-run is the one under test)."""
    import sys

    return os.path.dirname(sys.executable)


def app_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The test process's environment without any meshpatch settings or
    PYTHONPATH, with the venv's bin dir first on PATH, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPATCH_") and k != "PYTHONPATH"}
    env["PATH"] = venv_bin() + os.pathsep + env.get("PATH", "")
    # Each app is its own "pod" unless a test says otherwise (``extra`` may set its
    # own MESHPATCH_RUNTIME_DIR to make several processes share one stream): with
    # the default runtime dir (/tmp/meshpatch-<uid>) apps of different tests that
    # use the same control-plane address would share one upstream stream, and a
    # straggler of one test could serve another test's config.
    env["MESHPATCH_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="meshpatch-pod-")
    env.update(extra or {})
    return env


def run_app(code: str, env: Optional[Dict[str, str]] = None, *, patched: bool = True, timeout: float = 60,
            python_args: Sequence[str] = (), cwd: Optional[str] = None) -> AppRun:
    """Run ``code`` as an unmodified app: ``meshpatch-run python -c CODE`` (or
    plain ``python -c CODE`` with ``patched=False``) in a scratch directory, so
    the source tree can never shadow the installed package.  ``env`` is added to
    :func:`app_env`.  The app reports by printing ``RESULT <json>``."""
    import subprocess

    python = os.path.join(venv_bin(), "python")
    command = [python, *python_args, "-c", code]
    if patched:
        command = [os.path.join(venv_bin(), "meshpatch-run"), *command]
    with tempfile.TemporaryDirectory(prefix="meshpatch-app-") as scratch:
        proc = subprocess.run(command, env=app_env(env), cwd=cwd or scratch, capture_output=True, text=True,
                              timeout=timeout)
    return AppRun(proc.returncode, proc.stdout, proc.stderr)
