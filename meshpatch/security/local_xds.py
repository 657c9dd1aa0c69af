"""An in-process xDS server that hands grpc-core its own mTLS for mesh sub-channels.

Why.  grpcio's ``ssl_channel_credentials`` cannot talk to a mesh workload: its
hostname check looks only at DNS/IP SANs (grpcio 1.85: "Hostname Verification
Check failed" against a URI-only SPIFFE certificate, whatever
``grpc.ssl_target_name_override`` says) and Python has no custom verifier.
grpc-core's *xDS* credentials do what Istio's proxyless mode needs —
file_watcher certificates and SAN matching from the cluster's
UpstreamTlsContext (A29) — but take that configuration from an xDS server.
So meshpatch runs a tiny one in-process, on a private Unix socket, serving per
(endpoint, cluster TLS config) a Listener / Cluster / ClusterLoadAssignment
with that one endpoint and the cluster's TLS settings.  meshpatch still picks
the endpoint per RPC; the sub-channel to it is ``xds:///<name>`` with xds
credentials, so the TLS handshake and the SPIFFE check are grpc-core's own, on
the very connection the RPCs use.

Nothing here talks to istio-agent: the upstream stays one ADS stream per
process (meshpatch's own).  grpc-core is pointed at this server per channel
with the channel argument ``grpc.TEST_ONLY_DO_NOT_USE_IN_PROD.xds_bootstrap_config``
(a per-channel bootstrap; grpc's name for it says "test only", but it is the
only way to give one channel its own xDS server without touching the
process-wide ``GRPC_XDS_BOOTSTRAP`` that the app's own ``xds:///`` channels use;
the grpc security tests fail if a grpcio upgrade drops it).

Cost: each mTLS sub-channel gets its own grpc-core XdsClient with one local
stream (a worker thread and a reader thread here) and its own file_watcher,
and its first RPC waits for a local LDS→CDS→EDS round (~10-30 ms).  grpc-core
re-reads certificates every ``min(refresh_interval, CERT_POLL)`` seconds;
meshpatch also opens a new sub-channel when a certificate generation changes,
so new connections use a rotated certificate at once.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import json
import logging
import os
import queue
import shutil
import tempfile
import threading
from typing import Any, Dict, Iterator, List, Optional, Tuple

from envoy.service.discovery.v3 import ads_pb2_grpc

from meshpatch.internal import suppress_current_context, suppressed
from meshpatch.security import providers
from meshpatch.security.model import UpstreamTls
from meshpatch.xds.server_stream import pump_requests

log = logging.getLogger("meshpatch.security")

BOOTSTRAP_ARG = "grpc.TEST_ONLY_DO_NOT_USE_IN_PROD.xds_bootstrap_config"
#: Upper bound (seconds) for grpc-core's certificate refresh interval.
CERT_POLL = 5.0

_PREFIX = "type.googleapis.com/"
LDS = _PREFIX + "envoy.config.listener.v3.Listener"
RDS = _PREFIX + "envoy.config.route.v3.RouteConfiguration"
CDS = _PREFIX + "envoy.config.cluster.v3.Cluster"
EDS = _PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
_TYPES = (LDS, RDS, CDS, EDS)
_END = object()
_PUSH = object()


class _Stream:
    __slots__ = ("events", "subscriptions", "sent")

    def __init__(self) -> None:
        self.events: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self.subscriptions: Dict[str, Tuple[str, ...]] = {}
        self.sent: Dict[str, Dict[str, int]] = {}


class LocalXds:
    """The server and its resources; one per process, started on first use."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resources: Dict[str, Dict[str, Tuple[int, Any]]] = {t: {} for t in _TYPES}
        self._serial = itertools.count(1)
        self._nonce = itertools.count(1)
        self._streams: List[_Stream] = []
        self._server: Any = None
        self._dir: Optional[str] = None
        self.address = ""
        self.nacks: Dict[str, str] = {}  # resource type → last NACK from grpc-core
        self.streams_opened = 0

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._server is not None:
                return
            import grpc

            self._dir = tempfile.mkdtemp(prefix="meshpatch-xds-")
            path = os.path.join(self._dir, "xds.sock")
            with suppressed():
                server = grpc.server(_DaemonExecutor(), options=[("grpc.so_reuseport", 0)])
                ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(_Servicer(self), server)
                if not server.add_insecure_port(f"unix:{path}"):
                    raise OSError(f"meshpatch: cannot bind the local xDS server to {path}")
                server.start()
            self._server = server
            self.address = f"unix:{path}"
            atexit.register(self.stop)

    def stop(self) -> None:
        server, self._server = self._server, None
        for stream in list(self._streams):
            stream.events.put(_END)
        if server is not None:
            try:
                server.stop(None)
            except Exception:  # interpreter shutting down
                pass
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def bootstrap(self) -> str:
        """The bootstrap JSON grpc-core gets for the channels using this server."""
        self.start()
        # Rebuilt each time (cheap, once per new sub-channel): the providers may
        # have been reconfigured since.
        return json.dumps({
            "xds_servers": [{"server_uri": self.address, "channel_creds": [{"type": "insecure"}],
                             "server_features": ["xds_v3"]}],
            "node": {"id": f"meshpatch-local~{os.getpid()}", "metadata": {"GENERATOR": "grpc"}},
            "certificate_providers": providers.bootstrap_section(poll_cap=CERT_POLL),
        }, sort_keys=True)

    # -- resources -------------------------------------------------------------

    def set(self, type_url: str, name: str, message: Any) -> None:
        """Add or replace (``message`` None: remove) one resource and push it."""
        with self._lock:
            table = self._resources[type_url]
            if message is None:
                if table.pop(name, None) is None:
                    return
            else:
                current = table.get(name)
                if current is not None and current[1] == message:
                    return
                table[name] = (next(self._serial), message)
            streams = list(self._streams)
        for stream in streams:
            stream.events.put(_PUSH)

    def has(self, type_url: str, name: str) -> bool:
        return name in self._resources[type_url]

    def _answer(self, stream: _Stream, type_url: str, force: bool) -> Optional[Any]:
        """A response for ``type_url`` if the stream's view of it is stale."""
        from envoy.service.discovery.v3 import discovery_pb2

        names = stream.subscriptions.get(type_url)
        if names is None:
            return None
        with self._lock:
            table = self._resources[type_url]
            current = {n: table[n] for n in names if n in table}
        view = {n: serial for n, (serial, _) in current.items()}
        if not force and stream.sent.get(type_url) == view:
            return None
        stream.sent[type_url] = view
        response = discovery_pb2.DiscoveryResponse(type_url=type_url, version_info=str(next(self._serial)),
                                                   nonce=str(next(self._nonce)))
        for name in sorted(current):
            response.resources.add().Pack(current[name][1])
        return response

    # -- client side -----------------------------------------------------------

    def client_channel(self, address: str, port: int, tls: UpstreamTls) -> Tuple[str, List[Tuple[str, Any]]]:
        """(target, extra channel options) for an xds-credentials sub-channel to
        one endpoint under one cluster TLS config."""
        digest = hashlib.sha256(f"{address}|{port}|{tls.key}".encode()).hexdigest()[:24]
        name = f"meshpatch-ep-{digest}"
        if not self.has(LDS, name):
            listener, cluster, cla = _client_resources(name, address, port, tls)
            self.set(CDS, name, cluster)
            self.set(EDS, name, cla)
            self.set(LDS, name, listener)
        return f"xds:///{name}", [(BOOTSTRAP_ARG, self.bootstrap())]


