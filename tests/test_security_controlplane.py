"""The local control plane's security translation, checked on the wire (a raw
ADS client) and by meaning: emitted clusters and inbound listeners are decoded
by meshpatch's own decoder and the RBAC rules evaluated for concrete callers."""

from __future__ import annotations

import textwrap
from typing import Any, Dict, Iterator, List, Optional

import pytest
from google.protobuf import any_pb2

from meshpatch.security import providers, rbac
from meshpatch.xds import decode
from tests.support.controlplane import CDS, LDS, AdsClient, control_plane, decode as decode_response, node_id_for, to_dict
from tests.support.pki import spiffe_id

HOST = "echo.default.svc.cluster.local"
CLUSTER = f"outbound|7070||{HOST}"
INBOUND = "xds.istio.io/grpc/lds/inbound/0.0.0.0:17070"
CLIENT = spiffe_id("default", "client")
OTHER = spiffe_id("other", "client")

SERVICE = textwrap.dedent(f"""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: echo, namespace: default}}
    spec:
      hosts: [{HOST}]
      location: MESH_INTERNAL
      resolution: STATIC
      subjectAltNames: [spiffe://cluster.local/ns/default/sa/legacy]
      ports: [{{number: 7070, name: grpc, protocol: GRPC, targetPort: 17070}}]
      endpoints:
      - {{address: 127.0.0.2, labels: {{app: echo}}, serviceAccount: echo}}
      - {{address: 127.0.0.3, labels: {{app: echo, security.istio.io/tlsMode: istio}}, serviceAccount: echo-v2}}
    """)


def doc(kind: str, name: str, spec: str, namespace: str = "default") -> str:
    group = "security.istio.io/v1" if kind in ("PeerAuthentication", "AuthorizationPolicy") else "networking.istio.io/v1"
    body = textwrap.indent(textwrap.dedent(spec).strip(), "  ")
    return f"---\napiVersion: {group}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n{body}\n"


@pytest.fixture(autouse=True)
def default_provider(tmp_path: Any) -> Iterator[None]:
    """meshpatch's decoder checks provider names against the bootstrap."""
    providers.configure({"default": {"plugin_name": "file_watcher", "config": {
        "certificate_file": str(tmp_path / "c"), "private_key_file": str(tmp_path / "k"),
        "ca_certificate_file": str(tmp_path / "ca")}}})
    yield
    providers.configure({})


