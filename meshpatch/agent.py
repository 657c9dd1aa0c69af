"""The process-wide agent: settings + bootstrap + xDS client + registries + router, made lazily.

Nothing here runs at interpreter start.  The agent is built on the first
routed call (or prefetch), and its xDS stream thread starts then, in the
process that actually makes calls: a gunicorn ``--preload`` master that never
calls out never opens a gRPC channel.  After a fork the child abandons the
parent's channel and thread (never reused across fork), keeps the cached
config so it can route at once, and reconnects at once.

Processes that share a bootstrap share one upstream xDS stream (one process
holds it and relays to the others over a Unix socket; see
:mod:`meshpatch.xds.shared`), unless ``MESHPATCH_SHARE_STREAM=0``.

Fork safety: before a fork the agent takes its own locks (the router's
target-creation lock, then the xDS client's lock, the order every other path
takes them in), so the child never inherits a cache that a thread was half-way
through updating nor a lock held by a thread that does not exist there; the
child then gets fresh locks and fresh events.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, Optional

from meshpatch.config import ConfigError, Settings

log = logging.getLogger("meshpatch")


class Agent:
    """``bootstrap`` None = no xDS server: the registries in ``registry`` alone
    route (README "Registries"); at least one of the two is set."""

    def __init__(self, settings: Settings, bootstrap: "object", registry: "object" = None) -> None:
        from meshpatch.routing.router import Router

        self.settings = settings
        self.bootstrap = bootstrap
        self.registry = registry
        if bootstrap is not None:
            from meshpatch.xds.client import XdsClient

            self.client = XdsClient(bootstrap, transport_factory=_transport_factory(settings, bootstrap))  # type: ignore[arg-type]
        else:
            self.client = None
        namespace = bootstrap.namespace if bootstrap is not None else settings.namespace  # type: ignore[attr-defined]
        self.router = Router(self.client, settings.resolve_timeout, self._ensure_started, registry,
                             fail_closed=settings.fail_mode == "closed", namespace=namespace,
                             cluster_domain=settings.cluster_domain)
        self._started = False
        self._start_lock = threading.Lock()
        self._fork_held: list = []
        self._fork_paused: Any = None
        self.pid = os.getpid()

    def _ensure_started(self) -> None:
        if self._started:
            return
        with self._start_lock:
            if not self._started:
                if self.client is not None:
                    if self.settings.hold_until_ready and not self.client.connected:
                        import time

                        self.router.hold_until = time.monotonic() + self.settings.hold_until_ready
                    self.client.start()
                if self.registry is not None:
                    self.registry.start()  # type: ignore[attr-defined]  (a no-op when already running)
                self._started = True
                sources = ", ".join(s.description for s in self.registry.sources) if self.registry is not None else ""  # type: ignore[attr-defined]
                if self.bootstrap is not None:
                    log.info("meshpatch agent started: xDS server %s (%s)%s",
                             self.bootstrap.servers[0].target, self.bootstrap.source,  # type: ignore[attr-defined]
                             f"; registries {sources}" if sources else "")
                else:
                    log.info("meshpatch agent started without xDS: registries %s", sources)

    def prefetch(self, host: str, port: Optional[int], scheme: str = "http") -> None:
        self.router.prefetch(host, port, scheme)

    def stop(self) -> None:
        if self._started:
            if self.client is not None:
                self.client.stop()
            if self.registry is not None:
                self.registry.stop()  # type: ignore[attr-defined]
            self._started = False

    def before_fork(self) -> None:
        """Quiesce for the instant of the fork: park the xDS stream outside gRPC
        (see GrpcAdsTransport.pause_for_fork), then take the locks so no config
        update is half-done (bounded: a lock still busy after a second is left
        alone and replaced in the child)."""
        self._fork_paused = None
        if self.client is not None and self._started:
            transport = self.client.transport
            pause = getattr(transport, "pause_for_fork", None)
            if pause is not None:
                pause()
                self._fork_paused = transport
        held = []
        locks = [self.router._create_lock]
        if self.client is not None:
            locks.append(self.client.lock)
        for lock in locks:
            if lock.acquire(timeout=1.0):
                held.append(lock)
            else:
                log.warning("meshpatch: a lock was still busy at fork; the child starts with fresh ones")
                break
        self._fork_held = held

    def after_fork_in_parent(self) -> None:
        held, self._fork_held = self._fork_held, []
        for lock in reversed(held):
            lock.release()
        paused, self._fork_paused = self._fork_paused, None
        if paused is not None:
            paused.resume_after_fork()

    def after_fork_in_child(self) -> None:
        # Locks may have been held by threads that do not exist in the child.
        self._fork_held = []
        self._fork_paused = None
        self.router._create_lock = threading.Lock()
        self.router._registry_lock = threading.RLock()
        self._start_lock = threading.Lock()
        if self.client is not None:
            self.client.after_fork_in_child()
        if self.registry is not None and self._started:
            self.registry.after_fork_in_child()  # type: ignore[attr-defined]
        # A thread that was waiting for a target at fork time is gone, but the
        # Event's internal lock may be in any state: give pending targets new ones.
        from meshpatch.routing.target import HostTarget

        for target in set(self.router._targets.values()):
            if isinstance(target, HostTarget) and not target.ready.is_set():
                target.ready = threading.Event()
                if target.snapshot is not None:
                    target.ready.set()
        was_started = self._started
        self._started = False
        self.pid = os.getpid()
        if was_started:
            # Reconnect now: the child is about to serve requests and needs pushes.
            self._ensure_started()


def _transport_factory(settings: Settings, bootstrap: "object") -> Any:
    """The xDS transport: shared by the pod's processes unless MESHPATCH_SHARE_STREAM=0."""
    from meshpatch.xds.transport import GrpcAdsTransport

    if not settings.share_stream:
        return GrpcAdsTransport
    try:
        import fcntl  # noqa: F401 - Unix only
    except ImportError:  # pragma: no cover
        return GrpcAdsTransport
    from meshpatch.xds.pod import PodUnavailable, pod_lock_for
    from meshpatch.xds.shared import SharedTransport

    def factory(server: Any, on_start: Any, on_response: Any, on_end: Any) -> Any:
        pod = None
        try:
            pod = pod_lock_for(settings.runtime_dir, server.identity(), bootstrap.node)  # type: ignore[attr-defined]
        except PodUnavailable as exc:
            log.warning("meshpatch: cannot share the xDS stream with the pod's other processes (%s); "
                        "this process keeps its own", exc)
        return SharedTransport(server, on_start, on_response, on_end, pod)

    return factory


