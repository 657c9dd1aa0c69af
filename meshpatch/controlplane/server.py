"""The ADS gRPC service, config reload and push fan-out.

One sync gRPC server with a thread pool: each SotW stream occupies one worker
for its lifetime (the response generator) plus one small reader thread that
turns client requests into queue events.  Config pushes go into the same
queue, so every stream's state is only ever touched by its own worker thread.
Counters and waits exist for tests: they let a test wait for "config N is
loaded and pushed to every stream" instead of sleeping.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from concurrent import futures
from datetime import datetime, timezone
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import grpc

from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from . import config_source
from .config_source import ConfigPathError
from .istio_config import ConfigLoadError, IstioConfig, parse_yaml_text
from .snapshot import Snapshot
from .stream import ConfigState, ResourceHook, SotwStream, StreamEvents

log = logging.getLogger("meshpatch.controlplane")

_END = object()
_PUSH = object()


def _version(generation: int) -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ") + f"/{generation}"


class _Servicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """SotW ADS.  DeltaAggregatedResources is inherited: UNIMPLEMENTED."""

    def __init__(self, server: "ControlPlaneServer") -> None:
        self._server = server

    def StreamAggregatedResources(self, request_iterator, context) -> Iterator[discovery_pb2.DiscoveryResponse]:
        srv = self._server
        events: "queue.Queue[object]" = queue.Queue()
        stream = srv._open_stream(events, context.peer())
        context.add_callback(lambda: events.put(_END))

        def read() -> None:
            try:
                for req in request_iterator:
                    events.put(req)
            except Exception as exc:  # cancelled / connection reset: the stream is over
                log.debug("meshpatch control plane: stream %d reader ended: %r", stream.id, exc)
            finally:
                events.put(_END)

        reader = threading.Thread(target=read, name=f"meshpatch-ads-reader-{stream.id}", daemon=True)
        reader.start()
        try:
            while True:
                ev = events.get()
                if ev is _END:
                    return
                if ev is _PUSH:
                    state = srv.state()
                    try:
                        responses = stream.handle_push(state)
                    except Exception:
                        log.exception("meshpatch control plane: stream %d: failed to build the push", stream.id)
                        responses = []
                    for r in responses:
                        yield r
                    # Only now: the responses have been handed to gRPC for sending.
                    srv._pushed(stream, state.generation)
                    continue
                try:
                    responses = stream.handle_request(ev)  # type: ignore[arg-type]
                except Exception:
                    log.exception("meshpatch control plane: stream %d: failed to handle request", stream.id)
                    responses = []
                for r in responses:
                    yield r
        finally:
            srv._close_stream(stream)


class _Counters(StreamEvents):
    def __init__(self, server: "ControlPlaneServer") -> None:
        self._s = server

    def on_ack(self, stream: SotwStream, type_url: str, version: str) -> None:
        with self._s._cond:
            self._s.acks += 1
            self._s._cond.notify_all()

    def on_nack(self, stream: SotwStream, type_url: str, version: str, error: str) -> None:
        log.warning(
            "meshpatch control plane: NACK from %s for %s (still at version %r): %s",
            stream.node_id or f"stream {stream.id}", type_url.rsplit("/", 1)[-1], version, error,
        )
        with self._s._cond:
            self._s.nacks += 1
            self._s.last_nack_error = error
            self._s.nack_errors.append((type_url, error))
            del self._s.nack_errors[:-100]  # keep the latest 100
            self._s._cond.notify_all()

    def on_stale(self, stream: SotwStream, type_url: str) -> None:
        with self._s._cond:
            self._s.stale_nonces += 1
            self._s._cond.notify_all()

    def on_response(self, stream: SotwStream, type_url: str, count: int) -> None:
        with self._s._cond:
            self._s.responses_sent += 1
            self._s._cond.notify_all()


class ControlPlaneServer:
    """An istiod stand-in for proxyless gRPC clients, fed from Istio YAML.

    ``config_path`` is a YAML file or a directory of them (polled every
    ``poll_interval`` seconds); ``None`` starts empty, then use
    :meth:`set_yaml` / :meth:`set_config`.  ``listen`` is ``host:port``
    (port 0 = pick a free one) or ``unix:///path``.  ``resource_hook`` may
    amend each generated resource before it is sent (see :data:`ResourceHook`).
    """

    def __init__(
        self,
        config_path: Optional[str] = None,
        listen: str = "127.0.0.1:0",
        poll_interval: float = 0.2,
        max_workers: int = 64,
        resource_hook: Optional[ResourceHook] = None,
    ) -> None:
        self.config_path = os.fspath(config_path) if config_path is not None else None
        self.resource_hook = resource_hook
        self.listen = listen
        self.poll_interval = poll_interval
        self.max_workers = max_workers
        self.address = ""
        self.port: Optional[int] = None

        self._cond = threading.Condition()
        self._reload_lock = threading.Lock()
        self._state = ConfigState(Snapshot(IstioConfig()), _version(0), 0)
        self._streams: Dict[int, Tuple[SotwStream, "queue.Queue[object]"]] = {}
        self._next_stream_id = 0
        self._grpc_server: Optional[grpc.Server] = None
        self._stop = threading.Event()
        self._poller: Optional[threading.Thread] = None
        self._signature: Optional[config_source.Signature] = None
        self._failed_signature: Optional[object] = None
        self._events = _Counters(self)

        # Counters (read them directly; they only grow).
        self.streams_opened = 0
        self.streams_closed = 0
        self.acks = 0
        self.nacks = 0
        self.last_nack_error = ""
        self.nack_errors: List[Tuple[str, str]] = []
        self.stale_nonces = 0
        self.responses_sent = 0
        self.reload_attempts = 0
        self.reload_failures = 0
        self.last_reload_error = ""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "ControlPlaneServer":
        if self.config_path is not None:
            config_source.config_files(self.config_path)  # raises ConfigPathError early
            self.reload()
            if self.generation == 0:  # first load failed (e.g. YAML syntax): serve an empty config
                self._apply(IstioConfig(), "empty config (initial load failed)")
        else:
            self._apply(IstioConfig(), "empty config")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="meshpatch-ads"),
            options=[("grpc.so_reuseport", 0)],
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Servicer(self), server)
        try:
            bound = server.add_insecure_port(self.listen)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.listen}: {exc}") from None
        if not bound:
            raise OSError(f"cannot listen on {self.listen}")
        if self.listen.startswith("unix:"):
            self.address = self.listen
        else:
            host = self.listen.rsplit(":", 1)[0]
            self.port = bound
            self.address = f"{host}:{bound}"
        server.start()
        self._grpc_server = server
        if self.config_path is not None:
            self._poller = threading.Thread(target=self._poll_loop, name="meshpatch-cp-poll", daemon=True)
            self._poller.start()
        return self

    def stop(self, grace: Optional[float] = 0.5) -> None:
        self._stop.set()
        if self._grpc_server is not None:
            self._grpc_server.stop(grace).wait(timeout=(grace or 0) + 5)
            self._grpc_server = None
        with self._cond:
            for _, q in list(self._streams.values()):
                q.put(_END)
        if self._poller is not None:
            self._poller.join(timeout=5)
            self._poller = None

    def __enter__(self) -> "ControlPlaneServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ config

    def state(self) -> ConfigState:
        return self._state

    @property
    def generation(self) -> int:
        return self._state.generation

    @property
    def version(self) -> str:
        return self._state.version

    @property
    def snapshot(self) -> Snapshot:
        return self._state.snapshot

    def set_config(self, config: IstioConfig) -> int:
        """Serve ``config`` now and push it to every stream; returns its generation."""
        return self._apply(config, "set_config")

    def set_yaml(self, text: str) -> int:
        """Parse and serve Istio YAML (raises ConfigLoadError on a YAML syntax error)."""
        return self._apply(parse_yaml_text(text, "<set_yaml>"), "set_yaml")

    def reload(self) -> bool:
        """Re-read the config path if it changed; True when a new config was applied."""
        if self.config_path is None:
            return False
        with self._reload_lock:
            try:
                sig: object = config_source.signature(self.config_path)
            except ConfigPathError as exc:
                sig = ("error", str(exc))
            if sig == self._signature or sig == self._failed_signature:
                return False
            with self._cond:
                self.reload_attempts += 1
            try:
                if isinstance(sig, tuple) and sig[:1] == ("error",):
                    raise ConfigPathError(sig[1])
                config = config_source.load(self.config_path)
            except (ConfigLoadError, ConfigPathError) as exc:
                self._failed_signature = sig
                log.error("meshpatch control plane: reload failed, keeping the last good config (version %s): %s",
                          self.version, exc)
                with self._cond:
                    self.reload_failures += 1
                    self.last_reload_error = str(exc)
                    self._cond.notify_all()
                return False
            self._signature = sig  # type: ignore[assignment]
            self._failed_signature = None
            self._apply(config, self.config_path)
            return True

    def _apply(self, config: IstioConfig, source: str) -> int:
        snap = Snapshot(config)
        with self._cond:
            gen = self._state.generation + 1
            self._state = ConfigState(snap, _version(gen), gen)
            for _, q in self._streams.values():
                q.put(_PUSH)
            self._cond.notify_all()
        log.info(
            "meshpatch control plane: loaded %s: %d services, %d destination rules, %d virtual services, "
            "%d workload entries, %d skipped (version %s)",
            source, len(snap.services), len(config.destination_rules), len(config.virtual_services),
            len(config.workload_entries), len(config.skipped), self._state.version,
        )
        return gen

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval):
            try:
                self.reload()
            except Exception:  # never let the poller die
                log.exception("meshpatch control plane: unexpected error while reloading")

    # ------------------------------------------------------------------ streams

    def _open_stream(self, q: "queue.Queue[object]", peer: str) -> SotwStream:
        with self._cond:
            self._next_stream_id += 1
            stream = SotwStream(self._next_stream_id, self.state, self._events, peer, self.resource_hook)
            stream.pushed_generation = self._state.generation
            self._streams[stream.id] = (stream, q)
            self.streams_opened += 1
            self._cond.notify_all()
        log.info("meshpatch control plane: stream %d opened from %s", stream.id, peer)
        return stream

    def _close_stream(self, stream: SotwStream) -> None:
        with self._cond:
            if self._streams.pop(stream.id, None) is not None:
                self.streams_closed += 1
            self._cond.notify_all()
        log.info("meshpatch control plane: stream %d (%s) closed", stream.id, stream.node_id or "no node")

    def _pushed(self, stream: SotwStream, generation: int) -> None:
        with self._cond:
            stream.pushed_generation = max(stream.pushed_generation, generation)
            self._cond.notify_all()

    @property
    def streams_active(self) -> int:
        with self._cond:
            return len(self._streams)

    def streams(self) -> List[Dict[str, object]]:
        """A snapshot of every open stream: node, subscriptions, versions."""
        with self._cond:
            return [s.describe() for s, _ in self._streams.values()]

    def stats(self) -> Dict[str, object]:
        with self._cond:
            return {
                "generation": self._state.generation,
                "version": self._state.version,
                "streams_opened": self.streams_opened,
                "streams_closed": self.streams_closed,
                "streams_active": len(self._streams),
                "acks": self.acks,
                "nacks": self.nacks,
                "last_nack_error": self.last_nack_error,
                "stale_nonces": self.stale_nonces,
                "responses_sent": self.responses_sent,
                "reload_attempts": self.reload_attempts,
                "reload_failures": self.reload_failures,
                "last_reload_error": self.last_reload_error,
            }

    # ------------------------------------------------------------------ waits

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Block until ``predicate()`` (evaluated under the server lock) is true."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def wait_for_generation(self, generation: int, timeout: float = 5.0) -> bool:
        return self.wait_for(lambda: self._state.generation >= generation, timeout)

    def wait_pushed(self, generation: Optional[int] = None, timeout: float = 5.0) -> bool:
        """Wait until every open stream has processed the push of ``generation``."""
        gen = self.generation if generation is None else generation
        return self.wait_for(
            lambda: self._state.generation >= gen and all(s.pushed_generation >= gen for s, _ in self._streams.values()),
            timeout,
        )
