"""The load-balancing tree for one cluster, modelled on gRPC's xDS policies.

``priority`` (lowest priority that has a usable endpoint) → ``weighted
localities`` (random pick proportional to locality weight, like gRPC's
weighted_target) → the cluster's endpoint policy inside a locality: round
robin (weighted as Envoy's when weights differ), least request, random or
pick first.  The hashing policies (ring hash, Maglev) span the whole priority,
as gRPC's ring_hash does, with endpoint weight × locality weight.

Pickers are immutable and rebuilt by the cluster on every endpoint, ejection
or slow-start change; picking takes no lock: cursors are ``itertools.count``
objects whose ``next`` is atomic under the GIL, random draws are thread-safe,
and least request only reads per-endpoint counters the cluster maintains.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import time
from typing import Any, Callable, Container, Dict, Iterable, List, Optional, Sequence, Tuple

from meshpatch.routing.cluster_policy import (
    DEFAULT_LB,
    LEAST_REQUEST,
    MAGLEV,
    PICK_FIRST,
    RANDOM,
    RING_HASH,
    LbConfig,
    ring_size_cap,
)
from meshpatch.routing.model import HEALTHY_STATES, Endpoint, EndpointsConfig, LocalityEndpoints

_MASK64 = (1 << 64) - 1
_PHI = 0.6180339887498949  # golden-ratio fraction: the most evenly spread Weyl sequence
_random = random.random
_getrandbits = random.getrandbits


class Picker:
    """Base: ``pick()`` returns an endpoint or None when nothing is usable.

    ``request_hash`` is the route's hash-policy value for hashing policies
    (ring hash, maglev; None = no hash → random); ``exclude`` holds
    ``(address, port)`` of endpoints already tried by this call, avoided while
    another endpoint is available (retries never hit the same host twice).
    """

    __slots__ = ()

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:  # pragma: no cover
        raise NotImplementedError

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:  # pragma: no cover - interface
        raise NotImplementedError


class EmptyPicker(Picker):
    __slots__ = ("reason",)

    def __init__(self, reason: str = "no endpoints") -> None:
        self.reason = reason

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        return None

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return ()


def _first_allowed(endpoints: Sequence[Endpoint], exclude: Container, start: int = 0) -> Optional[Endpoint]:
    """Retries: the next endpoint not yet tried, else any (the caller's pick)."""
    n = len(endpoints)
    for i in range(n):
        candidate = endpoints[(start + i) % n]
        if (candidate.address, candidate.port) not in exclude:
            return candidate
    return None


class RoundRobin(Picker):
    """Plain round robin (all weights equal); starts at a random index so that many
    clients don't march over the endpoints in lock-step."""

    __slots__ = ("_endpoints", "_n", "_cursor")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        self._n = len(self._endpoints)
        self._cursor = itertools.count(random.randrange(self._n) if self._n else 0)

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        endpoint = self._endpoints[next(self._cursor) % self._n]
        if exclude and (endpoint.address, endpoint.port) in exclude:
            for _ in range(self._n - 1):
                candidate = self._endpoints[next(self._cursor) % self._n]
                if (candidate.address, candidate.port) not in exclude:
                    return candidate
        return endpoint

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return self._endpoints


def _alias_table(weights: Sequence[float]) -> Tuple[List[float], List[int]]:
    """Vose's alias method: a weighted draw from one uniform number in O(1).

    ``u·n`` picks a column ``i``; its fraction ``f`` keeps ``i`` if
    ``f < prob[i]``, else takes ``alias[i]``.  A bisection over cumulative
    weights costs ~0.4 µs at 5k endpoints in Python; this costs two list reads.
    """
    n = len(weights)
    total = float(sum(weights))
    scaled = [w * n / total for w in weights]
    prob = [1.0] * n
    alias = list(range(n))
    small = [i for i, x in enumerate(scaled) if x < 1.0]
    large = [i for i, x in enumerate(scaled) if x >= 1.0]
    while small and large:
        s = small.pop()
        g = large.pop()
        prob[s] = scaled[s]
        alias[s] = g
        scaled[g] = (scaled[g] + scaled[s]) - 1.0
        (small if scaled[g] < 1.0 else large).append(g)
    return prob, alias


def _weight_slots(weights: Sequence[float], limit: int) -> Tuple[Optional[Tuple[int, ...]], int]:
    """Integral weights as a table with each endpoint index repeated weight/gcd
    times, so a weighted draw is one index; (None, 0) when weights are fractional
    or the table would exceed ``limit``.  The table carries one extra copy of its
    last entry: ``int(random() * m)`` can round up to ``m``."""
    if not weights or any(w != int(w) or w < 1 for w in weights):
        return None, 0
    divisor = 0
    for w in weights:
        divisor = math.gcd(divisor, int(w))
    counts = [int(w) // divisor for w in weights]
    total = sum(counts)
    if total > limit:
        return None, 0
    table: List[int] = []
    for index, count in enumerate(counts):
        table.extend([index] * count)
    table.append(table[-1])
    return tuple(table), total


class WeightedRoundRobin(Picker):
    """Weighted round robin without a lock: the k-th pick is the alias-table draw for
    ``frac(k·φ)``.  That golden-ratio sequence is the most even spread there is,
    so every endpoint gets exactly its weight's share with no bursts (what
    Envoy's EDF schedule gives), though not in EDF's exact order."""

    __slots__ = ("_endpoints", "_prob", "_alias", "_n", "_cursor")

    def __init__(self, endpoints: Sequence[Endpoint], weights: Sequence[float]) -> None:
        self._endpoints = tuple(endpoints)
        self._prob, self._alias = _alias_table(weights)
        self._n = len(self._endpoints)
        self._cursor = itertools.count(random.randrange(1 << 20))

    def _index(self) -> int:
        x = (next(self._cursor) * _PHI) % 1.0 * self._n
        i = int(x)
        if i >= self._n:
            i = self._n - 1
        return i if x - i < self._prob[i] else self._alias[i]

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        x = (next(self._cursor) * _PHI) % 1.0 * self._n
        i = int(x)
        if i >= self._n:
            i = self._n - 1
        endpoint = self._endpoints[i if x - i < self._prob[i] else self._alias[i]]
        if exclude and (endpoint.address, endpoint.port) in exclude:
            for _ in range(self._n * 2):
                candidate = self._endpoints[self._index()]
                if (candidate.address, candidate.port) not in exclude:
                    return candidate
            return _first_allowed(self._endpoints, exclude) or endpoint
        return endpoint

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return self._endpoints


class RandomPicker(Picker):
    """Envoy RANDOM: uniform over the endpoints (endpoint weights are not used)."""

    __slots__ = ("_endpoints", "_n")

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)
        self._n = len(self._endpoints)

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        endpoint = self._endpoints[int(_random() * self._n)]
        if exclude and (endpoint.address, endpoint.port) in exclude:
            return _first_allowed(self._endpoints, exclude, int(_random() * self._n)) or endpoint
        return endpoint

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return self._endpoints


class _Idle:
    """Stands in for per-endpoint state when a picker is built without a cluster."""

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = 0


class LeastRequest(Picker):
    """Envoy's unweighted least request: ``choice_count`` endpoints drawn at random
    (with replacement), the one with the fewest active requests wins (first on
    ties); FULL_SCAN looks at all of them from a random start."""

    __slots__ = ("_endpoints", "_states", "_n", "_choices", "_full")

    def __init__(self, endpoints: Sequence[Endpoint], states: Sequence[Any], choice_count: int = 2,
                 full_scan: bool = False) -> None:
        self._endpoints = tuple(endpoints)
        self._states = tuple(states)
        self._n = len(self._endpoints)
        self._choices = choice_count
        self._full = full_scan

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        n = self._n
        states = self._states
        endpoints = self._endpoints
        if not exclude and not self._full and self._choices == 2:  # the common case, inlined
            i = int(_random() * n)
            j = int(_random() * n)
            return endpoints[j if states[j].active < states[i].active else i]
        if self._full:
            start = int(_random() * n)
            best = -1
            best_active = 0
            for k in range(n):
                j = (start + k) % n
                if exclude:
                    ep = endpoints[j]
                    if (ep.address, ep.port) in exclude:
                        continue
                active = states[j].active
                if best < 0 or active < best_active:
                    best, best_active = j, active
            return endpoints[best] if best >= 0 else endpoints[start]
        best = int(_random() * n)
        if exclude:
            ep = endpoints[best]
            if (ep.address, ep.port) in exclude:
                best = -1
        for _ in range(self._choices - 1):
            j = int(_random() * n)
            if exclude:
                ep = endpoints[j]
                if (ep.address, ep.port) in exclude:
                    continue
            if best < 0 or states[j].active < states[best].active:
                best = j
        if best < 0:
            return _first_allowed(endpoints, exclude, int(_random() * n)) or endpoints[0]  # type: ignore[arg-type]
        return endpoints[best]

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return self._endpoints


class WeightedLeastRequest(Picker):
    """Least request when weights differ, lock-free: candidates are drawn in proportion
    to weight and the one with the lowest ``active ** bias / weight`` wins (first
    on ties), so idle endpoints share traffic by weight and busy ones are
    avoided.  Envoy runs an EDF schedule over ``weight / (active + 1) ** bias``
    instead, which needs a lock per pick; the preference is the same."""

    __slots__ = ("_endpoints", "_states", "_weights", "_prob", "_alias", "_n", "_choices", "_bias", "_slots", "_m")

    #: Largest weight table (entries) kept for the one-draw-per-candidate path.
    SLOTS_MAX = 1 << 16

    def __init__(self, endpoints: Sequence[Endpoint], weights: Sequence[float], states: Sequence[Any],
                 choice_count: int = 2, bias: float = 1.0) -> None:
        self._endpoints = tuple(endpoints)
        self._states = tuple(states)
        self._weights = tuple(weights)
        self._prob, self._alias = _alias_table(weights)
        self._n = len(self._endpoints)
        self._choices = choice_count
        self._bias = bias
        self._slots, self._m = _weight_slots(weights, self.SLOTS_MAX)

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        n = self._n
        prob = self._prob
        alias = self._alias
        states = self._states
        weights = self._weights
        bias = self._bias
        endpoints = self._endpoints
        slots = self._slots
        if slots is not None and not exclude and bias == 1.0 and self._choices == 2:  # the common case
            m = self._m
            i = slots[int(_random() * m)]
            j = slots[int(_random() * m)]
            return endpoints[j if states[j].active * weights[i] < states[i].active * weights[j] else i]
        if not exclude and bias == 1.0 and self._choices == 2:  # large or fractional weights
            x = _random() * n
            i = int(x)
            if i >= n:
                i = n - 1
            if x - i >= prob[i]:
                i = alias[i]
            x = _random() * n
            j = int(x)
            if j >= n:
                j = n - 1
            if x - j >= prob[j]:
                j = alias[j]
            # active_j / w_j < active_i / w_i, without dividing
            return endpoints[j if states[j].active * weights[i] < states[i].active * weights[j] else i]
        best = -1
        best_cost = 0.0
        for _ in range(self._choices):
            x = _random() * n
            j = int(x)
            if j >= n:  # random() * n may round up to n
                j = n - 1
            if x - j >= prob[j]:
                j = alias[j]
            if exclude:
                ep = endpoints[j]
                if (ep.address, ep.port) in exclude:
                    continue
            active = states[j].active
            cost = (active if bias == 1.0 else active ** bias) / weights[j]
            if best < 0 or cost < best_cost:
                best, best_cost = j, cost
        if best < 0:
            return _first_allowed(endpoints, exclude) or endpoints[0]  # type: ignore[arg-type]
        return endpoints[best]

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return self._endpoints


class PickFirst(Picker):
    """gRPC pick_first: every call goes to the first endpoint (the next one on retries)."""

    __slots__ = ("_endpoints",)

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self._endpoints = tuple(endpoints)

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        if exclude:
            return _first_allowed(self._endpoints, exclude) or self._endpoints[0]
        return self._endpoints[0]

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return self._endpoints


class RingHash(Picker):
    """gRPC/Envoy ring hash: the first ring entry at or after the request hash
    (wrapping), walking on past ejected endpoints and those this call already
    tried, as gRPC walks past endpoints that are not READY.  No hash → a random
    point on the ring (A42)."""

    __slots__ = ("_hashes", "_owners", "_endpoints", "_blocked", "_n")

    def __init__(self, hashes: List[int], owners: Any, endpoints: Sequence[Endpoint],
                 blocked: Container = frozenset()) -> None:
        self._hashes = hashes
        self._owners = owners
        self._endpoints = tuple(endpoints)
        self._blocked = blocked
        self._n = len(hashes)

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        h = _getrandbits(64) if request_hash is None else request_hash & _MASK64
        index = bisect.bisect_left(self._hashes, h)
        if index == self._n:
            index = 0
        owner = self._owners[index]
        blocked = self._blocked
        if not blocked and not exclude:
            return self._endpoints[owner]
        owners = self._owners
        endpoints = self._endpoints
        n = self._n
        fallback = None
        for i in range(n):
            owner = owners[(index + i) % n]
            if owner in blocked:
                continue
            endpoint = endpoints[owner]
            if exclude and (endpoint.address, endpoint.port) in exclude:
                if fallback is None:
                    fallback = endpoint
                continue
            return endpoint
        return fallback

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return self._endpoints


class Maglev(Picker):
    """Envoy Maglev: ``table[hash mod M]``.  An ejected or already-tried endpoint is
    replaced the way Envoy's retry host predicate does it: the hash is mutated
    with ``~0 − attempt + 1`` and looked up again, so a key's alternative is
    stable and keys of healthy endpoints never move."""

    __slots__ = ("_table", "_size", "_endpoints", "_blocked")

    ATTEMPTS = 16

    def __init__(self, table: Any, endpoints: Sequence[Endpoint], blocked: Container = frozenset()) -> None:
        self._table = table
        self._size = len(table)
        self._endpoints = tuple(endpoints)
        self._blocked = blocked

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        h = _getrandbits(64) if request_hash is None else request_hash & _MASK64
        owner = self._table[h % self._size]
        blocked = self._blocked
        if not blocked and not exclude:
            return self._endpoints[owner]
        fallback = None
        for attempt in range(self.ATTEMPTS + 1):
            if attempt:
                owner = self._table[(h ^ ((1 << 64) - attempt)) % self._size]
            if owner in blocked:
                continue
            endpoint = self._endpoints[owner]
            if exclude and (endpoint.address, endpoint.port) in exclude:
                if fallback is None:
                    fallback = endpoint
                continue
            return endpoint
        for index, endpoint in enumerate(self._endpoints):
            if index in blocked:
                continue
            if exclude and (endpoint.address, endpoint.port) in exclude:
                fallback = fallback or endpoint
                continue
            return endpoint
        return fallback

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return self._endpoints


class WeightedRandom(Picker):
    """Chooses a child picker with probability proportional to its weight."""

    __slots__ = ("_children", "_cumulative", "_total", "_random")

    def __init__(self, children: Sequence[Tuple[int, Picker]]) -> None:
        self._children = tuple(child for _, child in children)
        running = 0
        cumulative: List[int] = []
        for weight, _ in children:
            running += weight
            cumulative.append(running)
        self._cumulative = cumulative
        self._total = running
        self._random = random.random

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        index = bisect.bisect_right(self._cumulative, self._random() * self._total)
        endpoint = self._children[index].pick(request_hash, exclude)
        if exclude and endpoint is not None and (endpoint.address, endpoint.port) in exclude:
            for child in self._children:  # another locality may still have an untried endpoint
                other = child.pick(request_hash, exclude)
                if other is not None and (other.address, other.port) not in exclude:
                    return other
        return endpoint

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return tuple(ep for child in self._children for ep in child.endpoints)


class Timed(Picker):
    """A picker with a deadline: the first pick after it asks the cluster to refresh
    (return ejected endpoints, step a slow-start ramp); the following picks use
    the fresh picker.  Only clusters with something pending get this wrapper; the
    refresh itself never blocks a pick (the cluster gives up if its lock is busy)."""

    __slots__ = ("inner", "deadline", "_refresh")

    def __init__(self, inner: Picker, deadline: float, refresh: Callable[[], None]) -> None:
        self.inner = inner
        self.deadline = deadline
        self._refresh = refresh

    def pick(self, request_hash: Optional[int] = None, exclude: Optional[Container] = None) -> Optional[Endpoint]:
        if time.monotonic() >= self.deadline:
            self._refresh()
        return self.inner.pick(request_hash, exclude)

    @property
    def reason(self) -> str:
        return getattr(self.inner, "reason", "")

    @property
    def endpoints(self) -> Tuple[Endpoint, ...]:
        return self.inner.endpoints


# --- building ---------------------------------------------------------------


class ClusterView:
    """What the cluster knows beyond EDS, for one picker build: per-endpoint state
    (``active`` requests, ``added`` time), the ejected endpoints, the clock, and
    a cache of hash tables so an ejection never rebuilds a ring."""

    __slots__ = ("states", "ejected", "now", "cache", "used", "seed", "slow_start_active")

    def __init__(self, states: Optional[Dict[Tuple[str, int], Any]] = None, ejected: Container = frozenset(),
                 now: Optional[float] = None, cache: Optional[Dict[Any, Any]] = None, seed: int = 0) -> None:
        self.states = states if states is not None else {}
        self.ejected = ejected
        self.now = time.monotonic() if now is None else now
        self.cache = cache if cache is not None else {}
        self.used: Dict[Any, Any] = {}
        self.seed = seed
        self.slow_start_active = False

    def state(self, endpoint: Endpoint) -> Any:
        state = self.states.get((endpoint.address, endpoint.port))
        return state if state is not None else _Idle()

    def is_ejected(self, endpoint: Endpoint) -> bool:
        return bool(self.ejected) and (endpoint.address, endpoint.port) in self.ejected


def usable(endpoints: Iterable[Endpoint]) -> List[Endpoint]:
    """gRPC sends only to HEALTHY or UNKNOWN endpoints."""
    return [ep for ep in endpoints if ep.health in HEALTHY_STATES]


def _weighted_localities(localities: Sequence[LocalityEndpoints]) -> List[Tuple[LocalityEndpoints, List[Endpoint], int]]:
    """Localities with usable endpoints and their weights.  Locality weights apply when
    the control plane set them (istiod always does); a zero-weight locality is
    then skipped, as gRPC's weighted_target does.  With no weights at all,
    localities share traffic equally."""
    ready = [(loc, usable(loc.endpoints)) for loc in localities]
    ready = [(loc, eps) for loc, eps in ready if eps]
    if any(loc.weight for loc, _ in ready):
        return [(loc, eps, loc.weight) for loc, eps in ready if loc.weight > 0]
    return [(loc, eps, 1) for loc, eps in ready]


def _effective_weights(endpoints: Sequence[Endpoint], lb: LbConfig, view: ClusterView) -> List[float]:
    slow = lb.slow_start
    if slow is None:
        return [float(ep.weight) for ep in endpoints]
    # Inlined SlowStart.factor: this runs for every endpoint at every ramp step.
    now = view.now
    window = slow.window
    exponent = 1.0 / slow.aggression
    floor = slow.min_weight_percent / 100.0
    states = view.states
    out = []
    ramping = False
    for ep in endpoints:
        state = states.get((ep.address, ep.port))
        age = now - state.added if state is not None else window
        if age >= window:
            out.append(float(ep.weight))
            continue
        ramping = True
        ramp = (age if age > 1.0 else 1.0) / window
        if exponent != 1.0:
            ramp = ramp ** exponent
        out.append(ep.weight * (ramp if ramp > floor else floor))
    if ramping:
        view.slow_start_active = True
    return out


def _endpoint_picker(endpoints: List[Endpoint], lb: LbConfig, view: ClusterView) -> Picker:
    policy = lb.policy
    if policy == RANDOM:
        return RandomPicker(endpoints)
    weights = _effective_weights(endpoints, lb, view)
    equal = all(w == weights[0] for w in weights)
    if policy == LEAST_REQUEST:
        states = [view.state(ep) for ep in endpoints]
        if equal:
            return LeastRequest(endpoints, states, lb.choice_count, lb.full_scan)
        if lb.active_request_bias == 0:
            return WeightedRoundRobin(endpoints, weights)
        return WeightedLeastRequest(endpoints, weights, states, lb.choice_count, lb.active_request_bias)
    if equal or len(endpoints) == 1:
        return RoundRobin(endpoints)
    return WeightedRoundRobin(endpoints, weights)


def _locality_order(loc: LocalityEndpoints) -> Tuple[str, ...]:
    return tuple(loc.locality.split("/"))


def _hash_layout(weighted: List[Tuple[LocalityEndpoints, List[Endpoint], int]]) -> Tuple[List[Endpoint], Tuple[str, ...], Tuple[int, ...]]:
    from meshpatch.routing.hashing import endpoint_hash_key

    endpoints: List[Endpoint] = []
    weights: List[int] = []
    for _, eps, loc_weight in sorted(weighted, key=lambda item: _locality_order(item[0])):
        for ep in eps:
            endpoints.append(ep)
            weights.append(loc_weight * ep.weight)
    keys = tuple(endpoint_hash_key(ep.address, ep.port, ep.metadata) for ep in endpoints)
    return endpoints, keys, tuple(weights)


def _hash_picker(localities: Sequence[LocalityEndpoints], weighted: List[Tuple[LocalityEndpoints, List[Endpoint], int]],
                 lb: LbConfig, view: ClusterView) -> Picker:
    """One table over the whole priority, in gRPC's order: localities sorted by
    (region, zone, sub_zone), endpoints in EDS order, weight = locality × endpoint.
    Tables are cached by the identity of the priority's EDS data, so rebuilding
    for an ejection only recomputes which entries are blocked."""
    from meshpatch.routing.hashing import build_maglev, build_ring

    if lb.policy == RING_HASH:
        cap = ring_size_cap()
        params: Tuple[Any, ...] = (RING_HASH, lb.min_ring_size, lb.max_ring_size, cap)
    else:
        params = (MAGLEV, lb.table_size)
    cache_key = (params, tuple(id(loc) for loc in localities))
    cached = view.cache.get(cache_key)
    if cached is not None and all(a is b for a, b in zip(cached[0], localities)):
        _, endpoints, table = cached
    else:
        endpoints, keys, weights = _hash_layout(weighted)
        previous = view.cache.get(("content",) + params + (keys, weights))
        if previous is not None:
            table = previous
        elif lb.policy == RING_HASH:
            table = build_ring(keys, weights, lb.min_ring_size, lb.max_ring_size, params[3])
        else:
            table = build_maglev(keys, weights, lb.table_size)
        view.used[("content",) + params + (keys, weights)] = table
    view.used[cache_key] = (tuple(localities), endpoints, table)
    blocked = frozenset(i for i, ep in enumerate(endpoints) if view.is_ejected(ep)) if view.ejected else frozenset()
    if lb.policy == RING_HASH:
        return RingHash(table[0], table[1], endpoints, blocked)
    return Maglev(table, endpoints, blocked)


def _priority_picker(localities: Sequence[LocalityEndpoints], lb: LbConfig, view: ClusterView,
                     ignore_ejections: bool) -> Optional[Picker]:
    weighted = _weighted_localities(localities)
    if not weighted:
        return None
    if not ignore_ejections and view.ejected:
        if not any(not view.is_ejected(ep) for _, eps, _ in weighted for ep in eps):
            return None  # every usable endpoint of this priority is ejected: fail over
    if lb.hashing:
        if ignore_ejections:
            saved, view.ejected = view.ejected, frozenset()
            try:
                return _hash_picker(localities, weighted, lb, view)
            finally:
                view.ejected = saved
        return _hash_picker(localities, weighted, lb, view)
    if lb.policy == PICK_FIRST:
        flat = [ep for _, eps, _ in weighted for ep in eps if ignore_ejections or not view.is_ejected(ep)]
        if lb.shuffle:
            random.Random(view.seed).shuffle(flat)
        return PickFirst(flat)
    children: List[Tuple[int, Picker]] = []
    for _, eps, loc_weight in weighted:
        if not ignore_ejections and view.ejected:
            eps = [ep for ep in eps if not view.is_ejected(ep)]
            if not eps:
                continue  # weighted_target ignores a child with nothing READY
        children.append((loc_weight, _endpoint_picker(eps, lb, view)))
    if len(children) == 1:
        return children[0][1]
    return WeightedRandom(children)


def build_picker(config: Optional[EndpointsConfig], lb: LbConfig = DEFAULT_LB,
                 view: Optional[ClusterView] = None) -> Picker:
    """Lowest priority with a usable, non-ejected endpoint wins (no overprovisioning,
    as in gRPC).  If ejection left no endpoint anywhere, ejections are ignored
    (Envoy's panic mode at 0 % healthy) rather than failing every call."""
    if config is None:
        return EmptyPicker("endpoints not received yet")
    if view is None:
        view = ClusterView()
    by_priority: dict = {}
    for loc in config.localities:
        by_priority.setdefault(loc.priority, []).append(loc)
    ordered = sorted(by_priority)
    for priority in ordered:
        picker = _priority_picker(by_priority[priority], lb, view, False)
        if picker is not None:
            return picker
    if view.ejected:
        for priority in ordered:
            picker = _priority_picker(by_priority[priority], lb, view, True)
            if picker is not None:
                return picker
    return EmptyPicker("no healthy endpoints")