def _client_resources(name: str, address: str, port: int, tls: UpstreamTls) -> Tuple[Any, Any, Any]:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.extensions.filters.http.router.v3 import router_pb2
    from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

    hcm = hcm_pb2.HttpConnectionManager()
    vhost = hcm.route_config.virtual_hosts.add(name=name, domains=["*"])
    route = vhost.routes.add()
    route.match.prefix = ""
    route.route.cluster = name
    hcm.http_filters.add(name="envoy.filters.http.router").typed_config.Pack(router_pb2.Router())
    listener = listener_pb2.Listener(name=name)
    listener.api_listener.api_listener.Pack(hcm)

    cluster = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS)
    cluster.eds_cluster_config.service_name = name
    cluster.eds_cluster_config.eds_config.ads.SetInParent()
    cluster.transport_socket.name = "envoy.transport_sockets.tls"
    cluster.transport_socket.typed_config.Pack(upstream_tls_context(tls))

    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    group = cla.endpoints.add()
    group.locality.region = "meshpatch"  # gRPC drops localities without a weight
    group.load_balancing_weight.value = 1
    lb = group.lb_endpoints.add()
    lb.health_status = 1  # HEALTHY
    lb.endpoint.address.socket_address.address = address
    lb.endpoint.address.socket_address.port_value = port
    return listener, cluster, cla


