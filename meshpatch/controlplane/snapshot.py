"""An immutable, indexed view of one loaded Istio config (istiod's PushContext).

Generators only ask questions ("which service is this host", "which
DestinationRule applies for a proxy in namespace N") so the lookup rules live
in one place and every xDS type answers them the same way.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from .istio_config import (
    DestinationRule,
    IstioConfig,
    ServiceEntry,
    ServicePort,
    Subset,
    TrafficPolicy,
    VirtualService,
    WorkloadSpec,
)

log = logging.getLogger("meshpatch.controlplane")

DOMAIN_SUFFIX = "cluster.local"
ROOT_NAMESPACE = "istio-system"
MESH_GATEWAY = "mesh"
HTTP_PROTOCOLS = {"HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY"}
# Protocols Istio does not sniff: anything else (incl. unset/unknown) is HTTP-or-sniffed.
NON_HTTP_PROTOCOLS = {"HTTPS", "TCP", "TLS", "MONGO", "REDIS", "MYSQL", "UDP", "THRIFT"}


def is_http_or_sniffed(protocol: str) -> bool:
    return protocol.upper() not in NON_HTTP_PROTOCOLS


def resolve_short_name(host: str, namespace: str) -> str:
    """Istio's ResolveShortnameToFQDN: a name without dots is namespace-relative."""
    if "." in host or host.startswith("*"):
        return host
    return f"{host}.{namespace}.svc.{DOMAIN_SUFFIX}"


def host_matches(pattern: str, hostname: str) -> bool:
    """host.Name.Matches for a concrete hostname: exact, ``*`` or ``*.suffix``."""
    if pattern == "*" or pattern == hostname:
        return True
    if pattern.startswith("*."):
        return hostname.endswith(pattern[1:])
    return False


