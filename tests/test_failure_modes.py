"""Control-plane loss and absence: fail open / fail closed, hold until ready,
and a control plane killed and restarted while an app keeps calling."""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path
from typing import Dict

import pytest

from meshpatch.agent import Agent
from meshpatch.api import MeshUnavailable
from meshpatch.bootstrap import load_bootstrap
from meshpatch.config import Settings
from meshpatch.routing.router import presumed_mesh
from tests.support.controlplane import ControlPlane, control_plane
from tests.support.servers import free_port, http_server, run_app
from tests.test_agent_e2e import FQDN, mesh


def make_agent(address: str, tmp_path: Path, **env: str) -> Agent:
    settings = Settings({"MESHPATCH_XDS_SERVER": address, "MESHPATCH_RESOLVE_TIMEOUT": "5",
                         "MESHPATCH_RUNTIME_DIR": str(tmp_path / "run"), **env})
    return Agent(settings, load_bootstrap(settings))


@pytest.mark.parametrize("host, expected", [
    ("reviews", True), ("reviews.default", True), ("reviews.shop", False), ("reviews.default.svc", True),
    (FQDN, True), ("reviews.shop.svc.cluster.local", True), ("api.example.com", False), ("example.com", False),
])
def test_presumed_mesh_names(host: str, expected: bool) -> None:
    assert presumed_mesh(host, "default", "cluster.local") is expected


def test_fail_closed_without_control_plane_is_fast_and_clear(tmp_path: Path) -> None:
    agent = make_agent(f"127.0.0.1:{free_port()}", tmp_path, MESHPATCH_FAIL_MODE="closed")
    try:
        start = time.monotonic()
        with pytest.raises(MeshUnavailable, match="control plane unreachable"):
            agent.router.pick("http", "reviews", 9080, "GET", "/")
        assert time.monotonic() - start < 1.0  # the refused connection ends the 5 s wait
        assert agent.router.pick("http", "api.example.com", 443, "GET", "/") is None  # not a mesh name: untouched
        with pytest.raises(MeshUnavailable):
            agent.router.pick("http", FQDN, 9080, "GET", "/")
    finally:
        agent.stop()


def test_fail_open_is_the_default(tmp_path: Path) -> None:
    agent = make_agent(f"127.0.0.1:{free_port()}", tmp_path)
    try:
        start = time.monotonic()
        assert agent.router.pick("http", "reviews", 9080, "GET", "/") is None
        assert time.monotonic() - start < 1.0
    finally:
        agent.stop()


