"""Istio YAML → plain model objects, with Istio-like validation per resource.

The control plane must behave like istiod fed by ``kubectl apply``: a resource
the API server would reject (unknown field, wrong type, bad enum) is skipped on
its own with one log line naming file, resource and reason, while every other
resource keeps working.  Fields we parse but do not translate yet are still
kept (``raw`` members), so a later change can translate more without
re-parsing.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import yaml

log = logging.getLogger("meshpatch.controlplane")

API_GROUP = "networking.istio.io"
API_VERSIONS = ("v1", "v1beta1", "v1alpha3")
DEFAULT_NAMESPACE = "default"


class Reject(Exception):
    """One resource is invalid; the message names the offending field."""


class ConfigLoadError(Exception):
    """A whole file could not be read or parsed (the reload is abandoned)."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ObjectMeta:
    name: str
    namespace: str
    labels: Dict[str, str] = field(default_factory=dict)
    annotations: Dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Duration:
    """A protobuf Duration; Istio YAML writes these as Go durations ("1.5s")."""

    seconds: int
    nanos: int = 0

    @property
    def total_seconds(self) -> float:
        return self.seconds + self.nanos / 1e9


@dataclass
class ServicePort:
    number: int
    name: str
    protocol: str = ""
    target_port: Optional[int] = None


@dataclass
class WorkloadSpec:
    """Istio's WorkloadEntry message: inline ServiceEntry endpoint or a WorkloadEntry's spec."""

    address: str = ""
    ports: Dict[str, int] = field(default_factory=dict)
    labels: Dict[str, str] = field(default_factory=dict)
    network: str = ""
    locality: str = ""
    weight: int = 0
    service_account: str = ""


@dataclass
class ServiceEntry:
    meta: ObjectMeta
    hosts: List[str]
    addresses: List[str] = field(default_factory=list)
    ports: List[ServicePort] = field(default_factory=list)
    location: str = "MESH_EXTERNAL"
    resolution: str = "NONE"
    endpoints: List[WorkloadSpec] = field(default_factory=list)
    workload_selector: Optional[Dict[str, str]] = None
    export_to: List[str] = field(default_factory=list)
    subject_alt_names: List[str] = field(default_factory=list)
    source: str = ""


@dataclass
class WorkloadEntry:
    meta: ObjectMeta
    spec: WorkloadSpec
    source: str = ""


@dataclass
class StringMatch:
    kind: str  # "exact" | "prefix" | "regex"; "" = empty match (present_match)
    value: str = ""


@dataclass
class HTTPMatchRequest:
    name: str = ""
    uri: Optional[StringMatch] = None
    scheme: Optional[StringMatch] = None
    method: Optional[StringMatch] = None
    authority: Optional[StringMatch] = None
    headers: Dict[str, StringMatch] = field(default_factory=dict)
    without_headers: Dict[str, StringMatch] = field(default_factory=dict)
    query_params: Dict[str, StringMatch] = field(default_factory=dict)
    ignore_uri_case: bool = False
    port: int = 0
    source_labels: Dict[str, str] = field(default_factory=dict)
    source_namespace: str = ""
    gateways: List[str] = field(default_factory=list)
    stat_prefix: str = ""


@dataclass
class Destination:
    host: str
    subset: str = ""
    port: int = 0


@dataclass
class HTTPRouteDestination:
    destination: Destination
    weight: int = 0
    headers: Optional["Headers"] = None


@dataclass
class HTTPRetry:
    attempts: int = 0
    per_try_timeout: Optional[Duration] = None
    retry_on: str = ""
    retry_remote_localities: Optional[bool] = None
    retry_ignore_previous_hosts: Optional[bool] = None
    backoff: Optional[Duration] = None


@dataclass
class FaultDelay:
    fixed_delay: Optional[Duration] = None
    percentage: Optional[float] = None
    percent: Optional[int] = None
    exponential: bool = False


@dataclass
class FaultAbort:
    http_status: Optional[int] = None
    grpc_status: Optional[str] = None
    percentage: Optional[float] = None


@dataclass
class HTTPFaultInjection:
    delay: Optional[FaultDelay] = None
    abort: Optional[FaultAbort] = None


@dataclass
class HeaderOperations:
    """Istio ``Headers.HeaderOperations``: ``set`` overwrites, ``add`` appends."""

    set: Dict[str, str] = field(default_factory=dict)
    add: Dict[str, str] = field(default_factory=dict)
    remove: List[str] = field(default_factory=list)


@dataclass
class Headers:
    request: Optional[HeaderOperations] = None
    response: Optional[HeaderOperations] = None


@dataclass
class HTTPRewrite:
    uri: str = ""
    authority: str = ""
    # uriRegexRewrite {match, rewrite}; None when not given.
    uri_regex: Optional[Tuple[str, str]] = None


@dataclass
class HTTPRedirect:
    uri: str = ""
    authority: str = ""
    port: Optional[int] = None
    derive_port: str = ""  # "" | FROM_PROTOCOL_DEFAULT | FROM_REQUEST_PORT
    scheme: str = ""
    redirect_code: int = 0
    prefix_rewrite: str = ""


@dataclass
class HTTPDirectResponse:
    status: int
    body_string: Optional[str] = None
    body_bytes: Optional[bytes] = None


@dataclass
class HTTPMirrorPolicy:
    destination: Destination
    percentage: Optional[float] = None


@dataclass
class HTTPRoute:
    name: str = ""
    match: List[HTTPMatchRequest] = field(default_factory=list)
    route: List[HTTPRouteDestination] = field(default_factory=list)
    timeout: Optional[Duration] = None
    retries: Optional[HTTPRetry] = None
    fault: Optional[HTTPFaultInjection] = None
    redirect: Optional[HTTPRedirect] = None
    direct_response: Optional[HTTPDirectResponse] = None
    rewrite: Optional[HTTPRewrite] = None
    headers: Optional[Headers] = None
    mirror: Optional[Destination] = None
    mirror_percent: Optional[int] = None  # deprecated integer percent
    mirror_percentage: Optional[float] = None
    mirrors: List[HTTPMirrorPolicy] = field(default_factory=list)
    # Parsed but not translated (delegate needs gateway semantics; CORS would make
    # gRPC clients NACK the whole RouteConfiguration, xds-istio.md §3.4).
    delegate: Optional[Dict[str, Any]] = None
    cors_policy: Optional[Dict[str, Any]] = None
    raw: Dict[str, Any] = field(default_factory=dict)


