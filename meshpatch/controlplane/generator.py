"""Istio model → Envoy v3 resources, shaped like istiod's proxyless-gRPC output.

Mirrors ``pilot/pkg/networking/grpcgen`` (LDS/RDS/CDS) and the EDS endpoint
builder so that a client which works against this control plane works against
istiod: names, name expansion and field choices follow istiod even where a
simpler shape would do (shared reference xds-istio.md §3 has the istiod facts).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Set, Tuple

from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2

from .istio_config import (
    ConnectionPool,
    ConsistentHash,
    Duration,
    HeaderOperations,
    Headers,
    HTTPDirectResponse,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRedirect,
    HTTPRetry,
    HTTPRoute,
    LocalityLbSetting,
    OutlierDetection,
    LoadBalancerSettings,
    ServicePort,
    StringMatch,
    TrafficPolicy,
    VirtualService,
    WarmupConfig,
    parse_duration,
    split_host_port,
)
from . import security
from .locality import apply_locality_lb
from .snapshot import Endpoint, ProxyNode, Service, Snapshot, is_http_or_sniffed, is_ip, resolve_short_name

log = logging.getLogger("meshpatch.controlplane")

TYPE_PREFIX = "type.googleapis.com/"
LISTENER_TYPE = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE_TYPE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT_TYPE = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
# istiod's push order: clusters before endpoints before listeners before routes ("make before break").
PUSH_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, ROUTE_TYPE)
WILDCARD_TYPES = (LISTENER_TYPE, CLUSTER_TYPE)

INBOUND_LISTENER_PREFIX = "xds.istio.io/grpc/lds/inbound/"
FAULT_FILTER = "envoy.filters.http.fault"
ROUTER_FILTER = "envoy.filters.http.router"
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
DEFAULT_MIN_RING_SIZE = 1024
# Istio's default MeshConfig enables locality load balancing mesh-wide.
MESH_LOCALITY_LB_SETTING = LocalityLbSetting(enabled=True)

Resource = Tuple[str, Message]

_GRPC_CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
    "DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}


# --------------------------------------------------------------------------- names


def subset_key(subset: str, hostname: str, port: int) -> str:
    """model.BuildSubsetKey for outbound clusters: ``outbound|PORT|SUBSET|FQDN``."""
    return f"outbound|{port}|{subset}|{hostname}"


def parse_subset_key(name: str) -> Optional[Tuple[str, str, str, int]]:
    """model.ParseSubsetKey → (direction, subset, hostname, port) or None."""
    parts = name.split("|")
    if len(parts) != 4:
        return None
    try:
        port = int(parts[1])
    except ValueError:
        return None
    if not parts[3] or port <= 0:
        return None
    return parts[0], parts[2], parts[3], port


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _duration(d: Optional[Duration]) -> duration_pb2.Duration:
    if d is None:
        return duration_pb2.Duration()
    return duration_pb2.Duration(seconds=d.seconds, nanos=d.nanos)


# --------------------------------------------------------------------------- LDS


class _ListenerName:
    __slots__ = ("requested", "ports")

    def __init__(self) -> None:
        self.requested: Set[str] = set()
        self.ports: Optional[Set[str]] = None  # None = all ports


def try_find_fqdn(name: str, node: ProxyNode) -> str:
    """lds.go tryFindFQDN: expand short names relative to the proxy's namespace only."""
    if "." not in name:
        return f"{name}.{node.dns_domain}"
    for suffix in (node.namespace, node.namespace + ".svc"):
        if name.endswith("." + suffix) and node.dns_domain.startswith(suffix):
            short = name[: -(len(suffix) + 1)]
            return f"{short}.{node.dns_domain}"
    return ""


def _listener_filter(names: Sequence[str], node: ProxyNode) -> Dict[str, _ListenerName]:
    """lds.go newListenerNameFilter, including its port-merging quirks."""
    flt: Dict[str, _ListenerName] = {}
    for name in names:
        if name.startswith(INBOUND_LISTENER_PREFIX):
            continue
        host, port = split_host_port(name)
        has_port = port is not None
        requested = host if has_port else name
        all_names = [requested]
        fqdn = try_find_fqdn(requested, node)
        if fqdn:
            all_names.append(fqdn)
        for n in all_names:
            existing = flt.get(n)
            ln = existing if existing is not None else _ListenerName()
            if existing is None:
                ln.ports = set() if has_port else None
            ln.requested.add(requested)
            if has_port and (existing is None or ln.ports):
                assert ln.ports is not None
                ln.ports.add(port)  # type: ignore[arg-type]
            elif not has_port:
                ln.ports = None
            flt[n] = ln
    return flt


def _http_filters() -> List[hcm_pb2.HttpFilter]:
    return [
        hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=_pack(fault_pb2.HTTPFault())),
        hcm_pb2.HttpFilter(name=ROUTER_FILTER, typed_config=_pack(router_pb2.Router())),
    ]


def build_listeners(snap: Snapshot, node: ProxyNode, names: Sequence[str], wildcard: bool) -> List[Resource]:
    flt = None if wildcard else _listener_filter(names, node)
    inbound = [n for n in names if n.startswith(INBOUND_LISTENER_PREFIX)]
    out: List[Resource] = list(security.build_inbound_listeners(snap, node, inbound)) if inbound else []
    for svc in snap.services_sorted(node.namespace):
        if flt is None:
            requested, ports = {svc.hostname}, None
        else:
            match = flt.get(svc.hostname)
            if match is None:
                continue
            requested, ports = match.requested, match.ports
        for req_host in sorted(requested):
            for p in svc.ports:
                if ports and str(p.number) not in ports:
                    continue
                out.append((join_host_port(req_host, p.number), _listener(svc, p, req_host)))
    return out


def _listener(svc: Service, port: ServicePort, requested_host: str) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager(
        http_filters=_http_filters(),
        rds=hcm_pb2.Rds(
            config_source=config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource()),
            route_config_name=subset_key("", svc.hostname, port.number),
        ),
    )
    return listener_pb2.Listener(
        name=join_host_port(requested_host, port.number),
        address=address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=svc.vip, port_value=port.number)
        ),
        api_listener=api_listener_pb2.ApiListener(api_listener=_pack(hcm)),
    )


