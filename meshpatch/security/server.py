"""Mesh security for the gRPC servers an app starts.

For each TCP port a ``grpc.server`` / ``grpc.aio.server`` binds with
``add_insecure_port`` (the app asked for plaintext; the mesh decides),
meshpatch watches the inbound listener ``<server_listener_resource_name_template
% "IP:port">`` on its own xDS stream, waits for it (bounded by
``MESHPATCH_RESOLVE_TIMEOUT``; gRPC servers stay "not serving" until theirs
arrives, A36) and binds the port accordingly:

* STRICT (a filter chain with a DownstreamTlsContext): mTLS only, with the
  workload certificate, client certificates required and checked against the
  mesh CA — grpc's dynamic SSL server credentials, whose certificate fetcher
  hands new handshakes the rotated certificate (no restart);
* plaintext otherwise: a port the control plane does not know, DISABLE /
  PERMISSIVE, or no answer in time (an unreachable mesh means "not in the
  mesh" everywhere in meshpatch);
* a listener meshpatch NACKed (e.g. an unknown certificate provider): the
  bind fails — never plaintext for a port whose mesh config says otherwise.

RBAC (the listener's ``envoy.filters.http.rbac`` filters) is enforced by a
server interceptor meshpatch puts first in the chain: it reads the current
listener on every call (changes apply at once), evaluates path, metadata and
the peer's SPIFFE ID from the TLS auth context (gRPC A41) and aborts denied
calls with PERMISSION_DENIED, counted per listener in
:data:`meshpatch.security.rbac.COUNTERS`.  A Python interceptor cannot tell
which port a call came in on; with several mesh ports whose rules differ,
every call must pass every port's rules (most restrictive), and calls on the
app's own non-mesh ports of the same server are checked too.

Why not grpc-core's own xDS server (``grpc.server(xds=True)``), which could
switch plaintext/mTLS per connection?  With grpcio 1.85 it aborts the process
(``pipe.h:85 Check failed: has_value()``) whenever the Python server sends a
trailers-only response — ``context.abort``, an exception in a handler, an
unknown method, the concurrency limit — i.e. any client could crash the app.
So for each port the mode is fixed in its binding, and a change of mode is a
re-binding: a sync ``grpc.server`` is given a fresh grpc-core server with the
same handlers, interceptors and thread pool, bound in the new mode next to the
old one (SO_REUSEPORT), started, swapped in under the app's server object, and
the old one is stopped with a drain grace — new connections get the new mode
at once, connections already open finish their calls (gRPC A36 drains them
too).  ``grpc.aio`` servers log the change; it applies after a restart.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from meshpatch.security import providers, rbac
from meshpatch.xds.type_urls import LDS

log = logging.getLogger("meshpatch.security")

ISTIO_TEMPLATE = "xds.istio.io/grpc/lds/inbound/%s"
DENIED_MESSAGE = "Unauthorized RPC rejected"  # what grpc-core's own RBAC filter says

PENDING = "pending"
MESH = "mesh"
NOT_IN_MESH = "not-in-mesh"
REJECTED = "rejected"
UNREACHABLE = "unreachable"


def enabled() -> bool:
    return os.environ.get("MESHPATCH_SERVER_SECURITY", "1").strip().lower() not in ("0", "false", "no", "off")


def listener_template(agent: Any) -> Optional[str]:
    """The bootstrap's server_listener_resource_name_template; for the local
    control plane (MESHPATCH_XDS_SERVER, no bootstrap file) Istio's."""
    bootstrap = agent.bootstrap
    template = getattr(bootstrap, "server_listener_template", None)
    if template:
        return template
    if getattr(bootstrap, "source", "") == "MESHPATCH_XDS_SERVER":
        return ISTIO_TEMPLATE
    return None


