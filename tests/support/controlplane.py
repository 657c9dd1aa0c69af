"""Test helpers around meshpatch's local control plane.

* :class:`ControlPlane` / :func:`control_plane`: an in-process control plane on
  127.0.0.1 (free port) serving a YAML string kept in a temp dir; ``write()``
  replaces the YAML and returns only once the new config is loaded and pushed
  to every open stream, so tests never sleep-and-hope.
* :func:`bootstrap_config` / :func:`write_bootstrap`: a gRPC xDS bootstrap like
  the one istio-agent writes, pointing at a control plane.
* :class:`AdsClient`: a raw SotW ADS client (DiscoveryRequest in, DiscoveryResponse
  out) for checking the wire behaviour: ACK/NACK, nonces, subscriptions.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import tempfile
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import grpc
from google.protobuf import json_format, struct_pb2
from google.protobuf.message import Message

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from meshpatch.controlplane.server import ControlPlaneServer
from meshpatch.internal import suppressed

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
_MESSAGES = {
    LDS: listener_pb2.Listener,
    RDS: route_pb2.RouteConfiguration,
    CDS: cluster_pb2.Cluster,
    EDS: endpoint_pb2.ClusterLoadAssignment,
}

DEFAULT_NAMESPACE = "default"
DEFAULT_NODE_ID = "sidecar~127.0.0.1~client.default~default.svc.cluster.local"


def node_id_for(namespace: str, pod: str = "client", ip: str = "127.0.0.1") -> str:
    return f"sidecar~{ip}~{pod}.{namespace}~{namespace}.svc.cluster.local"


# --------------------------------------------------------------------------- in-process control plane


class ControlPlane:
    """An in-process :class:`ControlPlaneServer` fed from a temp-dir YAML file."""

    def __init__(self, yaml_text: str = "", *, poll_interval: float = 0.05, filename: str = "mesh.yaml",
                 resource_hook: Optional[Callable[[str, Message], None]] = None, listen: str = "127.0.0.1:0") -> None:
        self._initial = yaml_text
        self._dir = tempfile.mkdtemp(prefix="meshpatch-cp-")
        self.config_file = os.path.join(self._dir, filename)
        self.config_dir = self._dir
        self._write_file(yaml_text)
        self.server = ControlPlaneServer(self._dir, listen=listen, poll_interval=poll_interval,
                                         resource_hook=resource_hook)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``."""
        return self.server.address

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    def start(self) -> "ControlPlane":
        self.server.start()
        return self

    def _write_file(self, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self._dir)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, self.config_file)

    def write(self, yaml_text: str, *, timeout: float = 5.0) -> int:
        """Replace the config and wait until it is loaded and pushed to every
        open stream.  Returns the generation now served; if the new YAML failed
        to load, the generation is unchanged and ``server.last_reload_error``
        says why."""
        srv = self.server
        attempts = srv.reload_attempts
        self._write_file(yaml_text)
        srv.reload()  # synchronous; the poller may have beaten us to it, which is fine
        if not srv.wait_for(lambda: srv.reload_attempts > attempts, timeout):
            raise TimeoutError("control plane did not notice the config change")
        gen = srv.generation
        if not srv.wait_pushed(gen, timeout):
            raise TimeoutError(f"config generation {gen} was not pushed to every stream within {timeout}s")
        return gen

    def stop(self) -> None:
        try:
            self.server.stop(grace=0.2)
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "ControlPlane":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def control_plane(yaml_text: str = "", **kwargs: object) -> Iterator[ControlPlane]:
    """``with control_plane(YAML) as cp: ... cp.address ... cp.write(NEW)``."""
    cp = ControlPlane(yaml_text, **kwargs)  # type: ignore[arg-type]
    cp.start()
    try:
        yield cp
    finally:
        cp.stop()


# --------------------------------------------------------------------------- bootstrap


def bootstrap_config(
    address: str,
    *,
    node_id: str = DEFAULT_NODE_ID,
    namespace: str = DEFAULT_NAMESPACE,
    metadata: Optional[Dict[str, object]] = None,
    locality: Optional[Dict[str, str]] = None,
) -> Dict[str, object]:
    """A proxyless gRPC bootstrap in istio-agent's shape (insecure channel creds);
    ``locality`` is ``{"region": .., "zone": .., "sub_zone": ..}``."""
    md: Dict[str, object] = {"GENERATOR": "grpc", "NAMESPACE": namespace}
    md.update(metadata or {})
    return {
        "xds_servers": [
            {"server_uri": address, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}
        ],
        "node": {"id": node_id, "metadata": md, "locality": dict(locality or {})},
        "server_listener_resource_name_template": "xds.istio.io/grpc/lds/inbound/%s",
    }


def write_bootstrap(path: str, address: str, **kwargs: object) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(bootstrap_config(address, **kwargs), f)  # type: ignore[arg-type]
    return path


