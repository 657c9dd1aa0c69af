"""What a running meshpatch knows, as plain JSON-able data: the status view and
the config dump (what ``istioctl proxy-config`` and CSDS show for a sidecar).

Read-only and safe to call from any thread: it never creates the agent, never
waits on the network, and takes the xDS client's lock only for short copies.
Parts from other subsystems are found by duck typing so that load balancers,
registries and transports can add their own state without this module
changing: a cluster handle may offer ``describe_endpoint(endpoint) -> dict``
(ejection, in-flight...), a registry catalog ``status() -> dict``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from typing import Any, Dict, List, Optional

def _process_start() -> float:
    """When this process started (Linux /proc), else when this module was loaded."""
    try:
        with open("/proc/self/stat") as handle:
            ticks = int(handle.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as handle:
            uptime = float(handle.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


_STARTED = _process_start()

HEALTH = {0: "UNKNOWN", 1: "HEALTHY", 2: "UNHEALTHY", 3: "DRAINING", 4: "TIMEOUT", 5: "DEGRADED"}


def _agent() -> Any:
    from meshpatch import agent as agent_module

    return getattr(agent_module, "_agent", None)


def _short(type_url: str) -> str:
    from meshpatch.xds.type_urls import SHORT_NAMES

    return SHORT_NAMES.get(type_url, type_url.rsplit(".", 1)[-1])


def status() -> Dict[str, Any]:
    import meshpatch
    from meshpatch import activation, safety

    agent = _agent()
    out: Dict[str, Any] = {
        "meshpatch": meshpatch.__version__,
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "argv": list(sys.argv),
        "uptime_s": round(time.time() - _STARTED, 3),
        "activation": activation.status(),
        "agent": "running" if agent is not None else _agent_absent_reason(),
        "xds": _xds(agent),
        "targets": _targets(agent),
        "clusters": _clusters(agent),
        "registries": _registries(agent),
        "lanes": _lanes(),
        "telemetry": _telemetry(),
        "security": _security(),
        "internal_errors": safety.error_counts(),
    }
    return out


def _security() -> Dict[str, Any]:
    """Certificate providers, managed gRPC server ports, RBAC counters (meshpatch.security)."""
    from meshpatch import security

    return security.status()


def _agent_absent_reason() -> str:
    from meshpatch import agent as agent_module

    if getattr(agent_module, "_disabled", False):
        return "off (no xDS configuration or a configuration error; see the log)"
    return "not started yet (it starts on the first call to a mesh host)"


def _xds(agent: Any) -> Optional[Dict[str, Any]]:
    client = getattr(agent, "client", None) if agent is not None else None
    if client is None:
        return None
    from meshpatch.xds.client import TYPE_ORDER

    bootstrap = client.bootstrap
    transport = client.transport
    types = {}
    now = time.time()
    for type_url in TYPE_ORDER:
        stats = client.type_stats(type_url)
        accepted = stats.get("accepted_at") or 0
        types[_short(type_url)] = {
            "version": stats["version"],
            "acks": stats["acks"],
            "nacks": stats["nacks"],
            "last_error": stats["last_error"],
            "config_age_s": round(now - accepted, 3) if accepted else None,
            "resources": [
                {key: item[key] for key in ("name", "status", "version", "error")}
                for item in client.resources(type_url)
            ],
        }
    return {
        "server": bootstrap.servers[0].target,
        "bootstrap": bootstrap.source,
        "node_id": bootstrap.node.get("id", ""),
        "state": getattr(transport, "state", "?"),
        "connected": client.connected,
        "streams_opened": getattr(transport, "streams_opened", None),
        "last_stream_error": getattr(transport, "last_error", ""),
        "types": types,
    }


def _targets(agent: Any) -> List[Dict[str, Any]]:
    if agent is None:
        return []
    out = []
    for authority, target in sorted(agent.router.targets().items()):
        snapshot = getattr(target, "snapshot", None)
        listener = getattr(target, "listener", None)
        entry: Dict[str, Any] = {
            "target": authority,
            "listener": getattr(listener, "name", None),
            "route_config": getattr(snapshot, "route_config", None) or getattr(listener, "rds_name", None),
            "virtual_host": getattr(snapshot, "vhost", None),
            "resolved": snapshot is not None,
            "in_mesh": bool(snapshot is not None and getattr(snapshot, "routes", ())),
            "routes": [],
        }
        for route in getattr(snapshot, "routes", ()) or ():
            entry["routes"].append(_route(route))
        out.append(entry)
    return out


def _route(compiled: Any) -> Dict[str, Any]:
    route = compiled.route
    match = route.match
    action = route.action
    described: Dict[str, Any] = {
        "name": route.name,
        "match": {"path": f"{match.path.kind} {match.path.value!r}" if hasattr(match.path, "kind") else repr(match.path)},
        "action": action.kind,
    }
    if match.headers:
        described["match"]["headers"] = [repr(h) for h in match.headers]
    if match.fraction is not None:
        described["match"]["fraction"] = match.fraction
    if action.kind == "cluster":
        described["clusters"] = {action.cluster: 100}
    elif action.kind == "weighted":
        described["clusters"] = {w.name: w.weight for w in action.weighted}
    if action.timeout:
        described["timeout_s"] = action.timeout
    policy = route.policy
    retry = getattr(policy, "retry", None)
    if retry is not None:
        described["retries"] = {"num": retry.num_retries, "on": sorted(retry.retry_on)}
    return described


def _clusters(agent: Any) -> List[Dict[str, Any]]:
    if agent is None:
        return []
    from meshpatch import lanes
    from meshpatch.xds.type_urls import EDS

    client = getattr(agent, "client", None)
    eds: Dict[str, Any] = {}
    if client is not None:
        eds = {item["name"]: item["value"] for item in client.resources(EDS)}
    manager = agent.router.clusters
    label = lanes.settings().label
    out = []
    for name in manager.names():
        handle = manager.get(name)
        if handle is None:
            continue
        picker = handle.picker
        in_rotation = {(ep.address, ep.port) for ep in picker.endpoints}
        config = getattr(handle, "config", None)
        source = eds.get(getattr(handle, "eds_name", None) or "")
        endpoints = []
        if source is not None:
            for loc in source.localities:
                for ep in loc.endpoints:
                    endpoints.append(_endpoint(handle, ep, loc.priority, label, (ep.address, ep.port) in in_rotation))
        else:
            for ep in picker.endpoints:
                endpoints.append(_endpoint(handle, ep, 0, label, True))
        known = {(e["address"], e["port"]) for e in endpoints}
        for ep in picker.endpoints:  # endpoints from other sources (registries) merged into the picker
            if (ep.address, ep.port) not in known:
                endpoints.append(_endpoint(handle, ep, 0, label, True))
        lane_picker = picker if isinstance(picker, lanes.LanePicker) else None
        out.append({
            "name": name,
            "state": getattr(handle, "state", "?"),
            "eds_service_name": getattr(handle, "eds_name", None),
            "lb_policy": getattr(config, "lb_policy", None),
            "mtls": _cluster_tls(config),
            "in_flight": getattr(handle, "in_flight", None),
            "picker": getattr(picker, "reason", "") or type(picker).__name__,
            "lanes": list(lane_picker.lanes()) if lane_picker is not None else [],
            "endpoints": endpoints,
        })
    return out


def _cluster_tls(config: Any) -> Optional[Dict[str, Any]]:
    """The cluster's mTLS origination (None = plaintext)."""
    tls = getattr(config, "tls", None)
    if tls is None:
        return None
    return {"identity": tls.identity.instance if tls.identity else None, "ca": tls.ca.instance,
            "match_subject_alt_names": [m.describe() for m in tls.sans]}


