"""``consul://host:8500[?dc=&token=&wait=]``: service instances from Consul's health API.

For every service name the app calls, one blocking query loop on
``GET /v1/health/service/<name>?index=<X-Consul-Index>&wait=<wait>`` (Consul's
documented long-poll: the call returns when the service changes or after
``wait``).  An instance takes traffic only when every one of its checks is
``passing`` (what ``?passing`` filters on); the others are kept, unhealthy, so
the merge with xDS sees their state.  Address = ``Service.Address`` or else
``Node.Address``; labels = ``Service.Meta`` plus ``key=value`` tags; weight =
``Weights.Passing``.  Index handling follows Consul's blocking-query rules:
reset to 0 when it goes backwards, never below 1, and a short pause between
immediate returns.  ``token`` (or ``CONSUL_HTTP_TOKEN``) goes in ``X-Consul-Token``.
"""

from __future__ import annotations

import http.client
import logging
import os
import threading
from typing import Any, Dict, List
from urllib.parse import quote

from meshpatch.config import ConfigError
from meshpatch.internal import suppress_current_context
from meshpatch.registries._http import HttpStatusError, get_json
from meshpatch.registries.base import Backoff, Instance
from meshpatch.registries.config import REGISTRY_VAR, RegistryURI
from meshpatch.registries.lazy import LazyRegistry

log = logging.getLogger("meshpatch.registry")


def parse_health(name: str, entries: Any, source: str = "consul") -> List[Instance]:
    out = []
    for entry in entries if isinstance(entries, list) else []:
        service = entry.get("Service") or {}
        node = entry.get("Node") or {}
        address = service.get("Address") or node.get("Address")
        port = service.get("Port")
        if not address or not isinstance(port, int) or not 0 < port < 65536:
            continue
        labels: Dict[str, str] = {}
        for tag in service.get("Tags") or []:
            key, sep, value = str(tag).partition("=")
            if sep and key:
                labels[key] = value
        labels.update({str(k): str(v) for k, v in (service.get("Meta") or {}).items()})
        checks = entry.get("Checks") or []
        healthy = all(check.get("Status") == "passing" for check in checks)
        weight = (service.get("Weights") or {}).get("Passing", 1)
        out.append(Instance(name, address, port, labels, healthy, int(weight), source))
    return out


def _wait_seconds(text: str) -> float:
    text = text.strip().lower()
    try:
        if text.endswith("ms"):
            return float(text[:-2]) / 1000
        if text.endswith("m"):
            return float(text[:-1]) * 60
        return float(text.rstrip("s"))
    except ValueError:
        raise ConfigError(REGISTRY_VAR, f"wait={text!r} is not a duration", "write e.g. ?wait=30s") from None


class ConsulRegistry(LazyRegistry):
    scheme = "consul"

    def __init__(self, uri: RegistryURI) -> None:
        super().__init__(uri)
        self.wait = _wait_seconds(uri.param("wait", "30s"))
        self.dc = uri.param("dc")
        token = uri.param("token") or os.environ.get("CONSUL_HTTP_TOKEN", "")
        self.headers = {"X-Consul-Token": token} if token else {}
        self._threads: Dict[str, threading.Thread] = {}

    def _address(self, attempt: int):
        return self.uri.hosts[attempt % len(self.uri.hosts)]

    def run(self) -> None:
        """The source thread: a reachability check (one clear line when Consul is
        down at start), then it only starts per-service loops for new names."""
        backoff = Backoff()
        attempt = 0
        while not self.stopping:
            host, port = self._address(attempt)
            try:
                get_json(host, port, "/v1/status/leader", headers=self.headers, timeout=2.0)
                break
            except (OSError, http.client.HTTPException, HttpStatusError, ValueError) as exc:
                self.unreachable(f"{type(exc).__name__}: {exc}")
                attempt += 1
                if not self.sleep(backoff.next()):
                    return
        self.reachable()
        while not self.stopping:
            for name in self.watched():
                if name not in self._threads:
                    thread = threading.Thread(target=self._service_loop, args=(name,), daemon=True,
                                              name=f"meshpatch-registry-consul-{name}"[:60])
                    self._threads[name] = thread
                    thread.start()
            self._new_names.wait(1.0)
            self._new_names.clear()

    def _service_loop(self, name: str) -> None:
        suppress_current_context()
        index = 0
        attempt = 0
        backoff = Backoff()
        path = "/v1/health/service/" + quote(name, safe="")
        while not self.stopping:
            host, port = self._address(attempt)
            params = {"dc": self.dc, "index": index or None, "wait": f"{int(self.wait)}s" if index else None}
            try:
                body, headers = get_json(host, port, path, params, self.headers, timeout=self.wait + self.wait / 16 + 5)
            except (OSError, http.client.HTTPException, HttpStatusError, ValueError) as exc:
                if self.stopping:
                    return
                self.unreachable(f"{type(exc).__name__}: {exc}")
                attempt += 1
                index = 0
                if not self.sleep(backoff.next()):
                    return
                continue
            backoff.reset()
            try:
                new_index = int(headers.get("x-consul-index", "0"))
            except ValueError:
                new_index = 0
            if new_index < index or new_index <= 0:
                new_index = 0  # went backwards (or absent): start over, as Consul's docs say
            unchanged = new_index == index
            index = new_index
            self.answer(name, parse_health(name, body, self.description))
            if unchanged or not index:
                self.sleep(0.2)  # an immediate return: never spin

    def names_added(self, names: List[str]) -> None:
        self._new_names.set()

    def reset_after_fork(self) -> None:
        super().reset_after_fork()
        self._threads = {}
