"""When may an LDS/CDS name be declared non-existent?

A name the client has received and that a later LDS/CDS response lacks is
deleted.  A name it never received is different: a SotW response does not say
which request it answers, and a config push built for the previous name set can
cross the request that added the name (istiod builds pushes and answers
requests in one loop per connection).  Such a name is absent only when the
first response of a stream (the answer to the initial request) lacks it, or
when the server leaves the ACK of a response lacking it unanswered.

Still, an unknown host is answered promptly (it used to wait out
MESHPATCH_RESOLVE_TIMEOUT, and a registry-only host next to xDS was never
routed).
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import pytest

from meshpatch.agent import Agent
from meshpatch.api import NoHealthyUpstream
from meshpatch.bootstrap import Bootstrap, XdsServer, load_bootstrap
from meshpatch.config import Settings
from meshpatch.routing.router import Router
from meshpatch.xds.client import ACKED, DOES_NOT_EXIST, REQUESTED, XdsClient
from meshpatch.xds.transport import Backoff, GrpcAdsTransport
from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS
from tests.support import xds_resources as res
from tests.support.controlplane import control_plane
from tests.support.scripted_ads import RecordingWatcher, ScriptedAds

FQDN = "echo.default.svc.cluster.local"
RDS_NAME = f"outbound|7070||{FQDN}"
V1 = f"outbound|7070|v1|{FQDN}"
V2 = f"outbound|7070|v2|{FQDN}"
NODE = {"id": "sidecar~127.0.0.1~client.default~default.svc.cluster.local",
        "metadata": {"GENERATOR": "grpc", "NAMESPACE": "default"}}


def test_unknown_hosts_one_after_another_are_answered_promptly() -> None:
    with control_plane("") as cp:
        settings = Settings({"MESHPATCH_XDS_SERVER": cp.address, "MESHPATCH_RESOLVE_TIMEOUT": "5"})
        agent = Agent(settings, load_bootstrap(settings))
        try:
            for host in ("first-unknown", "second-unknown", "third-unknown"):
                started = time.monotonic()
                assert agent.router.pick("http", host, 80, "GET", "/") is None
                assert time.monotonic() - started < 2.0, f"{host} waited for the resolve timeout"
        finally:
            agent.stop()


@pytest.fixture()
def ads() -> Iterator[ScriptedAds]:
    server = ScriptedAds().start()
    yield server
    server.stop()


def _client(ads: ScriptedAds, settle: float) -> XdsClient:
    boot = Bootstrap([XdsServer(ads.address, "insecure", {}, [])], NODE, {}, None, "test")

    def transport(*args: Any) -> GrpcAdsTransport:
        return GrpcAdsTransport(*args, backoff=Backoff(initial=0.05, maximum=0.2))  # type: ignore[arg-type]

    client = XdsClient(boot, transport_factory=transport)
    client.absence_settle = settle
    return client


def _acked(ads: ScriptedAds, nonce: str, after: int = 0) -> Any:
    return ads.wait_request(CDS, lambda r: r.response_nonce == nonce and not r.HasField("error_detail"), after=after)


def _v1_acked(client: XdsClient, ads: ScriptedAds, recorder: RecordingWatcher) -> str:
    """Subscribe CDS [v1], answer it, wait for the ACK; the response's nonce."""
    with client.lock:
        client.watch(CDS, V1, recorder)
    ads.wait_request(CDS, lambda r: list(r.resource_names) == [V1])
    nonce = ads.respond(CDS, [res.cluster(V1)], "1")
    _acked(ads, nonce)
    return nonce


def test_push_crossing_a_subscription_change_is_not_a_deletion(ads: ScriptedAds) -> None:
    """The client subscribes CDS [v1], then moves to [v2]; a push the server
    built for [v1] arrives after the [v2] request.  v2 is not declared absent;
    the server's answer to the ACK (which names v2) brings it."""
    client = _client(ads, settle=30.0)  # a wrong "absent" could only come from the response itself
    recorder = RecordingWatcher()
    client.start()
    try:
        n1 = _v1_acked(client, ads, recorder)
        count = len(ads.streams[-1].requests)
        with client.lock:  # a route moves to v2: the new cluster is watched, then the old one released
            client.watch(CDS, V2, recorder)
            client.cancel_watch(CDS, V1, recorder)
        moved = ads.wait_request(CDS, lambda r: list(r.resource_names) == [V2], after=count)
        assert moved.response_nonce == n1  # both requests carry the nonce of the last response
        n2 = ads.respond(CDS, [res.cluster(V1)], "2")  # the push built for [v1], crossing the requests
        ack = _acked(ads, n2)
        assert list(ack.resource_names) == [V2] and ack.version_info == "2"
        assert ("missing", V2) not in recorder.events
        assert client.resource_status(CDS, V2) == REQUESTED
        n3 = ads.respond(CDS, [res.cluster(V2)], "3")  # the server answers the ACK's changed name set
        _acked(ads, n3)
        assert client.resource_status(CDS, V2) == ACKED
        assert ("missing", V2) not in recorder.events and ("resource", V2) in recorder.events
    finally:
        client.stop()