def split_address(address: str) -> Optional[Tuple[str, int]]:
    """(host, port) of a TCP bind address ``host:port`` / ``[v6]:port``; None otherwise."""
    text = address.strip()
    if text.startswith(("unix:", "unix-abstract:", "vsock:")):
        return None
    for prefix in ("ipv4:", "ipv6:", "dns:"):
        if text.startswith(prefix):
            text = text[len(prefix):].lstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def free_port(host: str) -> int:
    """A port free on ``host`` now, for ``port 0`` binds: the inbound listener
    is named after the port, so it must be known before binding."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    bind_host = host
    if host in ("", "0.0.0.0", "[::]", "::", "localhost"):
        bind_host = "::" if family == socket.AF_INET6 else "0.0.0.0"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((bind_host, 0))
        return sock.getsockname()[1]


class BindRefused(Exception):
    """The port's mesh config was rejected: it must not be bound in plaintext."""


# -- one bound port ------------------------------------------------------------------------


class PortWatch:
    """xDS watcher of one port's inbound listener (callbacks under the xDS client lock)."""

    def __init__(self, owner: "ManagedServer", host: str, port: int, upstream_name: str) -> None:
        self.owner = owner
        self.host = host
        self.port = port
        self.address = join(host, port)
        self.upstream_name = upstream_name
        self.listener: Any = None  # the accepted ServerListener
        self.state = PENDING
        self.error = ""
        self.bound_mtls: Optional[bool] = None  # how the port was bound
        self.answered = threading.Event()

    @property
    def engines(self) -> Tuple[rbac.Engine, ...]:
        chain = self.chain
        return chain.rbac if chain is not None else ()

    @property
    def chain(self) -> Any:
        listener = self.listener
        return listener.chain_for(self.port) if listener is not None else None

    @property
    def mtls(self) -> bool:
        chain = self.chain
        return chain is not None and chain.tls is not None

    def on_resource(self, type_url: str, name: str, value: Any) -> None:
        from meshpatch.xds.decode_server import ServerListener

        if not isinstance(value, ServerListener):
            self.on_error(type_url, name, "the control plane sent a client (API) listener for a server port")
            return
        self.listener = value
        self.state = MESH
        self.error = ""
        self.answered.set()
        self.owner.changed()

    def on_does_not_exist(self, type_url: str, name: str) -> None:
        self.listener = None
        self.state = NOT_IN_MESH
        self.answered.set()
        self.owner.changed()

    def on_error(self, type_url: str, name: str, reason: str) -> None:
        self.error = reason
        if self.listener is None:
            self.state = REJECTED
            self.answered.set()
            self.owner.changed()

    @property
    def restart_needed(self) -> bool:
        return self.bound_mtls is not None and self.state in (MESH, NOT_IN_MESH) and self.bound_mtls != self.mtls

    def describe(self) -> Dict[str, Any]:
        return {"address": self.address, "listener": self.upstream_name, "state": self.state,
                "mtls": self.mtls, "bound_mtls": self.bound_mtls, "restart_needed": self.restart_needed,
                "rbac_filters": [e.filter_name for e in self.engines], "error": self.error}


class RbacState:
    """What the interceptor reads per call (published whole, never mutated)."""

    __slots__ = ("engine_sets", "local_port", "local_ip")

    def __init__(self, engine_sets: Tuple[Tuple[str, Tuple[rbac.Engine, ...]], ...], local_port: Optional[int],
                 local_ip: Optional[str]) -> None:
        self.engine_sets = engine_sets  # ((listener name, engines), ...): every set must allow the call
        self.local_port = local_port
        self.local_ip = local_ip


NO_RBAC = RbacState((), None, None)


