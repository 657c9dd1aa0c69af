"""Soak: COUNT calls through the agent; does the app's memory or fd count grow?

An ordinary app (bench/_soak_client.py) under meshpatch-run makes COUNT real
HTTP calls to the mesh host (keep-alive, a few threads) while the control
plane flips the v1/v2 weights every CHANGE seconds (so the config-update paths
run too).  The app's RSS and open fds are sampled from /proc every
``--progress`` calls.  Reported: RSS after warm-up (5 % of the calls) and at
the end (target: growth <= 5 MB), fd count range (target: steady), failures.

    unshare -n sh -c 'ip link set lo up && .venv/bin/python bench/bench_soak.py --count 1000000'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from _mesh import BIN, HOST, ROOT, ControlPlaneProcess, Pod, app_env, free_port, mesh_yaml, open_fds, rss_kb


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--progress", type=int, default=10_000)
    parser.add_argument("--change", type=float, default=10.0, help="seconds between weight flips")
    args = parser.parse_args()

    v1, v2 = Pod("v1", "127.0.0.2"), Pod("v2", "127.0.0.3")
    endpoints = [(v1.address, v1.port, "v1"), (v2.address, v2.port, "v2")]
    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlaneProcess(Path(tmp), free_port())
        cp.write(mesh_yaml(endpoints, 50))
        cp.start()
        stop = threading.Event()
        flips = [0]

        def flipper() -> None:
            weight = 50
            while not stop.wait(args.change):
                weight = 80 if weight != 80 else 20
                cp.write(mesh_yaml(endpoints, weight))
                flips[0] += 1

        threading.Thread(target=flipper, daemon=True).start()
        start = time.monotonic()
        client = subprocess.Popen(
            [str(BIN / "meshpatch-run"), str(BIN / "python"), str(ROOT / "bench" / "_soak_client.py"),
             f"http://{HOST}:9080/", str(args.count), str(args.threads), str(args.progress)],
            env=app_env({"MESHPATCH_XDS_SERVER": cp.address, "MESHPATCH_RUNTIME_DIR": tmp + "/run"}),
            stdout=subprocess.PIPE, text=True)
        samples = []
        summary = {}
        assert client.stdout is not None
        for line in client.stdout:
            if line.startswith("progress "):
                done = int(line.split()[1])
                samples.append((done, rss_kb(client.pid), open_fds(client.pid), time.monotonic() - start))
            elif line.startswith("{"):
                summary = json.loads(line)
        client.wait()
        stop.set()
        cp.kill()
    v1.kill()
    v2.kill()
    warm = next(s for s in samples if s[0] >= args.count * 0.05)
    end = samples[-1]
    fds = [s[2] for s in samples if s[0] >= warm[0]]
    elapsed = end[3]
    print(f"soak: {summary.get('done')} calls through the agent in {elapsed:.0f} s ({summary.get('done', 0) / elapsed:.0f}/s), "
          f"{args.threads} threads, {flips[0]} weight changes; failed {summary.get('failed')}")
    print(f"  answered: {summary.get('answered')}")
    print(f"  RSS after warm-up ({warm[0]} calls): {warm[1] / 1024:.1f} MB; at the end: {end[1] / 1024:.1f} MB; "
          f"growth {(end[1] - warm[1]) / 1024:+.2f} MB (target <= 5 MB)")
    print(f"  open fds after warm-up: min {min(fds)}, max {max(fds)}, at the end {end[2]}")
    step = max(1, len(samples) // 10)
    print("  samples (calls, RSS MB, fds):", [(s[0], round(s[1] / 1024, 1), s[2]) for s in samples[::step]])


if __name__ == "__main__":
    main()
