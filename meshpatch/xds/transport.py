"""One SotW ADS stream to the xDS server, kept alive in a daemon thread.

The transport knows nothing about resources: it opens the stream, hands every
``DiscoveryResponse`` to the client, and reconnects with exponential backoff
and jitter (gRPC's connection backoff: 1 s, x1.6, jitter 0.2, cap 120 s).  A
stream that ends after delivering a response is a normal end (istio-agent
closes an older stream with status OK when a newer one registers) and is
re-opened at once.  The interface (``start``/``send``/``stop`` plus three
callbacks) is what a pod-local relay transport will implement later so that
several worker processes share one upstream stream.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import Any, Callable, List, Optional, Tuple

from meshpatch.bootstrap import XdsServer
from meshpatch.internal import suppress_current_context

log = logging.getLogger("meshpatch.xds")

CONNECTING = "CONNECTING"  # no attempt has finished yet
READY = "READY"  # the current stream has delivered a response
BACKOFF = "BACKOFF"  # the last attempt failed; waiting to retry
STOPPED = "STOPPED"

_CLOSE = object()
FORK_RESUME_DELAY = 0.05  # a pool forks its workers in a burst: reconnect once, after it
# Channels abandoned by a fork are kept referenced: letting the child garbage
# collect a channel created in the parent would call into gRPC's parent state.
_ABANDONED: List[Any] = []


class Backoff:
    def __init__(self, initial: float = 1.0, multiplier: float = 1.6, jitter: float = 0.2, maximum: float = 120.0) -> None:
        self.initial = initial
        self.multiplier = multiplier
        self.jitter = jitter
        self.maximum = maximum
        self._current = initial

    def reset(self) -> None:
        self._current = self.initial

    def next(self) -> float:
        delay = self._current * (1 + random.uniform(-self.jitter, self.jitter))
        self._current = min(self._current * self.multiplier, self.maximum)
        return delay


class GrpcAdsTransport:
    def __init__(
        self,
        server: XdsServer,
        on_stream_start: Callable[[], None],
        on_response: Callable[[Any], None],
        on_stream_end: Callable[[str, bool], None],
        backoff: Optional[Backoff] = None,
    ) -> None:
        self.server = server
        self._on_stream_start = on_stream_start
        self._on_response = on_response
        self._on_stream_end = on_stream_end
        self._backoff = backoff or Backoff()
        self._queue: Optional[queue.SimpleQueue] = None
        self._call: Any = None
        self._channel: Any = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.state = CONNECTING
        self.streams_opened = 0
        self.last_error = ""
        # Fork quiescing (see pause_for_fork): the stream thread parks outside gRPC.
        self._paused = False
        self._kept: Any = None  # (server, channel) kept open while paused for a fork
        self._parked = threading.Event()
        self._resumed = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="meshpatch-xds", daemon=True)
        self._thread.start()

    def send(self, request: Any) -> bool:
        """Queue a request on the current stream; False when no stream is open
        (the client re-sends its whole state when the next stream starts)."""
        q = self._queue
        if q is None:
            return False
        q.put(request)
        return True

    def stop(self) -> None:
        self._stop.set()
        self.state = STOPPED
        call = self._call
        if call is not None:
            try:
                call.cancel()
            except Exception:  # pragma: no cover - best effort on shutdown
                pass
        q = self._queue
        if q is not None:
            q.put(_CLOSE)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        kept, self._kept = self._kept, None
        if kept is not None:
            try:
                kept[1].close()
            except Exception:  # pragma: no cover
                pass

    def pause_for_fork(self, timeout: float = 1.0) -> bool:
        """Before a fork: end the stream and wait (bounded) until the stream thread
        is parked outside gRPC.  A thread polling inside gRPC at the instant of
        fork leaves the child's copy of gRPC's poller state half-owned, and the
        child's first channel can then abort ("Check failed: g_active_poller");
        an idle gRPC (no call, no channel) is what forks safely."""
        thread = self._thread
        if thread is None or not thread.is_alive() or thread is threading.current_thread():
            return False
        self._resumed.clear()
        self._paused = True
        call = self._call
        if call is not None:
            try:
                call.cancel()
            except Exception:  # pragma: no cover
                pass
        deadline = time.monotonic() + timeout
        if not self._parked.wait(timeout):
            return False
        # grpc's per-channel "spin" thread polls the completion queue until the
        # channel's last call is accounted for; wait for it to leave (private
        # attribute, so only where it exists).
        kept = self._kept
        state = getattr(kept[1], "_call_state", None) if kept is not None else None
        while state is not None and getattr(state, "managed_calls", 0) and time.monotonic() < deadline:
            time.sleep(0.001)
        return True

    def resume_after_fork(self) -> None:
        """In the parent after the fork: reconnect (once a burst of forks is over)."""
        self._paused = False
        self._resumed.set()

    def _park_if_paused(self) -> None:
        """On the stream thread, between streams: wait out a fork in progress."""
        while self._paused and not self._stop.is_set():
            self._parked.set()
            self._resumed.wait(0.1)
            if not self._paused:
                self._parked.clear()
                self._stop.wait(FORK_RESUME_DELAY)

    def abandon_after_fork(self) -> None:
        """In a forked child: never touch the parent's channel or thread again."""
        if self._kept is not None:
            _ABANDONED.append(self._kept)
            self._kept = None
        if self._channel is not None:
            _ABANDONED.append(self._channel)
        self._channel = None
        self._call = None
        self._queue = None
        self._stop.set()
        self.state = STOPPED

    # -- the stream thread -------------------------------------------------

    def _make_channel(self, grpc: Any, server: Optional[XdsServer] = None) -> Any:
        from meshpatch.xds.channel import make_channel

        return make_channel(grpc, server or self.server)

    def _run(self) -> None:
        suppress_current_context()
        import grpc

        while not self._stop.is_set():
            self._park_if_paused()
            had_response, error = self._stream_once(grpc, self.server)
            if self._stop.is_set():
                break
            if self._paused:
                continue  # ended for a fork: not news, reconnect right after it
            self._stream_ended(error, had_response)
            delay = random.uniform(0.0, 0.05) if had_response else self._backoff.next()
            self._stop.wait(delay)

    def _stream_ended(self, error: str, had_response: bool) -> None:
        self.last_error = error
        self.state = BACKOFF if not had_response else CONNECTING
        try:
            self._on_stream_end(error, had_response)
        except Exception:  # pragma: no cover - the client must not kill the loop
            log.warning("meshpatch xDS client failed handling a stream end", exc_info=True)

    def _stream_once(self, grpc: Any, server: XdsServer) -> Tuple[bool, str]:
        """One stream to ``server``: open, feed responses to the client until it
        ends; returns (whether it delivered a response, why it ended)."""
        from envoy.service.discovery.v3 import ads_pb2_grpc

        had_response = False
        error = ""
        q: queue.SimpleQueue = queue.SimpleQueue()
        try:
            kept, self._kept = self._kept, None
            if kept is not None and kept[0] is server:
                self._channel = kept[1]  # kept open across a fork: a new stream on the same connection
            else:
                if kept is not None:
                    kept[1].close()
                self._channel = self._make_channel(grpc, server)
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
            self._call = stub.StreamAggregatedResources(iter(q.get, _CLOSE))
            if self._stop.is_set() or self._paused:  # stop()/pause ran between our check and the call
                self._call.cancel()
            self._queue = q
            self.streams_opened += 1
            self._on_stream_start()
            for response in self._call:
                if not had_response:
                    had_response = True
                    self.state = READY
                    self._backoff.reset()
                self._on_response(response)
            error = "stream closed by the server with status OK"
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            error = f"{getattr(code, 'name', code)}: {exc.details() if hasattr(exc, 'details') else exc}"
        except Exception as exc:  # never let the thread die silently
            error = f"internal error: {exc!r}"
            log.warning("meshpatch xDS stream failed with an internal error", exc_info=True)
        finally:
            self._queue = None
            q.put(_CLOSE)
            self._call = None
            channel, self._channel = self._channel, None
            if channel is not None and self._paused and not self._stop.is_set():
                # Ended for a fork: closing now would start gRPC's asynchronous
                # teardown, whose threads could hold gRPC's locks at the instant
                # of the fork; an idle open channel is what forks safely.
                self._kept = (server, channel)
            elif channel is not None:
                try:
                    channel.close()
                except Exception:  # pragma: no cover
                    pass
        return had_response, error