def _endpoint(handle: Any, ep: Any, priority: int, label: str, in_rotation: bool) -> Dict[str, Any]:
    from meshpatch import lanes

    described: Dict[str, Any] = {
        "address": ep.address,
        "port": ep.port,
        "health": HEALTH.get(ep.health, str(ep.health)),
        "weight": ep.weight,
        "locality": ep.locality,
        "priority": priority,
        "lane": lanes.endpoint_lane(ep, label),
        "in_rotation": in_rotation,
    }
    describe = getattr(handle, "describe_endpoint", None)
    if describe is not None:  # load-balancer state (ejection, in flight...) when the handle offers it
        try:
            described.update(describe(ep) or {})
        except Exception as exc:
            described["describe_error"] = repr(exc)
    return described


def _registries(agent: Any) -> Any:
    catalog = getattr(agent, "registry", None) if agent is not None else None
    if catalog is None:
        return []
    custom = getattr(catalog, "status", None)
    if callable(custom):
        try:
            return custom()
        except Exception as exc:
            return [{"error": repr(exc)}]
    out = []
    for source in getattr(catalog, "sources", ()) or ():
        entry: Dict[str, Any] = {
            "source": getattr(source, "description", repr(source)),
            "updates": getattr(source, "updates", None),
            "first_answer": getattr(getattr(source, "first_attempt", None), "is_set", lambda: None)(),
            "reachable": not getattr(source, "_reported_down", False),
        }
        snapshot = getattr(source, "snapshot", None)
        if callable(snapshot):
            try:
                services = snapshot()
                entry["services"] = {name: len(items) for name, items in sorted(services.items())}
            except Exception as exc:
                entry["services_error"] = repr(exc)
        out.append(entry)
    return out


