"""ZooKeeper (Dubbo layout) against a real ZooKeeper: Debian's package, started
here on 127.0.0.1, providers written the way Dubbo writes them, calls made by
an unmodified app under meshpatch-run to real HTTP and gRPC servers."""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Iterator

import pytest

from tests.support.controlplane import control_plane
from tests.support.mesh_yaml import reviews_split
from tests.support.registries import (
    AppSession,
    ZooKeeperServer,
    dubbo_url,
    free_port,
    register_provider,
    wait_until,
    zookeeper_missing,
)
from tests.support.servers import grpc_server, http_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

IFACE = "com.example.Demo"


@pytest.fixture(scope="module")
def zk_server() -> Iterator[ZooKeeperServer]:
    reason = zookeeper_missing()
    if reason:
        pytest.skip(reason)
    server = ZooKeeperServer().start()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def zk_client(server: ZooKeeperServer) -> Iterator[object]:
    client = server.client()
    try:
        yield client
    finally:
        client.stop()
        client.close()


def shared_port(*hosts: str) -> int:
    """One port free on every pod address: Dubbo providers of a service listen
    on the same port (20880) on every host, and so do these."""
    for _ in range(50):
        port = free_port(hosts[0])
        try:
            for host in hosts[1:]:
                with socket.socket() as sock:
                    sock.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no shared free port")


def app_env(zk: ZooKeeperServer, root: str, **extra: str) -> dict:
    env = {"MESHPATCH_REGISTRY": f"zookeeper://{zk.address}{root}", "MESHPATCH_RESOLVE_TIMEOUT": "5"}
    env.update(extra)
    return env


def test_dubbo_providers_deregistration_and_zookeeper_loss(zk_server: ZooKeeperServer) -> None:
    """Register two providers (HTTP and gRPC), call through meshpatch, deregister
    one, kill ZooKeeper (the last list stays), restart it and change again."""
    root = "/dubbo-loss"
    http_port, grpc_port = shared_port("127.0.0.2", "127.0.0.3"), shared_port("127.0.0.2", "127.0.0.3")
    with http_server("a", "127.0.0.2", http_port), http_server("b", "127.0.0.3", http_port), \
            grpc_server("ga", "127.0.0.2", grpc_port), grpc_server("gb", "127.0.0.3", grpc_port), \
            zk_client(zk_server) as zk:
        nodes = {}
        for name, address in (("a", "127.0.0.2"), ("b", "127.0.0.3")):
            nodes[name] = [
                register_provider(zk, dubbo_url("rest", address, http_port, IFACE, version="1.0.0"), root),
                register_provider(zk, dubbo_url("tri", address, grpc_port, IFACE, version="1.0.0"), root),
            ]
        with AppSession(app_env(zk_server, root)) as app:
            http_url = f"http://{IFACE}:{http_port}/hello"
            grpc_target = f"{IFACE}:{grpc_port}"
            # round robin over both providers, each protocol on its own port
            assert app.http(http_url, 20) == {"a": 10, "b": 10}
            assert app.grpc(grpc_target, 20) == {"ga": 10, "gb": 10}

            for path in nodes["b"]:
                zk.delete(path)
            app.until(lambda: app.http(http_url, 10), lambda seen: seen == {"a": 10})
            app.until(lambda: app.grpc(grpc_target, 10), lambda seen: seen == {"ga": 10})

            nodes["b"] = [register_provider(zk, dubbo_url("rest", "127.0.0.3", http_port, IFACE, version="1.0.0"), root)]
            app.until(lambda: app.http(http_url, 10), lambda seen: seen == {"a": 5, "b": 5})

            zk_server.stop(kill=True)  # the registry goes away: the last list stays in force
            wait_until(lambda: "keeping its last list" in app.stderr(), 10, what="the app noticing ZooKeeper is gone")
            for _ in range(3):
                assert app.http(http_url, 10) == {"a": 5, "b": 5}
                time.sleep(0.3)
            assert app.stderr().count("unreachable") == 1, app.stderr()

            zk_server.start()
            # kazoo (ours and the test's) reconnect on their own; a change after that is seen again
            wait_until(lambda: zk.connected, 30, what="the test's ZooKeeper client reconnecting")
            # If the outage outlasted the test client's session, ZooKeeper dropped that
            # session's ephemeral provider nodes: "a" is then already deregistered and
            # "b" must be registered again for the change below to be observable.
            from kazoo.exceptions import NoNodeError

            try:
                zk.retry(zk.delete, nodes["a"][0])
            except NoNodeError:
                pass
            if not zk.exists(nodes["b"][0]):
                nodes["b"] = [register_provider(zk, dubbo_url("rest", "127.0.0.3", http_port, IFACE, version="1.0.0"), root)]
            app.until(lambda: app.http(http_url, 10), lambda seen: seen == {"b": 10}, timeout=30)
        assert app.proc.returncode == 0, app.stderr()


