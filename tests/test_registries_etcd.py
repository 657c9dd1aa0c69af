"""etcd (go-zero and Kratos layouts) against a real etcd: Debian's etcd-server,
started here on 127.0.0.1; keys written through etcd's own v3 JSON gateway the
way go-zero (key/lease → host:port) and Kratos (JSON ServiceInstance) write them."""

from __future__ import annotations

import json
import time
from typing import Iterator

import pytest

from tests.support.registries import AppSession, EtcdServer, etcd_missing, wait_until
from tests.support.servers import grpc_server, http_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    reason = etcd_missing()
    if reason:
        pytest.skip(reason)
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.close()


def test_go_zero_and_kratos_services_with_watch_and_etcd_loss(etcd: EtcdServer) -> None:
    with http_server("a", "127.0.0.2") as a, http_server("b", "127.0.0.3") as b, grpc_server("k", "127.0.0.4") as k:
        lease_a, lease_b = etcd.grant(60), etcd.grant(60)
        etcd.put(f"product.rpc/{lease_a}", f"127.0.0.2:{a.port}", lease_a)
        etcd.put(f"product.rpc/{lease_b}", f"127.0.0.3:{b.port}", lease_b)
        etcd.put("/microservices/helloworld/k-1", json.dumps({
            "id": "k-1", "name": "helloworld", "version": "v1", "metadata": {"zone": "east"},
            "endpoints": [f"grpc://127.0.0.4:{k.port}?isSecure=false"]}))
        etcd.put("config/feature-flag", "on")  # not a registration: ignored
        env = {"MESHPATCH_REGISTRY": f"etcd://{etcd.address}", "MESHPATCH_RESOLVE_TIMEOUT": "5"}
        with AppSession(env) as app:
            assert app.http("http://product.rpc/items", 20) == {"a": 10, "b": 10}
            assert app.grpc("helloworld", 4) == {"k": 4}  # no port in the target: the registry's port

            etcd.revoke(lease_b)  # an instance dies: its lease expires, etcd deletes the key, the watch says so
            app.until(lambda: app.http("http://product.rpc/items", 10), lambda seen: seen == {"a": 10})

            lease_b2 = etcd.grant(60)
            etcd.put(f"product.rpc/{lease_b2}", f"127.0.0.3:{b.port}", lease_b2)
            app.until(lambda: app.http("http://product.rpc/items", 10), lambda seen: seen == {"a": 5, "b": 5})

            etcd.stop(kill=True)
            wait_until(lambda: "keeping its last list" in app.stderr(), 10, what="the app noticing etcd is gone")
            for _ in range(3):
                assert app.http("http://product.rpc/items", 10) == {"a": 5, "b": 5}
                assert app.grpc("helloworld", 2) == {"k": 2}
                time.sleep(0.2)
        assert app.proc.returncode == 0, app.stderr()
    etcd.start()  # same data dir: the module's etcd is back for other tests


def test_prefix_limits_the_watched_keys(etcd: EtcdServer) -> None:
    with http_server("p", "127.0.0.2") as p, http_server("q", "127.0.0.3") as q:
        etcd.put("/microservices/inside/1", json.dumps({"name": "inside", "endpoints": [f"http://127.0.0.2:{p.port}"]}))
        etcd.put("/elsewhere/outside/1", json.dumps({"name": "outside", "endpoints": [f"http://127.0.0.3:{q.port}"]}))
        env = {"MESHPATCH_REGISTRY": f"etcd://{etcd.address}/microservices", "MESHPATCH_RESOLVE_TIMEOUT": "5"}
        with AppSession(env) as app:
            assert app.http("http://inside/", 2) == {"p": 2}
            assert app.http("http://outside/", 1) == {"error:ConnectionError": 1}  # not under the prefix: untouched
