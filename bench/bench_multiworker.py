"""Multi-worker pods: upstream streams and how fast a change reaches every worker.

gunicorn with N workers (with and without --preload) under meshpatch-run,
behind an istio-agent-like proxy that serves one stream at a time, in front of
the local control plane.  Each worker runs the reporter of
tests/test_multiprocess.py.  Per configuration: streams the agent proxy and
the control plane saw (target 1), streams the proxy had to close (target 0),
median / max time for a weight change to reach all workers over CHANGES
changes, and the takeover time after SIGKILLing the worker that holds the
stream, over KILLS kills.

    unshare -n sh -c 'ip link set lo up && .venv/bin/python bench/bench_multiworker.py'
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.ads_proxy import AdsProxy  # noqa: E402
from tests.support.controlplane import control_plane  # noqa: E402
from tests.support.servers import free_port, http_server  # noqa: E402
from tests import test_multiprocess as mp  # noqa: E402
from tests.test_agent_e2e import mesh  # noqa: E402


def run(workers: int, preload: bool, changes: int, kills: int) -> dict:
    mp.WORKERS = workers
    out: dict = {"workers": workers, "preload": preload, "propagation": [], "takeover": []}
    with tempfile.TemporaryDirectory() as tmp, control_plane(mesh(100)) as cp, \
            AdsProxy(cp.address, single_stream=True) as agent_proxy:
        with mp.pod_app(Path(tmp), mp.gunicorn(free_port(), preload), agent_proxy.address) as pod:
            pod.wait(mp.on("127.0.0.2", "v1"), "all workers on v1", timeout=120)
            weight = 100
            for _ in range(changes):
                weight = 0 if weight else 100
                want = ("127.0.0.2", "v1") if weight else ("127.0.0.3", "v2")
                since = time.time()
                cp.write(mesh(weight))
                reports = pod.wait(mp.on(*want), "change everywhere", timeout=20)
                out["propagation"].append(mp.propagation(reports, since, want[0]))
                time.sleep(0.2)
            for k in range(kills):
                reports = pod.reports()
                leader = next(pid for pid, r in reports.items() if r["role"] == "leader")
                opened = cp.server.streams_opened
                start = time.monotonic()
                os.kill(leader, signal.SIGKILL)
                cp.server.wait_for(lambda: cp.server.streams_opened > opened, timeout=10)
                out["takeover"].append(time.monotonic() - start)
                pod.wait(lambda rs: len(rs) >= workers and leader not in rs
                         and sum(r["role"] == "leader" for r in rs.values()) == 1, "replacement", timeout=60)
            out["proxy_streams"] = agent_proxy.streams_opened
            out["proxy_closed_by_newer"] = agent_proxy.closed_by_newer
            out["cp_streams_opened"] = cp.server.streams_opened
            out["cp_streams_active"] = cp.server.streams_active
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--changes", type=int, default=10)
    parser.add_argument("--kills", type=int, default=3)
    args = parser.parse_args()
    with http_server("v1", "127.0.0.2", 9001), http_server("v2", "127.0.0.3", 9002):
        for workers in args.workers:
            for preload in (True, False):
                r = run(workers, preload, args.changes, args.kills)
                prop = sorted(r["propagation"])
                take = sorted(r["takeover"])
                print(f"gunicorn -w {workers}{' --preload' if preload else ''}: "
                      f"upstream streams {r['cp_streams_opened']} opened / {r['cp_streams_active']} active "
                      f"(1 + one per leader kill = {1 + args.kills}); agent proxy saw {r['proxy_streams']}, "
                      f"closed {r['proxy_closed_by_newer']} for a newer one; "
                      f"change to all workers: median {statistics.median(prop) * 1000:.0f} ms, max {prop[-1] * 1000:.0f} ms "
                      f"over {len(prop)} changes; takeover after SIGKILL of the holder: "
                      f"median {statistics.median(take) * 1000:.0f} ms, max {take[-1] * 1000:.0f} ms over {len(take)}",
                      flush=True)


if __name__ == "__main__":
    main()
