"""``nacos://host:8848[?namespace=&group=&interval=&api=]``: instance lists from Nacos.

For every service name the app calls, ``GET /nacos/v1/ns/instance/list
?serviceName=&groupName=&namespaceId=`` (the open API Nacos 1.x and 2.x
serve; Nacos 3's client API ``/nacos/v3/client/ns/instance/list`` is used when
the server answers 404 to v1, or with ``?api=v3``), re-polled every
``interval`` seconds (default 5; the legacy Python SDK's subscribe polled
every 7 s and diffed).  An instance takes traffic when ``healthy`` and
``enabled`` and its weight is above 0; labels = ``metadata`` plus ``cluster``
(clusterName).  ``group`` defaults to ``DEFAULT_GROUP``, ``namespace`` to the
public namespace; ``accessToken`` is passed on when given.
"""

from __future__ import annotations

import http.client
import logging
import socket
from typing import Any, Dict, List

from meshpatch.config import ConfigError
from meshpatch.registries._http import HttpStatusError, get_json
from meshpatch.registries.base import Backoff, Instance
from meshpatch.registries.config import REGISTRY_VAR, RegistryURI
from meshpatch.registries.lazy import LazyRegistry

log = logging.getLogger("meshpatch.registry")

PATHS = {"v1": "/nacos/v1/ns/instance/list", "v3": "/nacos/v3/client/ns/instance/list"}


def parse_instances(name: str, body: Any, source: str = "nacos") -> List[Instance]:
    """v1 answers ``{"hosts": [...]}``; v2/v3 wrap it as ``{"code": 0, "data": ...}``
    where data is either that object or the list itself."""
    if isinstance(body, dict) and "code" in body and "data" in body:
        if body.get("code") not in (0, 200):
            raise ValueError(f"nacos error {body.get('code')}: {body.get('message')}")
        body = body["data"]
    hosts = body.get("hosts") if isinstance(body, dict) else body
    out = []
    for host in hosts if isinstance(hosts, list) else []:
        address, port = host.get("ip"), host.get("port")
        if not address or not isinstance(port, int) or not 0 < port < 65536:
            continue
        labels = {str(k): str(v) for k, v in (host.get("metadata") or {}).items()}
        if host.get("clusterName"):
            labels.setdefault("cluster", str(host["clusterName"]))
        weight_raw = host.get("weight", 1.0)
        try:
            weight_value = float(weight_raw)
        except (TypeError, ValueError):
            weight_value = 1.0
        weight = 0 if weight_value <= 0 else max(1, round(weight_value))
        healthy = bool(host.get("healthy", True)) and bool(host.get("enabled", True))
        out.append(Instance(name, address, port, labels, healthy, weight, source))
    return out


class NacosRegistry(LazyRegistry):
    scheme = "nacos"

    def __init__(self, uri: RegistryURI) -> None:
        super().__init__(uri)
        try:
            self.interval = float(uri.param("interval", "5"))
        except ValueError:
            raise ConfigError(REGISTRY_VAR, f"interval={uri.param('interval')!r} in {uri.display}", "give seconds, e.g. ?interval=5") from None
        self.api = uri.param("api", "auto")
        if self.api not in ("auto", "v1", "v3"):
            raise ConfigError(REGISTRY_VAR, f"api={self.api!r} in {uri.display}", "use api=v1 or api=v3 (or leave it out)")
        self.namespace = uri.param("namespace") or uri.param("namespaceId")
        self.group = uri.param("group", "DEFAULT_GROUP")
        self.clusters = uri.param("clusters")
        self.token = uri.param("accessToken")
        self._attempt = 0

    def _query(self, name: str) -> List[Instance]:
        host, port = self.uri.hosts[self._attempt % len(self.uri.hosts)]
        params: Dict[str, Any] = {"serviceName": name, "groupName": self.group, "namespaceId": self.namespace,
                                  "healthyOnly": "false", "accessToken": self.token}
        api = "v1" if self.api == "auto" else self.api
        if api == "v1":
            params["clusters"] = self.clusters
        else:
            params["clusterName"] = self.clusters
        try:
            body, _ = get_json(host, port, PATHS[api], params, timeout=5.0)
        except HttpStatusError as exc:
            if exc.status in (404, 410, 501) and self.api == "auto":
                self.api = "v3"
                log.info("meshpatch: nacos %s has no v1 instance API; using the v3 client API", self.description)
                return self._query(name)
            raise
        return parse_instances(name, body, self.description)

    def run(self) -> None:
        backoff = Backoff()
        host, port = self.uri.hosts[0]
        try:  # one clear line when Nacos is down at start (the HTTP API is asked per service)
            socket.create_connection((host, port), timeout=2.0).close()
        except OSError as exc:
            self.unreachable(f"cannot connect to {host}:{port}: {exc}")
        self.mark_attempted()  # per-name answers are tracked by settled()
        while not self.stopping:
            names = self.watched()
            try:
                for name in names:
                    if self.stopping:
                        return
                    self.answer(name, self._query(name))
                backoff.reset()
                delay = self.interval
            except (OSError, http.client.HTTPException, HttpStatusError, ValueError) as exc:
                if self.stopping:
                    return
                self.unreachable(f"{type(exc).__name__}: {exc}")
                self._attempt += 1
                delay = backoff.next()
            if self._new_names.wait(delay):
                self._new_names.clear()
