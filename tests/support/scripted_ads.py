"""A real ADS gRPC server whose responses a test scripts by hand.

Protocol-level client tests need to send exact (also malformed) responses and
read back every request the client sent (ACK/NACK, nonces, node).  This is a
real gRPC server on loopback speaking the envoy v3 ADS service; only the
decisions are the test's.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures
from typing import Any, Callable, List, Optional, Tuple

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

_END = object()


class _Stream:
    def __init__(self) -> None:
        self.outbox: "queue.Queue[Any]" = queue.Queue()
        self.requests: List[discovery_pb2.DiscoveryRequest] = []
        self.closed = threading.Event()


class ScriptedAds(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, host: str = "127.0.0.1") -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{host}:0")
        self.address = f"{host}:{self.port}"
        self.streams: List[_Stream] = []
        self._cond = threading.Condition()
        self._nonce = 0
        self.on_request: Optional[Callable[["ScriptedAds", _Stream, discovery_pb2.DiscoveryRequest], None]] = None

    def start(self) -> "ScriptedAds":
        self._server.start()
        return self

    def stop(self) -> None:
        for stream in self.streams:
            stream.outbox.put(_END)
        self._server.stop(grace=None)

    # servicer
    def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Any:
        stream = _Stream()
        with self._cond:
            self.streams.append(stream)
            self._cond.notify_all()

        def reader() -> None:
            try:
                for request in request_iterator:
                    with self._cond:
                        stream.requests.append(request)
                        self._cond.notify_all()
                    if self.on_request is not None:
                        self.on_request(self, stream, request)
            except Exception:
                pass
            finally:
                stream.closed.set()
                stream.outbox.put(_END)
                with self._cond:
                    self._cond.notify_all()

        threading.Thread(target=reader, daemon=True).start()
        while True:
            item = stream.outbox.get()
            if item is _END:
                return
            if isinstance(item, grpc.StatusCode):
                context.abort(item, "scripted abort")
            yield item

    # scripting helpers
    def respond(self, type_url: str, resources: List[Any], version: str, stream: Optional[_Stream] = None,
                raw: bool = False) -> str:
        self._nonce += 1
        nonce = f"n{self._nonce}"
        response = discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=version, nonce=nonce)
        for resource in resources:
            if raw:
                response.resources.append(resource)
            else:
                packed = any_pb2.Any()
                packed.Pack(resource)
                response.resources.append(packed)
        (stream or self.streams[-1]).outbox.put(response)
        return nonce

    def serve(self, db: dict, version: str = "v1") -> None:
        """Answer like a SotW control plane from ``db`` (type_url → name → resource):
        every initial request and every change of the subscribed names gets the
        requested resources that exist; ACKs and NACKs get nothing."""
        answered: dict = {}

        def on_request(server: "ScriptedAds", stream: _Stream, request: discovery_pb2.DiscoveryRequest) -> None:
            if request.HasField("error_detail"):
                return
            names = frozenset(request.resource_names)
            key = (id(stream), request.type_url)
            if request.response_nonce and answered.get(key) == names:
                return
            answered[key] = names
            known = db.get(request.type_url, {})
            server.respond(request.type_url, [known[n] for n in sorted(names) if n in known], version, stream=stream)

        self.on_request = on_request

    def end_stream(self, stream: Optional[_Stream] = None) -> None:
        (stream or self.streams[-1]).outbox.put(_END)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("condition not reached")
                self._cond.wait(remaining)

    def wait_request(self, type_url: str, predicate: Callable[[discovery_pb2.DiscoveryRequest], bool] = lambda r: True,
                     timeout: float = 5.0, stream_index: int = -1, after: int = 0) -> discovery_pb2.DiscoveryRequest:
        found: List[Any] = []

        def check() -> bool:
            if not self.streams:
                return False
            stream = self.streams[stream_index]
            for request in stream.requests[after:]:
                if request.type_url == type_url and predicate(request):
                    found.append(request)
                    return True
            return False

        self.wait_for(check, timeout)
        return found[0]


class RecordingWatcher:
    """An xDS client watcher that only records what it was told, as
    ``(event, resource name)`` with event ``resource`` / ``missing`` / ``error``."""

    def __init__(self) -> None:
        self.events: List[Tuple[str, str]] = []

    def on_resource(self, type_url: str, name: str, value: Any) -> None:
        self.events.append(("resource", name))

    def on_does_not_exist(self, type_url: str, name: str) -> None:
        self.events.append(("missing", name))

    def on_error(self, type_url: str, name: str, reason: str) -> None:
        self.events.append(("error", name))