# --------------------------------------------------------------------------- RDS


def build_routes(snap: Snapshot, node: ProxyNode, names: Sequence[str]) -> List[Resource]:
    out: List[Resource] = []
    for name in names:
        parsed = parse_subset_key(name)
        if parsed is None:
            log.warning("meshpatch control plane: cannot parse route name %r (want outbound|PORT||FQDN)", name)
            continue
        _, _, hostname, port = parsed
        out.append((name, route_pb2.RouteConfiguration(name=name, virtual_hosts=_virtual_hosts(snap, node, hostname, port))))
    return out


def _virtual_hosts(snap: Snapshot, node: ProxyNode, hostname: str, port_number: int) -> List[rc.VirtualHost]:
    """The vhost(s) for ``hostname`` on the route's port (Istio ≥1.31 scopes
    the RouteConfiguration to the requested host)."""
    svc = snap.service(hostname, node.namespace)
    if svc is None:
        return []
    port = svc.port(port_number)
    if port is None or not is_http_or_sniffed(port.protocol):
        return []
    routes: Optional[List[rc.Route]] = None
    vs = snap.virtual_service_for(hostname, node.namespace)
    if vs is not None:
        routes = _vs_routes(snap, node, vs, port_number) or None
    if routes is None:
        routes = [_default_route(snap, node, svc, port)]
    return [
        rc.VirtualHost(
            name=join_host_port(hostname, port_number),
            domains=vhost_domains(svc, port_number, node.dns_domain),
            routes=routes,
            include_request_attempt_count=True,
        )
    ]


def vhost_domains(svc: Service, port: int, proxy_domain: str) -> List[str]:
    """httproute.go generateVirtualHostDomains with the port kept (proxyless)."""
    domains = [svc.hostname, join_host_port(svc.hostname, port)]
    domains += alt_virtual_hosts(svc.hostname, port, proxy_domain)
    if svc.vip and svc.vip != "0.0.0.0":
        domains += [svc.vip, join_host_port(svc.vip, port)]
    out: List[str] = []
    seen: Set[str] = set()
    for d in domains:
        if d.lower() not in seen:
            seen.add(d.lower())
            out.append(d)
    return out


def alt_virtual_hosts(hostname: str, port: int, proxy_domain: str) -> List[str]:
    """GenerateAltVirtualHosts: the short forms valid from the proxy's domain."""
    if ".svc." in proxy_domain:
        idx = proxy_domain.index(".svc.")
        cluster_suffix = proxy_domain[idx + 1 :]  # "svc.cluster.local"
        if not hostname.endswith(cluster_suffix):
            return []
        ih = hostname.find(".svc.")
        if ih <= 0:
            return []
        ns = hostname.find(".")
        if ns + 1 >= len(hostname) or ns + 1 > ih:
            return []
        if hostname[ns + 1 : ih] == proxy_domain[:idx]:
            return [
                hostname[:ns], f"{hostname[:ns]}:{port}",
                hostname[:ih] + ".svc", f"{hostname[:ih]}.svc:{port}",
                hostname[:ih], f"{hostname[:ih]}:{port}",
            ]
        return [hostname[:ih], f"{hostname[:ih]}:{port}", hostname[:ih] + ".svc", f"{hostname[:ih]}.svc:{port}"]
    fq, pd = hostname.split("."), proxy_domain.split(".") if proxy_domain else []
    shared = 0
    while shared < min(len(fq), len(pd)) and fq[-1 - shared] == pd[-1 - shared]:
        shared += 1
    if shared == 0:
        return []
    unique = fq[: len(fq) - shared]
    if not unique:
        return []
    u = ".".join(unique)
    out = [u, f"{u}:{port}"]
    if len(unique) == 2:
        d = f"{u}.{fq[len(fq) - shared]}"
        out += [d, f"{d}:{port}"]
    return out


def _config_metadata(vs: VirtualService) -> base_pb2.Metadata:
    s = struct_pb2.Struct()
    s.update({"config": f"/apis/networking.istio.io/v1/namespaces/{vs.meta.namespace}/virtual-service/{vs.meta.name}"})
    return base_pb2.Metadata(filter_metadata={"istio": s})


def _default_route(snap: Snapshot, node: ProxyNode, svc: Service, port: ServicePort) -> rc.Route:
    cluster = subset_key("", svc.hostname, port.number)
    action = rc.RouteAction(
        cluster=cluster,
        timeout=duration_pb2.Duration(),
        max_stream_duration=rc.RouteAction.MaxStreamDuration(max_stream_duration=duration_pb2.Duration()),
        retry_policy=retry_policy(None, consistent_hash=False),
    )
    hp = _hash_policy(_service_hash(snap, node, svc, port.number))
    if hp is not None:
        action.hash_policy.append(hp)
    return rc.Route(
        name="default",
        match=rc.RouteMatch(prefix="/", case_sensitive=wrappers_pb2.BoolValue(value=True)),
        decorator=rc.Decorator(operation=f"{svc.hostname}:{port.number}/*"),
        route=action,
    )


def _vs_routes(snap: Snapshot, node: ProxyNode, vs: VirtualService, listen_port: int) -> List[rc.Route]:
    """route.go BuildHTTPRoutesForVirtualService: one route per (rule × match), stop after a catch-all."""
    out: List[rc.Route] = []
    for http in vs.http:
        catchall = False
        if not http.match:
            r = _translate_route(snap, node, vs, http, None, listen_port)
            if r is not None:
                out.append(r)
            catchall = True
        else:
            for m in http.match:
                r = _translate_route(snap, node, vs, http, m, listen_port)
                if r is not None:
                    out.append(r)
                    if is_catch_all(r):
                        catchall = True
                        break
        if catchall:
            break
    return out


def is_catch_all(r: rc.Route) -> bool:
    m = r.match
    which = m.WhichOneof("path_specifier")
    catchall = (which == "prefix" and m.prefix == "/") or (which == "safe_regex" and m.safe_regex.regex == ".*")
    return catchall and not m.headers and not m.query_parameters and not m.dynamic_metadata


def _source_matches(m: Optional[HTTPMatchRequest], node: ProxyNode) -> bool:
    if m is None:
        return True
    if m.gateways:
        return "mesh" in m.gateways
    labels = node.label_map
    if all(labels.get(k) == v for k, v in m.source_labels.items()):
        return not m.source_namespace or m.source_namespace == node.namespace
    return False


