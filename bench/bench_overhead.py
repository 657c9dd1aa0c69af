"""Added latency per call and interpreter start-up cost, side by side in one run.

Latency: one unmodified client process under ``meshpatch-run``
(bench/_ab_client.py) calls the same loopback endpoint in alternating batches:
by IP with the library unpatched (no meshpatch code at all), by the mesh
hostname unpatched and resolved by the system through a private /etc/hosts
(what the app pays for calling by name without meshpatch), and by the mesh
hostname routed by meshpatch.  Same process, same connections' server, same
interpreter state: alternating batches cancel the drift that dominates
cross-process comparisons on a shared 2-core machine.  Reported per library:
median wall-clock latency, and the median CPU time of the calling thread
(meshpatch's cost is CPU in that thread; the CPU column is far less noisy).

Start-up: ``python -c pass`` in a bare venv without meshpatch, in the project
venv with the agent off (MESHPATCH_ENABLED unset) and on (set, nothing
patched).

Run it in a loopback-only netns so a mesh name can never reach a DNS server:

    bash bench/run.sh            # = unshare -n ... .venv/bin/python bench/bench_overhead.py
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from http.server import ThreadingHTTPServer
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _mesh import OkHandler as _Handler, free_port  # noqa: E402
BIN = Path(sys.executable).parent
ENDPOINT_IP = "127.0.0.2"
MESH_HOST = "bench.default.svc.cluster.local"


def start_servers() -> tuple:
    http_server = ThreadingHTTPServer((ENDPOINT_IP, 0), _Handler)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(lambda request, context: request)}
    )
    grpc_server.add_generic_rpc_handlers((handler,))
    grpc_port = grpc_server.add_insecure_port(f"{ENDPOINT_IP}:0")
    grpc_server.start()
    return http_server, http_server.server_address[1], grpc_server, grpc_port


MESH_YAML = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bench, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  - {{number: 7070, name: grpc, protocol: GRPC}}
  endpoints:
  - address: {ip}
    ports: {{http: {http_port}, grpc: {grpc_port}}}
    labels: {{version: v1}}
"""


def start_control_plane(config_dir: Path, http_port: int, grpc_port: int) -> tuple:
    (config_dir / "mesh.yaml").write_text(MESH_YAML.format(host=MESH_HOST, ip=ENDPOINT_IP, http_port=http_port, grpc_port=grpc_port))
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "meshpatch"), "control-plane", "--config", str(config_dir), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("control plane did not start: " + (proc.stderr.read() if proc.stderr else ""))