@dataclass
class VirtualService:
    meta: ObjectMeta
    hosts: List[str]
    gateways: List[str] = field(default_factory=list)
    http: List[HTTPRoute] = field(default_factory=list)
    export_to: List[str] = field(default_factory=list)
    raw_tls: Optional[List[Any]] = None
    raw_tcp: Optional[List[Any]] = None
    source: str = ""


@dataclass
class ConsistentHash:
    http_header_name: str = ""
    http_cookie: Optional[Dict[str, Any]] = None
    use_source_ip: bool = False
    http_query_parameter_name: str = ""
    ring_hash: Optional[Dict[str, Any]] = None
    maglev: Optional[Dict[str, Any]] = None
    minimum_ring_size: int = 0

    @property
    def hash_key_kind(self) -> str:
        if self.http_header_name:
            return "header"
        if self.http_cookie is not None:
            return "cookie"
        if self.use_source_ip:
            return "source_ip"
        if self.http_query_parameter_name:
            return "query"
        return ""


@dataclass
class LocalityDistribute:
    from_: str
    to: Dict[str, int] = field(default_factory=dict)


@dataclass
class LocalityLbSetting:
    distribute: List[LocalityDistribute] = field(default_factory=list)
    failover: List[Tuple[str, str]] = field(default_factory=list)  # (from region, to region)
    failover_priority: List[str] = field(default_factory=list)
    enabled: Optional[bool] = None


@dataclass
class WarmupConfig:
    """``warmup`` (or the deprecated ``warmupDurationSecs``, which sets only the duration)."""

    duration: Duration
    minimum_percent: Optional[float] = None
    aggression: Optional[float] = None
    legacy: bool = False  # from warmupDurationSecs: Envoy defaults, no aggression/min weight sent


@dataclass
class LoadBalancerSettings:
    simple: str = ""  # "" = UNSPECIFIED
    consistent_hash: Optional[ConsistentHash] = None
    locality_lb_setting: Optional[LocalityLbSetting] = None
    warmup: Optional[WarmupConfig] = None
    raw: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ConnectionPool:
    """Istio ``ConnectionPoolSettings``; 0 / None = not set."""

    max_connections: int = 0
    connect_timeout: Optional[Duration] = None
    http1_max_pending_requests: int = 0
    http2_max_requests: int = 0
    max_requests_per_connection: int = 0
    max_retries: int = 0
    idle_timeout: Optional[Duration] = None
    raw: Dict[str, Any] = field(default_factory=dict)


@dataclass
class OutlierDetection:
    """Istio ``OutlierDetection``; None = not set (Envoy's default applies)."""

    consecutive_5xx_errors: Optional[int] = None
    consecutive_gateway_errors: Optional[int] = None
    consecutive_local_origin_failures: Optional[int] = None
    split_external_local_origin_errors: bool = False
    interval: Optional[Duration] = None
    base_ejection_time: Optional[Duration] = None
    max_ejection_percent: int = 0
    min_health_percent: int = 0
    http_error_codes: List[int] = field(default_factory=list)


@dataclass
class PortTrafficPolicy:
    port: int
    load_balancer: Optional[LoadBalancerSettings] = None
    connection_pool: Optional[ConnectionPool] = None
    outlier_detection: Optional[OutlierDetection] = None
    tls: Optional[Dict[str, Any]] = None


@dataclass
class TrafficPolicy:
    load_balancer: Optional[LoadBalancerSettings] = None
    connection_pool: Optional[ConnectionPool] = None
    outlier_detection: Optional[OutlierDetection] = None
    tls: Optional[Dict[str, Any]] = None
    port_level_settings: List[PortTrafficPolicy] = field(default_factory=list)
    raw: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Subset:
    name: str
    labels: Dict[str, str] = field(default_factory=dict)
    traffic_policy: Optional[TrafficPolicy] = None


@dataclass
class DestinationRule:
    meta: ObjectMeta
    host: str
    traffic_policy: Optional[TrafficPolicy] = None
    subsets: List[Subset] = field(default_factory=list)
    export_to: List[str] = field(default_factory=list)
    workload_selector: Optional[Dict[str, str]] = None
    source: str = ""


