"""Per-request pick cost with a realistic config: 100 routes, 10k endpoints, per LB policy.

Resources arrive over real xDS (the scripted ADS server from the tests) so the
measured router is exactly what the hooks call.  For each load-balancing
policy the two clusters (5k endpoints each, a 20/80 split on the catch-all
route) are served with that policy and the median cost per pick is measured
over batches, single-threaded and per thread with 8 threads (the pick takes no
lock, so the per-thread figure shows GIL sharing only).

    .venv/bin/python bench/bench_pick.py            # every policy
    .venv/bin/python bench/bench_pick.py RING_HASH  # some
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402

from meshpatch.bootstrap import Bootstrap, XdsServer  # noqa: E402
from meshpatch.routing.outcome import CONNECT_FAILURE, Outcome  # noqa: E402
from meshpatch.routing.router import Router  # noqa: E402
from meshpatch.xds.client import XdsClient  # noqa: E402
from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS  # noqa: E402
from tests.support import xds_resources as res  # noqa: E402
from tests.support.scripted_ads import ScriptedAds  # noqa: E402

FQDN = "bench.default.svc.cluster.local"
RDS_NAME = f"outbound|80||{FQDN}"
V1 = f"outbound|80|v1|{FQDN}"
V2 = f"outbound|80|v2|{FQDN}"
BATCH = 2000
C = cluster_pb2.Cluster


def _cluster(name: str, policy: str) -> C:
    lb = {"ROUND_ROBIN": C.ROUND_ROBIN, "ROUND_ROBIN_WEIGHTED": C.ROUND_ROBIN, "RR_ONE_EJECTED": C.ROUND_ROBIN,
          "LEAST_REQUEST": C.LEAST_REQUEST, "LEAST_REQUEST_WEIGHTED": C.LEAST_REQUEST, "RANDOM": C.RANDOM,
          "RING_HASH": C.RING_HASH, "MAGLEV": C.MAGLEV}[policy]
    return res.cluster(name, lb=lb)


def _cla(name: str, endpoints: List[Tuple[str, int]], weighted: bool) -> object:
    cla = res.cla(name, endpoints)
    if weighted:
        for index, lb_endpoint in enumerate(cla.endpoints[0].lb_endpoints):
            lb_endpoint.load_balancing_weight.value = 1 + index % 4
    return cla


def build(policy: str) -> tuple:
    ads = ScriptedAds().start()
    boot = Bootstrap([XdsServer(ads.address, "insecure", {}, [])], {"id": "sidecar~127.0.0.1~b.default~default.svc.cluster.local"}, {}, None, "bench")
    client = XdsClient(boot)
    router = Router(client, 5.0, client.start)
    routes = [res.route(prefix=f"/api/{i}/", headers={"x-tenant": f"t{i}"}, cluster=V1) for i in range(99)]
    catch_all = res.route("/", weighted=[(V1, 20), (V2, 80)])
    if policy in ("RING_HASH", "MAGLEV"):  # istiod emits hash policies only with consistentHash
        catch_all.route.hash_policy.add().header.header_name = "x-user"
    routes.append(catch_all)
    eps = [(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", 8080) for i in range(10_000)]
    weighted = policy.endswith("_WEIGHTED")
    ads.serve({
        LDS: {"bench:80": res.listener("bench:80", RDS_NAME)},
        RDS: {RDS_NAME: res.route_config(RDS_NAME, [("bench:80", ["bench", "bench:80", FQDN, f"{FQDN}:80"], routes)])},
        CDS: {V1: _cluster(V1, policy), V2: _cluster(V2, policy)},
        EDS: {V1: _cla(V1, eps[:5000], weighted), V2: _cla(V2, eps[5000:], weighted)},
    }, "1")
    router.prefetch("bench", 80)
    router._targets[("bench", 80)].ready.wait(20)
    if policy == "RR_ONE_EJECTED":  # a pending ejection puts a deadline check on every pick
        for name in (V1, V2):
            handle = router.clusters.get(name)
            endpoint = handle.picker.endpoints[0]
            for _ in range(5):
                handle.on_attempt_start(endpoint)
                handle.on_attempt_end(endpoint, Outcome(CONNECT_FAILURE))
            assert handle.tracker.ejected, "endpoint not ejected"
    return ads, client, router


def per_pick(pick: Callable[[], object], batches: int, cpu: bool = True) -> List[float]:
    """Microseconds per pick per batch.  ``cpu``: the calling thread's CPU time
    (``time.thread_time``), which excludes waiting for the GIL and time the OS
    gave to other processes — on a shared machine the wall clock mostly
    measures the neighbours."""
    clock = time.thread_time if cpu else time.perf_counter
    samples = []
    for _ in range(batches):
        start = clock()
        for _ in range(BATCH):
            pick()
        samples.append((clock() - start) / BATCH * 1e6)
    return samples


def measure(policy: str) -> Dict[str, float]:
    ads, client, router = build(policy)
    headers = {"x-tenant": "none", "accept": "*/*", "x-user": "alice"}
    route_pick = router.pick
    assert route_pick("http", "bench", 80, "GET", "/reviews/1", headers) is not None

    def pick() -> object:
        return route_pick("http", "bench", 80, "GET", "/reviews/1", headers)

    single_wall = per_pick(pick, 30, cpu=False)
    single = per_pick(pick, 60)
    results: dict = {}

    def worker(index: int) -> None:
        results[index] = per_pick(pick, 15)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    multi = [s for samples in results.values() for s in samples]
    picker = router.clusters.get(V2).picker
    hashed = statistics.median(per_pick(lambda: picker.pick(0x9E3779B97F4A7C15), 20))
    client.stop()
    ads.stop()
    return {"single": statistics.median(single), "wall": statistics.median(single_wall),
            "multi": statistics.median(multi), "aggregate": wall / (8 * 15 * BATCH) * 1e6, "picker": hashed}


POLICIES = ["ROUND_ROBIN", "ROUND_ROBIN_WEIGHTED", "RR_ONE_EJECTED", "LEAST_REQUEST", "LEAST_REQUEST_WEIGHTED",
            "RANDOM", "RING_HASH", "MAGLEV"]


def main() -> None:
    chosen = [p.upper() for p in sys.argv[1:]] or POLICIES
    print("pick cost, 100 routes (99 header+prefix routes miss, catch-all 20/80), 10k endpoints (5k per cluster)")
    print(f"  {'policy':<24}{'1 thread':>10}{'(wall)':>8}{'8 threads':>11}{'aggregate':>11}{'picker only':>13}"
          "   (median us/pick)")
    for policy in chosen:
        r = measure(policy)
        print(f"  {policy:<24}{r['single']:>10.2f}{r['wall']:>8.2f}{r['multi']:>11.2f}{r['aggregate']:>11.2f}"
              f"{r['picker']:>13.2f}")
    print("  1 thread / 8 threads: CPU time per pick of each thread (median of 2000-pick batches);")
    print("  (wall): 1 thread by the wall clock; aggregate: wall time / all picks of 8 threads (GIL-shared);")
    print("  picker only: the cluster's picker alone, with a request hash (what hashing policies use)")


if __name__ == "__main__":
    main()
