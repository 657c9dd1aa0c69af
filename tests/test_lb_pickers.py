"""Endpoint pickers: shares (chi-square), least-request preference, retries, priorities with ejections.

Pure picker behaviour on model objects; the cluster-level behaviour with real
servers lives in test_lb_outlier.py / test_lb_resilience.py.
"""

from __future__ import annotations

import collections
import threading
from typing import List, Sequence

import pytest
from scipy.stats import chisquare

from meshpatch.routing.cluster_policy import LbConfig, SlowStart
from meshpatch.routing.lb import (
    ClusterView,
    EmptyPicker,
    LeastRequest,
    PickFirst,
    RandomPicker,
    RoundRobin,
    WeightedLeastRequest,
    WeightedRandom,
    WeightedRoundRobin,
    build_picker,
)
from meshpatch.routing.model import Endpoint, EndpointsConfig, LocalityEndpoints
from meshpatch.routing.outlier import EndpointState

N = 12000


def _eps(n: int, weights: Sequence[int] = ()) -> List[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}", 80, 1, weights[i] if weights else 1) for i in range(n)]


def _config(*groups: Sequence[Endpoint], priorities: Sequence[int] = (), weights: Sequence[int] = ()) -> EndpointsConfig:
    return EndpointsConfig("c", tuple(
        LocalityEndpoints(f"r/z{i}/", weights[i] if weights else 1, priorities[i] if priorities else 0, tuple(g))
        for i, g in enumerate(groups)))


def _shares(picker, n: int = N, **kwargs) -> collections.Counter:
    return collections.Counter(picker.pick(**kwargs).address for _ in range(n))


def _chi_ok(counts: collections.Counter, endpoints: Sequence[Endpoint], expected: Sequence[float]) -> float:
    observed = [counts[ep.address] for ep in endpoints]
    total = sum(observed)
    return chisquare(observed, [total * e / sum(expected) for e in expected]).pvalue


SHARE_CASES = [
    ("round robin equal", LbConfig(), [1, 1, 1, 1], [1, 1, 1, 1], RoundRobin),
    ("round robin weighted (Envoy)", LbConfig(), [1, 2, 5], [1, 2, 5], WeightedRoundRobin),
    ("random ignores weights", LbConfig("RANDOM"), [1, 2, 5], [1, 1, 1], RandomPicker),
    ("least request idle = uniform", LbConfig("LEAST_REQUEST"), [1, 1, 1], [1, 1, 1], LeastRequest),
    ("least request weighted idle", LbConfig("LEAST_REQUEST"), [1, 3], [1, 3], WeightedLeastRequest),
    ("least request bias 0 = weighted RR", LbConfig("LEAST_REQUEST", active_request_bias=0.0), [1, 3], [1, 3],
     WeightedRoundRobin),
    ("least request full scan idle", LbConfig("LEAST_REQUEST", full_scan=True), [1, 1, 1], [1, 1, 1], LeastRequest),
]


@pytest.mark.parametrize("case, lb, weights, expected, kind", SHARE_CASES, ids=[c[0] for c in SHARE_CASES])
def test_endpoint_shares(case: str, lb: LbConfig, weights: List[int], expected: List[int], kind: type) -> None:
    endpoints = _eps(len(weights), weights)
    picker = build_picker(_config(endpoints), lb)
    assert type(picker) is kind
    counts = _shares(picker)
    assert _chi_ok(counts, endpoints, expected) > 0.001, counts


def test_weighted_round_robin_is_smooth_not_bursty() -> None:
    """Envoy's EDF interleaves; so must we: in any window of 16 picks over weights 1:3 the
    light endpoint appears 3-5 times (random choice would often give 0-1 or 8)."""
    endpoints = _eps(2, [1, 3])
    picker = WeightedRoundRobin(endpoints, [1.0, 3.0])
    seq = [picker.pick().address for _ in range(4000)]
    for start in range(0, len(seq) - 16, 16):
        assert 3 <= seq[start:start + 16].count("10.0.0.1") <= 5
    assert abs(seq.count("10.0.0.1") - 1000) <= 2


def _states(endpoints: Sequence[Endpoint], active: Sequence[int]) -> dict:
    out = {}
    for ep, n in zip(endpoints, active):
        state = EndpointState((ep.address, ep.port), 0.0)
        state.active = n
        out[(ep.address, ep.port)] = state
    return out