def test_name_missing_after_a_crossing_push_is_absent_once_the_ack_stays_unanswered(ads: ScriptedAds) -> None:
    """The same crossing push, but v2 really does not exist: the server's answer
    to the ACK lacks it too, and then the server is silent: v2 is absent after the
    settle time, and a name the client had received is deleted at once."""
    client = _client(ads, settle=0.3)
    recorder = RecordingWatcher()
    client.start()
    try:
        n1 = _v1_acked(client, ads, recorder)
        with client.lock:
            client.watch(CDS, V2, recorder)
        ads.wait_request(CDS, lambda r: V2 in r.resource_names)
        n2 = ads.respond(CDS, [res.cluster(V1)], "2")  # crossing push or answer: the client cannot tell
        _acked(ads, n2)
        n3 = ads.respond(CDS, [res.cluster(V1)], "3")  # the answer to the ACK naming v2: still without it
        _acked(ads, n3)
        answered = time.monotonic()
        assert client.resource_status(CDS, V2) == REQUESTED
        while client.resource_status(CDS, V2) != DOES_NOT_EXIST and time.monotonic() - answered < 5:
            time.sleep(0.01)
        assert client.resource_status(CDS, V2) == DOES_NOT_EXIST
        assert time.monotonic() - answered >= 0.25
        assert recorder.events.count(("missing", V2)) == 1
        n4 = ads.respond(CDS, [res.cluster(V2)], "4")  # received names: absence is deletion, no waiting
        _acked(ads, n4)
        assert ("missing", V1) in recorder.events and client.resource_status(CDS, V1) == DOES_NOT_EXIST
        assert client.resource_status(CDS, V2) == ACKED
    finally:
        client.stop()


def test_first_response_on_a_stream_settles_the_initial_names_at_once(ads: ScriptedAds) -> None:
    """The answer to a stream's initial request was built after the server read
    it: what it lacks of that request is absent without waiting (also after a
    reconnect, when the initial request re-sends every cached subscription)."""
    client = _client(ads, settle=30.0)
    recorder = RecordingWatcher()
    client.start()
    try:
        with client.lock:
            client.watch(CDS, V1, recorder)
        ads.wait_request(CDS, lambda r: list(r.resource_names) == [V1])
        n1 = ads.respond(CDS, [], "1")
        _acked(ads, n1)
        assert client.resource_status(CDS, V1) == DOES_NOT_EXIST
        with client.lock:
            client.watch(CDS, V2, recorder)
        ads.wait_request(CDS, lambda r: V2 in r.resource_names)
        ads.end_stream()
        ads.wait_for(lambda: len(ads.streams) == 2)
        initial = ads.wait_request(CDS, stream_index=1)
        assert sorted(initial.resource_names) == sorted([V1, V2]) and initial.response_nonce == ""
        n2 = ads.respond(CDS, [res.cluster(V1)], "2", stream=ads.streams[1])
        ads.wait_request(CDS, lambda r: r.response_nonce == n2, stream_index=1)
        assert client.resource_status(CDS, V1) == ACKED
        assert client.resource_status(CDS, V2) == DOES_NOT_EXIST
    finally:
        client.stop()


