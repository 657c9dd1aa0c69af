"""CDS traffic-policy decoding: LB policies (enum and typed), circuit breakers, outlier detection.

Table-driven over real protobuf resources; every unsupported value must NACK
with a reason naming the field, every unset field must get Envoy's default.
One test takes the whole path: the NACK travels back to a real ADS server.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.extensions.load_balancing_policies.client_side_weighted_round_robin.v3 import (
    client_side_weighted_round_robin_pb2 as cswrr_pb2,
)
from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2
from envoy.extensions.load_balancing_policies.maglev.v3 import maglev_pb2
from envoy.extensions.load_balancing_policies.pick_first.v3 import pick_first_pb2
from envoy.extensions.load_balancing_policies.random.v3 import random_pb2
from envoy.extensions.load_balancing_policies.ring_hash.v3 import ring_hash_pb2
from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2
from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2
from google.protobuf import any_pb2

from meshpatch.routing.cluster_policy import CircuitBreakers, LbConfig, OutlierConfig, SlowStart
from meshpatch.xds.client import ACKED
from meshpatch.xds.decode import ResourceError, decode_cluster, decode_endpoints
from meshpatch.xds.type_urls import CDS
from tests.support import xds_resources as res
from tests.support.lb import CLUSTER, lb_mesh

C = cluster_pb2.Cluster


def _decode(cluster: C) -> Any:
    packed = any_pb2.Any()
    packed.Pack(cluster)
    return decode_cluster(packed)[1]


def _typed(*messages: Any) -> Callable[[C], None]:
    def apply(c: C) -> None:
        c.lb_policy = C.LOAD_BALANCING_POLICY_CONFIG
        for message in messages:
            entry = c.load_balancing_policy.policies.add()
            entry.typed_extension_config.name = message.DESCRIPTOR.full_name
            entry.typed_extension_config.typed_config.Pack(message)
    return apply


def _wrr(child: Any) -> Any:
    wrr = wrr_locality_pb2.WrrLocality()
    entry = wrr.endpoint_picking_policy.policies.add()
    entry.typed_extension_config.name = "child"
    entry.typed_extension_config.typed_config.Pack(child)
    return wrr


def _set(**fields: Any) -> Callable[[C], None]:
    def apply(c: C) -> None:
        for path, value in fields.items():
            target = c
            parts = path.split("__")
            for part in parts[:-1]:
                target = getattr(target, part)
            leaf = parts[-1]
            if leaf == "value_of":
                target.value = value
            elif hasattr(getattr(target, leaf), "CopyFrom") and not isinstance(value, (int, float, str, bool)):
                getattr(target, leaf).CopyFrom(value)
            else:
                setattr(target, leaf, value)
    return apply


def _lr_typed() -> Any:
    lr = least_request_pb2.LeastRequest()
    lr.choice_count.value = 4
    lr.active_request_bias.default_value = 0.5
    lr.slow_start_config.slow_start_window.seconds = 30
    lr.slow_start_config.aggression.default_value = 2.0
    lr.slow_start_config.min_weight_percent.value = 25.0
    return lr


def _rr_slow() -> Any:
    rr = round_robin_pb2.RoundRobin()
    rr.slow_start_config.slow_start_window.seconds = 10
    return rr


def _ring(minimum: int = 0, maximum: int = 0, fn: int = 0) -> Any:
    rh = ring_hash_pb2.RingHash(hash_function=fn)
    if minimum:
        rh.minimum_ring_size.value = minimum
    if maximum:
        rh.maximum_ring_size.value = maximum
    return rh


def _maglev(size: int) -> Any:
    m = maglev_pb2.Maglev()
    m.table_size.value = size
    return m


def _least_request_cfg(c: C) -> None:
    c.lb_policy = C.LEAST_REQUEST
    c.least_request_lb_config.choice_count.value = 3
    c.least_request_lb_config.active_request_bias.default_value = 1.5


def _ring_cfg(c: C) -> None:
    c.lb_policy = C.RING_HASH
    c.ring_hash_lb_config.minimum_ring_size.value = 64
    c.ring_hash_lb_config.maximum_ring_size.value = 256


def _rr_slow_cfg(c: C) -> None:
    c.round_robin_lb_config.slow_start_config.slow_start_window.seconds = 20
    c.round_robin_lb_config.slow_start_config.min_weight_percent.value = 5.0


def _zero_aggression(c: C) -> None:
    _rr_slow_cfg(c)
    c.round_robin_lb_config.slow_start_config.aggression.runtime_key = "aggression"  # present, default 0


LB_CASES = [
    ("default is round robin", lambda c: None, LbConfig()),
    ("round robin slow start", _rr_slow_cfg, LbConfig(slow_start=SlowStart(20.0, 1.0, 5.0))),
    ("least request defaults", _set(lb_policy=C.LEAST_REQUEST), LbConfig("LEAST_REQUEST")),
    ("least request config", _least_request_cfg, LbConfig("LEAST_REQUEST", choice_count=3, active_request_bias=1.5)),
    ("random", _set(lb_policy=C.RANDOM), LbConfig("RANDOM")),
    ("ring hash defaults (Envoy max 8M)", _set(lb_policy=C.RING_HASH), LbConfig("RING_HASH")),
    ("ring hash sizes", _ring_cfg, LbConfig("RING_HASH", min_ring_size=64, max_ring_size=256)),
    ("maglev default table", _set(lb_policy=C.MAGLEV), LbConfig("MAGLEV")),
    ("maglev table 251", _set(lb_policy=C.MAGLEV, maglev_lb_config__table_size__value_of=251),
     LbConfig("MAGLEV", table_size=251)),
    ("typed round robin + slow start", _typed(_rr_slow()),
     LbConfig(slow_start=SlowStart(10.0), source="load_balancing_policy")),
    ("typed least request", _typed(_lr_typed()),
     LbConfig("LEAST_REQUEST", choice_count=4, active_request_bias=0.5, slow_start=SlowStart(30.0, 2.0, 25.0),
              source="load_balancing_policy")),
    ("typed least request full scan", _typed(least_request_pb2.LeastRequest(selection_method=1)),
     LbConfig("LEAST_REQUEST", full_scan=True, source="load_balancing_policy")),
    ("typed random", _typed(random_pb2.Random()), LbConfig("RANDOM", source="load_balancing_policy")),
    ("typed ring hash", _typed(_ring(100, 1000)),
     LbConfig("RING_HASH", min_ring_size=100, max_ring_size=1000, source="load_balancing_policy")),
    ("typed maglev", _typed(_maglev(65537)), LbConfig("MAGLEV", source="load_balancing_policy")),
    ("typed pick first", _typed(pick_first_pb2.PickFirst(shuffle_address_list=True)),
     LbConfig("PICK_FIRST", shuffle=True, source="load_balancing_policy")),
    ("wrr_locality wrapping round robin", _typed(_wrr(round_robin_pb2.RoundRobin())),
     LbConfig(source="load_balancing_policy")),
    ("wrr_locality wrapping least request", _typed(_wrr(least_request_pb2.LeastRequest())),
     LbConfig("LEAST_REQUEST", source="load_balancing_policy")),
    ("first supported policy of the list wins (A52)", _typed(cswrr_pb2.ClientSideWeightedRoundRobin(), _ring(16, 32)),
     LbConfig("RING_HASH", min_ring_size=16, max_ring_size=32, source="load_balancing_policy")),
    ("typed policy wins over lb_policy", lambda c: (_typed(random_pb2.Random())(c), setattr(c, "lb_policy", C.MAGLEV)),
     LbConfig("RANDOM", source="load_balancing_policy")),
]


@pytest.mark.parametrize("case, mutate, expected", LB_CASES, ids=[c[0] for c in LB_CASES])
def test_lb_policy_decoding(case: str, mutate: Callable[[C], None], expected: LbConfig) -> None:
    cluster = res.cluster("c")
    mutate(cluster)
    config = _decode(cluster)
    assert config.lb == expected
    assert config.lb_policy == expected.policy


NACK_CASES = [
    ("cluster provided", _set(lb_policy=C.CLUSTER_PROVIDED), "CLUSTER_PROVIDED not supported"),
    ("murmur ring", _set(lb_policy=C.RING_HASH, ring_hash_lb_config__hash_function=1), "XX_HASH"),
    ("ring min > max", lambda c: (_ring_cfg(c), setattr(c.ring_hash_lb_config.minimum_ring_size, "value", 512)),
     "larger than maximum_ring_size"),
    ("ring too large", _set(lb_policy=C.RING_HASH, ring_hash_lb_config__maximum_ring_size__value_of=8388609),
     "maximum_ring_size must be in"),
    ("maglev not prime", _set(lb_policy=C.MAGLEV, maglev_lb_config__table_size__value_of=1000), "prime"),
    ("maglev too large", _set(lb_policy=C.MAGLEV, maglev_lb_config__table_size__value_of=5000087), "at most 5000011"),
    ("choice count 1", _set(lb_policy=C.LEAST_REQUEST, least_request_lb_config__choice_count__value_of=1),
     "choice_count must be at least 2"),
    ("typed murmur", _typed(_ring(fn=2)), "XX_HASH"),
    ("only client side WRR", _typed(cswrr_pb2.ClientSideWeightedRoundRobin()), "ORCA"),
    ("LOAD_BALANCING_POLICY_CONFIG without policy", _set(lb_policy=C.LOAD_BALANCING_POLICY_CONFIG),
     "without load_balancing_policy"),
    ("zero aggression", lambda c: _zero_aggression(c), "aggression must be greater than 0"),
]


@pytest.mark.parametrize("case, mutate, reason", NACK_CASES, ids=[c[0] for c in NACK_CASES])
def test_unsupported_lb_values_are_rejected_with_reason(case: str, mutate: Callable[[C], None], reason: str) -> None:
    cluster = res.cluster("bad-cluster")
    mutate(cluster)
    with pytest.raises(ResourceError) as info:
        _decode(cluster)
    assert info.value.name == "bad-cluster"
    assert reason in info.value.reason


def _thresholds(c: C, priority: int = 0, **values: int) -> Any:
    t = c.circuit_breakers.thresholds.add(priority=priority)
    for name, value in values.items():
        getattr(t, name).value = value
    return t


def _budget(c: C) -> None:
    t = _thresholds(c, max_requests=50)
    t.retry_budget.budget_percent.value = 25.0
    t.retry_budget.min_retry_concurrency.value = 2


CB_CASES = [
    ("none: Envoy defaults", lambda c: None, CircuitBreakers(1024, 1024, 1024, 3)),
    ("max_requests only (istiod http2MaxRequests)", lambda c: _thresholds(c, max_requests=7),
     CircuitBreakers(max_requests=7)),
    ("all four", lambda c: _thresholds(c, max_connections=1, max_pending_requests=2, max_requests=3, max_retries=4),
     CircuitBreakers(1, 2, 3, 4)),
    ("HIGH priority ignored, DEFAULT used",
     lambda c: (_thresholds(c, priority=1, max_requests=1), _thresholds(c, max_requests=9)),
     CircuitBreakers(max_requests=9)),
    ("retry budget", _budget, CircuitBreakers(max_requests=50, budget_percent=25.0, min_retry_concurrency=2)),
]


@pytest.mark.parametrize("case, mutate, expected", CB_CASES, ids=[c[0] for c in CB_CASES])
def test_circuit_breaker_decoding(case: str, mutate: Callable[[C], None], expected: CircuitBreakers) -> None:
    cluster = res.cluster("c")
    mutate(cluster)
    assert _decode(cluster).circuit_breakers == expected


def _od(**values: Any) -> Callable[[C], None]:
    def apply(c: C) -> None:
        od = c.outlier_detection
        od.SetInParent()
        for name, value in values.items():
            field = getattr(od, name)
            if name in ("interval", "base_ejection_time", "max_ejection_time", "max_ejection_time_jitter"):
                field.SetInParent()
                field.FromMilliseconds(int(value * 1000))
            elif name == "split_external_local_origin_errors":
                setattr(od, name, value)
            else:
                field.value = value
    return apply


OD_CASES = [
    ("absent", lambda c: None, None),
    ("empty message: all Envoy defaults", _od(), OutlierConfig()),
    ("consecutive and times", _od(consecutive_5xx=3, interval=1.5, base_ejection_time=2.0, max_ejection_percent=50),
     OutlierConfig(consecutive_5xx=3, interval=1.5, base_ejection_time=2.0, max_ejection_time=300.0,
                   max_ejection_percent=50)),
    ("base above 300 s lifts the default max", _od(base_ejection_time=400.0),
     OutlierConfig(base_ejection_time=400.0, max_ejection_time=400.0)),
    ("success rate and failure percentage", _od(success_rate_minimum_hosts=3, success_rate_request_volume=10,
                                                success_rate_stdev_factor=1000, failure_percentage_threshold=50,
                                                enforcing_failure_percentage=100, failure_percentage_minimum_hosts=2,
                                                failure_percentage_request_volume=5),
     OutlierConfig(success_rate_minimum_hosts=3, success_rate_request_volume=10, success_rate_stdev_factor=1000,
                   failure_percentage_threshold=50, enforcing_failure_percentage=100,
                   failure_percentage_minimum_hosts=2, failure_percentage_request_volume=5)),
    ("split local origin", _od(split_external_local_origin_errors=True, consecutive_local_origin_failure=2,
                               always_eject_one_host=True),
     OutlierConfig(split_external_local_origin_errors=True, consecutive_local_origin_failure=2,
                   always_eject_one_host=True)),
]


@pytest.mark.parametrize("case, mutate, expected", OD_CASES, ids=[c[0] for c in OD_CASES])
def test_outlier_detection_decoding(case: str, mutate: Callable[[C], None], expected: Optional[OutlierConfig]) -> None:
    cluster = res.cluster("c")
    mutate(cluster)
    assert _decode(cluster).outlier == expected


@pytest.mark.parametrize("mutate, reason", [
    (_od(base_ejection_time=60.0, max_ejection_time=30.0), "max_ejection_time cannot be smaller"),
    (_od(enforcing_consecutive_5xx=101), "enforcing_consecutive_5xx must be at most 100"),
    (_od(max_ejection_percent=150), "max_ejection_percent must be at most 100"),
    (_od(interval=0.0001), None),  # 0 ms after FromMilliseconds: rejected as not > 0
], ids=["max below base", "enforcing over 100", "max ejection percent over 100", "zero interval"])
def test_invalid_outlier_detection_is_rejected(mutate: Callable[[C], None], reason: Optional[str]) -> None:
    cluster = res.cluster("c")
    mutate(cluster)
    with pytest.raises(ResourceError) as info:
        _decode(cluster)
    if reason:
        assert reason in info.value.reason
    else:
        assert "interval" in info.value.reason


def test_duplicate_endpoint_addresses_are_rejected() -> None:
    cla = res.cla("c", [("10.0.0.1", 80), ("10.0.0.2", 80)], extra_groups=[(("r", "z2", ""), 1, 0, [("10.0.0.1", 80)])])
    packed = any_pb2.Any()
    packed.Pack(cla)
    with pytest.raises(ResourceError) as info:
        decode_endpoints(packed)
    assert "duplicate endpoint address 10.0.0.1:80" in info.value.reason
    fine = res.cla("c", [("10.0.0.1", 80), ("10.0.0.1", 81)], health=health_check_pb2.UNKNOWN)
    packed.Pack(fine)
    assert len(decode_endpoints(packed)[1].localities[0].endpoints) == 2


def test_nack_reaches_the_control_plane_and_last_good_cluster_stays() -> None:
    """Through real xDS: a cluster update with a non-prime Maglev table is NACKed with
    the reason; the running LEAST_REQUEST config stays in force."""
    good = res.cluster(CLUSTER, lb=C.LEAST_REQUEST)
    with lb_mesh() as mesh:
        mesh.serve(good, res.cla(CLUSTER, [("127.0.0.2", 8080), ("127.0.0.3", 8080)]))
        assert mesh.handle.config.lb.policy == "LEAST_REQUEST"
        bad = res.cluster(CLUSTER, lb=C.MAGLEV)
        bad.maglev_lb_config.table_size.value = 65536
        with pytest.raises(ValueError) as info:
            mesh.push_cds(bad)
        assert CLUSTER in str(info.value) and "prime" in str(info.value)
        assert mesh.handle.config.lb.policy == "LEAST_REQUEST"
        assert mesh.pick().address in ("127.0.0.2", "127.0.0.3")
        fixed = res.cluster(CLUSTER, lb=C.MAGLEV)
        mesh.push_cds(fixed)
        assert mesh.handle.config.lb.policy == "MAGLEV"
        assert type(mesh.handle.picker).__name__ == "Maglev"
        assert mesh.client.resource_status(CDS, CLUSTER) == ACKED
