"""Per-target config: follows listener → route config → clusters → endpoints.

One :class:`HostTarget` per ``host:port`` the app calls (the LDS name, as gRPC
requests it), one shared :class:`ClusterHandle` per cluster.  They are xDS
watchers, so they run under the xDS client's lock; what they publish for the
request path is immutable: a :class:`TargetSnapshot` (routes with their
cluster choosers) and per-cluster pickers, swapped by plain attribute
assignment.  A new snapshot is published only once every cluster it names has
resolved ("make before break"), so an update never sends traffic into a cluster
whose endpoints are still unknown.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import random
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Tuple

from meshpatch import lanes
from meshpatch.routing.cluster_policy import DEFAULT_CIRCUIT_BREAKERS, DEFAULT_LB, CircuitBreakers, default_outlier
from meshpatch.routing.domains import select_virtual_host
from meshpatch.routing.outcome import CONNECT_FAILURE, OK
from meshpatch.routing.lb import ClusterView, EmptyPicker, Picker, Timed, build_picker
from meshpatch.routing.merge import for_port, matching, merge_endpoints, parse_cluster_name, subset_selector
from meshpatch.routing.model import ClusterConfig, EndpointsConfig, ListenerConfig, Route, RouteConfig
from meshpatch.routing.outlier import EndpointState, OutlierTracker
from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS

log = logging.getLogger("meshpatch.routing")

PENDING = "pending"
RESOLVED = "resolved"
MISSING = "missing"


class ClusterHandle:
    """A cluster's config and endpoint picker, shared by every target that routes to it.

    Hooks report every attempt (``on_attempt_start`` / ``on_attempt_end``) so the
    cluster can keep per-endpoint state — in-flight requests for least-request and
    circuit breaking, results for outlier detection — keyed by ``(address, port)``
    so it survives EDS updates that rebuild the endpoint objects.

    The request path only reads ``picker`` (an immutable object swapped by
    assignment) and ``in_flight``; every state change happens under ``_lock``
    (bookkeeping, never taken by a pick) and ends with a new picker when the
    usable endpoint set or their weights changed.
    """

    __slots__ = ("name", "config", "picker", "state", "eds_name", "users", "_client", "in_flight", "_eds", "_registry",
                 "_registry_key", "_registry_seen", "retries_active", "endpoints", "states", "tracker", "_lock",
                 "_cache", "_breakers", "admit_floor", "_seed", "_outlier_source", "_inner", "_slow_due", "_down_due", "__weakref__")

    # Slow-start ramps are stepped this often (a fraction of the window, at most 1 s apart).
    SLOW_START_STEPS = 50

    def __init__(self, name: str, client: Any, registry: Any = None) -> None:
        self.name = name
        self.config: Optional[ClusterConfig] = None
        self.picker: Picker = EmptyPicker("cluster not received yet")
        self.state = PENDING
        self.eds_name: Optional[str] = None
        self.users: List["HostTarget"] = []
        self._client = client
        self.in_flight = 0
        # Registry merge (README "Registries"): the picker is built from EDS ∪
        # the registry instances of the cluster's host, rebuilt when either changes.
        self._eds: Optional[EndpointsConfig] = None
        self._registry = registry
        self._registry_key = parse_cluster_name(name) if registry is not None else None
        self._registry_seen: Any = None
        self.retries_active = 0
        self.endpoints: Optional[EndpointsConfig] = None  # what the picker is built from (EDS ∪ registries)
        self.states: Dict[Tuple[str, int], EndpointState] = {}
        self.tracker: Optional[OutlierTracker] = None
        self._lock = threading.Lock()
        self._cache: Dict[Any, Any] = {}
        self._breakers: CircuitBreakers = DEFAULT_CIRCUIT_BREAKERS
        #: below this many calls in flight no circuit-breaker limit can refuse one:
        #: the router asks admit_request only from here on
        self.admit_floor = _admit_floor(DEFAULT_CIRCUIT_BREAKERS)
        self._seed = random.getrandbits(32)
        self._outlier_source: Any = None
        self._inner: Picker = self.picker
        self._slow_due = math.inf
        self._down_due = math.inf
        _HANDLES.add(self)
        if self._registry_key is not None:
            registry.watch_host(self._registry_key[1])

    # per-attempt reporting (called by hooks, from any thread).  A routed Call
    # keeps the EndpointState that attempt_began returned and hands it back to
    # attempt_ended: one (address, port) lookup per attempt instead of two.
    def attempt_began(self, endpoint: Any) -> Optional[EndpointState]:
        """Count an attempt to ``endpoint`` as in flight; its tracked state (None
        when the endpoint is not one of the cluster's: a stale pick, or none)."""
        state = self.states.get((endpoint.address, endpoint.port)) if endpoint is not None else None
        with self._lock:
            self.in_flight += 1
            if state is not None:
                state.active += 1
        return state

    def attempt_ended(self, state: Optional[EndpointState], outcome: Any) -> None:
        """The attempt counted by :meth:`attempt_began` (which returned ``state``)
        ended with ``outcome`` (None: unknown, e.g. the app dropped a stream)."""
        now = time.monotonic()
        with self._lock:
            if self.in_flight > 0:
                self.in_flight -= 1
            tracker = self.tracker
            changed = False
            if state is not None:
                if state.active > 0:
                    state.active -= 1
                # an endpoint that left the cluster meanwhile says nothing about the current set
                if outcome is not None and not state.gone:
                    if outcome.kind != OK or state.down_until or state.consecutive_local:
                        if tracker is not None:
                            changed = tracker.on_result(state, outcome, self.states, now)
                        if _connectivity(state, outcome, now):
                            changed = True
                    elif tracker is not None and tracker.counts_successes:
                        # a success from an endpoint that was up: only a detector that counts them cares
                        changed = tracker.on_result(state, outcome, self.states, now)
            if tracker is not None and now >= tracker.next_tick:
                if tracker.tick(self.states, now) or changed:
                    self._rebuild_locked(now)
                elif tracker.ejected:
                    self._publish_locked()  # same picker, next interval's deadline
            elif changed:
                self._rebuild_locked(now)

    def on_attempt_start(self, endpoint: Any) -> None:
        """:meth:`attempt_began` for callers holding only the endpoint (``Pick.started``)."""
        self.attempt_began(endpoint)

    def on_attempt_end(self, endpoint: Any, outcome: Any) -> None:
        """:meth:`attempt_ended` for callers holding only the endpoint (``Pick.finished``)."""
        state = self.states.get((endpoint.address, endpoint.port)) if endpoint is not None else None
        self.attempt_ended(state, outcome)

    # circuit breaking (thresholds from CDS circuit_breakers); the router calls
    # admit_request before picking, the retry logic admit_retry before a retry
    # and retry_finished when that retry's attempt ended.
    def admit_request(self, multiplexed: bool = False) -> Optional[str]:
        """None to admit, else the name of the limit that refuses the call.

        ``multiplexed`` is True for gRPC (HTTP/2): calls share connections, so
        only ``max_requests`` applies; HTTP/1.1 calls beyond ``max_connections``
        count as pending (see :class:`CircuitBreakers`).  Read without a lock: a
        burst of concurrent admissions may overshoot by the number of threads,
        as Envoy's per-worker checks may.
        """
        breakers = self._breakers
        active = self.in_flight
        if active >= breakers.max_requests:
            return "max_requests"
        if not multiplexed and active >= breakers.max_connections + breakers.max_pending_requests:
            return "max_pending_requests"
        return None

    def admit_retry(self) -> Optional[str]:
        breakers = self._breakers
        with self._lock:
            if breakers.budget_percent is not None:
                limit = max(breakers.min_retry_concurrency, int(breakers.budget_percent * self.in_flight / 100.0))
            else:
                limit = breakers.max_retries
            if self.retries_active >= limit:
                return "max_retries"
            self.retries_active += 1
            return None

    def retry_finished(self) -> None:
        with self._lock:
            if self.retries_active > 0:
                self.retries_active -= 1

    # xDS watcher protocol
    def on_resource(self, type_url: str, name: str, value: Any) -> None:
        if type_url == CDS:
            with self._lock:
                self.config = value
                self._breakers = value.circuit_breakers
                self.admit_floor = _admit_floor(value.circuit_breakers)
                now = time.monotonic()
                self._configure_outlier_locked(now)
                if self._eds is not None:
                    self._rebuild_locked(now)  # LB policy, slow start or the subset's labels may have changed
            if value.eds_service_name != self.eds_name:
                if self.eds_name is not None:
                    self._client.cancel_watch(EDS, self.eds_name, self)
                self.eds_name = value.eds_service_name
                self._client.watch(EDS, self.eds_name, self)
        elif type_url == EDS and name == self.eds_name:
            self._set_endpoints(value)

    def on_does_not_exist(self, type_url: str, name: str) -> None:
        if type_url == CDS:
            self.config = None
            if self.eds_name is not None:
                self._client.cancel_watch(EDS, self.eds_name, self)
                self.eds_name = None
            with self._lock:
                self._eds = self.endpoints = None  # a re-added cluster waits for fresh EDS
                self._inner = self.picker = EmptyPicker("cluster does not exist")
            self.state = MISSING
            self._changed()

    def on_error(self, type_url: str, name: str, reason: str) -> None:
        # Last good config stays in force; a cluster that never had a good
        # version is unusable (what gRPC does for a NACKed, never-ACKed cluster).
        if type_url == CDS and self.config is None:
            self.picker = EmptyPicker(f"cluster rejected: {reason}")
            self.state = MISSING
            self._changed()

    def _set_endpoints(self, endpoints: EndpointsConfig) -> None:
        with self._lock:
            self._eds = endpoints
            self._rebuild_locked(time.monotonic())
        key = self._registry_key
        if self.state == PENDING and key is not None and not self._registry.settled(key[1]):
            return  # resolved once the registries have answered for the host too (registry_changed)
        self.state = RESOLVED
        self._changed()

    def _merged_endpoints(self) -> Optional[EndpointsConfig]:
        """EDS, or EDS ∪ the registry instances of this cluster's host and subset."""
        key = self._registry_key
        instances = (self._registry.instances(key[1]) or ()) if key is not None else ()
        self._registry_seen = instances
        if not instances:
            return self._eds
        subset, _, port = key  # type: ignore[misc]
        labels = self.config.subset_labels if self.config is not None else None
        selector = subset_selector(subset, dict(labels) if labels is not None else None)
        joining = matching(for_port(instances, port), selector)
        return merge_endpoints(self.name, self._eds, joining, instances)

    def _track_locked(self, endpoints: Optional[EndpointsConfig], now: float) -> None:
        """Per-endpoint state for exactly the endpoints the picker may choose: kept for
        those that stay, created for newcomers (slow start counts from now), dropped
        with their ejection for those that left (Envoy drops their monitors)."""
        old = self.states
        states: Dict[Tuple[str, int], EndpointState] = {}
        if endpoints is not None:
            for locality in endpoints.localities:
                for endpoint in locality.endpoints:
                    key = (endpoint.address, endpoint.port)
                    states[key] = old.get(key) or EndpointState(key, now)
        gone = [key for key in old if key not in states]
        for key in gone:
            old[key].gone = True  # attempts still in flight to it must not count against the new set
        if self.tracker is not None:
            self.tracker.forget(gone)
        self.states = states
        if self.tracker is None and self._outlier_source is None:
            self._configure_outlier_locked(now)

    def _configure_outlier_locked(self, now: float) -> None:
        """The cluster's outlier_detection, else meshpatch's default (env / built-in);
        a changed config starts a fresh detector, as Envoy rebuilds a changed cluster."""
        config = self.config.outlier if self.config is not None else None
        if config is None:
            config = default_outlier()
        if config == self._outlier_source and (config is None or self.tracker is not None):
            return
        self._outlier_source = config
        if self.tracker is not None:
            for key in self.tracker.ejected:
                state = self.states.get(key)
                if state is not None:
                    state.ejected_at = None
        self.tracker = OutlierTracker(config, now) if config is not None else None

    def _rebuild_locked(self, now: float, merge: bool = True) -> None:
        """A new immutable picker from endpoints + state (ejections, slow-start weights);
        per-lane pickers when endpoints carry lane labels.  ``merge`` recomputes
        the endpoint set (EDS / registry change); ejections and ramps reuse it."""
        if merge:
            self.endpoints = self._merged_endpoints()
            self._track_locked(self.endpoints, now)
        lb = self.config.lb if self.config is not None else DEFAULT_LB
        tracker = self.tracker
        ejected = frozenset(tracker.ejected) if tracker is not None else frozenset()
        down = [(state.down_until, key) for key, state in self.states.items() if state.down_until > now]
        self._down_due = min(down)[0] if down else math.inf
        if down:  # endpoints in connect backoff leave the picker like ejected ones (priority failover included)
            ejected = ejected | frozenset(key for _, key in down)
        view = ClusterView(self.states, ejected, now, self._cache, self._seed)
        self._inner = lanes.build(self.endpoints, lambda config: build_picker(config, lb, view))
        self._cache = view.used
        self._slow_due = math.inf
        if view.slow_start_active and lb.slow_start is not None:
            self._slow_due = now + min(1.0, lb.slow_start.window / self.SLOW_START_STEPS)
        self._publish_locked()

    def _publish_locked(self) -> None:
        """Swap in the picker, with a deadline when an outlier interval (with endpoints
        ejected) or a slow-start step will change it later.  A lane picker keeps
        its class (the call path recognises it) and gets timed lanes instead."""
        deadline = min(self._slow_due, self._down_due)
        tracker = self.tracker
        if tracker is not None and tracker.ejected:
            deadline = min(deadline, tracker.next_tick)
        inner = self._inner
        if deadline == math.inf:
            self.picker = inner
        elif isinstance(inner, lanes.LanePicker):
            refresh = self._refresh
            self.picker = lanes.LanePicker(
                {lane: Timed(p, deadline, refresh) for lane, p in inner.by_lane.items()},
                Timed(inner.baseline, deadline, refresh) if inner.baseline is not None else None,
                Timed(inner.everything, deadline, refresh))
        else:
            self.picker = Timed(inner, deadline, self._refresh)

    def _refresh(self) -> None:
        """Called by a :class:`Timed` picker past its deadline, from a pick: run the
        outlier interval if due, then rebuild only if something changed.  Never
        waits for the lock (another thread is already refreshing)."""
        if self._lock.acquire(blocking=False):
            try:
                now = time.monotonic()
                tracker = self.tracker
                changed = tracker is not None and now >= tracker.next_tick and tracker.tick(self.states, now)
                if changed or now >= self._slow_due or now >= self._down_due:
                    self._rebuild_locked(now, merge=False)
                else:
                    self._publish_locked()
            finally:
                self._lock.release()

    def _after_fork_in_child(self) -> None:
        """The parent's attempts do not exist in a forked child, and its lock may have
        been held by a thread that does not either."""
        self._lock = threading.Lock()
        self.in_flight = 0
        self.retries_active = 0
        for state in self.states.values():
            state.active = 0

    def endpoint_state(self, address: str, port: int) -> Optional[EndpointState]:
        """Diagnostics/tests: the tracked state of one endpoint."""
        return self.states.get((address, port))

    def registry_changed(self) -> None:
        """A registry changed (under the xDS lock): rebuild the picker if this
        cluster's host is affected; the routes that use it need no change."""
        key = self._registry_key
        if key is None or self._eds is None:
            return
        if self.state == PENDING:
            if self._registry.settled(key[1]):
                with self._lock:
                    self._rebuild_locked(time.monotonic())
                self.state = RESOLVED
                self._changed()
            return
        if self.state == RESOLVED and (self._registry.instances(key[1]) or ()) != self._registry_seen:
            with self._lock:
                self._rebuild_locked(time.monotonic())

    def _changed(self) -> None:
        for target in list(self.users):
            target.clusters_changed()

    def release(self) -> None:
        if self.eds_name is not None:
            self._client.cancel_watch(EDS, self.eds_name, self)
            self.eds_name = None
        self._client.cancel_watch(CDS, self.name, self)


_HANDLES: "weakref.WeakSet[ClusterHandle]" = weakref.WeakSet()


def _reset_handles_after_fork() -> None:
    for handle in list(_HANDLES):
        handle._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_handles_after_fork)


