"""The process-wide agent: settings + bootstrap + xDS client + router, made lazily.

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
    def __init__(self, settings: Settings, bootstrap: "object") -> None:
        from meshpatch.routing.router import Router
        from meshpatch.xds.client import XdsClient

        self.settings = settings
        self.bootstrap = bootstrap
        self.client = XdsClient(bootstrap)  # type: ignore[arg-type]
        self.router = Router(self.client, settings.resolve_timeout, self._ensure_started)
        self._started = False
        self._start_lock = threading.Lock()
        self.pid = os.getpid()

    def _ensure_started(self) -> None:
        if self._started:
            return
        with self._start_lock:
            if not self._started:
                self.client.start()
                self._started = True
                log.info("meshpatch agent started: xDS server %s (%s)",
                         self.bootstrap.servers[0].target, self.bootstrap.source)  # type: ignore[attr-defined]

    def prefetch(self, host: str, port: Optional[int], scheme: str = "http") -> None:
        self.router.prefetch(host, port, scheme)

    def stop(self) -> None:
        if self._started:
            self.client.stop()
            self._started = False

    def after_fork_in_child(self) -> None:
        # Locks may have been held by threads that do not exist in the child.
        self.router._create_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self.client.after_fork_in_child()
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
        except ConfigError as exc:
            log.warning("%s", exc)
            _disabled = True
            return None
        if bootstrap is None:
            log.warning(
                "meshpatch: no xDS configuration (set MESHPATCH_XDS_SERVER=host:port, or GRPC_XDS_BOOTSTRAP to the "
                "bootstrap file istio-agent writes); calls are not routed"
            )
            _disabled = True
            return None
        _agent = Agent(settings, bootstrap)
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
