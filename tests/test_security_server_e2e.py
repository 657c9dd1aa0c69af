"""End to end, server side: an unmodified gRPC server app (``grpc.server`` or
``grpc.aio.server`` + ``add_insecure_port``) under ``meshpatch-run`` with the
workload certificate of ``spiffe://cluster.local/ns/default/sa/echo``; the local
control plane says STRICT (PeerAuthentication) and, by AuthorizationPolicy,
denies ``/meshtest.Echo/Secret`` to everyone and allows only the ``client``
service account.  Callers: meshpatch clients with the ``client`` and
``intruder`` identities, a plaintext client, and grpcio's own xDS client
(``grpc.xds_channel_credentials``) fed by the same control plane.
"""

from __future__ import annotations

import json
import socket
import ssl
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import grpc
import pytest

from meshpatch.security.providers import pem_file
from tests.support.controlplane import bootstrap_config, control_plane, node_id_for
from tests.support.longapp import LongApp
from tests.support.pki import MeshCA, spiffe_id, with_certificate_providers
from tests.support.servers import free_port, run_app

pytestmark = pytest.mark.e2e

ECHO = "echo.default.svc.cluster.local"
SERVER_IP = "127.0.0.5"
CLIENT_ID = spiffe_id("default", "client")
UNARY = "/meshtest.Echo/Unary"
SECRET = "/meshtest.Echo/Secret"


def mesh_yaml(port: int, mode: str = "STRICT") -> str:
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: echo, namespace: default}}
        spec:
          hosts: [{ECHO}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 7070, name: grpc, protocol: GRPC, targetPort: {port}}}]
          endpoints:
          - {{address: {SERVER_IP}, labels: {{app: echo}}, serviceAccount: echo}}
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: echo, namespace: default}}
        spec:
          host: {ECHO}
          trafficPolicy: {{tls: {{mode: {"ISTIO_MUTUAL" if mode == "STRICT" else "DISABLE"}}}}}
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {{name: default, namespace: default}}
        spec: {{mtls: {{mode: {mode}}}}}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: deny-secret, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: echo}}}}
          action: DENY
          rules:
          - to: [{{operation: {{paths: [{SECRET}]}}}}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: only-client, namespace: default}}
        spec:
          selector: {{matchLabels: {{app: echo}}}}
          rules:
          - from: [{{source: {{principals: [cluster.local/ns/default/sa/client]}}}}]
          - from: [{{source: {{notPrincipals: ['*']}}}}]  # plaintext callers (DISABLE)
        """)


SERVER_APP = """
import json, os, sys, threading
from concurrent import futures
import grpc

def describe(request, context):
    auth = context.auth_context()
    return json.dumps({"peer": [v.decode() for v in auth.get("peer_uri", [])],
                       "tls": [v.decode() for v in auth.get("transport_security_type", [])]}).encode()

handler = grpc.method_handlers_generic_handler("meshtest.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(describe),
    "Secret": grpc.unary_unary_rpc_method_handler(describe)})
server = grpc.server(futures.ThreadPoolExecutor(8))
server.add_generic_rpc_handlers((handler,))
bound = server.add_insecure_port(os.environ["SERVER_ADDRESS"])
server.start()
waiter = threading.Thread(target=server.wait_for_termination, daemon=True)  # what a main thread would do
waiter.start()
print("READY", bound, flush=True)
for line in sys.stdin:
    if line.strip() == "status":
        from meshpatch.security import rbac, server as mesh_server
        print("STATUS " + json.dumps({"rbac": rbac.COUNTERS.snapshot(), "servers": mesh_server.status(),
                                      "waiting": waiter.is_alive()}), flush=True)
server.stop(None)
"""

AIO_SERVER_APP = """
import asyncio, json, os, sys, threading
import grpc, grpc.aio

async def describe(request, context):
    auth = context.auth_context()
    return json.dumps({"peer": [v.decode() for v in auth.get("peer_uri", [])],
                       "tls": [v.decode() for v in auth.get("transport_security_type", [])]}).encode()