def test_least_request_prefers_less_loaded_endpoints() -> None:
    """P2C: the busiest endpoint is picked only when both draws hit it (1/n²)."""
    endpoints = _eps(3)
    states = _states(endpoints, [10, 0, 0])
    picker = build_picker(_config(endpoints), LbConfig("LEAST_REQUEST"), ClusterView(states))
    counts = _shares(picker)
    assert _chi_ok(counts, endpoints, [1 / 9, 4 / 9, 4 / 9]) > 0.001, counts
    full = build_picker(_config(endpoints), LbConfig("LEAST_REQUEST", full_scan=True), ClusterView(states))
    assert _shares(full, 2000)["10.0.0.1"] == 0
    many = build_picker(_config(endpoints), LbConfig("LEAST_REQUEST", choice_count=8), ClusterView(states))
    assert _shares(many, 3000)["10.0.0.1"] < 3000 * (1 / 3) ** 8 * 10 + 5


def test_weighted_least_request_normalises_load_by_weight() -> None:
    endpoints = _eps(2, [1, 4])
    states = _states(endpoints, [1, 3])  # cost 1/1 vs 3/4: the heavy one is still "less loaded"
    picker = build_picker(_config(endpoints), LbConfig("LEAST_REQUEST"), ClusterView(states))
    counts = _shares(picker, 5000)
    # pick light only when both draws are light: (1/5)² = 4 %
    assert _chi_ok(counts, endpoints, [0.04, 0.96]) > 0.001, counts


def test_least_request_follows_live_counters_without_rebuild() -> None:
    endpoints = _eps(2)
    states = _states(endpoints, [0, 0])
    picker = build_picker(_config(endpoints), LbConfig("LEAST_REQUEST", full_scan=True), ClusterView(states))
    states[("10.0.0.1", 80)].active = 5
    assert {picker.pick().address for _ in range(50)} == {"10.0.0.2"}
    states[("10.0.0.1", 80)].active = 0
    states[("10.0.0.2", 80)].active = 5
    assert {picker.pick().address for _ in range(50)} == {"10.0.0.1"}


POLICIES = [LbConfig(), LbConfig("RANDOM"), LbConfig("LEAST_REQUEST"), LbConfig("LEAST_REQUEST", full_scan=True),
            LbConfig("RING_HASH"), LbConfig("MAGLEV"), LbConfig("PICK_FIRST")]
POLICY_IDS = ["rr", "random", "lr", "lr-full", "ring", "maglev", "pick-first"]


@pytest.mark.parametrize("lb", POLICIES, ids=POLICY_IDS)
@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [1, 2, 3, 4]], ids=["equal", "weighted"])
def test_retries_never_repeat_a_host_while_another_is_left(lb: LbConfig, weights: List[int]) -> None:
    endpoints = _eps(4, weights)
    picker = build_picker(_config(endpoints[:2], endpoints[2:]), lb)
    everyone = {(e.address, e.port) for e in endpoints}
    for i in range(200):
        tried: set = set()
        for _ in range(4):
            ep = picker.pick(request_hash=i * 7919, exclude=tried)
            key = (ep.address, ep.port)
            assert key not in tried, (lb.policy, tried, key)
            tried.add(key)
        assert tried == everyone
        assert picker.pick(request_hash=i, exclude=tried) is not None  # all tried: still answers


