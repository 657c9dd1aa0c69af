"""SotW ADS transport behaviour of the control plane (xds-istio.md §3.7, §4), over real gRPC."""

from __future__ import annotations

import re
import time
from typing import Iterator, List

import grpc
import pytest

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from meshpatch.controlplane import ControlPlaneServer
from meshpatch.internal import suppressed
from tests.support.controlplane import CDS, EDS, LDS, RDS, AdsClient, ControlPlane, decode

FQDN = "echo.default.svc.cluster.local"


def _mesh(hosts: List[str], weight_v2: int = 80) -> str:
    docs = []
    for i, h in enumerate(hosts):
        docs.append(f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: se{i}}}
spec:
  hosts: [{h}]
  resolution: STATIC
  ports: [{{number: 7070, name: grpc, protocol: GRPC}}]
  endpoints:
  - {{address: 127.0.0.2, labels: {{version: v1}}}}
  - {{address: 127.0.0.3, labels: {{version: v2}}}}
""")
    docs.append(f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo}}
spec:
  host: {FQDN}
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo}}
spec:
  hosts: [{FQDN}]
  http:
  - route:
    - {{destination: {{host: {FQDN}, subset: v1}}, weight: {100 - weight_v2}}}
    - {{destination: {{host: {FQDN}, subset: v2}}, weight: {weight_v2}}}
""")
    return "\n---\n".join(docs)


HOSTS = [FQDN, "a.default.svc.cluster.local", "b.default.svc.cluster.local"]
VERSION = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ/(\d+)")


@pytest.fixture()
def cp() -> Iterator[ControlPlane]:
    with ControlPlane(_mesh(HOSTS)) as plane:
        yield plane


def _ack(c: AdsClient, resp: discovery_pb2.DiscoveryResponse, names: List[str]) -> None:
    c.send(resp.type_url, names, version=resp.version_info, nonce=resp.nonce)


def test_version_and_nonce_format(cp: ControlPlane) -> None:
    with AdsClient(cp.address) as c:
        c.send(LDS, ["echo:7070"])
        r1 = c.recv()
        c.send(CDS, [f"outbound|7070||{FQDN}"])
        r2 = c.recv()
    m = VERSION.fullmatch(r1.version_info)
    assert m and int(m.group(1)) == cp.server.generation
    assert r2.version_info == r1.version_info  # one version per config, shared by all types
    for r in (r1, r2):
        assert r.nonce.startswith(r.version_info)
        assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", r.nonce[len(r.version_info):])
        assert not r.HasField("control_plane")
    assert r1.nonce != r2.nonce


def test_ack_gets_no_response_and_is_counted(cp: ControlPlane) -> None:
    with AdsClient(cp.address) as c:
        c.send(LDS, ["echo:7070"])
        r = c.recv()
        _ack(c, r, ["echo:7070"])
        assert c.no_response()
        assert cp.server.wait_for(lambda: cp.server.acks == 1, 2)
        (stream,) = cp.server.streams()
        assert stream["subscriptions"][LDS]["version_acked"] == r.version_info


def test_nack_is_logged_counted_and_not_answered(cp: ControlPlane, caplog) -> None:
    with AdsClient(cp.address) as c:
        c.send(CDS, [f"outbound|7070|v1|{FQDN}"])
        r = c.recv()
        with caplog.at_level("WARNING", logger="meshpatch.controlplane"):
            # NACK that also names another cluster: istiod neither answers nor adopts the names.
            c.nack(r, [f"outbound|7070|v1|{FQDN}", f"outbound|7070|v2|{FQDN}"], "bad cluster: no thanks")
            assert c.no_response()
        assert cp.server.nacks == 1 and cp.server.last_nack_error == "bad cluster: no thanks"
        assert cp.server.nack_errors == [(CDS, "bad cluster: no thanks")]
        assert any("NACK" in rec.getMessage() and "bad cluster: no thanks" in rec.getMessage() for rec in caplog.records)
        (stream,) = cp.server.streams()
        assert stream["subscriptions"][CDS]["last_error"] == "bad cluster: no thanks"
        assert stream["subscriptions"][CDS]["names"] == [f"outbound|7070|v1|{FQDN}"]
        # A later ACK with the new names is answered with the full set.
        _ack(c, r, [f"outbound|7070|v1|{FQDN}", f"outbound|7070|v2|{FQDN}"])
        assert sorted(decode(c.recv())) == sorted([f"outbound|7070|v1|{FQDN}", f"outbound|7070|v2|{FQDN}"])


