"""CDS traffic-policy fields → :mod:`meshpatch.routing.cluster_policy` objects.

Every function raises ``ValueError`` with a reason fit for a NACK: a field we
support carrying a value we cannot honour is rejected (gRPC's rule, FEAT
§1), so the control plane learns about it instead of the app silently
getting different behaviour.  Unknown or unsupported *optional* fields are
ignored as gRPC ignores them.
"""

from __future__ import annotations

from typing import Any, Optional

from envoy.config.cluster.v3 import cluster_pb2

from meshpatch.routing.cluster_policy import (
    DEFAULT_MAGLEV_TABLE_SIZE,
    LEAST_REQUEST,
    MAGLEV,
    MAX_MAGLEV_TABLE_SIZE,
    MAX_RING_SIZE,
    PICK_FIRST,
    RANDOM,
    RING_HASH,
    ROUND_ROBIN,
    CircuitBreakers,
    LbConfig,
    OutlierConfig,
    SlowStart,
    outlier_from_values,
)

_LB_NAMES = {v: k for k, v in cluster_pb2.Cluster.LbPolicy.items()}
_TYPED_PREFIX = "type.googleapis.com/envoy.extensions.load_balancing_policies."
MAX_POLICY_DEPTH = 8  # wrr_locality nesting guard


def _seconds(duration: Any) -> float:
    return duration.seconds + duration.nanos / 1e9


def _wrapped(message: Any, field: str, default: Any) -> Any:
    return getattr(message, field).value if message.HasField(field) else default


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    i = 3
    while i * i <= n:
        if n % i == 0:
            return False
        i += 2
    return True


# --- load balancing policy --------------------------------------------------

def lb_config(cluster: Any) -> LbConfig:
    """The cluster's LB policy: the typed ``load_balancing_policy`` when present
    (gRPC A52: it then wins over ``lb_policy``), else ``lb_policy`` and its config."""
    if cluster.HasField("load_balancing_policy"):
        return _typed_policy(cluster.load_balancing_policy, 0)
    name = _LB_NAMES.get(cluster.lb_policy, str(cluster.lb_policy))
    if name == "ROUND_ROBIN":
        slow = cluster.round_robin_lb_config.slow_start_config if cluster.HasField("round_robin_lb_config") else None
        return LbConfig(ROUND_ROBIN, slow_start=_slow_start(slow))
    if name == "LEAST_REQUEST":
        lr = cluster.least_request_lb_config
        return _least_request(lr.choice_count if lr.HasField("choice_count") else None,
                              lr.active_request_bias if lr.HasField("active_request_bias") else None,
                              lr.slow_start_config if lr.HasField("slow_start_config") else None, False)
    if name == "RANDOM":
        return LbConfig(RANDOM)
    if name == "RING_HASH":
        rh = cluster.ring_hash_lb_config
        if rh.hash_function != cluster_pb2.Cluster.RingHashLbConfig.XX_HASH:
            raise ValueError("ring_hash_lb_config.hash_function must be XX_HASH (MURMUR_HASH_2 is not supported)")
        return _ring_hash(_wrapped(rh, "minimum_ring_size", 1024), _wrapped(rh, "maximum_ring_size", MAX_RING_SIZE))
    if name == "MAGLEV":
        return _maglev(_wrapped(cluster.maglev_lb_config, "table_size", DEFAULT_MAGLEV_TABLE_SIZE))
    if name == "LOAD_BALANCING_POLICY_CONFIG":
        raise ValueError("lb_policy LOAD_BALANCING_POLICY_CONFIG without load_balancing_policy")
    raise ValueError(f"lb_policy {name} not supported (supported: ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV)")


def _typed_policy(policy: Any, depth: int) -> LbConfig:
    """First policy of the list meshpatch supports, as gRPC A52 does; none → NACK."""
    if depth > MAX_POLICY_DEPTH:
        raise ValueError("load_balancing_policy nested too deeply")
    skipped = []
    for entry in policy.policies:
        typed = entry.typed_extension_config.typed_config
        type_url = typed.type_url
        decoded = _typed_one(type_url, typed, depth)
        if decoded is not None:
            return decoded
        skipped.append(_short(type_url) or entry.typed_extension_config.name or "<empty>")
    if not skipped:
        raise ValueError("load_balancing_policy has no policies")
    reasons = "; ".join(_UNSUPPORTED_REASON.get(s, f"{s} is not supported") for s in skipped)
    raise ValueError(f"no supported policy in load_balancing_policy ({reasons})")


_UNSUPPORTED_REASON = {
    "client_side_weighted_round_robin.v3.ClientSideWeightedRoundRobin":
        "client_side_weighted_round_robin needs ORCA backend load reports, which meshpatch does not read",
}


