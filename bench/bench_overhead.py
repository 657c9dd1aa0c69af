"""Added latency per call and interpreter start-up cost, side by side in one run.

Latency: the same unmodified client (bench/_client.py) calls the same loopback
endpoint twice — directly by IP, and by mesh name under ``meshpatch-run`` with
the local control plane routing the name to that endpoint.  Rounds alternate
(direct, mesh, direct, mesh, ...) and the median of the per-round medians is
reported, to cancel drift on a shared 2-core machine.

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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENDPOINT_IP = "127.0.0.2"
MESH_HOST = "bench.default.svc.cluster.local"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without TCP_NODELAY Nagle
        # plus the client's delayed ACK adds ~40 ms to every keep-alive call.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = b'{"ok":true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


def run_client(mode: str, url: str, target: str, calls: int, xds: str, hosts_file: str = "") -> dict:
    """mode: ``direct`` (by IP), ``name`` (by mesh name, resolved by the system
    through a private /etc/hosts: what the app pays without meshpatch), ``mesh``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHPATCH_", "GRPC_XDS"))}
    cmd = [str(BIN / "python"), str(ROOT / "bench" / "_client.py"), url, target, str(calls)]
    if mode == "mesh":
        env["MESHPATCH_XDS_SERVER"] = xds
        cmd = [str(BIN / "meshpatch-run")] + cmd
    elif mode == "name":
        script = 'mount --bind "$0" /etc/hosts && exec "$@"'
        cmd = ["unshare", "-m", "sh", "-c", script, hosts_file] + cmd
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"client failed ({mode}):\n{out.stderr}")
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
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--startup-runs", type=int, default=40)
    args = parser.parse_args()

    http_server, http_port, grpc_server, grpc_port = start_servers()
    with tempfile.TemporaryDirectory() as tmp:
        cp, xds = start_control_plane(Path(tmp), http_port, grpc_port)
        try:
            direct_url, direct_target = f"http://{ENDPOINT_IP}:{http_port}/r", f"{ENDPOINT_IP}:{grpc_port}"
            mesh_url, mesh_target = f"http://{MESH_HOST}:80/r", f"{MESH_HOST}:7070"
            hosts_file = str(Path(tmp) / "hosts")
            Path(hosts_file).write_text(f"127.0.0.1 localhost\n{ENDPOINT_IP} {MESH_HOST}\n")
            modes = ["direct", "mesh"] + (["name"] if name_resolution_works(hosts_file) else [])
            urls = {"direct": (direct_url, direct_target), "mesh": (mesh_url, mesh_target),
                    "name": (f"http://{MESH_HOST}:{http_port}/r", f"{MESH_HOST}:{grpc_port}")}
            rounds: dict = {mode: [] for mode in modes}
            for _ in range(args.rounds):
                for mode in modes:
                    url, target = urls[mode]
                    rounds[mode].append(run_client(mode, url, target, args.calls, xds, hosts_file))
        finally:
            cp.terminate()
            cp.wait(10)
    http_server.shutdown()
    grpc_server.stop(None)

    print(f"latency per call, loopback, keep-alive, median of {args.rounds} rounds x {args.calls} calls (microseconds)")
    has_name = "name" in rounds
    header = f"  {'library':9} {'direct IP':>10} " + (f"{'by name':>9} " if has_name else "") + f"{'meshpatch':>10} {'added vs IP':>12}"
    print(header + (f" {'added vs name':>14}" if has_name else ""))
    for lib in ("requests", "httpx", "grpc"):
        med = {mode: statistics.median(r[lib]["median"] for r in rounds[mode]) for mode in rounds}
        d, m = med["direct"], med["mesh"]
        line = f"  {lib:9} {d:10.1f} " + (f"{med['name']:9.1f} " if has_name else "") + f"{m:10.1f} {m - d:+8.1f} ({100 * (m - d) / d:+.1f}%)"
        if has_name:
            n = med["name"]
            line += f" {m - n:+8.1f} ({100 * (m - n) / n:+.1f}%)"
        print(line)
    if has_name:
        print("  (by name = the same unmodified client calling the mesh hostname resolved by the system; the mesh column")
        print("   adds meshpatch routing on top of exactly that, so 'added vs name' is meshpatch's own cost)")

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
