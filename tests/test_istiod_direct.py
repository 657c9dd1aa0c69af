"""istiod direct, without istio-agent: TLS on 15012 verified with the mesh root
certificate, and the pod's service-account token as call credentials
(``authorization: Bearer <token>``).  The local control plane sits behind a
real TLS listener (tests/support/ads_proxy.py) that records what arrives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterator

import pytest

from meshpatch.agent import Agent
from meshpatch.bootstrap import load_bootstrap
from meshpatch.config import Settings
from tests.support.ads_proxy import AdsProxy
from tests.support.controlplane import ControlPlane, bootstrap_config, control_plane
from tests.support.servers import TlsIdentity, tls_identity
from tests.test_agent_e2e import FQDN, mesh

ISTIOD = "istiod.istio-system.svc"


@pytest.fixture()
def cp() -> Iterator[ControlPlane]:
    with control_plane(mesh(100)) as plane:
        yield plane


@pytest.fixture()
def ident() -> Iterator[TlsIdentity]:
    with tls_identity(ISTIOD) as identity:
        yield identity


@pytest.fixture()
def istiod(cp: ControlPlane, ident: TlsIdentity) -> Iterator[AdsProxy]:
    with AdsProxy(cp.address, tls=ident) as proxy:
        yield proxy


def agent_for(env: Dict[str, str], tmp_path: Path) -> Agent:
    settings = Settings({"MESHPATCH_RESOLVE_TIMEOUT": "5", "MESHPATCH_RUNTIME_DIR": str(tmp_path / "run"), **env})
    return Agent(settings, load_bootstrap(settings))


def test_tls_and_token_from_env(istiod: AdsProxy, ident: TlsIdentity, tmp_path: Path) -> None:
    token = tmp_path / "istio-token"
    token.write_text("header.payload-1.sig\n")
    agent = agent_for({
        "MESHPATCH_XDS_SERVER": istiod.address,
        "MESHPATCH_XDS_CA_CERT": ident.ca_path,
        "MESHPATCH_XDS_TOKEN_FILE": str(token),
        "MESHPATCH_XDS_TLS_SERVER_NAME": ISTIOD,  # the address is an IP; istiod's cert names the service
    }, tmp_path)
    try:
        pick = agent.router.pick("http", FQDN, 9080, "GET", "/")
        assert pick is not None and pick.address == "127.0.0.2"
        assert istiod.metadata[0]["authorization"] == "Bearer header.payload-1.sig"
        # Kubernetes rotates the projected token: a reconnect presents the new one.
        token.write_text("header.payload-2.sig\n")
        istiod.close_all()
        assert istiod.wait_for(lambda: istiod.streams_opened >= 2)
        assert istiod.metadata[-1]["authorization"] == "Bearer header.payload-2.sig"
    finally:
        agent.stop()


def test_bootstrap_file_with_tls_and_jwt_call_creds(istiod: AdsProxy, ident: TlsIdentity, tmp_path: Path) -> None:
    token = tmp_path / "istio-token"
    token.write_text("tok-from-bootstrap")
    boot = bootstrap_config(istiod.address)
    server = boot["xds_servers"][0]  # type: ignore[index]
    server["channel_creds"] = [{"type": "tls", "config": {"ca_certificate_file": ident.ca_path}}]
    server["call_creds"] = [{"type": "jwt_token_file", "config": {"jwt_token_file": str(token)}}]
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(boot))
    # No DNS in the test netns: the server_uri is an address, the TLS name comes from env.
    agent = agent_for({"GRPC_XDS_BOOTSTRAP": str(path), "MESHPATCH_XDS_TLS_SERVER_NAME": ISTIOD}, tmp_path)
    try:
        assert agent.router.pick("http", FQDN, 9080, "GET", "/") is not None
        assert istiod.metadata[0]["authorization"] == "Bearer tok-from-bootstrap"
    finally:
        agent.stop()


def test_wrong_root_certificate_never_connects_and_does_not_hold_calls(istiod: AdsProxy, tmp_path: Path) -> None:
    token = tmp_path / "istio-token"
    token.write_text("secret-token")
    with tls_identity(ISTIOD) as other_ca:  # a CA that did not sign istiod's certificate
        agent = agent_for({
            "MESHPATCH_XDS_SERVER": istiod.address,
            "MESHPATCH_XDS_CA_CERT": other_ca.ca_path,
            "MESHPATCH_XDS_TOKEN_FILE": str(token),
            "MESHPATCH_XDS_TLS_SERVER_NAME": ISTIOD,
        }, tmp_path)
        try:
            assert agent.router.pick("http", FQDN, 9080, "GET", "/") is None  # fails open, fast
            assert istiod.streams_opened == 0  # the token never left over an unverified connection
            assert "UNAVAILABLE" in agent.client.transport.last_error
        finally:
            agent.stop()
