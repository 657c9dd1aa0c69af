"""The admin endpoint: status and config dump of a running process, over HTTP
on a Unix socket or a loopback port (``MESHPATCH_ADMIN``; off by default).

Served by a daemon thread with the standard library only.  ``GET /status`` and
``GET /config_dump`` answer JSON (see :mod:`meshpatch.introspect`); ``meshpatch
status`` / ``meshpatch config-dump`` are the clients, and so is
``curl --unix-socket PATH http://x/status``.  The address is validated by
:func:`meshpatch.config.parse_admin_address` (loopback / UDS only); a socket
file is created owner-only.  After a fork, a child serves its own endpoint when
the socket path contains ``{pid}`` (pre-fork servers), otherwise only the
parent does.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from typing import Any, Optional, Tuple

log = logging.getLogger("meshpatch.admin")

_server: Optional[socketserver.BaseServer] = None
_lock = threading.Lock()
_fork_hook = False


class _Handler(BaseHTTPRequestHandler):
    server_version = "meshpatch-admin"
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        from meshpatch import introspect

        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path == "/status":
                body: Any = introspect.status()
            elif path == "/config_dump":
                body = introspect.config_dump()
            elif path == "/":
                body = {"endpoints": ["/status", "/config_dump"]}
            else:
                self._send(404, {"error": f"no such page {path!r}"})
                return
        except Exception as exc:  # a status bug must not kill the admin thread
            from meshpatch.safety import internal_error

            internal_error("admin.page", exc)
            self._send(500, {"error": repr(exc)})
            return
        self._send(200, body)

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body, default=repr, indent=1).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self) -> str:
        return "admin-client"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: never a line per request
        pass


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class _Tcp6Server(_TcpServer):
    address_family = socket.AF_INET6


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def serve(address: Tuple[Any, ...]) -> Optional[str]:
    """Start serving ``address`` (from parse_admin_address) in a daemon thread;
    returns where it listens (``unix:PATH`` or ``HOST:PORT``), None if it cannot."""
    global _server, _fork_hook
    from meshpatch.internal import suppress_current_context

    suppress_current_context()
    with _lock:
        if _server is not None:
            return None
        try:
            server = _bind(address)
        except OSError as exc:
            # In use: usually another process of the same app (a child Python
            # inherits MESHPATCH_ADMIN); put {pid} in the socket path to give
            # each its own.  Anything else is worth a warning.
            in_use = exc.errno == errno.EADDRINUSE or "in use" in str(exc)
            log.log(logging.INFO if in_use else logging.WARNING,
                    "meshpatch: admin endpoint %s not started: %s", _display(address), exc)
            return None
        _server = server
        if not _fork_hook and hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=_after_fork_in_child)
            _fork_hook = True
    where = _where(server)
    thread = threading.Thread(target=_serve_forever, args=(server,), name="meshpatch-admin", daemon=True)
    thread.start()
    log.info("meshpatch admin endpoint listening on %s", where)
    return where


def _serve_forever(server: socketserver.BaseServer) -> None:
    from meshpatch.internal import suppress_current_context

    suppress_current_context()
    server.serve_forever(poll_interval=0.5)


def _bind(address: Tuple[Any, ...]) -> socketserver.BaseServer:
    if address[0] == "unix":
        path = address[1]
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.path.exists(path):
            _remove_stale(path)
        old = os.umask(0o177)
        try:
            server: socketserver.BaseServer = _UnixServer(path, _Handler)
        finally:
            os.umask(old)
        import atexit

        atexit.register(_unlink, path, os.getpid())
        return server
    _, host, port = address
    cls = _Tcp6Server if ":" in host else _TcpServer
    return cls((host, port), _Handler)


def _remove_stale(path: str) -> None:
    """Take over a socket file only when nobody answers on it."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"{path} is in use by another process")


def _unlink(path: str, pid: int) -> None:
    if os.getpid() == pid:
        try:
            os.unlink(path)
        except OSError:
            pass


def _where(server: socketserver.BaseServer) -> str:
    address = server.server_address
    if isinstance(address, (str, bytes)):
        return f"unix:{address if isinstance(address, str) else address.decode()}"
    return f"{address[0]}:{address[1]}"


def _display(address: Tuple[Any, ...]) -> str:
    return f"unix:{address[1]}" if address[0] == "unix" else f"{address[1]}:{address[2]}"


def where() -> Optional[str]:
    server = _server
    return _where(server) if server is not None else None


def stop() -> None:
    global _server
    with _lock:
        server, _server = _server, None
    if server is not None:
        server.shutdown()
        server.server_close()


def _after_fork_in_child() -> None:
    global _server, _lock
    _lock = threading.Lock()
    _server = None  # the parent's listener is the parent's
    raw = os.environ.get("MESHPATCH_ADMIN", "")
    if "{pid}" not in raw:
        return
    try:
        from meshpatch.config import parse_admin_address

        address = parse_admin_address(os.environ)
        if address is not None:
            threading.Thread(target=serve, args=(address,), name="meshpatch-admin-start", daemon=True).start()
    except Exception as exc:
        from meshpatch.safety import internal_error

        internal_error("admin.fork", exc)