def _admit_floor(breakers: CircuitBreakers) -> int:
    return min(breakers.max_requests, breakers.max_connections + breakers.max_pending_requests)


def _connectivity(state: EndpointState, outcome: Any, now: float) -> bool:
    """gRPC-style connectivity: a failed connect puts the endpoint in reconnect
    backoff (1 s, x1.6, jitter 0.2, cap 120 s, gRPC's connection backoff), out of
    the picker meanwhile; any answer from it brings it back.  True when the
    endpoint went down or came back (the picker must be rebuilt)."""
    if outcome.kind == CONNECT_FAILURE:
        was_up = state.down_until <= now
        state.down_backoff = min(max(state.down_backoff * 1.6, 1.0), 120.0)
        state.down_until = now + state.down_backoff * random.uniform(0.8, 1.2)
        return was_up
    if state.down_until and outcome.kind == OK:
        state.down_until = 0.0
        state.down_backoff = 0.0
        return True
    return False


class ClusterManager:
    """Reference-counted cluster handles; lives under the xDS client lock."""

    def __init__(self, client: Any, registry: Any = None) -> None:
        self._client = client
        self._registry = registry
        self._handles: Dict[str, ClusterHandle] = {}

    def acquire(self, name: str, user: "HostTarget") -> ClusterHandle:
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = ClusterHandle(name, self._client, self._registry)
            handle.users.append(user)
            self._client.watch(CDS, name, handle)
        else:
            handle.users.append(user)
        return handle

    def release(self, name: str, user: "HostTarget") -> None:
        handle = self._handles.get(name)
        if handle is None:
            return
        if user in handle.users:
            handle.users.remove(user)
        if not handle.users:
            del self._handles[name]
            handle.release()

    def get(self, name: str) -> Optional[ClusterHandle]:
        return self._handles.get(name)

    def names(self) -> List[str]:
        return sorted(self._handles)

    def registry_changed(self) -> None:
        for handle in list(self._handles.values()):
            handle.registry_changed()


