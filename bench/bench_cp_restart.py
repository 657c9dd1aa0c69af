"""Control plane killed and restarted under steady load: how many calls fail?

An ordinary app (bench/_load_client.py) under meshpatch-run calls the mesh host
at RATE requests/s for DURATION seconds.  The control plane (its own process)
is SIGKILLed at 1/6 of the run, restarted at 2/6 with the weights flipped to
v2, killed again at 3.5/6 and restarted at 4.5/6 with v1 again.  Reported:
failed calls (target 0), when each restart's config reached the app.

    unshare -n sh -c 'ip link set lo up && .venv/bin/python bench/bench_cp_restart.py --duration 60 --rate 500'
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from _mesh import BIN, HOST, ROOT, ControlPlaneProcess, Pod, app_env, free_port, mesh_yaml


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=60)
    parser.add_argument("--rate", type=float, default=500)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    v1, v2 = Pod("v1", "127.0.0.2"), Pod("v2", "127.0.0.3")
    endpoints = [(v1.address, v1.port, "v1"), (v2.address, v2.port, "v2")]
    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlaneProcess(Path(tmp), free_port())
        cp.write(mesh_yaml(endpoints, 100))
        cp.start()
        client = subprocess.Popen(
            [str(BIN / "meshpatch-run"), str(BIN / "python"), str(ROOT / "bench" / "_load_client.py"),
             f"http://{HOST}:9080/", str(args.duration), str(args.rate), str(args.threads)],
            env=app_env({"MESHPATCH_XDS_SERVER": cp.address, "MESHPATCH_RUNTIME_DIR": tmp + "/run"}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        lines: list = []
        reader = threading.Thread(target=lambda: lines.extend(client.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        d = args.duration
        events = []
        start = time.monotonic()

        def at(fraction: float) -> None:
            delay = start + d * fraction - time.monotonic()
            if delay > 0:
                time.sleep(delay)

        at(1 / 6)
        cp.kill()
        events.append((round(time.monotonic() - start, 2), "control plane killed"))
        at(2 / 6)
        cp.write(mesh_yaml(endpoints, 0))
        cp.start()
        events.append((round(time.monotonic() - start, 2), "restarted serving 0/100 (all v2)"))
        at(3.5 / 6)
        cp.kill()
        events.append((round(time.monotonic() - start, 2), "control plane killed"))
        at(4.5 / 6)
        cp.write(mesh_yaml(endpoints, 100))
        cp.start()
        events.append((round(time.monotonic() - start, 2), "restarted serving 100/0 (all v1)"))
        out, _ = client.communicate(timeout=d + 60)
        cp.kill()
    summary = json.loads(out.strip().splitlines()[-1])
    total = summary["total"]
    print(f"control-plane restart under load: {args.rate:.0f} req/s for {d:.0f} s, {args.threads} client threads")
    for t, what in events:
        print(f"  t={t:6.2f}s  {what}")
    seconds = {int(k): v for k, v in summary["seconds"].items()}
    for label, version in (("first restart -> v2", "v2"), ("second restart -> v1", "v1")):
        restart = next(t for t, w in events if ("v2" in w if version == "v2" else "v1)" in w))
        moved = next((s for s in sorted(seconds) if s >= int(restart) and seconds[s].get(version, 0)), None)
        print(f"  {label}: first call answered by {version} in second {moved} (restart at {restart:.1f} s; "
              "the client reconnects with gRPC's backoff: 1 s x1.6, jitter 0.2)")
    ok, failed = total.get("ok", 0), total.get("failed", 0)
    print(f"  calls: {ok + failed}, ok {ok}, failed {failed} (target 0); achieved {(ok + failed) / d:.0f} req/s")
    if summary["errors"]:
        print("  errors:", summary["errors"])
    v1.kill()
    v2.kill()


if __name__ == "__main__":
    main()