@pytest.mark.parametrize("lb", POLICIES, ids=POLICY_IDS)
def test_ejected_endpoints_leave_and_an_all_ejected_priority_fails_over(lb: LbConfig) -> None:
    p0 = _eps(3)
    p1 = [Endpoint("10.0.1.1", 80), Endpoint("10.0.1.2", 80)]
    config = _config(p0, p1, priorities=[0, 1])
    one = frozenset({("10.0.0.1", 80)})
    picker = build_picker(config, lb, ClusterView(ejected=one))
    seen = {picker.pick(request_hash=h).address for h in range(0, 1 << 64, (1 << 64) // 300)}
    assert "10.0.0.1" not in seen and seen <= {"10.0.0.2", "10.0.0.3"}
    all_p0 = frozenset((e.address, e.port) for e in p0)
    picker = build_picker(config, lb, ClusterView(ejected=all_p0))
    seen = {picker.pick(request_hash=h).address for h in range(0, 1 << 64, (1 << 64) // 300)}
    assert seen <= {"10.0.1.1", "10.0.1.2"} and seen
    # Everything ejected everywhere: Envoy's panic mode — ignore ejections rather than fail.
    everything = all_p0 | {(e.address, e.port) for e in p1}
    picker = build_picker(config, lb, ClusterView(ejected=everything))
    assert picker.pick(request_hash=5).address in {e.address for e in p0}


def test_ejection_in_one_locality_keeps_locality_weights_for_the_rest() -> None:
    a = _eps(2)
    b = [Endpoint("10.0.1.1", 80)]
    config = _config(a, b, weights=[1, 3])
    picker = build_picker(config, LbConfig(), ClusterView(ejected=frozenset({("10.0.0.1", 80)})))
    assert isinstance(picker, WeightedRandom)
    counts = _shares(picker, 8000)
    assert set(counts) == {"10.0.0.2", "10.0.1.1"}
    assert chisquare([counts["10.0.0.2"], counts["10.0.1.1"]], [2000, 6000]).pvalue > 0.001
    gone = build_picker(config, LbConfig(), ClusterView(ejected=frozenset({("10.0.0.1", 80), ("10.0.0.2", 80)})))
    assert {gone.pick().address for _ in range(100)} == {"10.0.1.1"}  # locality a has nothing READY


def test_pick_first_order_and_stable_shuffle() -> None:
    endpoints = _eps(5)
    picker = build_picker(_config(endpoints), LbConfig("PICK_FIRST"))
    assert isinstance(picker, PickFirst) and {picker.pick().address for _ in range(20)} == {"10.0.0.1"}
    shuffled = [build_picker(_config(endpoints), LbConfig("PICK_FIRST", shuffle=True), ClusterView(seed=s)).pick().address
                for s in range(40)]
    assert len(set(shuffled)) > 1  # different clients spread
    view_a = ClusterView(seed=11)
    assert build_picker(_config(endpoints), LbConfig("PICK_FIRST", shuffle=True), view_a).pick() == \
        build_picker(_config(endpoints), LbConfig("PICK_FIRST", shuffle=True), ClusterView(seed=11)).pick()


@pytest.mark.parametrize("age, expected", [(0.0, 0.1), (1.0, 0.1), (5.0, 0.5), (8.0, 0.8), (10.0, 1.0), (30.0, 1.0)])
def test_slow_start_factor_is_envoys_formula(age: float, expected: float) -> None:
    assert SlowStart(10.0).factor(age) == pytest.approx(expected)


def test_slow_start_factor_aggression_and_min_weight() -> None:
    slow = SlowStart(100.0, aggression=2.0, min_weight_percent=5.0)
    assert slow.factor(25.0) == pytest.approx(0.5)  # (0.25) ** (1/2)
    assert slow.factor(0.1) == pytest.approx(0.1)  # max(1 s, age) / window = 0.01 → sqrt = 0.1 > 5 %
    assert SlowStart(1000.0, min_weight_percent=5.0).factor(1.0) == pytest.approx(0.05)


@pytest.mark.parametrize("lb", [LbConfig(slow_start=SlowStart(10.0)), LbConfig("LEAST_REQUEST", slow_start=SlowStart(10.0))],
                         ids=["rr", "lr"])
def test_slow_start_weights_a_new_endpoint_by_its_age(lb: LbConfig) -> None:
    endpoints = _eps(3)
    states = _states(endpoints, [0, 0, 0])
    states[("10.0.0.3", 80)].added = 95.0  # joined 5 s before "now": factor 0.5
    view = ClusterView(states, now=100.0)
    picker = build_picker(_config(endpoints), lb, view)
    assert view.slow_start_active
    counts = _shares(picker)
    assert _chi_ok(counts, endpoints, [1, 1, 0.5]) > 0.001, counts
    later = ClusterView(states, now=120.0)
    counts = _shares(build_picker(_config(endpoints), lb, later))
    assert not later.slow_start_active and _chi_ok(counts, endpoints, [1, 1, 1]) > 0.001, counts


def test_pickers_are_safe_to_share_between_threads() -> None:
    endpoints = _eps(5)
    picker = build_picker(_config(endpoints), LbConfig())
    results: List[str] = []
    lock = threading.Lock()

    def worker() -> None:
        local = [picker.pick().address for _ in range(5000)]
        with lock:
            results.extend(local)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    counts = collections.Counter(results)
    # A shared atomic cursor: round robin stays exact across threads (each value drawn once).
    assert set(counts.values()) == {8000}


def test_empty_and_unhealthy() -> None:
    assert isinstance(build_picker(None), EmptyPicker)
    unhealthy = [Endpoint("10.0.0.1", 80, 2)]
    for lb in POLICIES:
        assert isinstance(build_picker(_config(unhealthy), lb), EmptyPicker)
