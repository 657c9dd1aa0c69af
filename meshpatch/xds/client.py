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

Absence of a name the client never received is different (gRPC's xds_client
never takes it from a response either): a SotW response cannot say which
request it answers, and a config push built for the *previous* name set can
cross a request adding a name, so "not in this response" may only mean "not
yet seen by the server".  It is conclusive in two cases: the first response of
a type on a stream, for the names of the stream's initial request (nothing of
that type was sent before the server read it); and a response whose ACK the
server then leaves unanswered for ``absence_settle`` seconds.  The ACK carries
every subscribed name, and a server answers a request whose names differ from
the ones it built its last response for (a crossing push is followed by the
answer to the new names); silence means the response did cover them.
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

# How long the server must leave the ACK of a response unanswered before a
# never-received LDS/CDS name missing from it counts as not existing (see the
# module docstring).  A server answers a changed name set in one round trip;
# this only delays the negative answer for a host the control plane does not
# know (its first call waits at most MESHPATCH_RESOLVE_TIMEOUT, default 1 s).
ABSENCE_SETTLE = 0.25
# LDS settles faster: every first call to a host outside the mesh (an external
# API) waits for this negative answer, and a wrong one is benign there -- that
# call goes out unrouted and the host is routed once the server's answer to the
# ACK brings its listener -- whereas a wrong CDS absence fails calls.
LDS_ABSENCE_SETTLE = 0.05


class Watcher(Protocol):
    def on_resource(self, type_url: str, name: str, value: Any) -> None: ...

    def on_does_not_exist(self, type_url: str, name: str) -> None: ...

    def on_error(self, type_url: str, name: str, reason: str) -> None: ...


class _Resource:
    __slots__ = ("watchers", "value", "raw", "status", "version", "error", "seen")

    def __init__(self) -> None:
        self.watchers: List[Watcher] = []
        self.value: Any = None
        self.raw: Any = None  # the last accepted resource as received (an Any), for the pod relay
        self.status = REQUESTED
        self.version = ""
        self.error = ""
        # Named in a response (valid or not) since this subscription began: the
        # server's name set then held it, and it only grows while we keep the
        # subscription, so a later LDS/CDS response without it is a deletion.
        self.seen = False


