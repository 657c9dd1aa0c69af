"""The transport a pod's meshpatch processes use to share one upstream stream.

Same interface as :class:`GrpcAdsTransport` (start / send / stop and the three
client callbacks), so the :class:`XdsClient` above it cannot tell the roles
apart.  Before each stream it decides what this process is:

* **leader** — it holds the pod lock (:mod:`meshpatch.xds.pod`): it serves the
  relay socket (:mod:`meshpatch.xds.relay`) from its own cache and keeps the
  one upstream stream, with the usual backoff;
* **follower** — someone else holds the lock: it streams from the relay socket.
  When that stream ends (the leader died or left) it tries the lock at once, so
  one follower takes over within milliseconds, from its own cached config,
  while the others reconnect to the new leader.  Its cache is untouched in
  between, so routing never stops.
* **direct** — sharing is off or unusable here (no private runtime dir, socket
  cannot be bound), or a leader holds the lock but its relay has not answered
  for ``FOLLOWER_PATIENCE`` seconds (a hung leader): the process keeps its own
  upstream stream, as it would without sharing.
"""

from __future__ import annotations

import logging
import os
import random
import time
from typing import Any, Callable, List, Optional, Tuple

from meshpatch.bootstrap import XdsServer
from meshpatch.internal import suppress_current_context
from meshpatch.xds.pod import PodLock, PodUnavailable
from meshpatch.xds.transport import CONNECTING, Backoff, GrpcAdsTransport

log = logging.getLogger("meshpatch.xds")

LEADER = "leader"
FOLLOWER = "follower"
DIRECT = "direct"

FOLLOWER_PATIENCE = 10.0  # seconds without a relay answer before a follower goes direct
FOLLOWER_RETRY = (0.01, 0.1)  # a follower's reconnect delay: a leader is (being) elected


class SharedTransport(GrpcAdsTransport):
    def __init__(
        self,
        server: XdsServer,
        on_stream_start: Callable[[], None],
        on_response: Callable[[Any], None],
        on_stream_end: Callable[[str, bool], None],
        pod: Optional[PodLock],
        backoff: Optional[Backoff] = None,
        follower_patience: Optional[float] = None,
    ) -> None:
        super().__init__(server, on_stream_start, on_response, on_stream_end, backoff)
        self.pod = pod
        self.role = DIRECT if pod is None else FOLLOWER
        self.relay: Any = None
        self.client: Any = None
        self.upstream_streams = 0
        self.relay_streams = 0
        self.took_over_at: Optional[float] = None
        self._patience = FOLLOWER_PATIENCE if follower_patience is None else follower_patience
        self._orphans: List[Tuple[str, str, Any]] = []
        self._stopped_relay: Any = None  # stopped for a fork; its watches may still be registered

    def bind_client(self, client: Any) -> None:
        self.client = client

    # -- interface --------------------------------------------------------------

    def stop(self) -> None:
        super().stop()
        self._resign()

    def pause_for_fork(self, timeout: float = 1.0) -> bool:
        """Also stop serving the relay (its gRPC server polls too); followers
        keep their caches and reconnect when the parent serves again."""
        parked = super().pause_for_fork(timeout)
        relay, self.relay = self.relay, None
        if relay is not None:
            self._stopped_relay = relay
            try:
                relay.stop()
            except Exception:  # pragma: no cover - the fork must go on
                log.warning("meshpatch: stopping the pod relay before fork failed", exc_info=True)
        return parked

    def abandon_after_fork(self) -> None:
        super().abandon_after_fork()
        for relay in (self.relay, self._stopped_relay):
            if relay is not None:
                self._orphans += [(w.type_url, w.name, w) for w in list(relay._watches.values())]
                relay.abandon_after_fork()
        self.relay = self._stopped_relay = None
        if self.pod is not None:
            self.pod.abandon_after_fork()

    def orphaned_watches(self) -> List[Tuple[str, str, Any]]:
        """The relay's watches on the client, left behind in a forked child."""
        orphans, self._orphans = self._orphans, []
        return orphans

    # -- roles ------------------------------------------------------------------

    def _lead(self) -> bool:
        """Try to become (or stay) the leader; start the relay when we do."""
        pod = self.pod
        if pod is None:
            return False
        try:
            if not pod.try_acquire():
                return False
        except (PodUnavailable, OSError) as exc:
            self._go_direct(f"pod runtime dir unusable: {exc}")
            return False
        if self.relay is None:
            from meshpatch.xds.relay import RelayServer

            relay = RelayServer(self.client, pod.socket_path)
            try:
                relay.start()
            except Exception as exc:
                pod.release()
                self._go_direct(f"cannot serve the pod relay on {pod.socket_path}: {exc}")
                return False
            self.relay = relay
            self._stopped_relay = None
            if self.role == FOLLOWER and self.relay_streams:
                self.took_over_at = time.monotonic()
                log.info("meshpatch: took over the pod's xDS stream (pid %d) from the last-known config", os.getpid())
            elif self.role != LEADER:
                log.info("meshpatch: this process (pid %d) holds the pod's xDS stream; workers share it via %s",
                         os.getpid(), pod.socket_path)
            self._backoff.reset()
        self.role = LEADER
        return True

    def _go_direct(self, why: str) -> None:
        if self.role != DIRECT:
            log.warning("meshpatch: %s; this process keeps its own xDS stream", why)
        self.role = DIRECT
        self.pod = None

    def _resign(self) -> None:
        relay, self.relay = self.relay, None
        if relay is not None:
            try:
                relay.stop()
            except Exception:  # pragma: no cover - best effort on shutdown
                pass
        if self.pod is not None:
            self.pod.release()

    # -- the stream thread ----------------------------------------------------------

    def _run(self) -> None:
        suppress_current_context()
        import grpc

        relay_server = None
        waiting_since: Optional[float] = None
        while not self._stop.is_set():
            self._park_if_paused()
            quiet = False  # a follower that found no leader yet: an election, not an outage
            if self.pod is not None and self._lead():
                had_response, error = self._stream_once(grpc, self.server)
                self.upstream_streams += 1
                delay = random.uniform(0.0, 0.05) if had_response else self._backoff.next()
            elif self.pod is not None:
                self.role = FOLLOWER
                now = time.monotonic()
                waiting_since = waiting_since or now
                if now - waiting_since > self._patience:
                    log.warning("meshpatch: the pod's xDS leader (pid %s) has not answered for %.0f s; "
                                "using a stream of this process's own until it does",
                                self.pod.holder_pid(), now - waiting_since)
                    had_response, error = self._stream_once(grpc, self.server)
                    self.upstream_streams += 1
                    waiting_since = None
                    delay = 0.0 if had_response else self._backoff.next()
                else:
                    if relay_server is None:
                        relay_server = XdsServer("unix:" + self.pod.socket_path, "insecure", {}, [])
                    had_response, error = self._stream_once(grpc, relay_server)
                    self.relay_streams += 1
                    if had_response:
                        waiting_since = None
                    quiet = not had_response
                    delay = 0.0 if had_response else random.uniform(*FOLLOWER_RETRY)
            else:
                self.role = DIRECT
                had_response, error = self._stream_once(grpc, self.server)
                self.upstream_streams += 1
                delay = random.uniform(0.0, 0.05) if had_response else self._backoff.next()
            if self._stop.is_set():
                break
            if self._paused:
                continue  # ended for a fork: reconnect right after it
            if quiet:
                self.last_error = error
                self.state = CONNECTING
            else:
                self._stream_ended(error, had_response)
            self._stop.wait(delay)