def _short(type_url: str) -> str:
    return type_url[len(_TYPED_PREFIX):] if type_url.startswith(_TYPED_PREFIX) else type_url.rpartition("/")[2]


def _unpack(typed: Any, message: Any) -> Any:
    if not typed.Unpack(message):
        raise ValueError(f"cannot decode {typed.type_url}")
    return message


def _typed_one(type_url: str, typed: Any, depth: int) -> Optional[LbConfig]:
    short = _short(type_url) if type_url.startswith(_TYPED_PREFIX) else ""
    if short == "round_robin.v3.RoundRobin":
        from envoy.extensions.load_balancing_policies.round_robin.v3 import round_robin_pb2

        rr = _unpack(typed, round_robin_pb2.RoundRobin())
        slow = rr.slow_start_config if rr.HasField("slow_start_config") else None
        return LbConfig(ROUND_ROBIN, slow_start=_slow_start(slow), source="load_balancing_policy")
    if short == "least_request.v3.LeastRequest":
        from envoy.extensions.load_balancing_policies.least_request.v3 import least_request_pb2

        lr = _unpack(typed, least_request_pb2.LeastRequest())
        full = lr.selection_method == least_request_pb2.LeastRequest.FULL_SCAN or (
            lr.HasField("enable_full_scan") and lr.enable_full_scan.value)
        config = _least_request(lr.choice_count if lr.HasField("choice_count") else None,
                                lr.active_request_bias if lr.HasField("active_request_bias") else None,
                                lr.slow_start_config if lr.HasField("slow_start_config") else None, full)
        return _typed_source(config)
    if short == "random.v3.Random":
        return LbConfig(RANDOM, source="load_balancing_policy")
    if short == "ring_hash.v3.RingHash":
        from envoy.extensions.load_balancing_policies.ring_hash.v3 import ring_hash_pb2

        rh = _unpack(typed, ring_hash_pb2.RingHash())
        if rh.hash_function not in (ring_hash_pb2.RingHash.DEFAULT_HASH, ring_hash_pb2.RingHash.XX_HASH):
            raise ValueError("RingHash.hash_function must be XX_HASH (MURMUR_HASH_2 is not supported)")
        return _typed_source(_ring_hash(_wrapped(rh, "minimum_ring_size", 1024),
                                        _wrapped(rh, "maximum_ring_size", MAX_RING_SIZE)))
    if short == "maglev.v3.Maglev":
        from envoy.extensions.load_balancing_policies.maglev.v3 import maglev_pb2

        mg = _unpack(typed, maglev_pb2.Maglev())
        return _typed_source(_maglev(_wrapped(mg, "table_size", DEFAULT_MAGLEV_TABLE_SIZE)))
    if short == "pick_first.v3.PickFirst":
        from envoy.extensions.load_balancing_policies.pick_first.v3 import pick_first_pb2

        pf = _unpack(typed, pick_first_pb2.PickFirst())
        return LbConfig(PICK_FIRST, shuffle=pf.shuffle_address_list, source="load_balancing_policy")
    if short == "wrr_locality.v3.WrrLocality":
        from envoy.extensions.load_balancing_policies.wrr_locality.v3 import wrr_locality_pb2

        wrr = _unpack(typed, wrr_locality_pb2.WrrLocality())
        if not wrr.HasField("endpoint_picking_policy"):
            raise ValueError("WrrLocality without endpoint_picking_policy")
        # Locality weights always apply in meshpatch (as in gRPC); the child picks endpoints.
        return _typed_policy(wrr.endpoint_picking_policy, depth + 1)
    return None


def _typed_source(config: LbConfig) -> LbConfig:
    from dataclasses import replace

    return replace(config, source="load_balancing_policy")


def _least_request(choice_count: Any, bias: Any, slow: Any, full_scan: bool) -> LbConfig:
    count = 2 if choice_count is None else choice_count.value
    if count < 2:
        raise ValueError(f"least request choice_count must be at least 2 (got {count})")
    active_bias = 1.0 if bias is None else bias.default_value
    if active_bias < 0:
        raise ValueError("least request active_request_bias must not be negative")
    return LbConfig(LEAST_REQUEST, choice_count=count, active_request_bias=active_bias, full_scan=full_scan,
                    slow_start=_slow_start(slow))


def _ring_hash(minimum: int, maximum: int) -> LbConfig:
    if not 1 <= minimum <= MAX_RING_SIZE:
        raise ValueError(f"ring hash minimum_ring_size must be in [1, {MAX_RING_SIZE}] (got {minimum})")
    if not 1 <= maximum <= MAX_RING_SIZE:
        raise ValueError(f"ring hash maximum_ring_size must be in [1, {MAX_RING_SIZE}] (got {maximum})")
    if minimum > maximum:
        raise ValueError("ring hash minimum_ring_size is larger than maximum_ring_size")
    return LbConfig(RING_HASH, min_ring_size=minimum, max_ring_size=maximum)


