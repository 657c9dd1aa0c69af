"""The agent as a whole: real control plane, real xDS, real apps where it matters.

Covers what sits between the hooks and the xDS client: names as istiod and kube
DNS resolve them, live config changes, control-plane loss, bad bootstrap input
in a running app, fork, and the packaging promise of one import name.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import textwrap
import time
from importlib import metadata
from pathlib import Path
from typing import Iterator

import pytest

from meshpatch.agent import Agent
from meshpatch.bootstrap import load_bootstrap
from meshpatch.config import Settings
from tests.support.controlplane import ControlPlane, control_plane
from tests.support.mesh_yaml import reviews_split
from tests.support.servers import free_port, http_server, run_app

FQDN = "reviews.default.svc.cluster.local"


def mesh(v1_weight: int, http_ports: tuple = (9001, 9002)) -> str:
    return reviews_split([("127.0.0.2", http_ports[0], "v1"), ("127.0.0.3", http_ports[1], "v2")], v1_weight)


def make_agent(address: str, **env: str) -> Agent:
    settings = Settings({"MESHPATCH_XDS_SERVER": address, "MESHPATCH_RESOLVE_TIMEOUT": "5", **env})
    return Agent(settings, load_bootstrap(settings))


@pytest.fixture()
def cp() -> Iterator[ControlPlane]:
    with control_plane(mesh(100)) as plane:
        yield plane


def versions(agent: Agent, host: str, n: int = 200) -> collections.Counter:
    return collections.Counter(agent.router.pick("http", host, 9080, "GET", "/").address for _ in range(n))  # type: ignore[union-attr]


@pytest.mark.parametrize("host", ["reviews", "reviews.default", "reviews.default.svc", FQDN, "REVIEWS.default"])
def test_names_resolve_like_kube_dns_in_the_clients_namespace(cp: ControlPlane, host: str) -> None:
    agent = make_agent(cp.address)
    try:
        pick = agent.router.pick("http", host, 9080, "GET", "/")
        assert pick is not None and (pick.address, pick.port) == ("127.0.0.2", 9001)
        assert pick.cluster == f"outbound|9080|v1|{FQDN}"
        assert pick.authority == f"{host.lower()}:9080"
    finally:
        agent.stop()


def test_short_name_from_another_namespace_is_not_in_the_mesh(cp: ControlPlane) -> None:
    agent = make_agent(cp.address, MESHPATCH_NAMESPACE="shop")
    try:
        assert agent.router.pick("http", "reviews", 9080, "GET", "/") is None  # reviews.shop does not exist
        assert agent.router.pick("http", FQDN, 9080, "GET", "/") is not None
        assert agent.router.pick("http", FQDN, 9999, "GET", "/") is None  # no such port
    finally:
        agent.stop()


def test_live_weight_change_reaches_picks_quickly(cp: ControlPlane) -> None:
    agent = make_agent(cp.address)
    try:
        assert set(versions(agent, FQDN)) == {"127.0.0.2"}
        cp.write(mesh(0))
        start = time.monotonic()
        while time.monotonic() - start < 5:
            if set(versions(agent, FQDN, 50)) == {"127.0.0.3"}:
                break
            time.sleep(0.005)
        else:
            pytest.fail("the 0/100 split never reached the router")
        assert time.monotonic() - start < 1.0
    finally:
        agent.stop()


def test_control_plane_loss_keeps_last_config_and_unknown_hosts_do_not_wait() -> None:
    with control_plane(mesh(100)) as plane:
        agent = make_agent(plane.address)
        assert agent.router.pick("http", FQDN, 9080, "GET", "/") is not None
    try:
        # The control plane is gone: cached routes keep working, new names pass through at once.
        for _ in range(100):
            assert agent.router.pick("http", FQDN, 9080, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
        deadline = time.monotonic() + 5
        while not agent.client.failing and time.monotonic() < deadline:
            time.sleep(0.01)
        start = time.monotonic()
        assert agent.router.pick("http", "other.example", 80, "GET", "/") is None
        assert time.monotonic() - start < 0.2
    finally:
        agent.stop()


def test_unreachable_control_plane_at_start_does_not_hold_non_mesh_names() -> None:
    agent = make_agent(f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        start = time.monotonic()
        assert agent.router.pick("http", "api.example", 443, "GET", "/") is None
        assert time.monotonic() - start < 1.0  # the resolve timeout is 5 s: the refused connection ends the wait
    finally:
        agent.stop()


APP_CALLS = """
import json, os, requests
out = [requests.get("http://{host}:9080/").json()["server"] for _ in range(20)]
print("RESULT " + json.dumps(out))
"""


def test_bad_bootstrap_is_one_clear_line_and_the_app_runs_unpatched(tmp_path: Path) -> None:
    bad = tmp_path / "bootstrap.json"
    bad.write_text("{not json")
    with http_server("direct", "127.0.0.2") as server:
        code = f"import requests, json; print('RESULT ' + json.dumps(requests.get({server.url!r}).json()['server']))"
        run = run_app(code, {"GRPC_XDS_BOOTSTRAP": str(bad)})
    assert run.returncode == 0, run
    assert run.result == "direct"
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert "GRPC_XDS_BOOTSTRAP" in lines[0] and "not valid JSON" in lines[0] and "Fix:" in lines[0]


@pytest.mark.parametrize("share", ["0", "1"])
def test_fork_child_routes_with_its_own_stream(cp: ControlPlane, share: str, tmp_path: Path) -> None:
    code = textwrap.dedent(f"""
        import json, os, requests
        first = requests.get("http://{FQDN}:9080/").json()["server"]   # agent started in the parent
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            got = [requests.get("http://{FQDN}:9080/").json()["server"] for _ in range(5)]
            from meshpatch.agent import get_agent
            got.append(getattr(get_agent().client.transport, "role", "direct"))
            os.write(w, json.dumps(got).encode())
            os._exit(0)
        os.close(w)
        child = json.loads(os.read(r, 4096).decode())
        os.waitpid(pid, 0)
        parent = [requests.get("http://{FQDN}:9080/").json()["server"] for _ in range(5)]
        print("RESULT " + json.dumps({{"first": first, "child": child, "parent": parent}}))
    """)
    env = {"MESHPATCH_XDS_SERVER": cp.address, "MESHPATCH_RESOLVE_TIMEOUT": "5", "MESHPATCH_SHARE_STREAM": share,
           "MESHPATCH_RUNTIME_DIR": str(tmp_path)}
    with http_server("v1", "127.0.0.2", 9001), http_server("v2", "127.0.0.3", 9002):
        run = run_app(code, env, timeout=60)
    assert run.returncode == 0, run
    if share == "0":
        assert run.result == {"first": "v1", "child": ["v1"] * 5 + ["direct"], "parent": ["v1"] * 5}, run
        assert cp.server.streams_opened >= 2  # the child opened its own stream; nothing reused the parent's channel
    else:
        # The child shares the parent's upstream stream through the pod relay (a new
        # channel of its own to the relay socket, never the parent's channel).
        assert run.result == {"first": "v1", "child": ["v1"] * 5 + ["follower"], "parent": ["v1"] * 5}, run
        # the child never opened an upstream stream; the parent ends its own for the
        # instant of the fork and opens one more after it (pause_for_fork)
        assert cp.server.streams_opened <= 2


def test_installed_package_adds_one_import_name() -> None:
    dist = metadata.distribution("meshpatch")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct.get("dir_info", {}).get("editable"):
        pytest.skip("editable development install; tests/run.sh installs the wheel and checks this")
    tops = set()
    for file in dist.files or ():
        first = file.parts[0]
        if first.endswith(".dist-info") or first in ("..", "bin") or file.parts[0].startswith("__"):
            continue
        tops.add(first)
    assert tops == {"meshpatch", "meshpatch.pth", "meshpatch.start"}, tops
    scripts = {ep.name for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts == {"meshpatch", "meshpatch-run"}
