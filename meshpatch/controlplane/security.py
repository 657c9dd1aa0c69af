"""Security translation, shaped like istiod's proxyless-gRPC generator.

* DestinationRule ``tls.mode: ISTIO_MUTUAL`` → the cluster's transport_socket
  ``envoy.transport_sockets.tls`` with an UpstreamTlsContext naming the
  bootstrap's ``default`` certificate provider (identity ``default``, CA
  ``ROOTCA``) in both the current and the deprecated fields (istiod ≥ 1.29,
  ``grpcgen.buildCommonTLSContext``) and SAN matchers for the destination
  service's accounts (``spiffe://cluster.local/ns/<ns>/sa/<sa>``: ServiceEntry
  ``subjectAltNames`` + its endpoints' ``serviceAccount``).  No auto-mTLS: other
  modes leave the cluster plaintext, as istiod does for proxyless clients.
* Inbound listeners ``xds.istio.io/grpc/lds/inbound/IP:port`` (``lds.go``
  ``buildInboundListeners``) for the workload that asks: its service instance
  on that port (a ServiceEntry / WorkloadEntry endpoint at the node's IP whose
  target port is the port; none → no listener, as istiod), the mTLS mode from
  PeerAuthentication (mesh → namespace → workload → port; PERMISSIVE is
  plaintext unless the workload carries ``security.istio.io/tlsMode=istio``),
  and RBAC filters from AuthorizationPolicy (DENY filter, then ALLOW filter,
  policies ``<ns>-<name>-<rule index>``, built like istiod's authz model).

Deviation from istiod, on purpose: an ALLOW policy without rules ("allow
nothing") becomes an ALLOW filter with no policies, i.e. deny everything, as
Istio documents and sidecars enforce; istiod's grpc generator drops the filter
(and so allows everything) in that case.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

from google.protobuf import wrappers_pb2

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_http_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.type.matcher.v3 import metadata_pb2, path_pb2, string_pb2

from .snapshot import ROOT_NAMESPACE, DOMAIN_SUFFIX, Endpoint, ProxyNode, Service, Snapshot

log = logging.getLogger("meshpatch.controlplane")

INBOUND_LISTENER_PREFIX = "xds.istio.io/grpc/lds/inbound/"
TLS_SOCKET = "envoy.transport_sockets.tls"
RBAC_FILTER = "envoy.filters.http.rbac"
RBAC_FILTER_DENY = "envoy.filters.http.rbac.DENY"
ROUTER_FILTER = "envoy.filters.http.router"
TLS_MODE_LABEL = "security.istio.io/tlsMode"
TRUST_DOMAIN = DOMAIN_SUFFIX
SPIFFE_PREFIX = "spiffe://"


def spiffe_uri(namespace: str, service_account: str) -> str:
    return f"{SPIFFE_PREFIX}{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


# --------------------------------------------------------------------------- client side (CDS)


def common_tls_context(sans: Sequence[str]) -> tls_pb2.CommonTlsContext:
    """grpcgen.buildCommonTLSContext: current and deprecated provider fields."""
    common = tls_pb2.CommonTlsContext()
    common.tls_certificate_provider_instance.instance_name = "default"
    common.tls_certificate_provider_instance.certificate_name = "default"
    common.tls_certificate_certificate_provider_instance.instance_name = "default"
    common.tls_certificate_certificate_provider_instance.certificate_name = "default"
    combined = common.combined_validation_context
    combined.validation_context_certificate_provider_instance.instance_name = "default"
    combined.validation_context_certificate_provider_instance.certificate_name = "ROOTCA"
    validation = combined.default_validation_context
    for san in sans:
        validation.match_subject_alt_names.add(exact=san)
    validation.ca_certificate_provider_instance.instance_name = "default"
    validation.ca_certificate_provider_instance.certificate_name = "ROOTCA"
    return common


def service_accounts(svc: Service) -> List[str]:
    """push.ServiceAccounts for a ServiceEntry: its subjectAltNames plus the
    SPIFFE URIs of its endpoints' service accounts, sorted."""
    accounts = set(svc.entry.subject_alt_names if svc.entry is not None else ())
    for ep in svc.endpoints:
        if ep.service_account:
            accounts.add(spiffe_uri(ep.namespace, ep.service_account))
    return sorted(accounts)


