"""Shared pieces of the robustness benches: loopback pods, a control plane in
its own process (so it can be SIGKILLed), and the Istio YAML they serve."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from tests.support.mesh_yaml import REVIEWS as HOST, reviews_entry, reviews_split  # noqa: E402, F401 (re-exported)


class OkHandler(BaseHTTPRequestHandler):
    """Answers every GET with a small JSON body: ``{"ok":true}`` (latency benchmarks)."""

    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without TCP_NODELAY Nagle
        # plus the client's delayed ACK adds ~40 ms to every keep-alive call.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def body(self) -> bytes:
        return b'{"ok":true}'

    def do_GET(self) -> None:  # noqa: N802 - http.server API
        body = self.body()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _Handler(OkHandler):
    """Names the pod that answered (the benches count answers per pod)."""

    def body(self) -> bytes:
        return json.dumps({"server": self.server.name}).encode()  # type: ignore[attr-defined]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a killed pod's half-written replies are expected, not news


class Pod:
    """An HTTP server on 127.0.0.x that names itself; ``kill()`` closes it hard
    (listening socket and every open connection), like a pod that died."""

    def __init__(self, name: str, address: str, port: int = 0) -> None:
        self.name = name
        self.server = _Server((address, port), _Handler)
        self.server.name = name  # type: ignore[attr-defined]
        self.address, self.port = self.server.server_address[:2]
        self._sockets: List[socket.socket] = []
        original = self.server.process_request

        def track(request: socket.socket, client: object) -> None:
            self._sockets.append(request)
            original(request, client)

        self.server.process_request = track  # type: ignore[method-assign]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def kill(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for sock in self._sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            except OSError:
                pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mesh_yaml(endpoints: Sequence[Tuple[str, int, str]], v1_weight: int = 100) -> str:
    """``reviews`` with endpoints (address, port, version) and a v1/v2 split."""
    return reviews_split(endpoints, v1_weight, host=HOST)


class ControlPlaneProcess:
    """``meshpatch control-plane`` in a child process on a fixed port."""

    def __init__(self, config_dir: Path, port: int) -> None:
        self.config_dir = config_dir
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.proc: Optional[subprocess.Popen] = None

    def write(self, yaml_text: str) -> None:
        tmp = self.config_dir / ".mesh.yaml.tmp"
        tmp.write_text(yaml_text)
        os.replace(tmp, self.config_dir / "mesh.yaml")

    def start(self) -> "ControlPlaneProcess":
        self.proc = subprocess.Popen(
            [str(BIN / "meshpatch"), "control-plane", "--config", str(self.config_dir), "--listen", self.address,
             "--poll-interval", "0.05", "--log-level", "WARNING"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise SystemExit("control plane did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
            self.proc = None


def app_env(extra: Dict[str, str]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESHPATCH_", "GRPC_XDS")) and k != "PYTHONPATH"}
    env.update(extra)
    return env


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
