"""EDS ∪ registry instances for one cluster: the merge the README specifies.

* Which registry instances join a cluster: those of the cluster's host whose
  port is the cluster's port (all of them if none is: an app that calls
  ``http://user-service/`` means whatever port the registry says), and, for a
  subset cluster, whose labels match the subset's labels.
* De-duplicated by ``address:port``: an endpoint xDS already lists keeps its
  place (locality, weight) and gains the registry's labels; if a registry says
  it is unhealthy (or weight 0) it is not used, whatever EDS says.
* The others are added at the lowest priority: into the locality if EDS has
  just one there (plain round robin over the union), else as a locality of
  their own weighted like an average EDS endpoint each (istiod weighs a
  locality by the sum of its endpoint weights).

Pure functions over immutable values; called when EDS or a registry changes,
never per request.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from meshpatch.routing.model import Endpoint, EndpointsConfig, LocalityEndpoints

HEALTHY = 1
UNHEALTHY = 2
REGISTRY_LOCALITY = "registry"
METADATA_KEY = "meshpatch"


def parse_cluster_name(name: str) -> Optional[Tuple[str, str, int]]:
    """``outbound|PORT|SUBSET|FQDN`` (istiod's and our control plane's names) →
    (subset, host, port); None for other names."""
    parts = name.split("|")
    if len(parts) != 4 or parts[0] != "outbound" or not parts[3]:
        return None
    try:
        port = int(parts[1])
    except ValueError:
        return None
    return parts[2], parts[3].lower(), port


def subset_selector(subset: str, subset_labels: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    """The labels a registry instance needs to join a subset cluster.  The local
    control plane sends the DestinationRule's labels in the Cluster's metadata;
    istiod does not, so a subset named ``v2`` then selects ``version: v2``."""
    if subset_labels is not None:
        return subset_labels
    return {"version": subset} if subset else {}


def for_port(instances: Sequence[Any], port: int) -> List[Any]:
    exact = [inst for inst in instances if inst.port == port]
    return exact or list(instances)


def matching(instances: Iterable[Any], selector: Mapping[str, str]) -> List[Any]:
    if not selector:
        return list(instances)
    return [inst for inst in instances if all(inst.labels.get(k) == v for k, v in selector.items())]


def registry_endpoint(inst: Any, locality: str = REGISTRY_LOCALITY) -> Endpoint:
    usable = inst.healthy and inst.weight > 0
    metadata = {METADATA_KEY: {"labels": dict(inst.labels), "registry": inst.source, "service": inst.service}}
    return Endpoint(inst.address, inst.port, HEALTHY if usable else UNHEALTHY, max(inst.weight, 1), metadata, locality)


def _enrich(ep: Endpoint, inst: Any) -> Endpoint:
    metadata: Dict[str, Any] = dict(ep.metadata)
    ours = dict(metadata.get(METADATA_KEY) or {})
    labels = dict(inst.labels)
    labels.update(ours.get("labels") or {})
    ours.update({"labels": labels, "registry": inst.source, "service": inst.service})
    metadata[METADATA_KEY] = ours
    health = ep.health if (inst.healthy and inst.weight > 0) else UNHEALTHY
    return Endpoint(ep.address, ep.port, health, ep.weight, metadata, ep.locality)


def _rescaled(extra: Tuple[Endpoint, ...], peers: Sequence[Endpoint]) -> Tuple[Endpoint, ...]:
    """Registry weights are on the registry's scale (Dubbo: 100 by default), EDS
    weights on istiod's (1); round robin honours endpoint weights (Envoy), so
    instances sharing a locality with EDS endpoints are rescaled to weigh, on
    average, like an average EDS endpoint there, keeping their ratios."""
    if not peers or not extra:
        return extra
    mean_eds = sum(ep.weight for ep in peers) / len(peers)
    mean_reg = sum(ep.weight for ep in extra) / len(extra)
    if mean_reg == mean_eds:
        return extra
    return tuple(Endpoint(ep.address, ep.port, ep.health, max(1, round(ep.weight * mean_eds / mean_reg)), ep.metadata,
                          ep.locality) for ep in extra)


def merge_endpoints(
    cluster_name: str,
    eds: Optional[EndpointsConfig],
    joining: Sequence[Any],
    known: Sequence[Any] = (),
) -> EndpointsConfig:
    """``joining``: registry instances selected for this cluster (already unique by
    address:port, as the catalog merges them); ``known``: every
    instance of the host (their health and labels apply to EDS endpoints at the
    same address:port even when they do not select into this cluster)."""
    by_key = {inst.key: inst for inst in known}
    by_key.update({inst.key: inst for inst in joining})
    localities: List[LocalityEndpoints] = []
    seen = set()
    for loc in eds.localities if eds is not None else ():
        endpoints = []
        for ep in loc.endpoints:
            key = (ep.address, ep.port)
            seen.add(key)
            inst = by_key.get(key)
            endpoints.append(_enrich(ep, inst) if inst is not None else ep)
        localities.append(LocalityEndpoints(loc.locality, loc.weight, loc.priority, tuple(endpoints)))
    extra = tuple(registry_endpoint(inst) for inst in joining if inst.key not in seen)
    if not extra:
        return EndpointsConfig(cluster_name, tuple(localities))
    if not localities:
        return EndpointsConfig(cluster_name, (LocalityEndpoints(REGISTRY_LOCALITY, 0, 0, extra),))
    first = min(loc.priority for loc in localities)
    same = [index for index, loc in enumerate(localities) if loc.priority == first]
    if len(same) == 1:
        loc = localities[same[0]]
        weight = loc.weight + len(extra) if loc.weight else 0
        extra = _rescaled(extra, loc.endpoints)
        localities[same[0]] = LocalityEndpoints(loc.locality, weight, loc.priority, loc.endpoints + extra)
    else:
        total_weight = sum(localities[i].weight for i in same)
        total_endpoints = sum(len(localities[i].endpoints) for i in same)
        if total_weight:
            weight = max(1, round(len(extra) * total_weight / max(1, total_endpoints)))
        else:
            weight = 0
        localities.append(LocalityEndpoints(REGISTRY_LOCALITY, weight, first, extra))
    return EndpointsConfig(cluster_name, tuple(localities))