def test_fail_closed_keeps_cached_config_when_the_control_plane_goes(tmp_path: Path) -> None:
    with control_plane(mesh(100)) as cp:
        agent = make_agent(cp.address, tmp_path, MESHPATCH_FAIL_MODE="closed")
        assert agent.router.pick("http", FQDN, 9080, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
    try:
        deadline = time.monotonic() + 5
        while not agent.client.failing and time.monotonic() < deadline:
            time.sleep(0.01)
        for _ in range(100):
            assert agent.router.pick("http", FQDN, 9080, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
        with pytest.raises(MeshUnavailable):
            agent.router.pick("http", "ratings", 9080, "GET", "/")  # new and unresolvable: fails fast
    finally:
        agent.stop()


@pytest.mark.parametrize("hold", [None, "8"])
def test_hold_until_ready_waits_for_a_late_control_plane(tmp_path: Path, hold: str) -> None:
    port = free_port()
    env: Dict[str, str] = {"MESHPATCH_RESOLVE_TIMEOUT": "0.5"}
    if hold:
        env["MESHPATCH_HOLD_UNTIL_READY"] = hold
    agent = make_agent(f"127.0.0.1:{port}", tmp_path, **env)
    plane = ControlPlane(mesh(100), listen=f"127.0.0.1:{port}")
    starter = threading.Timer(0.8, plane.start)
    starter.start()
    try:
        start = time.monotonic()
        pick = agent.router.pick("http", FQDN, 9080, "GET", "/")
        waited = time.monotonic() - start
        if hold:
            assert pick is not None and pick.address == "127.0.0.2"
            assert 0.7 < waited < 8
            start = time.monotonic()
            assert agent.router.pick("http", "unknown.example", 80, "GET", "/") is None
            assert time.monotonic() - start < 2  # the hold is over once the control plane answered
        else:
            assert pick is None and waited < 0.7  # fail open at once: nothing listens yet
    finally:
        starter.join()
        agent.stop()
        plane.stop()


MODES_APP = textwrap.dedent("""
    import json, time, grpc, httpx, requests
    out = {}
    def attempt(name, fn):
        start = time.monotonic()
        try:
            fn()
            out[name] = "ok"
        except Exception as exc:
            out[name] = type(exc).__module__ + "." + type(exc).__name__ + ": " + str(exc)[:300]
        out[name + "_s"] = round(time.monotonic() - start, 3)
    attempt("requests", lambda: requests.get("http://reviews:9080/", timeout=5))
    attempt("httpx", lambda: httpx.get("http://reviews.default.svc.cluster.local:9080/", timeout=5))
    channel = grpc.insecure_channel("reviews:7070")
    attempt("grpc", lambda: channel.unary_unary("/meshtest.Echo/Unary")(b"x", timeout=5))
    attempt("direct_ip", lambda: requests.get("{direct}", timeout=5).raise_for_status())
    attempt("non_mesh_name", lambda: requests.get("http://api.example.com/", timeout=5))
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.parametrize("mode", ["open", "closed"])
def test_app_starts_without_control_plane(mode: str) -> None:
    with http_server("direct", "127.0.0.2") as direct:
        run = run_app(MODES_APP.replace("{direct}", direct.url + "/"), {
            "MESHPATCH_XDS_SERVER": f"127.0.0.1:{free_port()}", "MESHPATCH_RESOLVE_TIMEOUT": "5",
            "MESHPATCH_FAIL_MODE": mode,
        })
    assert run.returncode == 0, run
    out = run.result
    assert out["direct_ip"] == "ok"
    assert "meshpatch" not in out["non_mesh_name"]  # its own DNS failure in this netns, nothing of ours
    for name in ("requests", "httpx", "grpc"):
        assert out[name + "_s"] < 1.5, out
    if mode == "closed":
        assert out["requests"].startswith("requests.exceptions.ConnectionError: meshpatch: no xDS config for reviews:9080")
        assert out["httpx"].startswith("httpx.ConnectError: meshpatch: no xDS config")
        assert "StatusCode.UNAVAILABLE" in out["grpc"] and "no xDS config for reviews:7070" in out["grpc"]
    else:
        # the original calls went out (and failed at DNS, as they would without meshpatch)
        for name in ("requests", "httpx", "grpc"):
            assert "meshpatch" not in out[name], out


RESTART_APP = textwrap.dedent("""
    import json, time, requests
    session = requests.Session()
    log, end = [], time.monotonic() + {seconds}
    while time.monotonic() < end:
        t = time.monotonic()
        try:
            log.append([t, session.get("http://reviews:9080/", timeout=5).json()["server"]])
        except Exception as exc:
            log.append([t, "error: " + repr(exc)[:200]])
        time.sleep(max(0.0, 1 / {rate} - (time.monotonic() - t)))
    print("RESULT " + json.dumps(log))
""")


def test_control_plane_killed_and_restarted_under_load() -> None:
    """Steady calls while the control plane dies and comes back on the same
    address: no call fails (cached config routes), the client reconnects with
    backoff and resubscribes, and a change made after the restart arrives."""
    port = free_port()
    first = ControlPlane(mesh(100), listen=f"127.0.0.1:{port}").start()
    result: Dict[str, object] = {}

    def app() -> None:
        result["run"] = run_app(RESTART_APP.format(seconds=6, rate=100),
                                {"MESHPATCH_XDS_SERVER": f"127.0.0.1:{port}", "MESHPATCH_RESOLVE_TIMEOUT": "5"},
                                timeout=60)

    thread = threading.Thread(target=app)
    with http_server("v1", "127.0.0.2", 9001), http_server("v2", "127.0.0.3", 9002):
        thread.start()
        try:
            assert first.server.wait_for(lambda: first.server.acks >= 4, timeout=20)  # the app resolved reviews
            time.sleep(0.5)
            first.stop()
            time.sleep(1.0)
            second = ControlPlane(mesh(0), listen=f"127.0.0.1:{port}").start()  # restarted, with a change
            try:
                assert second.server.wait_for(lambda: second.server.acks >= 4, timeout=10), "no reconnect"
            finally:
                thread.join()
                second.stop()
        finally:
            thread.join()
    run = result["run"]
    assert run.returncode == 0, run  # type: ignore[attr-defined]
    log = run.result  # type: ignore[attr-defined]
    errors = [entry for entry in log if entry[1].startswith("error")]
    assert errors == [] and len(log) > 300, (errors[:5], len(log))
    assert log[0][1] == "v1" and log[-1][1] == "v2"  # the post-restart config reached the app
