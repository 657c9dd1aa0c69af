"""Load balancing and resilience seen by unmodified apps (requests, httpx, grpc under meshpatch-run).

One scripted ADS server describes a mesh whose clusters use each policy; the
apps only call ``http://svc/...`` / ``svc:7070`` and report what they saw:
- a refused pod in a cluster with no outlier config (built-in detector, issue 6),
- ring hash and Maglev stickiness by header, checked against the ring meshpatch's
  ring-building code gives for the same EDS (itself checked against grpcio in
  test_lb_hash.py),
- circuit breaking (max_requests 1) failing the second concurrent call fast,
- least request steering concurrent calls away from a slow pod.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any, Dict, Iterator, List

import pytest
import xxhash
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import any_pb2

from meshpatch.routing.cluster_policy import LbConfig
from meshpatch.routing.lb import build_picker
from meshpatch.xds.decode import decode_endpoints
from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS
from tests.support import xds_resources as res
from tests.support.lb import refused_port
from tests.support.scripted_ads import ScriptedAds
from tests.support.servers import UNARY, grpc_server, http_server, run_app

C = cluster_pb2.Cluster
USERS = [f"user-{i}" for i in range(12)]


def _name(tag: str) -> str:
    return f"outbound|80|{tag}|svc.default.svc.cluster.local"


class Mesh:
    def __init__(self) -> None:
        self.stack = contextlib.ExitStack()
        self.ads = self.stack.enter_context(_ads())
        self.refused_pods = [self.stack.enter_context(http_server(f"ok{i}", f"127.0.0.{i + 2}")) for i in range(2)]
        self.dead_port = refused_port("127.0.0.9")
        self.hash_pods = [self.stack.enter_context(http_server(f"h{i}", f"127.0.0.{i + 10}")) for i in range(4)]
        self.cb_pod = self.stack.enter_context(http_server("cb", "127.0.0.20"))
        self.cb_pod.delay = 0.6
        self.slow = self.stack.enter_context(http_server("slow", "127.0.0.21"))
        self.slow.delay = 0.05
        self.fast = self.stack.enter_context(http_server("fast", "127.0.0.22"))
        self.grpc_pods = [self.stack.enter_context(grpc_server(f"g{i}", f"127.0.0.{i + 30}")) for i in range(4)]
        self.clas: Dict[str, Any] = {}
        self.serve()

    def serve(self) -> None:
        hashed = [(p.host, p.port) for p in self.hash_pods]
        clusters = {
            _name("refused"): (C.ROUND_ROBIN, [(p.host, p.port) for p in self.refused_pods] + [("127.0.0.9", self.dead_port)]),
            _name("ring"): (C.RING_HASH, hashed),
            _name("maglev"): (C.MAGLEV, hashed),
            _name("cb"): (C.ROUND_ROBIN, [(self.cb_pod.host, self.cb_pod.port)]),
            _name("lr"): (C.LEAST_REQUEST, [(self.slow.host, self.slow.port), (self.fast.host, self.fast.port)]),
            _name("grpc"): (C.RING_HASH, [(p.host, p.port) for p in self.grpc_pods]),
        }
        cds = {}
        for name, (lb, eps) in clusters.items():
            cds[name] = res.cluster(name, lb=lb)
            self.clas[name] = res.cla(name, eps)
        cds[_name("cb")].circuit_breakers.thresholds.add().max_requests.value = 1

        def route(prefix: str, tag: str, hashed_by: str = "") -> Any:
            r = res.route(prefix, cluster=_name(tag))
            if hashed_by:
                r.route.hash_policy.add().header.header_name = hashed_by
            return r

        http_routes = [route("/refused", "refused"), route("/ring", "ring", "x-user"), route("/maglev", "maglev", "x-user"),
                       route("/cb", "cb"), route("/lr", "lr")]
        grpc_routes = [route("/", "grpc", "x-user")]
        self.ads.serve({
            LDS: {"svc:80": res.listener("svc:80", "rds-http"), "svc:7070": res.listener("svc:7070", "rds-grpc")},
            RDS: {"rds-http": res.route_config("rds-http", [("svc:80", ["svc", "svc:80"], http_routes)]),
                  "rds-grpc": res.route_config("rds-grpc", [("svc:7070", ["svc", "svc:7070"], grpc_routes)])},
            CDS: cds,
            EDS: self.clas,
        })

    def expected_owner(self, tag: str, policy: str, user: str) -> str:
        packed = any_pb2.Any()
        packed.Pack(self.clas[_name(tag)])
        _, endpoints = decode_endpoints(packed)
        endpoint = build_picker(endpoints, LbConfig(policy)).pick(xxhash.xxh64_intdigest(user.encode()))
        return f"{endpoint.address}:{endpoint.port}"


@contextlib.contextmanager
def _ads() -> Iterator[ScriptedAds]:
    server = ScriptedAds().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    m = Mesh()
    try:
        yield m
    finally:
        m.stack.close()


HTTP_APP = """
import json, threading, time, {lib}
{client}
def call(path, headers=None):
    try:
        r = {request}
        return r.json()["bind"]
    except Exception as exc:
        return "error:" + type(exc).__name__ + ":" + str(exc)[:200]