def apply_tls(cluster: cluster_pb2.Cluster, tls: Optional[Dict[str, Any]], svc: Service, node: ProxyNode) -> cluster_pb2.Cluster:
    """cds.go applyTLS: only ISTIO_MUTUAL is translated for proxyless clients."""
    mode = str((tls or {}).get("mode") or "DISABLE").upper()
    if mode == "ISTIO_MUTUAL":
        context = tls_pb2.UpstreamTlsContext(common_tls_context=common_tls_context(service_accounts(svc)))
        cluster.transport_socket.name = TLS_SOCKET
        cluster.transport_socket.typed_config.Pack(context)
    elif mode in ("SIMPLE", "MUTUAL"):
        log.info("meshpatch control plane: DestinationRule tls.mode %s for %s is not translated for proxyless "
                 "clients (istiod neither); the cluster stays plaintext", mode, cluster.name)
    elif mode != "DISABLE":
        log.warning("meshpatch control plane: unknown DestinationRule tls.mode %r for %s (node %s)", mode,
                    cluster.name, node.id)
    return cluster


# --------------------------------------------------------------------------- server side (LDS)


def _parse_inbound(name: str) -> Optional[Tuple[str, int]]:
    address = name[len(INBOUND_LISTENER_PREFIX):]
    if address.startswith("["):
        host, _, port = address[1:].partition("]:")
    else:
        host, _, port = address.rpartition(":")
    if not port.isdigit():
        return None
    return host, int(port)


def service_instance(snap: Snapshot, node: ProxyNode, port: int) -> Optional[Tuple[Service, Endpoint]]:
    """The node's endpoint whose target port is ``port`` (istiod keys service
    instances by endpoint port); the node is found by its IP."""
    for svc in snap.services_sorted():
        for ep in svc.endpoints:
            if ep.address != node.ip:
                continue
            for service_port in svc.ports:
                if ep.port_for(service_port) == port:
                    return svc, ep
    return None


def workload_labels(node: ProxyNode, endpoint: Optional[Endpoint]) -> Dict[str, str]:
    labels = dict(endpoint.labels) if endpoint is not None else {}
    labels.update(node.label_map)
    return labels


def _selects(selector: Optional[Dict[str, str]], labels: Dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def mtls_mode(snap: Snapshot, namespace: str, labels: Dict[str, str], port: int) -> str:
    """PeerAuthentication for one workload port: mesh → namespace → workload → port,
    UNSET inherits; PERMISSIVE when nothing says otherwise."""
    policies = getattr(snap.config, "peer_authentications", [])
    mode = "PERMISSIVE"
    for pa in policies:
        if pa.meta.namespace == ROOT_NAMESPACE and not pa.selector and pa.mode != "UNSET":
            mode = pa.mode
            break
    for pa in policies:
        if pa.meta.namespace == namespace and not pa.selector and pa.mode != "UNSET":
            mode = pa.mode
            break
    for pa in policies:
        if pa.meta.namespace == namespace and pa.selector and _selects(pa.selector, labels):
            if pa.mode != "UNSET":
                mode = pa.mode
            port_mode = pa.port_modes.get(port, "UNSET")
            if port_mode != "UNSET":
                mode = port_mode
            break
    return mode


def authorization_policies(snap: Snapshot, namespace: str, labels: Dict[str, str]) -> Tuple[List[Any], List[Any]]:
    """(DENY policies, ALLOW policies) for a workload: the root namespace's and
    its own namespace's, selector permitting; AUDIT/CUSTOM and targetRef
    policies do not apply to proxyless servers."""
    deny, allow = [], []
    for policy in getattr(snap.config, "authorization_policies", []):
        if policy.meta.namespace not in (ROOT_NAMESPACE, namespace) or policy.target_refs:
            continue
        if policy.selector is not None and not _selects(policy.selector, labels):
            continue
        if policy.action == "DENY":
            deny.append(policy)
        elif policy.action == "ALLOW":
            allow.append(policy)
    return deny, allow


def build_inbound_listeners(snap: Snapshot, node: ProxyNode, names: Sequence[str]) -> List[Tuple[str, listener_pb2.Listener]]:
    out = []
    for name in names:
        parsed = _parse_inbound(name)
        if parsed is None:
            log.error("meshpatch control plane: cannot parse the address of inbound listener %s", name)
            continue
        host, port = parsed
        instance = service_instance(snap, node, port)
        if instance is None:
            log.warning("meshpatch control plane: %s has no service instance for port %d", node.id, port)
            continue
        _, endpoint = instance
        labels = workload_labels(node, endpoint)
        mode = mtls_mode(snap, node.namespace, labels, port)
        if labels.get(TLS_MODE_LABEL) == "istio" and mode == "PERMISSIVE":
            mode = "STRICT"  # clients will use mTLS (auto-mTLS label); gRPC servers have no PERMISSIVE
        if mode == "PERMISSIVE":
            mode = "DISABLE"
        tls = None
        if mode == "STRICT":
            tls = tls_pb2.DownstreamTlsContext(common_tls_context=common_tls_context(()),
                                               require_client_certificate=wrappers_pb2.BoolValue(value=True))
        listener = listener_pb2.Listener(
            name=name,
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port)),
        )
        listener.filter_chains.append(_inbound_chain(snap, node, labels, "mtls" if tls is not None else "plaintext", tls))
        out.append((name, listener))
    return out


