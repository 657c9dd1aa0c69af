"""Canary lanes, piece by piece: lane-preferring pickers and their fallbacks,
header/baggage parsing and propagation, the lane following a request into
thread pools, threads and asyncio tasks, and the server hooks of each
framework capturing it (real servers, an unmodified app under meshpatch-run).
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List, Optional

import pytest

from meshpatch import lanes
from meshpatch.config import ConfigError, LaneSettings
from meshpatch.routing.lb import build_picker
from meshpatch.routing.model import Endpoint, EndpointsConfig, LocalityEndpoints
from tests.support.servers import app_env, http_server, venv_bin


@pytest.fixture(autouse=True)
def default_settings() -> Iterator[None]:
    lanes.configure(LaneSettings({}))
    yield
    lanes.configure(None)


def _ep(address: str, lane: Optional[str] = None, health: int = 1) -> Endpoint:
    metadata = {"meshpatch": {"labels": {"app": "x", **({"lane": lane} if lane else {})}}}
    return Endpoint(address, 80, health, 1, metadata, "r/z/")


def _config(*endpoints: Endpoint) -> EndpointsConfig:
    return EndpointsConfig("c", (LocalityEndpoints("r/z/", 1, 0, tuple(endpoints)),))


def _picks(picker: Any, lane: Optional[str], n: int = 40) -> collections.Counter:
    return collections.Counter(picker.pick_in_lane(lane).address for _ in range(n))


def test_lane_picker_prefers_the_lane_and_falls_back_to_the_baseline() -> None:
    picker = lanes.build(_config(_ep("10.0.0.1"), _ep("10.0.0.2"), _ep("10.0.0.3", "gray"),
                                 _ep("10.0.0.4", "blue", health=2)), build_picker)
    assert isinstance(picker, lanes.LanePicker) and picker.lanes() == ["gray"]  # blue has no healthy endpoint
    assert _picks(picker, "gray") == {"10.0.0.3": 40}
    assert set(_picks(picker, None)) == {"10.0.0.1", "10.0.0.2"}  # untagged traffic stays off the lanes
    assert set(_picks(picker, "blue")) == {"10.0.0.1", "10.0.0.2"}  # lane with no healthy endpoint: baseline
    assert set(_picks(picker, "red")) == {"10.0.0.1", "10.0.0.2"}  # unknown lane: baseline
    # a retry never goes back to a tried host while the lane has another one
    assert picker.pick_in_lane("gray", None, {("10.0.0.3", 80)}).address == "10.0.0.3"  # only one: stays in lane
    assert {ep.address for ep in picker.endpoints} == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}


def test_lane_picker_with_no_baseline_uses_every_endpoint_and_no_labels_means_plain_picker() -> None:
    only_lanes = lanes.build(_config(_ep("10.0.0.3", "gray"), _ep("10.0.0.4", "blue")), build_picker)
    assert set(_picks(only_lanes, None)) == {"10.0.0.3", "10.0.0.4"}
    assert _picks(only_lanes, "blue") == {"10.0.0.4": 40}
    plain = lanes.build(_config(_ep("10.0.0.1"), _ep("10.0.0.2")), build_picker)
    assert not isinstance(plain, lanes.LanePicker)
    lanes.configure(LaneSettings({"MESHPATCH_LANES": "0"}))
    assert not isinstance(lanes.build(_config(_ep("10.0.0.1"), _ep("10.0.0.3", "gray")), build_picker),
                          lanes.LanePicker)


def test_custom_label_key() -> None:
    lanes.configure(LaneSettings({"MESHPATCH_LANE_LABEL": "traffic.opensergo.io/label"}))
    ep = Endpoint("10.0.0.9", 80, 1, 1, {"meshpatch": {"labels": {"traffic.opensergo.io/label": "gray"}}}, "")
    picker = lanes.build(_config(_ep("10.0.0.1"), ep), build_picker)
    assert _picks(picker, "gray") == {"10.0.0.9": 40}


@pytest.mark.parametrize("env, variable", [
    ({"MESHPATCH_LANE_HEADER": "x mesh"}, "MESHPATCH_LANE_HEADER"),
    ({"MESHPATCH_LANE_BAGGAGE_KEY": "a=b"}, "MESHPATCH_LANE_BAGGAGE_KEY"),
    ({"MESHPATCH_LANE_LABEL": "a,b"}, "MESHPATCH_LANE_LABEL"),
    ({"MESHPATCH_LANES": "maybe"}, "MESHPATCH_LANES"),
])
def test_bad_lane_settings_are_named(env: Dict[str, str], variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        LaneSettings(env)
    assert info.value.variable == variable


def test_inbound_parsing_header_then_baggage_and_junk_is_ignored() -> None:
    def getter(headers: Dict[str, str]) -> Any:
        return headers.get

    assert lanes.inbound_lane(getter({"x-mesh-lane": "gray"})) == "gray"
    assert lanes.inbound_lane(getter({"baggage": "userid=7, mesh.lane=blue;prop=1"})) == "blue"
    assert lanes.inbound_lane(getter({"x-mesh-lane": "gray", "baggage": "mesh.lane=blue"})) == "gray"
    assert lanes.inbound_lane(getter({"x-mesh-lane": "bad value\r\nx: y"})) is None
    assert lanes.inbound_lane(getter({"x-mesh-lane": "x" * 65})) is None
    assert lanes.inbound_lane(getter({"baggage": "mesh.lane=%67ray"})) == "gray"  # percent-encoded
    assert lanes.inbound_lane(getter({})) is None


def test_outbound_http_adds_header_and_baggage_unless_the_app_set_a_lane() -> None:
    import requests

    token = lanes.enter("gray")
    try:
        headers = requests.structures.CaseInsensitiveDict({"Baggage": "userid=7"})
        lanes.outbound_http(headers)
        assert headers["X-Mesh-Lane"] == "gray" and headers["baggage"] == "userid=7,mesh.lane=gray"
        explicit = requests.structures.CaseInsensitiveDict({"x-mesh-lane": "blue"})
        lanes.outbound_http(explicit)
        assert dict(explicit) == {"x-mesh-lane": "blue"}
        metadata = lanes.outbound_grpc((("k", "v"), ("baggage", "a=1")))
        assert metadata == (("k", "v"), ("x-mesh-lane", "gray"), ("baggage", "a=1,mesh.lane=gray"))
        assert lanes.outbound_grpc((("x-mesh-lane", "blue"),)) == (("x-mesh-lane", "blue"),)
    finally:
        lanes.leave(token)
    untouched = requests.structures.CaseInsensitiveDict({"a": "b"})
    lanes.outbound_http(untouched)
    assert dict(untouched) == {"a": "b"}
    assert lanes.outbound_grpc(None) is None


def test_lane_follows_the_request_into_pools_threads_and_tasks() -> None:
    from opentelemetry import baggage

    seen: Dict[str, Any] = {}
    early_pool = ThreadPoolExecutor(2)  # created before any lane existed

    def record(name: str) -> None:
        seen[name] = lanes.current_lane()

    token = lanes.enter("gray")
    try:
        assert baggage.get_baggage("mesh.lane") == "gray"  # visible to the app through the OTel API
        early_pool.submit(record, "early-pool").result()
        with ThreadPoolExecutor(1) as pool:
            pool.submit(record, "pool").result()
            late_pool = pool
        thread = threading.Thread(target=record, args=("thread",))
        thread.start()
        thread.join()

        async def main() -> None:
            await asyncio.create_task(asyncio.sleep(0, record("task")))
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, record, "run_in_executor")
            await asyncio.to_thread(record, "to_thread")

        asyncio.run(main())
        # a pool thread started during the gray request must not keep gray for later untagged tasks
        gray_started = ThreadPoolExecutor(1)
        gray_started.submit(record, "gray-started").result()
    finally:
        lanes.leave(token)
    gray_started.submit(record, "after-on-gray-thread").result()
    early_pool.submit(record, "early-pool-after").result()
    assert lanes.current_lane() is None and baggage.get_baggage("mesh.lane") is None
    assert seen == {"early-pool": "gray", "pool": "gray", "thread": "gray", "task": "gray",
                    "run_in_executor": "gray", "to_thread": "gray", "gray-started": "gray",
                    "after-on-gray-thread": None, "early-pool-after": None}
    del late_pool
    early_pool.shutdown()
    gray_started.shutdown()


# -- server hooks, end to end --------------------------------------------------------------

SERVERS_APP = textwrap.dedent("""
    # An unmodified app serving the same handler through several frameworks and
    # servers; each handler calls an echo server (outbound) and reports the lane
    # it sees through the OTel Baggage API and what the echo server received.
    import asyncio, json, os, sys, threading
    from concurrent import futures
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIServer, WSGIRequestHandler, make_server
    import requests, httpx, grpc, grpc.aio
    from opentelemetry import baggage

    ECHO = os.environ["ECHO_URL"]
    PORTS = json.loads(os.environ["PORTS"])

    def outbound():
        seen = requests.get(ECHO + "/echo", timeout=5).json()["headers"]
        return {"lane": baggage.get_baggage("mesh.lane"), "sent_header": seen.get("x-mesh-lane"),
                "sent_baggage": seen.get("baggage")}

    class Quiet(WSGIRequestHandler):
        def log_message(self, *a): pass

    class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    def serve_wsgi(app, port):
        server = make_server("127.0.0.1", port, app, server_class=ThreadingWSGIServer, handler_class=Quiet)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    # plain WSGI under wsgiref
    def plain(environ, start_response):
        body = json.dumps(outbound()).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    serve_wsgi(plain, PORTS["wsgi"])

    # Flask under werkzeug's threaded server (the Flask.wsgi_app hook)
    import flask
    from werkzeug.serving import make_server as werkzeug_server
    fapp = flask.Flask("f")
    @fapp.route("/")
    def index():
        with futures.ThreadPoolExecutor(1) as pool:  # the handler fans out to a pool
            return pool.submit(outbound).result()
    wserver = werkzeug_server("127.0.0.1", PORTS["flask"], fapp, threaded=True)
    threading.Thread(target=wserver.serve_forever, daemon=True).start()

    # Django under wsgiref
    import django
    from django.conf import settings
    settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["*"], DEBUG=False, SECRET_KEY="x",
                       MIDDLEWARE=[], INSTALLED_APPS=[])
    django.setup()
    from django.http import JsonResponse
    from django.urls import path
    urlpatterns = [path("", lambda request: JsonResponse(outbound()))]
    from django.core.wsgi import get_wsgi_application
    serve_wsgi(get_wsgi_application(), PORTS["django"])

    # Starlette under uvicorn, the handler calling out with httpx.AsyncClient in a task
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    async def star(request):
        async with httpx.AsyncClient() as client:
            seen = (await asyncio.create_task(client.get(ECHO + "/echo", timeout=5))).json()["headers"]
        return JSONResponse({"lane": baggage.get_baggage("mesh.lane"), "sent_header": seen.get("x-mesh-lane"),
                             "sent_baggage": seen.get("baggage")})
    sapp = Starlette(routes=[Route("/", star)])
    # a plain ASGI app under uvicorn (the uvicorn hook), calling out from a thread
    async def plain_asgi(scope, receive, send):
        if scope["type"] != "http":
            return
        body = json.dumps(await asyncio.get_running_loop().run_in_executor(None, outbound)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})
    import uvicorn
    def serve_asgi(app, port):
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
        threading.Thread(target=server.run, daemon=True).start()
    serve_asgi(sapp, PORTS["starlette"])
    serve_asgi(plain_asgi, PORTS["asgi"])

    # grpc (sync) and grpc.aio servers
    def unary(request, context):
        return json.dumps(outbound()).encode()
    handler = grpc.method_handlers_generic_handler("t.S", {"U": grpc.unary_unary_rpc_method_handler(unary)})
    gserver = grpc.server(futures.ThreadPoolExecutor(4))
    gserver.add_generic_rpc_handlers((handler,))
    gserver.add_insecure_port(f"127.0.0.1:{PORTS['grpc']}")
    gserver.start()

    async def aunary(request, context):
        loop = asyncio.get_running_loop()
        return json.dumps(await loop.run_in_executor(None, outbound)).encode()
    def run_aio():
        async def main():
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
                "t.S", {"U": grpc.unary_unary_rpc_method_handler(aunary)}),))
            server.add_insecure_port(f"127.0.0.1:{PORTS['grpc_aio']}")
            await server.start()
            await server.wait_for_termination()
        asyncio.run(main())
    threading.Thread(target=run_aio, daemon=True).start()

    import meshpatch.activation as a
    print("READY " + json.dumps(a.hook_states()), flush=True)
    sys.stdin.read()  # until the test closes stdin
