"""The router: the one call every hook makes, per request.

Hot path: a dict lookup for the target, an attribute read for its immutable
snapshot, the route loop (first match wins) and the cluster's picker.  No lock
is taken and nothing waits, except the first calls to a brand-new host, which
wait (bounded by ``MESHPATCH_RESOLVE_TIMEOUT``) for LDS → RDS → CDS → EDS; if
that does not finish in time the original call proceeds and later calls never
wait on the network.
"""

from __future__ import annotations

import ipaddress
import logging
import os

import xxhash
import random
import threading
import time
from time import perf_counter
from typing import Any, Callable, Dict, List, Optional, Tuple

from meshpatch import telemetry
from meshpatch.api import CircuitBreakerOpen, MeshError, MeshUnavailable, NoRouteMatched, Pick
from meshpatch.routing.call import Call
from meshpatch.routing.target import NOT_FOUND, ClusterManager, HostTarget

log = logging.getLogger("meshpatch.routing")
_IDLE_PROBE = telemetry.IDLE_PROBE

DEFAULT_PORTS = {"http": 80, "https": 443, "grpc": 443, "grpcs": 443}
MAX_TARGETS = 10_000  # distinct host:port pairs tracked before new ones pass through untouched


class _PassThrough:
    """Cached answer for names that are never mesh names (IP literals, localhost)."""

    snapshot = NOT_FOUND


PASS_THROUGH = _PassThrough()


def _never_mesh(host: str) -> bool:
    if not host or host == "localhost" or host.endswith(".localhost"):
        return True
    if host[0].isdigit() or ":" in host or host.startswith("["):
        try:
            ipaddress.ip_address(host.strip("[]"))
            return True
        except ValueError:
            return False
    return False


def presumed_mesh(host: str, namespace: str, cluster_domain: str) -> bool:
    """Without the control plane, which names can only be mesh names?  Short
    names (kube DNS resolves them in the pod's namespace), ``name.<own
    namespace>`` and ``*.svc`` / ``*.svc.<cluster domain>``.  Used only by
    fail-closed mode, so every other name keeps working when xDS is down."""
    host = host.rstrip(".")
    if "." not in host:
        return True
    if host.endswith(".svc") or host.endswith(".svc." + cluster_domain):
        return True
    return host.count(".") == 1 and host.rsplit(".", 1)[1] == namespace


class _RequestHeaders:
    """Header lookup for matchers, adding HTTP pseudo-headers; built only when a
    route actually has header matchers."""

    __slots__ = ("_headers", "_pseudo", "_grpc")

    def __init__(self, headers: Any, scheme: str, method: str, path: str, authority: str) -> None:
        self._headers = headers
        self._grpc = scheme == "grpc"
        self._pseudo = {":method": method, ":path": path, ":authority": authority, ":scheme": scheme}

    def get(self, name: str) -> Optional[str]:
        if self._grpc:
            # gRPC (A28): pseudo-headers are not visible and binary headers never match;
            # content-type is, and it is application/grpc unless the app set its own.
            if name.startswith(":") or name.endswith("-bin"):
                return None
            if name == "content-type":
                value = self._headers.get(name) if self._headers is not None else None
                return value or "application/grpc"
        elif name.startswith(":"):
            return self._pseudo.get(name)
        headers = self._headers
        if headers is None:
            return None
        value = headers.get(name)
        if value is None:
            return None
        if isinstance(value, bytes):
            return value.decode("latin-1")
        return value if isinstance(value, str) else str(value)


def _query_params(path: str) -> Dict[str, Tuple[str, ...]]:
    from urllib.parse import parse_qsl

    params: Dict[str, List[str]] = {}
    query = path.split("?", 1)[1] if "?" in path else ""
    for name, value in parse_qsl(query.split("#", 1)[0], keep_blank_values=True):
        params.setdefault(name, []).append(value)
    return {name: tuple(values) for name, values in params.items()}


def _hash_value(policy: Any, headers: Any, scheme: str, method: str, path: str, authority: str, source_ip: str) -> Optional[str]:
    kind = policy.kind
    if kind == "header":
        name = policy.name
        if headers is not None and scheme != "grpc" and name[:1] != ":":  # a plain HTTP header: no wrapper
            value = headers.get(name)
            if value is not None and type(value) is not str:
                value = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        else:
            value = _RequestHeaders(headers, scheme, method, path.split("?", 1)[0], authority).get(name)
        if value is not None and policy.regex is not None:
            value = policy.regex.sub(policy.substitution, value)
        return value
    if kind == "cookie":
        if scheme == "grpc" or headers is None:
            return None
        raw = headers.get("cookie")
        if not raw:
            return None
        for part in str(raw).split(";"):
            name, _, value = part.strip().partition("=")
            if name == policy.name:
                return value
        return None
    if kind == "query":
        if scheme == "grpc":
            return None
        values = _query_params(path).get(policy.name)
        return values[0] if values else None
    if kind == "source_ip":
        return source_ip
    return None