def _inbound_chain(snap: Snapshot, node: ProxyNode, labels: Dict[str, str], suffix: str,
                   tls: Optional[tls_pb2.DownstreamTlsContext]) -> listener_components_pb2.FilterChain:
    filters: List[hcm_pb2.HttpFilter] = []
    deny, allow = authorization_policies(snap, node.namespace, labels)
    if deny or allow:
        rules = build_rbac(rbac_pb2.RBAC.DENY, deny)
        if rules.policies:
            f = hcm_pb2.HttpFilter(name=RBAC_FILTER_DENY)
            f.typed_config.Pack(rbac_http_pb2.RBAC(rules=rules))
            filters.append(f)
        if allow:
            f = hcm_pb2.HttpFilter(name=RBAC_FILTER)
            f.typed_config.Pack(rbac_http_pb2.RBAC(rules=build_rbac(rbac_pb2.RBAC.ALLOW, allow)))
            filters.append(f)
    router = hcm_pb2.HttpFilter(name=ROUTER_FILTER)
    router.typed_config.Pack(router_pb2.Router())
    filters.append(router)
    hcm = hcm_pb2.HttpConnectionManager(http_filters=filters)
    hcm.route_config.name = "inbound"
    vhost = hcm.route_config.virtual_hosts.add(domains=["*"])
    route = vhost.routes.add()
    route.match.prefix = "/"
    route.non_forwarding_action.SetInParent()
    chain = listener_components_pb2.FilterChain(name=f"inbound-{suffix}")
    chain.filters.add(name=f"inbound-hcm{suffix}").typed_config.Pack(hcm)
    if tls is not None:
        chain.transport_socket.name = TLS_SOCKET
        chain.transport_socket.typed_config.Pack(tls)
    return chain


# --------------------------------------------------------------------------- AuthorizationPolicy → RBAC


class _Skip(Exception):
    """A value that cannot be translated (istiod: an error for this rule)."""


def build_rbac(action: int, policies: Sequence[Any]) -> rbac_pb2.RBAC:
    rules = rbac_pb2.RBAC(action=action)
    for policy in policies:
        for index, rule in enumerate(policy.rules):
            name = f"{policy.meta.namespace}-{policy.meta.name}-{index}"
            try:
                generated = _generate(policy, rule, action)
            except _Skip as exc:
                log.warning("meshpatch control plane: AuthorizationPolicy %s/%s rule %d skipped: %s",
                            policy.meta.namespace, policy.meta.name, index, exc)
                continue
            rules.policies[name].CopyFrom(generated)
    return rules