class ManagedServer:
    """The mesh side of one app server object (sync or aio)."""

    def __init__(self, agent: Any, template: str, kind: str) -> None:
        self.agent = agent
        self.template = template
        self.kind = kind
        self.ports: Dict[str, PortWatch] = {}
        self.other_ports: List[str] = []  # the app's own (non-mesh) ports on this server
        self.rbac_state = NO_RBAC
        self._lock = threading.RLock()
        self._closed = False
        # Live mode switches (sync servers; set up by hooks.grpc_server_security):
        # called with no lock held when a port's mesh mode differs from its binding.
        self.on_mode_change: Any = None
        self.switches = 0

    def bind_plan(self, address: str) -> Optional[Tuple[str, int, PortWatch]]:
        """For an ``add_insecure_port`` address: (address to bind, port, watch)
        after the listener answered (or the wait ended); None = not a TCP port."""
        parsed = split_address(address)
        if parsed is None:
            self.note_other_port(address)
            return None
        host, port = parsed
        if port == 0:
            port = free_port(host)
        watch = self.watch(host, port)
        self.wait(watch)
        if watch.state == REJECTED:
            raise BindRefused(f"meshpatch: the inbound listener {watch.upstream_name} was rejected ({watch.error}); "
                              f"not binding {watch.address} in plaintext")
        return join(host, port), port, watch

    def note_other_port(self, address: str) -> None:
        with self._lock:
            self.other_ports.append(address)
        self.changed()

    def watch(self, host: str, port: int) -> PortWatch:
        address = join(host, port)
        watch = PortWatch(self, host, port, self.template % address)
        with self._lock:
            self.ports[address] = watch
        client = self.agent.client
        self.agent._ensure_started()
        with client.lock:
            client.watch(LDS, watch.upstream_name, watch)
        return watch

    def wait(self, watch: PortWatch) -> None:
        """Bounded wait for the port's first answer; an unreachable mesh → plaintext."""
        timeout = float(getattr(self.agent.settings, "resolve_timeout", 1.0))
        deadline = time.monotonic() + timeout
        client = self.agent.client
        while not watch.answered.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or getattr(client, "failing", False):
                break
            watch.answered.wait(min(left, 0.05))
        if not watch.answered.is_set():
            with self._lock:
                if watch.state == PENDING:
                    watch.state = UNREACHABLE
            log.warning("meshpatch: no inbound listener for gRPC server port %s within %.1fs (control plane "
                        "unreachable?); binding it plaintext", watch.address, timeout)

    def bound(self, watch: PortWatch, mtls: bool) -> None:
        watch.bound_mtls = mtls
        log.info("meshpatch: gRPC server port %s bound %s (%s)", watch.address, "with mTLS" if mtls else "plaintext",
                 watch.state)
        self.changed()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches = list(self.ports.values())
        client = self.agent.client
        with client.lock:
            for watch in watches:
                client.cancel_watch(LDS, watch.upstream_name, watch)

    def changed(self) -> None:
        """Publish the RBAC rules the interceptor applies; report mode changes."""
        with self._lock:
            if self._closed:
                return
            watches = list(self.ports.values())
            switch = any(w.restart_needed for w in watches)
            if switch and self.on_mode_change is None:
                for watch in watches:
                    if watch.restart_needed:
                        log.warning("meshpatch: gRPC server port %s: the mesh now says %s but the port is bound %s; "
                                    "the new mode applies after a restart", watch.address,
                                    "mTLS" if watch.mtls else "plaintext",
                                    "with mTLS" if watch.bound_mtls else "plaintext")
            elif switch:
                threading.Thread(target=self.on_mode_change, name="meshpatch-server-switch", daemon=True).start()
            sets = []
            seen = set()
            for watch in watches:
                engines = watch.engines
                if not engines:
                    continue
                key = tuple(e.signature for e in engines)
                if key in seen:
                    continue
                seen.add(key)
                sets.append((watch.upstream_name, engines))
            single = watches[0] if len(watches) == 1 and not self.other_ports else None
            self.rbac_state = RbacState(tuple(sets), single.port if single else None,
                                        single.host if single else None)

    def describe(self) -> Dict[str, Any]:
        return {"kind": self.kind, "ports": [w.describe() for w in self.ports.values()],
                "other_ports": list(self.other_ports), "live_switches": self.switches}


