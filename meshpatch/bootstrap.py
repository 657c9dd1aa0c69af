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
    """One xDS server.  ``token_file``: a JWT sent as ``authorization: Bearer``
    on the stream (istiod on 15012 without istio-agent; needs TLS);
    ``server_name``: the TLS name to verify when the target is an address."""

    __slots__ = ("target", "creds_type", "creds_config", "features", "token_file", "server_name")

    def __init__(self, target: str, creds_type: str, creds_config: Dict[str, Any], features: List[str],
                 token_file: Optional[str] = None, server_name: Optional[str] = None) -> None:
        self.target = target
        self.creds_type = creds_type
        self.creds_config = creds_config
        self.features = features
        self.token_file = token_file
        self.server_name = server_name

    def identity(self) -> Dict[str, Any]:
        """What makes two processes' streams interchangeable (the pod-sharing key)."""
        return {"target": self.target, "creds": self.creds_type, "config": self.creds_config,
                "token_file": self.token_file, "server_name": self.server_name}

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


def _call_creds_token(raw: Any, index: int, variable: str) -> Optional[str]:
    """gRFC A97 ``call_creds``: ``[{"type": "jwt_token_file", "config": {"jwt_token_file": PATH}}]``.
    Other types are skipped, as gRPC skips call creds it does not know."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise ConfigError(variable, f"xds_servers[{index}].call_creds is not a list",
                          'write "call_creds": [{"type": "jwt_token_file", "config": {"jwt_token_file": "/path"}}]')
    for entry in raw:
        if isinstance(entry, dict) and entry.get("type") == "jwt_token_file":
            path = (entry.get("config") or {}).get("jwt_token_file")
            if not isinstance(path, str) or not path:
                raise ConfigError(variable, f"xds_servers[{index}].call_creds jwt_token_file has no path",
                                  'set config.jwt_token_file to the token path')
            return path
    return None


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
        token_file = _call_creds_token(raw.get("call_creds"), index, variable)
        if token_file and chosen["type"] != "tls":
            raise ConfigError(variable, f"xds_servers[{index}] has call_creds but insecure channel_creds",
                              "use tls channel_creds (gRPC never sends call credentials in plaintext)")
        servers.append(XdsServer(target, chosen["type"], dict(chosen.get("config") or {}), features, token_file))
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
    # No pid in the name: every process of a pod presents the same node, which
    # is what lets them share one upstream stream (meshpatch.xds.pod).
    pod = os.environ.get("POD_NAME") or socket.gethostname().split(".")[0] or "app"
    return {
        "id": f"sidecar~{ip}~{pod}.{ns}~{ns}.svc.{settings.cluster_domain}",
        "metadata": {"GENERATOR": "grpc", "NAMESPACE": ns, "INSTANCE_IPS": ip},
        "locality": {},
    }


_DIRECT_FIELDS = {"MESHPATCH_XDS_CA_CERT": "xds_ca_cert", "MESHPATCH_XDS_TOKEN_FILE": "xds_token_file",
                  "MESHPATCH_XDS_TLS_SERVER_NAME": "xds_tls_server_name"}


def _readable(path: str, variable: str, what: str) -> None:
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise ConfigError(variable, f"cannot read {path}: {exc.strerror}", f"point it at {what}") from None


def _direct_server(settings: Settings) -> XdsServer:
    """``MESHPATCH_XDS_SERVER`` (+ optional TLS and token): istiod direct, or a local control plane."""
    target = _server_target(settings.xds_server, "MESHPATCH_XDS_SERVER")
    if settings.xds_token_file and not settings.xds_ca_cert:
        raise ConfigError("MESHPATCH_XDS_TOKEN_FILE", "a token is only sent over TLS and MESHPATCH_XDS_CA_CERT is not set",
                          "set MESHPATCH_XDS_CA_CERT to the mesh root certificate (e.g. /var/run/secrets/istio/root-cert.pem)")
    if not settings.xds_ca_cert:
        return XdsServer(target, "insecure", {}, [])
    _readable(settings.xds_ca_cert, "MESHPATCH_XDS_CA_CERT", "the mesh root certificate (istio-ca-root-cert, root-cert.pem)")
    if settings.xds_token_file:
        _readable(settings.xds_token_file, "MESHPATCH_XDS_TOKEN_FILE",
                  "the pod's service-account token for audience istio-ca (/var/run/secrets/tokens/istio-token)")
    return XdsServer(target, "tls", {"ca_certificate_file": settings.xds_ca_cert}, [],
                     token_file=settings.xds_token_file, server_name=settings.xds_tls_server_name)


def _with_server_name(bootstrap: Bootstrap, settings: Settings) -> Bootstrap:
    """MESHPATCH_XDS_TLS_SERVER_NAME also applies to TLS servers of a bootstrap file
    (a server_uri that is an address, or a name the certificate does not carry)."""
    if settings.xds_tls_server_name:
        for server in bootstrap.servers:
            if server.creds_type == "tls":
                server.server_name = settings.xds_tls_server_name
    return bootstrap


def load_bootstrap(settings: Settings) -> Optional[Bootstrap]:
    """The bootstrap in force, or None when nothing configures xDS (mesh off, no error)."""
    if not settings.xds_server:
        for name in ("MESHPATCH_XDS_CA_CERT", "MESHPATCH_XDS_TOKEN_FILE"):
            if getattr(settings, _DIRECT_FIELDS[name]):
                raise ConfigError(name, "is set but MESHPATCH_XDS_SERVER is not",
                                  "set MESHPATCH_XDS_SERVER=istiod.istio-system.svc:15012 too, or configure TLS in the bootstrap file")
    if settings.xds_server:
        return Bootstrap(
            [_direct_server(settings)],
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
        return _with_server_name(parse_bootstrap(data, "GRPC_XDS_BOOTSTRAP", path), settings)
    if settings.bootstrap_inline:
        try:
            data = json.loads(settings.bootstrap_inline)
        except ValueError as exc:
            raise ConfigError("GRPC_XDS_BOOTSTRAP_CONFIG", f"not valid JSON ({exc})", "put the bootstrap JSON itself in the variable") from None
        return _with_server_name(parse_bootstrap(data, "GRPC_XDS_BOOTSTRAP_CONFIG", "GRPC_XDS_BOOTSTRAP_CONFIG"), settings)
    return None
