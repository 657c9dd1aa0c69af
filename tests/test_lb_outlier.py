"""Outlier detection driven by servers that really fail: 503/502/500, resets, refused ports.

Every call goes through the real router and ClusterHandle (config over real
xDS), makes a real HTTP request to the picked endpoint and reports the result
through Pick.started()/finished() as the hooks do.  Times are shrunk
(intervals of 0.05-1 s, base ejection 0.5-1 s where a return is awaited) so
ejection, return and backoff play out in a few seconds.
"""

from __future__ import annotations

import collections
import time
from types import SimpleNamespace
from typing import Any, Dict, List, Optional

import pytest

from meshpatch.config import ConfigError, parse_outlier_env
from meshpatch.routing import cluster_policy
from meshpatch.routing.cluster_policy import BUILTIN_OUTLIER, outlier_from_values
from meshpatch.routing.outcome import CANCELLED, CONNECT_FAILURE, Outcome
from meshpatch.routing.outlier import (
    CONSECUTIVE_5XX,
    CONSECUTIVE_GATEWAY_FAILURE,
    CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
    FAILURE_PERCENTAGE,
    SUCCESS_RATE,
)
from tests.support.lb import (
    LbMesh,
    attempt,
    cluster,
    endpoints_of,
    lb_mesh,
    refused_port,
    servers,
    with_outlier,
)


def drive(mesh: LbMesh, calls: int) -> collections.Counter:
    """``calls`` real calls; which server got each."""
    seen: collections.Counter = collections.Counter()
    for _ in range(calls):
        pick = mesh.pick()
        attempt(pick)
        seen[pick.address] += 1
    return seen


def ejected(mesh: LbMesh) -> Dict[str, str]:
    return {k[0]: s.ejection_reason for k, s in mesh.handle.states.items() if s.ejected}