results = {{}}
results["refused"] = [call("/refused") for _ in range(30)]
users = {users}
results["ring"] = {{u: sorted(set(call("/ring", {{"x-user": u}}) for _ in range(5))) for u in users}}
results["maglev"] = {{u: sorted(set(call("/maglev", {{"x-user": u}}) for _ in range(5))) for u in users}}
cb = []
workers = [threading.Thread(target=lambda: cb.append(call("/cb"))) for _ in range(2)]
workers[0].start(); time.sleep(0.2); workers[1].start()
for w in workers: w.join()
results["cb"] = cb
lr = []
lock = threading.Lock()
stop = time.monotonic() + 1.0
def load():
    while time.monotonic() < stop:
        got = call("/lr")
        with lock:
            lr.append(got)
threads = [threading.Thread(target=load) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
results["lr"] = lr
print("RESULT " + json.dumps(results))
"""

CLIENTS = {
    "requests": ("s = requests.Session()", "s.get('http://svc' + path, headers=headers, timeout=5)"),
    "httpx": ("c = httpx.Client(timeout=5)", "c.get('http://svc' + path, headers=headers)"),
}


@pytest.fixture(scope="module", params=sorted(CLIENTS))
def http_results(request: Any, mesh: Mesh) -> Dict[str, Any]:
    client, call = CLIENTS[request.param]
    code = HTTP_APP.format(lib=request.param, client=client, request=call, users=USERS)
    run = run_app(code, {"MESHPATCH_XDS_SERVER": mesh.ads.address, "MESHPATCH_RESOLVE_TIMEOUT": "5"}, timeout=120)
    assert run.returncode == 0 and run.result is not None, run
    return run.result


def test_a_refused_pod_is_ejected_without_any_outlier_config(http_results: Dict[str, Any], mesh: Mesh) -> None:
    refused = http_results["refused"]
    errors = [r for r in refused if r.startswith("error:")]
    # One connect failure takes the pod out at once (gRPC-style connectivity: reconnect
    # backoff from 1 s); the built-in outlier detector would need 5 in a row.
    assert len(errors) == 1, refused
    assert all(not r.startswith("error:") for r in refused[15:]), refused
    ok = collections.Counter(r for r in refused if not r.startswith("error:"))
    assert set(ok) == {f"{p.host}:{p.port}" for p in mesh.refused_pods}


@pytest.mark.parametrize("tag, policy", [("ring", "RING_HASH"), ("maglev", "MAGLEV")])
def test_hashing_is_sticky_per_header_and_lands_where_the_ring_says(http_results: Dict[str, Any], mesh: Mesh,
                                                                    tag: str, policy: str) -> None:
    seen = http_results[tag]
    for user in USERS:
        assert seen[user] == [mesh.expected_owner(tag, policy, user)], (user, seen[user])
    assert len({seen[u][0] for u in USERS}) >= 3  # the users spread over the pods


def test_circuit_breaker_fails_the_second_concurrent_call_fast(http_results: Dict[str, Any], mesh: Mesh) -> None:
    cb = http_results["cb"]  # in completion order: the refused call ends first, the slow one 0.6 s later
    assert len(cb) == 2 and cb[1] == f"{mesh.cb_pod.host}:{mesh.cb_pod.port}", cb
    assert cb[0].startswith("error:ConnectError") or cb[0].startswith("error:ConnectionError"), cb
    assert "circuit breaker open" in cb[0] and "max_requests" in cb[0], cb


def test_least_request_steers_an_apps_concurrent_calls_to_the_fast_pod(http_results: Dict[str, Any],
                                                                       mesh: Mesh) -> None:
    counts = collections.Counter(http_results["lr"])
    fast = counts[f"{mesh.fast.host}:{mesh.fast.port}"]
    assert fast / sum(counts.values()) > 0.65, counts  # P2C over 2 pods: ~3/4 (both draws slow: 1/4)


GRPC_APP = """
import json, grpc
channel = grpc.insecure_channel("svc:7070")
call = channel.unary_unary(UNARY)
results = {}
for user in USERS:
    results[user] = sorted(set(json.loads(call(b"x", timeout=5, metadata=(("x-user", user),)))["bind"] for _ in range(5)))
print("RESULT " + json.dumps(results))
"""


def test_grpc_ring_hash_by_metadata_is_sticky_and_matches_the_ring(mesh: Mesh) -> None:
    code = f"UNARY = {UNARY!r}\nUSERS = {USERS!r}\n" + GRPC_APP
    run = run_app(code, {"MESHPATCH_XDS_SERVER": mesh.ads.address, "MESHPATCH_RESOLVE_TIMEOUT": "5"}, timeout=120)
    assert run.returncode == 0 and run.result is not None, run
    for user in USERS:
        assert run.result[user] == [mesh.expected_owner("grpc", "RING_HASH", user)], (user, run.result[user])
    assert len({run.result[u][0] for u in USERS}) >= 3
