"""Turn xDS protobuf resources into validated :mod:`meshpatch.routing.model` objects.

Validation is per resource (gRPC A46): one bad resource makes the response a
NACK that names it and why, while the valid resources of the same response
are still used.  What gRPC ignores we ignore; a supported field with a value we
cannot honour is an error, so the control plane learns about it from the NACK
instead of the app silently getting different behaviour.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

from google.protobuf import any_pb2
from google.protobuf.json_format import MessageToDict

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2
from envoy.service.discovery.v3 import discovery_pb2

from meshpatch.routing.matchers import HeaderMatcher, PathMatcher, StringMatcher
from meshpatch.routing.model import (
    ClusterConfig,
    ClusterWeight,
    Endpoint,
    EndpointsConfig,
    ListenerConfig,
    LocalityEndpoints,
    Route,
    RouteAction,
    RouteConfig,
    RouteMatch,
    VirtualHost,
)
from meshpatch.xds.decode_policy import route_policy
from meshpatch.xds.decode_server import decode_server_listener
from meshpatch.xds.decode_tls import upstream_tls
from meshpatch.xds.type_urls import CDS, EDS, HCM_TYPE, LDS, RDS, RESOURCE_WRAPPER

MAX_ITEMS = 100_000  # guards against hostile resources with absurd list sizes


class ResourceError(Exception):
    """One resource is invalid; ``name`` is empty when the name itself is unreadable."""

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name or '<unnamed>'}: {reason}")


def _unpack(any_msg: any_pb2.Any, message: Any, expected_type: str) -> Any:
    if any_msg.type_url == RESOURCE_WRAPPER:
        wrapper = discovery_pb2.Resource()
        if not any_msg.Unpack(wrapper):
            raise ResourceError("", "cannot decode Resource wrapper")
        any_msg = wrapper.resource
    if any_msg.type_url != expected_type:
        raise ResourceError("", f"resource type {any_msg.type_url!r} in a {expected_type} response")
    try:
        if not any_msg.Unpack(message):
            raise ResourceError("", f"cannot decode {expected_type}")
    except ResourceError:
        raise
    except Exception as exc:  # protobuf DecodeError and friends
        raise ResourceError("", f"malformed {expected_type}: {exc}") from None
    return message


def _seconds(duration: Any) -> float:
    return duration.seconds + duration.nanos / 1e9


def _check_count(name: str, what: str, items: Any) -> None:
    if len(items) > MAX_ITEMS:
        raise ResourceError(name, f"{what} has {len(items)} entries (limit {MAX_ITEMS})")


# --- LDS -------------------------------------------------------------------

def decode_listener(any_msg: any_pb2.Any) -> Tuple[str, ListenerConfig]:
    listener = _unpack(any_msg, listener_pb2.Listener(), LDS)
    name = listener.name
    if not name:
        raise ResourceError("", "listener without a name")
    if not listener.HasField("api_listener"):
        if listener.filter_chains or listener.HasField("default_filter_chain"):
            # A server (inbound) listener: filter chains instead of an api_listener.
            try:
                return name, decode_server_listener(listener)
            except ValueError as exc:
                raise ResourceError(name, str(exc)) from None
        raise ResourceError(name, "not an API listener (no api_listener); client listeners need one")
    api = listener.api_listener.api_listener
    if api.type_url != HCM_TYPE:
        raise ResourceError(name, f"api_listener is {api.type_url!r}, expected HttpConnectionManager")
    hcm = http_connection_manager_pb2.HttpConnectionManager()
    try:
        api.Unpack(hcm)
    except Exception as exc:
        raise ResourceError(name, f"malformed HttpConnectionManager: {exc}") from None
    _check_count(name, "http_filters", hcm.http_filters)
    for http_filter in hcm.http_filters:
        _check_http_filter(name, http_filter)
    filters = tuple(f.name for f in hcm.http_filters)
    which = hcm.WhichOneof("route_specifier")
    if which == "rds":
        source = hcm.rds.config_source
        if source.WhichOneof("config_source_specifier") not in ("ads", "self"):
            raise ResourceError(name, "RDS config_source must be ads (only ADS is supported)")
        if not hcm.rds.route_config_name:
            raise ResourceError(name, "rds.route_config_name is empty")
        return name, ListenerConfig(name, hcm.rds.route_config_name, None, filters)
    if which == "route_config":
        try:
            routes = _route_config(hcm.route_config, hcm.route_config.name or name)
        except ResourceError as exc:
            # The error belongs to this listener: under the inline config's own
            # name it would NACK (and drop from this response) whichever
            # listener happens to carry that name, and leave this one unnamed.
            raise ResourceError(name, f"inline route_config {hcm.route_config.name!r}: {exc.reason}") from None
        return name, ListenerConfig(name, None, routes, filters)
    raise ResourceError(name, f"HttpConnectionManager route specifier {which!r} not supported (need rds or route_config)")


# HTTP filters a client honours (gRPC A39): the router, fault injection and RBAC
# (server side).  Any other filter changes request handling in ways meshpatch
# would silently skip, so, as gRPC does, it is an error unless marked optional.
SUPPORTED_HTTP_FILTERS = frozenset({
    "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
    "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault",
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
})


def _check_http_filter(listener: str, http_filter: Any) -> None:
    kind = http_filter.typed_config.type_url if http_filter.HasField("typed_config") else ""
    if kind in SUPPORTED_HTTP_FILTERS or http_filter.is_optional:
        return
    label = http_filter.name or "<unnamed>"
    if not kind:
        raise ResourceError(listener, f"http filter {label!r} has no typed_config")
    raise ResourceError(listener, f"http filter {label!r} of type {kind} is not supported and not optional")


# --- RDS -------------------------------------------------------------------

def decode_route_config(any_msg: any_pb2.Any) -> Tuple[str, RouteConfig]:
    config = _unpack(any_msg, route_pb2.RouteConfiguration(), RDS)
    if not config.name:
        raise ResourceError("", "route configuration without a name")
    return config.name, _route_config(config, config.name)


def _route_config(config: Any, name: str) -> RouteConfig:
    _check_count(name, "virtual_hosts", config.virtual_hosts)
    vhosts = []
    for vh in config.virtual_hosts:
        if not vh.domains:
            raise ResourceError(name, f"virtual host {vh.name!r} has no domains")
        _check_count(name, "routes", vh.routes)
        routes = []
        for index, route in enumerate(vh.routes):
            decoded = _route(route, name, vh, index)
            if decoded is not None:
                routes.append(decoded)
        vhosts.append(VirtualHost(vh.name, tuple(d.lower() for d in vh.domains), tuple(routes)))
    return RouteConfig(name, tuple(vhosts))


_DENOMINATORS = {0: 100.0, 1: 10_000.0, 2: 1_000_000.0}


def _route(route: Any, config_name: str, vhost_proto: Any, index: int):
    vhost = vhost_proto.name
    where = f"route {route.name or index} of virtual host {vhost!r}"
    match = route.match
    try:
        path = _path_matcher(match)
    except ValueError as exc:
        raise ResourceError(config_name, f"{where}: {exc}") from None
    if path is None:
        return None  # unsupported path specifier (connect_matcher, path_match_policy): gRPC skips the route
    headers = []
    for hm in match.headers:
        try:
            headers.append(_header_matcher(hm))
        except ValueError as exc:
            raise ResourceError(config_name, f"{where}: {exc}") from None
    fraction = None
    if match.HasField("runtime_fraction"):
        default = match.runtime_fraction.default_value
        denominator = _DENOMINATORS.get(default.denominator)
        if denominator is None:
            raise ResourceError(config_name, f"{where}: unknown runtime_fraction denominator")
        fraction = min(default.numerator / denominator, 1.0)
    action_kind = route.WhichOneof("action")
    if action_kind == "non_forwarding_action":
        action = RouteAction("non_forwarding")
    elif action_kind == "route":
        action = _route_action(route.route, config_name, where)
        if action is None:
            return None
    elif action_kind == "redirect":
        action = RouteAction("redirect")
    elif action_kind == "direct_response":
        action = RouteAction("direct")
    else:
        return None  # filter_action etc.: skipped, as gRPC does
    try:
        policy = route_policy(route, vhost_proto)
    except ValueError as exc:
        raise ResourceError(config_name, f"{where}: {exc}") from None
    return Route(route.name, RouteMatch(path, tuple(headers), fraction), action, policy)


def _path_matcher(match: Any):
    case_sensitive = match.case_sensitive.value if match.HasField("case_sensitive") else True
    which = match.WhichOneof("path_specifier")
    if which == "prefix":
        return PathMatcher("prefix", match.prefix, case_sensitive)
    if which == "path":
        return PathMatcher("path", match.path, case_sensitive)
    if which == "safe_regex":
        return PathMatcher("regex", match.safe_regex.regex, case_sensitive)
    if which == "path_separated_prefix":
        return PathMatcher("regex", _separated_prefix_regex(match.path_separated_prefix), case_sensitive)
    if which is None:
        raise ValueError("route match has no path specifier")
    return None


def _separated_prefix_regex(prefix: str) -> str:
    import re

    return re.escape(prefix.rstrip("/")) + r"(?:[/?#].*)?"


def _string_matcher(sm: Any) -> StringMatcher:
    which = sm.WhichOneof("match_pattern")
    if which == "safe_regex":
        return StringMatcher("regex", sm.safe_regex.regex)
    if which in ("exact", "prefix", "suffix", "contains"):
        return StringMatcher(which, getattr(sm, which), sm.ignore_case)
    raise ValueError(f"string matcher {which!r} not supported")


def _header_matcher(hm: Any) -> HeaderMatcher:
    if not hm.name:
        raise ValueError("header matcher without a name")
    which = hm.WhichOneof("header_match_specifier")
    invert = hm.invert_match
    missing_empty = hm.treat_missing_header_as_empty
    if which == "present_match":
        return HeaderMatcher(hm.name, "present", present=hm.present_match, invert=invert)
    if which is None:
        # No specifier: Envoy treats it as a presence check.
        return HeaderMatcher(hm.name, "present", present=True, invert=invert)
    if which == "range_match":
        return HeaderMatcher(hm.name, "range", range_=(hm.range_match.start, hm.range_match.end), invert=invert,
                             treat_missing_as_empty=missing_empty)
    if which == "string_match":
        string = _string_matcher(hm.string_match)
    elif which == "exact_match":
        string = StringMatcher("exact", hm.exact_match)
    elif which == "safe_regex_match":
        string = StringMatcher("regex", hm.safe_regex_match.regex)
    elif which in ("prefix_match", "suffix_match", "contains_match"):
        string = StringMatcher(which.split("_")[0], getattr(hm, which))
    else:
        raise ValueError(f"header matcher {which!r} not supported")
    return HeaderMatcher(hm.name, "string", string=string, invert=invert, treat_missing_as_empty=missing_empty)


def _route_action(action: Any, config_name: str, where: str):
    timeout = _seconds(action.timeout) if action.HasField("timeout") else 0.0
    msd = 0.0
    if action.HasField("max_stream_duration") and action.max_stream_duration.HasField("max_stream_duration"):
        msd = _seconds(action.max_stream_duration.max_stream_duration)
    which = action.WhichOneof("cluster_specifier")
    if which == "cluster":
        if not action.cluster:
            raise ResourceError(config_name, f"{where}: empty cluster name")
        return RouteAction("cluster", cluster=action.cluster, timeout=timeout, max_stream_duration=msd)
    if which == "weighted_clusters":
        clusters = action.weighted_clusters.clusters
        _check_count(config_name, "weighted clusters", clusters)
        weights = tuple(ClusterWeight(c.name, c.weight.value) for c in clusters if c.weight.value > 0)
        if not weights:
            raise ResourceError(config_name, f"{where}: weighted_clusters total weight is 0")
        if any(not w.name for w in weights):
            raise ResourceError(config_name, f"{where}: weighted cluster without a name")
        if sum(w.weight for w in weights) > 0xFFFFFFFF:
            raise ResourceError(config_name, f"{where}: weighted_clusters total weight exceeds uint32")
        return RouteAction("weighted", weighted=weights, timeout=timeout, max_stream_duration=msd)
    return None  # cluster_header / cluster_specifier_plugin: route skipped, as gRPC does


# --- CDS -------------------------------------------------------------------

_DISCOVERY_NAMES = {v: k for k, v in cluster_pb2.Cluster.DiscoveryType.items()}


def decode_cluster(any_msg: any_pb2.Any) -> Tuple[str, ClusterConfig]:
    from meshpatch.xds import decode_lb as policy  # local: keeps this file's import block untouched

    cluster = _unpack(any_msg, cluster_pb2.Cluster(), CDS)
    name = cluster.name
    if not name:
        raise ResourceError("", "cluster without a name")
    if cluster.WhichOneof("cluster_discovery_type") != "type" or cluster.type != cluster_pb2.Cluster.EDS:
        kind = cluster.WhichOneof("cluster_discovery_type")
        label = _DISCOVERY_NAMES.get(cluster.type, str(cluster.type)) if kind == "type" else kind  # open enum: any number
        raise ResourceError(name, f"cluster discovery type {label} not supported (only EDS)")
    eds = cluster.eds_cluster_config
    if eds.eds_config.WhichOneof("config_source_specifier") not in ("ads", "self"):
        raise ResourceError(name, "eds_config must be ads (only ADS is supported)")
    tls = None
    if cluster.HasField("transport_socket"):
        try:
            tls = upstream_tls(cluster.transport_socket)
        except ValueError as exc:
            raise ResourceError(name, f"transport_socket: {exc}") from None
    try:
        lb = policy.lb_config(cluster)
        breakers = policy.circuit_breakers(cluster)
        outlier = policy.outlier_detection(cluster)
    except ValueError as exc:
        raise ResourceError(name, str(exc)) from None
    return name, ClusterConfig(name, eds.service_name or name, lb.policy, lb, breakers, outlier,
                               subset_labels=_subset_labels(cluster), tls=tls)


def _subset_labels(cluster: Any):
    """``filter_metadata["meshpatch"].subset_labels`` (our control plane) → sorted pairs, or None."""
    ours = cluster.metadata.filter_metadata.get("meshpatch") if cluster.HasField("metadata") else None
    if ours is None or "subset_labels" not in ours.fields:
        return None
    value = ours.fields["subset_labels"]
    if value.WhichOneof("kind") != "struct_value":
        raise ResourceError(cluster.name, "metadata meshpatch.subset_labels must be a map of strings")
    pairs = []
    for key, item in value.struct_value.fields.items():
        if item.WhichOneof("kind") != "string_value":
            raise ResourceError(cluster.name, f"metadata meshpatch.subset_labels.{key} is not a string")
        pairs.append((key, item.string_value))
    return tuple(sorted(pairs))


# --- EDS -------------------------------------------------------------------

def decode_endpoints(any_msg: any_pb2.Any) -> Tuple[str, EndpointsConfig]:
    cla = _unpack(any_msg, endpoint_pb2.ClusterLoadAssignment(), EDS)
    name = cla.cluster_name
    if not name:
        raise ResourceError("", "ClusterLoadAssignment without cluster_name")
    _check_count(name, "locality groups", cla.endpoints)
    localities = []
    total = 0
    seen = set()
    for group in cla.endpoints:
        locality = f"{group.locality.region}/{group.locality.zone}/{group.locality.sub_zone}"
        _check_count(name, "endpoints", group.lb_endpoints)
        total += len(group.lb_endpoints)
        if total > MAX_ITEMS:
            raise ResourceError(name, f"more than {MAX_ITEMS} endpoints")
        endpoints = []
        for lb_ep in group.lb_endpoints:
            if lb_ep.WhichOneof("host_identifier") != "endpoint":
                raise ResourceError(name, "lb_endpoint without an endpoint (named endpoints unsupported)")
            sock = lb_ep.endpoint.address.socket_address
            if not lb_ep.endpoint.address.HasField("socket_address") or not sock.address:
                raise ResourceError(name, "endpoint without a socket address")
            if not 0 < sock.port_value < 65536:
                raise ResourceError(name, f"endpoint {sock.address} has invalid port {sock.port_value}")
            key = (sock.address, sock.port_value)
            if key in seen:
                # gRPC NACKs these too; per-endpoint state (least request, ejection) is keyed by address.
                raise ResourceError(name, f"duplicate endpoint address {sock.address}:{sock.port_value}")
            seen.add(key)
            metadata = _metadata(lb_ep.metadata) if lb_ep.HasField("metadata") else {}
            weight = lb_ep.load_balancing_weight.value if lb_ep.HasField("load_balancing_weight") else 1
            endpoints.append(Endpoint(sock.address, sock.port_value, int(lb_ep.health_status), weight or 1, metadata, locality))
        weight = group.load_balancing_weight.value if group.HasField("load_balancing_weight") else 0
        localities.append(LocalityEndpoints(locality, weight, group.priority, tuple(endpoints)))
    return name, EndpointsConfig(name, tuple(localities))


def _metadata(metadata: Any) -> Dict[str, Any]:
    return {key: MessageToDict(value) for key, value in metadata.filter_metadata.items()}


DECODERS: Dict[str, Callable[[any_pb2.Any], Tuple[str, Any]]] = {
    LDS: decode_listener,
    RDS: decode_route_config,
    CDS: decode_cluster,
    EDS: decode_endpoints,
}


def decode_response(type_url: str, resources: List[any_pb2.Any],
                    raw_out: Optional[Dict[str, any_pb2.Any]] = None) -> Tuple[Dict[str, Any], List[ResourceError]]:
    """Decode every resource; returns (valid name → model, errors).  Duplicates are errors.
    ``raw_out`` receives name → the resource as received, for each valid one
    (the pod relay forwards accepted resources byte for byte)."""
    decoder = DECODERS.get(type_url)
    if decoder is None:
        return {}, [ResourceError("", f"unsupported type {type_url}")]
    valid: Dict[str, Any] = {}
    errors: List[ResourceError] = []
    seen = set()
    for any_msg in resources:
        try:
            name, model = decoder(any_msg)
        except ResourceError as exc:
            errors.append(exc)
            if exc.name:
                seen.add(exc.name)
                valid.pop(exc.name, None)
            continue
        except Exception as exc:  # a decoder bug must not take the client down
            errors.append(ResourceError("", f"cannot decode resource: {exc!r}"))
            continue
        if name in seen:
            errors.append(ResourceError(name, "duplicate resource name in one response"))
            valid.pop(name, None)
            continue
        seen.add(name)
        valid[name] = model
        if raw_out is not None:
            raw_out[name] = any_msg
    if raw_out is not None:
        for name in list(raw_out):
            if name not in valid:
                del raw_out[name]
    return valid, errors
