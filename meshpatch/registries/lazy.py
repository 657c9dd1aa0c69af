"""Base for registries queried one service at a time (Consul, Nacos).

Listing a whole Consul or Nacos catalog and long-polling every service in it
would cost one connection per service the app never calls.  These sources
watch only the names the app actually calls (the catalog passes them on when
a new host is first used), answer "settled" once each name got its first
answer (or the registry is unreachable), and keep the last list per service.
"""

from __future__ import annotations

import threading
from typing import Dict, Iterable, List, Set, Tuple

from meshpatch.registries.base import Instance, Registry
from meshpatch.registries.config import RegistryURI

MAX_WATCHED = 1000  # distinct service names watched per source


class LazyRegistry(Registry):
    def __init__(self, uri: RegistryURI) -> None:
        super().__init__(uri)
        self._watched: List[str] = []
        self._answered: Set[str] = set()
        self._by_service: Dict[str, Tuple[Instance, ...]] = {}
        self._state_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._new_names = threading.Event()

    def watch(self, names: Iterable[str]) -> None:
        added = []
        with self._state_lock:
            for name in names:
                if name and name not in self._watched and len(self._watched) < MAX_WATCHED:
                    self._watched.append(name)
                    added.append(name)
        if added:
            self.names_added(added)

    def names_added(self, names: List[str]) -> None:
        """Called on the caller's thread when new names are watched."""
        self._new_names.set()

    def watched(self) -> List[str]:
        with self._state_lock:
            return list(self._watched)

    def settled(self, names: Iterable[str]) -> bool:
        if self._reported_down:
            return True
        with self._state_lock:
            return all(name in self._answered or name not in self._watched for name in names)

    def answer(self, name: str, instances: Iterable[Instance]) -> None:
        """Record one service's current instances (empty = unknown here) and publish."""
        items = tuple(instances)
        with self._publish_lock:  # one publisher at a time; callbacks run outside _state_lock
            with self._state_lock:
                first = name not in self._answered
                self._answered.add(name)
                if items:
                    self._by_service[name] = items
                else:
                    self._by_service.pop(name, None)
                services = dict(self._by_service)
            before = self.updates
            self.publish(services)
            if first and self.updates == before and self._on_change is not None:
                # Nothing changed, but a first call waiting for this name may now go out untouched.
                self._on_change(self)

    def reset_after_fork(self) -> None:
        self._state_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self._new_names = threading.Event()
