"""Added latency of an mTLS call vs a plaintext call, both through meshpatch.

The same unmodified client (bench/_client.py: one requests Session, one httpx
Client, one grpc channel — connection reuse on) calls two mesh names served by
the local control plane:

* ``plain.default.svc.cluster.local`` → plaintext HTTP / gRPC servers;
* ``secure.default.svc.cluster.local`` → the same handlers behind TLS servers
  that require a client certificate; a DestinationRule says ISTIO_MUTUAL, so
  meshpatch originates mTLS with the bootstrap's certificates and checks the
  server's SPIFFE ID.

Rounds alternate (plain, secure, plain, …); the median of per-round medians
and p90s is reported, and the difference is what mTLS adds per call on an
open connection (handshakes happen in the warm-up).  Needs the test extras
(cryptography).  Run in a loopback-only netns:

    unshare -n sh -c 'ip link set lo up && .venv/bin/python bench/bench_mtls.py'
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
from concurrent import futures
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Dict, List, Tuple

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from meshpatch.controlplane import ControlPlaneServer  # noqa: E402
from meshpatch.security.providers import pem_file  # noqa: E402
from tests.support.pki import MeshCA, with_certificate_providers  # noqa: E402
from _mesh import OkHandler as _Handler  # noqa: E402

BIN = Path(sys.executable).parent
PLAIN, SECURE = "plain.default.svc.cluster.local", "secure.default.svc.cluster.local"


def servers(ip: str, workload: Any = None) -> Tuple[int, int]:
    """An HTTP and a gRPC echo server on ``ip``; mTLS (client cert required) with ``workload``."""
    http = ThreadingHTTPServer((ip, 0), _Handler)
    if workload is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with pem_file(workload.chain_pem, workload.key_pem) as path:
            context.load_cert_chain(path)
        context.load_verify_locations(cadata=workload.root_pem.decode())
        context.verify_mode = ssl.CERT_REQUIRED
        http.socket = context.wrap_socket(http.socket, server_side=True)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Call": grpc.unary_unary_rpc_method_handler(lambda request, context: request)})
    server.add_generic_rpc_handlers((handler,))
    if workload is None:
        port = server.add_insecure_port(f"{ip}:0")
    else:
        credentials = grpc.ssl_server_credentials([(workload.key_pem, workload.chain_pem)],
                                                  root_certificates=workload.root_pem, require_client_auth=True)
        port = server.add_secure_port(f"{ip}:0", credentials)
    server.start()
    servers.keep.append(server)  # type: ignore[attr-defined]
    return http.server_address[1], port


servers.keep = []  # type: ignore[attr-defined]


def mesh_yaml(plain: Tuple[int, int], secure: Tuple[int, int]) -> str:
    def entry(name: str, host: str, ip: str, ports: Tuple[int, int]) -> str:
        return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}, {{number: 7070, name: grpc, protocol: GRPC}}]
  endpoints: [{{address: {ip}, serviceAccount: {name}, ports: {{http: {ports[0]}, grpc: {ports[1]}}}}}]
---"""

    return (entry("plain", PLAIN, "127.0.0.2", plain) + entry("secure", SECURE, "127.0.0.3", secure) + f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: default}}
spec:
  host: {SECURE}
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
""")


def run_client(env: Dict[str, str], host: str, calls: int) -> Dict[str, Any]:
    command = [str(BIN / "meshpatch-run"), str(BIN / "python"), str(ROOT / "bench" / "_client.py"),
               f"http://{host}/", f"{host}:7070", str(calls)]
    with tempfile.TemporaryDirectory() as scratch:
        out = subprocess.run(command, env=env, cwd=scratch, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"client failed ({host}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="meshpatch-bench-mtls-"))
    ca = MeshCA()
    client_certs = ca.workload_dir(tmp / "client", "default", "client")
    plain = servers("127.0.0.2")
    secure = servers("127.0.0.3", ca.issue("default", "secure"))
    cp = ControlPlaneServer(listen="127.0.0.1:0").start()
    cp.set_yaml(mesh_yaml(plain, secure))
    bootstrap = {
        "xds_servers": [{"server_uri": cp.address, "channel_creds": [{"type": "insecure"}]}],
        "node": {"id": "sidecar~127.0.0.1~bench.default~default.svc.cluster.local",
                 "metadata": {"GENERATOR": "grpc", "NAMESPACE": "default"}},
    }
    (tmp / "bootstrap.json").write_text(json.dumps(with_certificate_providers(bootstrap, client_certs)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHPATCH_") and k != "PYTHONPATH"}
    env.update({"GRPC_XDS_BOOTSTRAP": str(tmp / "bootstrap.json"), "MESHPATCH_RESOLVE_TIMEOUT": "10"})

    rounds: Dict[str, List[Dict[str, Any]]] = {"plaintext": [], "mtls": []}
    for index in range(args.rounds):
        for label, host in (("plaintext", PLAIN), ("mtls", SECURE)):
            rounds[label].append(run_client(env, host, args.calls))
        print(f"round {index + 1}/{args.rounds} done", file=sys.stderr)
    cp.stop()

    print(f"{'library':10} {'plaintext p50':>14} {'mTLS p50':>10} {'added p50':>10} {'plaintext p90':>14} "
          f"{'mTLS p90':>10} {'added p90':>10}   (microseconds per call, {args.rounds} rounds x {args.calls} calls)")
    for library in ("requests", "httpx", "grpc"):
        row = {}
        for label in ("plaintext", "mtls"):
            for stat in ("median", "p90"):
                row[(label, stat)] = statistics.median(r[library][stat] for r in rounds[label])
        print(f"{library:10} {row[('plaintext', 'median')]:14.0f} {row[('mtls', 'median')]:10.0f} "
              f"{row[('mtls', 'median')] - row[('plaintext', 'median')]:10.0f} {row[('plaintext', 'p90')]:14.0f} "
              f"{row[('mtls', 'p90')]:10.0f} {row[('mtls', 'p90')] - row[('plaintext', 'p90')]:10.0f}")


if __name__ == "__main__":
    main()