class ClusterChooser:
    """Picks the cluster for a matched route: fixed, or weighted (random, like
    gRPC's weighted_target over the route's weighted_clusters)."""

    __slots__ = ("_handles", "_cumulative", "_total", "single")

    def __init__(self, weighted: List[Tuple[int, ClusterHandle]]) -> None:
        self._handles = tuple(h for _, h in weighted)
        cumulative = []
        running = 0
        for weight, _ in weighted:
            running += weight
            cumulative.append(running)
        self._cumulative = cumulative
        self._total = running
        self.single = self._handles[0] if len(self._handles) == 1 else None

    def choose(self) -> ClusterHandle:
        """The weighted draw; a single cluster is ``single`` (the router reads it first)."""
        return self._handles[bisect.bisect_right(self._cumulative, random.random() * self._total)]


class CompiledRoute:
    """A route as the request path reads it: what matching and a new Call need,
    in one object (a call that reads one object instead of the Route, its
    action and its policy touches fewer cache lines)."""

    __slots__ = ("name", "path", "headers", "query", "fraction", "conditional", "chooser", "action", "hash_policies",
                 "route", "policy", "timeout", "grpc_timeout", "plain")

    def __init__(self, route: Route, chooser: Optional[ClusterChooser]) -> None:
        self.name = route.name
        self.path = route.match.path
        self.headers = route.match.headers
        self.query = route.policy.query
        self.fraction = route.match.fraction
        #: header, query or runtime-fraction conditions beyond the path (one test per route when none)
        self.conditional = bool(self.headers or self.query or self.fraction is not None)
        self.chooser = chooser
        action = self.action = route.action
        self.hash_policies = route.policy.hash_policies
        self.route = route
        self.policy = route.policy
        self.timeout = action.timeout  # seconds for the whole call, 0 = none
        # gRPC uses max_stream_duration when set (A31), else the route timeout
        self.grpc_timeout = action.max_stream_duration if action.max_stream_duration > 0 else action.timeout
        self.plain = route.policy.plain