def is_ip(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return False


@dataclass(frozen=True)
class Locality:
    region: str = ""
    zone: str = ""
    sub_zone: str = ""

    @classmethod
    def parse(cls, text: str) -> "Locality":
        parts = (text.split("/") + ["", "", ""])[:3] if text else ["", "", ""]
        return cls(*parts)

    @property
    def label(self) -> str:
        return "/".join((self.region, self.zone, self.sub_zone)) if (self.region or self.zone or self.sub_zone) else ""


@dataclass
class Endpoint:
    address: str
    ports: Dict[str, int]
    labels: Dict[str, str]
    locality: Locality
    weight: int
    namespace: str
    workload_name: str = ""  # set for WorkloadEntry-backed endpoints
    service_account: str = ""
    network: str = ""

    def port_for(self, port: ServicePort) -> int:
        """Istio: named endpoint port, else the service's targetPort, else its number."""
        if port.name in self.ports:
            return self.ports[port.name]
        if port.target_port:
            return port.target_port
        return port.number


@dataclass
class Service:
    hostname: str
    namespace: str
    vip: str
    ports: List[ServicePort]
    endpoints: List[Endpoint]
    resolution: str
    location: str
    entry: ServiceEntry = field(repr=False, default=None)  # type: ignore[assignment]

    def visible_to(self, namespace: str) -> bool:
        """ServiceEntry.exportTo (default: every namespace; "~" = none)."""
        return _exported_to(self.entry.export_to if self.entry else [], self.namespace, namespace)

    def port(self, number: int) -> Optional[ServicePort]:
        for p in self.ports:
            if p.number == number:
                return p
        return None


@dataclass(frozen=True)
class ProxyNode:
    """What istiod derives from the xDS node: namespace, DNS domain, labels."""

    id: str
    namespace: str
    dns_domain: str
    labels: Tuple[Tuple[str, str], ...] = ()
    generator: str = ""
    ip: str = ""
    # node.locality (region, zone, sub_zone): EDS priorities and weights are relative to it.
    locality: Tuple[str, str, str] = ("", "", "")

    @property
    def label_map(self) -> Dict[str, str]:
        return dict(self.labels)

    @classmethod
    def from_fields(cls, node_id: str, metadata: Dict[str, object],
                    locality: Tuple[str, str, str] = ("", "", "")) -> "ProxyNode":
        parts = node_id.split("~")
        ns = str(metadata.get("NAMESPACE") or "")
        if not ns and len(parts) >= 3 and "." in parts[2]:
            ns = parts[2].split(".", 1)[1]
        ns = ns or "default"
        dns_domain = parts[3] if len(parts) >= 4 and parts[3] else f"{ns}.svc.{DOMAIN_SUFFIX}"
        raw_labels = metadata.get("LABELS")
        labels: Tuple[Tuple[str, str], ...] = ()
        if isinstance(raw_labels, dict):
            labels = tuple(sorted((str(k), str(v)) for k, v in raw_labels.items()))
        return cls(
            id=node_id,
            namespace=ns,
            dns_domain=dns_domain,
            labels=labels,
            generator=str(metadata.get("GENERATOR") or ""),
            ip=parts[1] if len(parts) >= 2 else "",
            locality=locality,
        )


def _fake_vip(hostname: str, taken: set) -> str:
    """Deterministic 240.240.x.y like Istio's auto-allocation (class E, never routed)."""
    h = int.from_bytes(hashlib.sha256(hostname.encode()).digest()[:4], "big")
    n = h % (256 * 254)
    for _ in range(256 * 254):
        vip = f"240.240.{n // 254}.{n % 254 + 1}"
        if vip not in taken:
            return vip
        n = (n + 1) % (256 * 254)
    raise RuntimeError("fake VIP range exhausted")


def _endpoint(w: WorkloadSpec, namespace: str, workload_name: str = "") -> Endpoint:
    return Endpoint(
        address=w.address,
        ports=dict(w.ports),
        labels=dict(w.labels),
        locality=Locality.parse(w.locality),
        weight=w.weight if w.weight > 0 else 1,
        namespace=namespace,
        workload_name=workload_name,
        service_account=w.service_account,
        network=w.network,
    )


class Snapshot:
    """Indexed config.  Built once per load; never mutated afterwards."""

    def __init__(self, config: IstioConfig) -> None:
        self.config = config
        self.services: Dict[str, Service] = {}
        self._build_services(config)
        self.hostnames = sorted(self.services)
        self.destination_rules: List[DestinationRule] = list(config.destination_rules)
        self.virtual_services: List[VirtualService] = list(config.virtual_services)

    # ------------------------------------------------------------------ services

    def _build_services(self, config: IstioConfig) -> None:
        entries: List[Tuple[str, ServiceEntry]] = []
        for se in config.service_entries:
            for h in se.hosts:
                if h in self.services or any(h == e[0] for e in entries):
                    log.warning(
                        "meshpatch control plane: host %s is defined again by ServiceEntry %s/%s (%s); the first definition wins",
                        h, se.meta.namespace, se.meta.name, se.source,
                    )
                    continue
                entries.append((h, se))
        explicit = {h: se.addresses[0].split("/")[0] for h, se in entries if se.addresses}
        taken = set(explicit.values())
        for h, se in sorted(entries, key=lambda e: e[0]):
            vip = explicit.get(h)
            if vip is None:
                vip = _fake_vip(h, taken)
                taken.add(vip)
            self.services[h] = Service(
                hostname=h,
                namespace=se.meta.namespace,
                vip=vip,
                ports=list(se.ports),
                endpoints=self._endpoints_for(se, config),
                resolution=se.resolution,
                location=se.location,
                entry=se,
            )

    @staticmethod
    def _endpoints_for(se: ServiceEntry, config: IstioConfig) -> List[Endpoint]:
        if se.workload_selector is not None:
            sel = se.workload_selector
            return [
                _endpoint(we.spec, we.meta.namespace, we.meta.name)
                for we in config.workload_entries
                if we.meta.namespace == se.meta.namespace
                and all(we.spec.labels.get(k) == v for k, v in sel.items())
            ]
        return [_endpoint(w, se.meta.namespace) for w in se.endpoints]

    def service(self, hostname: str, proxy_namespace: Optional[str] = None) -> Optional[Service]:
        """The service for a host; with ``proxy_namespace``, only if exported there."""
        svc = self.services.get(hostname)
        if svc is not None and proxy_namespace is not None and not svc.visible_to(proxy_namespace):
            return None
        return svc

    def services_sorted(self, proxy_namespace: Optional[str] = None) -> List[Service]:
        out = [self.services[h] for h in self.hostnames]
        if proxy_namespace is not None:
            out = [s for s in out if s.visible_to(proxy_namespace)]
        return out

    # ------------------------------------------------------------------ destination rules

    def destination_rule(self, hostname: str, proxy_namespace: str, service_namespace: str) -> Optional[DestinationRule]:
        """Istio's lookup order: the proxy's namespace, then the service's, then
        the root namespace; within one, the most specific host; several rules
        for the same host in one namespace are merged (first one wins for the
        traffic policy, subsets are concatenated)."""
        for ns in _unique((proxy_namespace, service_namespace, ROOT_NAMESPACE)):
            candidates = []
            for dr in self.destination_rules:
                if dr.meta.namespace != ns:
                    continue
                if ns != proxy_namespace and not _exported_to(dr.export_to, dr.meta.namespace, proxy_namespace):
                    continue
                if dr.workload_selector:
                    continue  # workload-scoped rules apply to servers' sidecars, not to clients
                h = resolve_short_name(dr.host, dr.meta.namespace)
                if host_matches(h, hostname):
                    candidates.append((h, dr))
            if not candidates:
                continue
            best = max(_specificity(h) for h, _ in candidates)
            return _merge_rules([dr for h, dr in candidates if _specificity(h) == best])
        return None

    def subset(self, dr: Optional[DestinationRule], name: str) -> Optional[Subset]:
        if dr is None or not name:
            return None
        for s in dr.subsets:
            if s.name == name:
                return s
        return None

    # ------------------------------------------------------------------ virtual services

    def virtual_service_for(self, hostname: str, proxy_namespace: str) -> Optional[VirtualService]:
        """First VirtualService bound to the mesh gateway whose hosts cover
        ``hostname``, the proxy's own namespace first (istiod orders private
        ones before exported ones); later ones for the same host are ignored
        like istiod's duplicate-vhost rule."""
        ordered = [vs for vs in self.virtual_services if vs.meta.namespace == proxy_namespace]
        ordered += [
            vs for vs in self.virtual_services
            if vs.meta.namespace != proxy_namespace and _exported_to(vs.export_to, vs.meta.namespace, proxy_namespace)
        ]
        best: Optional[VirtualService] = None
        best_score = -1
        for vs in ordered:
            if vs.gateways and MESH_GATEWAY not in vs.gateways:
                continue
            for h in vs.hosts:
                full = resolve_short_name(h, vs.meta.namespace)
                if host_matches(full, hostname):
                    score = 10**6 if full == hostname else len(full)
                    if score > best_score:
                        best, best_score = vs, score
        return best


def _specificity(host: str) -> Tuple[int, int]:
    """Exact hosts beat wildcards; among wildcards the longer suffix wins."""
    return (0, len(host)) if host.startswith("*") else (1, len(host))


def _unique(items: Iterable[str]) -> List[str]:
    out: List[str] = []
    for i in items:
        if i not in out:
            out.append(i)
    return out


def _exported_to(export_to: List[str], own_namespace: str, proxy_namespace: str) -> bool:
    if not export_to:
        return True
    for e in export_to:
        if e == "*" or e == proxy_namespace or (e == "." and own_namespace == proxy_namespace):
            return True
    return False


def _merge_rules(rules: List[DestinationRule]) -> DestinationRule:
    if len(rules) == 1:
        return rules[0]
    first = rules[0]
    subsets = list(first.subsets)
    names = {s.name for s in subsets}
    policy: Optional[TrafficPolicy] = first.traffic_policy
    for dr in rules[1:]:
        if policy is None:
            policy = dr.traffic_policy
        for s in dr.subsets:
            if s.name not in names:
                subsets.append(s)
                names.add(s.name)
    return DestinationRule(
        meta=first.meta, host=first.host, traffic_policy=policy, subsets=subsets,
        export_to=first.export_to, workload_selector=first.workload_selector, source=first.source,
    )
