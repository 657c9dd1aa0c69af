"""The registry source interface and the thread scaffolding every source shares.

A source watches one service registry and publishes an immutable snapshot:
service name → tuple of :class:`Instance`.  It never touches routing; the
:class:`~meshpatch.registries.catalog.Catalog` merges sources and tells the
router what changed.  Sources run their own daemon thread, marked as
meshpatch's internal traffic so the hooks never reroute a registry call, and
keep their last snapshot whenever the registry cannot be reached (the fleet
keeps working on the last known list, as Dubbo and Nacos clients do).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

from meshpatch.internal import suppress_current_context
from meshpatch.registries.config import RegistryURI

log = logging.getLogger("meshpatch.registry")

Services = Mapping[str, Tuple["Instance", ...]]
ChangeCallback = Callable[["Registry"], None]


class Instance:
    """One endpoint of a registry service.  Immutable once built; ``labels``
    are the registry's metadata (Dubbo URL parameters, Consul Meta, Nacos
    metadata, Kratos metadata) and are what DestinationRule subsets select."""

    __slots__ = ("service", "address", "port", "labels", "healthy", "weight", "source")

    def __init__(
        self,
        service: str,
        address: str,
        port: int,
        labels: Optional[Mapping[str, str]] = None,
        healthy: bool = True,
        weight: int = 1,
        source: str = "",
    ) -> None:
        self.service = service
        self.address = address
        self.port = int(port)
        self.labels: Mapping[str, str] = dict(labels or {})
        self.healthy = bool(healthy)
        self.weight = int(weight)
        self.source = source

    @property
    def key(self) -> Tuple[str, int]:
        return (self.address, self.port)

    def _identity(self) -> tuple:
        return (self.service, self.address, self.port, tuple(sorted(self.labels.items())), self.healthy,
                self.weight, self.source)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Instance) and self._identity() == other._identity()

    def __hash__(self) -> int:
        return hash(self._identity())

    def __repr__(self) -> str:
        state = "" if self.healthy else " unhealthy"
        return f"Instance({self.service} {self.address}:{self.port} {dict(self.labels)}{state})"


class Registry:
    """Base of every source.  Subclasses implement :meth:`run` (the watch loop,
    on the source's own thread) and publish with :meth:`publish`.

    ``on_change`` is called from the source's thread after every change of the
    snapshot; ``first_attempt`` is set once the source has either loaded the
    registry or failed to reach it once (so the first call to a registry host
    waits for a real answer, but never for a registry that is down).
    """

    scheme = ""

    def __init__(self, uri: RegistryURI) -> None:
        self.uri = uri
        self.first_attempt = threading.Event()
        self._services: Dict[str, Tuple[Instance, ...]] = {}
        self._on_change: Optional[ChangeCallback] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._reported_down = False
        self.updates = 0

    # -- interface ----------------------------------------------------------

    @property
    def description(self) -> str:
        return self.uri.display

    def start(self, on_change: ChangeCallback) -> None:
        self._on_change = on_change
        self._stop = threading.Event()
        thread = threading.Thread(target=self._main, name=f"meshpatch-registry-{self.scheme}", daemon=True)
        self._thread = thread
        thread.start()

    def snapshot(self) -> Services:
        """The current service → instances map (never mutated; replaced whole)."""
        return self._services

    def stop(self) -> None:
        self._stop.set()
        self.close()

    def watch(self, names: Iterable[str]) -> None:
        """Hint: the app calls these service names.  Sources that must query one
        service at a time (Consul, Nacos) start watching them; the others list
        everything anyway and ignore it."""

    def after_fork_in_child(self) -> None:
        """The parent's thread and connections do not exist here: keep the
        snapshot (route at once), start over with new ones."""
        self._thread = None
        self.reset_after_fork()
        if self._on_change is not None:
            self.start(self._on_change)

    # -- for subclasses -----------------------------------------------------

    def run(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        """Release connections (called by :meth:`stop`); may run on any thread."""

    def reset_after_fork(self) -> None:
        """Drop the parent's connections and locks before restarting."""

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def sleep(self, seconds: float) -> bool:
        """Wait, waking early on stop; True when the source should go on."""
        return not self._stop.wait(seconds)

    def publish(self, services: Mapping[str, Iterable[Instance]]) -> None:
        """Replace the snapshot (only when it changed) and tell the catalog."""
        new = {name: tuple(sorted(set(items), key=_order)) for name, items in services.items()}
        first = not self.first_attempt.is_set()
        if new != self._services:
            self._services = new
            self.updates += 1
            self.first_attempt.set()
            self._notify()
        elif first:
            self.first_attempt.set()
            self._notify()  # nothing listed, but "settled" changed for waiting calls
        self.reachable()

    def reachable(self) -> None:
        if self._reported_down:
            log.warning("meshpatch: registry %s is reachable again", self.description)
            self._reported_down = False
        self.first_attempt.set()

    def unreachable(self, reason: str) -> None:
        """One log line per outage; the last snapshot stays in force.  The first
        failure also tells the catalog: calls waiting for this source's first
        answer may go on without it."""
        first = not self.first_attempt.is_set()
        if not self._reported_down:
            self._reported_down = True
            if self.updates:
                log.warning("meshpatch: registry %s unreachable (%s); keeping its last list of %d service(s), retrying",
                            self.description, reason, len(self._services))
            else:
                log.warning("meshpatch: registry %s unreachable (%s); its services are not routed until it answers, "
                            "retrying in the background", self.description, reason)
        self.first_attempt.set()
        if first:
            self._notify()

    def mark_attempted(self) -> None:
        """The first answer of any kind (even "cannot parse") settles waiting calls."""
        if not self.first_attempt.is_set():
            self.first_attempt.set()
            self._notify()

    def _notify(self) -> None:
        callback = self._on_change
        if callback is not None:
            try:
                callback(self)
            except Exception as exc:  # the watch loop must survive a routing bug
                from meshpatch.safety import internal_error

                internal_error(f"registry.{self.scheme}.on_change", exc)

    def _main(self) -> None:
        """The source's thread: everything it does is meshpatch's own traffic.
        ``run`` handles the registry's own errors; anything else it raises is
        retried with backoff (reset after a run that lasted a while)."""
        suppress_current_context()
        stop = self._stop
        backoff = Backoff()
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.run()
                return
            except Exception as exc:
                if stop.is_set():
                    return
                if time.monotonic() - started > 30:
                    backoff.reset()
                self.unreachable(f"{type(exc).__name__}: {exc}")
                if not self.sleep(backoff.next()):
                    return


class Backoff:
    """Exponential backoff with jitter, capped: reconnect without hammering a
    registry that is down, and quickly after a short blip."""

    def __init__(self, first: float = 0.2, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self._current = first

    def next(self) -> float:
        delay = self._current
        self._current = min(self.cap, self._current * 2)
        return delay * (0.75 + random.random() * 0.5)

    def reset(self) -> None:
        self._current = self.first


def _order(instance: Instance) -> tuple:
    return (instance.address, instance.port, sorted(instance.labels.items()))