def test_stale_nonce_is_ignored(cp: ControlPlane) -> None:
    with AdsClient(cp.address) as c:
        c.send(LDS, ["echo:7070"])
        r1 = c.recv()
        _ack(c, r1, ["echo:7070", "a:7070"])
        r2 = c.recv()
        assert sorted(decode(r2)) == ["a:7070", "echo:7070"]
        # Answer to r1 again (stale nonce) with yet another name set: ignored entirely.
        _ack(c, r1, ["b:7070"])
        assert c.no_response()
        assert cp.server.stale_nonces == 1
        assert cp.server.streams()[0]["subscriptions"][LDS]["names"] == ["echo:7070", "a:7070"]


def test_lds_cds_resend_full_set_on_any_change(cp: ControlPlane) -> None:
    with AdsClient(cp.address) as c:
        c.send(LDS, ["echo:7070", "a:7070", "b:7070"])
        r = c.recv()
        _ack(c, r, ["echo:7070", "b:7070"])  # removal only: LDS answers with the remaining set
        r = c.recv()
        assert sorted(decode(r)) == ["b:7070", "echo:7070"]
        c.send(CDS, [f"outbound|7070|v1|{FQDN}", f"outbound|7070|v2|{FQDN}"])
        r = c.recv()
        _ack(c, r, [f"outbound|7070|v2|{FQDN}"])
        assert list(decode(c.recv())) == [f"outbound|7070|v2|{FQDN}"]
        _ack(c, c.last[LDS], [])  # LDS names were sent before: empty now means "none", not wildcard
        r = c.recv()
        assert r.type_url == LDS and list(r.resources) == []


def test_rds_eds_answer_only_when_names_are_added(cp: ControlPlane) -> None:
    n1, n2 = f"outbound|7070||{FQDN}", "outbound|7070||a.default.svc.cluster.local"
    with AdsClient(cp.address) as c:
        c.send(RDS, [])  # nothing to watch: no answer
        assert c.no_response(0.2)
        c.send(RDS, [n1])
        r = c.recv()
        _ack(c, r, [n1, n2])
        r = c.recv()
        assert sorted(decode(r)) == sorted([n1, n2])  # full watched set
        _ack(c, r, [n2])  # removal only: no answer
        assert c.no_response()
        c.send(EDS, [f"outbound|7070|v1|{FQDN}"])
        r = c.recv()
        _ack(c, r, [])
        assert c.no_response()
        assert cp.server.streams()[0]["subscriptions"][RDS]["names"] == [n2]


def test_request_without_nonce_is_treated_as_initial(cp: ControlPlane) -> None:
    with AdsClient(cp.address) as c:
        c.send(LDS, ["echo:7070"])
        r = c.recv()
        c.send(LDS, ["echo:7070"], version=r.version_info)  # no nonce: a client restarting its watch
        r2 = c.recv()
        assert list(decode(r2)) == ["echo:7070"] and r2.nonce != r.nonce


def _subscribe_all(c: AdsClient) -> None:
    for t, names in ((LDS, ["echo:7070"]), (RDS, [f"outbound|7070||{FQDN}"]),
                     (CDS, [f"outbound|7070|v1|{FQDN}", f"outbound|7070|v2|{FQDN}"]),
                     (EDS, [f"outbound|7070|v1|{FQDN}", f"outbound|7070|v2|{FQDN}"])):
        c.send(t, names)
        _ack(c, c.recv(), names)