def _translate_route(
    snap: Snapshot, node: ProxyNode, vs: VirtualService, http: HTTPRoute, m: Optional[HTTPMatchRequest], listen_port: int
) -> Optional[rc.Route]:
    """route.go TranslateRoute."""
    if m is not None and m.port and m.port != listen_port:
        return None
    if not _source_matches(m, node):
        return None
    if not (http.route or http.redirect or http.direct_response):
        log.info(
            "meshpatch control plane: VirtualService %s/%s route %r delegates (delegate is not translated); route skipped",
            vs.meta.namespace, vs.meta.name, http.name,
        )
        return None
    name = http.name
    if m is not None and m.name:
        name = f"{name}.{m.name}"
    out = rc.Route(name=name, match=translate_match(m), metadata=_config_metadata(vs))
    if m is not None and m.stat_prefix:
        out.stat_prefix = m.stat_prefix
    authority = ""
    if http.headers is not None:
        ops = translate_headers(http.headers)
        out.request_headers_to_add.extend(ops.request_add)
        out.response_headers_to_add.extend(ops.response_add)
        out.request_headers_to_remove.extend(ops.request_remove)
        out.response_headers_to_remove.extend(ops.response_remove)
        authority = ops.authority
    if http.redirect is not None:
        out.redirect.CopyFrom(translate_redirect(http.redirect, listen_port))
    elif http.direct_response is not None:
        out.direct_response.CopyFrom(translate_direct_response(http.direct_response))
    else:
        _apply_route_destination(out, snap, node, vs, http, authority, listen_port)
    out.decorator.operation = _route_operation(out, vs.meta.name, listen_port)
    if http.fault is not None:
        f = translate_fault(http.fault)
        if f is not None:
            out.typed_per_filter_config[FAULT_FILTER].CopyFrom(_pack(f))
    if http.cors_policy is not None:
        # istiod would add an envoy.filters.http.cors per-route config, which makes
        # gRPC clients NACK the whole RouteConfiguration (A39); meshpatch does no CORS.
        log.info("meshpatch control plane: VirtualService %s/%s route %r: corsPolicy is not translated",
                 vs.meta.namespace, vs.meta.name, http.name)
    return out


def _apply_route_destination(
    out: rc.Route, snap: Snapshot, node: ProxyNode, vs: VirtualService, http: HTTPRoute, authority: str, listen_port: int
) -> None:
    """route.go applyHTTPRouteDestination (sidecar outbound, proxyless timeouts)."""
    action = rc.RouteAction(timeout=_duration(http.timeout) if http.timeout else duration_pb2.Duration())
    # Proxyless: gRPC only reads max_stream_duration (A31).
    action.max_stream_duration.max_stream_duration.CopyFrom(action.timeout)
    if http.rewrite is not None:
        if http.rewrite.uri_regex is not None:
            pattern, substitution = http.rewrite.uri_regex
            action.regex_rewrite.pattern.regex = pattern
            action.regex_rewrite.substitution = substitution
        elif http.rewrite.uri:
            action.prefix_rewrite = http.rewrite.uri
        if http.rewrite.authority:
            authority = http.rewrite.authority
    if authority:
        action.host_rewrite_literal = authority
    for cluster, fraction in _mirror_targets(snap, vs, http, listen_port):
        action.request_mirror_policies.append(
            rc.RouteAction.RequestMirrorPolicy(
                cluster=cluster,
                runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=fraction),
                trace_sampled=wrappers_pb2.BoolValue(value=False),
            )
        )
    if len(http.route) == 1:
        dst = http.route[0]
        action.cluster = _destination_cluster(snap, vs, dst.destination.host, dst.destination.subset, dst.destination.port, listen_port)
        if dst.headers is not None:
            ops = translate_headers(dst.headers)
            out.request_headers_to_add.extend(ops.request_add)
            out.request_headers_to_remove.extend(ops.request_remove)
            out.response_headers_to_add.extend(ops.response_add)
            out.response_headers_to_remove.extend(ops.response_remove)
            if ops.authority and action.WhichOneof("host_rewrite_specifier") is None:
                action.host_rewrite_literal = ops.authority
        h = _destination_hash(snap, node, vs, dst.destination.host, dst.destination.subset, dst.destination.port)
        hp = _hash_policy(h)
        if hp is not None:
            action.hash_policy.append(hp)
        consistent = h is not None
    else:
        weighted = rc.WeightedCluster()
        for dst in http.route:
            if dst.weight == 0:
                continue
            cw = rc.WeightedCluster.ClusterWeight(
                name=_destination_cluster(snap, vs, dst.destination.host, dst.destination.subset, dst.destination.port, listen_port),
                weight=wrappers_pb2.UInt32Value(value=dst.weight),
            )
            if dst.headers is not None:
                ops = translate_headers(dst.headers)
                cw.request_headers_to_add.extend(ops.request_add)
                cw.request_headers_to_remove.extend(ops.request_remove)
                cw.response_headers_to_add.extend(ops.response_add)
                cw.response_headers_to_remove.extend(ops.response_remove)
                if ops.authority:
                    cw.host_rewrite_literal = ops.authority
            weighted.clusters.append(cw)
            hp = _hash_policy(_destination_hash(snap, node, vs, dst.destination.host, dst.destination.subset, dst.destination.port))
            if hp is not None:
                action.hash_policy.append(hp)
        action.weighted_clusters.CopyFrom(weighted)
        consistent = False
    rp = retry_policy(http.retries, consistent_hash=consistent)
    if rp is not None:
        action.retry_policy.CopyFrom(rp)
    out.route.CopyFrom(action)