def _request_hash(policies: Any, headers: Any, scheme: str, method: str, path: str, authority: str, source_ip: str) -> Optional[int]:
    """Envoy's hash-policy evaluation: XXH64 of each value, combined by
    rotate-left-1 then XOR, stopping after a terminal policy that produced a hash.
    None (no policy matched) means "random" to the hashing load balancers."""
    result: Optional[int] = None
    for policy in policies:
        value = _hash_value(policy, headers, scheme, method, path, authority, source_ip)
        if value is None:
            continue
        new = xxhash.xxh64_intdigest(value.encode() if isinstance(value, str) else value)
        if result is None:
            result = new
        else:
            result = (((result << 1) | (result >> 63)) & 0xFFFFFFFFFFFFFFFF) ^ new
        if policy.terminal:
            break
    return result


class Router:
    """``client`` may be None (no xDS server: registries alone route); ``registry``
    is the registry catalog or None."""

    def __init__(self, client: Any, resolve_timeout: float, ensure_started: Callable[[], None],
                 registry: Any = None, *, fail_closed: bool = False, namespace: str = "default",
                 cluster_domain: str = "cluster.local") -> None:
        self._client = client
        self._timeout = resolve_timeout
        self._ensure_started = ensure_started
        self.fail_closed = fail_closed
        self._namespace = namespace
        self._cluster_domain = cluster_domain
        # MESHPATCH_HOLD_UNTIL_READY: until this monotonic time, first calls wait
        # for the control plane even while it is unreachable (0 = not holding).
        self.hold_until = 0.0
        self._targets: Dict[Tuple[str, int], Any] = {}
        self._create_lock = threading.Lock()
        self.clusters = ClusterManager(client, registry)
        self.started = False
        # "source IP" for hash policies: this workload's own address, the
        # downstream address a sidecar would see for the app's requests.
        self.source_ip = (os.environ.get("INSTANCE_IP") or os.environ.get("POD_IP") or "127.0.0.1").strip()
        self.registry = registry
        self._registry_lock = threading.RLock()  # serialises registry updates when there is no xDS lock
        if registry is not None:
            registry.add_listener(self.registry_changed)

    # -- public API ---------------------------------------------------------

    def pick(self, scheme: str, host: str, port: Optional[int], method: str, path: str, headers: Any = None) -> Optional[Pick]:
        """Route one call and choose its first endpoint (no retries): the simple
        form of :meth:`start` for callers that make exactly one attempt."""
        call = self.start(scheme, host, port, method, path, headers)
        if call is None:
            return None
        if call.handle is None:  # redirect / direct response: nothing to connect to
            raise NoRouteMatched(host, call.port, path)
        return call.next_pick(begin=False)

    def start(self, scheme: str, host: str, port: Optional[int], method: str, path: str, headers: Any = None) -> Optional[Call]:
        """Match the call's route; None = not in the mesh (make the original call).

        One function, reading the route cache, the single cluster and "no SDK"
        inline: this is the pick path bench/bench_pick.py measures."""
        began = perf_counter()
        if port is None:
            port = DEFAULT_PORTS.get(scheme, 80)
        try:
            target = self._targets.get((host, port))
            if target is None:
                target = self._create(host, port)
            snapshot = target.snapshot
            if snapshot is None:
                if not self._await(target):
                    if self.fail_closed and presumed_mesh(host.lower(), self._namespace, self._cluster_domain):
                        raise MeshUnavailable(host.lower(), port, self._why_unavailable())
                    return self._passthrough(began, host)
                snapshot = target.snapshot
            if snapshot is NOT_FOUND or snapshot is None:
                return self._passthrough(began, host)
            match_path = path.split("?", 1)[0] if "?" in path else path
            lookup = None
            query = None
            table = snapshot.table
            candidates = table.cached(match_path)
            if candidates is None:
                candidates = table.candidates(match_path)
            for route in candidates:
                if route.conditional:
                    if route.headers:
                        if lookup is None:
                            lookup = _RequestHeaders(headers, scheme, method, match_path, target.authority)
                        if scheme == "grpc":
                            if not all(m.matches_grpc(lookup.get(m.name)) for m in route.headers):
                                continue
                        elif not all(m.matches(lookup.get(m.name)) for m in route.headers):
                            continue
                    if route.query:
                        if scheme == "grpc":
                            continue  # gRPC (A28): routes with query matchers never match
                        if query is None:
                            query = _query_params(path)
                        if not all(q.matches(query.get(q.name, ())) for q in route.query):
                            continue
                    if route.fraction is not None and random.random() >= route.fraction:
                        continue
                chooser = route.chooser
                if chooser is None:
                    if route.action.kind in ("redirect", "direct") and scheme != "grpc":
                        call = Call(scheme, host, port, method, path, headers, target.authority, route, None, None)
                        call.tel = telemetry.routed(call, began, host)
                        return call
                    raise NoRouteMatched(host, port, path)  # non-forwarding (server) route, or redirect for gRPC
                handle = chooser.single or chooser.choose()
                if handle.in_flight >= handle.admit_floor:
                    refused = handle.admit_request(multiplexed=scheme == "grpc")
                    if refused is not None:
                        raise CircuitBreakerOpen(handle.name, refused)
                request_hash = None
                if route.hash_policies:
                    request_hash = _request_hash(route.hash_policies, headers, scheme, method, path, target.authority,
                                                 self.source_ip)
                call = Call(scheme, host, port, method, path, headers, target.authority, route, handle, request_hash)
                probe = _IDLE_PROBE
                if probe is None or probe[0]._TRACER_PROVIDER is not None or probe[1]._METER_PROVIDER is not None:
                    call.tel = telemetry.routed(call, began, host)  # an SDK is (or may be) set
                return call
            raise NoRouteMatched(host, port, path)
        except MeshError as exc:
            telemetry.rejected(exc)
            raise

    @staticmethod
    def _passthrough(began: float, host: str) -> None:
        telemetry.routed(None, began, host)
        return None

    def prefetch(self, host: str, port: Optional[int], scheme: str = "http") -> None:
        """Start resolving a host without waiting (gRPC channel creation)."""
        if port is None:
            port = DEFAULT_PORTS.get(scheme, 80)
        if (host, port) not in self._targets:
            self._create(host, port)

    def targets(self) -> Dict[str, Any]:
        return {f"{h}:{p}": t for (h, p), t in list(self._targets.items()) if t is not PASS_THROUGH}

    # -- internals ----------------------------------------------------------

    def _create(self, host: str, port: int) -> Any:
        key = (host, port)
        with self._create_lock:
            target = self._targets.get(key)
            if target is not None:
                return target
            lowered = host.lower()
            if _never_mesh(lowered) or len(self._targets) >= MAX_TARGETS:
                self._targets[key] = PASS_THROUGH
                return PASS_THROUGH
            if lowered != host:
                target = self._targets.get((lowered, port))
                if target is None:
                    target = self._create_unlocked(lowered, port)
                self._targets[key] = target
                return target
            return self._create_unlocked(host, port)

    def _create_unlocked(self, host: str, port: int) -> Any:
        self._ensure_started()
        if self._client is None:
            from meshpatch.routing.registry_route import RegistryTarget

            target: Any = RegistryTarget(host, port, self.registry, self._timeout)
        else:
            target = HostTarget(host, port, self._client, self.clusters, self._timeout, self.registry)
        self._targets[(host, port)] = target
        with self._update_lock():
            target.start()
        return target

    def _update_lock(self) -> Any:
        return self._client.lock if self._client is not None else self._registry_lock

    def registry_changed(self) -> None:
        """A registry source changed (its own thread): refresh registry-routed
        targets and the pickers of clusters that merge registry instances."""
        with self._update_lock():
            seen = set()
            for target in list(self._targets.values()):
                if target is PASS_THROUGH or id(target) in seen:
                    continue
                seen.add(id(target))
                target.registry_changed()
            self.clusters.registry_changed()

    def _await(self, target: Any) -> bool:
        """Bounded wait for a new target; never waits once its deadline passed or
        while the control plane is known to be unreachable -- except while
        holding until ready, when the first calls wait out the hold."""
        ready = target.ready
        if ready.is_set():
            return True
        now = time.monotonic()
        deadline = target.deadline
        client = self._client
        hold_until = self.hold_until
        if hold_until > now:
            deadline = max(deadline, hold_until)
        while now < deadline:
            if client is not None and client.failing and now >= hold_until:
                if self.registry is None:
                    return False
                with client.lock:
                    target.xds_unavailable()  # the registries may know the host meanwhile
            if ready.wait(min(deadline - now, 0.05)):
                if hold_until and client is not None and client.connected:
                    self.hold_until = 0.0  # the control plane answered: the hold is over
                return True
            now = time.monotonic()
        return False

    def _why_unavailable(self) -> str:
        client = self._client
        if client is not None and client.failing:
            error = getattr(client.transport, "last_error", "") or "unreachable"
            return f"control plane unreachable: {error}"
        return "control plane did not answer in time"
