"""Bootstrap discovery and its error messages: one clear line naming the variable and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import pytest

from meshpatch.bootstrap import load_bootstrap
from meshpatch.config import ConfigError, Settings

ISTIO_BOOTSTRAP = {
    "xds_servers": [{"server_uri": "unix:///etc/istio/proxy/XDS", "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
    "node": {
        "id": "sidecar~10.244.1.7~echo-v1-abc.echo-grpc~echo-grpc.svc.cluster.local",
        "metadata": {"GENERATOR": "grpc", "NAMESPACE": "echo-grpc", "INSTANCE_IPS": "10.244.1.7"},
        "locality": {},
    },
    "certificate_providers": {"default": {"plugin_name": "file_watcher", "config": {"certificate_file": "/var/lib/istio/data/cert-chain.pem"}}},
    "server_listener_resource_name_template": "xds.istio.io/grpc/lds/inbound/%s",
}


def load(env: Dict[str, str]):
    return load_bootstrap(Settings(env))


def test_istio_grpc_agent_bootstrap_file(tmp_path: Path) -> None:
    path = tmp_path / "grpc-bootstrap.json"
    path.write_text(json.dumps(ISTIO_BOOTSTRAP))
    boot = load({"GRPC_XDS_BOOTSTRAP": str(path)})
    assert boot.servers[0].target == "unix:///etc/istio/proxy/XDS"
    assert boot.servers[0].creds_type == "insecure"
    assert boot.namespace == "echo-grpc"
    assert boot.server_listener_template == "xds.istio.io/grpc/lds/inbound/%s"
    assert "default" in boot.certificate_providers


def test_inline_config_and_file_precedence(tmp_path: Path) -> None:
    inline = dict(ISTIO_BOOTSTRAP, xds_servers=[{"server_uri": "dns:///istiod.istio-system.svc:15010", "channel_creds": [{"type": "insecure"}]}])
    boot = load({"GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(inline)})
    assert boot.servers[0].target == "dns:///istiod.istio-system.svc:15010"
    path = tmp_path / "b.json"
    path.write_text(json.dumps(ISTIO_BOOTSTRAP))
    both = load({"GRPC_XDS_BOOTSTRAP": str(path), "GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps(inline)})
    assert both.servers[0].target == "unix:///etc/istio/proxy/XDS"  # the file wins, as in gRPC


def test_meshpatch_xds_server_builds_a_local_bootstrap() -> None:
    boot = load({"MESHPATCH_XDS_SERVER": "127.0.0.1:15010", "MESHPATCH_NAMESPACE": "shop"})
    assert boot.servers[0].target == "127.0.0.1:15010"
    parts = boot.node["id"].split("~")
    assert len(parts) == 4 and parts[0] == "sidecar" and parts[2].endswith(".shop") and parts[3] == "shop.svc.cluster.local"
    assert boot.node["metadata"]["GENERATOR"] == "grpc" and boot.namespace == "shop"


def test_nothing_configured_is_not_an_error() -> None:
    assert load({}) is None


@pytest.mark.parametrize(
    "env,variable,needle",
    [
        ({"GRPC_XDS_BOOTSTRAP": "/nonexistent/b.json"}, "GRPC_XDS_BOOTSTRAP", "cannot read"),
        ({"GRPC_XDS_BOOTSTRAP_CONFIG": "{not json"}, "GRPC_XDS_BOOTSTRAP_CONFIG", "not valid JSON"),
        ({"GRPC_XDS_BOOTSTRAP_CONFIG": "[]"}, "GRPC_XDS_BOOTSTRAP_CONFIG", "not a JSON object"),
        ({"GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps({"xds_servers": []})}, "GRPC_XDS_BOOTSTRAP_CONFIG", "xds_servers is missing or empty"),
        ({"GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps({"xds_servers": [{"server_uri": "http://x:1", "channel_creds": [{"type": "insecure"}]}]})},
         "GRPC_XDS_BOOTSTRAP_CONFIG", "scheme"),
        ({"GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps({"xds_servers": [{"server_uri": "x:1", "channel_creds": [{"type": "google_default"}]}]})},
         "GRPC_XDS_BOOTSTRAP_CONFIG", "no supported channel_creds"),
        ({"MESHPATCH_XDS_SERVER": "nohostport"}, "MESHPATCH_XDS_SERVER", "not host:port"),
        ({"MESHPATCH_RESOLVE_TIMEOUT": "soon"}, "MESHPATCH_RESOLVE_TIMEOUT", "not a number"),
        ({"MESHPATCH_HOOKS": "requests,urllib"}, "MESHPATCH_HOOKS", "unknown hook"),
        ({"MESHPATCH_LOG_LEVEL": "LOUD"}, "MESHPATCH_LOG_LEVEL", "not a log level"),
        ({"MESHPATCH_FAIL_MODE": "maybe"}, "MESHPATCH_FAIL_MODE", "not a fail mode"),
        ({"MESHPATCH_HOLD_UNTIL_READY": "soon"}, "MESHPATCH_HOLD_UNTIL_READY", "not a number"),
        ({"MESHPATCH_HOLD_UNTIL_READY": "-3"}, "MESHPATCH_HOLD_UNTIL_READY", "out of range"),
        ({"MESHPATCH_SHARE_STREAM": "perhaps"}, "MESHPATCH_SHARE_STREAM", "not a boolean"),
        ({"MESHPATCH_RUNTIME_DIR": "tmp/x"}, "MESHPATCH_RUNTIME_DIR", "not an absolute path"),
        ({"MESHPATCH_XDS_SERVER": "istiod:15012", "MESHPATCH_XDS_CA_CERT": "/nonexistent/root-cert.pem"},
         "MESHPATCH_XDS_CA_CERT", "cannot read"),
        ({"MESHPATCH_XDS_SERVER": "istiod:15012", "MESHPATCH_XDS_TOKEN_FILE": "/var/run/secrets/tokens/istio-token"},
         "MESHPATCH_XDS_TOKEN_FILE", "only sent over TLS"),
        ({"MESHPATCH_XDS_CA_CERT": "/etc/root-cert.pem"}, "MESHPATCH_XDS_CA_CERT", "MESHPATCH_XDS_SERVER is not"),
        ({"GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps({"xds_servers": [{"server_uri": "x:1", "channel_creds": [{"type": "insecure"}],
                                                                     "call_creds": [{"type": "jwt_token_file", "config": {"jwt_token_file": "/t"}}]}]})},
         "GRPC_XDS_BOOTSTRAP_CONFIG", "call_creds but insecure"),
        ({"GRPC_XDS_BOOTSTRAP_CONFIG": json.dumps({"xds_servers": [{"server_uri": "x:1", "channel_creds": [{"type": "tls"}],
                                                                     "call_creds": {"type": "jwt_token_file"}}]})},
         "GRPC_XDS_BOOTSTRAP_CONFIG", "call_creds is not a list"),
    ],
)
def test_bad_input_names_variable_and_fix(env: Dict[str, str], variable: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env)
    message = str(info.value)
    assert info.value.variable == variable
    assert message.startswith(variable) and needle in message and "Fix:" in message


def test_istiod_direct_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "web-1")  # the downward API's pod name (read from the process env)
    ca = tmp_path / "root-cert.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    token = tmp_path / "istio-token"
    token.write_text("jwt")
    boot = load({"MESHPATCH_XDS_SERVER": "istiod.istio-system.svc:15012", "MESHPATCH_XDS_CA_CERT": str(ca),
                 "MESHPATCH_XDS_TOKEN_FILE": str(token), "MESHPATCH_NAMESPACE": "shop"})
    server = boot.servers[0]
    assert (server.target, server.creds_type, server.creds_config["ca_certificate_file"], server.token_file) == (
        "istiod.istio-system.svc:15012", "tls", str(ca), str(token))
    assert boot.node["id"].split("~")[2] == "web-1.shop"


def test_local_node_is_the_same_in_every_process_of_a_pod() -> None:
    """The pod-sharing key includes the node: workers must present the same one."""
    import subprocess
    import sys

    code = "from meshpatch.bootstrap import load_bootstrap; from meshpatch.config import Settings; " \
           "print(load_bootstrap(Settings({'MESHPATCH_XDS_SERVER': '127.0.0.1:1'})).node['id'])"
    ids = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(ids) == 1
