"""Routing for hosts that only a registry knows (LDS says "no such listener",
or no xDS server is configured at all).

Such a host gets the same immutable snapshot shape an xDS host has: one
catch-all route to one cluster whose picker is round robin over the
registry's usable instances (meshpatch's defaults; no VirtualService applies
to a host the control plane does not know).  So the per-request pick is the
very same code and cost as for an xDS host.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional, Tuple

from meshpatch.routing.lb import EmptyPicker, build_picker
from meshpatch.routing.matchers import PathMatcher
from meshpatch.routing.merge import for_port, merge_endpoints
from meshpatch.routing.model import Route, RouteAction, RouteMatch
from meshpatch.routing.target import NOT_FOUND, RESOLVED, ClusterChooser, ClusterHandle, CompiledRoute, TargetSnapshot

log = logging.getLogger("meshpatch.routing")


class RegistryCluster(ClusterHandle):
    """Stands where an xDS cluster would: a ClusterHandle (so per-attempt
    accounting and policies that live there apply) fed by a registry, not xDS."""

    __slots__ = ("instances", "port")

    def __init__(self, host: str, port: int) -> None:
        super().__init__(f"registry|{port}||{host}", None)
        self.port = port
        self.picker = EmptyPicker("no registry instances")
        self.instances: Tuple[Any, ...] = ()
        self.state = RESOLVED

    def update(self, instances: Tuple[Any, ...]) -> None:
        if instances == self.instances:
            return
        self.instances = instances
        joining = for_port(instances, self.port)
        picker = build_picker(merge_endpoints(self.name, None, joining))
        self.picker = EmptyPicker("no healthy registry instances") if isinstance(picker, EmptyPicker) else picker

    def release(self) -> None:
        pass  # no xDS watches


def registry_snapshot(host: str, port: int, instances: Tuple[Any, ...]) -> Tuple[Any, RegistryCluster]:
    cluster = RegistryCluster(host, port)
    cluster.update(instances)
    route = Route("registry", RouteMatch(PathMatcher("prefix", "/", True)), RouteAction("cluster", cluster=cluster.name))
    compiled = CompiledRoute(route, ClusterChooser([(1, cluster)]))
    return TargetSnapshot((compiled,), f"registry:{host}", ""), cluster


class RegistryFallback:
    """The registry half of a target: publishes a registry snapshot while the
    host is unknown to xDS, and keeps its picker current."""

    __slots__ = ("host", "port", "registry", "cluster", "snapshot")

    def __init__(self, host: str, port: int, registry: Any) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.cluster: Optional[RegistryCluster] = None
        self.snapshot: Any = None

    def evaluate(self) -> Tuple[Any, bool]:
        """(snapshot or NOT_FOUND or None, settled): None = still waiting for a registry's first answer."""
        instances = self.registry.instances(self.host)
        if instances is None:
            self.cluster = None
            self.snapshot = None
            if self.registry.settled(self.host):
                return NOT_FOUND, True
            return None, False
        if self.cluster is None or self.snapshot is None:
            self.snapshot, self.cluster = registry_snapshot(self.host, self.port, instances)
            log.info("meshpatch: %s:%d routed from the registry (%d instance(s))", self.host, self.port, len(instances))
        else:
            self.cluster.update(instances)
        return self.snapshot, True


class RegistryTarget:
    """A target when no xDS server is configured: registries alone route."""

    def __init__(self, host: str, port: int, registry: Any, timeout: float) -> None:
        self.host = host
        self.port = port
        self.authority = f"{host}:{port}"
        self.snapshot: Any = None
        self.ready = threading.Event()
        self.deadline = time.monotonic() + timeout
        self._fallback = RegistryFallback(host, port, registry)
        self._registry = registry

    def start(self) -> None:
        self._registry.watch_host(self.host)
        self.registry_changed()

    def registry_changed(self) -> None:
        snapshot, settled = self._fallback.evaluate()
        if snapshot is not None:
            self.snapshot = snapshot
            self.ready.set()

    def xds_unavailable(self) -> None:
        pass

    def close(self) -> None:
        pass