def _mirror_targets(snap: Snapshot, vs: VirtualService, http: HTTPRoute, listen_port: int) -> List[Tuple[str, percent_pb2.FractionalPercent]]:
    """route.go MirrorPercent / MirrorPercentByPolicy: an explicit 0 % means no mirror."""
    out: List[Tuple[str, percent_pb2.FractionalPercent]] = []
    if http.mirror is not None:
        fraction: Optional[percent_pb2.FractionalPercent]
        if http.mirror_percentage is not None:
            fraction = _million(http.mirror_percentage) if http.mirror_percentage > 0 else None
        elif http.mirror_percent is not None:
            fraction = _hundred(http.mirror_percent) if http.mirror_percent > 0 else None
        else:
            fraction = _hundred(100)
        if fraction is not None:
            d = http.mirror
            out.append((_destination_cluster(snap, vs, d.host, d.subset, d.port, listen_port), fraction))
    for mp in http.mirrors:
        if mp.percentage is not None and mp.percentage <= 0:
            continue
        fraction = _million(mp.percentage) if mp.percentage is not None else _hundred(100)
        d = mp.destination
        out.append((_destination_cluster(snap, vs, d.host, d.subset, d.port, listen_port), fraction))
    return out


class HeaderOps:
    """route.go HeadersOperations."""

    __slots__ = ("request_add", "response_add", "request_remove", "response_remove", "authority")

    def __init__(self) -> None:
        self.request_add: List[base_pb2.HeaderValueOption] = []
        self.response_add: List[base_pb2.HeaderValueOption] = []
        self.request_remove: List[str] = []
        self.response_remove: List[str] = []
        self.authority = ""


def _is_internal_header(key: str) -> bool:
    return key.startswith(":") or key.lower() == "host"


def _append_headers(headers: Dict[str, str], append: bool) -> Tuple[List[base_pb2.HeaderValueOption], str]:
    """route.go translateAppendHeaders: ``:authority``/``host`` become a host
    rewrite, other pseudo-headers are dropped, the rest sorted by name."""
    authority = ""
    out: List[base_pb2.HeaderValueOption] = []
    action = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD if append else base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    for key, value in headers.items():
        if key.lower() in (":authority", "host"):
            authority = value
        if _is_internal_header(key):
            continue
        out.append(base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, value=value), append_action=action))
    out.sort(key=lambda o: o.header.key)
    return out, authority


def translate_headers(h: Headers) -> HeaderOps:
    """route.go TranslateHeadersOperations."""
    ops = HeaderOps()
    req = h.request or HeaderOperations()
    resp = h.response or HeaderOperations()
    set_req, set_authority = _append_headers(req.set, False)
    add_req, add_authority = _append_headers(req.add, True)
    ops.request_add = set_req + add_req
    ops.response_add = _append_headers(resp.set, False)[0] + _append_headers(resp.add, True)[0]
    ops.request_remove = [k for k in req.remove if not _is_internal_header(k)]
    ops.response_remove = [k for k in resp.remove if not _is_internal_header(k)]
    ops.authority = set_authority or add_authority
    return ops


_REDIRECT_CODE = {
    0: rc.RedirectAction.MOVED_PERMANENTLY, 301: rc.RedirectAction.MOVED_PERMANENTLY, 302: rc.RedirectAction.FOUND,
    303: rc.RedirectAction.SEE_OTHER, 307: rc.RedirectAction.TEMPORARY_REDIRECT, 308: rc.RedirectAction.PERMANENT_REDIRECT,
}


def translate_redirect(r: HTTPRedirect, listen_port: int) -> rc.RedirectAction:
    """route.go ApplyRedirect for a sidecar (never TLS-terminating)."""
    out = rc.RedirectAction(host_redirect=r.authority, response_code=_REDIRECT_CODE[r.redirect_code])
    if r.prefix_rewrite:
        out.prefix_rewrite = r.prefix_rewrite
    else:
        out.path_redirect = r.uri  # set even when "" (= keep the path), as istiod does
    if r.scheme:
        out.scheme_redirect = r.scheme
    if r.port is not None or r.derive_port:
        if r.port is not None:
            out.port_redirect = r.port
        elif r.derive_port == "FROM_REQUEST_PORT":
            out.port_redirect = listen_port  # routes are built per listener port
        scheme = r.scheme or "http"
        if (out.port_redirect, scheme) in ((80, "http"), (443, "https")):
            out.port_redirect = 0
    return out


def translate_direct_response(d: HTTPDirectResponse) -> rc.DirectResponseAction:
    out = rc.DirectResponseAction(status=d.status)
    if d.body_string is not None:
        out.body.inline_string = d.body_string
    elif d.body_bytes is not None:
        out.body.inline_bytes = d.body_bytes
    return out


def _route_operation(r: rc.Route, vs_name: str, port: int) -> str:
    m = r.match
    which = m.WhichOneof("path_specifier")
    path = "/*"
    if which == "prefix":
        path = m.prefix + "*"
    elif which == "path":
        path = m.path
    elif which == "safe_regex":
        path = m.safe_regex.regex
    if r.route.WhichOneof("cluster_specifier") == "cluster":
        parsed = parse_subset_key(r.route.cluster)
        if parsed is not None:
            return f"{parsed[2]}:{parsed[3]}{path}"
    return f"{vs_name}:{port}{path}"


def _destination_cluster(snap: Snapshot, vs: VirtualService, host: str, subset: str, dport: int, listen_port: int) -> str:
    """route.go GetDestinationCluster: explicit port, else the service's only port, else the listener port."""
    hostname = resolve_short_name(host, vs.meta.namespace)
    port = listen_port
    svc = snap.service(hostname)
    if dport:
        port = dport
    elif svc is not None and len(svc.ports) == 1:
        port = svc.ports[0].number
    return subset_key(subset, hostname, port)


def _string_matcher(sm: StringMatch) -> string_pb2.StringMatcher:
    if sm.kind == "exact":
        return string_pb2.StringMatcher(exact=sm.value)
    if sm.kind == "prefix":
        return string_pb2.StringMatcher(prefix=sm.value)
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=sm.value))


def _present(sm: Optional[StringMatch]) -> bool:
    return sm is None or sm.kind == "" or (sm.kind == "regex" and sm.value == "*")


def _header_matcher(name: str, sm: StringMatch) -> rc.HeaderMatcher:
    if _present(sm):
        return rc.HeaderMatcher(name=name, present_match=True)
    return rc.HeaderMatcher(name=name, string_match=_string_matcher(sm))


