"""Per-request pick cost with a realistic config: 100 routes, 10k endpoints.

Resources arrive over real xDS (the scripted ADS server from the tests) so the
measured router is exactly what the hooks call.  Reports the median cost per
pick over batches, single-threaded and per thread with 8 threads (the pick
takes no lock, so the per-thread figure shows GIL sharing only).

    .venv/bin/python bench/bench_pick.py
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshpatch.bootstrap import Bootstrap, XdsServer  # noqa: E402
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


def build() -> tuple:
    ads = ScriptedAds().start()
    boot = Bootstrap([XdsServer(ads.address, "insecure", {}, [])], {"id": "sidecar~127.0.0.1~b.default~default.svc.cluster.local"}, {}, None, "bench")
    client = XdsClient(boot)
    router = Router(client, 5.0, client.start)
    routes = [res.route(prefix=f"/api/{i}/", headers={"x-tenant": f"t{i}"}, cluster=V1) for i in range(99)]
    routes.append(res.route("/", weighted=[(V1, 20), (V2, 80)]))
    eps = [(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", 8080) for i in range(10_000)]
    ads.serve({
        LDS: {"bench:80": res.listener("bench:80", RDS_NAME)},
        RDS: {RDS_NAME: res.route_config(RDS_NAME, [("bench:80", ["bench", "bench:80", FQDN, f"{FQDN}:80"], routes)])},
        CDS: {V1: res.cluster(V1), V2: res.cluster(V2)},
        EDS: {V1: res.cla(V1, eps[:5000]), V2: res.cla(V2, eps[5000:])},
    }, "1")
    router.prefetch("bench", 80)
    router._targets[("bench", 80)].ready.wait(10)
    return ads, client, router


def per_pick(router: Router, batches: int, headers: dict) -> list:
    pick = router.pick
    samples = []
    for _ in range(batches):
        start = time.perf_counter()
        for _ in range(BATCH):
            pick("http", "bench", 80, "GET", "/reviews/1", headers)
        samples.append((time.perf_counter() - start) / BATCH * 1e6)
    return samples


def main() -> None:
    ads, client, router = build()
    headers = {"x-tenant": "none", "accept": "*/*"}
    assert router.pick("http", "bench", 80, "GET", "/reviews/1", headers) is not None
    single = per_pick(router, 60, headers)
    results: dict = {}

    def worker(index: int) -> None:
        results[index] = per_pick(router, 15, headers)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    wall = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    multi = [s for samples in results.values() for s in samples]
    total_picks = 8 * 15 * BATCH
    print("pick cost, 100 routes (99 header+prefix routes miss, catch-all 20/80), 10k endpoints")
    print(f"  1 thread : median {statistics.median(single):.2f} us/pick")
    print(f"  8 threads: median {statistics.median(multi):.2f} us/pick wall-per-thread (GIL-shared), "
          f"aggregate {wall / total_picks * 1e6:.2f} us/pick across threads")
    client.stop()
    ads.stop()


if __name__ == "__main__":
    main()
