"""Traffic policy translation over a real ADS stream: VirtualService actions and
DestinationRule policies, checked field by field against istiod's route.go,
retry.go, cluster_traffic_policy.go, grpcgen/cds.go and loadbalancer.go
(xds-istio.md §3.4-§3.6)."""

from __future__ import annotations

import base64
from typing import Dict, Iterator, List

import pytest

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.retry.priority.previous_priorities.v3 import previous_priorities_config_pb2
from meshpatch.controlplane.istio_config import parse_yaml_text
from tests.support.controlplane import CDS, EDS, RDS, AdsClient, ControlPlane, decode, node_id_for, to_dict

FQDN = "shop.default.svc.cluster.local"
MIRROR = "shadow.default.svc.cluster.local"
ROUTE_7070 = f"outbound|7070||{FQDN}"
BLOB_B64 = base64.b64encode(b"\x00\x01bin").decode()

SERVICES = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shop}}
spec:
  hosts: [{FQDN}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 7070, name: http, protocol: HTTP}}, {{number: 8080, name: http-alt, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.2, labels: {{version: v1, rack: a}}, locality: r1/z1/s1}}
  - {{address: 127.0.0.3, labels: {{version: v1, rack: b}}, locality: r1/z1/s1}}
  - {{address: 127.0.0.4, labels: {{version: v2}}, locality: r1/z1/s2, weight: 3}}
  - {{address: 127.0.0.5, labels: {{version: v2}}, locality: r1/z2/s1}}
  - {{address: 127.0.0.6, labels: {{version: v3}}, locality: r2/z1/s1}}
  - {{address: 127.0.0.7, labels: {{version: v3}}, locality: r3/z1/s1}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: shadow}}
spec:
  hosts: [{MIRROR}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9000, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.9}}]
"""

VS = f"""
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop}}
spec:
  hosts: [shop]
  http:
  - name: api
    match:
    - uri: {{prefix: /api}}
      ignoreUriCase: true
      method: {{exact: GET}}
      authority: {{prefix: shop}}
      scheme: {{exact: http}}
      headers: {{x-b: {{regex: "*"}}, x-a: {{exact: "1"}}}}
      withoutHeaders: {{x-c: {{prefix: nope}}}}
      queryParams: {{q: {{exact: "1"}}, flag: {{}}}}
    headers:
      request:
        set: {{x-set: one, ":authority": set-host.example, x-aaa: first}}
        add: {{x-add: two}}
        remove: [x-rm, ":path", host]
      response:
        set: {{x-resp: r}}
        add: {{x-resp-add: ra}}
        remove: [server]
    rewrite: {{uri: /v2}}
    timeout: 2s
    retries: {{attempts: 3, perTryTimeout: 500ms, retryOn: "unavailable,5xx,503,cancelled,429", backoff: 50ms, retryRemoteLocalities: true}}
    fault:
      delay: {{fixedDelay: 100ms, percentage: {{value: 12.5}}}}
      abort: {{grpcStatus: UNAVAILABLE, percentage: {{value: 0.1}}}}
    mirror: {{host: shadow}}
    mirrorPercentage: {{value: 25}}
    route:
    - destination: {{host: shop, subset: v1, port: {{number: 7070}}}}
      headers: {{request: {{set: {{x-dst: d, host: dst-host.example}}, remove: [x-dst-rm]}}, response: {{add: {{x-dst-resp: dr}}}}}}
  - name: regex
    match: [{{uri: {{regex: "/items/[0-9]+"}}}}]
    rewrite: {{uriRegexRewrite: {{match: "^/items/([0-9]+)$", rewrite: "/v2/item/\\\\1"}}, authority: rewritten.example}}
    mirrors:
    - {{destination: {{host: shadow}}, percentage: {{value: 50}}}}
    - destination: {{host: {FQDN}, subset: v2}}
    - {{destination: {{host: shadow}}, percentage: {{value: 0}}}}
    route:
    - destination: {{host: shop, subset: v1}}
      weight: 60
      headers: {{request: {{add: {{x-w: v1}}, set: {{":authority": w1.example}}}}}}
    - {{destination: {{host: shop, subset: v2}}, weight: 40}}
  - name: moved
    match: [{{uri: {{exact: /old}}}}]
    headers: {{response: {{add: {{x-moved: "yes"}}}}}}
    redirect: {{uri: /new, authority: new.example, derivePort: FROM_REQUEST_PORT, redirectCode: 302}}
  - name: to-http
    match: [{{uri: {{prefix: /plain}}}}]
    redirect: {{authority: plain.example, port: 80, scheme: http}}
  - name: strip
    match: [{{uri: {{prefix: /strip}}}}]
    redirect: {{prefixRewrite: /s, redirectCode: 308}}
  - name: health
    match: [{{uri: {{exact: /health}}}}]
    directResponse: {{status: 503, body: {{string: down for maintenance}}}}
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
  - name: blob
    match: [{{uri: {{exact: /blob}}}}]
    directResponse: {{status: 200, body: {{bytes: {BLOB_B64}}}}}
  - name: legacy-percent
    match: [{{uri: {{prefix: /legacy}}}}]
    fault: {{delay: {{fixedDelay: 1s, percent: 7}}}}
    mirror: {{host: shadow}}
    mirrorPercent: 0
    route: [{{destination: {{host: shop}}}}]
  - name: rest
    route: [{{destination: {{host: shop}}}}]
