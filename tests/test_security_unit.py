"""Security building blocks without processes: TLS decoding (what is accepted,
what is NACKed and why), certificate providers and rotation, SAN matching, the
SSL context's SPIFFE check on a real handshake, inbound listener decoding and
the RBAC engine's A41 semantics."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path
from typing import Any, Iterator, List, Optional

import pytest
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from google.protobuf import any_pb2

from meshpatch.security import client_tls, providers, rbac
from meshpatch.security.san import SanVerifier
from meshpatch.security.model import SanMatcher
from meshpatch.xds import decode
from meshpatch.xds.decode import ResourceError
from tests.support import xds_resources as res
from tests.support import xds_security as xs
from tests.support.mtls import server_ssl_context
from tests.support.pki import MeshCA, spiffe_id

REVIEWS = spiffe_id("default", "reviews")


@pytest.fixture(scope="module")
def ca() -> MeshCA:
    return MeshCA()


@pytest.fixture()
def certs(ca: MeshCA, tmp_path: Path) -> Iterator[Any]:
    """A client workload's files, installed as the bootstrap's ``default`` provider."""
    d = ca.workload_dir(tmp_path / "client", "default", "client")
    old = providers.STAT_INTERVAL
    providers.STAT_INTERVAL = 0.0  # check the files on every use: rotation tests need no sleeps
    providers.configure({"default": d.provider_config()})
    yield d
    providers.STAT_INTERVAL = old
    providers.configure({})


def _packed(message: Any) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def decode_cluster(cluster: Any) -> Any:
    return decode.decode_cluster(_packed(cluster))[1]


# -- CDS: UpstreamTlsContext --------------------------------------------------------------


@pytest.mark.parametrize("fields", [dict(), dict(deprecated_fields=False), dict(new_fields=False)],
                         ids=["new+deprecated", "new-only", "deprecated-only"])
def test_cluster_tls_both_field_generations(certs: Any, fields: dict) -> None:
    config = decode_cluster(xs.with_upstream_tls(res.cluster("c"), [REVIEWS], **fields))
    tls = config.tls
    assert tls is not None and tls.identity is not None
    assert (tls.identity.instance, tls.ca.instance) == ("default", "default")
    assert [(m.kind, m.value) for m in tls.sans] == [("exact", REVIEWS)]


def test_cluster_without_tls_is_plaintext_and_raw_buffer_too(certs: Any) -> None:
    assert decode_cluster(res.cluster("c")).tls is None
    c = res.cluster("c")
    c.transport_socket.name = "envoy.transport_sockets.raw_buffer"
    assert decode_cluster(c).tls is None


def test_unknown_provider_instance_is_nacked_with_the_name(certs: Any) -> None:
    with pytest.raises(ResourceError) as err:
        decode_cluster(xs.with_upstream_tls(res.cluster("c"), [REVIEWS], instance="spire"))
    assert "spire" in err.value.reason and "default" in err.value.reason


def test_missing_ca_is_nacked(certs: Any) -> None:
    c = res.cluster("c")
    ctx = tls_pb2.UpstreamTlsContext()
    ctx.common_tls_context.tls_certificate_provider_instance.instance_name = "default"
    c.transport_socket.name = xs.TLS
    c.transport_socket.typed_config.Pack(ctx)
    with pytest.raises(ResourceError, match="no CA"):
        decode_cluster(c)


def test_no_providers_in_bootstrap_nacks_tls(certs: Any) -> None:
    providers.configure({})
    with pytest.raises(ResourceError, match="unrecognized certificate provider instance name 'default'"):
        decode_cluster(xs.with_upstream_tls(res.cluster("c"), [REVIEWS]))


def test_inline_certificates_are_refused(certs: Any) -> None:
    c = xs.with_upstream_tls(res.cluster("c"), [REVIEWS])
    ctx = tls_pb2.UpstreamTlsContext()
    c.transport_socket.typed_config.Unpack(ctx)
    ctx.common_tls_context.tls_certificates.add().certificate_chain.inline_string = "PEM"
    c.transport_socket.typed_config.Pack(ctx)
    with pytest.raises(ResourceError, match="tls_certificates"):
        decode_cluster(c)


def test_san_matcher_kinds_decode(certs: Any) -> None:
    c = xs.with_upstream_tls(res.cluster("c"), [])
    ctx = tls_pb2.UpstreamTlsContext()
    c.transport_socket.typed_config.Unpack(ctx)
    dvc = ctx.common_tls_context.combined_validation_context.default_validation_context
    dvc.match_subject_alt_names.add(prefix="spiffe://cluster.local/ns/default/")
    dvc.match_subject_alt_names.add().safe_regex.regex = "spiffe://.+/sa/reviews"
    typed = dvc.match_typed_subject_alt_names.add(san_type=2)
    typed.matcher.suffix = ".example.com"
    c.transport_socket.typed_config.Pack(ctx)
    tls = decode_cluster(c).tls
    assert [(m.kind, m.san_type) for m in tls.sans] == [("prefix", ""), ("regex", ""), ("suffix", "DNS")]
    assert decode_cluster(c).tls == tls and decode_cluster(c).tls.key == tls.key  # equal by value: no rebuilds


# -- SAN matching -------------------------------------------------------------------------


@pytest.mark.parametrize("matchers,sans,expected", [
    ([SanMatcher("exact", REVIEWS)], [("URI", REVIEWS)], True),
    ([SanMatcher("exact", REVIEWS)], [("URI", spiffe_id("default", "impostor"))], False),
    ([], [("URI", "anything")], True),
    ([SanMatcher("prefix", "spiffe://cluster.local/ns/default/")], [("URI", REVIEWS)], True),
    ([SanMatcher("regex", "spiffe://.+/ns/other/.+")], [("URI", REVIEWS)], False),
    ([SanMatcher("exact", "a.example.com")], [("DNS", "*.example.com")], True),
    ([SanMatcher("exact", "a.b.example.com")], [("DNS", "*.example.com")], False),
    ([SanMatcher("exact", "A.Example.com")], [("DNS", "a.example.com")], True),
    ([SanMatcher("exact", "10.0.0.1")], [("IP", "10.0.0.1")], True),
    ([SanMatcher("exact", REVIEWS, san_type="DNS")], [("URI", REVIEWS)], False),
    ([SanMatcher("exact", REVIEWS)], [], False),
])
def test_san_verifier(matchers: List[SanMatcher], sans: list, expected: bool) -> None:
    assert SanVerifier(matchers).accepts(sans) is expected


# -- certificate providers ------------------------------------------------------------------


def test_provider_generations_follow_file_changes(certs: Any) -> None:
    provider = providers.get("default")
    first = provider.material()
    assert first.generation == 1 and b"BEGIN CERTIFICATE" in first.chain_pem
    assert provider.material() is first  # unchanged files: the same object, no re-read
    certs.rotate()
    second = provider.material()
    assert second.generation == 2 and second.chain_pem != first.chain_pem
    assert provider.status()["reloads"] == 2


def test_half_written_rotation_keeps_the_previous_generation(ca: MeshCA, certs: Any) -> None:
    provider = providers.get("default")
    good = provider.material()
    other = ca.issue("default", "client")
    Path(certs.cert_file).write_bytes(other.chain_pem)  # new cert, old key: a mismatched pair
    assert provider.material() is good
    assert provider.rejected >= 1 and "not usable" in provider.last_error
    Path(certs.key_file).write_bytes(other.key_pem)  # the agent finishes writing
    assert provider.material().generation == good.generation + 1


def _rewrite_keeping_stat(ca: MeshCA, certs: Any) -> None:
    """New certificate and key with byte-identical sizes, written in place, mtimes
    restored: (inode, size, mtime) stay the same, only the content changes."""
    paths = [certs.cert_file, certs.key_file]
    sizes = [os.path.getsize(p) for p in paths]
    for _ in range(50):
        workload = ca.issue("default", "client")
        if [len(workload.chain_pem), len(workload.key_pem)] == sizes:
            break
    else:
        pytest.skip("no same-size certificate in 50 tries")
    for path, data in zip(paths, (workload.chain_pem, workload.key_pem)):
        st = os.stat(path)
        with open(path, "r+b") as handle:
            handle.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_stat_poll_and_refresh_interval_are_both_needed(ca: MeshCA, certs: Any) -> None:
    """A change invisible to stat() is seen on the refresh interval only;
    a normal rotation is seen at once (previous tests)."""
    slow = providers.FileWatcherProvider("slow", dict(certs.provider_config("1000s")["config"]))
    fast = providers.FileWatcherProvider("fast", dict(certs.provider_config("0.01s")["config"]))
    first_slow, first_fast = slow.material(), fast.material()
    _rewrite_keeping_stat(ca, certs)
    import time

    time.sleep(0.02)
    assert slow.material() is first_slow  # stat unchanged, refresh not due: no re-read
    assert fast.material().generation == first_fast.generation + 1  # refresh interval re-read the files


def test_unusable_provider_entries_are_explained() -> None:
    providers.configure({"spire": {"plugin_name": "spiffe_workload_api", "config": {}},
                         "half": {"plugin_name": "file_watcher", "config": {"certificate_file": "/x"}}})
    try:
        assert "spiffe_workload_api" in providers.why_unknown("spire")
        assert "together" in providers.why_unknown("half")
        assert "none" in providers.why_unknown("missing")
    finally:
        providers.configure({})


def test_client_tls_is_cached_per_generation(certs: Any) -> None:
    tls = decode_cluster(xs.with_upstream_tls(res.cluster("c"), [REVIEWS])).tls
    a = client_tls.client_tls(tls)
    assert client_tls.client_tls(tls) is a and a.ssl_context is a.ssl_context
    certs.rotate()
    b = client_tls.client_tls(tls)
    assert b is not a and b.channel_key != a.channel_key and b.generation[0] == a.generation[0] + 1


# -- the SSL context on a real handshake ----------------------------------------------------------


def _tls_echo_server(context: ssl.SSLContext) -> Any:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    seen: List[Optional[dict]] = []

    def serve() -> None:
        for _ in range(4):
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    seen.append(tls.getpeercert())
                    tls.sendall(b"hello")
            except (ssl.SSLError, OSError):
                seen.append(None)

    threading.Thread(target=serve, daemon=True).start()
    return listener, seen


def test_mesh_context_checks_spiffe_and_survives_library_weakening(ca: MeshCA, certs: Any) -> None:
    good = _tls_echo_server(server_ssl_context(ca.issue("default", "reviews")))
    bad = _tls_echo_server(server_ssl_context(ca.issue("default", "impostor")))
    tls = decode_cluster(xs.with_upstream_tls(res.cluster("c"), [REVIEWS])).tls
    context = client_tls.client_tls(tls).ssl_context
    # what urllib3 does on every connect, and what a careless library might do:
    context.verify_mode = ssl.CERT_NONE
    context.check_hostname = True
    context.load_default_certs()
    assert context.verify_mode == ssl.CERT_REQUIRED and not context.check_hostname
    try:
        with socket.create_connection(good[0].getsockname()) as raw, context.wrap_socket(raw) as conn:
            assert conn.recv(5) == b"hello"
        with socket.create_connection(bad[0].getsockname()) as raw:
            with pytest.raises(ssl.SSLCertVerificationError, match="impostor"):
                context.wrap_socket(raw)
        # the client presented its own SPIFFE identity
        assert good[1][0]["subjectAltName"] == (("URI", certs.spiffe),)
    finally:
        good[0].close()
        bad[0].close()


# -- inbound listeners and RBAC -------------------------------------------------------------


def _listener(**kwargs: Any) -> Any:
    return decode.decode_listener(_packed(xs.inbound_listener("0.0.0.0", 8080, **kwargs)))[1]


def test_inbound_listener_decodes_tls_and_rbac_in_order(certs: Any) -> None:
    deny = xs.rbac_filter("DENY", {"ns-deny-0": xs.policy([xs.permission_path("/s.S/Secret")])})
    allow = xs.rbac_filter("ALLOW", {"ns-allow-0": xs.policy(principals=[xs.principal_spiffe(REVIEWS)])})
    listener = _listener(tls=xs.downstream_tls_context(), filters=[deny, allow])
    chain = listener.chain_for(8080)
    assert chain.tls is not None and chain.tls.require_client_certificate
    assert [(e.filter_name, e.action) for e in chain.rbac] == [
        ("envoy.filters.http.rbac.DENY", "DENY"), ("envoy.filters.http.rbac", "ALLOW")]
    assert _listener().chain_for(8080).tls is None


@pytest.mark.parametrize("mutate,reason", [
    (lambda l: l.listener_filters.add(name="tls_inspector"), "listener_filters"),
    (lambda l: setattr(l.use_original_dst, "value", True), "use_original_dst"),
])
def test_inbound_listener_shapes_grpc_refuses_are_nacked(certs: Any, mutate: Any, reason: str) -> None:
    lis = xs.inbound_listener("0.0.0.0", 8080)
    mutate(lis)
    with pytest.raises(ResourceError, match=reason):
        decode.decode_listener(_packed(lis))


def test_rbac_cel_condition_and_grpc_headers_are_nacked(certs: Any) -> None:
    p = xs.policy()
    p.condition.const_expr.bool_value = True
    with pytest.raises(ResourceError, match="CEL"):
        _listener(filters=[xs.rbac_filter("ALLOW", {"x": p})])
    bad = rbac_pb2.Permission()
    bad.header.name = "grpc-timeout"
    bad.header.present_match = True
    with pytest.raises(ResourceError, match="grpc-timeout"):
        _listener(filters=[xs.rbac_filter("ALLOW", {"x": xs.policy([bad])})])


def test_downstream_tls_with_unknown_provider_is_nacked(certs: Any) -> None:
    with pytest.raises(ResourceError, match="unrecognized certificate provider"):
        _listener(tls=xs.downstream_tls_context(instance="nope"))


def _request(path: str = "/s.S/M", principals: Optional[List[str]] = None, tls: bool = True,
             headers: Optional[dict] = None, port: Optional[int] = 8080) -> rbac.RbacRequest:
    return rbac.RbacRequest(path, dict(headers or {}), tls, principals if principals is not None else [REVIEWS],
                            "10.0.0.9", "10.0.0.1", port)


def _engines(*filters: Any) -> Any:
    return _listener(filters=list(filters)).chain_for(8080).rbac


def test_rbac_deny_then_allow_semantics(certs: Any) -> None:
    engines = _engines(
        xs.rbac_filter("DENY", {"d": xs.policy([xs.permission_path("/s.S/Secret")])}),
        xs.rbac_filter("ALLOW", {"a": xs.policy(principals=[xs.principal_spiffe(REVIEWS)])}),
    )
    assert rbac.evaluate(engines, _request()) is None
    assert "DENY policy d" in rbac.evaluate(engines, _request("/s.S/Secret"))
    assert "no ALLOW policy" in rbac.evaluate(engines, _request(principals=[spiffe_id("default", "other")]))
    # plaintext peers are never "authenticated", even a matcher that accepts ""
    empty = rbac_pb2.Principal()
    empty.authenticated.principal_name.safe_regex.regex = ".*"
    open_engines = _engines(xs.rbac_filter("ALLOW", {"a": xs.policy(principals=[empty])}))
    assert rbac.evaluate(open_engines, _request(tls=False, principals=[""])) is not None
    assert rbac.evaluate(open_engines, _request()) is None


def test_rbac_matchers_headers_not_and_ports(certs: Any) -> None:
    header = rbac_pb2.Permission()
    header.header.name = "x-user"
    header.header.string_match.exact = "alice"
    not_path = rbac_pb2.Permission()
    not_path.not_rule.url_path.path.prefix = "/admin."
    port = rbac_pb2.Permission(destination_port=8080)
    both = rbac_pb2.Permission()
    both.and_rules.rules.extend([header, not_path, port])
    engines = _engines(xs.rbac_filter("ALLOW", {"a": xs.policy([both])}))
    assert rbac.evaluate(engines, _request(headers={"x-user": "alice"})) is None
    assert rbac.evaluate(engines, _request(headers={"x-user": "bob"})) is not None
    assert rbac.evaluate(engines, _request("/admin.A/B", headers={"x-user": "alice"})) is not None
    assert rbac.evaluate(engines, _request(headers={"x-user": "alice"}, port=9090)) is not None
    assert engines[0].uses_destination
    # ALLOW with no policies (Istio "allow nothing") denies everything
    assert rbac.evaluate(_engines(xs.rbac_filter("ALLOW", {})), _request()) is not None


def test_rbac_log_action_has_no_effect(certs: Any) -> None:
    assert _engines(xs.rbac_filter("LOG", {"x": xs.policy()})) == ()


# -- NACK on the wire -------------------------------------------------------------------------


def test_xds_client_nacks_unknown_provider_and_keeps_valid_clusters(certs: Any) -> None:
    """The error_detail names the cluster and the missing instance; the valid
    TLS cluster of the same response is accepted (gRPC A46)."""
    from meshpatch.bootstrap import Bootstrap, XdsServer
    from meshpatch.xds.client import ACKED, NACKED, XdsClient
    from meshpatch.xds.type_urls import CDS
    from tests.support.scripted_ads import ScriptedAds

    ads = ScriptedAds().start()
    boot = Bootstrap([XdsServer(ads.address, "insecure", {}, [])], {"id": "sidecar~127.0.0.1~c.default~default.svc.cluster.local"},
                     {"default": certs.provider_config()}, None, "test")
    client = XdsClient(boot)
    try:
        ads.serve({CDS: {"good": xs.with_upstream_tls(res.cluster("good"), [REVIEWS]),
                         "bad": xs.with_upstream_tls(res.cluster("bad"), [REVIEWS], instance="spire")}})

        class Watcher:
            def __init__(self) -> None:
                self.values: list = []
                self.errors: list = []

            def on_resource(self, type_url: str, name: str, value: Any) -> None:
                self.values.append(value)

            def on_does_not_exist(self, type_url: str, name: str) -> None:
                pass

            def on_error(self, type_url: str, name: str, reason: str) -> None:
                self.errors.append(reason)

        good, bad = Watcher(), Watcher()
        client.start()
        with client.lock:
            client.watch(CDS, "good", good)
            client.watch(CDS, "bad", bad)
        nack = ads.wait_request(CDS, lambda r: r.HasField("error_detail"), timeout=10)
        assert "bad" in nack.error_detail.message and "spire" in nack.error_detail.message
        assert client.resource_status(CDS, "good") == ACKED and client.resource_status(CDS, "bad") == NACKED
        assert good.values and good.values[-1].tls is not None and bad.errors
    finally:
        client.stop()
        ads.stop()
