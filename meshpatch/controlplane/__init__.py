"""meshpatch's embedded local control plane: istiod-shaped xDS from Istio YAML.

``meshpatch control-plane --config PATH`` runs it; tests and the demo start
it in-process::

    from meshpatch.controlplane import ControlPlaneServer
    with ControlPlaneServer("mesh.yaml", listen="127.0.0.1:0") as cp:
        print(cp.address)   # "127.0.0.1:PORT"

Importing this package is cheap; the gRPC server and protos load on first use
of :class:`ControlPlaneServer` (the agent's process-start path never imports it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .config_source import ConfigPathError
    from .istio_config import ConfigLoadError, IstioConfig, parse_yaml_text
    from .server import ControlPlaneServer

__all__ = ["ControlPlaneServer", "ConfigPathError", "ConfigLoadError", "IstioConfig", "parse_yaml_text"]

_LAZY = {
    "ControlPlaneServer": ".server",
    "ConfigPathError": ".config_source",
    "ConfigLoadError": ".istio_config",
    "IstioConfig": ".istio_config",
    "parse_yaml_text": ".istio_config",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(mod, __name__), name)
