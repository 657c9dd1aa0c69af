"""A real ADS proxy in front of a control plane, for two jobs:

* **istio-agent's xDS proxy** (``single_stream=True``): like
  ``pkg/istio-agent/xds_proxy.go`` it serves one downstream stream at a time;
  when a new one registers it ends the previous one with status OK and no
  message ("registered overlapping stream; closing previous").  The local
  control plane accepts any number of streams, so this is how a test proves
  that a pod's processes keep to one.
* **istiod on 15012** (``tls=...``): a TLS listener whose streams record the
  call metadata, so a test can check the ``authorization: Bearer`` token.

Requests and responses are forwarded unchanged, one upstream stream per
downstream stream.
"""

from __future__ import annotations

import queue
import threading
from concurrent import futures
from typing import Any, Dict, Iterator, List, Optional

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from meshpatch.internal import suppressed
from tests.support.servers import TlsIdentity

_END = object()


class _Downstream:
    def __init__(self, number: int) -> None:
        self.number = number
        self.out: "queue.Queue[Any]" = queue.Queue()

    def close(self) -> None:
        self.out.put(_END)


class AdsProxy(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    def __init__(self, upstream: str, *, host: str = "127.0.0.1", single_stream: bool = False,
                 tls: Optional[TlsIdentity] = None) -> None:
        self.upstream = upstream
        self.single_stream = single_stream
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self._server)
        if tls is not None:
            credentials = grpc.ssl_server_credentials([(tls.key_pem, tls.cert_pem)])
            self.port = self._server.add_secure_port(f"{host}:0", credentials)
        else:
            self.port = self._server.add_insecure_port(f"{host}:0")
        self.address = f"{host}:{self.port}"
        self._lock = threading.Condition()
        self._current: Optional[_Downstream] = None
        self._open: "set[_Downstream]" = set()
        self._upstream_channel: Any = None
        # counters
        self.streams_opened = 0
        self.streams_active = 0
        self.closed_by_newer = 0  # streams ended with OK because another registered
        self.metadata: List[Dict[str, str]] = []

    def start(self) -> "AdsProxy":
        with suppressed():
            self._upstream_channel = grpc.insecure_channel(self.upstream)
        self._server.start()
        return self

    def stop(self) -> None:
        with self._lock:
            current = self._current
        if current is not None:
            current.close()
        self._server.stop(grace=None).wait(5)
        if self._upstream_channel is not None:
            self._upstream_channel.close()

    def __enter__(self) -> "AdsProxy":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def close_all(self) -> None:
        """End every open downstream stream with status OK (clients reconnect)."""
        with self._lock:
            streams = list(self._open)
        for stream in streams:
            stream.close()

    def wait_for(self, predicate: Any, timeout: float = 5.0) -> bool:
        with self._lock:
            return self._lock.wait_for(predicate, timeout)

    def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        with self._lock:
            self.streams_opened += 1
            self.streams_active += 1
            self.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
            downstream = _Downstream(self.streams_opened)
            self._open.add(downstream)
            previous, self._current = self._current, downstream
            if self.single_stream and previous is not None:
                self.closed_by_newer += 1
                previous.close()
            self._lock.notify_all()
        requests: "queue.Queue[Any]" = queue.Queue()
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._upstream_channel)
        call = stub.StreamAggregatedResources(iter(requests.get, _END))

        def pump_requests() -> None:
            try:
                for request in request_iterator:
                    requests.put(request)
            except Exception:
                pass
            finally:
                requests.put(_END)
                downstream.close()

        def pump_responses() -> None:
            try:
                for response in call:
                    downstream.out.put(response)
            except grpc.RpcError as exc:
                downstream.out.put(exc)
            finally:
                downstream.close()

        context.add_callback(downstream.close)
        threading.Thread(target=pump_requests, daemon=True).start()
        threading.Thread(target=pump_responses, daemon=True).start()
        try:
            while True:
                item = downstream.out.get()
                if item is _END:
                    return  # status OK, no message: what istio-agent does to an older stream
                if isinstance(item, grpc.RpcError):
                    context.abort(item.code(), item.details() or "upstream failed")
                yield item
        finally:
            call.cancel()
            requests.put(_END)
            with self._lock:
                self.streams_active -= 1
                self._open.discard(downstream)
                if self._current is downstream:
                    self._current = None
                self._lock.notify_all()