@dataclass
class IstioConfig:
    """Everything one load produced, in file/document order."""

    service_entries: List[ServiceEntry] = field(default_factory=list)
    workload_entries: List[WorkloadEntry] = field(default_factory=list)
    destination_rules: List[DestinationRule] = field(default_factory=list)
    virtual_services: List[VirtualService] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    # security.istio.io kinds (see .security_config)
    peer_authentications: List[Any] = field(default_factory=list)
    authorization_policies: List[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return (
            len(self.service_entries)
            + len(self.workload_entries)
            + len(self.destination_rules)
            + len(self.virtual_services)
            + len(self.peer_authentications)
            + len(self.authorization_policies)
        )


# --------------------------------------------------------------------------- field helpers


def _obj(v: Any, path: str, allowed: Iterable[str]) -> Dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise Reject(f"{path}: expected an object, got {type(v).__name__}")
    allowed_set = set(allowed)
    for k in v:
        if k not in allowed_set:
            raise Reject(f"unknown field {path}.{k}")
    return v


def _str(v: Any, path: str, default: str = "") -> str:
    if v is None:
        return default
    if not isinstance(v, str):
        raise Reject(f"{path}: expected a string, got {type(v).__name__}")
    return v


def _int(v: Any, path: str, lo: int = 0, hi: int = 2**32 - 1, default: int = 0) -> int:
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise Reject(f"{path}: expected an integer, got {v!r}")
    if not lo <= v <= hi:
        raise Reject(f"{path}: {v} is out of range [{lo}, {hi}]")
    return v


def _bool(v: Any, path: str) -> bool:
    if v is None:
        return False
    if not isinstance(v, bool):
        raise Reject(f"{path}: expected true/false, got {v!r}")
    return v


def _opt_bool(v: Any, path: str) -> Optional[bool]:
    return None if v is None else _bool(v, path)


def _list(v: Any, path: str) -> List[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise Reject(f"{path}: expected a list, got {type(v).__name__}")
    return v


def _str_list(v: Any, path: str) -> List[str]:
    return [_str(x, f"{path}[{i}]") for i, x in enumerate(_list(v, path))]


def _str_map(v: Any, path: str) -> Dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise Reject(f"{path}: expected a map of strings, got {type(v).__name__}")
    out: Dict[str, str] = {}
    for k, x in v.items():
        if not isinstance(k, str):
            raise Reject(f"{path}: key {k!r} is not a string")
        if not isinstance(x, str):
            raise Reject(f"{path}.{k}: expected a string (quote it), got {x!r}")
        out[k] = x
    return out


def _opaque(v: Any, path: str) -> Optional[Dict[str, Any]]:
    """A sub-message we keep but do not translate: only its type is checked."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise Reject(f"{path}: expected an object, got {type(v).__name__}")
    return v


def _enum(v: Any, path: str, values: Iterable[str], default: str) -> str:
    s = _str(v, path, default)
    allowed = tuple(values)
    if s not in allowed:
        raise Reject(f"{path}: {s!r} is not one of {', '.join(allowed)}")
    return s


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def parse_duration(v: Any, path: str) -> Optional[Duration]:
    """Go duration syntax ("1h2m", "1.5s", "250ms"), which is what Istio accepts."""
    if v is None:
        return None
    s = _str(v, path).strip()
    if s in ("0", ""):
        return Duration(0, 0)
    pos = 0
    total = 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise Reject(f"{path}: {s!r} is not a duration (use e.g. 1.5s, 250ms, 1m)")
        num, unit = m.group(1), m.group(2)
        whole, _, frac = num.partition(".")
        ns = int(whole or "0") * _UNIT_NS[unit]
        if frac:
            ns += int(frac) * _UNIT_NS[unit] // (10 ** len(frac))
        total += ns
        pos = m.end()
    return Duration(total // 10**9, total % 10**9)


# --------------------------------------------------------------------------- per-kind parsers


def _meta(doc: Dict[str, Any]) -> ObjectMeta:
    md = doc.get("metadata")
    if md is None:
        raise Reject("metadata.name is required")
    if not isinstance(md, dict):
        raise Reject("metadata: expected an object")
    name = _str(md.get("name"), "metadata.name")
    if not name:
        raise Reject("metadata.name is required")
    ns = _str(md.get("namespace"), "metadata.namespace") or DEFAULT_NAMESPACE
    labels = _str_map(md.get("labels"), "metadata.labels")
    annotations = _str_map(md.get("annotations"), "metadata.annotations")
    return ObjectMeta(name=name, namespace=ns, labels=labels, annotations=annotations)


_WORKLOAD_FIELDS = ("address", "ports", "labels", "network", "locality", "weight", "serviceAccount")


def _workload(v: Any, path: str) -> WorkloadSpec:
    d = _obj(v, path, _WORKLOAD_FIELDS)
    ports_raw = d.get("ports")
    ports: Dict[str, int] = {}
    if ports_raw is not None:
        if not isinstance(ports_raw, dict):
            raise Reject(f"{path}.ports: expected a map of port name to number")
        for k, p in ports_raw.items():
            ports[str(k)] = _int(p, f"{path}.ports.{k}", 1, 65535)
    return WorkloadSpec(
        address=_str(d.get("address"), f"{path}.address"),
        ports=ports,
        labels=_str_map(d.get("labels"), f"{path}.labels"),
        network=_str(d.get("network"), f"{path}.network"),
        locality=_str(d.get("locality"), f"{path}.locality"),
        weight=_int(d.get("weight"), f"{path}.weight"),
        service_account=_str(d.get("serviceAccount"), f"{path}.serviceAccount"),
    )


def _selector(v: Any, path: str) -> Optional[Dict[str, str]]:
    if v is None:
        return None
    d = _obj(v, path, ("labels",))
    return _str_map(d.get("labels"), f"{path}.labels")


def parse_service_entry(meta: ObjectMeta, spec: Dict[str, Any]) -> ServiceEntry:
    s = _obj(
        spec,
        "spec",
        ("hosts", "addresses", "ports", "location", "resolution", "endpoints", "workloadSelector", "exportTo", "subjectAltNames"),
    )
    hosts = _str_list(s.get("hosts"), "spec.hosts")
    if not hosts:
        raise Reject("spec.hosts: at least one host is required")
    for i, h in enumerate(hosts):
        if not h or h != h.strip() or "/" in h:
            raise Reject(f"spec.hosts[{i}]: {h!r} is not a valid host")
    ports: List[ServicePort] = []
    seen_numbers = set()
    for i, p in enumerate(_list(s.get("ports"), "spec.ports")):
        path = f"spec.ports[{i}]"
        pd = _obj(p, path, ("number", "protocol", "name", "targetPort"))
        number = _int(pd.get("number"), f"{path}.number", 1, 65535)
        if not number:
            raise Reject(f"{path}.number is required")
        if number in seen_numbers:
            raise Reject(f"{path}.number: port {number} is listed twice")
        seen_numbers.add(number)
        target = pd.get("targetPort")
        ports.append(
            ServicePort(
                number=number,
                name=_str(pd.get("name"), f"{path}.name") or f"port-{number}",
                protocol=_str(pd.get("protocol"), f"{path}.protocol").upper(),
                target_port=_int(target, f"{path}.targetPort", 1, 65535) if target is not None else None,
            )
        )
    endpoints = [_workload(e, f"spec.endpoints[{i}]") for i, e in enumerate(_list(s.get("endpoints"), "spec.endpoints"))]
    selector = _selector(s.get("workloadSelector"), "spec.workloadSelector")
    if selector is not None and endpoints:
        raise Reject("spec: only one of endpoints or workloadSelector can be set")
    return ServiceEntry(
        meta=meta,
        hosts=hosts,
        addresses=_str_list(s.get("addresses"), "spec.addresses"),
        ports=ports,
        location=_enum(s.get("location"), "spec.location", ("MESH_EXTERNAL", "MESH_INTERNAL"), "MESH_EXTERNAL"),
        resolution=_enum(s.get("resolution"), "spec.resolution", ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN"), "NONE"),
        endpoints=endpoints,
        workload_selector=selector,
        export_to=_str_list(s.get("exportTo"), "spec.exportTo"),
        subject_alt_names=_str_list(s.get("subjectAltNames"), "spec.subjectAltNames"),
    )


def parse_workload_entry(meta: ObjectMeta, spec: Dict[str, Any]) -> WorkloadEntry:
    w = _workload(spec, "spec")
    if not w.address:
        raise Reject("spec.address is required")
    return WorkloadEntry(meta=meta, spec=w)


def _string_match(v: Any, path: str) -> StringMatch:
    d = _obj(v, path, ("exact", "prefix", "regex"))
    set_keys = [k for k in ("exact", "prefix", "regex") if d.get(k) is not None]
    if len(set_keys) > 1:
        raise Reject(f"{path}: only one of exact, prefix, regex may be set")
    if not set_keys:
        return StringMatch("")
    k = set_keys[0]
    value = _str(d[k], f"{path}.{k}")
    if k == "regex" and value != "*":
        try:
            re.compile(value)
        except re.error as exc:
            raise Reject(f"{path}.regex: invalid regular expression {value!r}: {exc}") from None
    return StringMatch(k, value)


def _string_match_map(v: Any, path: str) -> Dict[str, StringMatch]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise Reject(f"{path}: expected a map of header name to match")
    return {str(k): _string_match(x, f"{path}.{k}") for k, x in v.items()}


_MATCH_FIELDS = (
    "name", "uri", "scheme", "method", "authority", "headers", "port", "sourceLabels", "gateways",
    "queryParams", "ignoreUriCase", "withoutHeaders", "sourceNamespace", "statPrefix",
)


def _http_match(v: Any, path: str) -> HTTPMatchRequest:
    d = _obj(v, path, _MATCH_FIELDS)

    def opt(key: str) -> Optional[StringMatch]:
        return _string_match(d[key], f"{path}.{key}") if d.get(key) is not None else None

    headers = _string_match_map(d.get("headers"), f"{path}.headers")
    for h in headers:
        if h.lower() != h:
            raise Reject(f"{path}.headers: header name {h!r} must be lower case")
    return HTTPMatchRequest(
        name=_str(d.get("name"), f"{path}.name"),
        uri=opt("uri"),
        scheme=opt("scheme"),
        method=opt("method"),
        authority=opt("authority"),
        headers=headers,
        without_headers=_string_match_map(d.get("withoutHeaders"), f"{path}.withoutHeaders"),
        query_params=_string_match_map(d.get("queryParams"), f"{path}.queryParams"),
        ignore_uri_case=_bool(d.get("ignoreUriCase"), f"{path}.ignoreUriCase"),
        port=_int(d.get("port"), f"{path}.port", 0, 65535),
        source_labels=_str_map(d.get("sourceLabels"), f"{path}.sourceLabels"),
        source_namespace=_str(d.get("sourceNamespace"), f"{path}.sourceNamespace"),
        gateways=_str_list(d.get("gateways"), f"{path}.gateways"),
        stat_prefix=_str(d.get("statPrefix"), f"{path}.statPrefix"),
    )


def _destination(v: Any, path: str) -> Destination:
    d = _obj(v, path, ("host", "subset", "port"))
    host = _str(d.get("host"), f"{path}.host")
    if not host:
        raise Reject(f"{path}.host is required")
    port = 0
    if d.get("port") is not None:
        pd = _obj(d["port"], f"{path}.port", ("number",))
        port = _int(pd.get("number"), f"{path}.port.number", 0, 65535)
    return Destination(host=host, subset=_str(d.get("subset"), f"{path}.subset"), port=port)


def _percentage(v: Any, path: str) -> Optional[float]:
    if v is None:
        return None
    d = _obj(v, path, ("value",))
    x = d.get("value", 0.0)
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0 <= x <= 100:
        raise Reject(f"{path}.value: expected a number in [0, 100], got {x!r}")
    return float(x)


def _retries(v: Any, path: str) -> Optional[HTTPRetry]:
    if v is None:
        return None
    d = _obj(v, path, ("attempts", "perTryTimeout", "retryOn", "retryRemoteLocalities", "retryIgnorePreviousHosts", "backoff"))
    return HTTPRetry(
        attempts=_int(d.get("attempts"), f"{path}.attempts", -(2**31), 2**31 - 1),
        per_try_timeout=parse_duration(d.get("perTryTimeout"), f"{path}.perTryTimeout"),
        retry_on=_str(d.get("retryOn"), f"{path}.retryOn"),
        retry_remote_localities=_opt_bool(d.get("retryRemoteLocalities"), f"{path}.retryRemoteLocalities"),
        retry_ignore_previous_hosts=_opt_bool(d.get("retryIgnorePreviousHosts"), f"{path}.retryIgnorePreviousHosts"),
        backoff=parse_duration(d.get("backoff"), f"{path}.backoff"),
    )


def _fault(v: Any, path: str) -> Optional[HTTPFaultInjection]:
    if v is None:
        return None
    d = _obj(v, path, ("delay", "abort"))
    out = HTTPFaultInjection()
    if d.get("delay") is not None:
        dp = f"{path}.delay"
        dd = _obj(d["delay"], dp, ("fixedDelay", "exponentialDelay", "percentage", "percent"))
        out.delay = FaultDelay(
            fixed_delay=parse_duration(dd.get("fixedDelay"), f"{dp}.fixedDelay"),
            percentage=_percentage(dd.get("percentage"), f"{dp}.percentage"),
            percent=_int(dd.get("percent"), f"{dp}.percent", 0, 100) if dd.get("percent") is not None else None,
            exponential=dd.get("exponentialDelay") is not None,
        )
    if d.get("abort") is not None:
        ap = f"{path}.abort"
        ad = _obj(d["abort"], ap, ("httpStatus", "grpcStatus", "http2Error", "percentage"))
        kinds = [k for k in ("httpStatus", "grpcStatus", "http2Error") if ad.get(k) is not None]
        if len(kinds) > 1:
            raise Reject(f"{ap}: only one of httpStatus, grpcStatus or http2Error may be set")
        if ad.get("grpcStatus") is not None and _str(ad["grpcStatus"], f"{ap}.grpcStatus") not in GRPC_STATUS_NAMES:
            raise Reject(f"{ap}.grpcStatus: {ad['grpcStatus']!r} is not a gRPC status name (e.g. UNAVAILABLE)")
        out.abort = FaultAbort(
            http_status=_int(ad.get("httpStatus"), f"{ap}.httpStatus", 200, 599) if ad.get("httpStatus") is not None else None,
            grpc_status=_str(ad.get("grpcStatus"), f"{ap}.grpcStatus") or None,
            percentage=_percentage(ad.get("percentage"), f"{ap}.percentage"),
        )
    return out


_HEADER_NAME = re.compile(r"^:?[A-Za-z0-9!#$%&'*+.^_`|~-]+$")


def _header_map(v: Any, path: str) -> Dict[str, str]:
    out = _str_map(v, path)
    for k in out:
        if not _HEADER_NAME.match(k):
            raise Reject(f"{path}: {k!r} is not a valid header name")
    return out


def _header_operations(v: Any, path: str) -> Optional[HeaderOperations]:
    if v is None:
        return None
    d = _obj(v, path, ("set", "add", "remove"))
    remove = _str_list(d.get("remove"), f"{path}.remove")
    for i, k in enumerate(remove):
        if not _HEADER_NAME.match(k):
            raise Reject(f"{path}.remove[{i}]: {k!r} is not a valid header name")
    return HeaderOperations(
        set=_header_map(d.get("set"), f"{path}.set"), add=_header_map(d.get("add"), f"{path}.add"), remove=remove
    )


def _headers(v: Any, path: str) -> Optional[Headers]:
    if v is None:
        return None
    d = _obj(v, path, ("request", "response"))
    return Headers(
        request=_header_operations(d.get("request"), f"{path}.request"),
        response=_header_operations(d.get("response"), f"{path}.response"),
    )


def _regex(v: Any, path: str) -> str:
    s = _str(v, path)
    try:
        re.compile(s)
    except re.error as exc:
        raise Reject(f"{path}: invalid regular expression {s!r}: {exc}") from None
    return s


def _rewrite(v: Any, path: str) -> Optional[HTTPRewrite]:
    if v is None:
        return None
    d = _obj(v, path, ("uri", "authority", "uriRegexRewrite"))
    out = HTTPRewrite(uri=_str(d.get("uri"), f"{path}.uri"), authority=_str(d.get("authority"), f"{path}.authority"))
    if d.get("uriRegexRewrite") is not None:
        rp = f"{path}.uriRegexRewrite"
        rd = _obj(d["uriRegexRewrite"], rp, ("match", "rewrite"))
        out.uri_regex = (_regex(rd.get("match"), f"{rp}.match"), _str(rd.get("rewrite"), f"{rp}.rewrite"))
        if out.uri:
            raise Reject(f"{path}: only one of uri or uriRegexRewrite may be set")
    return out


_REDIRECT_CODES = (0, 301, 302, 303, 307, 308)


def _redirect(v: Any, path: str) -> Optional[HTTPRedirect]:
    if v is None:
        return None
    d = _obj(v, path, ("uri", "authority", "port", "derivePort", "scheme", "redirectCode", "prefixRewrite"))
    if d.get("port") is not None and d.get("derivePort") is not None:
        raise Reject(f"{path}: only one of port or derivePort may be set")
    out = HTTPRedirect(
        uri=_str(d.get("uri"), f"{path}.uri"),
        authority=_str(d.get("authority"), f"{path}.authority"),
        port=_int(d.get("port"), f"{path}.port", 0, 65535) if d.get("port") is not None else None,
        derive_port=_enum(d.get("derivePort"), f"{path}.derivePort", ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"), "")
        if d.get("derivePort") is not None else "",
        scheme=_str(d.get("scheme"), f"{path}.scheme"),
        redirect_code=_int(d.get("redirectCode"), f"{path}.redirectCode", 0, 599),
        prefix_rewrite=_str(d.get("prefixRewrite"), f"{path}.prefixRewrite"),
    )
    if out.redirect_code not in _REDIRECT_CODES:
        raise Reject(f"{path}.redirectCode: {out.redirect_code} is not one of 301, 302, 303, 307, 308")
    if out.uri and out.prefix_rewrite:
        raise Reject(f"{path}: only one of uri or prefixRewrite may be set")
    return out


def _direct_response(v: Any, path: str) -> Optional[HTTPDirectResponse]:
    if v is None:
        return None
    d = _obj(v, path, ("status", "body"))
    status = _int(d.get("status"), f"{path}.status", 0, 599)
    if status < 200:
        raise Reject(f"{path}.status is required (200-599)")
    out = HTTPDirectResponse(status=status)
    if d.get("body") is not None:
        bd = _obj(d["body"], f"{path}.body", ("string", "bytes"))
        if bd.get("string") is not None and bd.get("bytes") is not None:
            raise Reject(f"{path}.body: only one of string or bytes may be set")
        if bd.get("string") is not None:
            out.body_string = _str(bd["string"], f"{path}.body.string")
        elif bd.get("bytes") is not None:
            import base64
            import binascii

            try:
                out.body_bytes = base64.b64decode(_str(bd["bytes"], f"{path}.body.bytes"), validate=True)
            except (binascii.Error, ValueError):
                raise Reject(f"{path}.body.bytes: not base64") from None
    return out


def _mirror_policies(v: Any, path: str) -> List[HTTPMirrorPolicy]:
    out = []
    for i, m in enumerate(_list(v, path)):
        mp = f"{path}[{i}]"
        md = _obj(m, mp, ("destination", "percentage"))
        if md.get("destination") is None:
            raise Reject(f"{mp}.destination is required")
        out.append(HTTPMirrorPolicy(_destination(md["destination"], f"{mp}.destination"),
                                    _percentage(md.get("percentage"), f"{mp}.percentage")))
    return out


GRPC_STATUS_NAMES = frozenset((
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
    "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED",
))

_HTTP_ROUTE_FIELDS = (
    "name", "match", "route", "redirect", "directResponse", "delegate", "rewrite", "timeout", "retries",
    "fault", "mirror", "mirrors", "mirrorPercent", "mirrorPercentage", "mirror_percent", "corsPolicy", "headers",
)


def _http_route(v: Any, path: str) -> HTTPRoute:
    d = _obj(v, path, _HTTP_ROUTE_FIELDS)
    dests: List[HTTPRouteDestination] = []
    for i, r in enumerate(_list(d.get("route"), f"{path}.route")):
        rp = f"{path}.route[{i}]"
        rd = _obj(r, rp, ("destination", "weight", "headers"))
        if rd.get("destination") is None:
            raise Reject(f"{rp}.destination is required")
        dests.append(
            HTTPRouteDestination(
                destination=_destination(rd["destination"], f"{rp}.destination"),
                weight=_int(rd.get("weight"), f"{rp}.weight", 0, 2**31 - 1),
                headers=_headers(rd.get("headers"), f"{rp}.headers"),
            )
        )
    mirror_percent = d.get("mirrorPercent", d.get("mirror_percent"))
    route = HTTPRoute(
        name=_str(d.get("name"), f"{path}.name"),
        match=[_http_match(m, f"{path}.match[{i}]") for i, m in enumerate(_list(d.get("match"), f"{path}.match"))],
        route=dests,
        timeout=parse_duration(d.get("timeout"), f"{path}.timeout"),
        retries=_retries(d.get("retries"), f"{path}.retries"),
        fault=_fault(d.get("fault"), f"{path}.fault"),
        redirect=_redirect(d.get("redirect"), f"{path}.redirect"),
        direct_response=_direct_response(d.get("directResponse"), f"{path}.directResponse"),
        delegate=_opaque(d.get("delegate"), f"{path}.delegate"),
        rewrite=_rewrite(d.get("rewrite"), f"{path}.rewrite"),
        headers=_headers(d.get("headers"), f"{path}.headers"),
        mirror=_destination(d["mirror"], f"{path}.mirror") if d.get("mirror") is not None else None,
        mirror_percent=_int(mirror_percent, f"{path}.mirrorPercent", 0, 100) if mirror_percent is not None else None,
        mirror_percentage=_percentage(d.get("mirrorPercentage"), f"{path}.mirrorPercentage"),
        mirrors=_mirror_policies(d.get("mirrors"), f"{path}.mirrors"),
        cors_policy=_opaque(d.get("corsPolicy"), f"{path}.corsPolicy"),
        raw=dict(d),
    )
    if not (route.route or route.redirect or route.direct_response or route.delegate):
        raise Reject(f"{path}: one of route, redirect, directResponse or delegate is required")
    actions = [k for k, x in (("route", route.route), ("redirect", route.redirect), ("directResponse", route.direct_response)) if x]
    if len(actions) > 1:
        raise Reject(f"{path}: {' and '.join(actions)} cannot be used together")
    if route.mirror is not None and route.mirrors:
        raise Reject(f"{path}: only one of mirror or mirrors may be set")
    if route.redirect is not None and route.rewrite is not None:
        raise Reject(f"{path}: rewrite cannot be used with redirect")
    return route


def parse_virtual_service(meta: ObjectMeta, spec: Dict[str, Any]) -> VirtualService:
    s = _obj(spec, "spec", ("hosts", "gateways", "http", "tls", "tcp", "exportTo"))
    hosts = _str_list(s.get("hosts"), "spec.hosts")
    if not hosts:
        raise Reject("spec.hosts: at least one host is required")
    return VirtualService(
        meta=meta,
        hosts=hosts,
        gateways=_str_list(s.get("gateways"), "spec.gateways"),
        http=[_http_route(h, f"spec.http[{i}]") for i, h in enumerate(_list(s.get("http"), "spec.http"))],
        export_to=_str_list(s.get("exportTo"), "spec.exportTo"),
        raw_tls=_list(s.get("tls"), "spec.tls") or None,
        raw_tcp=_list(s.get("tcp"), "spec.tcp") or None,
    )


_LB_SIMPLE = ("UNSPECIFIED", "LEAST_CONN", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST")


def _load_balancer(v: Any, path: str) -> Optional[LoadBalancerSettings]:
    if v is None:
        return None
    d = _obj(v, path, ("simple", "consistentHash", "localityLbSetting", "zoneAwareLbSetting", "warmupDurationSecs", "warmup"))
    if d.get("zoneAwareLbSetting") is not None:
        _opaque(d["zoneAwareLbSetting"], f"{path}.zoneAwareLbSetting")
        log.info("meshpatch control plane: %s.zoneAwareLbSetting is not translated", path)
    if d.get("simple") is not None and d.get("consistentHash") is not None:
        raise Reject(f"{path}: only one of simple or consistentHash may be set")
    simple = _enum(d.get("simple"), f"{path}.simple", _LB_SIMPLE, "UNSPECIFIED")
    if simple == "UNSPECIFIED":
        simple = ""
    ch = None
    if d.get("consistentHash") is not None:
        cp = f"{path}.consistentHash"
        cd = _obj(
            d["consistentHash"], cp,
            ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName", "ringHash", "maglev", "minimumRingSize"),
        )
        cookie = None
        if cd.get("httpCookie") is not None:
            cookie = _obj(cd["httpCookie"], f"{cp}.httpCookie", ("name", "path", "ttl", "attributes"))
            if not _str(cookie.get("name"), f"{cp}.httpCookie.name"):
                raise Reject(f"{cp}.httpCookie.name is required")
            _str(cookie.get("path"), f"{cp}.httpCookie.path")
            parse_duration(cookie.get("ttl"), f"{cp}.httpCookie.ttl")
            for i, attr in enumerate(_list(cookie.get("attributes"), f"{cp}.httpCookie.attributes")):
                ad = _obj(attr, f"{cp}.httpCookie.attributes[{i}]", ("name", "value"))
                if not _str(ad.get("name"), f"{cp}.httpCookie.attributes[{i}].name"):
                    raise Reject(f"{cp}.httpCookie.attributes[{i}].name is required")
                _str(ad.get("value"), f"{cp}.httpCookie.attributes[{i}].value")
        ring = _obj(cd["ringHash"], f"{cp}.ringHash", ("minimumRingSize",)) if cd.get("ringHash") is not None else None
        maglev = _obj(cd["maglev"], f"{cp}.maglev", ("tableSize",)) if cd.get("maglev") is not None else None
        if ring is not None and maglev is not None:
            raise Reject(f"{cp}: only one of ringHash or maglev may be set")
        ch = ConsistentHash(
            http_header_name=_str(cd.get("httpHeaderName"), f"{cp}.httpHeaderName"),
            http_cookie=cookie,
            use_source_ip=_bool(cd.get("useSourceIp"), f"{cp}.useSourceIp"),
            http_query_parameter_name=_str(cd.get("httpQueryParameterName"), f"{cp}.httpQueryParameterName"),
            ring_hash=ring,
            maglev=maglev,
            minimum_ring_size=_int(cd.get("minimumRingSize"), f"{cp}.minimumRingSize", 0, 2**63 - 1),
        )
        if ring is not None:
            _int(ring.get("minimumRingSize"), f"{cp}.ringHash.minimumRingSize", 0, 2**63 - 1)
        if maglev is not None:
            _int(maglev.get("tableSize"), f"{cp}.maglev.tableSize", 0, 2**63 - 1)
    warmup = None
    if d.get("warmup") is not None:
        wp = f"{path}.warmup"
        wd = _obj(d["warmup"], wp, ("duration", "minimumPercent", "aggression"))
        duration = parse_duration(wd.get("duration"), f"{wp}.duration")
        if duration is None:
            raise Reject(f"{wp}.duration is required")
        warmup = WarmupConfig(
            duration=duration,
            minimum_percent=_number(wd.get("minimumPercent"), f"{wp}.minimumPercent", 0, 100),
            aggression=_number(wd.get("aggression"), f"{wp}.aggression", 1, float("inf")),
        )
    elif d.get("warmupDurationSecs") is not None:
        duration = parse_duration(d["warmupDurationSecs"], f"{path}.warmupDurationSecs")
        assert duration is not None
        warmup = WarmupConfig(duration=duration, legacy=True)
    return LoadBalancerSettings(
        simple=simple,
        consistent_hash=ch,
        locality_lb_setting=_locality_lb_setting(d.get("localityLbSetting"), f"{path}.localityLbSetting"),
        warmup=warmup,
        raw=dict(d),
    )


def _number(v: Any, path: str, lo: float, hi: float) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise Reject(f"{path}: expected a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def _locality_lb_setting(v: Any, path: str) -> Optional[LocalityLbSetting]:
    if v is None:
        return None
    d = _obj(v, path, ("distribute", "failover", "failoverPriority", "enabled"))
    out = LocalityLbSetting(
        failover_priority=_str_list(d.get("failoverPriority"), f"{path}.failoverPriority"),
        enabled=_opt_bool(d.get("enabled"), f"{path}.enabled"),
    )
    for i, x in enumerate(_list(d.get("distribute"), f"{path}.distribute")):
        xp = f"{path}.distribute[{i}]"
        xd = _obj(x, xp, ("from", "to"))
        to_raw = _obj(xd.get("to"), f"{xp}.to", [k for k in (xd.get("to") or {})])
        to = {str(k): _int(w, f"{xp}.to.{k}", 0, 2**32 - 1) for k, w in to_raw.items()}
        if sum(to.values()) != 100:
            raise Reject(f"{xp}.to: weights must sum to 100 (got {sum(to.values())})")
        out.distribute.append(LocalityDistribute(from_=_str(xd.get("from"), f"{xp}.from"), to=to))
    for i, x in enumerate(_list(d.get("failover"), f"{path}.failover")):
        xp = f"{path}.failover[{i}]"
        xd = _obj(x, xp, ("from", "to"))
        frm, to_region = _str(xd.get("from"), f"{xp}.from"), _str(xd.get("to"), f"{xp}.to")
        if frm == to_region:
            raise Reject(f"{xp}: from and to must differ ({frm!r})")
        out.failover.append((frm, to_region))
    if out.distribute and out.failover:
        raise Reject(f"{path}: only one of distribute or failover may be set")
    return out


def _outlier_detection(v: Any, path: str) -> Optional[OutlierDetection]:
    if v is None:
        return None
    d = _obj(
        v, path,
        ("consecutiveErrors", "splitExternalLocalOriginErrors", "consecutiveLocalOriginFailures", "consecutiveGatewayErrors",
         "consecutive5xxErrors", "interval", "baseEjectionTime", "maxEjectionPercent", "minHealthPercent",
         "outlierDetectionHttpErrorCodes"),
    )

    def opt_u32(key: str) -> Optional[int]:
        return _int(d[key], f"{path}.{key}") if d.get(key) is not None else None

    if d.get("consecutiveErrors") is not None:
        _int(d["consecutiveErrors"], f"{path}.consecutiveErrors", -(2**31), 2**31 - 1)
        log.info("meshpatch control plane: %s.consecutiveErrors is deprecated and ignored (as istiod does); "
                 "use consecutive5xxErrors", path)
    return OutlierDetection(
        consecutive_5xx_errors=opt_u32("consecutive5xxErrors"),
        consecutive_gateway_errors=opt_u32("consecutiveGatewayErrors"),
        consecutive_local_origin_failures=opt_u32("consecutiveLocalOriginFailures"),
        split_external_local_origin_errors=_bool(d.get("splitExternalLocalOriginErrors"), f"{path}.splitExternalLocalOriginErrors"),
        interval=parse_duration(d.get("interval"), f"{path}.interval"),
        base_ejection_time=parse_duration(d.get("baseEjectionTime"), f"{path}.baseEjectionTime"),
        max_ejection_percent=_int(d.get("maxEjectionPercent"), f"{path}.maxEjectionPercent", 0, 100),
        min_health_percent=_int(d.get("minHealthPercent"), f"{path}.minHealthPercent", 0, 100),
        http_error_codes=[_int(c, f"{path}.outlierDetectionHttpErrorCodes[{i}]", 100, 599)
                          for i, c in enumerate(_list(d.get("outlierDetectionHttpErrorCodes"), f"{path}.outlierDetectionHttpErrorCodes"))],
    )


def _traffic_policy(v: Any, path: str, allow_port_level: bool = True) -> Optional[TrafficPolicy]:
    if v is None:
        return None
    fields_ = ["loadBalancer", "connectionPool", "outlierDetection", "tls", "tunnel", "proxyProtocol", "retryBudget"]
    if allow_port_level:
        fields_.append("portLevelSettings")
    d = _obj(v, path, fields_)
    pls: List[PortTrafficPolicy] = []
    for i, p in enumerate(_list(d.get("portLevelSettings"), f"{path}.portLevelSettings")):
        pp = f"{path}.portLevelSettings[{i}]"
        pd = _obj(p, pp, ("port", "loadBalancer", "connectionPool", "outlierDetection", "tls"))
        port_d = _obj(pd.get("port"), f"{pp}.port", ("number",))
        number = _int(port_d.get("number"), f"{pp}.port.number", 0, 65535)
        if not number:
            raise Reject(f"{pp}.port.number is required")
        pls.append(
            PortTrafficPolicy(
                port=number,
                load_balancer=_load_balancer(pd.get("loadBalancer"), f"{pp}.loadBalancer"),
                connection_pool=_connection_pool(pd.get("connectionPool"), f"{pp}.connectionPool"),
                outlier_detection=_outlier_detection(pd.get("outlierDetection"), f"{pp}.outlierDetection"),
                tls=_opaque(pd.get("tls"), f"{pp}.tls"),
            )
        )
    return TrafficPolicy(
        load_balancer=_load_balancer(d.get("loadBalancer"), f"{path}.loadBalancer"),
        connection_pool=_connection_pool(d.get("connectionPool"), f"{path}.connectionPool"),
        outlier_detection=_outlier_detection(d.get("outlierDetection"), f"{path}.outlierDetection"),
        tls=_opaque(d.get("tls"), f"{path}.tls"),
        port_level_settings=pls,
        raw=dict(d),
    )


_TCP_FIELDS = ("maxConnections", "connectTimeout", "tcpKeepalive", "maxConnectionDuration", "idleTimeout")
_HTTP_POOL_FIELDS = (
    "http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection", "maxRetries", "idleTimeout",
    "h2UpgradePolicy", "useClientProtocol", "maxConcurrentStreams", "http2KeepAlive",
)


def _connection_pool(v: Any, path: str) -> Optional[ConnectionPool]:
    if v is None:
        return None
    d = _obj(v, path, ("tcp", "http"))
    tcp = _obj(d.get("tcp"), f"{path}.tcp", _TCP_FIELDS)
    http = _obj(d.get("http"), f"{path}.http", _HTTP_POOL_FIELDS)
    i32 = 2**31 - 1

    def num(section: Dict[str, Any], key: str, sp: str) -> int:
        return _int(section.get(key), f"{sp}.{key}", -(2**31), i32)

    tp, hp = f"{path}.tcp", f"{path}.http"
    if http.get("h2UpgradePolicy") is not None:
        _enum(http["h2UpgradePolicy"], f"{hp}.h2UpgradePolicy", ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE"), "DEFAULT")
    return ConnectionPool(
        max_connections=num(tcp, "maxConnections", tp),
        connect_timeout=parse_duration(tcp.get("connectTimeout"), f"{tp}.connectTimeout"),
        http1_max_pending_requests=num(http, "http1MaxPendingRequests", hp),
        http2_max_requests=num(http, "http2MaxRequests", hp),
        max_requests_per_connection=num(http, "maxRequestsPerConnection", hp),
        max_retries=num(http, "maxRetries", hp),
        idle_timeout=parse_duration(http.get("idleTimeout"), f"{hp}.idleTimeout")
        or parse_duration(tcp.get("idleTimeout"), f"{tp}.idleTimeout"),
        raw=dict(d),
    )


def parse_destination_rule(meta: ObjectMeta, spec: Dict[str, Any]) -> DestinationRule:
    s = _obj(spec, "spec", ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"))
    host = _str(s.get("host"), "spec.host")
    if not host:
        raise Reject("spec.host is required")
    subsets: List[Subset] = []
    names = set()
    for i, sub in enumerate(_list(s.get("subsets"), "spec.subsets")):
        sp = f"spec.subsets[{i}]"
        sd = _obj(sub, sp, ("name", "labels", "trafficPolicy"))
        name = _str(sd.get("name"), f"{sp}.name")
        if not name:
            raise Reject(f"{sp}.name is required")
        if name in names:
            raise Reject(f"{sp}.name: subset {name!r} is defined twice")
        names.add(name)
        subsets.append(
            Subset(
                name=name,
                labels=_str_map(sd.get("labels"), f"{sp}.labels"),
                traffic_policy=_traffic_policy(sd.get("trafficPolicy"), f"{sp}.trafficPolicy"),
            )
        )
    return DestinationRule(
        meta=meta,
        host=host,
        traffic_policy=_traffic_policy(s.get("trafficPolicy"), "spec.trafficPolicy"),
        subsets=subsets,
        export_to=_str_list(s.get("exportTo"), "spec.exportTo"),
        workload_selector=_selector(s.get("workloadSelector"), "spec.workloadSelector"),
    )


_PARSERS: Mapping[str, Callable[[ObjectMeta, Dict[str, Any]], Any]] = {
    "ServiceEntry": parse_service_entry,
    "WorkloadEntry": parse_workload_entry,
    "DestinationRule": parse_destination_rule,
    "VirtualService": parse_virtual_service,
}
_TOP_FIELDS = ("apiVersion", "kind", "metadata", "spec", "status")


# --------------------------------------------------------------------------- documents → config


def _describe(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "document"
    kind = doc.get("kind") or "resource"
    md = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    name = md.get("name") or "<unnamed>"
    ns = md.get("namespace") or DEFAULT_NAMESPACE
    return f"{kind} {ns}/{name}"


def _add(config: IstioConfig, doc: Any, source: str) -> None:
    """Parse one document into ``config``; an invalid one is logged and skipped."""
    if doc is None:
        return
    what = _describe(doc)
    try:
        if not isinstance(doc, dict):
            raise Reject(f"expected a mapping, got {type(doc).__name__}")
        if doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            for item in doc["items"]:
                _add(config, item, source)
            return
        kind = doc.get("kind")
        from .security_config import PARSERS as SECURITY_PARSERS, SECURITY_GROUP, SECURITY_VERSIONS

        parsers = {**_PARSERS, **SECURITY_PARSERS}
        if kind not in parsers:
            raise Reject(f"unsupported kind {kind!r} (supported: {', '.join(parsers)})")
        api_version = doc.get("apiVersion")
        group, _, version = str(api_version).partition("/")
        expected, versions = (SECURITY_GROUP, SECURITY_VERSIONS) if kind in SECURITY_PARSERS else (API_GROUP, API_VERSIONS)
        if group != expected or version not in versions:
            raise Reject(
                f"apiVersion {api_version!r} is not {expected}/" + "|".join(versions)
            )
        _obj(doc, "", _TOP_FIELDS)
        meta = _meta(doc)
        spec = doc.get("spec")
        if spec is None:
            raise Reject("spec is required")
        obj = parsers[kind](meta, spec)
    except Reject as exc:
        msg = f"skipped {what} in {source}: {str(exc).replace('unknown field .', 'unknown field ')}"
        config.skipped.append(msg)
        log.warning("meshpatch control plane: %s", msg)
        return
    obj.source = source
    if isinstance(obj, ServiceEntry):
        config.service_entries.append(obj)
    elif isinstance(obj, WorkloadEntry):
        config.workload_entries.append(obj)
    elif isinstance(obj, DestinationRule):
        config.destination_rules.append(obj)
    elif kind == "PeerAuthentication":
        config.peer_authentications.append(obj)
    elif kind == "AuthorizationPolicy":
        config.authorization_policies.append(obj)
    else:
        config.virtual_services.append(obj)


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml_text(text: str, source: str = "<string>", into: Optional[IstioConfig] = None) -> IstioConfig:
    """Parse multi-document YAML.  A YAML syntax error fails the whole text
    (raises :class:`ConfigLoadError`): half a file is not a config to serve."""
    config = into if into is not None else IstioConfig()
    try:
        docs = list(yaml.load_all(text, Loader=_Loader))
    except yaml.YAMLError as exc:
        raise ConfigLoadError(f"{source}: invalid YAML: {exc}".replace("\n", " ")) from None
    for i, doc in enumerate(docs):
        _add(config, doc, f"{source} (document {i + 1})")
    return config


def parse_files(paths: Iterable[str]) -> IstioConfig:
    config = IstioConfig()
    for p in paths:
        try:
            with open(p, "r", encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigLoadError(f"{p}: cannot read: {exc}") from None
        parse_yaml_text(text, p, into=config)
    return config


def split_host_port(hostport: str) -> Tuple[str, Optional[str]]:
    """``net.SplitHostPort`` semantics: ``host:port`` or ``[v6]:port``; no port → (s, None)."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end > 0 and hostport[end + 1 : end + 2] == ":":
            return hostport[1:end], hostport[end + 2 :]
        return hostport, None
    if hostport.count(":") != 1:
        return hostport, None
    host, port = hostport.split(":")
    return host, port
