"""Builders for the security parts of envoy v3 resources, shaped like istiod's
(``grpcgen`` ``buildCommonTLSContext`` and ``buildInboundListeners``), for
protocol-level tests."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_http_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2

TLS = "envoy.transport_sockets.tls"
INBOUND_PREFIX = "xds.istio.io/grpc/lds/inbound/"


def common_tls_context(sans: Sequence[str] = (), *, instance: str = "default", new_fields: bool = True,
                       deprecated_fields: bool = True, identity: bool = True) -> tls_pb2.CommonTlsContext:
    """istiod ≥ 1.29 sends both the current and the deprecated provider fields."""
    c = tls_pb2.CommonTlsContext()
    if identity and new_fields:
        c.tls_certificate_provider_instance.instance_name = instance
        c.tls_certificate_provider_instance.certificate_name = "default"
    if identity and deprecated_fields:
        c.tls_certificate_certificate_provider_instance.instance_name = instance
        c.tls_certificate_certificate_provider_instance.certificate_name = "default"
    combined = c.combined_validation_context
    if deprecated_fields:
        combined.validation_context_certificate_provider_instance.instance_name = instance
        combined.validation_context_certificate_provider_instance.certificate_name = "ROOTCA"
    dvc = combined.default_validation_context
    dvc.SetInParent()
    for san in sans:
        dvc.match_subject_alt_names.add(exact=san)
    if new_fields:
        dvc.ca_certificate_provider_instance.instance_name = instance
        dvc.ca_certificate_provider_instance.certificate_name = "ROOTCA"
    return c


def with_upstream_tls(cluster: cluster_pb2.Cluster, sans: Sequence[str] = (), **kwargs: object) -> cluster_pb2.Cluster:
    ctx = tls_pb2.UpstreamTlsContext(common_tls_context=common_tls_context(sans, **kwargs))  # type: ignore[arg-type]
    cluster.transport_socket.name = TLS
    cluster.transport_socket.typed_config.Pack(ctx)
    return cluster


def downstream_tls_context(*, instance: str = "default", require_client_certificate: bool = True,
                           **kwargs: object) -> tls_pb2.DownstreamTlsContext:
    ctx = tls_pb2.DownstreamTlsContext(common_tls_context=common_tls_context((), instance=instance, **kwargs))  # type: ignore[arg-type]
    ctx.require_client_certificate.value = require_client_certificate
    return ctx


def rbac_filter(action: str, policies: Dict[str, rbac_pb2.Policy], name: Optional[str] = None) -> hcm_pb2.HttpFilter:
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.Action.Value(action))
    for key, policy in policies.items():
        rules.policies[key].CopyFrom(policy)
    f = hcm_pb2.HttpFilter(name=name or ("envoy.filters.http.rbac.DENY" if action == "DENY" else "envoy.filters.http.rbac"))
    f.typed_config.Pack(rbac_http_pb2.RBAC(rules=rules))
    return f


def policy(permissions: Iterable[rbac_pb2.Permission] = (), principals: Iterable[rbac_pb2.Principal] = ()) -> rbac_pb2.Policy:
    p = rbac_pb2.Policy()
    p.permissions.extend(list(permissions) or [rbac_pb2.Permission(any=True)])
    p.principals.extend(list(principals) or [rbac_pb2.Principal(any=True)])
    return p


def principal_spiffe(spiffe: str) -> rbac_pb2.Principal:
    p = rbac_pb2.Principal()
    p.authenticated.principal_name.exact = spiffe
    return p


def permission_path(path: str, kind: str = "exact") -> rbac_pb2.Permission:
    p = rbac_pb2.Permission()
    setattr(p.url_path.path, kind, path)
    return p


def inbound_listener(address: str, port: int, *, tls: Optional[tls_pb2.DownstreamTlsContext] = None,
                     filters: Sequence[hcm_pb2.HttpFilter] = (), name: Optional[str] = None) -> listener_pb2.Listener:
    """istiod's inbound listener for proxyless gRPC servers (lds.go buildInboundListeners)."""
    hcm = hcm_pb2.HttpConnectionManager()
    rc = hcm.route_config
    rc.name = "inbound"
    vh = rc.virtual_hosts.add(domains=["*"])
    route = vh.routes.add()
    route.match.prefix = "/"
    route.non_forwarding_action.SetInParent()
    hcm.http_filters.extend(list(filters))
    router = hcm.http_filters.add(name="envoy.filters.http.router")
    router.typed_config.Pack(router_pb2.Router())
    suffix = "mtls" if tls is not None else "plaintext"
    lis = listener_pb2.Listener(name=name or f"{INBOUND_PREFIX}{address}:{port}")
    lis.address.socket_address.address = address
    lis.address.socket_address.port_value = port
    chain = lis.filter_chains.add(name=f"inbound-{suffix}")
    chain.filters.add(name=f"inbound-hcm{suffix}").typed_config.Pack(hcm)
    if tls is not None:
        chain.transport_socket.name = TLS
        chain.transport_socket.typed_config.Pack(tls)
    return lis


__all__: List[str] = [
    "common_tls_context", "with_upstream_tls", "downstream_tls_context", "rbac_filter", "policy",
    "principal_spiffe", "permission_path", "inbound_listener", "INBOUND_PREFIX", "TLS",
]