def translate_match(m: Optional[HTTPMatchRequest]) -> rc.RouteMatch:
    """route.go TranslateRouteMatch."""
    out = rc.RouteMatch(prefix="/")
    if m is None:
        return out
    headers: List[rc.HeaderMatcher] = []
    for name, sm in m.headers.items():
        if name.startswith("@request.auth.claims"):
            continue  # JWT claim matchers become dynamic_metadata; not meaningful without JWT
        headers.append(_header_matcher(name, sm))
    for name, sm in m.without_headers.items():
        if name.startswith("@request.auth.claims"):
            continue
        hm = _header_matcher(name, sm)
        hm.invert_match = True
        if not _present(sm):
            hm.treat_missing_header_as_empty = True
        headers.append(hm)
    headers.sort(key=lambda h: h.name)
    if m.uri is not None and m.uri.kind:
        if m.uri.kind == "exact":
            out.path = m.uri.value
        elif m.uri.kind == "prefix":
            out.prefix = m.uri.value
        else:
            out.safe_regex.CopyFrom(regex_pb2.RegexMatcher(regex=m.uri.value))
    out.case_sensitive.value = not m.ignore_uri_case
    for pseudo, sm in ((":method", m.method), (":authority", m.authority), (":scheme", m.scheme)):
        if sm is not None:
            headers.append(_header_matcher(pseudo, sm))
    out.headers.extend(headers)
    for name, sm in m.query_params.items():
        qm = rc.QueryParameterMatcher(name=name)
        if _present(sm):
            qm.present_match = True
        else:
            qm.string_match.CopyFrom(_string_matcher(sm))
        out.query_parameters.append(qm)
    return out


def retry_policy(retries: Optional[HTTPRetry], consistent_hash: bool) -> Optional[rc.RetryPolicy]:
    """retry.go ConvertPolicy (mesh default policy when the VS sets none)."""
    out = rc.RetryPolicy(
        num_retries=wrappers_pb2.UInt32Value(value=2),
        retry_on=DEFAULT_RETRY_ON,
        host_selection_retry_max_attempts=5,
    )
    if not consistent_hash:
        out.retry_host_predicate.append(_previous_hosts())
    if retries is None:
        return out
    if retries.attempts <= 0:
        return None
    out.num_retries.value = retries.attempts
    if retries.retry_on:
        words, codes = [], []
        for part in (p.strip() for p in retries.retry_on.split(",")):
            if not part:
                continue
            if part.isdigit() and 100 <= int(part) <= 599:
                codes.append(int(part))
            else:
                words.append(part)
        out.retry_on = ",".join(words)
        out.retriable_status_codes.extend(codes)
        if codes and "retriable-status-codes" not in out.retry_on:
            out.retry_on += ",retriable-status-codes"
    if retries.per_try_timeout is not None:
        out.per_try_timeout.CopyFrom(_duration(retries.per_try_timeout))
    if retries.retry_ignore_previous_hosts is not None:
        del out.retry_host_predicate[:]
        if retries.retry_ignore_previous_hosts:
            out.retry_host_predicate.append(_previous_hosts())
    if retries.retry_remote_localities:
        out.retry_priority.CopyFrom(
            rc.RetryPolicy.RetryPriority(
                name="envoy.retry_priorities.previous_priorities",
                typed_config=_pack(previous_priorities_config_pb2.PreviousPrioritiesConfig(update_frequency=2)),
            )
        )
    if retries.backoff is not None:
        out.retry_back_off.base_interval.CopyFrom(_duration(retries.backoff))
    return out


def _previous_hosts() -> rc.RetryPolicy.RetryHostPredicate:
    return rc.RetryPolicy.RetryHostPredicate(
        name="envoy.retry_host_predicates.previous_hosts",
        typed_config=_pack(previous_hosts_pb2.PreviousHostsPredicate()),
    )


def translate_fault(f: HTTPFaultInjection) -> Optional[fault_pb2.HTTPFault]:
    """route.go TranslateFault."""
    out = fault_pb2.HTTPFault()
    has = False
    if f.delay is not None and f.delay.fixed_delay is not None and not f.delay.exponential:
        d = common_fault_pb2.FaultDelay(fixed_delay=_duration(f.delay.fixed_delay))
        if f.delay.percentage is not None:
            d.percentage.CopyFrom(_million(f.delay.percentage))
        else:
            d.percentage.CopyFrom(_hundred(f.delay.percent or 0))
        out.delay.CopyFrom(d)
        has = True
    if f.abort is not None and (f.abort.http_status is not None or f.abort.grpc_status):
        a = fault_pb2.FaultAbort()
        if f.abort.percentage is not None:
            a.percentage.CopyFrom(_million(f.abort.percentage))
        if f.abort.http_status is not None:
            a.http_status = f.abort.http_status
        else:
            code = _GRPC_CODES.get(str(f.abort.grpc_status).upper())
            if code is None:
                log.warning("meshpatch control plane: unknown grpcStatus %r in fault abort; abort dropped", f.abort.grpc_status)
                a = None  # type: ignore[assignment]
            else:
                a.grpc_status = code
        if a is not None:
            out.abort.CopyFrom(a)
            has = True
    return out if has else None


def _million(pct: float) -> percent_pb2.FractionalPercent:
    """translatePercentToFractionalPercent: Go's uint32(value * 10000) truncation."""
    return percent_pb2.FractionalPercent(numerator=int(pct * 10000), denominator=percent_pb2.FractionalPercent.MILLION)


def _hundred(pct: int) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(numerator=pct, denominator=percent_pb2.FractionalPercent.HUNDRED)


# --------------------------------------------------------------------------- consistent hash


def _lb_for_port(tp: Optional[TrafficPolicy], port: int) -> Optional[LoadBalancerSettings]:
    if tp is None:
        return None
    for pls in tp.port_level_settings:
        if pls.port == port and pls.load_balancer is not None:
            return pls.load_balancer
    return tp.load_balancer


def _service_hash(snap: Snapshot, node: ProxyNode, svc: Service, port: int) -> Optional[ConsistentHash]:
    dr = snap.destination_rule(svc.hostname, node.namespace, svc.namespace)
    if dr is None or dr.traffic_policy is None:
        return None
    lb = _lb_for_port(dr.traffic_policy, port)
    return lb.consistent_hash if lb is not None else None


