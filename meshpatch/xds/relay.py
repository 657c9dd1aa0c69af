"""The leader's side of the pod relay: an ADS server on a Unix socket answering
the pod's other meshpatch processes from the leader's own xDS cache.

Each follower speaks plain SotW ADS to it, exactly as to istiod, and the
relay behaves like a control plane whose config is the leader's cache:

* a follower's subscription becomes a watch on the leader's :class:`XdsClient`,
  so a name nobody in the pod asked for before is subscribed upstream on demand
  (and unsubscribed when the last follower using it goes);
* it answers the first request of a type, a changed name set, and every change
  of a watched resource the stream was not sent yet (a repeat of the previous
  answer is never pushed); ACKs get no answer (as istiod does);
* it forwards accepted resources byte for byte (the last *good* version of
  each: a resource the leader NACKed stays at its previous version for
  followers too), so followers decode and validate them like the leader did;
* LDS and CDS answers are complete (absence means deletion), so it holds them
  back while any requested name is still unanswered upstream; RDS and EDS
  answers may carry whatever is known.

Everything touching subscriptions runs under the client's lock, the same lock
the leader's own watchers run under; per-stream state is owned by that
stream's worker thread.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from concurrent import futures
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from meshpatch.internal import suppress_current_context
from meshpatch.xds.server_stream import pump_requests
from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS, SHORT_NAMES

log = logging.getLogger("meshpatch.xds")

TYPE_ORDER = (CDS, EDS, LDS, RDS)  # clusters before the routes that use them
COMPLETE_TYPES = (LDS, CDS)
_END = object()
_ABANDONED: List[Any] = []  # servers inherited across fork: never touched, never collected


class _Watch:
    """One (type, name) the relay watches on the leader's client, shared by streams."""

    __slots__ = ("type_url", "name", "streams")

    def __init__(self, type_url: str, name: str) -> None:
        self.type_url = type_url
        self.name = name
        self.streams: Set["_Stream"] = set()

    def _changed(self) -> None:
        for stream in list(self.streams):
            if not stream.subscribing:
                stream.events.put(self.type_url)

    def on_resource(self, type_url: str, name: str, value: Any) -> None:
        self._changed()

    def on_does_not_exist(self, type_url: str, name: str) -> None:
        self._changed()

    def on_error(self, type_url: str, name: str, reason: str) -> None:
        self._changed()


class _Stream:
    def __init__(self, stream_id: int) -> None:
        self.id = stream_id
        self.events: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.names: Dict[str, Set[str]] = {t: set() for t in TYPE_ORDER}
        self.seen_type: Set[str] = set()
        self.owed: Set[str] = set()  # types with a request or change not yet answered
        self.asked: Set[str] = set()  # of those, the types a request waits on (answered even if unchanged)
        self.sent: Dict[str, Tuple[str, Tuple[Tuple[str, bytes], ...]]] = {}  # type -> last answer's content
        self.nonce: Dict[str, str] = {}
        # True while this stream's own subscription change runs (under the client
        # lock): a cached value delivered by watch() then is already owed an answer.
        self.subscribing = False


