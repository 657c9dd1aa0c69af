"""Full-link canary: one tag at the entry steers a chain of three services.

Every service is an unmodified app under ``meshpatch-run`` (its own process,
its own loopback address, like pods), routed by the local control plane:

    client ──HTTP──▶ front (Flask)        baseline 127.0.0.2, gray 127.0.0.3
                     front ──gRPC──▶ middle (grpc.server)  baseline 127.0.0.4 only
                     middle ──HTTP, from a thread pool──▶ back (plain WSGI, wsgiref)
                                                         baseline 127.0.0.5, gray 127.0.0.6

Endpoints declare their lane with a ``lane: gray`` label on the ServiceEntry
endpoint.  A request tagged ``x-mesh-lane: gray`` must reach gray front, the
baseline middle (it has no gray version) and gray back; an untagged request
only baseline instances.  The back also reports the lane it sees through the
OTel Baggage API.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import subprocess
import tempfile
import textwrap
import time
from typing import Any, Dict, Iterator, List

import pytest

from tests.support.controlplane import ControlPlane
from tests.support.servers import app_env, run_app, venv_bin

pytestmark = pytest.mark.e2e

FRONT = "front.default.svc.cluster.local"
MIDDLE = "middle.default.svc.cluster.local"
BACK = "back.default.svc.cluster.local"

FRONT_APP = textwrap.dedent("""
    import json, os, grpc
    from flask import Flask
    from werkzeug.serving import make_server
    middle = grpc.insecure_channel(os.environ["MIDDLE"]).unary_unary("/chain.Middle/Call")
    app = Flask("front")
    @app.route("/")
    def index():
        reply = json.loads(middle(b"", timeout=10))
        return {"front": os.environ["VERSION"], **reply}
    make_server(os.environ["BIND"], int(os.environ["PORT"]), app, threaded=True).serve_forever()
""")

MIDDLE_APP = textwrap.dedent("""
    import json, os, requests
    from concurrent import futures
    import grpc
    BACK = os.environ["BACK"]
    def call(request, context):
        with futures.ThreadPoolExecutor(2) as pool:  # the handler calls on from a pool thread
            reply = pool.submit(lambda: requests.get(BACK, timeout=10).json()).result()
        return json.dumps({"middle": os.environ["VERSION"], **reply}).encode()
    server = grpc.server(futures.ThreadPoolExecutor(8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "chain.Middle", {"Call": grpc.unary_unary_rpc_method_handler(call)}),))
    server.add_insecure_port(os.environ["BIND"] + ":" + os.environ["PORT"])
    server.start()
    server.wait_for_termination()