"""

DR = f"""
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: shop}}
spec:
  host: shop
  trafficPolicy:
    loadBalancer: {{simple: RANDOM}}
    connectionPool:
      tcp: {{maxConnections: 10, connectTimeout: 1500ms}}
      http: {{http1MaxPendingRequests: 5, http2MaxRequests: 7, maxRetries: 2}}
    outlierDetection:
      consecutive5xxErrors: 4
      consecutiveGatewayErrors: 0
      consecutiveLocalOriginFailures: 6
      splitExternalLocalOriginErrors: true
      interval: 2s
      baseEjectionTime: 45s
      maxEjectionPercent: 50
      minHealthPercent: 20
    portLevelSettings:
    - port: {{number: 8080}}
      outlierDetection: {{consecutive5xxErrors: 9}}
  subsets:
  - name: v1
    labels: {{version: v1}}
    trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST, warmupDurationSecs: 30s}}}}
  - name: v2
    labels: {{version: v2}}
    trafficPolicy:
      loadBalancer: {{simple: ROUND_ROBIN, warmup: {{duration: 10s, aggression: 2, minimumPercent: 5}}}}
      portLevelSettings:
      - port: {{number: 8080}}
        connectionPool: {{http: {{http2MaxRequests: 99}}}}
  - name: v3
    labels: {{version: v3}}
    trafficPolicy: {{loadBalancer: {{consistentHash: {{maglev: {{tableSize: 65537}}, httpCookie: {{name: s, ttl: 0s, attributes: [{{name: SameSite, value: Strict}}]}}}}}}}}
  - name: lc
    labels: {{version: v1}}
    trafficPolicy: {{loadBalancer: {{simple: LEAST_CONN}}, connectionPool: {{http: {{maxRetries: 4}}}}}}
