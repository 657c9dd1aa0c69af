"""All configured registry sources as one view: hostname → instances.

Names (README "Registries"): a call to host ``H`` reaches the registry service
named ``H`` (case-insensitive), every service given ``H`` as an alias in
``MESHPATCH_REGISTRY_ALIASES``, and — for a service name without dots, as
Consul/Nacos/Kubernetes names are — the Kubernetes forms of that name in the
app's own namespace (``S.<ns>``, ``S.<ns>.svc``, ``S.<ns>.svc.<domain>``), the
names by which the same service is known once it moves into the mesh.

Merge across sources: the union, de-duplicated by ``address:port``; an
endpoint listed by several sources is healthy only if every one of them says
so, and carries the labels of all of them.

The view is rebuilt (off the request path) on every source change and swapped
by assignment; the router reads it only when its own snapshots are rebuilt.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

from meshpatch.registries.base import Instance, Registry
from meshpatch.registries.config import aliases_by_host

log = logging.getLogger("meshpatch.registry")


class Catalog:
    def __init__(
        self,
        sources: Sequence[Registry],
        aliases: Mapping[str, Set[str]],
        namespace: str = "default",
        cluster_domain: str = "cluster.local",
    ) -> None:
        self.sources = list(sources)
        self._aliases = {service.lower(): set(hosts) for service, hosts in aliases.items()}
        self._alias_names = {host: tuple(s.lower() for s in names) for host, names in aliases_by_host(aliases).items()}
        self._alias_spelling = {service.lower(): service for service in aliases}
        self._namespace = namespace
        self._kube_suffixes = (f".{namespace}", f".{namespace}.svc", f".{namespace}.svc.{cluster_domain}")
        self._by_name: Dict[str, Tuple[Instance, ...]] = {}
        self._listeners: List[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._started = False
        self.version = 0

    # -- life cycle -----------------------------------------------------------

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for source in self.sources:
            source.start(self._source_changed)

    def stop(self) -> None:
        for source in self.sources:
            try:
                source.stop()
            except Exception:
                pass
        self._started = False

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        for source in self.sources:
            source.after_fork_in_child()

    def add_listener(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def wait_first_attempt(self, timeout: float) -> bool:
        import time

        deadline = time.monotonic() + timeout
        for source in self.sources:
            if not source.first_attempt.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    # -- names --------------------------------------------------------------

    def names_for_host(self, host: str) -> Tuple[str, ...]:
        """Lower-case service names a hostname may reach, most specific first."""
        host = host.lower().rstrip(".")
        names = [host]
        names.extend(self._alias_names.get(host, ()))
        for suffix in self._kube_suffixes:
            if host.endswith(suffix):
                short = host[: -len(suffix)]
                if short and "." not in short:
                    names.append(short)
        return tuple(dict.fromkeys(names))

    def watch_host(self, host: str) -> None:
        """Tell per-service sources (Consul, Nacos) that the app calls ``host``."""
        names = [self._alias_spelling.get(n, n) for n in self.names_for_host(host)]
        for source in self.sources:
            try:
                source.watch(names)
            except Exception as exc:
                from meshpatch.safety import internal_error

                internal_error(f"registry.{source.scheme}.watch", exc)

    def settled(self, host: str) -> bool:
        """True once every source has answered (or failed) for ``host``: after
        that, "unknown" is a real answer and the call may go out untouched."""
        names = self.names_for_host(host)
        return all(_settled(source, names) for source in self.sources)

    def instances(self, host: str) -> Optional[Tuple[Instance, ...]]:
        """Every instance a hostname reaches, or None when no source knows it."""
        by_name = self._by_name
        found: Optional[List[Instance]] = None
        for name in self.names_for_host(host):
            items = by_name.get(name)
            if items is not None:
                found = (found or []) + list(items)
        if found is None:
            return None
        return merge_instances(found)

    def services(self) -> Dict[str, Tuple[Instance, ...]]:
        return dict(self._by_name)

    # -- source callbacks (source threads) ------------------------------------

    def _source_changed(self, source: Registry) -> None:
        with self._lock:
            merged: Dict[str, List[Instance]] = {}
            for src in self.sources:
                for name, items in src.snapshot().items():
                    merged.setdefault(name.lower(), []).extend(items)
            self._by_name = {name: merge_instances(items) for name, items in merged.items()}
            self.version += 1
        for listener in list(self._listeners):
            try:
                listener()
            except Exception as exc:
                from meshpatch.safety import internal_error

                internal_error("registry.catalog.listener", exc)


def _settled(source: Registry, names: Iterable[str]) -> bool:
    check = getattr(source, "settled", None)
    if check is not None:
        return bool(check(names))
    return source.first_attempt.is_set()


def merge_instances(items: Iterable[Instance]) -> Tuple[Instance, ...]:
    """De-duplicate by address:port: healthy only if every listing says so,
    labels of all listings (the first listing wins a conflicting key), the
    smallest weight (0 = take no traffic, wherever it was said)."""
    by_key: Dict[Tuple[str, int], Instance] = {}
    for inst in items:
        seen = by_key.get(inst.key)
        if seen is None:
            by_key[inst.key] = inst
            continue
        labels = dict(inst.labels)
        labels.update(seen.labels)
        sources = seen.source if inst.source in seen.source.split(",") else f"{seen.source},{inst.source}"
        by_key[inst.key] = Instance(seen.service, seen.address, seen.port, labels, seen.healthy and inst.healthy,
                                    min(seen.weight, inst.weight), sources)
    return tuple(sorted(by_key.values(), key=lambda i: (i.address, i.port)))