class RouteTable:
    """Routes in order with an index on their path matchers.

    First match wins, so the router must see candidates in route order.  Small
    tables are scanned linearly; larger ones look up case-sensitive prefixes by
    length (a few dict probes for any number of prefix routes) and exact paths
    by value, and only evaluate regex / case-insensitive matchers.  The result
    is the same ordered list of path-matching routes a full scan would give.
    """

    LINEAR_MAX = 8

    #: Paths remembered per table: a service's request paths repeat, and a hit
    #: is one dict probe instead of the index walk and a new list.  Cleared when
    #: full, so ID-like paths cannot grow it without bound.
    CACHE_MAX = 4096

    __slots__ = ("routes", "indexed", "_by_prefix", "_by_exact", "_generic", "_lengths", "_cache", "cached")

    def __init__(self, routes: Tuple[CompiledRoute, ...]) -> None:
        self.routes = routes
        self.indexed = len(routes) > self.LINEAR_MAX
        self._by_prefix: Dict[str, List[int]] = {}
        self._by_exact: Dict[str, List[int]] = {}
        self._generic: List[int] = []
        for index, route in enumerate(routes):
            matcher = route.path
            if matcher.kind == "prefix" and matcher.case_sensitive:
                self._by_prefix.setdefault(matcher.value, []).append(index)
            elif matcher.kind == "path" and matcher.case_sensitive:
                self._by_exact.setdefault(matcher.value, []).append(index)
            else:
                self._generic.append(index)
        self._lengths = sorted({len(p) for p in self._by_prefix})
        self._cache: Dict[str, Tuple[CompiledRoute, ...]] = {}
        self.cached = self._cache.get  # path -> candidates already computed, or None

    def candidates(self, path: str) -> Any:
        """Routes whose path matcher accepts ``path``, in route order."""
        found = self.cached(path)
        if found is None:
            found = self._candidates(path)
            cache = self._cache
            if len(cache) >= self.CACHE_MAX:
                cache.clear()  # thread-safe under the GIL; readers just miss
            cache[path] = found
        return found

    def _candidates(self, path: str) -> Tuple[CompiledRoute, ...]:
        routes = self.routes
        if not self.indexed:
            return tuple(r for r in routes if r.path.matches(path))
        found: List[int] = []
        get = self._by_prefix.get
        size = len(path)
        for length in self._lengths:
            if length > size:
                break
            hit = get(path[:length])
            if hit:
                found.extend(hit)
        hit = self._by_exact.get(path)
        if hit:
            found.extend(hit)
        for index in self._generic:
            if routes[index].path.matches(path):
                found.append(index)
        if len(found) > 1:
            found.sort()
        return tuple(routes[i] for i in found)