"""


@pytest.fixture(scope="module")
def cp() -> Iterator[ControlPlane]:
    with ControlPlane(SERVICES + VS + DR) as plane:
        assert plane.server.snapshot.config.skipped == []
        yield plane


@pytest.fixture(scope="module")
def routes(cp: ControlPlane) -> Dict[str, Dict]:
    with AdsClient(cp.address) as ads:
        ads.send(RDS, [ROUTE_7070])
        (vh,) = decode(ads.recv())[ROUTE_7070].virtual_hosts
    return {r.name: r for r in vh.routes}


def _d(msg) -> Dict:
    return to_dict(msg)


# --------------------------------------------------------------------------- RDS


def test_match_on_uri_method_authority_scheme_headers_and_query(routes) -> None:
    m = _d(routes["api"])["match"]
    assert m["prefix"] == "/api" and m["case_sensitive"] is False
    # istiod: header matchers sorted by name, then :method, :authority, :scheme appended in that order
    assert m["headers"] == [
        {"name": "x-a", "string_match": {"exact": "1"}},
        {"name": "x-b", "present_match": True},
        {"name": "x-c", "string_match": {"prefix": "nope"}, "invert_match": True, "treat_missing_header_as_empty": True},
        {"name": ":method", "string_match": {"exact": "GET"}},
        {"name": ":authority", "string_match": {"prefix": "shop"}},
        {"name": ":scheme", "string_match": {"exact": "http"}},
    ]
    assert sorted(m["query_parameters"], key=lambda q: q["name"]) == [
        {"name": "flag", "present_match": True}, {"name": "q", "string_match": {"exact": "1"}},
    ]


def test_header_operations_route_then_destination_level(routes) -> None:
    r = _d(routes["api"])
    ow = "OVERWRITE_IF_EXISTS_OR_ADD"
    # set (sorted, overwrite) then add (append: the default enum value, omitted); pseudo-headers and host dropped
    assert r["request_headers_to_add"] == [
        {"header": {"key": "x-aaa", "value": "first"}, "append_action": ow},
        {"header": {"key": "x-set", "value": "one"}, "append_action": ow},
        {"header": {"key": "x-add", "value": "two"}},
        {"header": {"key": "x-dst", "value": "d"}, "append_action": ow},
    ]
    assert r["request_headers_to_remove"] == ["x-rm", "x-dst-rm"]
    assert r["response_headers_to_add"] == [
        {"header": {"key": "x-resp", "value": "r"}, "append_action": ow},
        {"header": {"key": "x-resp-add", "value": "ra"}},
        {"header": {"key": "x-dst-resp", "value": "dr"}},
    ]
    assert r["response_headers_to_remove"] == ["server"]
    action = r["route"]
    # route-level :authority wins over the destination's host header
    assert action["host_rewrite_literal"] == "set-host.example"
    assert action["prefix_rewrite"] == "/v2"
    assert action["cluster"] == f"outbound|7070|v1|{FQDN}"


def test_timeout_retries_and_fault(routes) -> None:
    r = routes["api"]
    action = _d(r)["route"]
    assert action["timeout"] == "2s" and action["max_stream_duration"] == {"max_stream_duration": "2s"}
    rp = action["retry_policy"]
    assert rp["num_retries"] == 3 and rp["per_try_timeout"] == "0.500s"
    assert rp["retry_on"] == "unavailable,5xx,cancelled,retriable-status-codes"
    assert rp["retriable_status_codes"] == [503, 429]
    assert rp["retry_back_off"] == {"base_interval": "0.050s"}
    assert rp["host_selection_retry_max_attempts"] == "5"
    assert rp["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
    prio = r.route.retry_policy.retry_priority
    assert prio.name == "envoy.retry_priorities.previous_priorities"
    cfg = previous_priorities_config_pb2.PreviousPrioritiesConfig()
    assert prio.typed_config.Unpack(cfg) and cfg.update_frequency == 2
    fault = fault_pb2.HTTPFault()
    assert r.typed_per_filter_config["envoy.filters.http.fault"].Unpack(fault)
    assert _d(fault) == {
        "delay": {"fixed_delay": "0.100s", "percentage": {"numerator": 125000, "denominator": "MILLION"}},
        "abort": {"grpc_status": 14, "percentage": {"numerator": 1000, "denominator": "MILLION"}},
    }


def test_mirror_policies(routes) -> None:
    assert _d(routes["api"])["route"]["request_mirror_policies"] == [{
        "cluster": f"outbound|9000||{MIRROR}",
        "runtime_fraction": {"default_value": {"numerator": 250000, "denominator": "MILLION"}},
        "trace_sampled": False,
    }]
    # mirrors[]: percentage, default 100 %, explicit 0 % dropped
    mirrors = _d(routes["regex"])["route"]["request_mirror_policies"]
    assert [(m["cluster"], m["runtime_fraction"]["default_value"]) for m in mirrors] == [
        (f"outbound|9000||{MIRROR}", {"numerator": 500000, "denominator": "MILLION"}),
        (f"outbound|7070|v2|{FQDN}", {"numerator": 100}),  # HUNDRED is the enum default
    ]
    # mirrorPercent: 0 (deprecated integer) disables the mirror
    assert "request_mirror_policies" not in _d(routes["legacy-percent"])["route"]


def test_regex_rewrite_authority_and_weighted_cluster_headers(routes) -> None:
    action = _d(routes["regex"])["route"]
    assert action["regex_rewrite"] == {"pattern": {"regex": "^/items/([0-9]+)$"}, "substitution": "/v2/item/\\1"}
    assert action["host_rewrite_literal"] == "rewritten.example"
    assert action["weighted_clusters"]["clusters"] == [
        {"name": f"outbound|7070|v1|{FQDN}", "weight": 60,
         "request_headers_to_add": [{"header": {"key": "x-w", "value": "v1"}}], "host_rewrite_literal": "w1.example"},
        {"name": f"outbound|7070|v2|{FQDN}", "weight": 40},
    ]
    # v3 has a consistent hash but is not a destination here; weighted → retry keeps previous_hosts
    assert action["retry_policy"]["retry_host_predicate"]


def test_redirects(routes) -> None:
    moved = _d(routes["moved"])
    assert "route" not in moved
    assert moved["redirect"] == {"host_redirect": "new.example", "path_redirect": "/new", "port_redirect": 7070, "response_code": "FOUND"}
    assert moved["response_headers_to_add"] == [{"header": {"key": "x-moved", "value": "yes"}}]
    assert moved["decorator"]["operation"] == "shop:7070/old"
    # explicit port 80 with scheme http is dropped; path_redirect "" (keep the path) is still set, as istiod does
    plain = routes["to-http"]
    assert plain.redirect.WhichOneof("path_rewrite_specifier") == "path_redirect" and plain.redirect.path_redirect == ""
    assert _d(plain)["redirect"] == {"host_redirect": "plain.example", "scheme_redirect": "http", "path_redirect": ""}
    assert _d(routes["strip"])["redirect"] == {"prefix_rewrite": "/s", "response_code": "PERMANENT_REDIRECT"}


def test_direct_responses(routes) -> None:
    health = routes["health"]
    assert _d(health)["direct_response"] == {"status": 503, "body": {"inline_string": "down for maintenance"}}
    fault = fault_pb2.HTTPFault()
    assert health.typed_per_filter_config["envoy.filters.http.fault"].Unpack(fault)
    assert fault.abort.http_status == 418 and fault.abort.percentage.numerator == 1000000
    assert routes["blob"].direct_response.body.inline_bytes == b"\x00\x01bin"


def test_legacy_percent_and_default_retry(routes) -> None:
    r = routes["legacy-percent"]
    fault = fault_pb2.HTTPFault()
    assert r.typed_per_filter_config["envoy.filters.http.fault"].Unpack(fault)
    assert _d(fault) == {"delay": {"fixed_delay": "1s", "percentage": {"numerator": 7}}}
    rp = _d(routes["rest"])["route"]["retry_policy"]
    assert rp == {
        "retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2,
        "retry_host_predicate": rp["retry_host_predicate"],
        "host_selection_retry_max_attempts": "5",
    }


# --------------------------------------------------------------------------- CDS


@pytest.fixture(scope="module")
def clusters(cp: ControlPlane) -> Dict[str, cluster_pb2.Cluster]:
    names = [f"outbound|{p}|{s}|{FQDN}" for p in (7070, 8080) for s in ("", "v1", "v2", "v3", "lc")]
    with AdsClient(cp.address) as ads:
        ads.send(CDS, names)
        got = decode(ads.recv())
    assert sorted(got) == sorted(names)
    return got  # type: ignore[return-value]


def test_top_level_policy_random_circuit_breakers_outlier(clusters) -> None:
    c = clusters[f"outbound|7070||{FQDN}"]
    assert c.lb_policy == cluster_pb2.Cluster.RANDOM
    assert _d(c)["circuit_breakers"] == {"thresholds": [{"max_requests": 7, "max_pending_requests": 5, "max_retries": 2, "max_connections": 10}]}
    assert _d(c)["connect_timeout"] == "1.500s"
    assert _d(c)["outlier_detection"] == {
        "consecutive_5xx": 4, "enforcing_consecutive_5xx": 100,
        "consecutive_gateway_failure": 0, "enforcing_consecutive_gateway_failure": 0,
        "interval": "2s", "base_ejection_time": "45s", "max_ejection_percent": 50,
        "enforcing_success_rate": 0,
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 6, "enforcing_consecutive_local_origin_failure": 100,
        "enforcing_local_origin_success_rate": 0,
    }
    assert c.common_lb_config.healthy_panic_threshold.value == 20
    assert not c.common_lb_config.HasField("locality_weighted_lb_config")


def test_port_level_settings_replace_the_whole_policy(clusters) -> None:
    c = clusters[f"outbound|8080||{FQDN}"]
    # the port-level entry has only outlierDetection: lb and pool fall back to defaults, not to the DR's
    assert c.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN and not c.HasField("circuit_breakers")
    assert _d(c)["outlier_detection"] == {"consecutive_5xx": 9, "enforcing_consecutive_5xx": 100, "enforcing_success_rate": 0}
    assert c.common_lb_config.healthy_panic_threshold.value == 0 and c.common_lb_config.HasField("healthy_panic_threshold")


def test_subsets_merge_field_by_field(clusters) -> None:
    v1 = clusters[f"outbound|7070|v1|{FQDN}"]
    assert v1.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert _d(v1)["least_request_lb_config"] == {"slow_start_config": {"slow_start_window": "30s"}}
    assert _d(v1)["circuit_breakers"]["thresholds"][0]["max_requests"] == 7  # inherited from the DR
    assert v1.HasField("outlier_detection")
    v2 = clusters[f"outbound|7070|v2|{FQDN}"]
    assert v2.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN
    assert _d(v2)["round_robin_lb_config"] == {"slow_start_config": {
        "slow_start_window": "10s", "aggression": {"default_value": 2.0, "runtime_key": "("}, "min_weight_percent": {"value": 5.0}}}
    v2_8080 = clusters[f"outbound|8080|v2|{FQDN}"]
    # subset port-level: every field replaced, set or not (no lb, no outlier, its own pool)
    assert v2_8080.lb_policy == cluster_pb2.Cluster.ROUND_ROBIN and not v2_8080.HasField("round_robin_lb_config")
    assert not v2_8080.HasField("outlier_detection")
    assert _d(v2_8080)["circuit_breakers"] == {"thresholds": [{"max_requests": 99}]}
    v3 = clusters[f"outbound|7070|v3|{FQDN}"]
    assert v3.lb_policy == cluster_pb2.Cluster.MAGLEV and v3.maglev_lb_config.table_size.value == 65537
    lc = clusters[f"outbound|7070|lc|{FQDN}"]
    assert lc.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST and not lc.HasField("least_request_lb_config")
    assert _d(lc)["circuit_breakers"] == {"thresholds": [{"max_retries": 4}]}


def test_cookie_hash_policy_with_attributes_on_routes_to_hashed_subset() -> None:
    vs = f"""
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop}}
spec:
  hosts: [shop]
  http: [{{route: [{{destination: {{host: shop, subset: v3}}}}]}}]
