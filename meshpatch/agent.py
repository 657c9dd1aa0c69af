"""The process-wide agent: settings + bootstrap + xDS client + registries + router, made lazily.

Nothing here runs at interpreter start.  The agent is built on the first
routed call (or prefetch), and its xDS stream thread starts then, in the
process that actually makes calls: a gunicorn ``--preload`` master that never
calls out never opens a gRPC channel.  After a fork the child abandons the
parent's channel and thread (never reused across fork), keeps the cached
config so it can route at once, and reconnects on its next call.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Optional

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

            self.client = XdsClient(bootstrap)  # type: ignore[arg-type]
        else:
            self.client = None
        self.router = Router(self.client, settings.resolve_timeout, self._ensure_started, registry)
        self._started = False
        self._start_lock = threading.Lock()
        self.pid = os.getpid()

    def _ensure_started(self) -> None:
        if self._started:
            return
        with self._start_lock:
            if not self._started:
                if self.client is not None:
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

    def after_fork_in_child(self) -> None:
        # Locks may have been held by threads that do not exist in the child.
        self.router._create_lock = threading.Lock()
        self.router._registry_lock = threading.RLock()
        self._start_lock = threading.Lock()
        if self.client is not None:
            self.client.after_fork_in_child()
        if self.registry is not None and self._started:
            self.registry.after_fork_in_child()  # type: ignore[attr-defined]
        self._started = False
        self.pid = os.getpid()
        # Reconnect now: the child is about to serve requests and needs pushes.
        self._ensure_started()


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
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
        return _agent


def _after_fork_in_child() -> None:
    global _lock
    _lock = threading.Lock()
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