def test_route_move_with_a_crossing_cds_push_never_fails_calls(ads: ScriptedAds) -> None:
    """End to end through the router: a route moves from v1 to v2 and a CDS push
    built for [v1] crosses the subscription to v2.  Calls keep going to v1 until
    v2 is known (never NoHealthyUpstream "cluster does not exist"), then to v2."""
    db = {
        LDS: {"echo:7070": res.listener("echo:7070", RDS_NAME)},
        RDS: {RDS_NAME: res.route_config(RDS_NAME, [(f"{FQDN}:7070", ["echo", "echo:7070"],
                                                     [res.route("/", cluster=V1)])])},
        CDS: {V1: res.cluster(V1), V2: res.cluster(V2)},
        EDS: {V1: res.cla(V1, [("127.0.0.2", 8080)]), V2: res.cla(V2, [("127.0.0.3", 8080)])},
    }
    ads.serve(db)
    serve = ads.on_request
    hold_cds = []

    def on_request(server: ScriptedAds, stream: Any, request: Any) -> None:
        if request.type_url == CDS and hold_cds:
            return  # the test answers CDS by hand from here on
        serve(server, stream, request)  # type: ignore[misc]

    ads.on_request = on_request
    client = _client(ads, settle=30.0)
    router = Router(client, 3.0, client.start)
    try:
        assert router.pick("http", "echo", 7070, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
        hold_cds.append(True)
        count = len(ads.streams[-1].requests)
        ads.respond(RDS, [res.route_config(RDS_NAME, [(f"{FQDN}:7070", ["echo", "echo:7070"],
                                                      [res.route("/", cluster=V2)])])], "2")
        ads.wait_request(CDS, lambda r: list(r.resource_names) == [V2], after=count)
        push = ads.respond(CDS, [res.cluster(V1)], "2")  # built for [v1] before the server read [v2]
        _acked(ads, push, after=count)
        for _ in range(20):  # before the fix: NoHealthyUpstream (cluster does not exist)
            assert router.pick("http", "echo", 7070, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
        assert client.resource_status(CDS, V2) == REQUESTED
        hold_cds.clear()
        answer = ads.respond(CDS, [res.cluster(V2)], "3")  # the answer to the ACK naming v2
        _acked(ads, answer, after=count)
        deadline = time.monotonic() + 5
        while True:
            pick = router.pick("http", "echo", 7070, "GET", "/")
            if pick is not None and pick.address == "127.0.0.3":
                break
            assert time.monotonic() < deadline, "calls never moved to v2"
            time.sleep(0.01)
    except NoHealthyUpstream as exc:
        pytest.fail(f"a crossing CDS push failed calls: {exc}")
    finally:
        client.stop()


def _acked_lds(ads: ScriptedAds, nonce: str) -> Any:
    return ads.wait_request(LDS, lambda r: r.response_nonce == nonce and not r.HasField("error_detail"))


def test_listener_absence_settles_fast_and_a_wrong_one_heals(ads: ScriptedAds) -> None:
    """LDS: a never-received listener missing from a response is absent after the
    short LDS settle (first calls to hosts outside the mesh stay fast), well
    before the CDS settle; if that response was a crossing push after all, the
    server's answer to the ACK brings the listener and the watcher gets it."""
    client = _client(ads, settle=5.0)  # the CDS settle; LDS uses the short one
    recorder = RecordingWatcher()
    client.start()
    try:
        with client.lock:
            client.watch(LDS, "echo:7070", recorder)
        ads.wait_request(LDS, lambda r: list(r.resource_names) == ["echo:7070"])
        n1 = ads.respond(LDS, [res.listener("echo:7070", RDS_NAME)], "1")
        _acked_lds(ads, n1)
        with client.lock:
            client.watch(LDS, "other:80", recorder)
        ads.wait_request(LDS, lambda r: "other:80" in r.resource_names)
        n2 = ads.respond(LDS, [res.listener("echo:7070", RDS_NAME)], "2")  # a push crossing the request
        _acked_lds(ads, n2)
        acked = time.monotonic()
        while client.resource_status(LDS, "other:80") != DOES_NOT_EXIST and time.monotonic() - acked < 2:
            time.sleep(0.005)
        assert client.resource_status(LDS, "other:80") == DOES_NOT_EXIST
        assert time.monotonic() - acked < 1.0  # the LDS settle, not the 5 s CDS one
        n3 = ads.respond(LDS, [res.listener("echo:7070", RDS_NAME), res.listener("other:80", RDS_NAME)], "3")
        _acked_lds(ads, n3)
        assert client.resource_status(LDS, "other:80") == ACKED
        assert ("resource", "other:80") in recorder.events
        assert client.resource_status(LDS, "echo:7070") == ACKED
    finally:
        client.stop()
