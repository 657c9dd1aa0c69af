"""Where meshpatch's added cost per requests call goes, measured in situ.

``bench_hook_cost.py`` times meshpatch's code in a loop (hot) and after a full
cache flush (cold); ``bench_overhead.py`` times whole calls.  This one splits the
end-to-end figure: each piece of meshpatch's work runs right before a real
requests call to a loopback server, the way it runs in a routed call, and the
added CPU time of the calling thread is compared round by round with the same
call without that work (see bench/_in_situ_client.py for the pieces).

    bash bench/run.sh            # or: unshare -n sh -c 'ip link set lo up && .venv/bin/python bench/bench_in_situ.py'
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_overhead as overhead  # noqa: E402

PIECES = {
    "wrapt": "wrapt dispatch (send + pool-key wrappers, pass-through)",
    "patch": "plain-function patches as meshpatch installs them (pass-through)",
    "router": "router: route match, pick, attempt accounting, retry decision",
    "hook": "requests hook around a no-op send (router + URL/Host rewrite)",
    "routed": "the whole routed call (= end-to-end added CPU)",
    "loop": "calibration: empty 50-iteration loop, ~150 bytecodes, no objects",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    http_server, http_port, grpc_server, grpc_port = overhead.start_servers()
    with tempfile.TemporaryDirectory() as tmp:
        cp, xds = overhead.start_control_plane(Path(tmp), http_port, grpc_port)
        try:
            hosts = Path(tmp) / "hosts"
            hosts.write_text(f"127.0.0.1 localhost\n{overhead.ENDPOINT_IP} {overhead.MESH_HOST}\n")
            if not overhead.name_resolution_works(str(hosts)):
                raise SystemExit("needs a private /etc/hosts (unshare -m, root) to call the mesh name unpatched")
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHPATCH_", "GRPC_XDS"))}
            env["MESHPATCH_XDS_SERVER"] = xds
            cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts),
                   str(overhead.BIN / "meshpatch-run"), str(overhead.BIN / "python"),
                   str(Path(__file__).resolve().parent / "_in_situ_client.py"), overhead.ENDPOINT_IP,
                   overhead.MESH_HOST, str(http_port), str(args.rounds)]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if out.returncode != 0:
                raise SystemExit(f"in-situ client failed:\n{out.stderr}")
            result = json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            cp.terminate()
            cp.wait(10)
    http_server.shutdown()
    grpc_server.stop(None)
    print(f"added CPU per requests call, in situ ({args.rounds} paired rounds; median [IQR], microseconds)")
    for key, label in PIECES.items():
        r = result[key]
        print(f"  {label:66} {r['median']:+6.1f}  [{r['q1']:+.1f} .. {r['q3']:+.1f}]")


if __name__ == "__main__":
    main()
