"""Per-cluster traffic policy: load balancer, slow start, circuit breakers, outlier detection.

These are the validated forms of the CDS fields (``lb_policy`` and its configs,
the typed ``load_balancing_policy``, ``circuit_breakers``, ``outlier_detection``)
with Envoy's defaults filled in, so the cluster code never consults a proto.
Outlier detection can also come from meshpatch's environment defaults or the
built-in connect-failure detector, because istiod never sends it to proxyless
clients (xds-istio.md §3.5).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional

ROUND_ROBIN = "ROUND_ROBIN"
LEAST_REQUEST = "LEAST_REQUEST"
RANDOM = "RANDOM"
RING_HASH = "RING_HASH"
MAGLEV = "MAGLEV"
PICK_FIRST = "PICK_FIRST"
POLICIES = (ROUND_ROBIN, LEAST_REQUEST, RANDOM, RING_HASH, MAGLEV, PICK_FIRST)

# gRPC caps every ring at 4096 entries whatever the cluster asks for
# (GRPC_ARG_RING_HASH_LB_RING_SIZE_CAP); following it keeps meshpatch's ring
# identical to grpcio's.  MESHPATCH_RING_HASH_SIZE_CAP raises it (8388608 = Envoy).
DEFAULT_RING_SIZE_CAP = 4096
MAX_RING_SIZE = 8_388_608
DEFAULT_MAGLEV_TABLE_SIZE = 65537
MAX_MAGLEV_TABLE_SIZE = 5_000_011


@dataclass(frozen=True, slots=True)
class SlowStart:
    """Envoy slow_start_config: a new endpoint's weight ramps over ``window`` seconds as
    ``weight * max(min_weight_percent/100, (t/window) ** (1/aggression))``."""

    window: float
    aggression: float = 1.0
    min_weight_percent: float = 10.0

    def factor(self, age: float) -> float:
        """Weight multiplier for an endpoint that joined ``age`` seconds ago (1.0 = ramp over)."""
        if age >= self.window:
            return 1.0
        time_factor = max(age, 1.0) / self.window
        ramp = time_factor ** (1.0 / self.aggression) if self.aggression != 1.0 else time_factor
        return min(1.0, max(self.min_weight_percent / 100.0, ramp))


@dataclass(frozen=True, slots=True)
class LbConfig:
    """``policy`` is one of :data:`POLICIES`; the other fields apply to their policy only."""

    policy: str = ROUND_ROBIN
    choice_count: int = 2
    active_request_bias: float = 1.0
    full_scan: bool = False  # least request selection_method FULL_SCAN
    min_ring_size: int = 1024
    max_ring_size: int = MAX_RING_SIZE
    table_size: int = DEFAULT_MAGLEV_TABLE_SIZE
    shuffle: bool = False  # pick_first shuffle_address_list
    slow_start: Optional[SlowStart] = None
    source: str = "lb_policy"  # or "load_balancing_policy" (typed, gRPC A52)

    @property
    def hashing(self) -> bool:
        return self.policy in (RING_HASH, MAGLEV)


DEFAULT_LB = LbConfig()


@dataclass(frozen=True, slots=True)
class CircuitBreakers:
    """Envoy thresholds for the DEFAULT priority, Envoy's defaults when unset.

    An in-process client queues nothing itself, so "pending" is read the way
    Envoy's HTTP/1.1 pool sees it: a call in flight beyond ``max_connections``
    would wait for a free connection in Envoy, i.e. be pending.  A call is
    refused once ``max_connections + max_pending_requests`` HTTP/1.1 calls are
    in flight.  gRPC multiplexes calls on one HTTP/2 connection, where only
    ``max_requests`` limits them.  ``retry_budget`` (when set) replaces
    ``max_retries`` by ``max(min_retry_concurrency, budget% of active requests)``.
    """

    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3
    budget_percent: Optional[float] = None
    min_retry_concurrency: int = 3


DEFAULT_CIRCUIT_BREAKERS = CircuitBreakers()


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """Envoy OutlierDetection with Envoy's defaults (times in seconds, percentages 0-100).

    ``source`` says where it came from: ``xds`` (the cluster), ``env``
    (MESHPATCH_OUTLIER_* defaults for clusters without one) or ``builtin`` (the
    conservative connect-failure detector meshpatch runs when neither exists).
    ``connect_failures_only`` narrows local-origin failures to refused or
    unreachable connections (the built-in detector does not judge timeouts).
    """

    consecutive_5xx: int = 5
    enforcing_consecutive_5xx: int = 100
    consecutive_gateway_failure: int = 5
    enforcing_consecutive_gateway_failure: int = 0
    consecutive_local_origin_failure: int = 5
    enforcing_consecutive_local_origin_failure: int = 100
    split_external_local_origin_errors: bool = False
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_time_jitter: float = 0.0
    max_ejection_percent: int = 10
    always_eject_one_host: bool = False
    success_rate_minimum_hosts: int = 5
    success_rate_request_volume: int = 100
    success_rate_stdev_factor: int = 1900
    enforcing_success_rate: int = 100
    enforcing_local_origin_success_rate: int = 100
    failure_percentage_threshold: int = 85
    failure_percentage_minimum_hosts: int = 5
    failure_percentage_request_volume: int = 50
    enforcing_failure_percentage: int = 0
    enforcing_failure_percentage_local_origin: int = 0
    source: str = "xds"
    connect_failures_only: bool = False


# The built-in detector (issue 6): a refused or unreachable endpoint is taken
# out after 5 consecutive connect failures (Envoy's consecutive_local_origin_failure
# default), for 30 s growing to 300 s while it keeps failing; at most half the
# cluster (but always one endpoint) is ejected.  Nothing else is judged: 5xx
# answers, timeouts and resets need an explicit outlier detection config.
BUILTIN_OUTLIER = OutlierConfig(
    enforcing_consecutive_5xx=0,
    enforcing_consecutive_gateway_failure=0,
    split_external_local_origin_errors=True,
    max_ejection_percent=50,
    always_eject_one_host=True,
    enforcing_success_rate=0,
    enforcing_local_origin_success_rate=0,
    source="builtin",
    connect_failures_only=True,
)

def outlier_from_values(values: Mapping[str, Any], source: str) -> OutlierConfig:
    """An :class:`OutlierConfig` with Envoy defaults for every field not in ``values``.

    Like Envoy, an unset max_ejection_time is max(300 s, base_ejection_time);
    a max_ejection_time below base_ejection_time is an error (ValueError).
    """
    fields = dict(values)
    base = fields.get("base_ejection_time", 30.0)
    if "max_ejection_time" not in fields:
        fields["max_ejection_time"] = max(300.0, base)
    if fields["max_ejection_time"] < base:
        raise ValueError("max_ejection_time cannot be smaller than base_ejection_time")
    if fields.get("interval", 10.0) <= 0:
        raise ValueError("interval must be greater than 0")
    return replace(OutlierConfig(), source=source, **fields)


_env_default: Optional[OutlierConfig] = None
_env_loaded = False


def default_outlier() -> Optional[OutlierConfig]:
    """The outlier detection for clusters that have none: MESHPATCH_OUTLIER_* if set,
    else the built-in connect-failure detector, None if MESHPATCH_OUTLIER_DETECTION=off.

    Read from the environment once per process; the agent validates the same
    variables at start (meshpatch.config.Settings), so a bad value has already
    switched meshpatch off with a clear message before this runs.
    """
    global _env_default, _env_loaded
    if not _env_loaded:
        import os

        from meshpatch.config import ConfigError, parse_outlier_env

        try:
            mode, values = parse_outlier_env(os.environ)
        except ConfigError:
            mode, values = "builtin", {}
        _env_default = _resolve(mode, values)
        _env_loaded = True
    return _env_default


def _resolve(mode: str, values: Mapping[str, Any]) -> Optional[OutlierConfig]:
    if mode == "off":
        return None
    if values:
        return outlier_from_values(values, "env")
    return BUILTIN_OUTLIER


def set_default_outlier(config: Optional[OutlierConfig]) -> None:
    """Override the process default (tests; embedders that configure meshpatch in code)."""
    global _env_default, _env_loaded
    _env_default = config
    _env_loaded = True


def reset_default_outlier() -> None:
    """Forget the cached default so the next cluster reads the environment again."""
    global _env_default, _env_loaded
    _env_default = None
    _env_loaded = False


_ring_cap: Optional[int] = None


def ring_size_cap() -> int:
    """The ring-size cap (MESHPATCH_RING_HASH_SIZE_CAP, default gRPC's 4096), read once."""
    global _ring_cap
    if _ring_cap is None:
        import os

        from meshpatch.config import ConfigError, parse_ring_size_cap

        try:
            _ring_cap = parse_ring_size_cap(os.environ)
        except ConfigError:
            _ring_cap = DEFAULT_RING_SIZE_CAP
    return _ring_cap


def set_ring_size_cap(cap: Optional[int]) -> None:
    """Override (tests) or forget (None) the cached cap."""
    global _ring_cap
    _ring_cap = cap
