"""The xDS client: subscriptions, resource cache, watchers, ACK/NACK.

All config-plane state lives under one lock (``self.lock``) and every watcher
callback runs while it is held — from the stream thread for responses, from the
app thread for cached values delivered on ``watch``.  That keeps the watcher
graph (listener → route → clusters → endpoints) single-threaded in effect,
while the per-request pick never takes the lock: it reads immutable snapshots
the watchers publish.

Protocol rules followed (Envoy xDS protocol, gRPC A27/A46/A57): the node goes
on the first request of each stream only; every response is ACKed or NACKed
with its nonce; a NACK carries the last accepted version and an error_detail
naming each bad resource, while the valid resources of that response are used;
LDS/CDS absence means deletion; the cache survives reconnects and every
subscription is re-sent on a new stream.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Protocol

from google.protobuf import json_format
from google.protobuf import struct_pb2

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2

import meshpatch
from meshpatch.bootstrap import Bootstrap
from meshpatch.security import providers
from meshpatch.xds.decode import decode_response
from meshpatch.xds.transport import BACKOFF, READY, GrpcAdsTransport
from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS, SHORT_NAMES, STATE_OF_THE_WORLD_FULL

log = logging.getLogger("meshpatch.xds")

REQUESTED = "REQUESTED"
ACKED = "ACKED"
NACKED = "NACKED"
DOES_NOT_EXIST = "DOES_NOT_EXIST"

TYPE_ORDER = (LDS, RDS, CDS, EDS)


class Watcher(Protocol):
    def on_resource(self, type_url: str, name: str, value: Any) -> None: ...

    def on_does_not_exist(self, type_url: str, name: str) -> None: ...

    def on_error(self, type_url: str, name: str, reason: str) -> None: ...


class _Resource:
    __slots__ = ("watchers", "value", "raw", "status", "version", "error")

    def __init__(self) -> None:
        self.watchers: List[Watcher] = []
        self.value: Any = None
        self.raw: Any = None  # the last accepted resource as received (an Any), for the pod relay
        self.status = REQUESTED
        self.version = ""
        self.error = ""


class _TypeState:
    __slots__ = ("resources", "version", "nonce", "first_sent", "server_names", "acks", "nacks", "last_error",
                 "accepted_at")

    def __init__(self) -> None:
        self.resources: Dict[str, _Resource] = {}
        self.version = ""  # last accepted version_info
        self.nonce = ""  # last nonce seen on the current stream
        # Names of the first request sent carrying ``nonce``: the request the
        # next response answers (servers ignore later requests with a stale
        # nonce, and answer the first one).  See _on_response.
        self.first_sent: Optional[frozenset] = None
        # The names the server last answered for: a later request carrying the
        # same set is a plain ACK, which servers (istiod, ours) do not answer.
        self.server_names: Optional[frozenset] = None
        self.acks = 0
        self.nacks = 0
        self.last_error = ""
        self.accepted_at = 0.0  # wall-clock time of the last ACK (config age metric / status)


def build_node(node: Dict[str, Any]) -> base_pb2.Node:
    proto = base_pb2.Node(
        id=str(node.get("id", "")),
        cluster=str(node.get("cluster", "")),
        user_agent_name="meshpatch",
        user_agent_version=meshpatch.__version__,
    )
    metadata = node.get("metadata") or {}
    if metadata:
        struct = struct_pb2.Struct()
        json_format.ParseDict(metadata, struct)
        proto.metadata.CopyFrom(struct)
    locality = node.get("locality") or {}
    if isinstance(locality, dict):
        proto.locality.region = str(locality.get("region", ""))
        proto.locality.zone = str(locality.get("zone", ""))
        proto.locality.sub_zone = str(locality.get("sub_zone", ""))
    proto.client_features.append("envoy.lb.does_not_support_overprovisioning")
    return proto


class XdsClient:
    def __init__(self, bootstrap: Bootstrap, transport_factory: Callable[..., Any] = GrpcAdsTransport) -> None:
        self.bootstrap = bootstrap
        # Certificate providers are process-wide like the bootstrap; CDS/LDS
        # decoding checks instance names against them (unknown → NACK).
        providers.configure(bootstrap.certificate_providers)
        self.lock = threading.RLock()
        self._types: Dict[str, _TypeState] = {t: _TypeState() for t in TYPE_ORDER}
        self._node = build_node(bootstrap.node)
        self._node_sent = False
        self._transport_factory = transport_factory
        self.transport = self._new_transport()
        self.updates = 0
        self._unreachable = False  # a stream attempt failed and none succeeded since (logging)

    def _new_transport(self) -> Any:
        transport = self._transport_factory(
            self.bootstrap.servers[0], self._on_stream_start, self._on_response, self._on_stream_end
        )
        bind = getattr(transport, "bind_client", None)
        if bind is not None:  # the pod-shared transport serves other processes from this cache
            bind(self)
        return transport

    def after_fork_in_child(self) -> None:
        """Keep the cache and subscriptions; never reuse the parent's channel."""
        old = self.transport
        old.abandon_after_fork()
        self.lock = threading.RLock()
        self._node_sent = False
        orphaned = getattr(old, "orphaned_watches", None)
        if orphaned is not None:
            # The parent's relay watched names for its followers; the child has no
            # followers, so it must not keep them subscribed.
            for type_url, name, watcher in orphaned():
                resource = self._types[type_url].resources.get(name)
                if resource is not None and watcher in resource.watchers:
                    resource.watchers.remove(watcher)
                    if not resource.watchers:
                        del self._types[type_url].resources[name]
        self.transport = self._new_transport()

    def start(self) -> None:
        self.transport.start()

    def stop(self) -> None:
        self.transport.stop()

    @property
    def connected(self) -> bool:
        return self.transport.state == READY

    @property
    def failing(self) -> bool:
        return self.transport.state == BACKOFF

    # -- subscriptions ------------------------------------------------------

    def watch(self, type_url: str, name: str, watcher: Watcher) -> None:
        with self.lock:
            state = self._types[type_url]
            resource = state.resources.get(name)
            if resource is None:
                resource = state.resources[name] = _Resource()
                resource.watchers.append(watcher)
                self._send(type_url)
                return
            resource.watchers.append(watcher)
            if resource.value is not None:
                watcher.on_resource(type_url, name, resource.value)
            elif resource.status == DOES_NOT_EXIST:
                watcher.on_does_not_exist(type_url, name)

    def cancel_watch(self, type_url: str, name: str, watcher: Watcher) -> None:
        with self.lock:
            state = self._types[type_url]
            resource = state.resources.get(name)
            if resource is None:
                return
            try:
                resource.watchers.remove(watcher)
            except ValueError:
                return
            if not resource.watchers:
                del state.resources[name]
                self._send(type_url)

    def _send(self, type_url: str, error: str = "") -> None:
        state = self._types[type_url]
        if not state.nonce and state.first_sent is not None:
            # The initial request of this type is still unanswered.  Servers
            # answer every empty-nonce request (istiod treats it as a new
            # watch), so a second one would make responses impossible to
            # attribute; the ACK of the coming response carries the full name
            # set instead.
            return
        request = discovery_pb2.DiscoveryRequest(
            type_url=type_url,
            resource_names=sorted(state.resources),
            version_info=state.version,
            response_nonce=state.nonce,
        )
        if error:
            request.error_detail.code = 3  # INVALID_ARGUMENT, as gRPC sends
            request.error_detail.message = error[:4096]
        if not self._node_sent:
            request.node.CopyFrom(self._node)
        if self.transport.send(request):
            self._node_sent = True
            names = frozenset(state.resources)
            if state.first_sent is None and names != state.server_names:
                # The first request with this nonce that the server will answer:
                # a plain ACK (same names) is not; a changed subscription is.
                state.first_sent = names

    # -- transport callbacks (stream thread) -------------------------------

    def _on_stream_start(self) -> None:
        with self.lock:
            self._node_sent = False
            for type_url in TYPE_ORDER:
                state = self._types[type_url]
                state.nonce = ""
                state.first_sent = None
                state.server_names = None
                if state.resources:
                    self._send(type_url)

    def _on_stream_end(self, error: str, had_response: bool) -> None:
        # One line per state change, not per reconnect attempt: the first failed
        # attempt says the server is unreachable, the next response that it is back.
        if had_response:
            level = logging.INFO
        elif not self._unreachable:
            level = logging.WARNING
            self._unreachable = True
        else:
            level = logging.DEBUG
        log.log(level, "meshpatch xDS stream to %s ended (%s); cached config stays in force; reconnecting",
                self.bootstrap.servers[0].target, error)

    def _on_response(self, response: Any) -> None:
        if self._unreachable:
            self._unreachable = False
            log.warning("meshpatch xDS stream to %s is up again", self.bootstrap.servers[0].target)
        with self.lock:
            state = self._types.get(response.type_url)
            if state is None:
                log.info("ignoring xDS response of unrequested type %s", response.type_url)
                return
            # Which names did the server know when it built this response?  Those
            # of the request it answers.  A name subscribed after that request
            # may be missing only because the response was already under way.
            answered = state.first_sent if state.first_sent is not None else (state.server_names or frozenset())
            state.server_names = answered
            state.nonce = response.nonce
            state.first_sent = None
            raw: Dict[str, Any] = {}
            valid, errors = decode_response(response.type_url, list(response.resources), raw)
            for name, value in valid.items():
                resource = state.resources.get(name)
                if resource is None:
                    continue  # not requested: ignored, as gRPC does
                resource.raw = raw.get(name)
                resource.status = ACKED
                resource.version = response.version_info
                resource.error = ""
                if resource.value != value:
                    resource.value = value
                    for watcher in list(resource.watchers):
                        self._notify(watcher.on_resource, response.type_url, name, value)
            bad_names = set()
            for err in errors:
                bad_names.add(err.name)
                resource = state.resources.get(err.name)
                if resource is not None:
                    resource.status = NACKED
                    resource.error = err.reason
                    for watcher in list(resource.watchers):
                        self._notify(watcher.on_error, response.type_url, err.name, err.reason)
            if response.type_url in STATE_OF_THE_WORLD_FULL:
                for name, resource in list(state.resources.items()):
                    if name in valid or name in bad_names or resource.status == DOES_NOT_EXIST:
                        continue
                    if resource.value is None and name not in answered:
                        continue  # never received and not yet seen by the server: keep waiting
                    resource.value = None
                    resource.raw = None
                    resource.status = DOES_NOT_EXIST
                    for watcher in list(resource.watchers):
                        self._notify(watcher.on_does_not_exist, response.type_url, name)
            self.updates += 1
            kind = SHORT_NAMES.get(response.type_url, response.type_url)
            if errors:
                detail = "; ".join(str(e) for e in errors)
                state.nacks += 1
                state.last_error = detail
                log.warning("meshpatch NACKed %s version %s: %s (last good config stays in force)",
                            kind, response.version_info, detail)
                self._send(response.type_url, error=detail)
            else:
                state.acks += 1
                state.accepted_at = time.time()
                state.version = response.version_info
                self._send(response.type_url)

    @staticmethod
    def _notify(callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # one broken watcher must not stop the others or the ACK
            log.warning("meshpatch watcher failed", exc_info=True)

    # -- the pod relay's view of the cache -------------------------------------

    def cached(self, type_url: str, names: Any) -> "tuple[List[Any], bool, str]":
        """(accepted resources as received, whether any name is still unanswered,
        the type's accepted version) for ``names``; call with ``self.lock`` held.
        A name is answered once it has a good value, is known not to exist, or
        was rejected before ever being good."""
        state = self._types[type_url]
        found: List[Any] = []
        pending = False
        for name in names:
            resource = state.resources.get(name)
            if resource is None:
                pending = True
            elif resource.raw is not None:
                found.append(resource.raw)
            elif resource.status == REQUESTED:
                pending = True
        return found, pending, state.version

    # -- introspection (status CLI, tests) ---------------------------------

    def resource_status(self, type_url: str, name: str) -> Optional[str]:
        with self.lock:
            resource = self._types[type_url].resources.get(name)
            return resource.status if resource else None

    def type_stats(self, type_url: str) -> Dict[str, Any]:
        with self.lock:
            state = self._types[type_url]
            return {
                "version": state.version,
                "acks": state.acks,
                "nacks": state.nacks,
                "last_error": state.last_error,
                "names": sorted(state.resources),
                "accepted_at": state.accepted_at,
            }

    def resources(self, type_url: str) -> List[Dict[str, Any]]:
        """Every subscribed resource of a type, as CSDS shows it: name, status
        (REQUESTED/ACKED/NACKED/DOES_NOT_EXIST), version, error and the value in
        force (decoded; the raw resource too when it is kept)."""
        with self.lock:
            out = []
            for name, resource in sorted(self._types[type_url].resources.items()):
                out.append({
                    "name": name,
                    "status": resource.status,
                    "version": resource.version,
                    "error": resource.error,
                    "value": resource.value,
                    "raw": getattr(resource, "raw", None),
                    "watchers": len(resource.watchers),
                })
            return out
