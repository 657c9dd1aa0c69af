"""One upstream xDS stream per pod, in one process: several agents that share a
runtime dir behave like a pod's worker processes (flock excludes open files,
not processes, so the election is the same).  Multi-process launchers
(gunicorn, uvicorn, multiprocessing) are in test_multiprocess.py.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

from meshpatch.agent import Agent
from meshpatch.bootstrap import Bootstrap, XdsServer, load_bootstrap
from meshpatch.config import Settings
from meshpatch.xds.client import ACKED, NACKED
from meshpatch.xds.pod import PodLock
from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS
from tests.support import xds_resources as res
from tests.support.ads_proxy import AdsProxy
from tests.support.controlplane import ControlPlane, control_plane
from tests.support.scripted_ads import ScriptedAds
from tests.test_agent_e2e import FQDN, mesh

RATINGS = "ratings.default.svc.cluster.local"


def with_ratings(v1_weight: int) -> str:
    return mesh(v1_weight) + f"""---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ratings, namespace: default}}
spec:
  hosts: [{RATINGS}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.4, ports: {{http: 9004}}}}
"""


class Pod:
    """Agents sharing one runtime dir, stopped at the end."""

    def __init__(self, runtime: Path, address: str) -> None:
        self.runtime = runtime
        self.address = address
        self.agents: List[Agent] = []

    def agent(self, **env: str) -> Agent:
        settings = Settings({"MESHPATCH_XDS_SERVER": self.address, "MESHPATCH_RESOLVE_TIMEOUT": "5",
                             "MESHPATCH_RUNTIME_DIR": str(self.runtime), **env})
        agent = Agent(settings, load_bootstrap(settings))
        self.agents.append(agent)
        return agent

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()


@pytest.fixture()
def cp() -> Iterator[ControlPlane]:
    with control_plane(with_ratings(100)) as plane:
        yield plane


@pytest.fixture()
def pod(cp: ControlPlane, tmp_path: Path) -> Iterator[Pod]:
    p = Pod(tmp_path / "run", cp.address)
    yield p
    p.close()


def address(agent: Agent, host: str = FQDN) -> str:
    pick = agent.router.pick("http", host, 9080, "GET", "/")
    assert pick is not None
    return pick.address


def wait(predicate, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached")
        time.sleep(0.002)
    return time.monotonic() - start


def test_workers_share_one_upstream_stream_and_all_follow_changes(cp: ControlPlane, pod: Pod) -> None:
    agents = [pod.agent() for _ in range(4)]
    assert [address(a) for a in agents] == ["127.0.0.2"] * 4
    roles = sorted(a.client.transport.role for a in agents)
    assert roles == ["follower", "follower", "follower", "leader"]
    assert cp.server.streams_opened == 1 and cp.server.streams_active == 1
    cp.write(with_ratings(0))
    elapsed = wait(lambda: all(address(a) == "127.0.0.3" for a in agents))
    assert elapsed < 1.0
    # a name only a follower uses is subscribed upstream on demand, through the leader
    follower = next(a for a in agents if a.client.transport.role == "follower")
    assert address(follower, RATINGS) == "127.0.0.4"
    assert cp.server.streams_opened == 1


def test_leader_death_hands_over_within_a_second_without_a_failed_pick(cp: ControlPlane, pod: Pod) -> None:
    agents = [pod.agent() for _ in range(3)]
    for a in agents:
        address(a)
    leader = next(a for a in agents if a.client.transport.role == "leader")
    others = [a for a in agents if a is not leader]
    failures: List[str] = []
    picks = [0]
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            for a in others:
                try:
                    if address(a) != "127.0.0.2":
                        failures.append("wrong endpoint")
                    picks[0] += 1
                except Exception as exc:  # noqa: BLE001 - any failure counts
                    failures.append(repr(exc))
            time.sleep(0.0005)

    thread = threading.Thread(target=load)
    thread.start()
    try:
        time.sleep(0.05)
        leader.stop()  # the holder leaves (a dying process is covered by test_multiprocess)
        took = wait(lambda: any(a.client.transport.role == "leader" for a in others), timeout=3)
        wait(lambda: cp.server.streams_opened == 2 and cp.server.streams_active == 1, timeout=3)
        time.sleep(0.1)
    finally:
        stop.set()
        thread.join()
    assert took < 1.0
    assert failures == [] and picks[0] > 100
    assert sorted(a.client.transport.role for a in others) == ["follower", "leader"]
    # the new leader's stream carries changes to everyone left
    cp.write(with_ratings(0))
    wait(lambda: all(address(a) == "127.0.0.3" for a in others), timeout=2)
    assert cp.server.streams_active == 1


def test_follower_keeps_its_cache_while_leader_cannot_reach_upstream(tmp_path: Path) -> None:
    """With the control plane gone, a follower asking for a new name gets no
    answer (held back, not an incomplete LDS reply), so its known names stay."""
    plane = ControlPlane(with_ratings(100)).start()
    pod = Pod(tmp_path / "run", plane.address)
    try:
        leader, follower = pod.agent(), pod.agent()
        assert address(leader) == address(follower) == "127.0.0.2"
        plane.stop()
        wait(lambda: leader.client.failing, timeout=5)
        follower.router._timeout = 0.3
        assert follower.router.pick("http", "newname.default.svc.cluster.local", 80, "GET", "/") is None
        time.sleep(0.2)
        assert address(follower) == "127.0.0.2"
        assert follower.client.resource_status(LDS, f"{FQDN}:9080") == ACKED
    finally:
        pod.close()


def test_follower_gets_only_last_good_config_when_leader_nacks(tmp_path: Path) -> None:
    ads = ScriptedAds().start()
    rds_name = "outbound|80||echo"
    db = {
        LDS: {"echo:80": res.listener("echo:80", rds_name)},
        RDS: {rds_name: res.route_config(rds_name, [("vh", ["echo:80"], [res.route("/", cluster="c1")])])},
        CDS: {"c1": res.cluster("c1")},
        EDS: {"c1": res.cla("c1", [("127.0.0.2", 8080)])},
    }
    ads.serve(db)
    boot = Bootstrap([XdsServer(ads.address, "insecure", {}, [])],
                     {"id": "sidecar~127.0.0.1~p.default~default.svc.cluster.local", "metadata": {"NAMESPACE": "default"}},
                     {}, None, "test")
    settings = Settings({"MESHPATCH_RESOLVE_TIMEOUT": "5", "MESHPATCH_RUNTIME_DIR": str(tmp_path / "run")})
    leader, follower = Agent(settings, boot), Agent(settings, boot)
    try:
        assert leader.router.pick("http", "echo", 80, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
        assert follower.router.pick("http", "echo", 80, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
        assert len(ads.streams) == 1
        ads.on_request = None
        count = len(ads.streams[0].requests)
        bad = res.route_config(rds_name, [("vh", ["echo:80"], [res.route(regex="(unclosed", cluster="c1")])])
        ads.respond(RDS, [bad], "v2")
        ads.wait_request(RDS, lambda r: r.HasField("error_detail"), after=count)
        assert leader.client.resource_status(RDS, rds_name) == NACKED
        ads.respond(EDS, [res.cla("c1", [("127.0.0.5", 8080)])], "v3")  # a good change still flows
        wait(lambda: follower.router.pick("http", "echo", 80, "GET", "/").address == "127.0.0.5")  # type: ignore[union-attr]
        assert follower.client.type_stats(RDS)["nacks"] == 0  # never saw the bad route config
        assert follower.client.resource_status(RDS, rds_name) == ACKED
    finally:
        leader.stop()
        follower.stop()
        ads.stop()


def test_different_node_means_a_different_stream(cp: ControlPlane, pod: Pod) -> None:
    a = pod.agent()
    b = pod.agent(MESHPATCH_NAMESPACE="shop")  # other namespace: other config, must not share
    address(a)
    b.router.pick("http", FQDN, 9080, "GET", "/")
    assert a.client.transport.role == b.client.transport.role == "leader"
    assert cp.server.streams_opened == 2


def test_unsafe_runtime_dir_falls_back_to_an_own_stream(cp: ControlPlane, pod: Pod, caplog: pytest.LogCaptureFixture) -> None:
    a = pod.agent()
    lock_dir = Path(a.client.transport.pod.directory)
    lock_dir.mkdir(parents=True)
    os.chmod(lock_dir, 0o777)  # anyone could plant a fake leader socket here
    assert address(a) == "127.0.0.2"
    assert a.client.transport.role == "direct"
    assert "writable by others" in caplog.text


def test_clean_exit_removes_socket_and_lock(cp: ControlPlane, pod: Pod) -> None:
    a = pod.agent()
    address(a)
    directory = Path(a.client.transport.pod.directory)
    assert (directory / "xds.sock").exists() and (directory / "leader.lock").exists()
    a.stop()
    assert not directory.exists()


def test_hung_leader_makes_followers_use_their_own_stream(cp: ControlPlane, pod: Pod,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("meshpatch.xds.shared.FOLLOWER_PATIENCE", 0.3)
    a = pod.agent()
    squatter = PodLock(a.client.transport.pod.directory)  # holds the lock, serves nothing
    assert squatter.try_acquire()
    try:
        start = time.monotonic()
        assert address(a) == "127.0.0.2"
        assert 0.25 < time.monotonic() - start < 3
        assert a.client.transport.role == "follower"
        assert cp.server.streams_opened == 1
    finally:
        squatter.release()


@pytest.mark.parametrize("share", ["1", "0"])
def test_behind_a_single_stream_agent_proxy(cp: ControlPlane, pod: Pod, share: str) -> None:
    """istio-agent closes the previous stream when a new one registers: shared,
    the proxy never has to; unshared (the control case) it churns."""
    with AdsProxy(cp.address, single_stream=True) as proxy:
        pod.address = proxy.address
        agents = [pod.agent(MESHPATCH_SHARE_STREAM=share) for _ in range(3)]
        if share == "1":
            for _ in range(2):
                for a in agents:
                    assert address(a) == "127.0.0.2"
                time.sleep(0.3)
            assert proxy.streams_opened == 1 and proxy.closed_by_newer == 0
        else:
            # Each process's own stream knocks the previous one off; a stream closed
            # before its first response leaves a new host unrouted (istio issue 53532).
            for a in agents:
                a.router.pick("http", FQDN, 9080, "GET", "/")
            assert proxy.wait_for(lambda: proxy.closed_by_newer >= 3, timeout=5)


def test_relay_speaks_sotw_like_a_control_plane(cp: ControlPlane, pod: Pod) -> None:
    """The relay socket, seen by a raw ADS client: first requests and name changes
    are answered (LDS complete, on-demand upstream subscription), ACKs are not,
    NACKs are counted and answered with nothing."""
    from tests.support.controlplane import AdsClient, decode

    leader = pod.agent()
    assert address(leader) == "127.0.0.2"
    relay = leader.client.transport.relay
    reviews, ratings = f"{FQDN}:9080", f"{RATINGS}:9080"
    with AdsClient("unix:" + relay.socket_path) as ads:
        ads.send(LDS, [reviews])
        first = ads.recv()
        assert set(decode(first)) == {reviews} and first.version_info
        ads.ack(first)
        assert ads.no_response(0.3)  # an ACK with the same names gets nothing
        both = ads.subscribe(LDS, [reviews, ratings])  # ratings: nobody had asked; fetched upstream on demand
        assert set(decode(both)) == {reviews, ratings}
        ads.nack(both, [reviews, ratings], "worker disagrees")
        assert ads.no_response(0.3)
        assert relay.nacks == 1 and relay.streams_active == 1
        assert cp.server.streams_opened == 1
    wait(lambda: relay.streams_active == 0)
    # the follower that asked for ratings is gone: the leader drops it upstream too
    wait(lambda: leader.client.resource_status(LDS, ratings) is None)


def test_relay_sends_one_response_per_change(tmp_path: Path) -> None:
    """One upstream update that changes several resources a follower watches is
    one relay response, not one per changed resource.  The extra, identical
    responses were not harmless: a follower that changed its subscription in the
    meantime (a route now pointing at a new cluster) took such a stale CDS answer
    for the answer to its new request and declared the new cluster missing
    ("no healthy upstream" for a moment: test_multiprocessing[fork] during a
    weight flip)."""
    from tests.support.controlplane import AdsClient, decode

    ads = ScriptedAds().start()
    rds_name = "outbound|80||echo"
    db = {
        LDS: {"echo:80": res.listener("echo:80", rds_name)},
        RDS: {rds_name: res.route_config(rds_name, [("vh", ["echo:80"], [res.route("/", cluster="c1")])])},
        CDS: {"c1": res.cluster("c1"), "c2": res.cluster("c2")},
        EDS: {"c1": res.cla("c1", [("127.0.0.2", 8080)])},
    }
    ads.serve(db)
    boot = Bootstrap([XdsServer(ads.address, "insecure", {}, [])],
                     {"id": "sidecar~127.0.0.1~p.default~default.svc.cluster.local", "metadata": {"NAMESPACE": "default"}},
                     {}, None, "test")
    leader = Agent(Settings({"MESHPATCH_RESOLVE_TIMEOUT": "5", "MESHPATCH_RUNTIME_DIR": str(tmp_path / "run")}), boot)
    try:
        assert leader.router.pick("http", "echo", 80, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
        relay = leader.client.transport.relay
        with AdsClient("unix:" + relay.socket_path) as follower:
            follower.send(CDS, ["c1", "c2"])
            first = follower.recv()
            assert set(decode(first)) == {"c1", "c2"}
            follower.ack(first)
            assert follower.no_response(0.3)
            least = res.cluster_pb2.Cluster.LEAST_REQUEST
            ads.respond(CDS, [res.cluster("c1", lb=least), res.cluster("c2", lb=least)], "v2")
            update = follower.recv()
            assert update.version_info == "v2" and set(decode(update)) == {"c1", "c2"}
            assert follower.no_response(0.5), "the same CDS answer was sent twice"
            assert relay.responses_sent == 2
    finally:
        leader.stop()
        ads.stop()