def fetch(cp: Any, type_url: str, names: List[str], ip: str = "127.0.0.2",
          labels: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    metadata = {"LABELS": labels} if labels else None
    with AdsClient(cp.address, node_id=node_id_for("default", "echo", ip), metadata=metadata) as client:
        return decode_response(client.subscribe(type_url, names))


def meshpatch_view(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return (decode.decode_listener if "Listener" in packed.type_url else decode.decode_cluster)(packed)[1]


def caller(principal: str, path: str = "/meshtest.Echo/Unary", tls: bool = True, headers: Optional[dict] = None) -> Any:
    """A gRPC call as the server's RBAC sees it (A41: :method is POST)."""
    seen = {":method": "POST", ":path": path, "content-type": "application/grpc", **(headers or {})}
    return rbac.RbacRequest(path, seen, tls, [principal] if tls else [""], "10.1.2.3", None, 17070)


# -- client side ------------------------------------------------------------------------------


def test_istio_mutual_cluster_has_both_provider_fields_and_service_account_sans() -> None:
    yaml = SERVICE + doc("DestinationRule", "echo", f"""
        host: {HOST}
        trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
        subsets: [{{name: v1, labels: {{app: echo}}, trafficPolicy: {{tls: {{mode: DISABLE}}}}}}]
        """)
    with control_plane(yaml) as cp:
        clusters = fetch(cp, CDS, [CLUSTER, f"outbound|7070|v1|{HOST}"])
    raw = to_dict(clusters[CLUSTER])["transport_socket"]
    assert raw["name"] == "envoy.transport_sockets.tls"
    common = raw["typed_config"]["common_tls_context"]
    for key in ("tls_certificate_provider_instance", "tls_certificate_certificate_provider_instance"):
        assert common[key] == {"instance_name": "default", "certificate_name": "default"}
    combined = common["combined_validation_context"]
    assert combined["validation_context_certificate_provider_instance"]["certificate_name"] == "ROOTCA"
    assert combined["default_validation_context"]["ca_certificate_provider_instance"]["certificate_name"] == "ROOTCA"
    tls = meshpatch_view(clusters[CLUSTER]).tls
    assert sorted(m.value for m in tls.sans) == [spiffe_id("default", "echo"), spiffe_id("default", "echo-v2"),
                                                  spiffe_id("default", "legacy")]
    assert not clusters[f"outbound|7070|v1|{HOST}"].HasField("transport_socket")  # subset DISABLE wins


def test_no_destination_rule_means_plaintext_cluster() -> None:
    with control_plane(SERVICE) as cp:
        cluster = fetch(cp, CDS, [CLUSTER])[CLUSTER]
    assert not cluster.HasField("transport_socket")


# -- server side: PeerAuthentication ----------------------------------------------------------


@pytest.mark.parametrize("policies,ip,labels,mtls", [
    ("", "127.0.0.2", None, False),  # nothing: PERMISSIVE → plaintext for proxyless
    (doc("PeerAuthentication", "default", "mtls: {mode: STRICT}", "istio-system"), "127.0.0.2", None, True),
    (doc("PeerAuthentication", "default", "mtls: {mode: STRICT}", "istio-system")
     + doc("PeerAuthentication", "ns", "mtls: {mode: DISABLE}"), "127.0.0.2", None, False),
    (doc("PeerAuthentication", "ns", "mtls: {mode: PERMISSIVE}"), "127.0.0.3", None, True),  # tlsMode=istio endpoint
    (doc("PeerAuthentication", "ns", "mtls: {mode: PERMISSIVE}"), "127.0.0.2",
     {"app": "echo", "security.istio.io/tlsMode": "istio"}, True),  # the label from the node's metadata
    (doc("PeerAuthentication", "ns", "mtls: {mode: STRICT}")
     + doc("PeerAuthentication", "echo", """
        selector: {matchLabels: {app: echo}}
        portLevelMtls: {17070: {mode: DISABLE}}
        """), "127.0.0.2", None, False),
], ids=["default", "mesh-strict", "namespace-disable-wins", "permissive-tlsmode-endpoint",
        "permissive-tlsmode-node-label", "port-level-disable"])
def test_peer_authentication_modes(policies: str, ip: str, labels: Optional[dict], mtls: bool) -> None:
    with control_plane(SERVICE + policies) as cp:
        listeners = fetch(cp, LDS, [INBOUND], ip=ip, labels=labels)
    lis = listeners[INBOUND]
    assert lis.address.socket_address.port_value == 17070 and not lis.listener_filters
    chain = meshpatch_view(lis).chain_for(17070)
    assert (chain.tls is not None) is mtls
    assert lis.filter_chains[0].name == ("inbound-mtls" if mtls else "inbound-plaintext")
    if mtls:
        assert chain.tls.require_client_certificate


def test_no_service_instance_for_the_port_means_no_listener() -> None:
    with control_plane(SERVICE) as cp:
        assert fetch(cp, LDS, ["xds.istio.io/grpc/lds/inbound/0.0.0.0:9999"]) == {}
        assert fetch(cp, LDS, [INBOUND], ip="127.0.0.9") == {}


# -- server side: AuthorizationPolicy ---------------------------------------------------------


def engines_for(yaml: str) -> Any:
    with control_plane(SERVICE + yaml) as cp:
        lis = fetch(cp, LDS, [INBOUND])[INBOUND]
    return lis, meshpatch_view(lis).chain_for(17070).rbac


def test_deny_then_allow_filters_with_istio_names_and_meaning() -> None:
    lis, engines = engines_for(
        doc("AuthorizationPolicy", "deny-secret", """
            selector: {matchLabels: {app: echo}}
            action: DENY
            rules:
            - to: [{operation: {paths: [/meshtest.Echo/Secret]}}]
            """)
        + doc("AuthorizationPolicy", "allow-default-ns", """
            rules:
            - from: [{source: {namespaces: [default]}}]
              to: [{operation: {methods: [POST], paths: ['/meshtest.Echo/*']}}]
            - from: [{source: {principals: [cluster.local/ns/other/sa/client]}}]
              when: [{key: 'request.headers[x-team]', values: [blue]}]
            """))
    names = [f["name"] for f in to_dict(lis)["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]]
    assert names == ["envoy.filters.http.rbac.DENY", "envoy.filters.http.rbac", "envoy.filters.http.router"]
    assert [p.name for p in engines[0].policies] == ["default-deny-secret-0"]
    assert [p.name for p in engines[1].policies] == ["default-allow-default-ns-0", "default-allow-default-ns-1"]
    assert rbac.evaluate(engines, caller(CLIENT)) is None
    assert rbac.evaluate(engines, caller(CLIENT, "/meshtest.Echo/Secret")) is not None
    assert rbac.evaluate(engines, caller(CLIENT, "/other.Svc/M")) is not None
    assert rbac.evaluate(engines, caller(OTHER)) is not None
    assert rbac.evaluate(engines, caller(OTHER, headers={"x-team": "blue"})) is None
    assert rbac.evaluate(engines, caller(CLIENT, tls=False)) is not None  # namespaces need an identity


def test_service_accounts_and_not_principals() -> None:
    _, engines = engines_for(doc("AuthorizationPolicy", "sa", """
        rules:
        - from: [{source: {serviceAccounts: [client, other/client]}}]
        """) + doc("AuthorizationPolicy", "not-x", """
        action: DENY
        rules:
        - from: [{source: {notPrincipals: ['cluster.local/ns/default/*']}}]
        """))
    assert rbac.evaluate(engines, caller(CLIENT)) is None
    assert rbac.evaluate(engines, caller(spiffe_id("default", "clientele"))) is not None  # no prefix accidents
    assert rbac.evaluate(engines, caller(spiffe_id("third", "client"))) is not None  # namespace-relative
    assert "DENY" in rbac.evaluate(engines, caller(OTHER))  # allowed by SA, denied: not in ns default


def test_service_accounts_cannot_be_combined_with_principals() -> None:
    yaml = SERVICE + doc("AuthorizationPolicy", "sa", """
        rules:
        - from: [{source: {serviceAccounts: [client], notPrincipals: [x]}}]
        """)
    with control_plane(yaml) as cp:
        assert any("serviceAccounts" in s for s in cp.server.snapshot.config.skipped)


def test_allow_nothing_denies_everything_and_policies_elsewhere_do_not_apply() -> None:
    _, engines = engines_for(doc("AuthorizationPolicy", "allow-nothing", "{}")
                             + doc("AuthorizationPolicy", "elsewhere", "action: DENY\nrules: [{}]", "other")
                             + doc("AuthorizationPolicy", "not-me", """
                                selector: {matchLabels: {app: reviews}}
                                action: DENY
                                rules: [{}]
                                """))
    assert [e.action for e in engines] == ["ALLOW"]
    assert rbac.evaluate(engines, caller(CLIENT)) is not None


def test_invalid_security_resources_are_skipped_alone() -> None:
    yaml = SERVICE + doc("PeerAuthentication", "bad", "mtls: {mode: SOMETIMES}") \
        + doc("AuthorizationPolicy", "bad", "action: MAYBE") \
        + doc("PeerAuthentication", "ok", "mtls: {mode: STRICT}")
    with control_plane(yaml) as cp:
        skipped = cp.server.snapshot.config.skipped
        lis = fetch(cp, LDS, [INBOUND])[INBOUND]
    assert len(skipped) == 2 and any("SOMETIMES" in s for s in skipped) and any("MAYBE" in s for s in skipped)
    assert meshpatch_view(lis).chain_for(17070).tls is not None