_agent: Optional[Agent] = None
_disabled = False
_lock = threading.Lock()


def get_agent() -> Optional[Agent]:
    """The agent, or None when meshpatch is off for this process (no xDS
    configured, or a configuration error that was reported once)."""
    agent = _agent
    if agent is not None or _disabled:
        return agent
    return _create()


def _create() -> Optional[Agent]:
    global _agent, _disabled
    with _lock:
        if _agent is not None or _disabled:
            return _agent
        try:
            from meshpatch.bootstrap import load_bootstrap

            settings = Settings()
            logging.getLogger("meshpatch").setLevel(settings.log_level)
            bootstrap = load_bootstrap(settings)
            registry = None
            if settings.registry:
                from meshpatch.registries import build_catalog

                registry = build_catalog(settings)
        except ConfigError as exc:
            log.warning("%s", exc)
            _disabled = True
            return None
        if bootstrap is None and registry is None:
            log.warning(
                "meshpatch: no xDS configuration (set MESHPATCH_XDS_SERVER=host:port, or GRPC_XDS_BOOTSTRAP to the "
                "bootstrap file istio-agent writes) and no MESHPATCH_REGISTRY; calls are not routed"
            )
            _disabled = True
            return None
        _agent = Agent(settings, bootstrap, registry)
        global _fork_hooks
        if hasattr(os, "register_at_fork") and not _fork_hooks:
            os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                                after_in_child=_after_fork_in_child)
            _fork_hooks = True
        return _agent


_fork_hooks = False


def _before_fork() -> None:
    agent = _agent
    if agent is not None:
        try:
            agent.before_fork()
        except Exception:  # pragma: no cover - a fork must never fail because of us
            pass


def _after_fork_in_parent() -> None:
    agent = _agent
    if agent is not None:
        try:
            agent.after_fork_in_parent()
        except Exception:  # pragma: no cover
            pass


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
    from meshpatch import safety

    safety.reinit_after_fork()
    agent = _agent
    if agent is not None:
        try:
            agent.after_fork_in_child()
        except Exception as exc:  # the child must live even if the agent cannot
            from meshpatch.safety import internal_error

            internal_error("agent.after_fork", exc)


def reset_for_tests() -> None:
    """Drop the process agent (tests start several control planes in one process)."""
    global _agent, _disabled
    with _lock:
        if _agent is not None:
            _agent.stop()
        _agent = None
        _disabled = False
