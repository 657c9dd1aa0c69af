"""Client side of the admin endpoint: find the address, fetch a page as JSON."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
from typing import Any, Dict, Optional


class AdminUnavailable(Exception):
    pass


def add_address_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin", metavar="ADDR", default=None,
        help="the process's admin endpoint: unix:///path.sock or 127.0.0.1:PORT "
             "(default: $MESHPATCH_ADMIN, as the app was started with)")
    parser.add_argument("--pid", type=int, default=None,
                        help="fill {pid} in a per-process socket path (pre-fork servers)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def resolve(args: argparse.Namespace) -> Any:
    from meshpatch.config import ConfigError, parse_admin_address

    raw = args.admin if args.admin is not None else os.environ.get("MESHPATCH_ADMIN", "")
    if not raw.strip():
        raise AdminUnavailable("no admin address: pass --admin unix:///path.sock or 127.0.0.1:PORT "
                               "(the value of MESHPATCH_ADMIN the app runs with), or set MESHPATCH_ADMIN")
    if args.pid is not None:
        raw = raw.replace("{pid}", str(args.pid))
    elif "{pid}" in raw:
        raise AdminUnavailable(f"{raw} holds {{pid}}: pass --pid PID of the process to ask")
    try:
        return parse_admin_address({"MESHPATCH_ADMIN": raw})
    except ConfigError as exc:
        raise AdminUnavailable(str(exc).split(". meshpatch stays off")[0]) from None


def fetch(args: argparse.Namespace, page: str) -> Dict[str, Any]:
    address = resolve(args)
    if address[0] == "unix":
        connection: http.client.HTTPConnection = _UnixConnection(address[1], args.timeout)
        where = f"unix:{address[1]}"
    else:
        connection = http.client.HTTPConnection(address[1], address[2], timeout=args.timeout)
        where = f"{address[1]}:{address[2]}"
    try:
        connection.request("GET", page)
        response = connection.getresponse()
        data = response.read()
    except OSError as exc:
        raise AdminUnavailable(f"cannot reach the admin endpoint at {where}: {exc} "
                               "(is the app running with MESHPATCH_ADMIN set to this address?)") from None
    finally:
        connection.close()
    if response.status != 200:
        raise AdminUnavailable(f"{where}{page} answered {response.status}: {data[:200]!r}")
    return json.loads(data)


def display(value: Optional[Any], empty: str = "-") -> str:
    if value is None or value == "":
        return empty
    return str(value)