async def main(started):
    handler = grpc.method_handlers_generic_handler("meshtest.Echo", {
        "Unary": grpc.unary_unary_rpc_method_handler(describe),
        "Secret": grpc.unary_unary_rpc_method_handler(describe)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(os.environ["SERVER_ADDRESS"])
    await server.start()
    print("READY", bound, flush=True)
    await server.wait_for_termination()

threading.Thread(target=lambda: asyncio.run(main(None)), daemon=True).start()
for line in sys.stdin:
    if line.strip() == "status":
        import meshpatch.security
        status = meshpatch.security.status()
        print("STATUS " + json.dumps({"rbac": status["rbac"], "servers": status["servers"],
                                      "providers": status["certificate_providers"]}), flush=True)
"""

CLIENT_APP = f"""
import json
import grpc
ch = grpc.insecure_channel("{ECHO}:7070")
out = {{}}
for name, method in (("unary", "{UNARY}"), ("secret", "{SECRET}")):
    try:
        out[name] = json.loads(ch.unary_unary(method)(b"x", timeout=10))
    except grpc.RpcError as exc:
        out[name] = {{"code": exc.code().name, "details": exc.details()}}
print("RESULT " + json.dumps(out))
"""

NATIVE_XDS_CLIENT = f"""
import json
import grpc, grpc.experimental
credentials = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
with grpc.secure_channel("xds:///{ECHO}:7070", credentials) as ch:
    try:
        out = json.loads(ch.unary_unary("{UNARY}")(b"x", timeout=20, wait_for_ready=True))
    except grpc.RpcError as exc:
        out = {{"code": exc.code().name, "details": exc.details()}}
print("RESULT " + json.dumps(out))
"""


class Mesh:
    def __init__(self, tmp: Path, cp: Any, port: int) -> None:
        self.tmp = tmp
        self.cp = cp
        self.port = port
        self.ca = MeshCA()
        self.echo_certs = self.ca.workload_dir(tmp / "echo", "default", "echo")
        self.bootstraps: Dict[str, Path] = {}
        self._write("server", self.echo_certs, node_id_for("default", "echo-0", SERVER_IP))
        for name in ("client", "intruder"):
            certs = self.ca.workload_dir(tmp / name, "default", name)
            self._write(name, certs, node_id_for("default", name))

    def _write(self, name: str, certs: Any, node_id: str) -> None:
        path = self.tmp / f"{name}-bootstrap.json"
        path.write_text(json.dumps(with_certificate_providers(bootstrap_config(self.cp.address, node_id=node_id), certs)))
        self.bootstraps[name] = path

    def env(self, who: str, **extra: str) -> Dict[str, str]:
        env = {"GRPC_XDS_BOOTSTRAP": str(self.bootstraps[who]), "MESHPATCH_RESOLVE_TIMEOUT": "10"}
        env.update(extra)
        return env

    def server(self, code: str = SERVER_APP) -> LongApp:
        app = LongApp(textwrap.dedent(code), self.env("server", SERVER_ADDRESS=f"{SERVER_IP}:{self.port}",
                                                      MESHPATCH_SERVER_DRAIN_GRACE="0.2"))
        try:
            app.wait_for("READY")
        except BaseException:
            app.stop()
            raise
        return app

    def call(self, who: str, code: str = CLIENT_APP, patched: bool = True) -> Any:
        run = run_app(textwrap.dedent(code), self.env(who), timeout=120, patched=patched)
        if run.returncode != 0 or run.result is None:
            pytest.fail(f"client exited {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}", pytrace=False)
        return run.result


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    port = free_port(SERVER_IP)
    with control_plane(mesh_yaml(port)) as cp:
        yield Mesh(tmp_path_factory.mktemp("server-e2e"), cp, port)


def plaintext_call(port: int) -> str:
    with grpc.insecure_channel(f"{SERVER_IP}:{port}") as ch:
        try:
            ch.unary_unary(UNARY)(b"x", timeout=5)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name


def server_certificate_serial(mesh: Mesh, certs_dir: Path) -> str:
    """A fresh TLS handshake with the server (as a mesh client) → its certificate serial."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=mesh.ca.root_pem.decode())
    with pem_file((certs_dir / "cert-chain.pem").read_bytes(), (certs_dir / "key.pem").read_bytes()) as path:
        context.load_cert_chain(path)
    context.set_alpn_protocols(["h2"])
    with socket.create_connection((SERVER_IP, mesh.port), timeout=5) as raw, context.wrap_socket(raw) as tls:
        return tls.getpeercert()["serialNumber"]


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_strict_server_mtls_rbac_and_counting(mesh: Mesh, kind: str) -> None:
    with mesh.server(SERVER_APP if kind == "sync" else AIO_SERVER_APP) as server:
        allowed = mesh.call("client")
        intruder = mesh.call("intruder")
        plain = plaintext_call(mesh.port)
        server.send("status")
        status = server.json("STATUS")
    # mTLS with the client's workload identity
    assert allowed["unary"] == {"peer": [CLIENT_ID], "tls": ["ssl"]}
    # RBAC: DENY on the path, ALLOW only for the client service account
    assert allowed["secret"] == {"code": "PERMISSION_DENIED", "details": "Unauthorized RPC rejected"}
    assert intruder["unary"]["code"] == "PERMISSION_DENIED"
    # STRICT: a plaintext client cannot even connect
    assert plain == "UNAVAILABLE"
    counters = status["rbac"]
    assert counters["denied_total"] == 3 and sum(counters["allowed"].values()) == 1, counters
    assert {d[1] for d in counters["last_denied"]} == {UNARY, SECRET}
    port = status["servers"][0]["ports"][0]
    assert port["state"] == "mesh" and port["mtls"] and port["bound_mtls"], port
    if kind == "aio":  # meshpatch.security.status(): the workload certificate as loaded
        assert status["providers"]["default"]["generation"] >= 1 and not status["providers"]["default"]["last_error"]


def test_grpcio_native_xds_client_talks_to_the_managed_server(mesh: Mesh) -> None:
    """grpc-core's own xds credentials accept the control plane's CDS TLS shape
    and the server meshpatch secured; the SAN it checks is the server's SPIFFE ID."""
    with mesh.server():
        result = mesh.call("client", NATIVE_XDS_CLIENT, patched=False)
    assert result == {"peer": [CLIENT_ID], "tls": ["ssl"]}


ROTATION_CLIENT = f"""
import json, sys, threading, time
import grpc
ch = grpc.insecure_channel("{ECHO}:7070")
ok, errors = 0, []
stop = threading.Event()
def loop():
    global ok
    while not stop.is_set():
        try:
            ch.unary_unary("{UNARY}")(b"x", timeout=10)
            ok += 1
        except grpc.RpcError as exc:
            errors.append(exc.code().name + " " + exc.details())
        time.sleep(0.01)
t = threading.Thread(target=loop)
t.start()
time.sleep(0.5)
print("READY", flush=True)
sys.stdin.readline()
stop.set()
t.join()
print("RESULT " + json.dumps({{"ok": ok, "errors": errors[:5], "failed": len(errors)}}), flush=True)
"""


def test_server_certificate_rotation_under_load(mesh: Mesh) -> None:
    with mesh.server():
        before = server_certificate_serial(mesh, mesh.tmp / "client")
        with LongApp(ROTATION_CLIENT, mesh.env("client")) as client:
            client.wait_for("READY")
            mesh.echo_certs.rotate()
            deadline = time.monotonic() + 10
            after = before
            while after == before and time.monotonic() < deadline:
                time.sleep(0.2)
                after = server_certificate_serial(mesh, mesh.tmp / "client")
            time.sleep(0.5)
            client.send("done")
            result = client.json("RESULT")
    assert after != before  # new handshakes get the rotated server certificate, no restart
    assert result["failed"] == 0 and result["ok"] > 20, result


DRAIN_WAIT = 0.5  # the test servers drain replaced listeners for 0.2 s (MESHPATCH_SERVER_DRAIN_GRACE)


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def test_mode_switches_apply_to_new_connections_without_restart(mesh: Mesh) -> None:
    """STRICT → DISABLE → STRICT on a running sync server: each change applies to
    new connections within moments; the app's server object and its
    wait_for_termination() carry on."""
    with mesh.server() as server:
        assert plaintext_call(mesh.port) == "UNAVAILABLE"
        try:
            mesh.cp.write(mesh_yaml(mesh.port, mode="DISABLE"))
            assert wait_until(lambda: plaintext_call(mesh.port) == "OK"), "plaintext never accepted after DISABLE"
            assert mesh.call("client")["unary"] == {"peer": [], "tls": ["insecure"]}  # the mesh client follows CDS
        finally:
            mesh.cp.write(mesh_yaml(mesh.port))
        assert wait_until(lambda: plaintext_call(mesh.port) == "UNAVAILABLE"), "plaintext still accepted after STRICT"
        assert mesh.call("client")["unary"] == {"peer": [CLIENT_ID], "tls": ["ssl"]}
        time.sleep(DRAIN_WAIT)  # the replaced servers have terminated by now
        server.send("status")
        status = server.json("STATUS")
    assert status["servers"][0]["live_switches"] == 2 and not status["servers"][0]["ports"][0]["restart_needed"], status
    assert status["waiting"]  # the app's wait_for_termination() did not return when a replaced server ended




def test_aio_server_reports_a_mode_change_for_restart(mesh: Mesh) -> None:
    with mesh.server(AIO_SERVER_APP) as server:
        try:
            mesh.cp.write(mesh_yaml(mesh.port, mode="DISABLE"))
            time.sleep(0.3)
            server.send("status")
            port = server.json("STATUS")["servers"][0]["ports"][0]
        finally:
            mesh.cp.write(mesh_yaml(mesh.port))
    assert port["restart_needed"] and port["bound_mtls"] and not port["mtls"], port
