"""Resource shapes and naming over a real ADS stream, checked against istiod's grpcgen (xds-istio.md §3)."""

from __future__ import annotations

import re
from typing import Dict, Iterator, List

import pytest
from google.protobuf import json_format

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from tests.support.controlplane import CDS, EDS, LDS, RDS, AdsClient, ControlPlane, decode, node_id_for, to_dict

FQDN = "echo.default.svc.cluster.local"
OTHER = "other.prod.svc.cluster.local"

MESH = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo}}
spec:
  hosts: [{FQDN}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 7070, name: grpc, protocol: GRPC}}
  - {{number: 8080, name: http, protocol: HTTP, targetPort: 18080}}
  - {{number: 9000, name: tcp, protocol: TCP}}
  endpoints:
  - {{address: 127.0.0.2, ports: {{grpc: 5001}}, labels: {{version: v1}}, locality: us/east-1/a, weight: 2}}
  - {{address: 127.0.0.3, ports: {{grpc: 5002}}, labels: {{version: v2}}, locality: us/east-1/b}}
  - {{address: 127.0.0.4, labels: {{version: v2}}, locality: us/east-1/b, weight: 5}}
  - {{address: not-an-ip.example, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: other, namespace: prod}}
spec:
  hosts: [{OTHER}]
  addresses: [10.96.0.20]
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: other}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: other-vm, namespace: prod}}
spec: {{address: 127.0.0.6, labels: {{app: other, version: v3, security.istio.io/tlsMode: istio}}, ports: {{http: 9080}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: unrelated, namespace: default}}
spec: {{address: 127.0.0.7, labels: {{app: other}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo}}
spec:
  host: echo
  trafficPolicy:
    portLevelSettings:
    - port: {{number: 8080}}
      loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - name: v2
    labels: {{version: v2}}
    trafficPolicy: {{loadBalancer: {{consistentHash: {{ringHash: {{minimumRingSize: 64}}, httpHeaderName: x-session}}}}}}
  - name: lr
    labels: {{version: v1}}
    trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST}}, connectionPool: {{http: {{http2MaxRequests: 7}}}}}}
  - {{name: none, labels: {{version: v9}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo}}
spec:
  hosts: [echo]
  http:
  - name: exact
    match:
    - name: m
      uri: {{exact: /pkg.Svc/Get}}
      headers: {{x-b: {{prefix: pre}}, x-a: {{exact: one}}}}
    route: [{{destination: {{host: echo, subset: v1}}}}]
    timeout: 3s
  - name: regex
    match:
    - {{uri: {{regex: "/pkg\\\\.Svc/.*"}}, ignoreUriCase: true, withoutHeaders: {{x-skip: {{exact: "1"}}, x-any: {{regex: "*"}}}}}}
    - {{port: 8080, uri: {{prefix: /only-8080}}}}
    route:
    - {{destination: {{host: echo, subset: v1}}, weight: 0}}
    - {{destination: {{host: echo, subset: v2}}, weight: 30}}
    - {{destination: {{host: {OTHER}, port: {{number: 8080}}}}, weight: 70}}
  - name: rest
    route: [{{destination: {{host: echo, subset: v2}}}}]
    retries: {{attempts: 0}}
  - name: unreachable
    route: [{{destination: {{host: echo}}}}]
"""


@pytest.fixture(scope="module")
def cp() -> Iterator[ControlPlane]:
    with ControlPlane(MESH) as plane:
        assert plane.server.snapshot.config.skipped == []
        yield plane


@pytest.fixture()
def ads(cp: ControlPlane) -> Iterator[AdsClient]:
    with AdsClient(cp.address) as client:
        yield client


def _hcm(listener) -> hcm_pb2.HttpConnectionManager:
    h = hcm_pb2.HttpConnectionManager()
    assert listener.api_listener.api_listener.Unpack(h)
    return h


def _vip(cp: ControlPlane, host: str) -> str:
    return cp.server.snapshot.service(host).vip


# --------------------------------------------------------------------------- LDS


def test_lds_echoes_requested_short_names_and_points_rds_at_fqdn_cluster_key(cp: ControlPlane, ads: AdsClient) -> None:
    names = ["echo:7070", "echo.default:7070", "echo.default.svc:7070", f"{FQDN}:7070"]
    ads.send(LDS, names)
    got = decode(ads.recv())
    assert sorted(got) == sorted(names)
    vip = _vip(cp, FQDN)
    assert re.fullmatch(r"240\.240\.\d+\.\d+", vip)
    for name, listener in got.items():
        assert listener.name == name
        assert (listener.address.socket_address.address, listener.address.socket_address.port_value) == (vip, 7070)
        h = _hcm(listener)
        assert h.rds.route_config_name == f"outbound|7070||{FQDN}"
        assert h.rds.config_source.WhichOneof("config_source_specifier") == "ads"
        assert [f.name for f in h.http_filters] == ["envoy.filters.http.fault", "envoy.filters.http.router"]
        assert h.http_filters[0].typed_config.type_url.endswith("fault.v3.HTTPFault")
        assert h.http_filters[1].typed_config.type_url.endswith("router.v3.Router")


def test_lds_short_names_only_expand_in_the_proxys_namespace(cp: ControlPlane) -> None:
    with AdsClient(cp.address, node_id=node_id_for("prod"), namespace="prod") as prod:
        prod.send(LDS, ["other:8080", "other.prod:8080", "echo:7070", f"{FQDN}:7070", "echo.default:7070"])
        got = decode(prod.recv())
    # echo.default is another namespace for this proxy: istiod does not expand it.
    assert sorted(got) == sorted(["other:8080", "other.prod:8080", f"{FQDN}:7070"])
    assert got["other:8080"].address.socket_address.address == "10.96.0.20"  # ServiceEntry.addresses[0]


def test_lds_without_port_lists_every_port_and_unknown_names_are_omitted(ads: AdsClient) -> None:
    ads.send(LDS, ["echo", "nosuch:80", "10.1.2.3:7070", "echo:1234", "xds.istio.io/grpc/lds/inbound/127.0.0.2:5001"])
    assert sorted(decode(ads.recv())) == ["echo:7070", "echo:8080", "echo:9000"]


def test_lds_wildcard_lists_every_service_by_fqdn(cp: ControlPlane, ads: AdsClient) -> None:
    ads.send(LDS, [])
    assert sorted(decode(ads.recv())) == sorted([f"{FQDN}:7070", f"{FQDN}:8080", f"{FQDN}:9000", f"{OTHER}:8080"])


def test_fake_vips_are_deterministic_across_servers() -> None:
    with ControlPlane(MESH) as a, ControlPlane(MESH.replace("name: echo}", "name: echo2}")) as b:
        assert _vip(a, FQDN) == _vip(b, FQDN)


# --------------------------------------------------------------------------- RDS


def test_rds_vhost_domains_and_default_route_without_virtual_service(cp: ControlPlane) -> None:
    with AdsClient(cp.address, node_id=node_id_for("prod"), namespace="prod") as prod:
        prod.send(RDS, [f"outbound|8080||{OTHER}"])
        rc = decode(prod.recv())[f"outbound|8080||{OTHER}"]
        assert rc.name == f"outbound|8080||{OTHER}"
        (vh,) = rc.virtual_hosts
        assert vh.name == f"{OTHER}:8080"
        assert list(vh.domains) == [
            OTHER, f"{OTHER}:8080", "other", "other:8080", "other.prod.svc", "other.prod.svc:8080",
            "other.prod", "other.prod:8080", "10.96.0.20", "10.96.0.20:8080",
        ]
        assert vh.include_request_attempt_count
        (route,) = vh.routes
        d = to_dict(route)
        assert d["name"] == "default"
        assert d["match"] == {"prefix": "/", "case_sensitive": True}
        action = d["route"]
        assert action["cluster"] == f"outbound|8080||{OTHER}"
        assert action["timeout"] == "0s" and action["max_stream_duration"] == {"max_stream_duration": "0s"}
        rp = action["retry_policy"]
        assert rp["num_retries"] == 2 and rp["retry_on"] == "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
        # Istio >= 1.24 (EXCLUDE_UNSAFE_503_FROM_DEFAULT_RETRY, compat profile gone in 1.27): no 503 in the default.
        assert "retriable_status_codes" not in rp
        assert rp["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
        assert "hash_policy" not in action

    # From another namespace only the namespace-qualified short forms are valid domains.
    with AdsClient(cp.address) as dflt:
        dflt.send(RDS, [f"outbound|8080||{OTHER}"])
        (vh,) = decode(dflt.recv())[f"outbound|8080||{OTHER}"].virtual_hosts
        assert list(vh.domains) == [
            OTHER, f"{OTHER}:8080", "other.prod", "other.prod:8080", "other.prod.svc", "other.prod.svc:8080",
            "10.96.0.20", "10.96.0.20:8080",
        ]


def test_rds_virtual_service_routes_in_order(cp: ControlPlane, ads: AdsClient) -> None:
    name = f"outbound|7070||{FQDN}"
    ads.send(RDS, [name])
    (vh,) = decode(ads.recv())[name].virtual_hosts
    assert vh.name == f"{FQDN}:7070"
    assert {"echo", "echo:7070", _vip(cp, FQDN) + ":7070"} <= set(vh.domains)
    routes = [to_dict(r) for r in vh.routes]
    assert [r["name"] for r in routes] == ["exact.m", "regex", "rest"]  # 8080-only match dropped; catch-all ends the list

    exact = routes[0]
    assert exact["match"] == {
        "path": "/pkg.Svc/Get",
        "case_sensitive": True,
        "headers": [  # sorted by name
            {"name": "x-a", "string_match": {"exact": "one"}},
            {"name": "x-b", "string_match": {"prefix": "pre"}},
        ],
    }
    assert exact["route"]["cluster"] == f"outbound|7070|v1|{FQDN}"
    assert exact["route"]["timeout"] == "3s" and exact["route"]["max_stream_duration"]["max_stream_duration"] == "3s"
    assert exact["metadata"]["filter_metadata"]["istio"]["config"].endswith("/namespaces/default/virtual-service/echo")

    regex = routes[1]
    assert regex["match"]["safe_regex"] == {"regex": "/pkg\\.Svc/.*"} and regex["match"]["case_sensitive"] is False
    assert regex["match"]["headers"] == [
        {"name": "x-any", "present_match": True, "invert_match": True},
        {"name": "x-skip", "string_match": {"exact": "1"}, "invert_match": True, "treat_missing_header_as_empty": True},
    ]
    wc = regex["route"]["weighted_clusters"]
    assert wc == {"clusters": [  # weight 0 dropped, no total_weight
        {"name": f"outbound|7070|v2|{FQDN}", "weight": 30},
        {"name": f"outbound|8080||{OTHER}", "weight": 70},
    ]}
    assert regex["route"]["timeout"] == "0s" and regex["route"]["max_stream_duration"]["max_stream_duration"] == "0s"
    # v2's DR subset uses consistentHash: the hash policy comes along with the weighted destination.
    assert regex["route"]["hash_policy"] == [{"header": {"header_name": "x-session"}}]

    rest = routes[2]
    assert rest["match"] == {"prefix": "/"}
    assert rest["route"]["cluster"] == f"outbound|7070|v2|{FQDN}"
    assert "retry_policy" not in rest["route"]  # attempts: 0 disables retries
    assert rest["route"]["hash_policy"] == [{"header": {"header_name": "x-session"}}]


def test_rds_match_port_applies_only_on_that_port(ads: AdsClient) -> None:
    name = f"outbound|8080||{FQDN}"
    ads.send(RDS, [name])
    (vh,) = decode(ads.recv())[name].virtual_hosts
    routes = [to_dict(r) for r in vh.routes]
    # On 8080 the port-scoped second match of "regex" applies too, and port-less
    # destinations of a multi-port service take the listener port.
    assert [r["name"] for r in routes] == ["exact.m", "regex", "regex", "rest"]
    assert routes[0]["route"]["cluster"] == f"outbound|8080|v1|{FQDN}"
    assert routes[2]["match"]["prefix"] == "/only-8080"


def test_rds_tcp_port_unknown_service_and_bad_names(ads: AdsClient) -> None:
    names = [f"outbound|9000||{FQDN}", "outbound|80||nosuch.default.svc.cluster.local", "garbage"]
    ads.send(RDS, names)
    got = decode(ads.recv())
    assert sorted(got) == sorted(names[:2])  # unparsable name: nothing; parsable ones: a RouteConfiguration
    assert all(not rc.virtual_hosts for rc in got.values())


# --------------------------------------------------------------------------- CDS


def test_cds_only_requested_clusters_with_dr_policies(ads: AdsClient) -> None:
    names = [
        f"outbound|7070||{FQDN}", f"outbound|7070|v2|{FQDN}", f"outbound|7070|lr|{FQDN}", f"outbound|8080||{FQDN}",
        f"outbound|7070|nosubset|{FQDN}", f"outbound|1234||{FQDN}", "outbound|80||nosuch.default.svc.cluster.local", "junk",
    ]
    ads.send(CDS, names)
    got = decode(ads.recv())
    assert sorted(got) == sorted(names[:4])
    for name, c in got.items():
        assert c.name == name and c.alt_stat_name == name + ";"
        assert c.type == cluster_pb2.Cluster.EDS
        assert c.eds_cluster_config.service_name == name
        assert c.eds_cluster_config.eds_config.WhichOneof("config_source_specifier") == "ads"
        assert not c.HasField("outlier_detection") and not c.HasField("lb_subset_config")
    assert got[f"outbound|7070||{FQDN}"].lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert not got[f"outbound|7070||{FQDN}"].HasField("ring_hash_lb_config")
    v2 = got[f"outbound|7070|v2|{FQDN}"]
    assert v2.lb_policy == cluster_pb2.Cluster.RING_HASH and v2.ring_hash_lb_config.minimum_ring_size.value == 64
    lr = got[f"outbound|7070|lr|{FQDN}"]
    assert lr.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert lr.circuit_breakers.thresholds[0].max_requests.value == 7
    port_level = got[f"outbound|8080||{FQDN}"]  # legacy consistentHash (no ringHash block) → RING_HASH, 1024
    assert port_level.lb_policy == cluster_pb2.Cluster.RING_HASH and port_level.ring_hash_lb_config.minimum_ring_size.value == 1024


def test_cds_wildcard_is_empty(ads: AdsClient) -> None:
    ads.send(CDS, [])
    resp = ads.recv()
    assert resp.type_url == CDS and list(resp.resources) == []


# --------------------------------------------------------------------------- EDS


def _endpoints(cla) -> List[Dict[str, object]]:
    return [json_format.MessageToDict(l, preserving_proto_field_name=True) for l in cla.endpoints]


def test_eds_subsets_localities_weights_and_ports(ads: AdsClient) -> None:
    names = [f"outbound|7070||{FQDN}", f"outbound|7070|v2|{FQDN}", f"outbound|8080|v2|{FQDN}", f"outbound|7070|none|{FQDN}",
             "outbound|80||nosuch.default.svc.cluster.local", f"outbound|1234||{FQDN}"]
    ads.send(EDS, names)
    got = decode(ads.recv())
    assert sorted(got) == sorted(names)

    all_eps = _endpoints(got[f"outbound|7070||{FQDN}"])
    assert [e["locality"] for e in all_eps] == [
        {"region": "us", "zone": "east-1", "sub_zone": "a"}, {"region": "us", "zone": "east-1", "sub_zone": "b"},
    ]
    assert [e["load_balancing_weight"] for e in all_eps] == [2, 6]  # Σ endpoint weights (default weight 1)
    a, b = all_eps
    assert a["lb_endpoints"] == [{
        "endpoint": {"address": {"socket_address": {"address": "127.0.0.2", "port_value": 5001}}},
        "health_status": "HEALTHY", "load_balancing_weight": 2,
        # meshpatch-only: the endpoint's labels (canary lanes, registry merge)
        "metadata": {"filter_metadata": {"meshpatch": {"labels": {"version": "v1"}}}},
    }]
    # named endpoint port wins; without one the service port number is used; non-IP address dropped
    assert [(e["endpoint"]["address"]["socket_address"]["address"], e["endpoint"]["address"]["socket_address"]["port_value"],
             e["load_balancing_weight"]) for e in b["lb_endpoints"]] == [("127.0.0.3", 5002, 1), ("127.0.0.4", 7070, 5)]

    v2 = _endpoints(got[f"outbound|7070|v2|{FQDN}"])
    assert [ep["endpoint"]["address"]["socket_address"]["address"] for l in v2 for ep in l["lb_endpoints"]] == ["127.0.0.3", "127.0.0.4"]
    v2_8080 = _endpoints(got[f"outbound|8080|v2|{FQDN}"])
    assert {ep["endpoint"]["address"]["socket_address"]["port_value"] for l in v2_8080 for ep in l["lb_endpoints"]} == {18080}  # targetPort

    for empty in names[3:]:
        assert got[empty].cluster_name == empty and list(got[empty].endpoints) == []


def test_eds_workload_entries_selected_by_labels_in_the_service_namespace(ads: AdsClient) -> None:
    name = f"outbound|8080||{OTHER}"
    ads.send(EDS, [name])
    (loc,) = _endpoints(decode(ads.recv())[name])
    (ep,) = loc["lb_endpoints"]
    assert ep["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.6", "port_value": 9080}
    assert ep["metadata"]["filter_metadata"] == {
        "envoy.transport_socket_match": {"tlsMode": "istio"},
        "istio": {"workload": "other-vm;prod;other;v3;Kubernetes"},
        "meshpatch": {"labels": {"app": "other", "security.istio.io/tlsMode": "istio", "version": "v3"}},
    }
    assert loc["locality"] == {} and loc["load_balancing_weight"] == 1


def test_default_route_carries_dr_hash_policy_and_keeps_default_retries() -> None:
    yaml_text = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo}}
spec:
  hosts: [{FQDN}]
  ports: [{{number: 7070, name: grpc, protocol: GRPC}}, {{number: 8080, name: http, protocol: HTTP}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo}}
spec:
  host: {FQDN}
  trafficPolicy:
    loadBalancer: {{consistentHash: {{httpCookie: {{name: session, ttl: 10s, path: /}}}}}}
    portLevelSettings:
    - port: {{number: 8080}}
      loadBalancer: {{consistentHash: {{useSourceIp: true}}}}
"""
    with ControlPlane(yaml_text) as plane, AdsClient(plane.address) as c:
        c.send(RDS, [f"outbound|7070||{FQDN}", f"outbound|8080||{FQDN}"])
        got = decode(c.recv())
    r7070 = to_dict(got[f"outbound|7070||{FQDN}"].virtual_hosts[0].routes[0])["route"]
    assert r7070["hash_policy"] == [{"cookie": {"name": "session", "ttl": "10s", "path": "/"}}]
    assert r7070["retry_policy"]["retry_host_predicate"]  # default route keeps previous_hosts (istiod passes hash=false)
    r8080 = to_dict(got[f"outbound|8080||{FQDN}"].virtual_hosts[0].routes[0])["route"]
    assert r8080["hash_policy"] == [{"connection_properties": {"source_ip": True}}]


def test_service_entry_export_to_limits_visibility() -> None:
    yaml_text = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: prod}
