"""The xDS client and router against a real (scripted) ADS server on loopback."""

from __future__ import annotations

import collections
import time
from typing import Iterator

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from scipy.stats import chisquare

from meshpatch.api import NoHealthyUpstream
from meshpatch.bootstrap import Bootstrap, XdsServer
from meshpatch.routing.router import Router
from meshpatch.xds.client import ACKED, DOES_NOT_EXIST, NACKED, XdsClient
from meshpatch.xds.transport import Backoff, GrpcAdsTransport
from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS
from tests.support import xds_resources as res
from tests.support.scripted_ads import RecordingWatcher, ScriptedAds

FQDN = "echo.default.svc.cluster.local"
RDS_NAME = f"outbound|7070||{FQDN}"
V1 = f"outbound|7070|v1|{FQDN}"
V2 = f"outbound|7070|v2|{FQDN}"
NODE_ID = "sidecar~127.0.0.1~client.default~default.svc.cluster.local"


class Mesh:
    def __init__(self, ads: ScriptedAds, timeout: float = 3.0) -> None:
        boot = Bootstrap([XdsServer(ads.address, "insecure", {}, [])],
                         {"id": NODE_ID, "metadata": {"GENERATOR": "grpc", "NAMESPACE": "default"}}, {}, None, "test")

        def transport(*args: object) -> GrpcAdsTransport:
            return GrpcAdsTransport(*args, backoff=Backoff(initial=0.05, maximum=0.2))  # type: ignore[arg-type]

        self.client = XdsClient(boot, transport_factory=transport)
        self.router = Router(self.client, timeout, self._start)
        self._started = False

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self.client.start()


@pytest.fixture()
def ads() -> Iterator[ScriptedAds]:
    server = ScriptedAds().start()
    yield server
    server.stop()


@pytest.fixture()
def mesh(ads: ScriptedAds) -> Iterator[Mesh]:
    m = Mesh(ads)
    yield m
    m.client.stop()


def serve_chain(ads: ScriptedAds, weighted: bool = True) -> None:
    """Serve LDS → RDS → CDS → EDS the way istiod shapes them."""
    if weighted:
        routes = [res.route("/", weighted=[(V1, 20), (V2, 80)])]
    else:
        routes = [res.route("/", cluster=V1)]
    domains = [FQDN, f"{FQDN}:7070", "echo", "echo:7070"]
    ads.serve({
        LDS: {"echo:7070": res.listener("echo:7070", RDS_NAME)},
        RDS: {RDS_NAME: res.route_config(RDS_NAME, [(f"{FQDN}:7070", domains, routes)])},
        CDS: {V1: res.cluster(V1), V2: res.cluster(V2)},
        EDS: {V1: res.cla(V1, [("127.0.0.2", 8080)]), V2: res.cla(V2, [("127.0.0.3", 8080)])},
    })


def test_full_chain_weighted_split_and_acks(ads: ScriptedAds, mesh: Mesh) -> None:
    import threading

    serve_chain(ads)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("pick", mesh.router.pick("grpc", "echo", 7070, "POST", "/echo.Echo/Call")))
    t.start()
    t.join(5)
    assert result["pick"] is not None and result["pick"].address in ("127.0.0.2", "127.0.0.3")
    first = ads.streams[0].requests[0]
    assert first.node.id == NODE_ID and first.node.user_agent_name == "meshpatch"
    assert all(not r.HasField("node") for r in ads.streams[0].requests[1:])
    # every response ACKed with its version and nonce
    ack = ads.wait_request(EDS, lambda r: r.version_info == "v1" and r.response_nonce != "")
    assert not ack.HasField("error_detail")
    counts = collections.Counter(mesh.router.pick("grpc", "echo", 7070, "POST", "/x").address for _ in range(4000))  # type: ignore[union-attr]
    assert chisquare([counts["127.0.0.2"], counts["127.0.0.3"]], [800, 3200]).pvalue > 0.001, counts


