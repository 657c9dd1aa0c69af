"""Load-balancing test rig: real xDS into the real router, and servers that misbehave.

``LbMesh`` serves one host (``svc:80``) routed to one cluster through a real
scripted ADS server, so the cluster config a test writes as protobuf goes
through the decoder, the xDS client and the ``ClusterHandle`` exactly as in
an app.  ``attempt`` makes a real HTTP call to a picked endpoint and reports
it through ``Pick.started`` / ``Pick.finished`` the way the hooks do.

``misbehaving_server`` is an HTTP server on a loopback address whose answer
the test switches at run time: ``ok``, an HTTP status (``503``), ``reset``
(RST instead of a response), ``slow:<seconds>`` or ``every:<n>:<status>``.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from envoy.config.cluster.v3 import cluster_pb2

from meshpatch.bootstrap import Bootstrap, XdsServer
from meshpatch.routing.outcome import CONNECT_FAILURE, OK, RESET, TIMEOUT, Outcome
from meshpatch.routing.router import Router
from meshpatch.xds.client import XdsClient
from meshpatch.xds.transport import Backoff, GrpcAdsTransport
from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS
from tests.support import xds_resources as res
from tests.support.scripted_ads import ScriptedAds

HOST = "svc"
PORT = 80
CLUSTER = "outbound|80||svc.default.svc.cluster.local"
RDS_NAME = "outbound|80||svc"
NODE_ID = "sidecar~127.0.0.1~client.default~default.svc.cluster.local"


def cluster(lb: int = cluster_pb2.Cluster.ROUND_ROBIN, name: str = CLUSTER) -> cluster_pb2.Cluster:
    return res.cluster(name, lb=lb)


class LbMesh:
    """One mesh host → one cluster, over real xDS; ``push_*`` changes it live."""

    def __init__(self) -> None:
        self.ads = ScriptedAds().start()
        boot = Bootstrap([XdsServer(self.ads.address, "insecure", {}, [])],
                         {"id": NODE_ID, "metadata": {"GENERATOR": "grpc", "NAMESPACE": "default"}}, {}, None, "test")

        def transport(*args: object) -> GrpcAdsTransport:
            return GrpcAdsTransport(*args, backoff=Backoff(initial=0.05, maximum=0.2))  # type: ignore[arg-type]

        self.client = XdsClient(boot, transport_factory=transport)
        self.router = Router(self.client, 5.0, self.client.start)
        self._version = 1

    def serve(self, cluster_proto: cluster_pb2.Cluster, cla: Any, hash_header: Optional[str] = None) -> "LbMesh":
        route = res.route("/", cluster=cluster_proto.name)
        if hash_header:
            route.route.hash_policy.add().header.header_name = hash_header
        self.ads.serve({
            LDS: {f"{HOST}:{PORT}": res.listener(f"{HOST}:{PORT}", RDS_NAME)},
            RDS: {RDS_NAME: res.route_config(RDS_NAME, [("vh", [HOST, f"{HOST}:{PORT}"], [route])])},
            CDS: {cluster_proto.name: cluster_proto},
            EDS: {cluster_proto.eds_cluster_config.service_name: cla},
        }, "1")
        self.router.prefetch(HOST, PORT)
        target = self.router.targets()[f"{HOST}:{PORT}"]
        if not target.ready.wait(5):
            raise TimeoutError("mesh host did not resolve")
        return self

    @property
    def handle(self) -> Any:
        return self.router.clusters.get(CLUSTER)

    def _push(self, type_url: str, resource: Any) -> None:
        self._version += 1
        version = str(self._version)
        stream = self.ads.streams[-1]
        count = len(stream.requests)
        self.ads.respond(type_url, [resource], version, stream=stream)
        ack = self.ads.wait_request(type_url, lambda r: r.response_nonce != "" and (r.version_info == version or r.HasField("error_detail")), after=count)
        if ack.HasField("error_detail"):
            raise ValueError(ack.error_detail.message)

    def push_eds(self, cla: Any) -> None:
        self._push(EDS, cla)

    def push_cds(self, cluster_proto: cluster_pb2.Cluster) -> None:
        self._push(CDS, cluster_proto)

    def pick(self, headers: Optional[Dict[str, str]] = None, scheme: str = "http") -> Any:
        return self.router.pick(scheme, HOST, PORT, "GET", "/", headers)

    def stop(self) -> None:
        self.client.stop()
        self.ads.stop()


@contextlib.contextmanager
def lb_mesh() -> Iterator[LbMesh]:
    mesh = LbMesh()
    try:
        yield mesh
    finally:
        mesh.stop()


def http_outcome(address: str, port: int, timeout: float = 2.0) -> Tuple[Outcome, Optional[str]]:
    """One real HTTP/1.1 GET; the result as the hooks would classify it, and the body."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        try:
            conn.connect()
        except (ConnectionRefusedError, OSError) as exc:
            if isinstance(exc, socket.timeout):
                return Outcome(TIMEOUT), None
            return Outcome(CONNECT_FAILURE), None
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            body = response.read().decode()
        except socket.timeout:
            return Outcome(TIMEOUT), None
        except (ConnectionResetError, http.client.RemoteDisconnected, BrokenPipeError):
            return Outcome(RESET), None
        return Outcome(OK, response.status), body
    finally:
        conn.close()