"""
    with ControlPlane(SERVICES + vs + DR) as plane, AdsClient(plane.address) as ads:
        ads.send(RDS, [ROUTE_7070])
        (route,) = decode(ads.recv())[ROUTE_7070].virtual_hosts[0].routes
    action = _d(route)["route"]
    assert action["hash_policy"] == [{"cookie": {"name": "s", "ttl": "0s", "attributes": [{"name": "SameSite", "value": "Strict"}]}}]
    assert "retry_host_predicate" not in action["retry_policy"]  # consistent hash: no previous_hosts


# --------------------------------------------------------------------------- EDS locality


def _eds(yaml_text: str, cluster: str, locality: Dict[str, str], labels: Dict[str, str] | None = None) -> List[Dict]:
    meta = {"LABELS": labels} if labels else None
    with ControlPlane(SERVICES + yaml_text) as plane, AdsClient(plane.address, locality=locality, metadata=meta) as ads:
        assert plane.server.snapshot.config.skipped == []
        ads.send(EDS, [cluster])
        cla = decode(ads.recv())[cluster]
    return [
        {"locality": "/".join((g.locality.region, g.locality.zone, g.locality.sub_zone)), "priority": g.priority,
         "weight": g.load_balancing_weight.value,
         "endpoints": [e.endpoint.address.socket_address.address for e in g.lb_endpoints]}
        for g in cla.endpoints
    ]


def _dr(traffic_policy: str) -> str:
    return f"""
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: shop}}
spec:
  host: shop
  trafficPolicy: {traffic_policy}