def _string(value: str, prefix: str = "") -> string_pb2.StringMatcher:
    """Istio's StringMatcherWithPrefix: ``*`` any, ``*x`` suffix, ``x*`` prefix, else exact."""
    if value == "*":
        return string_pb2.StringMatcher(safe_regex=_regex(".*"))
    if value.startswith("*"):
        return string_pb2.StringMatcher(suffix=prefix + value[1:])
    if value.endswith("*"):
        return string_pb2.StringMatcher(prefix=prefix + value[:-1])
    return string_pb2.StringMatcher(exact=prefix + value)


def _regex(pattern: str) -> Any:
    from envoy.type.matcher.v3 import regex_pb2

    return regex_pb2.RegexMatcher(regex=pattern)


def _header_matcher(name: str, value: str) -> rc.HeaderMatcher:
    if value == "*":
        return rc.HeaderMatcher(name=name, present_match=True)
    return rc.HeaderMatcher(name=name, string_match=_string(value))


def _authenticated(matcher: string_pb2.StringMatcher) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=matcher))


def _cidr(value: str) -> Any:
    from envoy.config.core.v3 import address_pb2 as core_address

    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise _Skip(f"{value!r} is not an IP address or CIDR") from None
    return core_address.CidrRange(address_prefix=str(network.network_address),
                                  prefix_len=wrappers_pb2.UInt32Value(value=network.prefixlen))


def _principal_for(key: str, value: str, policy: Any) -> rbac_pb2.Principal:
    if key == "source.principal":
        return _authenticated(_string(value, SPIFFE_PREFIX))
    if key == "source.namespace":
        return _authenticated(string_pb2.StringMatcher(safe_regex=_regex(f".*/ns/{value.replace('*', '.*')}/.*")))
    if key == "source.serviceAccount":
        ns, sep, sa = value.partition("/")
        if not sep:
            ns, sa = policy.meta.namespace, value
        return _authenticated(string_pb2.StringMatcher(safe_regex=_regex(f"spiffe://.+/ns/{ns}/(.+/|)sa/{sa}(/.+)?")))
    if key == "source.ip":
        return rbac_pb2.Principal(direct_remote_ip=_cidr(value))
    if key == "remote.ip":
        return rbac_pb2.Principal(remote_ip=_cidr(value))
    for prefix in ("request.headers[", "request.experimental.inline.headers["):
        if key.startswith(prefix) and key.endswith("]"):
            return rbac_pb2.Principal(header=_header_matcher(key[len(prefix):-1], value))
    if key in ("request.auth.principal", "request.auth.audiences", "request.auth.presenter") or \
            key.startswith("request.auth.claims["):
        # JWT attributes live in Envoy dynamic metadata, which gRPC never has (A41).
        return rbac_pb2.Principal(metadata=metadata_pb2.MetadataMatcher(
            filter="istio_authn", path=[metadata_pb2.MetadataMatcher.PathSegment(key=key)],
            value=_value_matcher(value)))
    raise _Skip(f"unknown attribute {key}")


def _value_matcher(value: str) -> Any:
    from envoy.type.matcher.v3 import value_pb2

    return value_pb2.ValueMatcher(string_match=_string(value))


def _permission_for(key: str, value: str) -> rbac_pb2.Permission:
    if key == "destination.port":
        if not value.isdigit() or int(value) > 65535:
            raise _Skip(f"invalid port {value!r}")
        return rbac_pb2.Permission(destination_port=int(value))
    if key == "destination.ip":
        return rbac_pb2.Permission(destination_ip=_cidr(value))
    if key == "connection.sni":
        return rbac_pb2.Permission(requested_server_name=_string(value))
    if key == ":path":
        if "{" in value:
            raise _Skip(f"path templates ({value!r}) are not supported by gRPC")
        return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=_string(value)))
    if key == ":method":
        return rbac_pb2.Permission(header=_header_matcher(":method", value))
    if key == ":authority":
        matcher = _string(value)
        matcher.ignore_case = True
        return rbac_pb2.Permission(header=rc.HeaderMatcher(name=":authority", string_match=matcher))
    raise _Skip(f"unknown attribute {key}")


_PERMISSION_KEYS = ("destination.ip", "destination.port", "connection.sni")
_PRINCIPAL_KEYS = ("source.ip", "remote.ip", "source.namespace", "source.serviceAccount", "source.principal",
                   "request.auth.principal", "request.auth.audiences", "request.auth.presenter")


