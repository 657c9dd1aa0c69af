"""``zookeeper://host:2181[,host2:2181]/dubbo``: Dubbo providers registered in ZooKeeper.

Dubbo's interface-level layout: ``/<root>/<interface>/providers/<URL-encoded
provider URL>``, e.g. ``dubbo://10.0.0.5:20880/com.example.Demo?version=1.0.0&
group=g&weight=100``.  Each provider URL becomes an instance of the service
named by the interface; its parameters (version, group, application, side,
…) become labels, plus ``protocol`` (the URL scheme).  ``enabled=false``
makes it unhealthy; ``weight`` (Dubbo default 100) is carried, 0 = no traffic.

The client is kazoo (pure-Python, raw sockets: never seen by the hooks).
Child watches only mark paths dirty; this source's own thread re-reads them,
so a burst of provider changes costs one read per path.  On a reconnect
everything is re-read (watches may be lost with a session); while ZooKeeper is
unreachable the last list stays in force and kazoo keeps reconnecting.
URI parameters: ``category`` (default ``providers``), ``session_timeout``
(seconds, default 10), ``connect_timeout`` (how long the first call may wait
for a first connection, default 2).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Dict, List, Optional, Set
from urllib.parse import parse_qsl, unquote, urlsplit

from meshpatch.config import ConfigError
from meshpatch.registries.base import Instance, Registry
from meshpatch.registries.config import REGISTRY_VAR, RegistryURI

log = logging.getLogger("meshpatch.registry")

#: Provider URL parameters that are not useful as labels (long or per-process).
_NOT_LABELS = frozenset({"methods", "pid", "timestamp"})


def decode_provider(child: str, service: str, source: str = "zookeeper") -> Optional[Instance]:
    """A Dubbo provider node name → Instance (None when it is not a provider URL)."""
    url = unquote(child)
    if "://" not in url:
        return None
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return None
    if not host or not port:
        return None
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    labels = {k: v for k, v in params.items() if k not in _NOT_LABELS}
    labels["protocol"] = parts.scheme
    healthy = params.get("enabled", "true").lower() != "false" and params.get("disabled", "false").lower() != "true"
    try:
        weight = int(params.get("weight", "100"))
    except ValueError:
        weight = 100
    return Instance(service, host, port, labels, healthy, weight, source)


def _float_param(uri: RegistryURI, name: str, default: float) -> float:
    try:
        return float(uri.param(name, str(default)))
    except ValueError:
        raise ConfigError(REGISTRY_VAR, f"{name}={uri.param(name)!r} in {uri.display}", f"give seconds, e.g. ?{name}={default}") from None


class ZooKeeperRegistry(Registry):
    scheme = "zookeeper"

    def __init__(self, uri: RegistryURI) -> None:
        super().__init__(uri)
        self.root = "/" + (uri.path.strip("/") or "dubbo")
        self.category = uri.param("category", "providers")
        self.session_timeout = _float_param(uri, "session_timeout", 10.0)
        self.connect_timeout = _float_param(uri, "connect_timeout", 2.0)
        self._client = None
        self._wake = threading.Event()
        self._dirty: Set[str] = set()
        self._resync = True
        self._connected = False
        self._providers: Dict[str, Optional[List[Instance]]] = {}

    # -- kazoo callbacks (kazoo's threads: never block) ------------------------

    def _on_state(self, state: str) -> None:
        if state == "CONNECTED":
            self._connected = True
            self._resync = True
        else:  # SUSPENDED, LOST
            self._connected = False
        self._wake.set()

    def _on_watch(self, event: object) -> None:
        path = getattr(event, "path", None)
        if path:
            self._dirty.add(path)
        self._wake.set()

    # -- the source's thread ------------------------------------------------------

    def run(self) -> None:
        from kazoo.client import KazooClient
        from kazoo.exceptions import KazooException

        kazoo_log = logging.getLogger("meshpatch.registry.kazoo")
        if not logging.getLogger("meshpatch").isEnabledFor(logging.DEBUG):
            kazoo_log.setLevel(logging.CRITICAL)  # kazoo narrates every reconnect; our one line says enough
        client = KazooClient(
            hosts=",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.uri.hosts),
            timeout=self.session_timeout,
            connection_retry={"max_tries": -1, "delay": 0.1, "backoff": 2, "max_delay": 2.0},
            command_retry={"max_tries": 2, "delay": 0.1, "max_delay": 0.5},
            read_only=True,
            logger=kazoo_log,
        )
        self._client = client
        client.add_listener(self._on_state)
        started = time.monotonic()
        client.start_async()
        try:
            while not self.stopping:
                self._wake.wait(1.0)
                self._wake.clear()
                if self.stopping:
                    break
                if not self._connected:
                    if self.first_attempt.is_set():
                        self.unreachable("connection lost")  # logs once per outage
                    elif time.monotonic() - started >= self.connect_timeout:
                        self.unreachable(f"no connection within {self.connect_timeout:g} s")
                    continue
                try:
                    self._sync(client)
                except KazooException as exc:
                    self._resync = True
                    log.debug("meshpatch: zookeeper read failed (%r); will re-read", exc)
        finally:
            self._client = None
            try:
                client.stop()
                client.close()
            except Exception:
                pass

    def _sync(self, client: object) -> None:
        from kazoo.exceptions import NoNodeError

        if self._resync:
            self._resync = False
            self._dirty.clear()
            dirty = {self.root}
            full = True
        else:
            dirty, self._dirty = self._dirty, set()
            full = False
        if not dirty and self.first_attempt.is_set():
            return
        providers = dict(self._providers)
        if self.root in dirty:
            try:
                interfaces = client.get_children(self.root, watch=self._on_watch)  # type: ignore[attr-defined]
            except NoNodeError:
                client.exists(self.root, watch=self._on_watch)  # type: ignore[attr-defined]
                interfaces = []
            for gone in set(providers) - set(interfaces):
                del providers[gone]
            for iface in interfaces:
                if full or iface not in providers:
                    providers[iface] = self._read_providers(client, iface)
        prefix = self.root + "/"
        for path in dirty:
            if path.startswith(prefix):
                iface = path[len(prefix):].split("/", 1)[0]
                if iface in providers or not full:
                    providers[iface] = self._read_providers(client, iface)
        self._providers = providers
        self.publish({iface: items for iface, items in providers.items() if items is not None})

    def _read_providers(self, client: object, iface: str) -> Optional[List[Instance]]:
        from kazoo.exceptions import NoNodeError

        path = f"{self.root}/{iface}/{self.category}"
        try:
            children = client.get_children(path, watch=self._on_watch)  # type: ignore[attr-defined]
        except NoNodeError:
            client.exists(path, watch=self._on_watch)  # type: ignore[attr-defined]
            return None
        items = []
        for child in children:
            inst = decode_provider(child, iface, self.description)
            if inst is not None:
                items.append(inst)
        return items

    def close(self) -> None:
        self._wake.set()

    def reset_after_fork(self) -> None:
        self._client = None
        self._wake = threading.Event()
        self._connected = False
        self._resync = True