"""


R1Z1S1 = {"region": "r1", "zone": "z1", "sub_zone": "s1"}


def _prio(groups: List[Dict]) -> Dict[str, int]:
    return {g["locality"]: g["priority"] for g in groups}


def test_eds_failover_priorities_need_outlier_detection() -> None:
    plain = _eds(_dr("{loadBalancer: {simple: ROUND_ROBIN}}"), ROUTE_7070, R1Z1S1)
    assert set(_prio(plain).values()) == {0}
    groups = _eds(_dr("{outlierDetection: {consecutive5xxErrors: 1}}"), ROUTE_7070, R1Z1S1)
    # mesh default localityLbSetting {enabled: true}: same sub-zone 0, zone 1, region 2, other regions 3
    assert _prio(groups) == {"r1/z1/s1": 0, "r1/z1/s2": 1, "r1/z2/s1": 2, "r2/z1/s1": 3, "r3/z1/s1": 3}
    assert [g["weight"] for g in groups] == [2, 3, 1, 1, 1]


def test_eds_failover_to_a_named_region_and_compaction() -> None:
    tp = "{outlierDetection: {consecutive5xxErrors: 1}, loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r3}]}}}"
    assert _prio(_eds(_dr(tp), ROUTE_7070, R1Z1S1)) == {"r1/z1/s1": 0, "r1/z1/s2": 1, "r1/z2/s1": 2, "r3/z1/s1": 3, "r2/z1/s1": 4}
    # a proxy in r2 is not covered by the rule: plain proximity
    assert _prio(_eds(_dr(tp), ROUTE_7070, {"region": "r2", "zone": "z9"})) == {
        "r1/z1/s1": 1, "r1/z1/s2": 1, "r1/z2/s1": 1, "r2/z1/s1": 0, "r3/z1/s1": 1}
    # enabled: false turns it off even with outlier detection
    off = "{outlierDetection: {consecutive5xxErrors: 1}, loadBalancer: {localityLbSetting: {enabled: false}}}"
    assert set(_prio(_eds(_dr(off), ROUTE_7070, R1Z1S1)).values()) == {0}


def test_eds_distribute_sets_locality_weights_for_matching_proxies_only() -> None:
    tp = '{loadBalancer: {localityLbSetting: {distribute: [{from: "r1/z1/*", to: {"r1/z1/*": 70, "r2/*": 30}}]}}}'
    groups = _eds(_dr(tp), ROUTE_7070, R1Z1S1)
    by_loc = {g["locality"]: g for g in groups}
    # r1/z1 holds weights 2 (s1) and 3 (s2): 70 split 2:3, rounded up; r2 gets 30; the rest lose their endpoints
    assert (by_loc["r1/z1/s1"]["weight"], by_loc["r1/z1/s2"]["weight"], by_loc["r2/z1/s1"]["weight"]) == (28, 42, 30)
    assert by_loc["r1/z2/s1"]["endpoints"] == [] and by_loc["r3/z1/s1"]["endpoints"] == []
    assert set(_prio(groups).values()) == {0}
    other = _eds(_dr(tp), ROUTE_7070, {"region": "r3"})
    assert [g["weight"] for g in other] == [2, 3, 1, 1, 1] and all(g["endpoints"] for g in other)
    with ControlPlane(SERVICES + _dr(tp)) as plane, AdsClient(plane.address) as ads:
        ads.send(CDS, [ROUTE_7070])
        assert decode(ads.recv())[ROUTE_7070].common_lb_config.HasField("locality_weighted_lb_config")


def test_eds_failover_priority_labels_split_localities() -> None:
    tp = "{outlierDetection: {consecutive5xxErrors: 1}, loadBalancer: {localityLbSetting: {failoverPriority: [rack]}}}"
    groups = _eds(_dr(tp), ROUTE_7070, R1Z1S1, labels={"rack": "b"})
    # each locality is split by label match (same rack first); other localities' endpoints have no rack
    assert [(g["endpoints"], g["priority"], g["weight"]) for g in groups] == [
        (["127.0.0.3"], 0, 1), (["127.0.0.2"], 1, 1), (["127.0.0.4"], 1, 3), (["127.0.0.5"], 1, 1),
        (["127.0.0.6"], 1, 1), (["127.0.0.7"], 1, 1),
    ]
    # label=value overrides the proxy's own value; without proxy labels nothing changes
    tp2 = tp.replace("[rack]", "[rack=a]")
    groups = _eds(_dr(tp2), ROUTE_7070, R1Z1S1, labels={"rack": "b"})
    assert [(g["endpoints"], g["priority"]) for g in groups][:2] == [(["127.0.0.2"], 0), (["127.0.0.3"], 1)]
    assert set(_prio(_eds(_dr(tp), ROUTE_7070, R1Z1S1)).values()) == {0}


def test_subset_outlier_detection_enables_failover_for_that_subset_only() -> None:
    dr = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shop}
spec:
  host: shop
  subsets:
  - {name: v2, labels: {version: v2}, trafficPolicy: {outlierDetection: {consecutive5xxErrors: 2}}}
  - {name: v3, labels: {version: v3}}
"""
    assert _prio(_eds(dr, f"outbound|7070|v2|{FQDN}", R1Z1S1)) == {"r1/z1/s2": 0, "r1/z2/s1": 1}
    assert set(_prio(_eds(dr, f"outbound|7070|v3|{FQDN}", R1Z1S1)).values()) == {0}


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("http, reason", [
    ("{route: [{destination: {host: a}}], redirect: {uri: /x}}", "route and redirect cannot be used together"),
    ("{redirect: {uri: /x}, directResponse: {status: 200}}", "redirect and directResponse cannot be used together"),
    ("{redirect: {uri: /x, redirectCode: 305}}", "redirectCode: 305 is not one of"),
    ("{redirect: {port: 8080, derivePort: FROM_REQUEST_PORT}}", "only one of port or derivePort"),
    ("{directResponse: {body: {string: x}}}", "directResponse.status is required"),
    ("{directResponse: {status: 200, body: {bytes: '***'}}}", "not base64"),
    ("{route: [{destination: {host: a}}], rewrite: {uri: /a, uriRegexRewrite: {match: a, rewrite: b}}}", "only one of uri or uriRegexRewrite"),
    ("{route: [{destination: {host: a}}], rewrite: {uriRegexRewrite: {match: '(', rewrite: b}}}", "invalid regular expression"),
    ("{route: [{destination: {host: a}}], mirror: {host: b}, mirrors: [{destination: {host: c}}]}", "only one of mirror or mirrors"),
    ("{route: [{destination: {host: a}}], headers: {request: {set: {'bad header': x}}}}", "not a valid header name"),
    ("{route: [{destination: {host: a}}], headers: {request: {append: {x: y}}}}", "unknown field spec.http[0].headers.request.append"),
    ("{route: [{destination: {host: a}}], mirrorPercentage: {value: 150}}", "mirrorPercentage.value"),
    ("{route: [{destination: {host: a}}], fault: {abort: {httpStatus: 503, grpcStatus: UNAVAILABLE}}}", "only one of httpStatus, grpcStatus"),
    ("{route: [{destination: {host: a}}], fault: {abort: {grpcStatus: NOT_A_CODE}}}", "is not a gRPC status name"),
])
def test_invalid_virtual_service_actions_are_rejected(http: str, reason: str) -> None:
    text = f"""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bad}}
spec: {{hosts: [a], http: [{http}]}}
"""
    cfg = parse_yaml_text(text)
    assert cfg.virtual_services == [] and len(cfg.skipped) == 1 and reason in cfg.skipped[0], cfg.skipped


