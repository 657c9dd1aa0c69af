"""Small builders for envoy v3 resources, for protocol-level tests."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import wrappers_pb2


def listener(name: str, rds_name: str) -> listener_pb2.Listener:
    hcm = hcm_pb2.HttpConnectionManager()
    hcm.rds.route_config_name = rds_name
    hcm.rds.config_source.ads.SetInParent()
    router_filter = hcm.http_filters.add(name="envoy.filters.http.router")
    router_filter.typed_config.Pack(router_pb2.Router())
    lis = listener_pb2.Listener(name=name)
    lis.api_listener.api_listener.Pack(hcm)
    return lis


def route(prefix: str = "/", cluster: Optional[str] = None, weighted: Optional[Sequence[Tuple[str, int]]] = None,
          headers: Optional[Dict[str, str]] = None, path: Optional[str] = None, regex: Optional[str] = None,
          name: str = "") -> route_components_pb2.Route:
    r = route_components_pb2.Route(name=name)
    if path is not None:
        r.match.path = path
    elif regex is not None:
        r.match.safe_regex.regex = regex
    else:
        r.match.prefix = prefix
    for key, value in (headers or {}).items():
        r.match.headers.add(name=key).string_match.exact = value
    if weighted:
        for cname, weight in weighted:
            r.route.weighted_clusters.clusters.add(name=cname, weight=wrappers_pb2.UInt32Value(value=weight))
    else:
        r.route.cluster = cluster or ""
    return r


def route_config(name: str, vhosts: Iterable[Tuple[str, Sequence[str], Sequence[route_components_pb2.Route]]]) -> route_pb2.RouteConfiguration:
    rc = route_pb2.RouteConfiguration(name=name)
    for vname, domains, routes in vhosts:
        vh = rc.virtual_hosts.add(name=vname)
        vh.domains.extend(domains)
        vh.routes.extend(routes)
    return rc


def cluster(name: str, lb: int = cluster_pb2.Cluster.ROUND_ROBIN, service_name: Optional[str] = None) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name, type=cluster_pb2.Cluster.EDS, lb_policy=lb)
    c.eds_cluster_config.service_name = service_name or name
    c.eds_cluster_config.eds_config.ads.SetInParent()
    return c


def cla(name: str, endpoints: Sequence[Tuple[str, int]], locality: Tuple[str, str, str] = ("r", "z", ""),
        weight: int = 1, priority: int = 0, health: int = health_check_pb2.HEALTHY,
        extra_groups: Sequence[Tuple[Tuple[str, str, str], int, int, Sequence[Tuple[str, int]]]] = ()) -> endpoint_pb2.ClusterLoadAssignment:
    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    groups: List = [(locality, weight, priority, endpoints)] + list(extra_groups)
    for (region, zone, sub), gweight, gprio, eps in groups:
        group = out.endpoints.add(priority=gprio)
        group.locality.CopyFrom(base_pb2.Locality(region=region, zone=zone, sub_zone=sub))
        group.load_balancing_weight.value = gweight
        for address, port in eps:
            lb = group.lb_endpoints.add(health_status=health)
            lb.endpoint.address.socket_address.address = address
            lb.endpoint.address.socket_address.port_value = port
    return out