spec:
  hosts: [private.prod.svc.cluster.local]
  exportTo: ["."]
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.9}]
"""
    cluster = "outbound|80||private.prod.svc.cluster.local"
    with ControlPlane(yaml_text) as plane:
        with AdsClient(plane.address) as other_ns:
            other_ns.send(LDS, ["private.prod.svc.cluster.local:80"])
            assert decode(other_ns.recv()) == {}
            other_ns.send(CDS, [cluster])
            assert decode(other_ns.recv()) == {}
            other_ns.send(EDS, [cluster])
            assert list(decode(other_ns.recv())[cluster].endpoints) == []
        with AdsClient(plane.address, node_id=node_id_for("prod"), namespace="prod") as same_ns:
            same_ns.send(LDS, ["private:80"])
            assert list(decode(same_ns.recv())) == ["private:80"]
            same_ns.send(EDS, [cluster])
            assert len(decode(same_ns.recv())[cluster].endpoints) == 1


def test_destination_rule_lookup_order_and_host_specificity() -> None:
    yaml_text = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo}}
spec:
  hosts: [{FQDN}, side.default.svc.cluster.local]
  ports: [{{number: 7070, name: grpc, protocol: GRPC}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: wild}}
spec:
  host: "*.default.svc.cluster.local"
  trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: exact}}
spec:
  host: echo
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: client-side, namespace: prod}}
spec:
  host: {FQDN}
  trafficPolicy: {{loadBalancer: {{consistentHash: {{ringHash: {{minimumRingSize: 8}}, httpHeaderName: x}}}}}}
"""
    names = [f"outbound|7070||{FQDN}", "outbound|7070||side.default.svc.cluster.local"]
    with ControlPlane(yaml_text) as plane:
        with AdsClient(plane.address) as dflt:
            dflt.send(CDS, names)
            got = decode(dflt.recv())
            assert got[names[0]].lb_policy == cluster_pb2.Cluster.ROUND_ROBIN  # exact host beats the wildcard
            assert got[names[1]].lb_policy == cluster_pb2.Cluster.LEAST_REQUEST  # only the wildcard matches
        with AdsClient(plane.address, node_id=node_id_for("prod"), namespace="prod") as prod:
            prod.send(CDS, names[:1])
            # a rule in the client's own namespace wins over the service namespace's
            assert decode(prod.recv())[names[0]].lb_policy == cluster_pb2.Cluster.RING_HASH
