"""``meshpatch <subcommand> ...``: one argparse front for every tool.

Subcommands live in their own modules and are listed in :data:`SUBCOMMANDS`
as ``(name, module, help)``; a module provides ``add_arguments(parser)`` and
``run(args) -> int``.  Modules are imported to build the parser, so they must
keep heavy imports (grpc, protos) inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional, Sequence, Tuple

SUBCOMMANDS: List[Tuple[str, str, str]] = [
    (
        "control-plane",
        "meshpatch.controlplane.cli",
        "serve istiod-shaped xDS (SotW ADS) to proxyless clients from Istio YAML files",
    ),
    ("status", "meshpatch.cli.status", "show a running process's hooks, xDS resources, clusters and endpoints"),
    ("config-dump", "meshpatch.cli.config_dump", "dump the xDS resources a running process holds (CSDS-like)"),
    ("doctor", "meshpatch.cli.doctor", "show what meshpatch would do in this environment, without starting an app"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshpatch",
        description="meshpatch: a zero-code proxyless service mesh for Python.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in SUBCOMMANDS:
        mod = importlib.import_module(module)
        sp = sub.add_parser(name, help=help_text, description=getattr(mod, "DESCRIPTION", help_text))
        mod.add_arguments(sp)
        sp.set_defaults(_run=mod.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    return int(run(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
