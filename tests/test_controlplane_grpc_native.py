"""Cross-check: grpcio's own xDS client must accept our resources and route as istiod's would.

The control plane and two echo "pods" (127.0.0.2, 127.0.0.3) run in this
process; the xDS client runs in a subprocess (GRPC_XDS_BOOTSTRAP is process
global) driven line by line over stdin/stdout so the test can change the
config between batches of calls.  ``xds:///`` targets never touch DNS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from concurrent import futures
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import grpc
import pytest
from scipy.stats import chisquare

from tests.support.controlplane import LDS, RDS, ControlPlane, control_plane, write_bootstrap

CLIENT = r"""
import json, sys
from collections import Counter
import grpc

channels = {}
for line in sys.stdin:
    cmd = json.loads(line)
    target = cmd["target"]
    ch = channels.get(target) or channels.setdefault(target, grpc.insecure_channel(target))
    call = ch.unary_unary("/echo.Echo/Call")
    counts = Counter()
    for _ in range(cmd["n"]):
        try:
            reply = call(b"ping", timeout=cmd.get("timeout", 10), wait_for_ready=True, metadata=cmd.get("md") or None)
            counts[reply.decode()] += 1
        except grpc.RpcError as exc:
            counts["error:" + exc.code().name] += 1
    print(json.dumps(counts), flush=True)
"""


def _mesh_yaml(p1: int, p2: int, weights: Tuple[int, int] = (20, 80)) -> str:
    return f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7070, name: grpc, protocol: GRPC}}]
  endpoints:
  - {{address: 127.0.0.2, ports: {{grpc: {p1}}}, labels: {{app: echo, version: v1}}}}
  - {{address: 127.0.0.3, ports: {{grpc: {p2}}}, labels: {{app: echo, version: v2}}}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {{name: echo}}
spec:
  host: echo.default.svc.cluster.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: echo}}
spec:
  hosts: [echo.default.svc.cluster.local]
  http:
  - name: pinned
    match:
    - headers: {{x-version: {{exact: v1}}}}
    route:
    - destination: {{host: echo.default.svc.cluster.local, subset: v1}}
  - name: split
    route:
    - destination: {{host: echo.default.svc.cluster.local, subset: v1, port: {{number: 7070}}}}
      weight: {weights[0]}
    - destination: {{host: echo.default.svc.cluster.local, subset: v2, port: {{number: 7070}}}}
      weight: {weights[1]}
"""


def _echo_server(ip: str, name: str) -> Tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Call": grpc.unary_unary_rpc_method_handler(lambda req, ctx: name.encode())}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(f"{ip}:0")
    server.start()
    return server, port


class XdsClientProcess:
    def __init__(self, bootstrap: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHPATCH_", "GRPC_XDS_"))}
        env["GRPC_XDS_BOOTSTRAP"] = bootstrap
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=env,
        )

    def calls(self, target: str, n: int, md: Optional[List[Tuple[str, str]]] = None, timeout: float = 10) -> Counter:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps({"target": target, "n": n, "md": md, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"xDS client died: {self.proc.stderr.read() if self.proc.stderr else ''}")
        return Counter(json.loads(line))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture()
def mesh(tmp_path: Path) -> Iterator[Tuple[ControlPlane, XdsClientProcess, Tuple[int, int]]]:
    s1, p1 = _echo_server("127.0.0.2", "v1")
    s2, p2 = _echo_server("127.0.0.3", "v2")
    try:
        with control_plane(_mesh_yaml(p1, p2)) as cp:
            client = XdsClientProcess(write_bootstrap(str(tmp_path / "bootstrap.json"), cp.address))
            try:
                yield cp, client, (p1, p2)
            finally:
                client.close()
    finally:
        s1.stop(0)
        s2.stop(0)


def _assert_split(counts: Counter, n: int, expected: Dict[str, float]) -> None:
    assert sum(counts.values()) == n and set(counts) <= set(expected), counts
    observed = [counts.get(k, 0) for k in expected]
    p = chisquare(observed, f_exp=[expected[k] * n for k in expected]).pvalue
    assert p > 0.001, f"split {counts} is not {expected} (chi-square p={p:.2g})"


def test_native_grpc_xds_client_routes_weighted_split_and_header_match(mesh) -> None:
    cp, client, _ = mesh
    n = 500
    counts = client.calls("xds:///echo.default.svc.cluster.local:7070", n)
    _assert_split(counts, n, {"v1": 0.2, "v2": 0.8})
    pinned = client.calls("xds:///echo.default.svc.cluster.local:7070", 50, md=[("x-version", "v1")])
    assert pinned == Counter({"v1": 50})
    assert cp.server.nacks == 0, cp.server.nack_errors
    assert cp.server.acks >= 4  # LDS, RDS, CDS, EDS all accepted


def test_native_grpc_short_name_and_reload_push(mesh) -> None:
    cp, client, (p1, p2) = mesh
    n = 300
    counts = client.calls("xds:///echo:7070", n)
    _assert_split(counts, n, {"v1": 0.2, "v2": 0.8})
    # grpcio subscribed the short name itself; the listener echoed it back.
    assert any("echo:7070" in s["subscriptions"].get(LDS, {}).get("names", []) for s in cp.server.streams())

    gen = cp.write(_mesh_yaml(p1, p2, weights=(0, 100)))
    version = cp.server.version
    # The push is on the wire; wait until the short-name client has applied (ACKed) the new routes.
    assert cp.server.wait_for(
        lambda: any(
            s["subscriptions"].get(RDS, {}).get("version_acked") == version
            for s in cp.server.streams()
            if "echo:7070" in s["subscriptions"].get(LDS, {}).get("names", [])
        ),
        timeout=5,
    ), cp.server.streams()
    assert gen == cp.server.generation
    assert client.calls("xds:///echo:7070", 50) == Counter({"v2": 50})
    assert cp.server.nacks == 0, cp.server.nack_errors


def test_native_grpc_client_nack_is_recorded_with_reason(mesh) -> None:
    """grpcio (C-core) rejects LEAST_REQUEST clusters (xds-istio.md §2): the NACK
    must reach the control plane's counters with the client's reason."""
    cp, client, (p1, p2) = mesh
    assert client.calls("xds:///echo.default.svc.cluster.local:7070", 20).keys() <= {"v1", "v2"}
    assert cp.server.nacks == 0
    cp.write(_mesh_yaml(p1, p2) + """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo-lr, namespace: default}
spec:
  host: echo.default.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
""")
    assert cp.server.wait_for(lambda: cp.server.nacks >= 1, timeout=5), cp.server.stats()
    assert any(t.endswith("Cluster") for t, _ in cp.server.nack_errors)
    assert "LB policy is not supported" in cp.server.last_nack_error, cp.server.last_nack_error