def _maglev(table_size: int) -> LbConfig:
    if table_size > MAX_MAGLEV_TABLE_SIZE:
        raise ValueError(f"maglev table_size must be at most {MAX_MAGLEV_TABLE_SIZE} (got {table_size})")
    if not _is_prime(table_size):
        raise ValueError(f"maglev table_size must be a prime number (got {table_size})")
    return LbConfig(MAGLEV, table_size=table_size)


def _slow_start(config: Any) -> Optional[SlowStart]:
    """Envoy: no window (or a zero one) means no slow start."""
    if config is None or not config.HasField("slow_start_window"):
        return None
    window = _seconds(config.slow_start_window)
    if window <= 0:
        return None
    aggression = config.aggression.default_value if config.HasField("aggression") else 1.0
    if aggression <= 0:
        raise ValueError("slow_start_config.aggression must be greater than 0")
    minimum = config.min_weight_percent.value if config.HasField("min_weight_percent") else 10.0
    if not 0 <= minimum <= 100:
        raise ValueError("slow_start_config.min_weight_percent must be within 0-100")
    return SlowStart(window, aggression, minimum)


# --- circuit breakers -------------------------------------------------------

def circuit_breakers(cluster: Any) -> CircuitBreakers:
    """The first DEFAULT-priority threshold, Envoy defaults for unset values (A32: gRPC
    reads only max_requests; meshpatch honours the others too)."""
    if not cluster.HasField("circuit_breakers"):
        return CircuitBreakers()
    for threshold in cluster.circuit_breakers.thresholds:
        if threshold.priority != 0:  # HIGH: meshpatch has no request priorities
            continue
        budget = None
        min_concurrency = 3
        if threshold.HasField("retry_budget"):
            rb = threshold.retry_budget
            budget = rb.budget_percent.value if rb.HasField("budget_percent") else 20.0
            if not 0 <= budget <= 100:
                raise ValueError("retry_budget.budget_percent must be within 0-100")
            min_concurrency = _wrapped(rb, "min_retry_concurrency", 3)
        return CircuitBreakers(
            max_connections=_wrapped(threshold, "max_connections", 1024),
            max_pending_requests=_wrapped(threshold, "max_pending_requests", 1024),
            max_requests=_wrapped(threshold, "max_requests", 1024),
            max_retries=_wrapped(threshold, "max_retries", 3),
            budget_percent=budget,
            min_retry_concurrency=min_concurrency,
        )
    return CircuitBreakers()


# --- outlier detection ------------------------------------------------------

_OD_COUNTS = ("consecutive_5xx", "consecutive_gateway_failure", "consecutive_local_origin_failure",
              "success_rate_minimum_hosts", "success_rate_request_volume", "success_rate_stdev_factor",
              "failure_percentage_minimum_hosts", "failure_percentage_request_volume")
_OD_PERCENTS = ("enforcing_consecutive_5xx", "enforcing_consecutive_gateway_failure",
                "enforcing_consecutive_local_origin_failure", "enforcing_success_rate",
                "enforcing_local_origin_success_rate", "failure_percentage_threshold",
                "enforcing_failure_percentage", "enforcing_failure_percentage_local_origin", "max_ejection_percent")
_OD_DURATIONS = ("interval", "base_ejection_time", "max_ejection_time", "max_ejection_time_jitter")


def outlier_detection(cluster: Any) -> Optional[OutlierConfig]:
    """The cluster's OutlierDetection with Envoy defaults; None when absent."""
    if not cluster.HasField("outlier_detection"):
        return None
    od = cluster.outlier_detection
    values: dict = {}
    for name in _OD_COUNTS:
        if od.HasField(name):
            values[name] = getattr(od, name).value
    for name in _OD_PERCENTS:
        if od.HasField(name):
            value = getattr(od, name).value
            if value > 100:
                raise ValueError(f"outlier_detection.{name} must be at most 100 (got {value})")
            values[name] = value
    for name in _OD_DURATIONS:
        if od.HasField(name):
            values[name] = _seconds(getattr(od, name))
    for name in ("interval", "base_ejection_time"):
        if name in values and values[name] <= 0:
            raise ValueError(f"outlier_detection.{name} must be greater than 0")
    values["split_external_local_origin_errors"] = od.split_external_local_origin_errors
    if od.HasField("always_eject_one_host"):
        values["always_eject_one_host"] = od.always_eject_one_host.value
    return outlier_from_values(values, "xds")