# -- server credentials (mTLS with rotation) -------------------------------------------------


def dynamic_server_credentials(tls: Any) -> Any:
    """grpc SSL server credentials that hand each new handshake the current
    workload certificate (grpc calls the fetcher per handshake; a changed
    provider generation returns the new configuration)."""
    import grpc

    identity = providers.get(tls.identity.instance)
    ca_provider = providers.get(tls.ca.instance) if tls.ca is not None else None
    if identity is None:
        raise providers.CertificateUnavailable(providers.why_unknown(tls.identity.instance))

    def config() -> Tuple[Any, Tuple[int, int]]:
        material = identity.material()
        ca = ca_provider.material() if ca_provider is not None else None
        return (grpc.ssl_server_certificate_configuration([(material.key_pem, material.chain_pem)],
                                                          root_certificates=ca.ca_pem if ca else None),
                (material.generation, ca.generation if ca else 0))

    initial, generation = config()
    state = {"generation": generation}

    def fetch() -> Any:
        try:
            current, gen = config()
        except Exception as exc:  # keep serving with the last good certificate
            log.warning("meshpatch: server certificate refresh failed: %s", exc)
            return None
        if gen == state["generation"]:
            return None
        state["generation"] = gen
        return current

    return grpc.dynamic_ssl_server_credentials(initial, fetch,
                                               require_client_authentication=tls.require_client_certificate)


# -- per-call RBAC ------------------------------------------------------------------------


def _peer_ip(peer: str) -> Optional[str]:
    if peer.startswith("ipv4:"):
        return peer[5:].rsplit(":", 1)[0]
    if peer.startswith("ipv6:"):
        return peer[5:].rsplit(":", 1)[0].strip("[]")
    return None


def rbac_request(method: str, metadata: Any, context: Any, state: RbacState) -> rbac.RbacRequest:
    headers: Dict[str, str] = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            import base64

            value = base64.b64encode(value).decode("ascii")
        key = key.lower()
        headers[key] = f"{headers[key]},{value}" if key in headers else value
    headers[":method"] = "POST"
    headers[":path"] = method
    headers["content-type"] = "application/grpc"
    try:
        host = context._rpc_event.call_details.host  # :authority; grpcio exposes it only here
        if host:
            headers[":authority"] = host.decode() if isinstance(host, bytes) else host
    except AttributeError:
        pass
    try:
        auth = context.auth_context() or {}
    except Exception:
        auth = {}

    def values(key: str) -> List[str]:
        return [v.decode() if isinstance(v, bytes) else v for v in auth.get(key, [])]

    authenticated = "ssl" in values("transport_security_type")
    principals = values("peer_uri") or values("peer_dns") or [s for s in values("x509_subject") if s] or [""]
    try:
        peer = context.peer() or ""
    except Exception:
        peer = ""
    return rbac.RbacRequest(method, headers, authenticated, principals, _peer_ip(peer), state.local_ip,
                            state.local_port)


def check(state: RbacState, method: str, metadata: Any, context: Any) -> Optional[str]:
    """The denial reason for a call, or None; counts the outcome."""
    request = rbac_request(method, metadata, context, state)
    for listener, engines in state.engine_sets:
        reason = rbac.evaluate(engines, request)
        rbac.COUNTERS.count(listener, method, reason)
        if reason is not None:
            log.debug("meshpatch: RBAC denied %s from %s: %s", method, request.principals, reason)
            return reason
    return None


# -- registry (status) -----------------------------------------------------------------------

_servers: List[Any] = []


def register(managed: ManagedServer) -> None:
    import weakref

    _servers.append(weakref.ref(managed))


def status() -> List[Dict[str, Any]]:
    out = []
    for ref in list(_servers):
        managed = ref()
        if managed is not None and not managed._closed:
            out.append(managed.describe())
    return out