""")

BACK_APP = textwrap.dedent("""
    import json, os
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
    from opentelemetry import baggage
    def app(environ, start_response):
        body = json.dumps({"back": os.environ["VERSION"], "back_lane_header": environ.get("HTTP_X_MESH_LANE"),
                           "back_baggage": baggage.get_baggage("mesh.lane")}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
    class Quiet(WSGIRequestHandler):
        def log_message(self, *args): pass
    make_server(os.environ["BIND"], int(os.environ["PORT"]), app, server_class=Server,
                handler_class=Quiet).serve_forever()
""")


def _port_free_on(port: int, hosts: List[str]) -> bool:
    for host in hosts:
        with socket.socket() as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def _free_port(hosts: List[str]) -> int:
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind((hosts[0], 0))
            port = sock.getsockname()[1]
        if _port_free_on(port, hosts):
            return port
    raise RuntimeError("no common free port")


def _mesh_yaml(ports: Dict[str, int]) -> str:
    def entry(name: str, host: str, protocol: str, endpoints: List[str]) -> str:
        eps = "\n".join(f"  - {e}" for e in endpoints)
        return textwrap.dedent(f"""\
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {{name: {name}, namespace: default}}
            spec:
              hosts: [{host}]
              location: MESH_INTERNAL
              resolution: STATIC
              ports: [{{number: {ports[name]}, name: p, protocol: {protocol}}}]
              endpoints:
            """) + eps + "\n"

    return "---\n".join([
        entry("front", FRONT, "HTTP", ["{address: 127.0.0.2, labels: {app: front}}",
                                        "{address: 127.0.0.3, labels: {app: front, lane: gray}}"]),
        entry("middle", MIDDLE, "GRPC", ["{address: 127.0.0.4, labels: {app: middle}}"]),
        entry("back", BACK, "HTTP", ["{address: 127.0.0.5, labels: {app: back}}",
                                      "{address: 127.0.0.6, labels: {app: back, lane: gray}}"]),
    ])


def _wait(host: str, port: int, proc: subprocess.Popen, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{host}:{port} exited: {proc.stderr.read()}")  # type: ignore[union-attr]
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"{host}:{port} never listened")


@pytest.fixture(scope="module")
def chain() -> Iterator[Dict[str, Any]]:
    ports = {"front": _free_port(["127.0.0.2", "127.0.0.3"]), "middle": _free_port(["127.0.0.4"]),
             "back": _free_port(["127.0.0.5", "127.0.0.6"])}
    pods = [("front", "base", "127.0.0.2"), ("front", "gray", "127.0.0.3"), ("middle", "base", "127.0.0.4"),
            ("back", "base", "127.0.0.5"), ("back", "gray", "127.0.0.6")]
    code = {"front": FRONT_APP, "middle": MIDDLE_APP, "back": BACK_APP}
    procs: List[subprocess.Popen] = []
    with ControlPlane(_mesh_yaml(ports)) as cp, tempfile.TemporaryDirectory() as scratch:
        for service in code:
            with open(os.path.join(scratch, f"{service}.py"), "w") as handle:
                handle.write(code[service])
        try:
            for service, version, address in pods:
                env = app_env({
                    "MESHPATCH_XDS_SERVER": cp.address, "MESHPATCH_RESOLVE_TIMEOUT": "5",
                    "VERSION": version, "BIND": address, "PORT": str(ports[service]),
                    "MIDDLE": f"{MIDDLE}:{ports['middle']}", "BACK": f"http://{BACK}:{ports['back']}/",
                    "POD_NAME": f"{service}-{version}",
                })
                procs.append(subprocess.Popen(
                    [os.path.join(venv_bin(), "meshpatch-run"), os.path.join(venv_bin(), "python"),
                     os.path.join(scratch, f"{service}.py")],
                    env=env, cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for (service, _, address), proc in zip(pods, procs):
                _wait(address, ports[service], proc)
            yield {"cp": cp, "ports": ports}
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)


CLIENT = textwrap.dedent("""
    import json, os, requests
    url = os.environ["FRONT_URL"]
    out = {"gray": [], "untagged": []}
    for _ in range(6):
        out["gray"].append(requests.get(url, headers={"x-mesh-lane": "gray"}, timeout=20).json())
        out["untagged"].append(requests.get(url, timeout=20).json())
    print("RESULT " + json.dumps(out))
""")


def test_a_gray_request_reaches_gray_where_it_exists_and_baseline_elsewhere(chain: Dict[str, Any]) -> None:
    run = run_app(CLIENT, {"MESHPATCH_XDS_SERVER": chain["cp"].address, "MESHPATCH_RESOLVE_TIMEOUT": "5",
                           "FRONT_URL": f"http://{FRONT}:{chain['ports']['front']}/"}, timeout=120)
    assert run.returncode == 0, run
    gray, untagged = run.result["gray"], run.result["untagged"]
    path = lambda r: (r["front"], r["middle"], r["back"])  # noqa: E731
    assert collections.Counter(map(path, gray)) == {("gray", "base", "gray"): 6}, gray
    assert collections.Counter(map(path, untagged)) == {("base", "base", "base"): 6}, untagged
    # the tag travelled as header and OTel Baggage through the gRPC hop and the middle's thread pool
    assert {(r["back_lane_header"], r["back_baggage"]) for r in gray} == {("gray", "gray")}
    assert {(r["back_lane_header"], r["back_baggage"]) for r in untagged} == {(None, None)}
