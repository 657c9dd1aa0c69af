"""An ordinary client app: it knows nothing about meshpatch.

It calls the `reviews` service by its mesh name with three everyday libraries
(requests, httpx and grpc), counts which version answered and prints the
split per library.  Run plainly, the mesh name does not resolve and every
call fails; run under `meshpatch-run`, each call is routed by the mesh's
VirtualService weights.  It keeps its clients (a requests Session, an httpx
Client, one gRPC channel) across rounds, so a second round shows a running
process following a routing change without reconnecting or restarting.

    meshpatch-run python demo/client.py --calls 500 --rounds 2 [--registry-round]

``--registry-round`` adds one more round (after another Enter) that calls two
more services the same way: `ratings`, which lives only in a service registry
(ZooKeeper), and `details`, whose v1 is in the registry and v2 in the mesh.
The app does not know which is which; it calls them by name.
"""

from __future__ import annotations

import argparse
import collections
import sys

import grpc
import httpx
import requests

HTTP_URL = "http://reviews.default.svc.cluster.local:9080/reviews/1"
GRPC_TARGET = "reviews.default.svc.cluster.local:7070"
GRPC_METHOD = "/demo.Reviews/GetVersion"
VERSIONS = ("v1", "v2")
#: The registry round: service → (HTTP URL, gRPC target).
REGISTRY_SERVICES = {
    "ratings": ("http://ratings:9080/ratings/1", "ratings:7070"),
    "details": ("http://details.default.svc.cluster.local:9080/details/1", "details.default.svc.cluster.local:7070"),
}


class Clients:
    """Long-lived clients, as a real service keeps them."""

    def __init__(self, http_url: str = HTTP_URL, grpc_target: str = GRPC_TARGET) -> None:
        self.http_url = http_url
        self.session = requests.Session()
        self.httpx = httpx.Client(timeout=5.0)
        self.channel = grpc.insecure_channel(grpc_target)
        self.get_version = self.channel.unary_unary(GRPC_METHOD)

    def call_requests(self) -> str:
        response = self.session.get(self.http_url, timeout=5)
        response.raise_for_status()
        return response.json()["version"]

    def call_httpx(self) -> str:
        response = self.httpx.get(self.http_url)
        response.raise_for_status()
        return response.json()["version"]

    def call_grpc(self) -> str:
        return self.get_version(b"", timeout=5).decode()

    def close(self) -> None:
        self.session.close()
        self.httpx.close()
        self.channel.close()


def count(call, calls: int) -> tuple[collections.Counter[str], str]:
    seen: collections.Counter[str] = collections.Counter()
    first_error = ""
    for _ in range(calls):
        try:
            seen[call()] += 1
        except Exception as exc:  # an app would log and go on; we count
            seen["error"] += 1
            first_error = first_error or " ".join(f"{type(exc).__name__}: {exc}".split())
    return seen, first_error


def split_line(library: str, seen: collections.Counter[str], calls: int, first_error: str, service: str = "") -> str:
    parts = ([f"{service:<8}"] if service else []) + [f"{library:<9}"] + [f"{v} {100.0 * seen[v] / calls:4.1f}%" for v in VERSIONS]
    line = "  ".join(parts) + f"  ({calls} calls)"
    if seen["error"]:
        line += f"  errors {seen['error']} (first: {first_error[:160]})"
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500, help="calls per library per round")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; between rounds wait for a line on stdin")
    parser.add_argument("--registry-round", action="store_true",
                        help="then one more round (after a line on stdin) calling the ratings and details services")
    args = parser.parse_args(argv)

    clients = Clients()
    try:
        for round_no in range(1, args.rounds + 1):
            if round_no > 1:
                print("waiting for Enter to start the next round", flush=True)
                if not sys.stdin.readline():
                    break
            print(f"round {round_no}:", flush=True)
            for library, call in (
                ("requests", clients.call_requests),
                ("httpx", clients.call_httpx),
                ("grpc", clients.call_grpc),
            ):
                seen, first_error = count(call, args.calls)
                print("  " + split_line(library, seen, args.calls, first_error), flush=True)
        if args.registry_round:
            print("waiting for Enter to start the next round", flush=True)
            if sys.stdin.readline():
                print(f"round {args.rounds + 1}:", flush=True)
                for service, (http_url, grpc_target) in REGISTRY_SERVICES.items():
                    other = Clients(http_url, grpc_target)
                    try:
                        for library, call in (
                            ("requests", other.call_requests),
                            ("httpx", other.call_httpx),
                            ("grpc", other.call_grpc),
                        ):
                            seen, first_error = count(call, args.calls)
                            print("  " + split_line(library, seen, args.calls, first_error, service), flush=True)
                    finally:
                        other.close()
    finally:
        clients.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