def test_nack_keeps_valid_resources_and_last_good(ads: ScriptedAds, mesh: Mesh) -> None:
    serve_chain(ads, weighted=False)
    mesh.router.prefetch("echo", 7070)
    mesh.router.targets()["echo:7070"].ready.wait(3)
    assert mesh.router.pick("http", "echo", 7070, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
    ads.on_request = None
    # A response with one bad cluster (unsupported LB) and the good one changed: NACK naming the bad one,
    # the good one still applied, version stays at the last accepted one.
    bad = res.cluster("outbound|7070|bad|x", lb=cluster_pb2.Cluster.CLUSTER_PROVIDED)
    count = len(ads.streams[0].requests)
    good = res.cluster(V1)
    ads.respond(CDS, [good, bad], "v2")
    nack = ads.wait_request(CDS, lambda r: r.HasField("error_detail"), after=count)
    assert nack.version_info == "v1"
    assert "CLUSTER_PROVIDED" in nack.error_detail.message and "outbound|7070|bad|x" in nack.error_detail.message
    assert mesh.client.resource_status(CDS, V1) == ACKED
    assert mesh.router.pick("http", "echo", 7070, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
    # A broken route config: NACKed, previous routes stay in force.
    count = len(ads.streams[0].requests)
    broken = res.route_config(RDS_NAME, [("vh", ["echo:7070"], [res.route(regex="(unclosed", cluster=V1)])])
    ads.respond(RDS, [broken], "v3")
    nack = ads.wait_request(RDS, lambda r: r.HasField("error_detail"), after=count)
    assert "invalid regex" in nack.error_detail.message
    assert mesh.client.resource_status(RDS, RDS_NAME) == NACKED
    assert mesh.router.pick("http", "echo", 7070, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]


def test_unknown_host_negative_answer_is_fast_and_cached(ads: ScriptedAds, mesh: Mesh) -> None:
    import threading

    def answer() -> None:
        ads.wait_request(LDS, lambda r: "unknown.example:80" in r.resource_names)
        ads.respond(LDS, [], "v1")  # LDS is state of the world: absence = does not exist

    threading.Thread(target=answer, daemon=True).start()
    start = time.monotonic()
    assert mesh.router.pick("http", "unknown.example", 80, "GET", "/") is None
    assert time.monotonic() - start < 2.0
    assert mesh.client.resource_status(LDS, "unknown.example:80") == DOES_NOT_EXIST
    start = time.perf_counter()
    for _ in range(1000):
        assert mesh.router.pick("http", "unknown.example", 80, "GET", "/") is None
    assert time.perf_counter() - start < 0.5  # no network wait on later calls


def test_ip_literals_never_subscribe(ads: ScriptedAds, mesh: Mesh) -> None:
    assert mesh.router.pick("http", "127.0.0.9", 80, "GET", "/") is None
    assert mesh.router.pick("http", "::1", 80, "GET", "/") is None
    assert mesh.router.pick("http", "localhost", 80, "GET", "/") is None
    assert not ads.streams  # nothing even connected


def test_first_call_wait_is_bounded(ads: ScriptedAds) -> None:
    mesh = Mesh(ads, timeout=0.3)
    try:
        start = time.monotonic()
        assert mesh.router.pick("http", "silent", 80, "GET", "/") is None  # server never answers
        elapsed = time.monotonic() - start
        assert 0.25 <= elapsed < 1.5
        start = time.monotonic()
        assert mesh.router.pick("http", "silent", 80, "GET", "/") is None
        assert time.monotonic() - start < 0.05
    finally:
        mesh.client.stop()


def test_reconnect_resubscribes_and_keeps_cache(ads: ScriptedAds, mesh: Mesh) -> None:
    serve_chain(ads)
    mesh.router.prefetch("echo", 7070)
    mesh.router.targets()["echo:7070"].ready.wait(3)
    ads.wait_request(EDS, lambda r: r.version_info == "v1")
    ads.on_request = None
    ads.end_stream()  # server closes with OK: a normal end, reconnect at once
    ads.wait_for(lambda: len(ads.streams) >= 2, timeout=5)
    second = ads.wait_request(LDS, stream_index=1)
    assert second.HasField("node") and second.version_info == "v1" and second.response_nonce == ""
    for type_url, names in ((RDS, {RDS_NAME}), (CDS, {V1, V2}), (EDS, {V1, V2})):
        req = ads.wait_request(type_url, stream_index=1)
        assert set(req.resource_names) == names and req.version_info == "v1"
    # cached config keeps routing while the new stream has delivered nothing
    assert mesh.router.pick("http", "echo", 7070, "GET", "/") is not None


def test_cluster_deleted_means_no_healthy_upstream(ads: ScriptedAds, mesh: Mesh) -> None:
    serve_chain(ads, weighted=False)
    mesh.router.prefetch("echo", 7070)
    mesh.router.targets()["echo:7070"].ready.wait(3)
    ads.wait_request(EDS, lambda r: r.version_info == "v1")
    ads.on_request = None
    ads.respond(CDS, [], "v2")  # CDS is state of the world: V1 deleted
    ads.wait_request(CDS, lambda r: r.version_info == "v2")
    with pytest.raises(NoHealthyUpstream):
        mesh.router.pick("http", "echo", 7070, "GET", "/")
    # endpoints update flows through to picks
    ads.respond(CDS, [res.cluster(V1)], "v3")
    ads.respond(EDS, [res.cla(V1, [("127.0.0.4", 9000)])], "v3")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        try:
            pick = mesh.router.pick("http", "echo", 7070, "GET", "/")
            if pick is not None and pick.address == "127.0.0.4":
                break
        except NoHealthyUpstream:
            pass
        time.sleep(0.02)
    else:
        pytest.fail("new endpoints never reached the picker")


def test_absence_counts_only_for_names_the_server_had_seen(ads: ScriptedAds, mesh: Mesh) -> None:
    """A response built before the server saw a newly added name must not delete
    that name (the CDS race when a route's clusters are subscribed one by one).
    Only one initial request per type is in flight; later names ride on its ACK.
    A later response without the name is not proof either (it may be a push that
    crossed the ACK): the name is absent once the server leaves that response's
    ACK unanswered for the settle time."""
    recorder = RecordingWatcher()
    mesh.client.absence_settle = 0.5
    mesh.client.start()
    with mesh.client.lock:
        mesh.client.watch(CDS, "a", recorder)
    first = ads.wait_request(CDS, lambda r: list(r.resource_names) == ["a"])
    with mesh.client.lock:
        mesh.client.watch(CDS, "b", recorder)
    time.sleep(0.1)
    assert [list(r.resource_names) for r in ads.streams[0].requests if r.type_url == CDS] == [["a"]]
    assert first.response_nonce == ""
    ads.respond(CDS, [res.cluster("a")], "1")  # answers the first request, which only named "a"
    ack = ads.wait_request(CDS, lambda r: r.version_info == "1")
    assert set(ack.resource_names) == {"a", "b"}
    assert mesh.client.resource_status(CDS, "b") != DOES_NOT_EXIST
    assert ("missing", "b") not in recorder.events
    ads.respond(CDS, [res.cluster("a")], "2")  # answers the ACK, which named "b" (or crossed it)
    ads.wait_request(CDS, lambda r: r.version_info == "2")
    acked = time.monotonic()
    assert mesh.client.resource_status(CDS, "b") == "REQUESTED"  # the server may still answer for "b"
    while mesh.client.resource_status(CDS, "b") != DOES_NOT_EXIST and time.monotonic() - acked < 5:
        time.sleep(0.01)
    assert mesh.client.resource_status(CDS, "b") == DOES_NOT_EXIST  # it did not: "b" does not exist
    assert time.monotonic() - acked >= 0.4
    assert ("missing", "b") in recorder.events and ("resource", "a") in recorder.events