@pytest.mark.parametrize("policy, reason", [
    ("{loadBalancer: {localityLbSetting: {distribute: [{from: a/*, to: {b/*: 60}}]}}}", "weights must sum to 100"),
    ("{loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r1}]}}}", "from and to must differ"),
    ("{loadBalancer: {localityLbSetting: {distribute: [{from: a, to: {b: 100}}], failover: [{from: a, to: b}]}}}", "only one of distribute or failover"),
    ("{loadBalancer: {warmup: {aggression: 2}}}", "warmup.duration is required"),
    ("{loadBalancer: {warmup: {duration: 1s, aggression: 0.5}}}", "aggression"),
    ("{loadBalancer: {warmupDurationSecs: soon}}", "is not a duration"),
    ("{outlierDetection: {maxEjectionPercent: 101}}", "maxEjectionPercent: 101 is out of range"),
    ("{outlierDetection: {consecutive5xxErrors: -1}}", "consecutive5xxErrors: -1 is out of range"),
    ("{outlierDetection: {ejectionTime: 1s}}", "unknown field spec.trafficPolicy.outlierDetection.ejectionTime"),
    ("{connectionPool: {http: {http2MaxRequests: x}}}", "http2MaxRequests: expected an integer"),
    ("{connectionPool: {tcp: {maxConnection: 1}}}", "unknown field spec.trafficPolicy.connectionPool.tcp.maxConnection"),
])
def test_invalid_destination_rule_policies_are_rejected(policy: str, reason: str) -> None:
    text = f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: bad}}
spec: {{host: a, trafficPolicy: {policy}}}
"""
    cfg = parse_yaml_text(text)
    assert cfg.destination_rules == [] and len(cfg.skipped) == 1 and reason in cfg.skipped[0], cfg.skipped
