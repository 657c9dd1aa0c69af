"""Registry servers for the tests, on loopback, started and stopped by the tests.

* :class:`ZooKeeperServer` — the real ZooKeeper from Debian's ``zookeeper``
  package (its jars, ``QuorumPeerMain`` with a temp standalone config).
* :class:`EtcdServer` — the real etcd from Debian's ``etcd-server`` (temp data dir,
  127.0.0.1 URLs), with helpers speaking its v3 JSON gateway.
* :class:`FakeConsul` / :class:`FakeNacos` — Consul and Nacos cannot run here;
  these are small servers speaking the documented HTTP APIs meshpatch uses
  (Consul ``/v1/health/service/<name>`` with blocking queries and
  ``X-Consul-Index``; Nacos ``/nacos/v1/ns/instance/list`` and the v3 client
  API), so the client code runs against real HTTP, only the server is ours.
* :class:`AppSession` — an unmodified app under ``meshpatch-run`` that keeps
  running and makes calls on request, so a test can change a registry between
  calls and check where each call went.

Every wait is bounded; every process is stopped (killed if need be) at exit.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.support.servers import UNARY, app_env, venv_bin

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"
ETCD = "/usr/bin/etcd"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def zookeeper_missing() -> Optional[str]:
    if not os.path.exists(ZOOKEEPER_JAR):
        return f"{ZOOKEEPER_JAR} not found (apt-get install zookeeper; tests/run.sh does)"
    if shutil.which("java") is None:
        return "java not found (Debian's zookeeper package pulls it in)"
    return None


def etcd_missing() -> Optional[str]:
    if not os.path.exists(ETCD):
        return f"{ETCD} not found (apt-get install etcd-server; tests/run.sh does)"
    return None


def _stop_process(proc: Optional[subprocess.Popen], sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------- ZooKeeper


class ZooKeeperServer:
    """A standalone ZooKeeper on 127.0.0.1:``port``; ``stop``/``start`` again keep its data."""

    def __init__(self, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.dir = tempfile.mkdtemp(prefix="meshpatch-zk-")
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = os.path.join(self.dir, "zookeeper.log")
        with open(os.path.join(self.dir, "zoo.cfg"), "w") as cfg:
            cfg.write(
                f"tickTime=500\ndataDir={self.dir}/data\nclientPort={self.port}\nclientPortAddress=127.0.0.1\n"
                "admin.enableServer=false\nminSessionTimeout=1000\nmaxSessionTimeout=20000\n"
                "4lw.commands.whitelist=ruok\n"
            )

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0, preexec_fn: Optional[Callable[[], None]] = None) -> "ZooKeeperServer":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            ["java", "-Xmx128m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-Dzookeeper.admin.enableServer=false",
             "-cp", ZOOKEEPER_JAR, "org.apache.zookeeper.server.quorum.QuorumPeerMain", os.path.join(self.dir, "zoo.cfg")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=preexec_fn,
        )
        log.close()
        try:
            wait_until(self._ok, timeout, 0.1, f"ZooKeeper on {self.address}")
        except TimeoutError:
            self.stop()
            with open(self.log_path, "rb") as handle:
                raise RuntimeError(f"ZooKeeper did not start: {handle.read()[-3000:]!r}") from None
        return self

    def _ok(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"ZooKeeper exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"ruok")
                return sock.recv(16) == b"imok"
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        _stop_process(self.proc, signal.SIGKILL if kill else signal.SIGTERM)
        self.proc = None

    def close(self) -> None:
        self.stop(kill=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def client(self) -> Any:
        from kazoo.client import KazooClient

        client = KazooClient(hosts=self.address, timeout=5.0)
        client.start(timeout=15)
        return client


def dubbo_url(protocol: str, address: str, port: int, interface: str, **params: str) -> str:
    query = "&".join(f"{k}={v}" for k, v in sorted(dict({"interface": interface, "side": "provider"}, **params).items()))
    return f"{protocol}://{address}:{port}/{interface}?{query}"


def register_provider(zk: Any, url: str, root: str = "/dubbo", ephemeral: bool = True) -> str:
    """Write a provider node the way Dubbo does: the URL-encoded URL under
    ``/<root>/<interface>/providers``.  Returns the node path."""
    interface = urlsplit(url).path.strip("/")
    parent = f"{root}/{interface}/providers"
    zk.ensure_path(parent)
    path = f"{parent}/{quote(url, safe='')}"
    zk.create(path, b"", ephemeral=ephemeral)
    return path


# --------------------------------------------------------------------------- etcd


class EtcdServer:
    def __init__(self) -> None:
        self.port = free_port()
        self.peer_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="meshpatch-etcd-")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "EtcdServer":
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        log = open(os.path.join(self.dir, "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            [ETCD, "--name", "meshtest", "--data-dir", os.path.join(self.dir, "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"meshtest={peer}", "--log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        wait_until(self._healthy, timeout, 0.1, f"etcd on {self.address}")
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited with {self.proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{self.address}/health", timeout=1) as resp:
                return json.loads(resp.read()).get("health") == "true"
        except OSError:
            return False

    def _post(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        request = urllib.request.Request(f"http://{self.address}{path}", json.dumps(body).encode(), method="POST")
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.loads(resp.read())

    def put(self, key: str, value: str, lease: Optional[int] = None) -> None:
        body: Dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        self._post("/v3/kv/put", body)

    def delete(self, key: str) -> None:
        self._post("/v3/kv/deleterange", {"key": _b64(key)})

    def grant(self, ttl: int) -> int:
        return int(self._post("/v3/lease/grant", {"TTL": ttl})["ID"])

    def revoke(self, lease: int) -> None:
        self._post("/v3/lease/revoke", {"ID": str(lease)})

    def stop(self, kill: bool = False) -> None:
        _stop_process(self.proc, signal.SIGKILL if kill else signal.SIGTERM)
        self.proc = None

    def close(self) -> None:
        self.stop(kill=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# --------------------------------------------------------------------------- Consul / Nacos (API-compatible)


class _JsonHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def reply(self, status: int, body: Any, headers: Optional[Dict[str, str]] = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # a client that hung up on a long-poll (the app exiting)
        super().handle_error(request, client_address)


class _HttpFake:
    def __init__(self, handler: type) -> None:
        self.server = _QuietServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.server.fake = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self.requests: List[str] = []
        self.cond = threading.Condition()
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        with self.cond:
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ConsulHandler(_JsonHandler):
    def do_GET(self) -> None:  # noqa: N802
        fake: FakeConsul = self.server.fake  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with fake.cond:
            fake.requests.append(self.path)
        if url.path == "/v1/status/leader":
            self.reply(200, "127.0.0.1:8300")
            return
        if not url.path.startswith("/v1/health/service/"):
            self.reply(404, {"error": "not found"})
            return
        name = unquote(url.path[len("/v1/health/service/"):])
        index = int(query.get("index", "0") or 0)
        wait = float(query.get("wait", "300s").rstrip("s")) if "index" in query else 0.0
        deadline = time.monotonic() + wait
        with fake.cond:
            while index and fake.index <= index and time.monotonic() < deadline and not fake.closed:
                fake.cond.wait(max(0.0, min(0.5, deadline - time.monotonic())))
            body = [dict(entry) for entry in fake.entries.get(name, {}).values()]
            current = fake.index
        if "passing" in query:
            body = [e for e in body if all(c["Status"] == "passing" for c in e["Checks"])]
        self.reply(200, body, {"X-Consul-Index": str(current)})


class FakeConsul(_HttpFake):
    """Speaks Consul's ``/v1/health/service/<name>`` (blocking queries) and ``/v1/status/leader``."""

    def __init__(self) -> None:
        self.index = 1
        self.closed = False
        self.entries: Dict[str, Dict[str, Dict[str, Any]]] = collections.defaultdict(dict)
        super().__init__(_ConsulHandler)

    def register(self, service: str, service_id: str, address: str, port: int, meta: Optional[Dict[str, str]] = None,
                 tags: Optional[List[str]] = None, status: str = "passing", node_address: str = "127.0.0.1") -> None:
        with self.cond:
            self.entries[service][service_id] = {
                "Node": {"Node": "node-1", "Address": node_address},
                "Service": {"ID": service_id, "Service": service, "Address": address, "Port": port,
                            "Meta": dict(meta or {}), "Tags": list(tags or []), "Weights": {"Passing": 1, "Warning": 1}},
                "Checks": [{"CheckID": "serfHealth", "Status": "passing"},
                           {"CheckID": f"service:{service_id}", "Status": status}],
            }
            self.index += 1
            self.cond.notify_all()

    def deregister(self, service: str, service_id: str) -> None:
        with self.cond:
            self.entries[service].pop(service_id, None)
            self.index += 1
            self.cond.notify_all()

    def close(self) -> None:
        self.closed = True
        super().close()