# --------------------------------------------------------------------------- raw ADS client


def decode(resp: discovery_pb2.DiscoveryResponse) -> Dict[str, Message]:
    """name → resource message of a DiscoveryResponse (duplicates raise)."""
    out: Dict[str, Message] = {}
    cls = _MESSAGES[resp.type_url]
    for a in resp.resources:
        assert a.type_url == resp.type_url, (a.type_url, resp.type_url)
        msg = cls()
        a.Unpack(msg)
        name = msg.cluster_name if resp.type_url == EDS else msg.name
        assert name not in out, f"duplicate resource {name} in one response"
        out[name] = msg
    return out


class AdsClient:
    """One SotW ADS stream.  ``send`` writes a DiscoveryRequest; ``recv``
    returns the next DiscoveryResponse (TimeoutError if none arrives)."""

    def __init__(
        self,
        address: str,
        *,
        node_id: str = DEFAULT_NODE_ID,
        namespace: Optional[str] = DEFAULT_NAMESPACE,
        metadata: Optional[Dict[str, object]] = None,
        locality: Optional[Dict[str, str]] = None,
    ) -> None:
        md: Dict[str, object] = {"GENERATOR": "grpc"}
        if namespace is not None:
            md["NAMESPACE"] = namespace
        md.update(metadata or {})
        st = struct_pb2.Struct()
        st.update(md)
        self.node = base_pb2.Node(id=node_id, metadata=st, locality=base_pb2.Locality(**(locality or {})))
        self._node_sent = False
        self._requests: "queue.Queue[Optional[discovery_pb2.DiscoveryRequest]]" = queue.Queue()
        self._responses: "queue.Queue[object]" = queue.Queue()
        self.last: Dict[str, discovery_pb2.DiscoveryResponse] = {}
        with suppressed():
            self._channel = grpc.insecure_channel(address)
            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self._channel)
            self._call = stub.StreamAggregatedResources(self._request_iter())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _request_iter(self) -> Iterator[discovery_pb2.DiscoveryRequest]:
        while True:
            req = self._requests.get()
            if req is None:
                return
            yield req

    def _read(self) -> None:
        try:
            for resp in self._call:
                self._responses.put(resp)
        except grpc.RpcError as exc:
            self._responses.put(exc)
        self._responses.put(None)

    def send(
        self,
        type_url: str,
        names: Sequence[str] = (),
        *,
        version: str = "",
        nonce: str = "",
        error: Optional[str] = None,
    ) -> None:
        req = discovery_pb2.DiscoveryRequest(
            type_url=type_url, resource_names=list(names), version_info=version, response_nonce=nonce
        )
        if not self._node_sent:
            req.node.CopyFrom(self.node)
            self._node_sent = True
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self._requests.put(req)

    def recv(self, timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no DiscoveryResponse within {timeout}s") from None
        if isinstance(item, grpc.RpcError):
            raise item
        if item is None:
            raise EOFError("ADS stream ended")
        assert isinstance(item, discovery_pb2.DiscoveryResponse)
        self.last[item.type_url] = item
        return item

    def no_response(self, timeout: float = 0.3) -> bool:
        """True when nothing arrives within ``timeout`` (use after NACK/stale/no-op ACK)."""
        try:
            item = self._responses.get(timeout=timeout)
        except queue.Empty:
            return True
        self._responses.put(item)
        return False

    def subscribe(self, type_url: str, names: Sequence[str], timeout: float = 5.0) -> discovery_pb2.DiscoveryResponse:
        """Send the (new) name set for a type, acking the last response of that type, and wait for the answer."""
        prev = self.last.get(type_url)
        self.send(type_url, names, version=prev.version_info if prev else "", nonce=prev.nonce if prev else "")
        return self.recv(timeout)

    def ack(self, resp: discovery_pb2.DiscoveryResponse, names: Optional[Sequence[str]] = None) -> None:
        if names is None:
            names = list(decode(resp))
        self.send(resp.type_url, names, version=resp.version_info, nonce=resp.nonce)

    def nack(self, resp: discovery_pb2.DiscoveryResponse, names: Sequence[str], message: str, version: str = "") -> None:
        self.send(resp.type_url, names, version=version, nonce=resp.nonce, error=message)

    def close(self) -> None:
        self._requests.put(None)
        self._call.cancel()
        self._channel.close()
        self._reader.join(timeout=5)

    def __enter__(self) -> "AdsClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def to_dict(msg: Message) -> Dict[str, object]:
    """A resource as JSON-ish dict (Any fields expanded) for readable assertions."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


__all__: List[str] = [
    "LDS", "RDS", "CDS", "EDS", "DEFAULT_NODE_ID", "ControlPlane", "control_plane", "bootstrap_config",
    "write_bootstrap", "AdsClient", "decode", "to_dict", "node_id_for",
]
