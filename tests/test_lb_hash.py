"""Ring hash and Maglev: parity with grpcio's own ring_hash, stickiness, spread, minimal disruption.

The parity test runs grpcio's native xDS client (a subprocess: its bootstrap is
process-global) against the same real ADS resources that meshpatch decodes,
and requires both to send every key to the same server — with weighted
endpoints in weighted localities, and again with one server down (grpcio
walks the ring past it; meshpatch walks past the ejected endpoint).
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import sys
from concurrent import futures
from typing import Dict, Iterator, List, Sequence, Tuple

import grpc
import pytest
import xxhash
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from google.protobuf import any_pb2
from scipy.stats import chisquare

from meshpatch.routing.cluster_policy import LbConfig, set_ring_size_cap
from meshpatch.routing.hashing import build_maglev, build_ring, endpoint_hash_key
from meshpatch.routing.lb import ClusterView, Maglev, RingHash, build_picker
from meshpatch.routing.model import Endpoint, EndpointsConfig, LocalityEndpoints
from meshpatch.xds.decode import decode_endpoints
from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS
from tests.support import xds_resources as res
from tests.support.controlplane import write_bootstrap
from tests.support.scripted_ads import ScriptedAds

RING = LbConfig("RING_HASH")
MAGLEV = LbConfig("MAGLEV")

NATIVE_CLIENT = r"""
import json, sys, grpc
channel = grpc.insecure_channel("xds:///echo:7070")
call = channel.unary_unary("/echo.Echo/Call")
out = {}
for key in json.loads(sys.argv[1]):
    out[key] = call(b"x", metadata=[("x-user", key)], wait_for_ready=True, timeout=20).decode()
print(json.dumps(out))
"""

CLUSTER = "outbound|7070||echo.default.svc.cluster.local"


def _echo(ip: str, name: str) -> Tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Call": grpc.unary_unary_rpc_method_handler(lambda req, ctx: name.encode())})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{ip}:0")
    server.start()
    return server, port


def _cla(ports: Sequence[int]) -> endpoint_pb2.ClusterLoadAssignment:
    """Two localities (zone-b listed first, weights 3 and 1) and endpoint weights 1/2/1/3/1,
    so order, locality × endpoint weights and sorting all matter for the ring."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=CLUSTER)
    layout = [("zone-b", 3, [(0, 1), (1, 2)]), ("zone-a", 1, [(2, 1), (3, 3), (4, 1)])]
    for zone, weight, members in layout:
        group = cla.endpoints.add()
        group.locality.region = "r"
        group.locality.zone = zone
        group.load_balancing_weight.value = weight
        for index, ep_weight in members:
            lb = group.lb_endpoints.add(health_status=1)
            lb.endpoint.address.socket_address.address = f"127.0.0.{index + 2}"
            lb.endpoint.address.socket_address.port_value = ports[index]
            lb.load_balancing_weight.value = ep_weight
    return cla


