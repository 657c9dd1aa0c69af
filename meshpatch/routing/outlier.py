"""Per-endpoint state and Envoy's outlier detection, fed by the hooks' attempt outcomes.

Semantics follow Envoy's detector (``source/common/upstream/outlier_detection_impl.cc``):
consecutive 5xx / gateway-failure / local-origin counters eject the moment
they reach their threshold; success rate (mean − stdev_factor/1000 × stdev)
and failure percentage are judged every ``interval`` over the previous
interval's results; an ejected endpoint returns at the first interval tick
after ``min(base_ejection_time × backoff, max_ejection_time) + jitter``,
where the backoff grows with each ejection and shrinks by one per healthy
interval; ``max_ejection_percent`` of all endpoints (at least one with
``always_eject_one_host``) may be out at once; each ejection happens with its
``enforcing_*`` probability.  gRPC status codes count through Envoy's gRPC →
HTTP mapping (:attr:`Outcome.status_as_http`).

There is no timer thread: the cluster runs :meth:`OutlierTracker.tick` when an
attempt ends or a pick finds the interval due, so idle clusters cost nothing.
Everything here runs under the cluster's bookkeeping lock, never on the pick path.
"""

from __future__ import annotations

import math
import random
from typing import Any, Dict, Iterable, Optional, Set, Tuple

from meshpatch.routing.cluster_policy import OutlierConfig
from meshpatch.routing.outcome import CANCELLED, CONNECT_FAILURE, LOCAL, OK, RESET, TIMEOUT

Key = Tuple[str, int]

CONSECUTIVE_5XX = "consecutive_5xx"
CONSECUTIVE_GATEWAY_FAILURE = "consecutive_gateway_failure"
CONSECUTIVE_LOCAL_ORIGIN_FAILURE = "consecutive_local_origin_failure"
SUCCESS_RATE = "success_rate"
SUCCESS_RATE_LOCAL_ORIGIN = "success_rate_local_origin"
FAILURE_PERCENTAGE = "failure_percentage"
FAILURE_PERCENTAGE_LOCAL_ORIGIN = "failure_percentage_local_origin"

_LOCAL_FAILURES = frozenset({CONNECT_FAILURE, TIMEOUT, RESET})
# Envoy maps local-origin results to these codes when it does not split them.
_LOCAL_AS_HTTP = {CONNECT_FAILURE: 503, RESET: 503, TIMEOUT: 504}


class EndpointState:
    """Everything the cluster tracks for one ``(address, port)``; survives EDS updates."""

    __slots__ = (
        "key", "active", "added",
        "consecutive_5xx", "consecutive_gateway", "consecutive_local",
        "ok", "total", "local_ok", "local_total", "last_ok", "last_total", "last_local_ok", "last_local_total",
        "ejected_at", "ejection_reason", "backoff", "ejections", "unejected_at", "jitter",
        "down_until", "down_backoff", "gone",
    )

    def __init__(self, key: Key, added: float) -> None:
        self.key = key
        self.active = 0
        self.added = added
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.consecutive_local = 0
        self.ok = self.total = self.local_ok = self.local_total = 0
        self.last_ok = self.last_total = self.last_local_ok = self.last_local_total = 0
        self.ejected_at: Optional[float] = None
        self.ejection_reason = ""
        self.backoff = 0
        self.ejections = 0
        self.unejected_at: Optional[float] = None
        self.jitter = 0.0
        # Connectivity, as gRPC tracks a subchannel: a failed connect puts the
        # endpoint in TRANSIENT_FAILURE until this time (reconnect backoff).
        self.down_until = 0.0
        self.down_backoff = 0.0
        #: dropped from its cluster (endpoint left EDS); set under the cluster lock
        self.gone = False

    @property
    def ejected(self) -> bool:
        return self.ejected_at is not None

    def __repr__(self) -> str:
        state = f"ejected({self.ejection_reason})" if self.ejected else "ok"
        return f"EndpointState({self.key[0]}:{self.key[1]} {state} active={self.active})"