""")


def _free_ports(n: int) -> List[int]:
    socks = []
    for _ in range(n):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        socks.append(sock)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"app exited early: {proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"port {port} never opened")


@pytest.fixture(scope="module")
def servers_app() -> Iterator[Dict[str, Any]]:
    names = ["wsgi", "flask", "django", "starlette", "asgi", "grpc", "grpc_aio"]
    ports = dict(zip(names, _free_ports(len(names))))
    with http_server("echo", "127.0.0.2") as echo, tempfile.TemporaryDirectory() as scratch:
        script = os.path.join(scratch, "servers_app.py")
        with open(script, "w") as handle:
            handle.write(SERVERS_APP)
        env = app_env({"ECHO_URL": echo.url, "PORTS": json.dumps(ports)})
        proc = subprocess.Popen([os.path.join(venv_bin(), "meshpatch-run"), os.path.join(venv_bin(), "python"),
                                 script], env=env, cwd=scratch, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line.startswith("READY "), (line, proc.stderr.read() if proc.poll() is not None else "")
            for port in ports.values():
                _wait_port(port, proc)
            yield {"ports": ports, "states": json.loads(line[6:]), "proc": proc}
        finally:
            proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _ask(servers_app: Dict[str, Any], name: str, headers: Dict[str, str]) -> Dict[str, Any]:
    port = servers_app["ports"][name]
    if name.startswith("grpc"):
        import grpc

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = channel.unary_unary("/t.S/U")(b"x", metadata=tuple(headers.items()), timeout=10)
        return json.loads(reply)
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/", headers=headers)
        response = conn.getresponse()
        assert response.status == 200, response.read()
        return json.loads(response.read())
    finally:
        conn.close()


FRAMEWORKS = ["wsgi", "flask", "django", "starlette", "asgi", "grpc", "grpc_aio"]


def test_server_hooks_applied(servers_app: Dict[str, Any]) -> None:
    states = servers_app["states"]
    for name in ("wsgi", "asgi", "grpc_server"):
        assert states[name]["state"] == "applied", states
    for part in ("Flask.wsgi_app", "wsgiref", "Django WSGIHandler"):
        assert part in states["wsgi"]["detail"]
    for part in ("Starlette", "uvicorn"):
        assert part in states["asgi"]["detail"]
    assert "grpc.aio.server" in states["grpc_server"]["detail"]


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_inbound_lane_is_captured_and_sent_on(servers_app: Dict[str, Any], name: str) -> None:
    tagged = _ask(servers_app, name, {"x-mesh-lane": "gray"})
    assert tagged == {"lane": "gray", "sent_header": "gray", "sent_baggage": "mesh.lane=gray"}
    by_baggage = _ask(servers_app, name, {"baggage": "tenant=a,mesh.lane=blue"})
    assert by_baggage["lane"] == "blue" and by_baggage["sent_header"] == "blue"
    # the next untagged request on the same server threads carries no lane
    untagged = _ask(servers_app, name, {})
    assert untagged == {"lane": None, "sent_header": None, "sent_baggage": None}


GUNICORN_APP = textwrap.dedent("""
    import json, os, requests
    ECHO = os.environ["ECHO_URL"]
    def app(environ, start_response):
        seen = requests.get(ECHO + "/echo", timeout=5).json()["headers"]
        body = json.dumps({"pid": os.getpid(), "sent_header": seen.get("x-mesh-lane")}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
""")


def test_gunicorn_workers_capture_lanes_and_serve_their_own_admin_socket() -> None:
    pytest.importorskip("gunicorn")
    (port,) = _free_ports(1)
    with http_server("echo", "127.0.0.2") as echo, tempfile.TemporaryDirectory(prefix="mp-gu-") as scratch:
        with open(os.path.join(scratch, "gapp.py"), "w") as handle:
            handle.write(GUNICORN_APP)
        admin = f"unix://{scratch}/admin-{{pid}}.sock"
        env = app_env({"ECHO_URL": echo.url, "MESHPATCH_ADMIN": admin})
        proc = subprocess.Popen([os.path.join(venv_bin(), "meshpatch-run"), os.path.join(venv_bin(), "gunicorn"),
                                 "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", scratch, "gapp:app"],
                                env=env, cwd=scratch, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _wait_port(port, proc)
            import http.client

            def ask(headers: Dict[str, str]) -> Dict[str, Any]:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                try:
                    conn.request("GET", "/", headers=headers)
                    return json.loads(conn.getresponse().read())
                finally:
                    conn.close()

            tagged = [ask({"x-mesh-lane": "gray"}) for _ in range(6)]
            untagged = [ask({}) for _ in range(6)]
            assert {r["sent_header"] for r in tagged} == {"gray"}
            assert {r["sent_header"] for r in untagged} == {None}
            worker = tagged[0]["pid"]
            assert worker != proc.pid
            status = subprocess.run([os.path.join(venv_bin(), "meshpatch"), "status", "--json", "--admin", admin,
                                     "--pid", str(worker)], capture_output=True, text=True, timeout=30,
                                    env=app_env({}))
            assert status.returncode == 0, status.stderr
            data = json.loads(status.stdout)
            assert data["pid"] == worker
            assert "gunicorn Worker.load_wsgi" in data["activation"]["hooks"]["wsgi"]["detail"]
            master = subprocess.run([os.path.join(venv_bin(), "meshpatch"), "status", "--json", "--admin", admin,
                                     "--pid", str(proc.pid)], capture_output=True, text=True, timeout=30,
                                    env=app_env({}))
            assert master.returncode == 0 and json.loads(master.stdout)["pid"] == proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
