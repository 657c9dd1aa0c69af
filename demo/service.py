"""One version of the demo's `reviews` service: what a pod would run.

It serves HTTP on one port and gRPC on another of its own loopback address
(127.0.0.2 plays pod v1, 127.0.0.3 pod v2) and answers every call with its
version, so the client can count where the mesh sent each request.  gRPC uses
a generic handler with raw bytes, so there is no generated code to keep.

    python demo/service.py --version v1 --address 127.0.0.2

With ``--zookeeper HOST:PORT --dubbo-interface NAME`` it also registers itself
in ZooKeeper the way a Dubbo provider does (an ephemeral node per protocol
under ``/dubbo/<interface>/providers``, URL parameters such as ``version``),
and deregisters when it stops: a service that lives in a registry, not in
the mesh.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

GRPC_METHOD = "/demo.Reviews/GetVersion"


def make_http_handler(version: str, address: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, so pooled clients reuse connections
        # Whole response in one segment: headers and body written separately
        # would meet Nagle + the client's delayed ACK and cost 40 ms per call.
        wbufsize = 64 * 1024
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            body = json.dumps({"version": version, "pod": address, "path": self.path}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # thousands of calls; the client prints the summary

    return Handler


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that went away (the demo stopping it): not news
        super().handle_error(request, client_address)


def make_grpc_server(version: str, address: str, port: int) -> grpc.Server:
    reply = version.encode()

    def get_version(request: bytes, context: grpc.ServicerContext) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler(
        "demo.Reviews",
        {"GetVersion": grpc.unary_unary_rpc_method_handler(get_version)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    if server.add_insecure_port(f"{address}:{port}") != port:
        raise SystemExit(f"service {version}: cannot bind gRPC {address}:{port}")
    return server


def register_dubbo_provider(zookeeper: str, interface: str, version: str, address: str, http_port: int,
                            grpc_port: int) -> object:
    """Ephemeral provider nodes, one per protocol; they vanish with the session."""
    from urllib.parse import quote

    from kazoo.client import KazooClient

    client = KazooClient(hosts=zookeeper, timeout=10.0)
    client.start(timeout=15)
    parent = f"/dubbo/{interface}/providers"
    client.ensure_path(parent)
    for protocol, port in (("rest", http_port), ("tri", grpc_port)):
        url = (f"{protocol}://{address}:{port}/{interface}?application=demo-{interface.rsplit('.', 1)[-1].lower()}"
               f"&interface={interface}&side=provider&version={version}")
        client.create(f"{parent}/{quote(url, safe='')}", b"", ephemeral=True)
    return client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", required=True, help="reply with this version, e.g. v1")
    parser.add_argument("--address", required=True, help="loopback address playing the pod IP, e.g. 127.0.0.2")
    parser.add_argument("--http-port", type=int, default=9080)
    parser.add_argument("--grpc-port", type=int, default=7070)
    parser.add_argument("--zookeeper", help="also register as a Dubbo provider in this ZooKeeper (host:port)")
    parser.add_argument("--dubbo-interface", help="the Dubbo interface name to register under, e.g. demo.Ratings")
    args = parser.parse_args(argv)

    try:
        http_server = HTTPServer((args.address, args.http_port), make_http_handler(args.version, args.address))
    except OSError as exc:
        raise SystemExit(f"service {args.version}: cannot bind HTTP {args.address}:{args.http_port}: {exc}") from None
    grpc_server = make_grpc_server(args.version, args.address, args.grpc_port)
    grpc_server.start()
    threading.Thread(target=http_server.serve_forever, name="http", daemon=True).start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    registration = None
    if args.zookeeper and args.dubbo_interface:
        registration = register_dubbo_provider(args.zookeeper, args.dubbo_interface, args.version, args.address,
                                               args.http_port, args.grpc_port)
    print(f"service {args.version} ready: http {args.address}:{args.http_port} grpc {args.address}:{args.grpc_port}", flush=True)
    stop.wait()
    if registration is not None:
        registration.stop()  # type: ignore[attr-defined]  (ends the session: the provider nodes go)
        registration.close()  # type: ignore[attr-defined]
    http_server.shutdown()
    grpc_server.stop(grace=0.5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
