"""Service registries next to xDS: ZooKeeper (Dubbo), etcd (go-zero, Kratos),
Consul, Nacos and a YAML file, configured with ``MESHPATCH_REGISTRY``.

Sources are found through the entry-point group ``meshpatch.registries``
(``scheme = "module:Class"``), so another package can add one; the built-in
ones are also known without package metadata (a source checkout).  Nothing
here is imported at interpreter start: the agent loads it on first use.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional

from meshpatch.config import ConfigError, Settings
from meshpatch.registries.config import REGISTRY_VAR, parse_aliases, parse_registries

log = logging.getLogger("meshpatch.registry")

ENTRY_POINT_GROUP = "meshpatch.registries"

BUILTIN = {
    "file": "meshpatch.registries.file:FileRegistry",
    "zookeeper": "meshpatch.registries.zookeeper:ZooKeeperRegistry",
    "etcd": "meshpatch.registries.etcd:EtcdRegistry",
    "consul": "meshpatch.registries.consul:ConsulRegistry",
    "nacos": "meshpatch.registries.nacos:NacosRegistry",
}


def available_sources() -> Dict[str, Any]:
    """scheme → loader (an entry point, or a "module:Class" string for built-ins)."""
    found: Dict[str, Any] = dict(BUILTIN)
    try:
        from importlib.metadata import entry_points

        try:
            eps = entry_points(group=ENTRY_POINT_GROUP)
        except TypeError:  # Python 3.9
            eps = entry_points().get(ENTRY_POINT_GROUP, [])  # type: ignore[attr-defined]
        for ep in eps:
            found[ep.name.lower()] = ep
    except Exception as exc:  # broken metadata must not take the agent down
        log.debug("meshpatch: cannot read entry points %s: %r", ENTRY_POINT_GROUP, exc)
    return found


def _load(loader: Any) -> Any:
    if isinstance(loader, str):
        import importlib

        module, _, name = loader.partition(":")
        return getattr(importlib.import_module(module), name)
    return loader.load()


def build_catalog(settings: Settings) -> Optional[Any]:
    """The catalog for ``MESHPATCH_REGISTRY``, or None when it is unset.
    Raises :class:`ConfigError` for a bad URI, alias or a source that cannot load."""
    raw = getattr(settings, "registry", None)
    if not raw or not raw.strip():
        return None
    from meshpatch.registries.catalog import Catalog

    loaders = available_sources()
    uris = parse_registries(raw, sorted(loaders))
    aliases = parse_aliases(getattr(settings, "registry_aliases", None))
    sources: List[Any] = []
    for uri in uris:
        try:
            cls = _load(loaders[uri.scheme])
        except ImportError as exc:
            raise ConfigError(REGISTRY_VAR, f"the {uri.scheme} source cannot load ({exc})",
                              "install meshpatch with its dependencies (pip install meshpatch pulls kazoo for ZooKeeper)") from None
        sources.append(cls(uri))
    return Catalog(sources, aliases, settings.namespace, settings.cluster_domain)