def _known_attribute(key: str) -> bool:
    return (key in _PERMISSION_KEYS or key in _PRINCIPAL_KEYS or key.startswith("experimental.envoy.filters.")
            or (key.startswith(("request.headers[", "request.auth.claims[", "request.experimental.inline.headers["))
                and key.endswith("]")))


def _generate(policy: Any, rule: Any, action: int) -> rbac_pb2.Policy:
    """authz model.New + Generate(forTCP=false, useAuthenticated=true)."""
    lenient = action != rbac_pb2.RBAC.ALLOW  # DENY: drop untranslatable values (wider); ALLOW: skip the rule
    for condition in rule.when:
        if not _known_attribute(condition.key):
            raise _Skip(f"unknown attribute {condition.key}")
    base_permission: List[Tuple[str, List[str], List[str]]] = []
    base_principal: List[Tuple[str, List[str], List[str]]] = []
    for condition in rule.when:
        target = base_permission if condition.key in _PERMISSION_KEYS or condition.key.startswith("experimental.") \
            else base_principal
        target.append((condition.key, condition.values, condition.not_values))
    principals = []
    for source in (rule.sources if rule.has_from else [None]):
        items = []
        if source is not None:
            for key, values, not_values in (
                ("source.principal", source.principals, source.not_principals),
                ("request.auth.principal", source.request_principals, source.not_request_principals),
                ("source.serviceAccount", source.service_accounts, source.not_service_accounts),
                ("source.namespace", source.namespaces, source.not_namespaces),
                ("remote.ip", source.remote_ip_blocks, source.not_remote_ip_blocks),
                ("source.ip", source.ip_blocks, source.not_ip_blocks),
            ):
                if values or not_values:
                    items.append((key, values, not_values))
        items.extend(base_principal)
        principals.append(_principal_and([p for key, values, not_values in items
                                          for p in _rule_matchers(key, values, not_values, policy, lenient, False)]))
    permissions = []
    for operation in (rule.operations if rule.has_to else [None]):
        items = []
        if operation is not None:
            for key, values, not_values in (
                (":authority", operation.hosts, operation.not_hosts),
                (":method", operation.methods, operation.not_methods),
                (":path", operation.paths, operation.not_paths),
                ("destination.port", operation.ports, operation.not_ports),
            ):
                if values or not_values:
                    items.append((key, values, not_values))
        items.extend(base_permission)
        permissions.append(_permission_and([p for key, values, not_values in items
                                            for p in _rule_matchers(key, values, not_values, policy, lenient, True)]))
    return rbac_pb2.Policy(permissions=permissions, principals=principals)


def _rule_matchers(key: str, values: List[str], not_values: List[str], policy: Any, lenient: bool, permission: bool) -> List[Any]:
    def one(value: str) -> Optional[Any]:
        try:
            if key.startswith("experimental.envoy.filters."):
                raise _Skip(f"{key} (Envoy metadata) has no meaning for gRPC")
            return _permission_for(key, value) if permission else _principal_for(key, value, policy)
        except _Skip:
            if lenient:
                return None
            raise

    out = []
    positives = [m for m in (one(v) for v in values) if m is not None]
    if positives:
        out.append(_permission_or(positives) if permission else _principal_or(positives))
    negatives = [m for m in (one(v) for v in not_values) if m is not None]
    if negatives:
        inner = _permission_or(negatives) if permission else _principal_or(negatives)
        out.append(rbac_pb2.Permission(not_rule=inner) if permission else rbac_pb2.Principal(not_id=inner))
    return out


def _permission_or(items: List[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(or_rules=rbac_pb2.Permission.Set(rules=items))


def _permission_and(items: List[rbac_pb2.Permission]) -> rbac_pb2.Permission:
    return rbac_pb2.Permission(and_rules=rbac_pb2.Permission.Set(rules=items or [rbac_pb2.Permission(any=True)]))


def _principal_or(items: List[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=items))


def _principal_and(items: List[rbac_pb2.Principal]) -> rbac_pb2.Principal:
    return rbac_pb2.Principal(and_ids=rbac_pb2.Principal.Set(ids=items or [rbac_pb2.Principal(any=True)]))