def test_reload_pushes_every_watched_type_to_every_stream(cp: ControlPlane) -> None:
    clients = [AdsClient(cp.address) for _ in range(3)]
    lds_only = AdsClient(cp.address)
    try:
        for c in clients:
            _subscribe_all(c)
        lds_only.send(LDS, ["a:7070"])
        _ack(lds_only, lds_only.recv(), ["a:7070"])
        old = cp.server.version
        gen = cp.write(_mesh([FQDN, "b.default.svc.cluster.local"], weight_v2=100))  # drops service a, changes weights
        assert gen == 2 and VERSION.fullmatch(cp.server.version).group(1) == "2"
        for c in clients:
            pushed = [c.recv() for _ in range(4)]
            assert [p.type_url for p in pushed] == [CDS, EDS, LDS, RDS]  # istiod's make-before-break order
            assert {p.version_info for p in pushed} == {cp.server.version} != {old}
            route = decode(pushed[3])[f"outbound|7070||{FQDN}"].virtual_hosts[0].routes[0]
            assert [w.name for w in route.route.weighted_clusters.clusters] == [f"outbound|7070|v2|{FQDN}"]
            assert c.no_response(0.1)  # nothing unwatched, nothing twice
        r = lds_only.recv()
        assert r.type_url == LDS and list(r.resources) == []  # service a is gone: absence = deletion
        assert lds_only.no_response(0.1)
    finally:
        for c in clients + [lds_only]:
            c.close()


def test_file_poller_picks_up_changes_without_explicit_reload(cp: ControlPlane) -> None:
    with open(cp.config_file, "w", encoding="utf-8") as f:
        f.write(_mesh([FQDN]))
    assert cp.server.wait_for_generation(2, timeout=5)
    assert sorted(cp.server.snapshot.services) == [FQDN]


def test_bad_reload_keeps_last_good_config(cp: ControlPlane, caplog) -> None:
    with AdsClient(cp.address) as c:
        c.send(LDS, ["a:7070"])
        r = c.recv()
        _ack(c, r, ["a:7070"])
        with caplog.at_level("ERROR", logger="meshpatch.controlplane"):
            gen = cp.write("kind: [this is not yaml\n")
        assert gen == 1 and cp.server.reload_failures == 1
        assert "invalid YAML" in cp.server.last_reload_error and "mesh.yaml" in cp.server.last_reload_error
        assert any("keeping the last good config" in rec.getMessage() for rec in caplog.records)
        assert c.no_response(0.2)  # nothing pushed
        c.send(LDS, ["a:7070", "b:7070"], version=r.version_info, nonce=r.nonce)
        assert sorted(decode(c.recv())) == ["a:7070", "b:7070"]  # still served from the old config
        assert cp.write(_mesh([FQDN])) == 2
        pushed = c.recv()
        assert pushed.type_url == LDS and list(pushed.resources) == []


def test_a_stream_ending_does_not_disturb_others(cp: ControlPlane) -> None:
    clients = [AdsClient(cp.address) for _ in range(8)]
    try:
        for c in clients:
            c.send(LDS, ["echo:7070"])
            _ack(c, c.recv(), ["echo:7070"])
        assert cp.server.streams_active == 8 and cp.server.streams_opened == 8
        for c in clients[:4]:
            c.close()
        assert cp.server.wait_for(lambda: cp.server.streams_closed == 4, 5)
        assert cp.server.streams_active == 4
        cp.write(_mesh(HOSTS, weight_v2=50))
        for c in clients[4:]:
            r = c.recv()
            assert r.type_url == LDS and r.version_info == cp.server.version
    finally:
        for c in clients[4:]:
            c.close()


def test_delta_ads_is_unimplemented(cp: ControlPlane) -> None:
    with suppressed(), grpc.insecure_channel(cp.address) as ch:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
        call = stub.DeltaAggregatedResources(iter([discovery_pb2.DeltaDiscoveryRequest(type_url=LDS)]), timeout=5)
        with pytest.raises(grpc.RpcError) as err:
            list(call)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_in_process_server_without_files_and_clean_stop() -> None:
    srv = ControlPlaneServer(listen="127.0.0.1:0").start()
    try:
        assert srv.generation == 1 and srv.port
        with AdsClient(srv.address) as c:
            c.send(LDS, [])
            assert list(c.recv().resources) == []
            srv.set_yaml(_mesh([FQDN]))
            assert sorted(decode(c.recv())) == [f"{FQDN}:7070"]  # wildcard LDS, pushed
            t0 = time.monotonic()
            srv.stop(grace=0.2)
            with pytest.raises((EOFError, grpc.RpcError)):
                c.recv(timeout=5)
            assert time.monotonic() - t0 < 5
        assert srv.streams_active == 0
    finally:
        srv.stop()
