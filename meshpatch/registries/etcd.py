"""``etcd://host:2379[,host2:2379]/prefix``: services that go-zero or Kratos register in etcd v3.

Two layouts are read from the same key range:

* go-zero: ``<service key>/<lease id>`` → ``host:port`` (e.g. ``product.rpc/7587864068988009477``
  → ``10.0.0.7:9002``); the service is the key without its last segment.
* Kratos: ``/microservices/<name>/<id>`` → JSON ``{"id", "name", "version", "metadata",
  "endpoints": ["grpc://10.0.0.7:9000", "http://10.0.0.7:8000"]}``; one instance per
  endpoint, labels = metadata + ``version`` + ``protocol`` (the endpoint's scheme).

Keys vanish when their lease expires (a dead instance), so presence = healthy.

The client speaks etcd's v3 JSON gateway (``/v3/kv/range`` then a ``/v3/watch``
stream from the next revision) with the standard library's http.client, which
the hooks never patch.  The URI path is the key prefix; since a URI path always
starts with ``/``, a prefix without one (go-zero keys) is given as
``?prefix=product.rpc``; no path and no ``prefix`` watches every key.  Every
(re)connect reads the whole range again, so the list is exact after an outage;
during one the last list stays in force.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import urlsplit

from meshpatch.registries.base import Backoff, Instance, Registry
from meshpatch.registries.config import RegistryURI

log = logging.getLogger("meshpatch.registry")

#: An idle watch stream is re-established after this long (a half-open TCP
#: connection would otherwise hide an etcd that went away without a FIN).
WATCH_IDLE = 60.0


def prefix_range_end(prefix: bytes) -> bytes:
    """etcd clientv3 GetPrefixRangeEnd: the first key after every key with ``prefix``."""
    end = bytearray(prefix)
    for index in range(len(end) - 1, -1, -1):
        if end[index] < 0xFF:
            end[index] += 1
            return bytes(end[: index + 1])
    return b"\x00"  # all keys


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> str:
    return base64.b64decode(text or "").decode("utf-8", "replace")


def decode_kvs(kvs: Dict[str, str], source: str = "etcd") -> Dict[str, List[Instance]]:
    services: Dict[str, List[Instance]] = {}
    for key, value in kvs.items():
        for inst in decode_kv(key, value, source):
            services.setdefault(inst.service, []).append(inst)
    return services


def decode_kv(key: str, value: str, source: str = "etcd") -> List[Instance]:
    text = value.strip()
    if text.startswith("{"):
        return _kratos(key, text, source)
    return _go_zero(key, text, source)


def _go_zero(key: str, value: str, source: str) -> List[Instance]:
    service, sep, _lease = key.rstrip("/").rpartition("/")
    service = service.strip("/")
    host, colon, port = value.rpartition(":")
    if not sep or not service or not colon or not port.isdigit() or not host:
        return []
    return [Instance(service, host.strip("[]"), int(port), {}, True, 1, source)]


def _kratos(key: str, value: str, source: str) -> List[Instance]:
    try:
        doc = json.loads(value)
    except ValueError:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("endpoints"), list):
        return []
    parts = key.rstrip("/").split("/")
    name = str(doc.get("name") or (parts[-2] if len(parts) >= 2 else ""))
    if not name:
        return []
    labels = {str(k): str(v) for k, v in (doc.get("metadata") or {}).items()} if isinstance(doc.get("metadata"), dict) else {}
    if doc.get("version"):
        labels["version"] = str(doc["version"])
    if doc.get("id"):
        labels["id"] = str(doc["id"])
    out = []
    for endpoint in doc["endpoints"]:
        try:
            url = urlsplit(str(endpoint))
            host, port = url.hostname, url.port
        except ValueError:
            continue
        if not host or not port:
            continue
        out.append(Instance(name, host, port, dict(labels, protocol=url.scheme), True, 1, source))
    return out


class EtcdError(Exception):
    pass


class EtcdRegistry(Registry):
    scheme = "etcd"

    def __init__(self, uri: RegistryURI) -> None:
        super().__init__(uri)
        if "prefix" in uri.params:
            prefix = uri.params["prefix"]
        else:
            prefix = uri.path if uri.path not in ("", "/") else ""
        self.prefix = prefix.encode("utf-8")
        self.timeout = 5.0
        self._host_index = 0
        self._conn: Optional[http.client.HTTPConnection] = None

    def _range_keys(self) -> Tuple[str, str]:
        if not self.prefix:
            return _b64(b"\x00"), _b64(b"\x00")
        return _b64(self.prefix), _b64(prefix_range_end(self.prefix))

    def _connect(self, timeout: Optional[float]) -> http.client.HTTPConnection:
        host, port = self.uri.hosts[self._host_index % len(self.uri.hosts)]
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self._conn = conn
        return conn

    def _post(self, path: str, body: Dict[str, Any]) -> Dict[str, Any]:
        conn = self._connect(self.timeout)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise EtcdError(f"{path}: HTTP {resp.status} {data[:200]!r}")
            return json.loads(data or b"{}")
        finally:
            conn.close()

    def run(self) -> None:
        backoff = Backoff()
        while not self.stopping:
            try:
                key, range_end = self._range_keys()
                answer = self._post("/v3/kv/range", {"key": key, "range_end": range_end})
                revision = int(answer.get("header", {}).get("revision", 0))
                kvs = {_unb64(kv["key"]): _unb64(kv.get("value", "")) for kv in answer.get("kvs", [])}
                self.publish(decode_kvs(kvs, self.description))
                backoff.reset()
                self._watch(key, range_end, revision + 1, kvs)
            except (OSError, http.client.HTTPException, EtcdError, ValueError, KeyError) as exc:
                if self.stopping:
                    return
                self.unreachable(f"{type(exc).__name__}: {exc}")
                self._host_index += 1
                if not self.sleep(backoff.next()):
                    return

    def _watch(self, key: str, range_end: str, start: int, kvs: Dict[str, str]) -> None:
        conn = self._connect(WATCH_IDLE)
        try:
            body = {"create_request": {"key": key, "range_end": range_end, "start_revision": start}}
            conn.request("POST", "/v3/watch", json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise EtcdError(f"/v3/watch: HTTP {resp.status}")
            for message in _json_lines(resp):
                if self.stopping:
                    return
                if "error" in message:
                    raise EtcdError(f"watch error: {message['error']}")
                result = message.get("result") or {}
                if result.get("canceled") or result.get("compact_revision"):
                    raise EtcdError("watch canceled (compacted); reading the range again")
                events = result.get("events") or []
                if not events:
                    continue
                for event in events:
                    kv = event.get("kv") or {}
                    name = _unb64(kv.get("key", ""))
                    if event.get("type") == "DELETE":
                        kvs.pop(name, None)
                    else:
                        kvs[name] = _unb64(kv.get("value", ""))
                self.publish(decode_kvs(kvs, self.description))
            if not self.stopping:
                raise EtcdError("watch stream ended")
        except TimeoutError:
            return  # idle: the caller reads the range again and re-watches
        finally:
            conn.close()

    def close(self) -> None:
        conn = self._conn
        if conn is not None:
            try:
                if conn.sock is not None:
                    import socket

                    conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reset_after_fork(self) -> None:
        self._conn = None


def _json_lines(resp: http.client.HTTPResponse) -> Iterator[Dict[str, Any]]:
    """etcd's gateway streams one JSON object per line (chunked)."""
    buffer = b""
    while True:
        line = resp.readline()
        if not line:
            return
        buffer += line
        if not buffer.endswith(b"\n"):
            continue
        text, buffer = buffer.strip(), b""
        if text:
            yield json.loads(text)
