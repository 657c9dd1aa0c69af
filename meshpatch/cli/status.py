"""``meshpatch status``: what a running process's meshpatch is doing, from its
admin endpoint — hooks, xDS resources per type with version, ACK/NACK and the
last error, targets and their routes, clusters with endpoints, health, lane and
load-balancer state, registries, lanes, telemetry, internal errors."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List

from meshpatch.cli._admin_client import AdminUnavailable, add_address_arguments, display, fetch

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_address_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the raw JSON")


def run(args: argparse.Namespace) -> int:
    try:
        data = fetch(args, "/status")
    except AdminUnavailable as exc:
        sys.stderr.write(f"meshpatch status: {exc}\n")
        return 1
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(data))
    return 0


def _table(rows: List[List[str]], indent: str = "  ") -> str:
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() + "\n"
                   for row in rows)


def render(data: Dict[str, Any]) -> str:
    out = []
    act = data.get("activation") or {}
    out.append(f"meshpatch {data.get('meshpatch')} in pid {data.get('pid')} (python {data.get('python')}), "
               f"up {data.get('uptime_s')} s\n")
    out.append(f"activation: {display(act.get('source'), 'not activated')}"
               f"{'; CONFIG ERROR: ' + act['config_error'] if act.get('config_error') else ''}\n")
    out.append(f"agent: {data.get('agent')}\n\nHOOKS\n")
    out.append(_table([[name, s.get("state", ""), s.get("detail", "")]
                       for name, s in sorted((act.get("hooks") or {}).items())]))
    xds = data.get("xds")
    out.append("\nXDS\n")
    if not xds:
        out.append("  no xDS client in this process\n")
    else:
        out.append(f"  server {xds['server']} ({xds['bootstrap']}), node {xds['node_id']}\n")
        out.append(f"  stream {xds['state']}, streams opened {display(xds.get('streams_opened'))}, "
                   f"last stream error {display(xds.get('last_stream_error'))}\n")
        rows = [["TYPE", "VERSION", "ACK", "NACK", "AGE", "LAST ERROR"]]
        for kind, t in xds["types"].items():
            age = f"{t['config_age_s']}s" if t.get("config_age_s") is not None else "-"
            rows.append([kind, display(t["version"]), str(t["acks"]), str(t["nacks"]), age, display(t["last_error"])])
        out.append(_table(rows))
        rows = [["TYPE", "NAME", "STATUS", "VERSION", "ERROR"]]
        for kind, t in xds["types"].items():
            for r in t["resources"]:
                rows.append([kind, r["name"], r["status"], display(r["version"]), display(r["error"])])
        out.append("\n  subscribed resources\n" + _table(rows, "  "))
    out.append("\nTARGETS\n")
    for target in data.get("targets") or []:
        state = "in mesh" if target.get("in_mesh") else ("not in mesh" if target.get("resolved") else "resolving")
        out.append(f"  {target['target']}  {state}  listener {display(target.get('listener'))}  "
                   f"route config {display(target.get('route_config'))}  vhost {display(target.get('virtual_host'))}\n")
        for route in target.get("routes") or []:
            clusters = ", ".join(f"{name} {weight}" for name, weight in (route.get("clusters") or {}).items())
            extra = f" retries {route['retries']['num']}" if route.get("retries") else ""
            out.append(f"    route {display(route.get('name'), '(unnamed)')}: {route['match'].get('path')}"
                       f"{' headers ' + str(route['match']['headers']) if route['match'].get('headers') else ''}"
                       f" -> {route['action']} {clusters}{extra}\n")
    if not data.get("targets"):
        out.append("  none yet\n")
    out.append("\nCLUSTERS\n")
    for cluster in data.get("clusters") or []:
        lanes = f"  lanes {', '.join(cluster['lanes'])}" if cluster.get("lanes") else ""
        out.append(f"  {cluster['name']}  {cluster['state']}  {display(cluster.get('lb_policy'))}  "
                   f"in flight {display(cluster.get('in_flight'))}{lanes}\n")
        rows = []
        for ep in cluster.get("endpoints") or []:
            extra = ", ".join(f"{k}={v}" for k, v in ep.items()
                              if k not in ("address", "port", "health", "weight", "locality", "priority", "lane",
                                           "in_rotation"))
            rows.append([f"{ep['address']}:{ep['port']}", ep["health"], f"weight {ep['weight']}",
                         f"locality {display(ep.get('locality'))}", f"priority {ep.get('priority', 0)}",
                         f"lane {display(ep.get('lane'), 'baseline')}",
                         "in rotation" if ep.get("in_rotation") else "OUT OF ROTATION", extra])
        out.append(_table(rows, "    "))
    if not data.get("clusters"):
        out.append("  none yet\n")
    out.append("\nREGISTRIES\n")
    registries = data.get("registries") or []
    if not registries:
        out.append("  none configured\n")
    for reg in registries if isinstance(registries, list) else [registries]:
        out.append("  " + json.dumps(reg, sort_keys=True) + "\n")
    lanes_conf = data.get("lanes") or {}
    out.append(f"\nLANES  {'on' if lanes_conf.get('enabled') else 'off'}: header {lanes_conf.get('header')}, "
               f"baggage key {lanes_conf.get('baggage_key')}, endpoint label {lanes_conf.get('label')}\n")
    tel = data.get("telemetry") or {}
    out.append(f"TELEMETRY  opentelemetry-api {'yes' if tel.get('opentelemetry_api') else 'no'}, "
               f"tracer provider {display(tel.get('tracer_provider'), 'none (no-op)')}, "
               f"meter provider {display(tel.get('meter_provider'), 'none (no-op)')}\n")
    errors = data.get("internal_errors") or {}
    out.append("INTERNAL ERRORS  " + (", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none") + "\n")
    return "".join(out)