class OutlierTracker:
    """One cluster's detector.  ``ejected`` holds the keys currently out."""

    def __init__(self, config: OutlierConfig, now: float, rng: Any = random.random) -> None:
        self.config = config
        self.ejected: Set[Key] = set()
        self.next_tick = now + config.interval
        self._rng = rng
        self.ejection_count = 0  # enforced ejections since creation (tests, telemetry)
        self.overflow_count = 0  # ejections refused by max_ejection_percent
        #: False for a connect-failure-only detector: a success then only ends a
        #: run of local failures, so the cluster need not report the others
        self.counts_successes = not config.connect_failures_only

    # -- results ---------------------------------------------------------------

    def on_result(self, state: EndpointState, outcome: Any, states: Dict[Key, EndpointState], now: float) -> bool:
        """Account one finished attempt; True if the endpoint was ejected.

        ClusterHandle.attempt_ended relies on this for a detector that does not
        ``counts_successes``: an OK outcome then only resets ``consecutive_local``,
        so it reports successes only while that count is not zero."""
        kind = outcome.kind
        if kind in (CANCELLED, LOCAL):
            return False  # the app gave up / we failed before sending: says nothing about the endpoint
        config = self.config
        if config.connect_failures_only:
            if kind == CONNECT_FAILURE:
                return self._local_failure(state, states, now)
            state.consecutive_local = 0
            return False
        if config.split_external_local_origin_errors:
            if kind in _LOCAL_FAILURES:
                return self._local_failure(state, states, now)
            state.local_total += 1
            state.local_ok += 1
            state.consecutive_local = 0
            code = outcome.status_as_http
        else:
            code = _LOCAL_AS_HTTP.get(kind) if kind != OK else outcome.status_as_http
        if code is None:
            code = 200
        return self._http_code(state, code, states, now)

    def _local_failure(self, state: EndpointState, states: Dict[Key, EndpointState], now: float) -> bool:
        state.local_total += 1
        state.consecutive_local += 1
        if state.consecutive_local == self.config.consecutive_local_origin_failure:
            return self._consecutive(state, CONSECUTIVE_LOCAL_ORIGIN_FAILURE,
                                     self.config.enforcing_consecutive_local_origin_failure, states, now)
        return False

    def _http_code(self, state: EndpointState, code: int, states: Dict[Key, EndpointState], now: float) -> bool:
        config = self.config
        state.total += 1
        if 500 <= code < 600:
            ejected = False
            if code in (502, 503, 504):
                state.consecutive_gateway += 1
                if state.consecutive_gateway == config.consecutive_gateway_failure:
                    ejected = self._consecutive(state, CONSECUTIVE_GATEWAY_FAILURE,
                                                config.enforcing_consecutive_gateway_failure, states, now)
            else:
                state.consecutive_gateway = 0
            state.consecutive_5xx += 1
            if state.consecutive_5xx == config.consecutive_5xx:
                ejected = self._consecutive(state, CONSECUTIVE_5XX, config.enforcing_consecutive_5xx, states, now) or ejected
            return ejected
        state.ok += 1
        state.consecutive_5xx = 0
        state.consecutive_gateway = 0
        return False

    def _consecutive(self, state: EndpointState, reason: str, enforcing: int, states: Dict[Key, EndpointState],
                     now: float) -> bool:
        if state.ejected:
            return False  # Envoy ignores (and does not reset) counters of an endpoint already out
        ejected = self._eject(state, reason, enforcing, len(states), now)
        if reason == CONSECUTIVE_5XX:
            state.consecutive_5xx = 0
        elif reason == CONSECUTIVE_GATEWAY_FAILURE:
            state.consecutive_gateway = 0
        else:
            state.consecutive_local = 0
        return ejected

    def _eject(self, state: EndpointState, reason: str, enforcing: int, hosts: int, now: float) -> bool:
        config = self.config
        if state.ejected or hosts == 0:
            return False
        current = len(self.ejected)
        allowed = 100.0 * (current + 1) / hosts <= min(100, config.max_ejection_percent)
        if config.always_eject_one_host and current == 0:
            allowed = True
        if not allowed:
            self.overflow_count += 1
            return False
        if enforcing < 100 and not (self._rng() * 100.0 < enforcing):
            return False
        state.ejected_at = now
        state.ejection_reason = reason
        state.ejections += 1
        jitter = config.max_ejection_time_jitter
        state.jitter = self._rng() * jitter if jitter > 0 else 0.0
        if state.backoff * config.base_ejection_time < config.max_ejection_time + config.base_ejection_time:
            state.backoff += 1
        self.ejected.add(state.key)
        self.ejection_count += 1
        return True

    # -- interval --------------------------------------------------------------

    def ejection_ends(self, state: EndpointState) -> float:
        """When ``state``'s ejection time is over (it returns at the next tick after)."""
        config = self.config
        duration = min(config.base_ejection_time * state.backoff, config.max_ejection_time) + state.jitter
        return (state.ejected_at or 0.0) + duration

    def tick(self, states: Dict[Key, EndpointState], now: float) -> bool:
        """Envoy's interval timer; True if the set of ejected endpoints changed."""
        config = self.config
        changed = False
        for state in states.values():
            if state.ejected and self.ejection_ends(state) <= now:
                self._uneject(state, now)
                changed = True
            state.last_ok, state.last_total = state.ok, state.total
            state.last_local_ok, state.last_local_total = state.local_ok, state.local_total
            state.ok = state.total = state.local_ok = state.local_total = 0
        changed = self._rates(states, now, local=False) or changed
        changed = self._rates(states, now, local=True) or changed
        for state in states.values():
            if (not state.ejected and state.unejected_at is not None and state.backoff
                    and now - state.unejected_at >= config.interval):
                state.backoff -= 1
        self.next_tick = now + config.interval
        return changed

    def _uneject(self, state: EndpointState, now: float) -> None:
        state.ejected_at = None
        state.ejection_reason = ""
        state.consecutive_5xx = state.consecutive_gateway = state.consecutive_local = 0
        state.unejected_at = now
        self.ejected.discard(state.key)

    def _rates(self, states: Dict[Key, EndpointState], now: float, local: bool) -> bool:
        config = self.config
        hosts = len(states)
        if hosts < config.success_rate_minimum_hosts and hosts < config.failure_percentage_minimum_hosts:
            return False
        sr_hosts = []
        fp_hosts = []
        total_rate = 0.0
        for state in states.values():
            if state.ejected:
                continue
            total = state.last_local_total if local else state.last_total
            if not total:
                continue
            ok = state.last_local_ok if local else state.last_ok
            rate = ok * 100.0 / total
            if total >= config.success_rate_request_volume:
                sr_hosts.append((state, rate))
                total_rate += rate
            if total >= config.failure_percentage_request_volume:
                fp_hosts.append((state, rate))
        changed = False
        if sr_hosts and len(sr_hosts) >= config.success_rate_minimum_hosts:
            mean = total_rate / len(sr_hosts)
            variance = sum((rate - mean) ** 2 for _, rate in sr_hosts) / len(sr_hosts)
            threshold = mean - (config.success_rate_stdev_factor / 1000.0) * math.sqrt(variance)
            reason = SUCCESS_RATE_LOCAL_ORIGIN if local else SUCCESS_RATE
            enforcing = config.enforcing_local_origin_success_rate if local else config.enforcing_success_rate
            for state, rate in sr_hosts:
                if rate < threshold:
                    changed = self._eject(state, reason, enforcing, hosts, now) or changed
        if fp_hosts and len(fp_hosts) >= config.failure_percentage_minimum_hosts:
            reason = FAILURE_PERCENTAGE_LOCAL_ORIGIN if local else FAILURE_PERCENTAGE
            enforcing = (config.enforcing_failure_percentage_local_origin if local
                         else config.enforcing_failure_percentage)
            for state, rate in fp_hosts:
                if 100.0 - rate >= config.failure_percentage_threshold:
                    changed = self._eject(state, reason, enforcing, hosts, now) or changed
        return changed

    def forget(self, keys: Iterable[Key]) -> None:
        """Endpoints gone from EDS leave the ejected set (Envoy drops their monitors)."""
        for key in keys:
            self.ejected.discard(key)
