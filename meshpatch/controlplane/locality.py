"""Per-proxy locality load balancing of an EDS answer, as istiod does it.

istiod does not send locality settings to clients; it rewrites each
ClusterLoadAssignment for the proxy that asks (``loadbalancer.go``):
``distribute`` becomes locality weights, failover becomes EDS priorities by
proximity to the proxy's locality (region/zone/sub-zone), ``failoverPriority``
splits localities by how many of the listed labels an endpoint shares with the
proxy.  Failover only applies when the DestinationRule has outlier detection
(otherwise nothing would ever move traffic down a priority).  gRPC's own
client and meshpatch both read the result as plain priorities and weights.
"""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence, Tuple

from google.protobuf import wrappers_pb2

from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from .istio_config import LocalityDistribute, LocalityLbSetting

NETWORK_LABEL = "topology.istio.io/network"

#: one label map per LbEndpoint of each LocalityLbEndpoints, in the same order
EndpointLabels = List[List[Mapping[str, str]]]


def apply_locality_lb(
    cla: endpoint_pb2.ClusterLoadAssignment,
    labels: EndpointLabels,
    proxy: base_pb2.Locality,
    proxy_labels: Mapping[str, str],
    setting: LocalityLbSetting,
    enable_failover: bool,
) -> None:
    """loadbalancer.go ApplyLocalityLoadBalancer (in place)."""
    if setting.distribute:
        _apply_weights(cla, proxy, setting.distribute)
    elif enable_failover:
        if setting.failover_priority:
            _apply_failover_priorities(cla, labels, proxy_labels, setting.failover_priority)
            if setting.failover:
                _apply_failover(cla, proxy, setting.failover)
        else:
            _apply_failover(cla, proxy, setting.failover)


def locality_match(locality: base_pb2.Locality, rule: str) -> bool:
    """util.LocalityMatch: ``region/zone/sub_zone`` with ``*`` or a missing part matching anything."""
    region, zone, sub_zone = (rule.split("/", 2) + ["", ""])[:3]
    return (
        (region == "*" or locality.region == region)
        and (zone in ("*", "") or locality.zone == zone)
        and (sub_zone in ("*", "") or locality.sub_zone == sub_zone)
    )


def lb_priority(proxy: base_pb2.Locality, ep: base_pb2.Locality) -> int:
    """util.LbPriority: 0 same sub-zone, 1 same zone, 2 same region, 3 elsewhere."""
    if proxy.region == ep.region:
        if proxy.zone == ep.zone:
            return 0 if proxy.sub_zone == ep.sub_zone else 1
        return 2
    return 3


def _apply_weights(cla: endpoint_pb2.ClusterLoadAssignment, proxy: base_pb2.Locality,
                   distribute: Sequence[LocalityDistribute]) -> None:
    """applyLocalityWeights: the first rule whose ``from`` matches the proxy
    sets each matched locality's share; unmatched localities lose their endpoints."""
    for rule in distribute:
        if not locality_match(proxy, rule.from_):
            continue
        mismatched = set(range(len(cla.endpoints)))
        for pattern, weight in rule.to.items():
            original: Dict[int, int] = {}
            for i, group in enumerate(cla.endpoints):
                if i in mismatched and locality_match(group.locality, pattern):
                    mismatched.discard(i)
                    original[i] = group.load_balancing_weight.value if group.HasField("load_balancing_weight") else 1
            total = sum(original.values())
            for i, w in original.items():
                share = float(w * weight) / float(total)
                if share > 0:
                    cla.endpoints[i].load_balancing_weight.CopyFrom(wrappers_pb2.UInt32Value(value=math.ceil(share)))
        for i in mismatched:
            del cla.endpoints[i].lb_endpoints[:]
        return


def _compact(priorities: Mapping[int, List[int]], groups: Sequence[endpoint_components_pb2.LocalityLbEndpoints]) -> None:
    """Priorities must run 0..N without gaps."""
    for i, p in enumerate(sorted(priorities)):
        if i != p:
            for index in priorities[p]:
                groups[index].priority = i


def _apply_failover(cla: endpoint_pb2.ClusterLoadAssignment, proxy: base_pb2.Locality,
                    failover: Sequence[Tuple[str, str]]) -> None:
    """applyLocalityFailover: priority by proximity; with ``failover`` rules for
    the proxy's region, only the named region stays at 3, the others drop to 4."""
    by_priority: Dict[int, List[int]] = {}
    for i, group in enumerate(cla.endpoints):
        p = lb_priority(proxy, group.locality)
        if p == 3:
            for frm, to in failover:
                if frm == proxy.region:
                    if group.locality.region != to:
                        p = 4
                    break
        p = group.priority * 5 + p
        group.priority = p
        by_priority.setdefault(p, []).append(i)
    _compact(by_priority, cla.endpoints)


def _priority_labels(specs: Sequence[str]) -> Tuple[List[str], Dict[str, str]]:
    """``label`` or ``label=value`` (the value overrides the proxy's own)."""
    names: List[str] = []
    overrides: Dict[str, str] = {}
    for spec in specs:
        parts = spec.split("=")
        names.append(parts[0])
        if len(parts) == 2:
            overrides[parts[0]] = parts[1]
    return names, overrides


def _apply_failover_priorities(cla: endpoint_pb2.ClusterLoadAssignment, labels: EndpointLabels,
                               proxy_labels: Mapping[str, str], specs: Sequence[str]) -> None:
    """applyFailoverPriorities: split each locality by how many leading
    priority labels an endpoint shares with the proxy (more shared = higher)."""
    if not proxy_labels or not cla.endpoints:
        return
    names, overrides = _priority_labels(specs)
    lowest = len(specs)
    includes_network = lowest > 0 and specs[0] == NETWORK_LABEL
    out: List[endpoint_components_pb2.LocalityLbEndpoints] = []
    for group, group_labels in zip(list(cla.endpoints), labels):
        split: Dict[int, List[int]] = {}
        for i, ep_labels in enumerate(group_labels):
            priority = adjust = 0
            for j, name in enumerate(names):
                want = overrides.get(name, proxy_labels.get(name, ""))
                if want != ep_labels.get(name, ""):
                    if j == 0 and includes_network:
                        adjust = lowest  # another network: after everything on ours
                        continue
                    priority = lowest - j
                    break
            split.setdefault(priority + adjust, []).append(i)
        for p in sorted(split):
            part = endpoint_components_pb2.LocalityLbEndpoints()
            part.CopyFrom(group)
            del part.lb_endpoints[:]
            part.priority = p
            weight = 0
            for index in split[p]:
                part.lb_endpoints.append(group.lb_endpoints[index])
                weight += group.lb_endpoints[index].load_balancing_weight.value
            part.load_balancing_weight.value = weight
            out.append(part)
    by_priority: Dict[int, List[int]] = {}
    for i, part in enumerate(out):
        by_priority.setdefault(part.priority, []).append(i)
    _compact(by_priority, out)
    del cla.endpoints[:]
    cla.endpoints.extend(out)