class _NacosHandler(_JsonHandler):
    def do_GET(self) -> None:  # noqa: N802
        fake: FakeNacos = self.server.fake  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        with fake.cond:
            fake.requests.append(self.path)
        v1, v3 = url.path == "/nacos/v1/ns/instance/list", url.path == "/nacos/v3/client/ns/instance/list"
        if not (v1 and "v1" in fake.apis) and not (v3 and "v3" in fake.apis):
            self.reply(404, {"error": "not found"})
            return
        key = (query.get("namespaceId", ""), query.get("groupName", "DEFAULT_GROUP"), query.get("serviceName", ""))
        with fake.cond:
            hosts = [dict(h) for h in fake.instances.get(key, {}).values()]
        if v1:
            self.reply(200, {"name": f"{key[1]}@@{key[2]}", "groupName": key[1], "clusters": "", "cacheMillis": 10000,
                             "hosts": hosts, "checksum": "", "lastRefTime": int(time.time() * 1000)})
        else:
            self.reply(200, {"code": 0, "message": "success", "data": hosts})


class FakeNacos(_HttpFake):
    """Speaks Nacos's ``/nacos/v1/ns/instance/list`` and (``apis`` incl. "v3") ``/nacos/v3/client/ns/instance/list``."""

    def __init__(self, apis: tuple = ("v1",)) -> None:
        self.apis = apis
        self.instances: Dict[tuple, Dict[str, Dict[str, Any]]] = collections.defaultdict(dict)
        super().__init__(_NacosHandler)

    def register(self, service: str, ip: str, port: int, metadata: Optional[Dict[str, str]] = None, healthy: bool = True,
                 enabled: bool = True, weight: float = 1.0, namespace: str = "", group: str = "DEFAULT_GROUP") -> None:
        with self.cond:
            self.instances[(namespace, group, service)][f"{ip}#{port}"] = {
                "instanceId": f"{ip}#{port}#DEFAULT#{group}@@{service}", "ip": ip, "port": port, "weight": weight,
                "healthy": healthy, "enabled": enabled, "ephemeral": True, "clusterName": "DEFAULT",
                "serviceName": f"{group}@@{service}", "metadata": dict(metadata or {}),
            }

    def deregister(self, service: str, ip: str, port: int, namespace: str = "", group: str = "DEFAULT_GROUP") -> None:
        with self.cond:
            self.instances[(namespace, group, service)].pop(f"{ip}#{port}", None)


