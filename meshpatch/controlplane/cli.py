"""``meshpatch control-plane``: run the local control plane until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

DESCRIPTION = (
    "Serve xDS shaped like istiod's proxyless-gRPC output (SotW ADS over gRPC) from Istio "
    "ServiceEntry / WorkloadEntry / DestinationRule / VirtualService YAML.  The config file or "
    "directory (*.yaml, *.yml) is re-read when it changes and pushed to every client."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="PATH", help="Istio YAML file or directory of *.yaml/*.yml files")
    p.add_argument(
        "--listen", default="127.0.0.1:15010", metavar="ADDR",
        help="HOST:PORT or unix:///path to serve on (default 127.0.0.1:15010; port 0 picks a free port)",
    )
    p.add_argument("--poll-interval", type=float, default=0.2, metavar="SECONDS", help="config change polling interval (default 0.2)")
    p.add_argument("--max-streams", type=int, default=64, metavar="N", help="worker threads = concurrent ADS streams (default 64)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default INFO")


def _valid_listen(addr: str) -> bool:
    if addr.startswith("unix:"):
        return len(addr) > len("unix:")
    host, sep, port = addr.rpartition(":")
    return bool(sep and host and port.isdigit() and int(port) < 65536)


def run(args: argparse.Namespace) -> int:
    prog = "meshpatch control-plane"
    if not os.path.exists(args.config):
        print(f"{prog}: error: --config {args.config}: no such file or directory", file=sys.stderr)
        return 2
    if not (os.path.isfile(args.config) or os.path.isdir(args.config)):
        print(f"{prog}: error: --config {args.config}: not a file or directory", file=sys.stderr)
        return 2
    if not _valid_listen(args.listen):
        print(f"{prog}: error: --listen {args.listen!r}: expected HOST:PORT or unix:///path", file=sys.stderr)
        return 2
    if args.poll_interval <= 0:
        print(f"{prog}: error: --poll-interval must be > 0", file=sys.stderr)
        return 2

    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    from .config_source import ConfigPathError
    from .server import ControlPlaneServer

    server = ControlPlaneServer(args.config, listen=args.listen, poll_interval=args.poll_interval, max_workers=args.max_streams)
    try:
        server.start()
    except ConfigPathError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"meshpatch control plane serving xDS on {server.address} (config {args.config}, version {server.version})",
          file=sys.stderr, flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop(grace=0.5)
    print("meshpatch control plane stopped", file=sys.stderr, flush=True)
    return 0