def wait_until(predicate, timeout: float = 5.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(step)


FAST = dict(interval=0.1, base_ejection_time=10, max_ejection_percent=100)

CONSECUTIVE_CASES = [
    ("503 x3 → consecutive_5xx", "503", dict(consecutive_5xx=3, **FAST), CONSECUTIVE_5XX),
    ("500 counts as 5xx", "500", dict(consecutive_5xx=3, **FAST), CONSECUTIVE_5XX),
    ("502 → gateway failure when enforced", "502",
     dict(consecutive_gateway_failure=2, enforcing_consecutive_gateway_failure=100, consecutive_5xx=50, **FAST),
     CONSECUTIVE_GATEWAY_FAILURE),
    ("500 is no gateway failure", "500",
     dict(consecutive_gateway_failure=2, enforcing_consecutive_gateway_failure=100, consecutive_5xx=50, **FAST), None),
    ("gateway failure detected but not enforced (Envoy default 0 %)", "503",
     dict(consecutive_gateway_failure=2, consecutive_5xx=50, **FAST), None),
    ("connection reset counts as 5xx", "reset", dict(consecutive_5xx=3, **FAST), CONSECUTIVE_5XX),
    ("reset is a local-origin failure when split", "reset",
     dict(split_external_local_origin_errors=True, consecutive_local_origin_failure=2, consecutive_5xx=50, **FAST),
     CONSECUTIVE_LOCAL_ORIGIN_FAILURE),
    ("5xx not enforced", "503", dict(consecutive_5xx=3, enforcing_consecutive_5xx=0, **FAST), None),
    ("healthy answers never eject", "ok", dict(consecutive_5xx=1, **FAST), None),
]


@pytest.mark.parametrize("case, mode, od, reason", CONSECUTIVE_CASES, ids=[c[0] for c in CONSECUTIVE_CASES])
def test_consecutive_failures_eject_the_failing_server(case: str, mode: str, od: Dict[str, Any],
                                                       reason: Optional[str]) -> None:
    with servers([("127.0.0.2", mode), ("127.0.0.3", "ok"), ("127.0.0.4", "ok")]) as (bad, *good), lb_mesh() as mesh:
        mesh.serve(with_outlier(cluster(), **od), endpoints_of([bad, *good]))
        drive(mesh, 15)  # round robin: 5 calls reach the bad server
        if reason is None:
            assert ejected(mesh) == {}
            assert drive(mesh, 30)["127.0.0.2"] == 10
            return
        assert ejected(mesh) == {"127.0.0.2": reason}
        hits = bad.hits
        assert drive(mesh, 30)["127.0.0.2"] == 0  # out of rotation
        assert bad.hits == hits


def test_ejected_server_returns_after_base_time_backoff_doubles_then_shrinks() -> None:
    # The interval must outlast the 4 calls that re-eject the server right after it
    # returns: Envoy takes one step off the backoff per healthy interval.
    od = dict(consecutive_5xx=2, interval=0.25, base_ejection_time=0.5, max_ejection_time=10, max_ejection_percent=50)
    with servers([("127.0.0.2", "503"), ("127.0.0.3", "ok")]) as (bad, good), lb_mesh() as mesh:
        mesh.serve(with_outlier(cluster(), **od), endpoints_of([bad, good]))
        state = mesh.handle.states[(bad.host, bad.port)]
        drive(mesh, 4)
        assert ejected(mesh) == {"127.0.0.2": CONSECUTIVE_5XX} and state.backoff == 1
        first = state.ejected_at
        # picks alone (no attempt ends) bring it back: the Timed picker runs the interval
        wait_until(lambda: mesh.pick().address == "127.0.0.2", timeout=3, step=0.01)
        back = time.monotonic() - first
        assert 0.5 <= back < 0.5 + 0.25 + 0.4, back
        drive(mesh, 4)  # still failing: ejected again, now for 2 × base
        assert ejected(mesh) == {"127.0.0.2": CONSECUTIVE_5XX} and state.backoff == 2
        second = state.ejected_at
        wait_until(lambda: mesh.pick().address == "127.0.0.2", timeout=4, step=0.01)
        back = time.monotonic() - second
        assert 1.0 <= back < 1.0 + 0.25 + 0.4, back
        assert state.ejections == 2
        bad.mode = "ok"
        assert drive(mesh, 20)["127.0.0.2"] == 10  # recovered: equal share again
        # every healthy interval takes one step off the backoff, driven by attempt ends
        wait_until(lambda: (drive(mesh, 2), state.backoff == 0)[1], timeout=3)


def test_connect_failures_eject_without_any_outlier_config() -> None:
    """Issue 6: a refused endpoint leaves the picker at its first connect failure
    (gRPC-style connectivity, reconnect backoff from 1 s); while it keeps refusing,
    the built-in detector ejects it after 5 consecutive connect failures."""
    with servers([("127.0.0.3", "ok"), ("127.0.0.4", "ok")]) as good, lb_mesh() as mesh:
        dead = SimpleNamespace(host="127.0.0.2", port=refused_port("127.0.0.2"))
        mesh.serve(cluster(), endpoints_of([dead, *good]))
        assert mesh.handle.config.outlier is None
        assert mesh.handle.tracker.config is BUILTIN_OUTLIER
        outcomes = collections.Counter()
        for _ in range(15):
            pick = mesh.pick()
            outcomes[(pick.address, attempt(pick).kind)] += 1
        assert outcomes[("127.0.0.2", CONNECT_FAILURE)] == 1
        state = mesh.handle.states[("127.0.0.2", dead.port)]
        assert state.down_until > time.monotonic() and ejected(mesh) == {}
        assert drive(mesh, 20)["127.0.0.2"] == 0
        endpoint = next(ep for loc in mesh.handle.endpoints.localities for ep in loc.endpoints if ep.address == "127.0.0.2")
        for _ in range(4):  # the endpoint keeps refusing each time its backoff lets it be tried again
            mesh.handle.on_attempt_start(endpoint)
            mesh.handle.on_attempt_end(endpoint, Outcome(CONNECT_FAILURE))
        assert ejected(mesh) == {"127.0.0.2": CONSECUTIVE_LOCAL_ORIGIN_FAILURE}


def test_builtin_detector_ignores_5xx_and_resets() -> None:
    with servers([("127.0.0.2", "503"), ("127.0.0.3", "reset"), ("127.0.0.4", "ok")]) as specs, lb_mesh() as mesh:
        mesh.serve(cluster(), endpoints_of(specs))
        drive(mesh, 30)
        assert ejected(mesh) == {}


def test_builtin_detector_never_ejects_the_last_half() -> None:
    with lb_mesh() as mesh:
        dead = [SimpleNamespace(host=f"127.0.0.{i}", port=refused_port(f"127.0.0.{i}")) for i in (2, 3, 4)]
        mesh.serve(cluster(), endpoints_of(dead))
        drive(mesh, 30)
        assert len(ejected(mesh)) == 1  # 2 of 3 would exceed 50 %; one is always allowed
        assert mesh.handle.tracker.overflow_count >= 1


def test_max_ejection_percent_caps_ejections() -> None:
    od = dict(consecutive_5xx=2, interval=0.1, base_ejection_time=5, max_ejection_percent=25)
    specs = [("127.0.0.2", "503"), ("127.0.0.3", "503"), ("127.0.0.4", "ok"), ("127.0.0.5", "ok")]
    with servers(specs) as all_servers, lb_mesh() as mesh:
        mesh.serve(with_outlier(cluster(), **od), endpoints_of(all_servers))
        drive(mesh, 24)
        assert len(ejected(mesh)) == 1
        assert mesh.handle.tracker.overflow_count >= 1


def _align_to_interval(mesh: LbMesh) -> None:
    """Wait for the next interval tick so a burst of calls lands in one interval."""
    tracker = mesh.handle.tracker
    first = tracker.next_tick
    wait_until(lambda: (attempt(mesh.pick()), tracker.next_tick != first)[1], timeout=5, step=0.01)


def test_success_rate_ejects_the_statistical_outlier() -> None:
    od = dict(interval=1.0, base_ejection_time=5, max_ejection_percent=100, enforcing_consecutive_5xx=0,
              success_rate_minimum_hosts=5, success_rate_request_volume=6)
    specs = [("127.0.0.2", "every:2:503")] + [(f"127.0.0.{i}", "ok") for i in range(3, 7)]
    with servers(specs) as all_servers, lb_mesh() as mesh:
        mesh.serve(with_outlier(cluster(), **od), endpoints_of(all_servers))
        _align_to_interval(mesh)
        drive(mesh, 100)  # 20 each; the flaky one at 50 % success: mean 90, stdev 20, threshold 52
        tracker = mesh.handle.tracker
        wait_until(lambda: time.monotonic() >= tracker.next_tick, timeout=2)
        attempt(mesh.pick())
        assert ejected(mesh) == {"127.0.0.2": SUCCESS_RATE}


def test_success_rate_needs_minimum_hosts_and_volume() -> None:
    od = dict(interval=0.3, base_ejection_time=5, max_ejection_percent=100, enforcing_consecutive_5xx=0,
              success_rate_minimum_hosts=5, success_rate_request_volume=50)
    specs = [("127.0.0.2", "every:2:503")] + [(f"127.0.0.{i}", "ok") for i in range(3, 7)]
    with servers(specs) as all_servers, lb_mesh() as mesh:
        mesh.serve(with_outlier(cluster(), **od), endpoints_of(all_servers))
        _align_to_interval(mesh)
        drive(mesh, 100)  # only 20 per host: below the request volume
        tracker = mesh.handle.tracker
        wait_until(lambda: time.monotonic() >= tracker.next_tick, timeout=2)
        attempt(mesh.pick())
        assert ejected(mesh) == {}


def test_failure_percentage_ejects_above_threshold() -> None:
    od = dict(interval=1.0, base_ejection_time=5, max_ejection_percent=100, enforcing_consecutive_5xx=0,
              enforcing_success_rate=0, failure_percentage_threshold=40, enforcing_failure_percentage=100,
              failure_percentage_minimum_hosts=3, failure_percentage_request_volume=6)
    specs = [("127.0.0.2", "every:2:503"), ("127.0.0.3", "every:4:503"), ("127.0.0.4", "ok")]
    with servers(specs) as all_servers, lb_mesh() as mesh:
        mesh.serve(with_outlier(cluster(), **od), endpoints_of(all_servers))
        _align_to_interval(mesh)
        drive(mesh, 60)
        tracker = mesh.handle.tracker
        wait_until(lambda: time.monotonic() >= tracker.next_tick, timeout=2)
        attempt(mesh.pick())
        assert ejected(mesh) == {"127.0.0.2": FAILURE_PERCENTAGE}  # 50 % ≥ 40; 25 % is not


def test_all_ejected_priority_fails_over_and_comes_back() -> None:
    od = dict(consecutive_5xx=2, interval=0.05, base_ejection_time=1.0, max_ejection_percent=100)
    with servers([("127.0.0.2", "503"), ("127.0.0.3", "ok")]) as (p0, p1), lb_mesh() as mesh:
        mesh.serve(with_outlier(cluster(), **od), endpoints_of([p0, p1], priorities=[0, 1]))
        assert drive(mesh, 2) == {"127.0.0.2": 2}  # priority 0 takes everything while usable
        assert ejected(mesh) == {"127.0.0.2": CONSECUTIVE_5XX}
        assert drive(mesh, 10) == {"127.0.0.3": 10}  # failed over to priority 1
        p0.mode = "ok"
        wait_until(lambda: mesh.pick().address == "127.0.0.2", timeout=3)
        assert drive(mesh, 10) == {"127.0.0.2": 10}


def test_ejection_survives_an_eds_update_and_leaves_with_the_endpoint() -> None:
    od = dict(consecutive_5xx=2, interval=0.1, base_ejection_time=10, max_ejection_percent=100)
    specs = [("127.0.0.2", "503"), ("127.0.0.3", "ok"), ("127.0.0.4", "ok")]
    with servers(specs) as (bad, good, extra), lb_mesh() as mesh:
        mesh.serve(with_outlier(cluster(), **od), endpoints_of([bad, good]))
        drive(mesh, 4)
        assert ejected(mesh) == {"127.0.0.2": CONSECUTIVE_5XX}
        mesh.push_eds(endpoints_of([bad, good, extra]))  # a new pod joins; the bad one stays out
        assert set(drive(mesh, 20)) == {"127.0.0.3", "127.0.0.4"}
        mesh.push_eds(endpoints_of([good, extra]))  # it leaves: its state goes with it
        assert mesh.handle.tracker.ejected == set()
        mesh.push_eds(endpoints_of([bad, good, extra]))  # a new pod at the same address starts clean
        assert ejected(mesh) == {}


def test_cancelled_and_local_outcomes_say_nothing_about_the_endpoint() -> None:
    od = dict(consecutive_5xx=1, interval=0.1, base_ejection_time=10, max_ejection_percent=100)
    with servers([("127.0.0.2", "ok"), ("127.0.0.3", "ok")]) as specs, lb_mesh() as mesh:
        mesh.serve(with_outlier(cluster(), **od), endpoints_of(specs))
        for kind in (CANCELLED, "local"):
            for _ in range(5):
                pick = mesh.pick()
                pick.started()
                pick.finished(Outcome(kind))
        assert ejected(mesh) == {}
        assert mesh.handle.in_flight == 0
        pick = mesh.pick()
        pick.started()
        pick.finished(Outcome("ok", grpc_status="UNAVAILABLE"))  # gRPC UNAVAILABLE = 503 for Envoy
        assert ejected(mesh) == {pick.address: CONSECUTIVE_5XX}


def test_env_defaults_apply_to_clusters_without_outlier_detection(monkeypatch) -> None:
    monkeypatch.setenv("MESHPATCH_OUTLIER_CONSECUTIVE_5XX", "2")
    monkeypatch.setenv("MESHPATCH_OUTLIER_INTERVAL", "0.1s")
    monkeypatch.setenv("MESHPATCH_OUTLIER_BASE_EJECTION_TIME", "5")
    monkeypatch.setenv("MESHPATCH_OUTLIER_MAX_EJECTION_PERCENT", "50")
    cluster_policy.reset_default_outlier()
    try:
        with servers([("127.0.0.2", "503"), ("127.0.0.3", "ok")]) as (bad, good), lb_mesh() as mesh:
            mesh.serve(cluster(), endpoints_of([bad, good]))
            tracker = mesh.handle.tracker
            assert tracker.config.source == "env" and tracker.config.consecutive_5xx == 2
            assert tracker.config.max_ejection_time == 300.0  # Envoy default
            drive(mesh, 4)
            assert ejected(mesh) == {"127.0.0.2": CONSECUTIVE_5XX}
            # A cluster's own outlier_detection wins over the env defaults.
            mesh.push_cds(with_outlier(cluster(), consecutive_5xx=50, interval=1))
            assert mesh.handle.tracker.config.source == "xds"
            assert ejected(mesh) == {}  # a changed detector starts fresh, as Envoy's rebuilt cluster does
    finally:
        cluster_policy.reset_default_outlier()


def test_outlier_detection_can_be_switched_off(monkeypatch) -> None:
    monkeypatch.setenv("MESHPATCH_OUTLIER_DETECTION", "off")
    cluster_policy.reset_default_outlier()
    try:
        with lb_mesh() as mesh:
            dead = SimpleNamespace(host="127.0.0.2", port=refused_port("127.0.0.2"))
            with servers([("127.0.0.3", "ok")]) as good:
                mesh.serve(cluster(), endpoints_of([dead, *good]))
                assert mesh.handle.tracker is None
                # No ejection; only the connectivity backoff keeps the refused endpoint
                # out after its first connect failure (it is retried once the backoff ends).
                assert drive(mesh, 20)["127.0.0.2"] == 1
                assert ejected(mesh) == {}
    finally:
        cluster_policy.reset_default_outlier()


ENV_ERRORS = [
    ({"MESHPATCH_OUTLIER_CONSECUTIVE_5XX": "five"}, "MESHPATCH_OUTLIER_CONSECUTIVE_5XX", "not a whole number"),
    ({"MESHPATCH_OUTLIER_MAX_EJECTION_PERCENT": "150"}, "MESHPATCH_OUTLIER_MAX_EJECTION_PERCENT", "out of range"),
    ({"MESHPATCH_OUTLIER_INTERVAL": "soon"}, "MESHPATCH_OUTLIER_INTERVAL", "not a number of seconds"),
    ({"MESHPATCH_OUTLIER_BASE_EJECTION_TIME": "60", "MESHPATCH_OUTLIER_MAX_EJECTION_TIME": "30"},
     "MESHPATCH_OUTLIER_MAX_EJECTION_TIME", "smaller than the base"),
    ({"MESHPATCH_OUTLIER_CONSECUTIVE_5XXX": "3"}, "MESHPATCH_OUTLIER_CONSECUTIVE_5XXX", "unknown outlier"),
    ({"MESHPATCH_OUTLIER_DETECTION": "maybe"}, "MESHPATCH_OUTLIER_DETECTION", "not on/off"),
    ({"MESHPATCH_OUTLIER_DETECTION": "off", "MESHPATCH_OUTLIER_CONSECUTIVE_5XX": "3"}, "MESHPATCH_OUTLIER_DETECTION",
     "defaults are set"),
    ({"MESHPATCH_OUTLIER_INTERVAL": "0"}, "MESHPATCH_OUTLIER_INTERVAL", "greater than 0"),
]


@pytest.mark.parametrize("environ, variable, problem", ENV_ERRORS, ids=[e[1] + ":" + e[2] for e in ENV_ERRORS])
def test_bad_outlier_env_is_a_clear_config_error(environ: Dict[str, str], variable: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_outlier_env(environ)
    assert info.value.variable == variable and problem in info.value.problem
    assert "meshpatch stays off" in str(info.value)


def test_outlier_env_values_parse_to_envoy_fields() -> None:
    mode, values = parse_outlier_env({
        "MESHPATCH_OUTLIER_CONSECUTIVE_5XX": "3", "MESHPATCH_OUTLIER_INTERVAL": "2.5s",
        "MESHPATCH_OUTLIER_ENFORCING_SUCCESS_RATE": "50%", "MESHPATCH_OUTLIER_SPLIT_EXTERNAL_LOCAL_ORIGIN_ERRORS": "yes",
        "MESHPATCH_UNRELATED": "x"})
    assert mode == "on"
    assert values == {"consecutive_5xx": 3, "interval": 2.5, "enforcing_success_rate": 50,
                      "split_external_local_origin_errors": True}
    config = outlier_from_values(values, "env")
    assert config.base_ejection_time == 30.0 and config.success_rate_stdev_factor == 1900
    assert parse_outlier_env({}) == ("on", {})