# --------------------------------------------------------------------------- a long-running app


_APP = r'''
import collections, json, sys
import grpc, requests
UNARY = %r
session = requests.Session()
channels = {}
print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    seen = collections.Counter()
    for _ in range(cmd["n"]):
        try:
            if cmd["kind"] == "http":
                seen[session.get(cmd["url"], timeout=5).json()["server"]] += 1
            else:
                channel = channels.get(cmd["target"])
                if channel is None:
                    channel = channels[cmd["target"]] = grpc.insecure_channel(cmd["target"])
                seen[json.loads(channel.unary_unary(UNARY)(b"x", timeout=5))["server"]] += 1
        except Exception as exc:
            seen["error:" + type(exc).__name__] += 1
    print("RESULT " + json.dumps(seen), flush=True)
''' % UNARY


class AppSession:
    """An unmodified app (requests + grpc) under ``meshpatch-run`` that stays up
    between calls: ``http(url, n)`` / ``grpc(target, n)`` → Counter of the
    answering servers' names (``error:<Type>`` for failed calls)."""

    def __init__(self, env: Dict[str, str], timeout: float = 60.0) -> None:
        command = [os.path.join(venv_bin(), "meshpatch-run"), os.path.join(venv_bin(), "python"), "-c", _APP]
        self._scratch = tempfile.mkdtemp(prefix="meshpatch-app-")
        self.stderr_path = os.path.join(self._scratch, "stderr")
        self._stderr = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(command, env=app_env(env), cwd=self._scratch, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1)
        self._lines: "queue.Queue[Optional[str]]" = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.timeout = timeout
        self._read("READY")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read(self, prefix: str) -> str:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"app gave no {prefix} line; stderr: {self.stderr()[-3000:]}") from None
            if line is None:
                raise RuntimeError(f"app exited ({self.proc.poll()}); stderr: {self.stderr()[-3000:]}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def _call(self, cmd: Dict[str, Any]) -> collections.Counter:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return collections.Counter(json.loads(self._read("RESULT ")))

    def http(self, url: str, n: int = 20) -> collections.Counter:
        return self._call({"kind": "http", "url": url, "n": n})

    def grpc(self, target: str, n: int = 20) -> collections.Counter:
        return self._call({"kind": "grpc", "target": target, "n": n})

    def until(self, call: Callable[[], collections.Counter], predicate: Callable[[collections.Counter], bool],
              timeout: float = 15.0) -> collections.Counter:
        """Repeat ``call`` until its counts satisfy ``predicate`` (registry changes
        take effect asynchronously); returns the satisfying counts."""
        deadline = time.monotonic() + timeout
        while True:
            seen = call()
            if predicate(seen):
                return seen
            if time.monotonic() >= deadline:
                raise AssertionError(f"calls never matched; last: {dict(seen)}; stderr: {self.stderr()[-2000:]}")
            time.sleep(0.1)

    def stderr(self) -> str:
        self._stderr.flush()
        with open(self.stderr_path) as handle:
            return handle.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._stderr.close()
        shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> "AppSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