def _lanes() -> Dict[str, Any]:
    from meshpatch import lanes

    conf = lanes.settings()
    return {"enabled": conf.enabled, "header": conf.header, "baggage_key": conf.baggage_key, "label": conf.label}


def _telemetry() -> Dict[str, Any]:
    try:
        from meshpatch import telemetry

        return telemetry.state()
    except Exception as exc:
        return {"error": repr(exc)}


# -- config dump ------------------------------------------------------------------------


def config_dump() -> Dict[str, Any]:
    """Per xDS type, every subscribed resource with its status and the value in
    force: the resource as received when the client keeps it, else meshpatch's
    decoded form."""
    agent = _agent()
    client = getattr(agent, "client", None) if agent is not None else None
    out: Dict[str, Any] = {"pid": os.getpid(), "xds": None}
    if client is None:
        return out
    from meshpatch.xds.client import TYPE_ORDER

    types: Dict[str, Any] = {}
    for type_url in TYPE_ORDER:
        stats = client.type_stats(type_url)
        resources = []
        for item in client.resources(type_url):
            entry = {key: item[key] for key in ("name", "status", "version", "error")}
            entry["resource"] = _resource_json(item.get("raw"), item.get("value"))
            resources.append(entry)
        types[_short(type_url)] = {
            "type_url": type_url,
            "version": stats["version"],
            "acks": stats["acks"],
            "nacks": stats["nacks"],
            "last_error": stats["last_error"],
            "resources": resources,
        }
    out["xds"] = {"server": client.bootstrap.servers[0].target, "node_id": client.bootstrap.node.get("id", ""),
                  "types": types}
    out["registries"] = _registries(agent)
    return out


def _resource_json(raw: Any, value: Any) -> Any:
    if raw is not None:
        try:
            from google.protobuf.json_format import MessageToDict

            return MessageToDict(raw)
        except Exception:
            pass
    return jsonable(value)


def jsonable(value: Any, depth: int = 0) -> Any:
    """Decoded resources (frozen dataclasses, matchers, tuples) as JSON-able data."""
    if depth > 12:
        return repr(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if isinstance(value, dict):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [jsonable(v, depth + 1) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) else items
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    slots = getattr(type(value), "__slots__", None)
    if slots:
        return {name: jsonable(getattr(value, name, None), depth + 1) for name in slots
                if not name.startswith("_") and not callable(getattr(value, name, None))}
    pattern = getattr(value, "pattern", None)
    if isinstance(pattern, str):  # compiled regex
        return pattern
    return repr(value)