def _native_choices(ads_address: str, keys: List[str], tmp_path: str) -> Dict[str, str]:
    boot = write_bootstrap(os.path.join(tmp_path, "bootstrap.json"), ads_address)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHPATCH_", "GRPC_XDS_"))}
    env["GRPC_XDS_BOOTSTRAP"] = boot
    proc = subprocess.run([sys.executable, "-c", NATIVE_CLIENT, json.dumps(keys)], env=env, capture_output=True,
                          text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture()
def echo_servers() -> Iterator[List[Tuple[grpc.Server, int]]]:
    started = [_echo(f"127.0.0.{i + 2}", f"s{i}") for i in range(5)]
    yield started
    for server, _ in started:
        server.stop(0)


def test_ring_hash_picks_exactly_like_grpcio_native(echo_servers, tmp_path) -> None:
    ports = [port for _, port in echo_servers]
    cla = _cla(ports)
    route = res.route("/", cluster=CLUSTER)
    route.route.hash_policy.add().header.header_name = "x-user"
    ads = ScriptedAds().start()
    try:
        ads.serve({
            LDS: {"echo:7070": res.listener("echo:7070", "rc")},
            RDS: {"rc": res.route_config("rc", [("vh", ["echo:7070", "echo"], [route])])},
            CDS: {CLUSTER: res.cluster(CLUSTER, lb=cluster_pb2.Cluster.RING_HASH)},
            EDS: {CLUSTER: cla},
        })
        packed = any_pb2.Any()
        packed.Pack(cla)
        _, endpoints = decode_endpoints(packed)
        names = {f"127.0.0.{i + 2}": f"s{i}" for i in range(5)}
        keys = [f"user-{i}" for i in range(80)]

        native = _native_choices(ads.address, keys, str(tmp_path))
        picker = build_picker(endpoints, RING)
        mine = {k: names[picker.pick(xxhash.xxh64_intdigest(k.encode())).address] for k in keys}
        assert mine == native
        assert len(set(native.values())) == 5  # the keys really spread over every server

        # One server down: grpcio skips it (TRANSIENT_FAILURE), meshpatch skips it ejected.
        echo_servers[1][0].stop(0)
        native_down = _native_choices(ads.address, keys, str(tmp_path))
        ejected = frozenset({("127.0.0.3", ports[1])})
        picker = build_picker(endpoints, RING, ClusterView(ejected=ejected))
        mine_down = {k: names[picker.pick(xxhash.xxh64_intdigest(k.encode())).address] for k in keys}
        assert mine_down == native_down
        assert "s1" not in native_down.values()
        assert all(native_down[k] == native[k] for k in keys if native[k] != "s1")
    finally:
        ads.stop()


def _eps(n: int, weights: Sequence[int] = ()) -> List[Endpoint]:
    return [Endpoint(f"10.0.{i // 250}.{i % 250 + 1}", 8080, 1, weights[i] if weights else 1) for i in range(n)]


def _config(endpoints: Sequence[Endpoint]) -> EndpointsConfig:
    return EndpointsConfig("c", (LocalityEndpoints("r/z/", 1, 0, tuple(endpoints)),))


def _owners(picker, hashes: Sequence[int]) -> List[Tuple[str, int]]:
    return [(ep.address, ep.port) for ep in (picker.pick(h) for h in hashes)]


_RNG = random.Random(7)
HASHES = [_RNG.getrandbits(64) for _ in range(20000)]


@pytest.mark.parametrize("lb", [RING, MAGLEV], ids=["ring", "maglev"])
def test_same_hash_same_endpoint_across_rebuilds(lb: LbConfig) -> None:
    endpoints = _eps(7)
    first = build_picker(_config(endpoints), lb)
    again = build_picker(_config(list(endpoints)), lb)  # an EDS update with the same endpoints
    sample = HASHES[:2000]
    assert _owners(first, sample) == _owners(again, sample)
    assert all(first.pick(h) is first.pick(h) for h in sample[:200])
    assert len(set(_owners(first, sample))) == 7


def _arc_shares(hashes: List[int], owners, n: int) -> List[float]:
    shares = [0.0] * n
    previous = hashes[-1] - (1 << 64)
    for h, owner in zip(hashes, owners):
        shares[owner] += (h - previous) / float(1 << 64)
        previous = h
    return shares


def test_ring_spread_follows_its_arcs_and_the_weights() -> None:
    weights = [1, 2, 3, 2]
    endpoints = _eps(4, weights)
    picker = build_picker(_config(endpoints), RING)
    assert isinstance(picker, RingHash)
    keys = [endpoint_hash_key(ep.address, ep.port) for ep in endpoints]
    ring, owners = build_ring(keys, weights, 1024, 8388608, 4096)
    shares = _arc_shares(ring, owners, 4)
    # Entries per endpoint follow the weights exactly (scaled so the lightest gets ceil(1024/8)).
    assert collections.Counter(owners) == {0: 128, 1: 256, 2: 384, 3: 256}
    for share, weight in zip(shares, weights):
        assert abs(share - weight / 8) < 0.2 * weight / 8, shares
    counts = collections.Counter(_owners(picker, HASHES))
    observed = [counts[(ep.address, ep.port)] for ep in endpoints]
    assert chisquare(observed, [s * len(HASHES) for s in shares]).pvalue > 0.001, (observed, shares)


def test_maglev_spread_follows_weights() -> None:
    weights = [1, 2, 3, 2]
    endpoints = _eps(4, weights)
    picker = build_picker(_config(endpoints), LbConfig("MAGLEV", table_size=65537))
    assert isinstance(picker, Maglev)
    table = build_maglev([endpoint_hash_key(e.address, e.port) for e in endpoints], weights, 65537)
    slots = collections.Counter(table)
    for index, weight in enumerate(weights):
        assert abs(slots[index] - 65537 * weight / 8) <= 2, slots
    counts = collections.Counter(_owners(picker, HASHES))
    observed = [counts[(ep.address, ep.port)] for ep in endpoints]
    assert chisquare(observed, [len(HASHES) * w / 8 for w in weights]).pvalue > 0.001, observed


@pytest.mark.parametrize("lb, leave_bound, join_bound", [(RING, 0.15, 0.25), (MAGLEV, 0.02, 0.12)],
                         ids=["ring", "maglev"])
def test_minimal_disruption_when_an_endpoint_leaves_or_joins(lb: LbConfig, leave_bound: float,
                                                              join_bound: float) -> None:
    endpoints = _eps(10)
    before = _owners(build_picker(_config(endpoints), lb), HASHES)
    gone = (endpoints[3].address, endpoints[3].port)
    after = _owners(build_picker(_config(endpoints[:3] + endpoints[4:]), lb), HASHES)
    stayed = [(b, a) for b, a in zip(before, after) if b != gone]
    moved = sum(1 for b, a in stayed if b != a) / len(stayed)
    assert all(a != gone for a in after)
    # Only the leaver's keys must move; rescaling the table moves a few more (ring: its
    # scale changes with n, ~8 %; maglev: permutation collisions, ~0.2 %), far from a
    # modulo hash's ~90 %.
    assert moved < leave_bound, moved
    joined = _owners(build_picker(_config(endpoints + _eps(11)[10:]), lb), HASHES)
    changed = sum(1 for b, a in zip(before, joined) if b != a) / len(before)
    assert changed < join_bound, changed  # the newcomer's 1/11 plus the same rescaling
    newcomer = (_eps(11)[10].address, 8080)
    assert abs(sum(1 for a in joined if a == newcomer) / len(joined) - 1 / 11) < 0.04


@pytest.mark.parametrize("lb", [RING, MAGLEV], ids=["ring", "maglev"])
def test_ejection_moves_only_the_ejected_endpoints_keys(lb: LbConfig) -> None:
    endpoints = _eps(8)
    cache: dict = {}
    view = ClusterView(cache=cache)
    healthy = build_picker(_config(endpoints), lb, view)
    victim = (endpoints[2].address, endpoints[2].port)
    view2 = ClusterView(ejected=frozenset({victim}), cache=view.used)
    ejected = build_picker(_config(endpoints), lb, view2)
    tables = {k: v for k, v in view.used.items() if k[0] == "content"}
    assert tables and all(view2.used[k] is v for k, v in tables.items())  # the table is reused, not rebuilt
    before = _owners(healthy, HASHES)
    after = _owners(ejected, HASHES)
    assert all(a == b for b, a in zip(before, after) if b != victim)
    spread = collections.Counter(a for b, a in zip(before, after) if b == victim)
    assert victim not in spread and len(spread) >= 4  # the victim's keys spread out, not onto one neighbour


@pytest.mark.parametrize("lb", [RING, MAGLEV], ids=["ring", "maglev"])
def test_retry_exclusion_walks_to_another_endpoint(lb: LbConfig) -> None:
    endpoints = _eps(5)
    picker = build_picker(_config(endpoints), lb)
    for h in HASHES[:300]:
        first = picker.pick(h)
        tried = {(first.address, first.port)}
        second = picker.pick(h, tried)
        assert (second.address, second.port) not in tried
        assert picker.pick(h, tried) is second  # stable: a retry of the same key goes to the same alternative
        everything = {(e.address, e.port) for e in endpoints}
        assert picker.pick(h, everything) is not None  # all tried: still an answer


def test_no_hash_means_random_spread() -> None:
    picker = build_picker(_config(_eps(4)), RING)
    counts = collections.Counter((picker.pick().address) for _ in range(4000))
    assert len(counts) == 4 and min(counts.values()) > 300


def test_ring_size_cap_follows_grpc_and_can_be_raised() -> None:
    keys = [f"10.0.0.{i}:80" for i in range(1, 11)]
    ring, _ = build_ring(keys, [1] * 10, 8192, 8388608, 4096)
    assert len(ring) == 4096  # gRPC caps min_ring_size at 4096
    ring, _ = build_ring(keys, [1] * 10, 8192, 8388608, 8388608)
    assert len(ring) == 8200  # Envoy: ceil(8192 / 10) entries each
    ring, _ = build_ring(keys, [1] * 10, 1024, 8388608, 4096)
    assert len(ring) == 1030
    set_ring_size_cap(20000)
    try:
        picker = build_picker(_config(_eps(10)), LbConfig("RING_HASH", min_ring_size=8192))
        assert len(picker._hashes) == 8200
    finally:
        set_ring_size_cap(None)


def test_endpoint_hash_key_forms() -> None:
    assert endpoint_hash_key("10.1.2.3", 80) == "10.1.2.3:80"
    assert endpoint_hash_key("fd00::1", 80) == "[fd00::1]:80"
    assert endpoint_hash_key("10.1.2.3", 80, {"envoy.lb": {"hash_key": "pod-a"}}) == "pod-a"  # gRPC A76
