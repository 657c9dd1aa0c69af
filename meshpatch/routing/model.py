"""Validated, immutable forms of the xDS resources that the router needs.

The xDS decoder turns protobuf resources into these objects once per update
(compiling regexes, normalising names); the per-request pick then only reads
plain attributes.  Nothing here imports protobuf or a patched library.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple

from meshpatch.routing.cluster_policy import DEFAULT_CIRCUIT_BREAKERS, DEFAULT_LB, CircuitBreakers, LbConfig, OutlierConfig
from meshpatch.routing.matchers import HeaderMatcher, PathMatcher
from meshpatch.routing.route_policy import NO_POLICY, RoutePolicy
from meshpatch.security.model import UpstreamTls


@dataclass(frozen=True, slots=True)
class ClusterWeight:
    name: str
    weight: int


@dataclass(frozen=True, slots=True)
class RouteAction:
    """Where a matched request goes: one cluster or a weighted set.

    ``kind`` is ``cluster``, ``weighted``, ``redirect`` / ``direct`` (answered
    locally, HTTP only) or ``non_forwarding`` (server-side inbound listeners).
    ``timeout``/``max_stream_duration`` are seconds, 0 = none.
    """

    kind: str
    cluster: str = ""
    weighted: Tuple[ClusterWeight, ...] = ()
    timeout: float = 0.0
    max_stream_duration: float = 0.0


@dataclass(frozen=True, slots=True)
class RouteMatch:
    path: PathMatcher
    headers: Tuple[HeaderMatcher, ...] = ()
    # runtime_fraction default value as a probability in [0, 1]; None = always.
    fraction: Optional[float] = None


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    match: RouteMatch
    action: RouteAction
    policy: RoutePolicy = NO_POLICY


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    domains: Tuple[str, ...]
    routes: Tuple[Route, ...]


@dataclass(frozen=True, slots=True)
class RouteConfig:
    name: str
    virtual_hosts: Tuple[VirtualHost, ...]


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """An API listener: either names an RDS resource or carries the routes inline."""

    name: str
    rds_name: Optional[str]
    inline_routes: Optional[RouteConfig]
    http_filters: Tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """``lb_policy`` names the policy (``lb.policy``); ``outlier`` is None when the
    cluster carries no outlier_detection (meshpatch's default then applies)."""

    name: str
    eds_service_name: str
    lb_policy: str = "ROUND_ROBIN"
    lb: LbConfig = DEFAULT_LB
    circuit_breakers: CircuitBreakers = DEFAULT_CIRCUIT_BREAKERS
    outlier: Optional[OutlierConfig] = None
    # The DestinationRule subset's labels when the control plane sends them
    # (filter_metadata "meshpatch".subset_labels; istiod does not): which
    # registry instances join this cluster.  None = not sent.
    subset_labels: Optional[Tuple[Tuple[str, str], ...]] = None
    # mTLS origination from the cluster's transport_socket; None = plaintext.
    tls: Optional[UpstreamTls] = None


HEALTHY_STATES = frozenset({0, 1})  # UNKNOWN, HEALTHY: the only ones gRPC sends to


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    health: int = 0
    weight: int = 1
    metadata: Mapping[str, Any] = field(default_factory=dict)
    locality: str = ""


@dataclass(frozen=True, slots=True)
class LocalityEndpoints:
    locality: str  # "region/zone/sub_zone"
    weight: int  # 0 = unset
    priority: int
    endpoints: Tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class EndpointsConfig:
    cluster_name: str
    localities: Tuple[LocalityEndpoints, ...]
