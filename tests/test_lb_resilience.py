"""Circuit breaking, least request under real load, slow start over real xDS.

Calls go through the real router and ClusterHandle and, where timing matters,
to real servers on loopback; the circuit breaker must refuse *before* anything
is sent (fast), least request must steer real concurrent calls away from a
slow server, and a pod added by an EDS update must ramp up over its window.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Dict, List

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from scipy.stats import chisquare

from meshpatch.api import CircuitBreakerOpen
from meshpatch.routing.outcome import SUCCESS
from tests.support.lb import LbMesh, attempt, cluster, endpoints_of, lb_mesh, servers, with_breakers


def _hold(mesh: LbMesh, count: int, release: threading.Event) -> List[threading.Thread]:
    """``count`` attempts in flight until ``release`` is set (started, not finished)."""
    started = threading.Barrier(count + 1)

    def one() -> None:
        pick = mesh.pick()
        pick.started()
        started.wait(5)
        release.wait(10)
        pick.finished(SUCCESS)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    started.wait(5)
    return threads


def _refused(mesh: LbMesh, scheme: str = "http") -> str:
    start = time.monotonic()
    with pytest.raises(CircuitBreakerOpen) as info:
        mesh.pick(scheme=scheme)
    assert time.monotonic() - start < 0.2  # fails fast: nothing waits for the 0.4 s calls in flight
    assert info.value.cluster == mesh.handle.name
    return info.value.limit


def test_max_requests_fails_fast_and_recovers() -> None:
    with servers([("127.0.0.2", "slow:0.4"), ("127.0.0.3", "slow:0.4")]) as specs, lb_mesh() as mesh:
        mesh.serve(with_breakers(cluster(), max_requests=3), endpoints_of(specs))
        results: List[object] = []
        workers = [threading.Thread(target=lambda: results.append(attempt(mesh.pick()))) for _ in range(3)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 2
        while mesh.handle.in_flight < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert mesh.handle.in_flight == 3  # three real calls are in flight to the slow servers
        assert _refused(mesh) == "max_requests"
        assert _refused(mesh, "grpc") == "max_requests"
        for w in workers:
            w.join(5)
        assert [r.http_status for r in results] == [200, 200, 200]  # type: ignore[attr-defined]
        assert mesh.handle.in_flight == 0
        assert mesh.pick() is not None


def test_pending_limit_applies_to_http1_not_to_multiplexed_grpc() -> None:
    """Istio's classic demo: maxConnections 1 + http1MaxPendingRequests 1 → the third
    concurrent HTTP/1.1 call overflows; gRPC shares one HTTP/2 connection."""
    with lb_mesh() as mesh:
        mesh.serve(with_breakers(cluster(), max_connections=1, max_pending_requests=1, max_requests=10),
                   endpoints_of([type("S", (), {"host": "127.0.0.2", "port": 8080})()]))
        release = threading.Event()
        threads = _hold(mesh, 2, release)
        try:
            assert _refused(mesh) == "max_pending_requests"
            assert mesh.handle.admit_request(multiplexed=True) is None
        finally:
            release.set()
            for t in threads:
                t.join(5)
        assert mesh.handle.admit_request() is None


def test_defaults_are_envoys_1024_requests_and_3_retries() -> None:
    with lb_mesh() as mesh:
        mesh.serve(cluster(), endpoints_of([type("S", (), {"host": "127.0.0.2", "port": 8080})()]))
        handle = mesh.handle
        picks = [mesh.pick() for _ in range(1024)]
        for pick in picks[:1023]:
            pick.started()
        assert handle.admit_request(multiplexed=True) is None
        picks[1023].started()
        assert handle.admit_request(multiplexed=True) == "max_requests"
        for pick in picks:
            pick.finished(SUCCESS)
        assert [handle.admit_retry() for _ in range(4)] == [None, None, None, "max_retries"]
        handle.retry_finished()
        assert handle.admit_retry() is None


def test_max_retries_and_retry_budget() -> None:
    with lb_mesh() as mesh:
        mesh.serve(with_breakers(cluster(), max_retries=1), endpoints_of([type("S", (), {"host": "127.0.0.2", "port": 8080})()]))
        handle = mesh.handle
        assert handle.admit_retry() is None
        assert handle.admit_retry() == "max_retries"
        handle.retry_finished()
        assert handle.admit_retry() is None
        handle.retry_finished()
        budget = cluster()
        threshold = budget.circuit_breakers.thresholds.add()
        threshold.retry_budget.budget_percent.value = 50.0
        threshold.retry_budget.min_retry_concurrency.value = 1
        mesh.push_cds(budget)
        assert handle._breakers.budget_percent == 50.0
        release = threading.Event()
        threads = _hold(mesh, 6, release)  # 6 active → budget 3 concurrent retries
        try:
            assert [handle.admit_retry() for _ in range(4)] == [None, None, None, "max_retries"]
        finally:
            release.set()
            for t in threads:
                t.join(5)
        for _ in range(3):
            handle.retry_finished()
        assert handle.admit_retry() is None  # idle: min_retry_concurrency 1
        assert handle.admit_retry() == "max_retries"


def _run_load(mesh: LbMesh, seconds: float, threads: int = 6) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        local: collections.Counter = collections.Counter()
        while time.monotonic() < stop:
            pick = mesh.pick()
            attempt(pick)
            local[pick.address] += 1
        with lock:
            counts.update(local)

    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 10)
    return counts


@pytest.mark.parametrize("lb, fast_share", [(cluster_pb2.Cluster.ROUND_ROBIN, (0.45, 0.55)),
                                            (cluster_pb2.Cluster.LEAST_REQUEST, (0.65, 1.0))],
                         ids=["round robin splits evenly", "least request avoids the slow server"])
def test_least_request_steers_real_calls_to_the_less_loaded_server(lb: int, fast_share: tuple) -> None:
    with servers([("127.0.0.2", "slow:0.06"), ("127.0.0.3", "ok")]) as specs, lb_mesh() as mesh:
        mesh.serve(cluster(lb), endpoints_of(specs))
        counts = _run_load(mesh, 1.0)
        share = counts["127.0.0.3"] / sum(counts.values())
        assert fast_share[0] <= share <= fast_share[1], counts
        assert mesh.handle.in_flight == 0
        assert all(s.active == 0 for s in mesh.handle.states.values())


def _slow_start_cluster(window: float) -> cluster_pb2.Cluster:
    c = cluster()
    c.round_robin_lb_config.slow_start_config.slow_start_window.FromMilliseconds(int(window * 1000))
    return c


def _share(mesh: LbMesh, address: str, n: int = 3000) -> float:
    return sum(1 for _ in range(n) if mesh.pick().address == address) / n


def test_slow_start_ramps_a_new_pod_over_its_window() -> None:
    """Envoy's ramp: weight × max(10 %, max(age, 1 s) / window).  With a 3 s window the
    newcomer starts at 1/3 of a full weight, is at 2/3 after 2 s and equal after 3 s."""
    window = 3.0
    endpoint = lambda host, port: type("S", (), {"host": host, "port": port})()  # noqa: E731
    old = [endpoint("127.0.0.2", 8080), endpoint("127.0.0.3", 8080)]
    new = endpoint("127.0.0.4", 8080)
    with lb_mesh() as mesh:
        mesh.serve(_slow_start_cluster(window), endpoints_of(old))
        # The first endpoints all joined together: equal weights from the start.
        assert abs(_share(mesh, "127.0.0.2") - 0.5) < 0.05
        time.sleep(window)
        mesh.push_eds(endpoints_of(old + [new]))
        joined = mesh.handle.states[("127.0.0.4", 8080)].added

        def expected(at: float) -> float:  # the newcomer's share at time ``at``
            factor = max(0.1, max(at - joined, 1.0) / window) if at - joined < window else 1.0
            return factor / (2 + factor)

        def check(low_bound: float) -> float:
            # a loaded machine may sample late: the share must lie within what the
            # ramp gave while sampling (± sampling noise, ± one 60 ms ramp step)
            before = time.monotonic()
            share = _share(mesh, "127.0.0.4")
            after = time.monotonic()
            assert expected(before - 0.06) - 0.03 < share < expected(after) + 0.03, (share, before - joined, after - joined)
            assert share > low_bound
            return share

        early = check(0.0)  # 1/3 of a weight while younger than 1 s: 0.143
        time.sleep(max(0.0, joined + 2.0 - time.monotonic()))
        check(early + 0.06)  # 2/3 of a weight at 2 s: 0.25
        time.sleep(max(0.0, joined + window + 0.1 - time.monotonic()))
        counts = collections.Counter(mesh.pick().address for _ in range(3000))
        assert chisquare([counts["127.0.0.2"], counts["127.0.0.3"], counts["127.0.0.4"]]).pvalue > 0.001, counts
        assert type(mesh.handle.picker).__name__ == "RoundRobin"  # ramp over: no timer left


def test_attempt_accounting_stays_exact_under_threads_and_eds_updates() -> None:
    with servers([("127.0.0.2", "ok"), ("127.0.0.3", "ok")]) as specs, lb_mesh() as mesh:
        mesh.serve(cluster(cluster_pb2.Cluster.LEAST_REQUEST), endpoints_of(specs))
        stop = threading.Event()

        def churn() -> None:
            while not stop.is_set():
                mesh.push_eds(endpoints_of(specs[:1]))
                mesh.push_eds(endpoints_of(specs))

        pusher = threading.Thread(target=churn)
        pusher.start()
        try:
            counts = _run_load(mesh, 0.8, threads=8)
        finally:
            stop.set()
            pusher.join(10)
        assert sum(counts.values()) > 50
        assert mesh.handle.in_flight == 0
        assert all(s.active == 0 for s in mesh.handle.states.values())


def _handle_with_endpoints(count: int = 3):
    from meshpatch.routing.model import Endpoint, EndpointsConfig, LocalityEndpoints
    from meshpatch.routing.target import ClusterHandle

    handle = ClusterHandle("c", client=None)
    endpoints = tuple(Endpoint(f"10.0.0.{i + 1}", 80, 1) for i in range(count))
    handle._set_endpoints(EndpointsConfig("c", (LocalityEndpoints("r/z/", 1, 0, endpoints),)))
    return handle, endpoints


def test_a_due_refresh_never_blocks_a_pick() -> None:
    """The refresh a Timed picker asks for is skipped while another thread holds the
    cluster's bookkeeping lock: the pick goes on with the picker it has."""
    from meshpatch.routing.lb import Timed
    from meshpatch.routing.outcome import CONNECT_FAILURE, Outcome

    handle, endpoints = _handle_with_endpoints()
    for _ in range(5):  # the built-in detector: 5 connect failures eject
        handle.on_attempt_start(endpoints[0])
        handle.on_attempt_end(endpoints[0], Outcome(CONNECT_FAILURE))
    assert isinstance(handle.picker, Timed) and handle.tracker.ejected == {("10.0.0.1", 80)}
    handle.picker.deadline = 0.0  # due now
    with handle._lock:
        done = []
        worker = threading.Thread(target=lambda: done.append([handle.picker.pick().address for _ in range(30)]))
        start = time.monotonic()
        worker.start()
        worker.join(2)
        assert done and time.monotonic() - start < 0.5
        assert "10.0.0.1" not in done[0]
    handle.picker.pick()  # lock free again: the refresh runs and re-arms the deadline
    assert isinstance(handle.picker, Timed) and handle.picker.deadline > 0