def _destination_hash(snap: Snapshot, node: ProxyNode, vs: VirtualService, host: str, subset: str, port: int) -> Optional[ConsistentHash]:
    """route.go hashForHTTPDestination: subset port-level > subset > port-level > top-level."""
    hostname = resolve_short_name(host, vs.meta.namespace)
    svc = snap.service(hostname)
    dr = snap.destination_rule(hostname, node.namespace, svc.namespace if svc else vs.meta.namespace)
    if dr is None:
        return None
    tp = dr.traffic_policy
    result = tp.load_balancer.consistent_hash if tp and tp.load_balancer else None
    pls_hash = None
    if port and tp is not None:
        for pls in tp.port_level_settings:
            if pls.port == port:
                pls_hash = pls.load_balancer.consistent_hash if pls.load_balancer else None
                break
    sub_hash = sub_pls_hash = None
    sub = snap.subset(dr, subset) if subset else None
    if sub is not None and sub.traffic_policy is not None:
        stp = sub.traffic_policy
        sub_hash = stp.load_balancer.consistent_hash if stp.load_balancer else None
        if port:
            for pls in stp.port_level_settings:
                if pls.port == port:
                    sub_pls_hash = pls.load_balancer.consistent_hash if pls.load_balancer else None
                    break
    return sub_pls_hash or sub_hash or pls_hash or result


def _hash_policy(ch: Optional[ConsistentHash]) -> Optional[rc.RouteAction.HashPolicy]:
    if ch is None:
        return None
    kind = ch.hash_key_kind
    if kind == "header":
        return rc.RouteAction.HashPolicy(header=rc.RouteAction.HashPolicy.Header(header_name=ch.http_header_name))
    if kind == "cookie":
        cookie = ch.http_cookie or {}
        c = rc.RouteAction.HashPolicy.Cookie(name=str(cookie.get("name", "")), path=str(cookie.get("path", "") or ""))
        if cookie.get("ttl") is not None:
            c.ttl.CopyFrom(_duration(parse_duration(cookie["ttl"], "ttl")))
        for attr in cookie.get("attributes") or []:
            c.attributes.append(rc.RouteAction.HashPolicy.CookieAttribute(name=str(attr.get("name", "")), value=str(attr.get("value", ""))))
        return rc.RouteAction.HashPolicy(cookie=c)
    if kind == "source_ip":
        return rc.RouteAction.HashPolicy(connection_properties=rc.RouteAction.HashPolicy.ConnectionProperties(source_ip=True))
    if kind == "query":
        return rc.RouteAction.HashPolicy(query_parameter=rc.RouteAction.HashPolicy.QueryParameter(name=ch.http_query_parameter_name))
    return None


# --------------------------------------------------------------------------- CDS


_POLICY_FIELDS = ("load_balancer", "connection_pool", "outlier_detection", "tls")


def port_level_policy(policy: Optional[TrafficPolicy], port: int) -> Tuple[Optional[TrafficPolicy], bool]:
    """util.GetPortLevelTrafficPolicy: a matching portLevelSettings entry
    replaces the whole policy (its unset fields fall back to defaults, not to
    the destination-level values)."""
    if policy is None:
        return None, False
    for pls in policy.port_level_settings:
        if pls.port == port:
            return TrafficPolicy(**{a: getattr(pls, a) for a in _POLICY_FIELDS}), True
    return policy, False


def merge_traffic_policy(base: Optional[TrafficPolicy], subset: Optional[TrafficPolicy], port: int) -> TrafficPolicy:
    """util.MergeSubsetTrafficPolicy: the DR's (port-level) policy, overridden
    field by field by the subset's; a subset port-level entry overrides all
    four fields, set or not."""
    original, _ = port_level_policy(base, port)
    if subset is None:
        return original or TrafficPolicy()
    sub, has_port_level = port_level_policy(subset, port)
    assert sub is not None
    if original is None:
        return sub
    merged = TrafficPolicy(**{a: getattr(original, a) for a in _POLICY_FIELDS})
    for a in _POLICY_FIELDS:
        if getattr(sub, a) is not None or has_port_level:
            setattr(merged, a, getattr(sub, a))
    return merged


def build_clusters(snap: Snapshot, node: ProxyNode, names: Sequence[str]) -> List[Resource]:
    """cds.go BuildClusters: only requested names; unknown service/port/subset → omitted."""
    groups: "OrderedDict[str, List[str]]" = OrderedDict()
    for name in names:
        parsed = parse_subset_key(name)
        if parsed is None or parsed[0] != "outbound":
            log.warning("meshpatch control plane: cds for %s: cannot parse cluster name %r", node.id, name)
            continue
        groups.setdefault(subset_key("", parsed[2], parsed[3]), []).append(name)
    out: List[Resource] = []
    emitted: Set[str] = set()
    for default_key, requested in groups.items():
        _, _, hostname, port_num = parse_subset_key(default_key)  # type: ignore[misc]
        svc = snap.service(hostname, node.namespace)
        port = svc.port(port_num) if svc else None
        if svc is None or port is None:
            log.warning("meshpatch control plane: cds for %s: no service port for cluster %s", node.id, default_key)
            continue
        dr = snap.destination_rule(hostname, node.namespace, svc.namespace)
        policy = merge_traffic_policy(dr.traffic_policy if dr else None, None, port_num)
        if default_key in requested and default_key not in emitted:
            out.append((default_key, security.apply_tls(_eds_cluster(default_key, policy, node), policy.tls, svc, node)))
            emitted.add(default_key)
        for subset in dr.subsets if dr else []:
            key = subset_key(subset.name, hostname, port_num)
            if key in requested and key not in emitted:
                merged = merge_traffic_policy(policy, subset.traffic_policy, port_num)
                cluster = _eds_cluster(key, merged, node)
                _add_subset_labels(cluster, subset.labels)
                out.append((key, security.apply_tls(cluster, merged.tls, svc, node)))
                emitted.add(key)
    return out


def _add_subset_labels(cluster: cluster_pb2.Cluster, labels: Dict[str, str]) -> None:
    """meshpatch-only metadata (istiod sends none): the subset's label selector,
    so clients that merge registry instances select them like EDS does."""
    s = struct_pb2.Struct()
    s.update({"subset_labels": {str(k): str(v) for k, v in (labels or {}).items()}})
    cluster.metadata.filter_metadata["meshpatch"].CopyFrom(s)