def attempt(pick: Any, timeout: float = 2.0) -> Outcome:
    """Report one real call to ``pick`` through the attempt API, as a hook does."""
    pick.started()
    outcome = Outcome(CONNECT_FAILURE)
    try:
        outcome, _ = http_outcome(pick.address, pick.port, timeout)
    finally:
        pick.finished(outcome)
    return outcome


class Misbehaving:
    def __init__(self, host: str, port: int, mode: str) -> None:
        self.host = host
        self.port = port
        self.mode = mode
        self.hits = 0
        self._lock = threading.Lock()

    def count(self) -> int:
        with self._lock:
            self.hits += 1
            return self.hits


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        state: Misbehaving = self.server.state  # type: ignore[attr-defined]
        hit = state.count()
        mode = state.mode
        if mode.startswith("every:"):  # every:<n>:<status>: each n-th answer is <status>, the rest 200
            _, n, status = mode.split(":")
            mode = status if hit % int(n) == 0 else "ok"
        if mode == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()
            return
        if mode.startswith("slow:"):
            time.sleep(float(mode[5:]))
            mode = "200"
        status = 200 if mode == "ok" else int(mode)
        body = f"{state.host}:{state.port}".encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True


@contextlib.contextmanager
def misbehaving_server(host: str, mode: str = "ok") -> Iterator[Misbehaving]:
    server = _Server((host, 0), _Handler)
    state = Misbehaving(host, server.server_address[1], mode)
    server.state = state  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextlib.contextmanager
def servers(specs: Sequence[Tuple[str, str]]) -> Iterator[List[Misbehaving]]:
    """Several misbehaving servers: ``[(host, mode), ...]``."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(misbehaving_server(host, mode)) for host, mode in specs]


def refused_port(host: str) -> int:
    """A port on ``host`` nothing listens on (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


_DURATIONS = ("interval", "base_ejection_time", "max_ejection_time", "max_ejection_time_jitter")


def with_outlier(cluster_proto: cluster_pb2.Cluster, **fields: Any) -> cluster_pb2.Cluster:
    """Set ``outlier_detection`` fields (durations in seconds, others as values)."""
    od = cluster_proto.outlier_detection
    od.SetInParent()
    for name, value in fields.items():
        if name in _DURATIONS:
            getattr(od, name).FromMilliseconds(int(value * 1000))
        elif name == "split_external_local_origin_errors":
            od.split_external_local_origin_errors = value
        else:
            getattr(od, name).value = value
    return cluster_proto


def with_breakers(cluster_proto: cluster_pb2.Cluster, **fields: int) -> cluster_pb2.Cluster:
    threshold = cluster_proto.circuit_breakers.thresholds.add()
    for name, value in fields.items():
        getattr(threshold, name).value = value
    return cluster_proto


def endpoints_of(specs: Sequence[Misbehaving], priorities: Sequence[int] = ()) -> Any:
    """A ClusterLoadAssignment for these servers (one locality per priority)."""
    by_priority: Dict[int, List[Tuple[str, int]]] = {}
    for index, server in enumerate(specs):
        by_priority.setdefault(priorities[index] if priorities else 0, []).append((server.host, server.port))
    groups = sorted(by_priority.items())
    first_priority, first = groups[0]
    extra = [(("r", f"z{p}", ""), 1, p, eps) for p, eps in groups[1:]]
    return res.cla(CLUSTER, first, priority=first_priority, extra_groups=extra)