class TargetSnapshot:
    """What the request path reads for one target; never mutated once published."""

    __slots__ = ("routes", "table", "vhost", "route_config")

    def __init__(self, routes: Tuple[CompiledRoute, ...], vhost: str, route_config: str) -> None:
        self.routes = routes
        self.table = RouteTable(routes)
        self.vhost = vhost
        self.route_config = route_config


NOT_FOUND = TargetSnapshot((), "", "")  # the control plane does not know this host


class HostTarget:
    """Resolution state of one ``host:port``; an xDS watcher for LDS and RDS."""

    def __init__(self, host: str, port: int, client: Any, clusters: ClusterManager, timeout: float,
                 registry: Any = None) -> None:
        self.host = host
        self.port = port
        self.authority = f"{host}:{port}"
        self.lds_name = self.authority
        self.snapshot: Optional[TargetSnapshot] = None
        self.ready = threading.Event()
        self.deadline = time.monotonic() + timeout
        self._client = client
        self._clusters = clusters
        self._rds_name: Optional[str] = None
        self._route_config: Optional[RouteConfig] = None
        self._cluster_names: List[str] = []
        self._pending_routes: Optional[Tuple[Route, ...]] = None
        self._pending_vhost = ""
        self.listener: Optional[ListenerConfig] = None
        self._registry = registry
        self._fallback: Any = None  # RegistryFallback while LDS says the host is not in the mesh

    def start(self) -> None:
        if self._registry is not None:
            self._registry.watch_host(self.host)  # per-service registries start looking now, in parallel with LDS
        self._client.watch(LDS, self.lds_name, self)

    # xDS watcher protocol
    def on_resource(self, type_url: str, name: str, value: Any) -> None:
        if type_url == LDS:
            self.listener = value
            self._fallback = None
            if value.rds_name is not None:
                if value.rds_name != self._rds_name:
                    old = self._rds_name
                    self._rds_name = value.rds_name
                    self._client.watch(RDS, value.rds_name, self)
                    if old is not None:
                        self._client.cancel_watch(RDS, old, self)
            else:
                self._drop_rds()
                self._set_route_config(value.inline_routes)
        elif type_url == RDS and name == self._rds_name:
            self._set_route_config(value)

    def on_does_not_exist(self, type_url: str, name: str) -> None:
        if type_url == LDS:
            self.listener = None
            self._drop_rds()
            self._route_config = None
            self._set_clusters([])
            self._pending_routes = None
            self._not_in_mesh()

    def on_error(self, type_url: str, name: str, reason: str) -> None:
        # A listener that was never good: the host is effectively unknown to us;
        # the app's calls go out untouched rather than wait.
        if type_url == LDS and self.listener is None and self.snapshot is None:
            self._not_in_mesh()

    def _not_in_mesh(self) -> None:
        """Not an xDS host: route it from the registries if one knows it, else
        NOT_FOUND (calls go out untouched).  While a registry has not answered
        yet the snapshot stays unset, so the first call waits (bounded)."""
        if self._registry is None:
            self.snapshot = NOT_FOUND
            self.ready.set()
            return
        if self._fallback is None:
            from meshpatch.routing.registry_route import RegistryFallback

            self._fallback = RegistryFallback(self.host, self.port, self._registry)
        snapshot, _ = self._fallback.evaluate()
        if snapshot is not None:
            self.snapshot = snapshot
            self.ready.set()

    def registry_changed(self) -> None:
        if self._fallback is not None:
            self._not_in_mesh()

    def xds_unavailable(self) -> None:
        """The xDS server cannot be reached and this host never resolved: the
        registries may route it meanwhile (LDS, when it comes, takes over)."""
        if self._registry is not None and self._fallback is None and self.listener is None and self.snapshot is None:
            self._not_in_mesh()

    def _drop_rds(self) -> None:
        if self._rds_name is not None:
            self._client.cancel_watch(RDS, self._rds_name, self)
            self._rds_name = None

    def _set_route_config(self, config: Optional[RouteConfig]) -> None:
        self._route_config = config
        vhost = select_virtual_host(config.virtual_hosts, self.host, self.port) if config else None
        routes: Tuple[Route, ...] = vhost.routes if vhost is not None else ()
        names: List[str] = []
        for route in routes:
            action = route.action
            if action.kind == "cluster":
                names.append(action.cluster)
            elif action.kind == "weighted":
                names.extend(w.name for w in action.weighted)
            names.extend(m.cluster for m in route.policy.mirrors)
        self._set_clusters(list(dict.fromkeys(names)))
        self._pending_routes = routes
        self._pending_vhost = vhost.name if vhost is not None else ""
        self.clusters_changed()

    def _set_clusters(self, names: List[str]) -> None:
        old = set(self._cluster_names)
        new = set(names)
        for name in names:
            if name not in old:
                self._clusters.acquire(name, self)
        for name in self._cluster_names:
            if name not in new:
                self._clusters.release(name, self)
        self._cluster_names = names

    def clusters_changed(self) -> None:
        """Publish the pending routes once every cluster they use has resolved."""
        routes = self._pending_routes
        if routes is None:
            return
        handles = {}
        for name in self._cluster_names:
            handle = self._clusters.get(name)
            if handle is None or handle.state == PENDING:
                return
            handles[name] = handle
        compiled = []
        for route in routes:
            action = route.action
            chooser = None
            if action.kind == "cluster":
                chooser = ClusterChooser([(1, handles[action.cluster])])
            elif action.kind == "weighted":
                chooser = ClusterChooser([(w.weight, handles[w.name]) for w in action.weighted])
            compiled.append(CompiledRoute(route, chooser))
        config_name = self._route_config.name if self._route_config else ""
        self.snapshot = TargetSnapshot(tuple(compiled), self._pending_vhost, config_name)
        if not self.ready.is_set():
            log.info("meshpatch: %s resolved through xDS (%d routes)", self.authority, len(compiled))
        self.ready.set()

    def close(self) -> None:
        self._client.cancel_watch(LDS, self.lds_name, self)
        self._drop_rds()
        self._set_clusters([])