def upstream_tls_context(tls: UpstreamTls) -> Any:
    """The UpstreamTlsContext for grpc-core (current fields only)."""
    from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

    context = tls_pb2.UpstreamTlsContext()
    common = context.common_tls_context
    if tls.identity is not None:
        common.tls_certificate_provider_instance.instance_name = tls.identity.instance
        common.tls_certificate_provider_instance.certificate_name = tls.identity.certificate
    validation = common.combined_validation_context.default_validation_context
    validation.ca_certificate_provider_instance.instance_name = tls.ca.instance
    validation.ca_certificate_provider_instance.certificate_name = tls.ca.certificate
    san_types = {"EMAIL": 1, "DNS": 2, "URI": 3, "IP": 4}
    for matcher in tls.sans:
        if matcher.san_type:
            typed = validation.match_typed_subject_alt_names.add(san_type=san_types[matcher.san_type])
            target = typed.matcher
        else:
            target = validation.match_subject_alt_names.add()
        if matcher.kind == "regex":
            target.safe_regex.regex = matcher.value
        else:
            setattr(target, matcher.kind, matcher.value)
            target.ignore_case = matcher.ignore_case
    return context


class _DaemonExecutor:
    """A thread per stream, daemonic: a ThreadPoolExecutor's workers are joined
    at interpreter exit, and a stream worker waits for events forever, so the
    app would never exit."""

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from concurrent.futures import Future

        future: Future = Future()

        def run() -> None:
            suppress_current_context()
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to grpc like a pool would
                future.set_exception(exc)

        threading.Thread(target=run, name="meshpatch-local-xds", daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, **kwargs: Any) -> None:
        pass


class _Servicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
    """SotW ADS: answer each new subscription; push when a subscribed resource changes."""

    def __init__(self, owner: LocalXds) -> None:
        self._owner = owner

    def StreamAggregatedResources(self, request_iterator: Any, context: Any) -> Iterator[Any]:
        owner = self._owner
        stream = _Stream()
        with owner._lock:
            owner._streams.append(stream)
            owner.streams_opened += 1
        pump_requests(request_iterator, context, stream.events, _END, "meshpatch-local-xds-reader")
        try:
            while True:
                event = stream.events.get()
                if event is _END:
                    return
                if event is _PUSH:
                    for type_url in _TYPES:
                        response = owner._answer(stream, type_url, force=False)
                        if response is not None:
                            yield response
                    continue
                if event.HasField("error_detail"):
                    message = event.error_detail.message
                    if owner.nacks.get(event.type_url) != message:
                        log.warning("meshpatch: grpc-core rejected local %s config: %s",
                                    event.type_url.rsplit(".", 1)[-1], message)
                    owner.nacks[event.type_url] = message
                    continue
                names = tuple(sorted(event.resource_names))
                changed = stream.subscriptions.get(event.type_url) != names
                stream.subscriptions[event.type_url] = names
                if changed or not event.response_nonce:
                    response = owner._answer(stream, event.type_url, force=True)
                    if response is not None:
                        yield response
        finally:
            with owner._lock:
                if stream in owner._streams:
                    owner._streams.remove(stream)


_local: Optional[LocalXds] = None
_local_lock = threading.Lock()


def get() -> LocalXds:
    global _local
    local = _local
    if local is None:
        with _local_lock:
            local = _local
            if local is None:
                local = _local = LocalXds()
    return local


def channel_credentials() -> Any:
    """xds credentials; the fallback is never used (every cluster served here has TLS)."""
    import grpc
    import grpc.experimental

    return grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())


def _after_fork_in_child() -> None:
    # The parent's server threads do not exist here; start a fresh one on demand.
    global _local, _local_lock
    _local_lock = threading.Lock()
    _local = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
