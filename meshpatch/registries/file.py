"""``file:///path/registry.yaml``: services and their endpoints in a YAML file.

    services:
      user-service:
      - address: 127.0.0.2
        port: 8080
        labels: {version: v1}
        healthy: true        # default true
        weight: 1            # default 1; 0 = takes no traffic
      - 127.0.0.3:8080       # short form: host:port, no labels

The file is polled (``?interval=`` seconds, default 0.5) and re-read when its
size, mtime or inode change, so an atomic replace (write + rename) and an edit
in place both count.  A file that does not parse leaves the last good list in
force and says why once.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from meshpatch.config import ConfigError
from meshpatch.registries.base import Instance, Registry
from meshpatch.registries.config import REGISTRY_VAR, RegistryURI

log = logging.getLogger("meshpatch.registry")


class FileFormatError(ValueError):
    pass


def parse_registry_yaml(text: str, source: str = "file") -> Dict[str, List[Instance]]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise FileFormatError(f"not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("services", {}), dict):
        raise FileFormatError("expected a mapping with 'services: {name: [endpoints]}'")
    services: Dict[str, List[Instance]] = {}
    for name, entries in (data.get("services") or {}).items():
        name = str(name)
        if entries is None:
            entries = []
        if not isinstance(entries, list):
            raise FileFormatError(f"services.{name} is not a list of endpoints")
        items = []
        for index, entry in enumerate(entries):
            items.append(_instance(name, index, entry, source))
        services[name] = items
    return services


def _instance(service: str, index: int, entry: Any, source: str) -> Instance:
    where = f"services.{service}[{index}]"
    if isinstance(entry, str):
        host, sep, port = entry.rpartition(":")
        if not sep or not port.isdigit():
            raise FileFormatError(f"{where}: {entry!r} is not host:port")
        entry = {"address": host.strip("[]"), "port": int(port)}
    if not isinstance(entry, dict):
        raise FileFormatError(f"{where}: expected a mapping with address and port")
    address = entry.get("address")
    port = entry.get("port")
    if not isinstance(address, str) or not address:
        raise FileFormatError(f"{where}: address missing")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise FileFormatError(f"{where}: port must be 1..65535")
    labels = entry.get("labels") or {}
    if not isinstance(labels, dict):
        raise FileFormatError(f"{where}: labels must be a mapping")
    healthy = entry.get("healthy", True)
    weight = entry.get("weight", 1)
    if not isinstance(healthy, bool):
        raise FileFormatError(f"{where}: healthy must be true or false")
    if not isinstance(weight, int) or weight < 0:
        raise FileFormatError(f"{where}: weight must be a whole number >= 0")
    return Instance(service, address, port, {str(k): str(v) for k, v in labels.items()}, healthy, weight, source)


class FileRegistry(Registry):
    scheme = "file"

    def __init__(self, uri: RegistryURI) -> None:
        super().__init__(uri)
        try:
            self.interval = float(uri.param("interval", "0.5"))
        except ValueError:
            raise ConfigError(REGISTRY_VAR, f"interval={uri.param('interval')!r} in {uri.display}", "give seconds, e.g. ?interval=0.5") from None
        self._seen: Optional[Tuple[int, int, int]] = None
        self._bad: Optional[Tuple[int, int, int]] = None

    def run(self) -> None:
        path = self.uri.path
        while not self.stopping:
            try:
                st = os.stat(path)
            except OSError as exc:
                self.unreachable(f"cannot read {path}: {exc.strerror}")
                self._seen = None
            else:
                stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
                if stamp != self._seen and stamp != self._bad:
                    self._load(path, stamp)
            if not self.sleep(self.interval):
                return

    def _load(self, path: str, stamp: Tuple[int, int, int]) -> None:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            self.unreachable(f"cannot read {path}: {exc.strerror}")
            return
        try:
            services = parse_registry_yaml(text, self.description)
        except FileFormatError as exc:
            self._bad = stamp
            log.warning("meshpatch: registry file %s: %s; keeping the last good list", path, exc)
            self.mark_attempted()
            return
        self._seen = stamp
        self._bad = None
        self.publish(services)
        log.debug("meshpatch: registry file %s loaded: %d service(s)", path, len(services))
