"""meshpatch's own CPU per call, per hook: the wrapper and the router around a
library send that does nothing.

End-to-end latency on loopback (bench_overhead.py) is hundreds of microseconds
per call and swings by tens on a shared machine; the few microseconds meshpatch
adds drown in that.  Here each hook's real wrapper runs with the real agent
(xDS from an in-process ADS server: one service, a catch-all route, one
endpoint) around a no-op in place of the library's network send, so what is
timed is exactly the code meshpatch adds to a call: request inspection, route
match, pick, Host/URL rewriting, outcome reporting, retry decision.

Each hook is timed hot (a tight loop: the pure CPU cost) and cold (after
overwriting every CPU cache line: what a real app's call pays, since the kernel
and the HTTP/gRPC library evict meshpatch between two requests).

    .venv/bin/python bench/bench_hook_cost.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support import xds_resources as res  # noqa: E402
from tests.support.scripted_ads import ScriptedAds  # noqa: E402
from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS  # noqa: E402

FQDN = "bench.default.svc.cluster.local"
BATCH = 2000


def serve_mesh() -> ScriptedAds:
    ads = ScriptedAds().start()
    rds = f"outbound|80||{FQDN}"
    grpc_rds = f"outbound|7070||{FQDN}"
    cluster = f"outbound|80|v1|{FQDN}"
    grpc_cluster = f"outbound|7070|v1|{FQDN}"
    ads.serve({
        LDS: {f"{FQDN}:80": res.listener(f"{FQDN}:80", rds), f"{FQDN}:7070": res.listener(f"{FQDN}:7070", grpc_rds)},
        RDS: {rds: res.route_config(rds, [("bench:80", [FQDN, f"{FQDN}:80"], [res.route("/", cluster=cluster)])]),
              grpc_rds: res.route_config(grpc_rds, [("bench:7070", [FQDN, f"{FQDN}:7070"],
                                                     [res.route("/", cluster=grpc_cluster)])])},
        CDS: {cluster: res.cluster(cluster), grpc_cluster: res.cluster(grpc_cluster)},
        EDS: {cluster: res.cla(cluster, [("127.0.0.2", 8080)]), grpc_cluster: res.cla(grpc_cluster, [("127.0.0.2", 9090)])},
    }, "1")
    return ads


def cpu_per_call(call: Callable[[], Any], batches: int = 40) -> float:
    """Median over batches of this thread's CPU time per call (microseconds)."""
    for _ in range(BATCH):
        call()
    samples: List[float] = []
    clock = time.thread_time
    for _ in range(batches):
        start = clock()
        for _ in range(BATCH):
            call()
        samples.append((clock() - start) / BATCH * 1e6)
    return statistics.median(samples)


_EVICT = bytearray(16 << 20)  # larger than this machine's caches


def cold_pair(direct: Callable[[], Any], mesh: Callable[[], Any], samples: int = 1500) -> Tuple[float, float]:
    """Median wall time of one call right after every CPU cache line was
    overwritten, for the no-op send and the hook, sampled alternately so load
    changes hit both.  A cold cache is the state a request finds meshpatch's code
    and data in between two network round trips of a real app (the kernel, the
    library and other threads ran meanwhile), so this predicts the end-to-end
    cost far better than a hot loop: per Python frame and object touched, a cold
    call pays memory latency."""
    clock = time.perf_counter
    evict = _EVICT
    ones = b"\x01" * (len(evict) // 64)
    out: Tuple[List[float], List[float]] = ([], [])
    for _ in range(samples):
        for index, call in enumerate((direct, mesh)):
            evict[::64] = ones
            start = clock()
            call()
            out[index].append((clock() - start) * 1e6)
    return statistics.median(out[0]), statistics.median(out[1])


def requests_case() -> tuple:
    import requests
    from requests.adapters import HTTPAdapter

    from meshpatch.hooks import requests_hook

    requests_hook.patch(requests)  # as under meshpatch-run
    response = requests.Response()
    response.status_code = 200

    def send(adapter: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        return response

    adapter = HTTPAdapter()
    request = requests.Request("GET", f"http://{FQDN}/reviews/1", headers={"accept": "*/*"}).prepare()
    routed_send = requests_hook._make_send(send)  # what HTTPAdapter.send is once patched, around the no-op

    def direct() -> Any:
        return send(adapter, request, timeout=5)

    def mesh() -> Any:
        return routed_send(adapter, request, timeout=5)

    assert mesh() is response and request.url == f"http://{FQDN}/reviews/1"
    return direct, mesh


def httpx_case() -> tuple:
    import httpx

    from meshpatch.hooks import httpx_hook

    httpx_hook.patch(httpx)  # as under meshpatch-run (the hook reads what this httpx looks like)
    response = httpx.Response(200)
    transport = httpx.HTTPTransport()

    def send(transport: Any, request: Any) -> Any:
        return response

    request = httpx.Request("GET", f"http://{FQDN}/reviews/1", headers={"accept": "*/*"})
    routed_send = httpx_hook._make_handle_request(send)  # HTTPTransport.handle_request once patched

    def direct() -> Any:
        return send(transport, request)

    def mesh() -> Any:
        return routed_send(transport, request)

    assert mesh() is response
    return direct, mesh


class _NoopChannel:
    """Stands in for grpc's channel: the multicallable answers at once."""

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return lambda request, **kw: b"pong"

    def close(self) -> None:
        pass


def grpc_case() -> tuple:
    from meshpatch.hooks import grpc_hook

    channel = grpc_hook._insecure_channel_wrapper(lambda *a, **k: _NoopChannel(), None, (f"{FQDN}:7070",), {})
    assert isinstance(channel, grpc_hook.MeshChannel), channel
    mesh_unary = channel.unary_unary("/bench.Echo/Call")
    direct_unary = _NoopChannel().unary_unary("/bench.Echo/Call")

    def direct() -> Any:
        return direct_unary(b"ping", timeout=5)

    def mesh() -> Any:
        return mesh_unary(b"ping", timeout=5)

    assert mesh() == b"pong"
    return direct, mesh


def main() -> None:
    ads = serve_mesh()
    os.environ["MESHPATCH_XDS_SERVER"] = ads.address
    os.environ["MESHPATCH_SHARE_STREAM"] = "0"
    from meshpatch.agent import get_agent

    agent = get_agent()
    assert agent is not None
    print("meshpatch's own cost per call, hook + router around a no-op send (median, microseconds)")
    print(f"  {'hook':10}{'hot: no-op send':>17}{'via hook':>10}{'added':>8}   {'cold: no-op':>12}{'via hook':>10}{'added':>8}")
    for name, case in (("requests", requests_case), ("httpx", httpx_case), ("grpc", grpc_case)):
        direct, mesh = case()
        d, m = cpu_per_call(direct), cpu_per_call(mesh)
        cd, cm = cold_pair(direct, mesh)
        print(f"  {name:10}{d:17.2f}{m:10.2f}{m - d:8.2f}   {cd:12.2f}{cm:10.2f}{cm - cd:8.2f}")
    print("  hot: CPU time in a tight loop (2000-call batches); cold: wall time of one call after all CPU caches")
    print("  were overwritten, as between an app's network round trips (the end-to-end cost is close to this)")
    ads.stop()


if __name__ == "__main__":
    main()