def test_forked_child_starts_with_a_free_lock_and_no_attempts() -> None:
    import os
    import signal

    handle, endpoints = _handle_with_endpoints()
    handle.on_attempt_start(endpoints[0])
    handle.on_attempt_start(endpoints[1])
    held = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with handle._lock:
            held.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(2)
    pid = os.fork()
    if pid == 0:  # child: the holder thread does not exist here
        ok = False
        signal.alarm(5)
        try:
            ok = handle.in_flight == 0 and all(s.active == 0 for s in handle.states.values())
            handle.on_attempt_start(endpoints[0])
            ok = ok and handle.in_flight == 1
        finally:
            os._exit(0 if ok else 1)
    release.set()
    holder.join(5)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    assert handle.in_flight == 2  # the parent keeps its own accounting


def test_lane_pickers_keep_their_class_and_skip_ejected_endpoints() -> None:
    """Canary lanes (issue 7) build per-lane pickers; with an ejection pending the
    cluster times each lane's picker instead of hiding the lane picker."""
    from meshpatch import lanes
    from meshpatch.routing.model import Endpoint, EndpointsConfig, LocalityEndpoints
    from meshpatch.routing.outcome import CONNECT_FAILURE, Outcome
    from meshpatch.routing.target import ClusterHandle

    gray = {"meshpatch": {"labels": {"lane": "gray"}}}
    endpoints = (Endpoint("10.0.0.1", 80, 1), Endpoint("10.0.0.2", 80, 1), Endpoint("10.0.0.3", 80, 1, 1, gray))
    handle = ClusterHandle("c", client=None)
    handle._set_endpoints(EndpointsConfig("c", (LocalityEndpoints("r/z/", 1, 0, endpoints),)))
    assert type(handle.picker) is lanes.LanePicker
    for _ in range(5):
        handle.on_attempt_start(endpoints[0])
        handle.on_attempt_end(endpoints[0], Outcome(CONNECT_FAILURE))
    assert handle.tracker.ejected == {("10.0.0.1", 80)}
    picker = handle.picker
    assert type(picker) is lanes.LanePicker
    assert {picker.pick_in_lane(None).address for _ in range(20)} == {"10.0.0.2"}
    assert {picker.pick_in_lane("gray").address for _ in range(20)} == {"10.0.0.3"}