def _eds_cluster(name: str, policy: TrafficPolicy, node: ProxyNode) -> cluster_pb2.Cluster:
    """grpcgen clusterBuilder.edsCluster + applyTrafficPolicy.  What istiod
    sends proxyless clients keeps its shape (lb_policy, ring hash size,
    circuit_breakers.max_requests); what it drops for them (outlier detection,
    slow start, the other circuit-breaker limits, RANDOM) is emitted where
    istiod puts it for Envoy sidecars, so meshpatch can honour it."""
    c = cluster_pb2.Cluster(
        name=name,
        alt_stat_name=name + ";",
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            service_name=name,
            eds_config=config_source_pb2.ConfigSource(ads=config_source_pb2.AggregatedConfigSource()),
        ),
    )
    _apply_load_balancer(c, policy.load_balancer, node)
    _apply_connection_pool(c, policy.connection_pool)
    _apply_outlier_detection(c, policy.outlier_detection)
    _apply_locality_lb_config(c, policy)
    return c


def _apply_load_balancer(c: cluster_pb2.Cluster, lb: Optional[LoadBalancerSettings], node: ProxyNode) -> None:
    if lb is None:
        return
    ch = lb.consistent_hash
    if ch is not None:
        _apply_ring_hash(c, ch)
        return
    if lb.simple in ("", "ROUND_ROBIN"):
        # gRPC's default; grpcgen leaves lb_policy unset.
        if lb.warmup is not None:
            c.round_robin_lb_config.slow_start_config.CopyFrom(_slow_start(lb.warmup))
    elif lb.simple in ("LEAST_REQUEST", "LEAST_CONN"):
        c.lb_policy = cluster_pb2.Cluster.LEAST_REQUEST
        if lb.warmup is not None:
            c.least_request_lb_config.slow_start_config.CopyFrom(_slow_start(lb.warmup))
    elif lb.simple == "RANDOM":
        # istiod drops RANDOM for proxyless clients (they fall back to round robin);
        # we send it as istiod does for sidecars because meshpatch implements it.
        # grpcio NACKs such a cluster (as it does LEAST_REQUEST and MAGLEV).
        c.lb_policy = cluster_pb2.Cluster.RANDOM
    else:
        log.warning("meshpatch control plane: cannot apply LbPolicy %s to %s", lb.simple, node.id)


def _apply_ring_hash(c: cluster_pb2.Cluster, ch: ConsistentHash) -> None:
    """cluster_traffic_policy.go ApplyRingHashLoadBalancer."""
    if ch.maglev is not None:
        c.lb_policy = cluster_pb2.Cluster.MAGLEV
        size = int(ch.maglev.get("tableSize") or 0)
        if size:
            c.maglev_lb_config.table_size.value = size
    elif ch.ring_hash is not None:
        c.lb_policy = cluster_pb2.Cluster.RING_HASH
        size = int(ch.ring_hash.get("minimumRingSize") or 0)
        if size:
            c.ring_hash_lb_config.minimum_ring_size.value = size
    else:
        c.lb_policy = cluster_pb2.Cluster.RING_HASH
        c.ring_hash_lb_config.minimum_ring_size.value = ch.minimum_ring_size or DEFAULT_MIN_RING_SIZE


def _slow_start(w: WarmupConfig) -> cluster_pb2.Cluster.SlowStartConfig:
    """setSlowStartConfig (warmupDurationSecs) / setWarmup (warmup)."""
    out = cluster_pb2.Cluster.SlowStartConfig(slow_start_window=_duration(w.duration))
    if not w.legacy:
        out.aggression.CopyFrom(base_pb2.RuntimeDouble(default_value=w.aggression if w.aggression is not None else 1.0, runtime_key="("))
        out.min_weight_percent.value = w.minimum_percent if w.minimum_percent is not None else 10.0
    return out


def _apply_connection_pool(c: cluster_pb2.Cluster, pool: Optional[ConnectionPool]) -> None:
    """grpcgen applyCircuitBreakers (max_requests only, A32) extended with the
    other limits when set; unset limits stay unset (the client's defaults)."""
    if pool is None:
        return
    t = circuit_breaker_pb2.CircuitBreakers.Thresholds()
    for attr, value in (
        ("max_requests", pool.http2_max_requests),
        ("max_pending_requests", pool.http1_max_pending_requests),
        ("max_retries", pool.max_retries),
        ("max_connections", pool.max_connections),
    ):
        if value > 0:
            getattr(t, attr).value = value
    if t.ListFields():
        c.circuit_breakers.thresholds.append(t)
    if pool.connect_timeout is not None:
        c.connect_timeout.CopyFrom(_duration(pool.connect_timeout))


def _apply_outlier_detection(c: cluster_pb2.Cluster, od: Optional[OutlierDetection]) -> None:
    """cluster_traffic_policy.go applyOutlierDetection (sidecar shape; istiod
    sends none to proxyless clients)."""
    if od is None:
        return
    out = outlier_detection_pb2.OutlierDetection(enforcing_success_rate=wrappers_pb2.UInt32Value(value=0))
    if od.consecutive_5xx_errors is not None:
        v = od.consecutive_5xx_errors
        out.consecutive_5xx.value = v
        out.enforcing_consecutive_5xx.value = 100 if v > 0 else 0
    if od.consecutive_gateway_errors is not None:
        v = od.consecutive_gateway_errors
        out.consecutive_gateway_failure.value = v
        out.enforcing_consecutive_gateway_failure.value = 100 if v > 0 else 0
    if od.interval is not None:
        out.interval.CopyFrom(_duration(od.interval))
    if od.base_ejection_time is not None:
        out.base_ejection_time.CopyFrom(_duration(od.base_ejection_time))
    if od.max_ejection_percent > 0:
        out.max_ejection_percent.value = od.max_ejection_percent
    if od.split_external_local_origin_errors:
        out.split_external_local_origin_errors = True
        if od.consecutive_local_origin_failures:
            out.consecutive_local_origin_failure.value = od.consecutive_local_origin_failures
            out.enforcing_consecutive_local_origin_failure.value = 100
        out.enforcing_local_origin_success_rate.value = 0
    if od.http_error_codes:
        log.info("meshpatch control plane: %s: outlierDetectionHttpErrorCodes is not translated", c.name)
    c.outlier_detection.CopyFrom(out)
    # Panic threshold off unless minHealthPercent says otherwise (set even when 0).
    c.common_lb_config.healthy_panic_threshold.value = float(od.min_health_percent)


