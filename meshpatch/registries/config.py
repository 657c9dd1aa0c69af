"""``MESHPATCH_REGISTRY`` and ``MESHPATCH_REGISTRY_ALIASES``: parsed once, one clear error each.

``MESHPATCH_REGISTRY`` is a comma list of URIs.  A ZooKeeper or etcd cluster is
written with its hosts comma-separated in one URI (``zookeeper://a:2181,b:2181/dubbo``),
as their own clients take it, so the list is split only where a comma starts a
new ``scheme://``.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple
from urllib.parse import parse_qsl, unquote, urlsplit

from meshpatch.config import ConfigError

REGISTRY_VAR = "MESHPATCH_REGISTRY"
ALIASES_VAR = "MESHPATCH_REGISTRY_ALIASES"

_SPLIT = re.compile(r",\s*(?=[A-Za-z][A-Za-z0-9+.-]*://)")
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?$")

DEFAULT_PORTS = {"zookeeper": 2181, "etcd": 2379, "consul": 8500, "nacos": 8848}


class RegistryURI:
    """One parsed source URI: ``scheme``, ``hosts`` [(host, port)], ``path``, ``params``."""

    __slots__ = ("raw", "scheme", "hosts", "path", "params")

    def __init__(self, raw: str, scheme: str, hosts: List[Tuple[str, int]], path: str, params: Dict[str, str]) -> None:
        self.raw = raw
        self.scheme = scheme
        self.hosts = hosts
        self.path = path
        self.params = params

    @property
    def display(self) -> str:
        """The URI without credentials, for log lines."""
        if self.scheme == "file":
            return f"file://{self.path}"
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{self.scheme}://{hosts}{self.path}"

    def param(self, name: str, default: str = "") -> str:
        return self.params.get(name, default)

    def __repr__(self) -> str:
        return f"RegistryURI({self.display!r})"


def split_uris(raw: str) -> List[str]:
    return [part.strip() for part in _SPLIT.split(raw.strip()) if part.strip()]


def parse_uri(text: str, known: Sequence[str]) -> RegistryURI:
    fix_known = ", ".join(f"{s}://" for s in known)
    if "://" not in text:
        raise ConfigError(REGISTRY_VAR, f"{text!r} is not a URI", f"write scheme://host:port/path, one of {fix_known}")
    scheme = text.split("://", 1)[0].lower()
    if scheme not in known:
        raise ConfigError(REGISTRY_VAR, f"unknown registry scheme {scheme!r} in {text!r}",
                          f"use one of {fix_known} (more come from packages declaring the entry point group meshpatch.registries)")
    parts = urlsplit(text)
    params = dict(parse_qsl(parts.query, keep_blank_values=True))
    if scheme == "file":
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost") or not path.startswith("/"):
            raise ConfigError(REGISTRY_VAR, f"{text!r} is not a file URI with an absolute path", "write file:///absolute/path/registry.yaml")
        return RegistryURI(text, scheme, [], path, params)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # user:pass@ is allowed; kept out of hosts
    if "@" in parts.netloc:
        userinfo = parts.netloc.rsplit("@", 1)[0]
        user, _, password = userinfo.partition(":")
        params.setdefault("username", unquote(user))
        if password:
            params.setdefault("password", unquote(password))
    hosts: List[Tuple[str, int]] = []
    for item in netloc.split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port_text = item.rpartition(":")
        if not sep:
            host, port_text = item, str(DEFAULT_PORTS.get(scheme, 0))
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(REGISTRY_VAR, f"bad host:port {item!r} in {text!r}", f"write {scheme}://host:port (e.g. {scheme}://127.0.0.1:{DEFAULT_PORTS.get(scheme, 1234)})")
        hosts.append((host, int(port_text)))
    if not hosts:
        raise ConfigError(REGISTRY_VAR, f"no host in {text!r}", f"write {scheme}://host:port")
    return RegistryURI(text, scheme, hosts, unquote(parts.path), params)


def parse_registries(raw: Optional[str], known: Sequence[str]) -> List[RegistryURI]:
    if raw is None or not raw.strip():
        return []
    return [parse_uri(text, known) for text in split_uris(raw)]


def parse_aliases(raw: Optional[str]) -> Dict[str, Set[str]]:
    """``svc=host[,svc=host...]`` → {service: {hosts}} (lower-case hosts; a
    service may be named several times to give it several aliases)."""
    out: Dict[str, Set[str]] = {}
    if raw is None or not raw.strip():
        return out
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        service, sep, host = item.partition("=")
        service, host = service.strip(), host.strip().lower().rstrip(".")
        if not sep or not service or not host:
            raise ConfigError(ALIASES_VAR, f"{item!r} is not service=hostname",
                              "write e.g. user-service=user-service.default.svc.cluster.local,com.example.Demo=demo")
        if ":" in host:
            raise ConfigError(ALIASES_VAR, f"alias {host!r} has a port", "give the hostname only; the port the app calls selects the instances")
        if not _HOST_NAME.match(host):
            raise ConfigError(ALIASES_VAR, f"alias {host!r} is not a hostname", "use letters, digits, '-', '_' and '.'")
        out.setdefault(service, set()).add(host)
    return out


def aliases_by_host(aliases: Mapping[str, Set[str]]) -> Dict[str, Tuple[str, ...]]:
    by_host: Dict[str, List[str]] = {}
    for service, hosts in aliases.items():
        for host in hosts:
            by_host.setdefault(host, []).append(service)
    return {host: tuple(sorted(names)) for host, names in by_host.items()}
