"""Istio security YAML (``security.istio.io``): PeerAuthentication and AuthorizationPolicy.

Parsed with the same per-resource validation as the networking kinds
(:mod:`.istio_config`): a resource the API server would reject is skipped with
one log line; everything else keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .istio_config import ObjectMeta, Reject, _enum, _int, _list, _obj, _str, _str_list

SECURITY_GROUP = "security.istio.io"
SECURITY_VERSIONS = ("v1", "v1beta1")
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
AUTHZ_ACTIONS = ("ALLOW", "DENY", "AUDIT", "CUSTOM")


@dataclass
class PeerAuthentication:
    meta: ObjectMeta
    selector: Optional[Dict[str, str]] = None
    mode: str = "UNSET"
    port_modes: Dict[int, str] = field(default_factory=dict)
    source: str = ""


@dataclass
class Source:
    principals: List[str] = field(default_factory=list)
    not_principals: List[str] = field(default_factory=list)
    request_principals: List[str] = field(default_factory=list)
    not_request_principals: List[str] = field(default_factory=list)
    namespaces: List[str] = field(default_factory=list)
    not_namespaces: List[str] = field(default_factory=list)
    service_accounts: List[str] = field(default_factory=list)
    not_service_accounts: List[str] = field(default_factory=list)
    ip_blocks: List[str] = field(default_factory=list)
    not_ip_blocks: List[str] = field(default_factory=list)
    remote_ip_blocks: List[str] = field(default_factory=list)
    not_remote_ip_blocks: List[str] = field(default_factory=list)


@dataclass
class Operation:
    hosts: List[str] = field(default_factory=list)
    not_hosts: List[str] = field(default_factory=list)
    ports: List[str] = field(default_factory=list)
    not_ports: List[str] = field(default_factory=list)
    methods: List[str] = field(default_factory=list)
    not_methods: List[str] = field(default_factory=list)
    paths: List[str] = field(default_factory=list)
    not_paths: List[str] = field(default_factory=list)


@dataclass
class Condition:
    key: str
    values: List[str] = field(default_factory=list)
    not_values: List[str] = field(default_factory=list)


@dataclass
class Rule:
    sources: List[Source] = field(default_factory=list)  # rule.from[].source
    operations: List[Operation] = field(default_factory=list)  # rule.to[].operation
    when: List[Condition] = field(default_factory=list)
    has_from: bool = False
    has_to: bool = False


@dataclass
class AuthorizationPolicy:
    meta: ObjectMeta
    selector: Optional[Dict[str, str]] = None
    action: str = "ALLOW"
    rules: List[Rule] = field(default_factory=list)
    target_refs: bool = False  # targetRef(s) policies bind gateways / waypoints, not sidecar workloads
    source: str = ""


def _label_selector(v: Any, path: str) -> Optional[Dict[str, str]]:
    """security.istio.io uses ``selector.matchLabels``."""
    if v is None:
        return None
    d = _obj(v, path, ("matchLabels",))
    from .istio_config import _str_map

    return _str_map(d.get("matchLabels"), f"{path}.matchLabels")


def parse_peer_authentication(meta: ObjectMeta, spec: Dict[str, Any]) -> PeerAuthentication:
    s = _obj(spec, "spec", ("selector", "mtls", "portLevelMtls"))
    selector = _label_selector(s.get("selector"), "spec.selector")
    mtls = _obj(s.get("mtls"), "spec.mtls", ("mode",))
    mode = _enum(mtls.get("mode"), "spec.mtls.mode", MTLS_MODES, "UNSET")
    port_modes: Dict[int, str] = {}
    raw_ports = s.get("portLevelMtls")
    if raw_ports is not None:
        if not isinstance(raw_ports, dict):
            raise Reject("spec.portLevelMtls: expected a map of port number to {mode}")
        if not selector:
            raise Reject("spec.portLevelMtls requires a workload selector")
        for key, value in raw_ports.items():
            try:
                port = int(key)
            except (TypeError, ValueError):
                raise Reject(f"spec.portLevelMtls: {key!r} is not a port number") from None
            _int(port, f"spec.portLevelMtls.{key}", 1, 65535)
            pm = _obj(value, f"spec.portLevelMtls.{key}", ("mode",))
            port_modes[port] = _enum(pm.get("mode"), f"spec.portLevelMtls.{key}.mode", MTLS_MODES, "UNSET")
    return PeerAuthentication(meta=meta, selector=selector, mode=mode, port_modes=port_modes)


_SOURCE_FIELDS = {
    "principals": "principals", "notPrincipals": "not_principals",
    "requestPrincipals": "request_principals", "notRequestPrincipals": "not_request_principals",
    "namespaces": "namespaces", "notNamespaces": "not_namespaces",
    "serviceAccounts": "service_accounts", "notServiceAccounts": "not_service_accounts",
    "ipBlocks": "ip_blocks", "notIpBlocks": "not_ip_blocks",
    "remoteIpBlocks": "remote_ip_blocks", "notRemoteIpBlocks": "not_remote_ip_blocks",
}
_OPERATION_FIELDS = {
    "hosts": "hosts", "notHosts": "not_hosts", "ports": "ports", "notPorts": "not_ports",
    "methods": "methods", "notMethods": "not_methods", "paths": "paths", "notPaths": "not_paths",
}


def _non_empty(values: List[str], path: str) -> List[str]:
    for i, value in enumerate(values):
        if not value:
            raise Reject(f"{path}[{i}]: empty value")
    return values


def _rule(v: Any, path: str) -> Rule:
    d = _obj(v, path, ("from", "to", "when"))
    rule = Rule(has_from="from" in d and d["from"] is not None, has_to="to" in d and d["to"] is not None)
    for i, f in enumerate(_list(d.get("from"), f"{path}.from")):
        fp = f"{path}.from[{i}]"
        fd = _obj(f, fp, ("source",))
        sd = _obj(fd.get("source"), f"{fp}.source", _SOURCE_FIELDS)
        source = Source()
        for key, attr in _SOURCE_FIELDS.items():
            setattr(source, attr, _non_empty(_str_list(sd.get(key), f"{fp}.source.{key}"), f"{fp}.source.{key}"))
        if (source.service_accounts or source.not_service_accounts) and (
                source.principals or source.not_principals or source.namespaces or source.not_namespaces):
            raise Reject(f"{fp}.source: serviceAccounts cannot be combined with principals or namespaces")
        rule.sources.append(source)
    for i, t in enumerate(_list(d.get("to"), f"{path}.to")):
        tp = f"{path}.to[{i}]"
        td = _obj(t, tp, ("operation",))
        od = _obj(td.get("operation"), f"{tp}.operation", _OPERATION_FIELDS)
        operation = Operation()
        for key, attr in _OPERATION_FIELDS.items():
            values = _non_empty(_str_list(od.get(key), f"{tp}.operation.{key}"), f"{tp}.operation.{key}")
            setattr(operation, attr, values)
        for port in operation.ports + operation.not_ports:
            if not port.isdigit() or not 0 <= int(port) <= 65535:
                raise Reject(f"{tp}.operation.ports: {port!r} is not a port number")
        rule.operations.append(operation)
    for i, w in enumerate(_list(d.get("when"), f"{path}.when")):
        wp = f"{path}.when[{i}]"
        wd = _obj(w, wp, ("key", "values", "notValues"))
        key = _str(wd.get("key"), f"{wp}.key")
        if not key:
            raise Reject(f"{wp}.key is required")
        values = _str_list(wd.get("values"), f"{wp}.values")
        not_values = _str_list(wd.get("notValues"), f"{wp}.notValues")
        if not values and not not_values:
            raise Reject(f"{wp}: at least one of values or notValues is required")
        rule.when.append(Condition(key, values, not_values))
    return rule


def parse_authorization_policy(meta: ObjectMeta, spec: Dict[str, Any]) -> AuthorizationPolicy:
    s = _obj(spec, "spec", ("selector", "targetRef", "targetRefs", "action", "provider", "rules"))
    action = _enum(s.get("action"), "spec.action", AUTHZ_ACTIONS, "ALLOW")
    if action == "CUSTOM" and s.get("provider") is None:
        raise Reject("spec.provider is required for action CUSTOM")
    selector = _label_selector(s.get("selector"), "spec.selector")
    if selector is not None and (s.get("targetRef") is not None or s.get("targetRefs") is not None):
        raise Reject("spec: only one of selector or targetRef(s) may be set")
    rules = [_rule(r, f"spec.rules[{i}]") for i, r in enumerate(_list(s.get("rules"), "spec.rules"))]
    return AuthorizationPolicy(meta=meta, selector=selector, action=action, rules=rules,
                               target_refs=s.get("targetRef") is not None or s.get("targetRefs") is not None)


PARSERS = {
    "PeerAuthentication": parse_peer_authentication,
    "AuthorizationPolicy": parse_authorization_policy,
}