class _TypeState:
    __slots__ = ("resources", "version", "nonce", "initial", "doubted", "doubt_gen", "doubt_timer",
                 "acks", "nacks", "last_error", "accepted_at")

    def __init__(self) -> None:
        self.resources: Dict[str, _Resource] = {}
        self.version = ""  # last accepted version_info
        self.nonce = ""  # last nonce seen on the current stream
        # Names of this stream's initial request of the type while it is
        # unanswered: the first response answers exactly it (see _send).
        self.initial: Optional[frozenset] = None
        # Never-received names missing from the latest response, and the number
        # of that response: they are declared non-existent if the server leaves
        # its ACK unanswered (see _on_response / _confirm_absent).
        self.doubted: List[str] = []
        self.doubt_gen = 0
        self.doubt_timer: Any = None
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
        self.absence_settle = ABSENCE_SETTLE  # seconds; tests shorten or lengthen it
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
        with self.lock:
            for state in self._types.values():
                self._drop_doubts(state)

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

    def _send(self, type_url: str, error: str = "") -> bool:
        """Send the type's current subscription; False when it did not go out."""
        state = self._types[type_url]
        if not state.nonce and state.initial is not None:
            # The initial request of this type is still unanswered.  Servers
            # answer every empty-nonce request (istiod treats it as a new
            # watch), so a second one would make the first response impossible
            # to attribute; the ACK of that response carries the full name set
            # instead.
            return False
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
        if not self.transport.send(request):
            return False
        self._node_sent = True
        if not state.nonce:
            state.initial = frozenset(state.resources)
        return True

    # -- transport callbacks (stream thread) -------------------------------

    def _on_stream_start(self) -> None:
        with self.lock:
            self._node_sent = False
            for type_url in TYPE_ORDER:
                state = self._types[type_url]
                state.nonce = ""
                state.initial = None
                self._drop_doubts(state)
                if state.resources:
                    self._send(type_url)

    def _on_stream_end(self, error: str, had_response: bool) -> None:
        with self.lock:
            # Silence of a dead stream says nothing about what the server knows.
            for state in self._types.values():
                self._drop_doubts(state)
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
            # The first response of the type on this stream answers the initial
            # request: its names are the only never-received ones it can settle.
            conclusive = state.initial if not state.nonce else None
            state.initial = None
            state.nonce = response.nonce
            self._drop_doubts(state)
            raw: Dict[str, Any] = {}
            valid, errors = decode_response(response.type_url, list(response.resources), raw)
            for name, value in valid.items():
                resource = state.resources.get(name)
                if resource is None:
                    continue  # not requested: ignored, as gRPC does
                resource.seen = True
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
                    resource.seen = True
                    resource.status = NACKED
                    resource.error = err.reason
                    for watcher in list(resource.watchers):
                        self._notify(watcher.on_error, response.type_url, err.name, err.reason)
            doubted: List[str] = []
            if response.type_url in STATE_OF_THE_WORLD_FULL:
                for name, resource in list(state.resources.items()):
                    if name in valid or name in bad_names or resource.status == DOES_NOT_EXIST:
                        continue
                    if not resource.seen and (conclusive is None or name not in conclusive):
                        # Perhaps built before the server saw this name (a push
                        # crossing our request): settled by the server's next move.
                        doubted.append(name)
                        continue
                    self._mark_absent(state, response.type_url, name, resource)
            self.updates += 1
            kind = SHORT_NAMES.get(response.type_url, response.type_url)
            if errors:
                detail = "; ".join(str(e) for e in errors)
                state.nacks += 1
                state.last_error = detail
                log.warning("meshpatch NACKed %s version %s: %s (last good config stays in force)",
                            kind, response.version_info, detail)
                # No settle timer: servers take no subscription change from a
                # NACK (istiod ignores its names), so their silence proves nothing.
                self._send(response.type_url, error=detail)
            else:
                state.acks += 1
                state.accepted_at = time.time()
                state.version = response.version_info
                if self._send(response.type_url) and doubted:
                    self._arm_doubts(response.type_url, state, doubted)

    def _mark_absent(self, state: _TypeState, type_url: str, name: str, resource: _Resource) -> None:
        resource.value = None
        resource.raw = None
        resource.status = DOES_NOT_EXIST
        for watcher in list(resource.watchers):
            self._notify(watcher.on_does_not_exist, type_url, name)

    # -- does-not-exist for names never received -----------------------------

    def _drop_doubts(self, state: _TypeState) -> None:
        state.doubted = []
        state.doubt_gen += 1
        timer, state.doubt_timer = state.doubt_timer, None
        if timer is not None:
            timer.cancel()

    def _arm_doubts(self, type_url: str, state: _TypeState, doubted: List[str]) -> None:
        state.doubted = doubted
        settle = min(self.absence_settle, LDS_ABSENCE_SETTLE) if type_url == LDS else self.absence_settle
        timer = threading.Timer(settle, self._confirm_absent, (type_url, state.doubt_gen))
        timer.daemon = True
        timer.name = "meshpatch-xds-absence"
        state.doubt_timer = timer
        timer.start()

    def _confirm_absent(self, type_url: str, gen: int) -> None:
        """The server left our ACK (naming every subscription) unanswered: the
        response it acknowledges was built for our names, so what it lacks is absent."""
        with self.lock:
            state = self._types[type_url]
            if state.doubt_gen != gen:
                return  # a newer response (or stream) took over
            doubted, state.doubted, state.doubt_timer = state.doubted, [], None
            for name in doubted:
                resource = state.resources.get(name)
                if resource is not None and not resource.seen and resource.status == REQUESTED:
                    self._mark_absent(state, type_url, name, resource)

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
