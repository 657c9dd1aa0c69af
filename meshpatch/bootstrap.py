"""Read the gRPC xDS bootstrap that Istio's grpc-agent writes, or build one for local use.

Precedence: ``MESHPATCH_XDS_SERVER`` (explicit, local use) → ``GRPC_XDS_BOOTSTRAP``
(file path, as gRPC checks it first) → ``GRPC_XDS_BOOTSTRAP_CONFIG`` (inline JSON).
Every problem becomes one :class:`~meshpatch.config.ConfigError` naming the
variable and the fix; the agent then stays off and the app runs unpatched.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Dict, List, Optional

from meshpatch.config import ConfigError, Settings

SUPPORTED_CREDS = ("insecure", "tls")


class XdsServer:
    __slots__ = ("target", "creds_type", "creds_config", "features")

    def __init__(self, target: str, creds_type: str, creds_config: Dict[str, Any], features: List[str]) -> None:
        self.target = target
        self.creds_type = creds_type
        self.creds_config = creds_config
        self.features = features

    def __repr__(self) -> str:
        return f"XdsServer({self.target!r}, {self.creds_type})"


class Bootstrap:
    """What the xDS client needs: servers in priority order, the node, cert providers."""

    def __init__(
        self,
        servers: List[XdsServer],
        node: Dict[str, Any],
        certificate_providers: Dict[str, Any],
        server_listener_template: Optional[str],
        source: str,
    ) -> None:
        self.servers = servers
        self.node = node
        self.certificate_providers = certificate_providers
        self.server_listener_template = server_listener_template
        self.source = source

    @property
    def namespace(self) -> str:
        meta = self.node.get("metadata") or {}
        if isinstance(meta.get("NAMESPACE"), str) and meta["NAMESPACE"]:
            return meta["NAMESPACE"]
        parts = str(self.node.get("id", "")).split("~")
        if len(parts) == 4 and "." in parts[2]:
            return parts[2].rsplit(".", 1)[1]
        return "default"


def _server_target(uri: str, variable: str) -> str:
    """Accept the server_uri forms gRPC does: unix:///path, unix:path, dns:///h:p, h:p."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(variable, "xds_servers[0].server_uri is empty", "set server_uri to unix:///etc/istio/proxy/XDS or host:port")
    uri = uri.strip()
    if uri.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:")):
        return uri
    if uri.startswith("dns:"):
        rest = uri[4:].lstrip("/")
        if ":" not in rest:
            raise ConfigError(variable, f"server_uri {uri!r} has no port", "write dns:///host:port")
        return uri
    if "://" in uri:
        raise ConfigError(variable, f"server_uri scheme in {uri!r} is not supported", "use unix:///path, dns:///host:port or host:port")
    host, sep, port = uri.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(variable, f"server_uri {uri!r} is not host:port", "write host:port, e.g. istiod.istio-system.svc:15010")
    return uri


def parse_bootstrap(data: Any, variable: str, source: str) -> Bootstrap:
    if not isinstance(data, dict):
        raise ConfigError(variable, "the bootstrap is not a JSON object", "write a gRPC xDS bootstrap JSON object")
    servers_raw = data.get("xds_servers")
    if not isinstance(servers_raw, list) or not servers_raw:
        raise ConfigError(variable, "xds_servers is missing or empty", 'add "xds_servers": [{"server_uri": "unix:///etc/istio/proxy/XDS", "channel_creds": [{"type": "insecure"}]}]')
    servers = []
    for index, raw in enumerate(servers_raw):
        if not isinstance(raw, dict):
            raise ConfigError(variable, f"xds_servers[{index}] is not an object", "make each xds_servers entry an object with server_uri")
        target = _server_target(raw.get("server_uri"), variable)
        creds = raw.get("channel_creds") or []
        if not isinstance(creds, list):
            raise ConfigError(variable, f"xds_servers[{index}].channel_creds is not a list", 'write "channel_creds": [{"type": "insecure"}]')
        chosen = next((c for c in creds if isinstance(c, dict) and c.get("type") in SUPPORTED_CREDS), None)
        if chosen is None:
            kinds = [c.get("type") for c in creds if isinstance(c, dict)]
            raise ConfigError(variable, f"no supported channel_creds type in {kinds}", "use type insecure or tls")
        features = [f for f in raw.get("server_features") or [] if isinstance(f, str)]
        servers.append(XdsServer(target, chosen["type"], dict(chosen.get("config") or {}), features))
    node = data.get("node") or {}
    if not isinstance(node, dict):
        raise ConfigError(variable, "node is not an object", "write node as {\"id\": ..., \"metadata\": {...}}")
    if not isinstance(node.get("metadata", {}), dict):
        raise ConfigError(variable, "node.metadata is not an object", "write node.metadata as a JSON object")
    providers = data.get("certificate_providers") or {}
    if not isinstance(providers, dict):
        raise ConfigError(variable, "certificate_providers is not an object", "map instance names to {plugin_name, config}")
    template = data.get("server_listener_resource_name_template")
    return Bootstrap(servers, node, providers, template if isinstance(template, str) else None, source)


def _local_node(settings: Settings) -> Dict[str, Any]:
    """A node that istiod (and our control plane) accept: 4 '~' parts, an IP, the namespace."""
    ns = settings.namespace
    ip = (os.environ.get("INSTANCE_IP") or os.environ.get("POD_IP") or "127.0.0.1").strip()
    pod = os.environ.get("POD_NAME") or f"{socket.gethostname().split('.')[0] or 'app'}-{os.getpid()}"
    return {
        "id": f"sidecar~{ip}~{pod}.{ns}~{ns}.svc.{settings.cluster_domain}",
        "metadata": {"GENERATOR": "grpc", "NAMESPACE": ns, "INSTANCE_IPS": ip},
        "locality": {},
    }


def load_bootstrap(settings: Settings) -> Optional[Bootstrap]:
    """The bootstrap in force, or None when nothing configures xDS (mesh off, no error)."""
    if settings.xds_server:
        return Bootstrap(
            [XdsServer(_server_target(settings.xds_server, "MESHPATCH_XDS_SERVER"), "insecure", {}, [])],
            _local_node(settings),
            {},
            None,
            "MESHPATCH_XDS_SERVER",
        )
    if settings.bootstrap_path:
        path = settings.bootstrap_path
        try:
            with open(path, "rb") as fh:
                text = fh.read(4 * 1024 * 1024)
        except OSError as exc:
            raise ConfigError("GRPC_XDS_BOOTSTRAP", f"cannot read {path}: {exc.strerror}", "point it at the bootstrap file istio-agent writes (/etc/istio/proxy/grpc-bootstrap.json)") from None
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError("GRPC_XDS_BOOTSTRAP", f"{path} is not valid JSON ({exc})", "fix the file or unset the variable") from None
        return parse_bootstrap(data, "GRPC_XDS_BOOTSTRAP", path)
    if settings.bootstrap_inline:
        try:
            data = json.loads(settings.bootstrap_inline)
        except ValueError as exc:
            raise ConfigError("GRPC_XDS_BOOTSTRAP_CONFIG", f"not valid JSON ({exc})", "put the bootstrap JSON itself in the variable") from None
        return parse_bootstrap(data, "GRPC_XDS_BOOTSTRAP_CONFIG", "GRPC_XDS_BOOTSTRAP_CONFIG")
    return None