def _apply_locality_lb_config(c: cluster_pb2.Cluster, policy: TrafficPolicy) -> None:
    """loadbalancer.go LocalityLBSettings.ApplyToCluster's cluster half: Envoy
    only honours locality weights with locality_weighted_lb_config (the EDS
    half, priorities and weights, is in :func:`cluster_load_assignment`)."""
    setting = effective_locality_setting(policy.load_balancer)
    if setting is None:
        return
    failover_on = policy.outlier_detection is not None
    if (failover_on and (setting.failover or setting.failover_priority)) or setting.distribute:
        c.common_lb_config.locality_weighted_lb_config.SetInParent()


def effective_locality_setting(lb: Optional[LoadBalancerSettings]) -> Optional[LocalityLbSetting]:
    """loadbalancer.go GetEffectiveLbSetting with Istio's default mesh config
    (localityLbSetting {enabled: true})."""
    if lb is not None and lb.locality_lb_setting is not None:
        if lb.locality_lb_setting.enabled is False:
            return None
        return lb.locality_lb_setting
    return MESH_LOCALITY_LB_SETTING


# --------------------------------------------------------------------------- EDS


def build_endpoints(snap: Snapshot, node: ProxyNode, names: Sequence[str]) -> List[Resource]:
    out: List[Resource] = []
    for name in names:
        out.append((name, cluster_load_assignment(snap, node, name)))
    return out


def cluster_load_assignment(snap: Snapshot, node: ProxyNode, name: str) -> endpoint_pb2.ClusterLoadAssignment:
    """endpoint_builder.go BuildClusterLoadAssignment, including the per-proxy
    locality rewrite (priorities / weights) of loadbalancer.go."""
    cla = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    parsed = parse_subset_key(name)
    if parsed is None:
        return cla
    _, subset_name, hostname, port_num = parsed
    svc = snap.service(hostname, node.namespace)
    port = svc.port(port_num) if svc else None
    if svc is None or port is None:
        return cla
    dr = snap.destination_rule(hostname, node.namespace, svc.namespace)
    sub = snap.subset(dr, subset_name) if subset_name else None
    labels: Dict[str, str] = dict(sub.labels) if sub is not None else {}
    groups: Dict[str, List[endpoint_components_pb2.LbEndpoint]] = {}
    group_labels: Dict[str, List[Dict[str, str]]] = {}
    weights: Dict[str, int] = {}
    localities = {}
    for ep in svc.endpoints:
        if not is_ip(ep.address):
            continue
        if any(ep.labels.get(k) != v for k, v in labels.items()):
            continue
        key = ep.locality.label
        localities[key] = ep.locality
        groups.setdefault(key, []).append(_lb_endpoint(ep, ep.port_for(port), svc))
        group_labels.setdefault(key, []).append(ep.labels)
        weights[key] = min(weights.get(key, 0) + ep.weight, 2**32 - 1)
    for key in sorted(groups):
        loc = localities[key]
        cla.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(region=loc.region, zone=loc.zone, sub_zone=loc.sub_zone),
                lb_endpoints=groups[key],
                load_balancing_weight=wrappers_pb2.UInt32Value(value=weights[key]),
            )
        )
    if not cla.endpoints or dr is None:
        return cla
    policy = merge_traffic_policy(dr.traffic_policy, sub.traffic_policy if sub else None, port_num)
    setting = effective_locality_setting(policy.load_balancer)
    if setting is not None:
        region, zone, sub_zone = node.locality
        apply_locality_lb(
            cla, [group_labels[k] for k in sorted(groups)], base_pb2.Locality(region=region, zone=zone, sub_zone=sub_zone),
            node.label_map, setting, enable_failover=policy.outlier_detection is not None,
        )
    return cla


def _lb_endpoint(ep: Endpoint, port: int, svc: Service) -> endpoint_components_pb2.LbEndpoint:
    lbe = endpoint_components_pb2.LbEndpoint(
        endpoint=endpoint_components_pb2.Endpoint(
            address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address=ep.address, port_value=port))
        ),
        health_status=health_check_pb2.HEALTHY,
        load_balancing_weight=wrappers_pb2.UInt32Value(value=ep.weight),
    )
    fm: Dict[str, struct_pb2.Struct] = {}
    if ep.labels.get("security.istio.io/tlsMode") == "istio":
        s = struct_pb2.Struct()
        s.update({"tlsMode": "istio"})
        fm["envoy.transport_socket_match"] = s
    if ep.workload_name:
        canonical = ep.labels.get("service.istio.io/canonical-name") or ep.labels.get("app") or ep.workload_name
        revision = ep.labels.get("service.istio.io/canonical-revision") or ep.labels.get("version") or "latest"
        s = struct_pb2.Struct()
        s.update({"workload": f"{ep.workload_name};{ep.namespace};{canonical};{revision};Kubernetes"})
        fm["istio"] = s
    if ep.labels:
        # meshpatch-only (istiod sends no endpoint labels): the WorkloadEntry /
        # ServiceEntry endpoint labels, e.g. the canary lane label clients prefer.
        s = struct_pb2.Struct()
        s.update({"labels": {str(k): str(v) for k, v in ep.labels.items()}})
        fm["meshpatch"] = s
    if fm:
        lbe.metadata.CopyFrom(base_pb2.Metadata(filter_metadata=fm))
    return lbe


# --------------------------------------------------------------------------- dispatch


def generate(snap: Snapshot, node: ProxyNode, type_url: str, names: Sequence[str], wildcard: bool = False) -> List[Resource]:
    """All resources of one type for one proxy's subscription."""
    if type_url == LISTENER_TYPE:
        return build_listeners(snap, node, names, wildcard)
    if type_url == ROUTE_TYPE:
        return build_routes(snap, node, names)
    if type_url == CLUSTER_TYPE:
        return [] if wildcard else build_clusters(snap, node, names)
    if type_url == ENDPOINT_TYPE:
        return build_endpoints(snap, node, names)
    return []