def test_host_in_zookeeper_and_in_the_mesh_with_a_subset_split(zk_server: ZooKeeperServer) -> None:
    """reviews v1 lives in ZooKeeper (Dubbo provider, version=v1), v2 in the mesh
    (ServiceEntry); the VirtualService splits 50/50 by DestinationRule subsets,
    so the subset v1 is made of registry instances only.  Then a provider's
    labels change (v1 → v2) and it moves to the other subset."""
    root = "/dubbo-merge"
    host = "reviews.default.svc.cluster.local"
    port = shared_port("127.0.0.2", "127.0.0.3", "127.0.0.4")
    mesh = reviews_split([("127.0.0.3", None, "v2")], 50, port=port, host=host)
    with http_server("zk-v1", "127.0.0.2", port), http_server("mesh-v2", "127.0.0.3", port), \
            http_server("zk-moves", "127.0.0.4", port), control_plane(mesh) as cp, zk_client(zk_server) as zk:
        register_provider(zk, dubbo_url("rest", "127.0.0.2", port, "demo.Reviews", version="v1"), root)
        moving = register_provider(zk, dubbo_url("rest", "127.0.0.4", port, "demo.Reviews", version="v1"), root)
        env = app_env(zk_server, root, MESHPATCH_XDS_SERVER=cp.address,
                      MESHPATCH_REGISTRY_ALIASES=f"demo.Reviews={host}")
        with AppSession(env) as app:
            url = f"http://{host}:{port}/reviews/1"
            seen = app.http(url, 400)
            assert set(seen) == {"zk-v1", "mesh-v2", "zk-moves"}, seen
            assert 150 <= seen["mesh-v2"] <= 250, seen  # the v2 subset: 50 %
            assert 150 <= seen["zk-v1"] + seen["zk-moves"] <= 250, seen  # the v1 subset, from ZooKeeper only

            zk.delete(moving)
            register_provider(zk, dubbo_url("rest", "127.0.0.4", port, "demo.Reviews", version="v2"), root)

            def moved(counts) -> bool:  # v1 = zk-v1 alone (50 %); v2 = mesh-v2 + zk-moves (25 % each)
                return set(counts) == {"zk-v1", "mesh-v2", "zk-moves"} and 150 <= counts["zk-v1"] <= 250 \
                    and 50 <= counts["zk-moves"] <= 150 and 50 <= counts["mesh-v2"] <= 150
            app.until(lambda: app.http(url, 400), moved, timeout=20)


def test_zookeeper_unreachable_at_start_gives_one_line_and_the_rest_works(tmp_path) -> None:
    """No ZooKeeper where the URI points: one clear log line; the file registry
    next to it still routes."""
    dead = free_port()
    registry_file = tmp_path / "registry.yaml"
    with http_server("f", "127.0.0.2") as f:
        registry_file.write_text(f"services:\n  files-service:\n  - 127.0.0.2:{f.port}\n")
        env = {"MESHPATCH_REGISTRY": f"zookeeper://127.0.0.1:{dead}/dubbo?connect_timeout=0.5,file://{registry_file}",
               "MESHPATCH_RESOLVE_TIMEOUT": "5"}
        with AppSession(env) as app:
            assert app.http("http://files-service/x", 5) == {"f": 5}
            assert app.http(f"http://{IFACE}/x", 1) == {"error:ConnectionError": 1}  # unknown: untouched (no DNS here)
            time.sleep(1.0)
            lines = [line for line in app.stderr().splitlines() if "zookeeper" in line.lower()]
            assert len(lines) == 1, app.stderr()
            assert f"registry zookeeper://127.0.0.1:{dead}/dubbo unreachable" in lines[0]