def run_ab(xds: str, http_port: int, grpc_port: int, rounds: int, batch: int, hosts_file: str) -> dict:
    """The A/B client's medians: {library: {"wall"|"cpu": {mode: microseconds}}}."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHPATCH_", "GRPC_XDS"))}
    env["MESHPATCH_XDS_SERVER"] = xds
    cmd = [str(BIN / "meshpatch-run"), str(BIN / "python"), str(ROOT / "bench" / "_ab_client.py"), ENDPOINT_IP,
           MESH_HOST, str(http_port), str(grpc_port), f"http://{MESH_HOST}:80/r", f"{MESH_HOST}:7070", str(rounds),
           str(batch)]
    if hosts_file:
        cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', hosts_file] + cmd + ["with-name"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"A/B client failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def name_resolution_works(hosts_file: str) -> bool:
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/hosts && getent hosts ' + MESH_HOST, hosts_file],
                           capture_output=True, text=True)
    return probe.returncode == 0 and ENDPOINT_IP in probe.stdout


def startup_ms(pythons: dict, runs: int) -> dict:
    """Median wall time of ``python -c pass`` per configuration, interleaved run
    by run so that machine load drifts affect every configuration alike."""
    samples: dict = {name: [] for name in pythons}
    for _ in range(runs):
        for name, (python, env) in pythons.items():
            start = time.perf_counter()
            subprocess.run([python, "-c", "pass"], env=env, check=True)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def isolated_venvs(tmp: Path) -> tuple:
    """A bare venv, and an identical one with only the meshpatch wheel added
    (no dependencies: with the agent off or idle nothing else is imported)."""
    bare = tmp / "bare"
    with_mp = tmp / "with-meshpatch"
    wheels = tmp / "wheels"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(with_mp)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)], check=True,
                   stdout=subprocess.DEVNULL)
    site = subprocess.run([str(with_mp / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    wheel = next(wheels.glob("meshpatch-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)], check=True,
                   stdout=subprocess.DEVNULL)
    return str(bare / "bin" / "python"), str(with_mp / "bin" / "python")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=200, help="rounds (each mode once, shuffled) per library")
    parser.add_argument("--batch", type=int, default=20, help="calls per mode per round")
    parser.add_argument("--startup-runs", type=int, default=40)
    args = parser.parse_args()

    http_server, http_port, grpc_server, grpc_port = start_servers()
    with tempfile.TemporaryDirectory() as tmp:
        cp, xds = start_control_plane(Path(tmp), http_port, grpc_port)
        try:
            hosts_file = str(Path(tmp) / "hosts")
            Path(hosts_file).write_text(f"127.0.0.1 localhost\n{ENDPOINT_IP} {MESH_HOST}\n")
            if not name_resolution_works(hosts_file):
                hosts_file = ""
            result = run_ab(xds, http_port, grpc_port, args.rounds, args.batch, hosts_file)
        finally:
            cp.terminate()
            cp.wait(10)
    http_server.shutdown()
    grpc_server.stop(None)

    calls = args.rounds * args.batch
    print(f"latency per call, loopback, keep-alive, one process, {args.rounds} rounds of {args.batch}-call batches "
          f"per mode in shuffled order ({calls} calls per mode; microseconds)")
    has_name = bool(hosts_file)
    print(f"  {'library':9} {'':5} {'direct IP':>10} " + (f"{'by name':>9} " if has_name else "") + f"{'meshpatch':>10}"
          f" {'added vs IP':>18}" + (f" {'added vs name':>18}" if has_name else ""))
    for lib in ("requests", "httpx", "grpc"):
        for kind in ("wall", "cpu"):
            med = result[lib][kind]
            paired = result[lib]["paired"][kind]
            d, m = med["direct"], med["mesh"]
            line = f"  {lib if kind == 'wall' else '':9} {kind:5} {d:10.1f} " + (f"{med['name']:9.1f} " if has_name else "")
            added = paired["mesh-direct"]
            line += f"{m:10.1f} {added:+10.1f} ({100 * added / d:+5.1f}%)"
            if has_name:
                added = paired["mesh-name"]
                line += f" {added:+10.1f} ({100 * added / med['name']:+5.1f}%)"
            print(line)
    print("  direct IP / by name / meshpatch: median per call.  added: median over rounds of the difference between")
    print("  two modes' batch medians in the same round (paired, so the machine's drift cancels).")
    print("  wall: latency by the clock; cpu: the calling thread's CPU time per call (client work only).")
    if has_name:
        print("  by name = the unpatched client calling the mesh hostname resolved by the system; the mesh column")
        print("  adds meshpatch routing on top of exactly that, so 'added vs name' is meshpatch's own cost.")

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHPATCH_", "GRPC_XDS", "PYTHONPATH"))}
    with tempfile.TemporaryDirectory() as tmp:
        bare_python, mp_python = isolated_venvs(Path(tmp))
        configs = {
            "bare venv (no meshpatch installed)": (bare_python, base_env),
            "same venv + meshpatch, agent off": (mp_python, base_env),
            "same venv + meshpatch, MESHPATCH_ENABLED=1": (mp_python, dict(base_env, MESHPATCH_ENABLED="1")),
        }
        startup_ms(configs, 5)  # warm the page cache
        results = startup_ms(configs, args.startup_runs)
    print(f"interpreter start-up, python -c pass, median of {args.startup_runs} interleaved runs")
    base = results["bare venv (no meshpatch installed)"]
    for name, value in results.items():
        print(f"  {name:44} {value:7.2f} ms  ({value - base:+.2f} ms)")


if __name__ == "__main__":
    main()