class RelayServer:
    """ADS on ``unix:<socket_path>`` serving from ``client`` (an XdsClient)."""

    def __init__(self, client: Any, socket_path: str, max_workers: int = 256) -> None:
        self.client = client
        self.socket_path = socket_path
        self._max_workers = max_workers
        self._server: Any = None
        self._watches: Dict[Tuple[str, str], _Watch] = {}
        self._streams: Set[_Stream] = set()
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._lock = threading.Lock()
        # counters (tests, status)
        self.streams_opened = 0
        self.responses_sent = 0
        self.nacks = 0

    @property
    def streams_active(self) -> int:
        with self._lock:
            return len(self._streams)

    def start(self) -> None:
        import grpc
        from envoy.service.discovery.v3 import ads_pb2_grpc

        relay = self

        class Servicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
            def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Iterator[Any]:
                return relay._serve(request_iterator, context)

        try:
            os.unlink(self.socket_path)  # a dead leader's socket; we hold the lock, it is ours to replace
        except FileNotFoundError:
            pass
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self._max_workers, thread_name_prefix="meshpatch-relay",
                                       initializer=suppress_current_context),
            options=[("grpc.so_reuseport", 0)],
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Servicer(), server)
        if not server.add_insecure_port("unix:" + self.socket_path):
            raise OSError(f"cannot listen on unix:{self.socket_path}")
        server.start()
        self._server = server

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(0).wait(5)
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.events.put(_END)

    def abandon_after_fork(self) -> None:
        if self._server is not None:
            _ABANDONED.append(self._server)
        self._server = None
        self._streams = set()
        self._watches = {}
        self._lock = threading.Lock()

    # -- one follower stream ---------------------------------------------------

    def _serve(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        stream = _Stream(next(self._ids))
        with self._lock:
            self._streams.add(stream)
            self.streams_opened += 1
        pump_requests(request_iterator, context, stream.events, _END, f"meshpatch-relay-reader-{stream.id}")
        try:
            while True:
                event = stream.events.get()
                if event is _END:
                    return
                if isinstance(event, str):
                    stream.owed.add(event)
                else:
                    self._on_request(stream, event)
                for type_url in TYPE_ORDER:
                    if type_url in stream.owed:
                        response = self._respond(stream, type_url)
                        if response is not None:
                            yield response
        finally:
            with self._lock:
                self._streams.discard(stream)
            self._unsubscribe_all(stream)

    def _on_request(self, stream: _Stream, request: Any) -> None:
        type_url = request.type_url
        if type_url not in stream.names:
            return
        if request.HasField("error_detail"):
            # The follower rejected what the leader accepted: a version skew
            # between processes.  Its last good config stays in force there.
            self.nacks += 1
            log.warning("meshpatch relay: a worker process rejected %s: %s",
                        SHORT_NAMES.get(type_url, type_url), request.error_detail.message)
            return
        names = set(request.resource_names)
        first = type_url not in stream.seen_type or not request.response_nonce
        stream.seen_type.add(type_url)
        old = stream.names[type_url]
        if names != old:
            self._resubscribe(stream, type_url, old, names)
            stream.names[type_url] = names
            stream.owed.add(type_url)
            stream.asked.add(type_url)
        elif first:
            stream.owed.add(type_url)
            stream.asked.add(type_url)

    def _resubscribe(self, stream: _Stream, type_url: str, old: Set[str], new: Set[str]) -> None:
        client = self.client
        with client.lock:
            stream.subscribing = True
            try:
                self._watch_names(stream, type_url, old, new)
            finally:
                stream.subscribing = False

    def _watch_names(self, stream: _Stream, type_url: str, old: Set[str], new: Set[str]) -> None:
        client = self.client
        for name in new - old:
            watch = self._watches.get((type_url, name))
            if watch is None:
                watch = self._watches[(type_url, name)] = _Watch(type_url, name)
                watch.streams.add(stream)
                client.watch(type_url, name, watch)
            else:
                watch.streams.add(stream)
        for name in old - new:
            self._drop(stream, type_url, name)

    def _drop(self, stream: _Stream, type_url: str, name: str) -> None:
        watch = self._watches.get((type_url, name))
        if watch is None:
            return
        watch.streams.discard(stream)
        if not watch.streams:
            del self._watches[(type_url, name)]
            self.client.cancel_watch(type_url, name, watch)

    def _unsubscribe_all(self, stream: _Stream) -> None:
        try:
            with self.client.lock:
                for type_url, names in stream.names.items():
                    for name in names:
                        self._drop(stream, type_url, name)
        except Exception:  # pragma: no cover - never let cleanup kill the server thread
            log.warning("meshpatch relay: cleanup of a worker's subscriptions failed", exc_info=True)

    def _respond(self, stream: _Stream, type_url: str) -> Optional[Any]:
        from envoy.service.discovery.v3 import discovery_pb2

        names = stream.names[type_url]
        if not names:
            stream.owed.discard(type_url)
            stream.asked.discard(type_url)
            return None
        with self.client.lock:
            resources, pending, version = self.client.cached(type_url, sorted(names))
        if type_url in COMPLETE_TYPES and pending:
            return None  # an incomplete LDS/CDS answer would delete what is merely unknown yet
        if not resources and type_url not in COMPLETE_TYPES:
            return None
        stream.owed.discard(type_url)
        # A change event can arrive after an answer that already carried the
        # change (it was queued while that answer was being made, or one upstream
        # response changed several watched names).  Sending the same answer again
        # is not harmless: the follower takes the next response of a type for the
        # answer to its latest request of it, so a stale LDS/CDS repeat crossing a
        # subscription change reads as "the newly asked names do not exist".
        content = (version, tuple((r.type_url, r.value) for r in resources))
        if type_url not in stream.asked and stream.sent.get(type_url) == content:
            return None
        stream.asked.discard(type_url)
        stream.sent[type_url] = content
        nonce = f"relay-{next(self._nonces)}"
        stream.nonce[type_url] = nonce
        self.responses_sent += 1
        return discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version, nonce=nonce,
                                               resources=resources)
