"""Per-stream SotW ADS state machine, kept free of gRPC so its rules are plain code.

The rules are istiod's (``pkg/xds/server.go`` ShouldRespond): NACKs and stale
nonces get no answer; the first request of a type (or one without a nonce)
gets a full answer; an ACK gets an answer only when the subscription changed
(any change for LDS/CDS, additions only for RDS/EDS).  One instance is driven
by exactly one thread, so it needs no locking of its own.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message

from envoy.service.discovery.v3 import discovery_pb2

from .generator import PUSH_ORDER, WILDCARD_TYPES, generate
from .snapshot import ProxyNode, Snapshot

log = logging.getLogger("meshpatch.controlplane")

SUPPORTED_TYPES = frozenset(PUSH_ORDER)


@dataclass(frozen=True)
class ConfigState:
    snapshot: Snapshot
    version: str
    generation: int


@dataclass
class Watch:
    names: List[str] = field(default_factory=list)
    ever_sent_names: bool = False
    explicit_wildcard: bool = False
    nonce: str = ""
    version_sent: str = ""
    version_acked: str = ""
    last_error: str = ""

    def wildcard(self, type_url: str) -> bool:
        return type_url in WILDCARD_TYPES and (self.explicit_wildcard or not self.ever_sent_names)

    def active(self, type_url: str) -> bool:
        return bool(self.names) or self.wildcard(type_url)

    def set_names(self, names: List[str]) -> None:
        uniq: List[str] = []
        for n in names:
            if n not in uniq:
                uniq.append(n)
        self.explicit_wildcard = "*" in uniq
        self.names = [n for n in uniq if n != "*"]
        self.ever_sent_names = self.ever_sent_names or bool(uniq)


class StreamEvents:
    """Callbacks into the server's counters (kept as an interface for tests)."""

    def on_ack(self, stream: "SotwStream", type_url: str, version: str) -> None: ...

    def on_nack(self, stream: "SotwStream", type_url: str, version: str, error: str) -> None: ...

    def on_stale(self, stream: "SotwStream", type_url: str) -> None: ...

    def on_response(self, stream: "SotwStream", type_url: str, count: int) -> None: ...


def _node_metadata(node) -> Dict[str, object]:
    if not node.HasField("metadata"):
        return {}
    return json_format.MessageToDict(node.metadata)


#: Called with (type_url, resource) for every generated resource before it is
#: sent; may change it in place.  For tests, and for Envoy fields that Istio's
#: API cannot express (e.g. success-rate outlier detection).
ResourceHook = Callable[[str, Message], None]


class SotwStream:
    def __init__(self, stream_id: int, state: Callable[[], ConfigState], events: StreamEvents, peer: str = "",
                 resource_hook: Optional[ResourceHook] = None) -> None:
        self.id = stream_id
        self.peer = peer
        self._state = state
        self._events = events
        self._resource_hook = resource_hook
        self.node: Optional[ProxyNode] = None
        self.watches: Dict[str, Watch] = {}
        # Written by the server once a push's responses were handed to gRPC.
        self.pushed_generation = 0

    @property
    def node_id(self) -> str:
        return self.node.id if self.node else ""

    # ------------------------------------------------------------------ requests

    def handle_request(self, req: discovery_pb2.DiscoveryRequest) -> List[discovery_pb2.DiscoveryResponse]:
        if self.node is None:
            if req.HasField("node"):
                loc = req.node.locality
                self.node = ProxyNode.from_fields(req.node.id, _node_metadata(req.node), (loc.region, loc.zone, loc.sub_zone))
                log.info("meshpatch control plane: stream %d from %s is node %s (namespace %s)",
                         self.id, self.peer or "?", self.node.id, self.node.namespace)
            else:
                self.node = ProxyNode.from_fields("", {})
                log.warning("meshpatch control plane: stream %d: first request carries no node; assuming namespace default", self.id)
        type_url = req.type_url
        if type_url not in SUPPORTED_TYPES:
            log.debug("meshpatch control plane: stream %d: ignoring request for unsupported type %s", self.id, type_url)
            return []
        watch = self.watches.get(type_url)
        if req.HasField("error_detail"):
            msg = req.error_detail.message
            if watch is not None:
                watch.last_error = msg
            self._events.on_nack(self, type_url, req.version_info, msg)
            return []
        names = list(req.resource_names)
        if watch is None or not req.response_nonce:
            # First request for this type on the stream, or a client reconnecting state: full answer.
            watch = watch or Watch()
            watch.set_names(names)
            self.watches[type_url] = watch
            if not watch.active(type_url):
                return []  # RDS/EDS with no names: nothing to watch
            return [self._respond(type_url, self._state())]
        if req.response_nonce != watch.nonce:
            self._events.on_stale(self, type_url)
            return []
        watch.version_acked = req.version_info
        watch.last_error = ""
        self._events.on_ack(self, type_url, req.version_info)
        old = set(watch.names)
        old_wildcard = watch.wildcard(type_url)
        watch.set_names(names)
        new = set(watch.names)
        if new == old and watch.wildcard(type_url) == old_wildcard:
            return []
        if type_url in WILDCARD_TYPES or (new - old):
            return [self._respond(type_url, self._state())]
        return []

    # ------------------------------------------------------------------ pushes

    def handle_push(self, state: ConfigState) -> List[discovery_pb2.DiscoveryResponse]:
        """New config: resend every watched type (CDS, EDS, LDS, RDS order)
        unless this stream already answered it from the new version."""
        out = []
        for type_url in PUSH_ORDER:
            watch = self.watches.get(type_url)
            if watch is None or not watch.active(type_url) or watch.version_sent == state.version:
                continue
            out.append(self._respond(type_url, state))
        return out

    # ------------------------------------------------------------------ responses

    def _respond(self, type_url: str, state: ConfigState) -> discovery_pb2.DiscoveryResponse:
        watch = self.watches[type_url]
        assert self.node is not None
        resources = generate(state.snapshot, self.node, type_url, watch.names, watch.wildcard(type_url))
        if self._resource_hook is not None:
            for _, msg in resources:
                self._resource_hook(type_url, msg)
        nonce = state.version + str(uuid.uuid4())
        resp = discovery_pb2.DiscoveryResponse(version_info=state.version, type_url=type_url, nonce=nonce)
        for _, msg in resources:
            a = AnyProto()
            a.Pack(msg)
            resp.resources.append(a)
        watch.nonce = nonce
        watch.version_sent = state.version
        self._events.on_response(self, type_url, len(resources))
        log.debug("meshpatch control plane: stream %d: sent %s version %s with %d resources (%s)",
                  self.id, type_url.rsplit(".", 1)[-1], state.version, len(resources),
                  ", ".join(n for n, _ in resources))
        return resp

    def describe(self) -> Dict[str, object]:
        return {
            "id": self.id,
            "peer": self.peer,
            "node_id": self.node_id,
            "namespace": self.node.namespace if self.node else "",
            "subscriptions": {
                t: {
                    "names": list(w.names),
                    "wildcard": w.wildcard(t),
                    "version_sent": w.version_sent,
                    "version_acked": w.version_acked,
                    "last_error": w.last_error,
                }
                for t, w in list(self.watches.items())  # read from other threads: copy first
            },
        }
