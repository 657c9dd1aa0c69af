"""``meshpatch config-dump``: the xDS resources a running process holds, per
type, with status (ACKED/NACKED/REQUESTED/DOES_NOT_EXIST), version and error
— the client-side view CSDS gives for gRPC and ``istioctl proxy-config`` for
Envoy.  Text by default (one line per resource), the resources themselves
with ``--json``."""

from __future__ import annotations

import argparse
import json
import sys

from meshpatch.cli._admin_client import AdminUnavailable, add_address_arguments, display, fetch

DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_address_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print every resource in full, as JSON")
    parser.add_argument("--type", choices=["LDS", "RDS", "CDS", "EDS"], default=None, help="only this type")


def run(args: argparse.Namespace) -> int:
    try:
        data = fetch(args, "/config_dump")
    except AdminUnavailable as exc:
        sys.stderr.write(f"meshpatch config-dump: {exc}\n")
        return 1
    xds = data.get("xds")
    if xds and args.type:
        xds["types"] = {k: v for k, v in xds["types"].items() if k == args.type}
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return 0
    if not xds:
        print(f"pid {data.get('pid')}: no xDS client in this process (no xDS configuration, or no mesh call yet)")
        return 0
    print(f"pid {data.get('pid')}: xDS server {xds['server']}, node {xds['node_id']}")
    for kind, t in xds["types"].items():
        print(f"{kind}  version {display(t['version'])}  acks {t['acks']}  nacks {t['nacks']}"
              f"{'  last error: ' + t['last_error'] if t['last_error'] else ''}")
        for r in t["resources"]:
            print(f"  {r['name']}  {r['status']}  version {display(r['version'])}"
                  f"{'  error: ' + r['error'] if r['error'] else ''}")
    return 0
