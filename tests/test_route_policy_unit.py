"""Route-policy decoding and per-call decisions, table driven (no network)."""

from __future__ import annotations

import collections
import re

import pytest
import xxhash
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2, wrappers_pb2

from meshpatch.routing.call import Call, apply_header_ops
from meshpatch.routing.matchers import PathMatcher
from meshpatch.routing.model import Route, RouteAction, RouteMatch
from meshpatch.routing.outcome import CONNECT_FAILURE, OK, RESET, TIMEOUT, Outcome
from meshpatch.routing.route_policy import HashPolicy, RetryPolicy, RoutePolicy
from meshpatch.routing.router import _request_hash
from meshpatch.routing.target import CompiledRoute
from meshpatch.xds.decode import decode_route_config
from meshpatch.xds.decode_policy import route_policy


def _decode(route: rc.Route, vhost_extra: object = None):
    config = route_pb2.RouteConfiguration(name="rc")
    vhost = config.virtual_hosts.add(name="vh", domains=["*"])
    if vhost_extra is not None:
        vhost_extra(vhost)
    vhost.routes.append(route)
    packed = any_pb2.Any()
    packed.Pack(config)
    return decode_route_config(packed)[1].virtual_hosts[0].routes[0]


def _base(prefix: str = "/") -> rc.Route:
    route = rc.Route(name="r")
    route.match.prefix = prefix
    route.route.cluster = "c"
    return route


def test_retry_policy_defaults_and_vhost_fallback() -> None:
    route = _base()
    route.route.retry_policy.retry_on = "5xx,unavailable,cancelled,bogus"
    policy = _decode(route).policy.retry
    assert policy.num_retries == 1 and policy.base_interval == 0.025 and policy.max_interval == 0.25
    assert policy.retry_on == {"5xx"} and policy.grpc_codes == {"UNAVAILABLE", "CANCELLED"}

    def vhost_retry(vhost: rc.VirtualHost) -> None:
        vhost.retry_policy.retry_on = "gateway-error"
        vhost.retry_policy.num_retries.value = 4

    inherited = _decode(_base(), vhost_retry).policy.retry
    assert inherited.retry_on == {"gateway-error"} and inherited.num_retries == 4


@pytest.mark.parametrize(
    "mutate,reason",
    [
        (lambda r: r.route.retry_policy.retry_back_off.max_interval.FromMilliseconds(10), "base_interval"),
        (lambda r: (r.route.retry_policy.retry_back_off.base_interval.FromMilliseconds(50),
                    r.route.retry_policy.retry_back_off.max_interval.FromMilliseconds(10)), "max_interval"),
        (lambda r: setattr(r.route.regex_rewrite.pattern, "regex", "(bad"), "invalid regex"),
        (lambda r: r.request_headers_to_add.add().header.CopyFrom(type(r.request_headers_to_add.add().header)(key=":path", value="x")), "cannot be mutated"),
    ],
)
def test_bad_policy_is_a_nack_naming_the_route(mutate: object, reason: str) -> None:
    from meshpatch.xds.decode import ResourceError

    route = _base()
    mutate(route)  # type: ignore[operator]
    with pytest.raises(ResourceError, match=reason) as info:
        _decode(route)
    assert "route r of virtual host 'vh'" in str(info.value)


def test_fault_percentages_and_unknown_filters_are_tolerated() -> None:
    from envoy.extensions.filters.http.fault.v3 import fault_pb2

    route = _base()
    fault = fault_pb2.HTTPFault()
    fault.abort.http_status = 503
    fault.abort.percentage.numerator = 25
    fault.abort.percentage.denominator = 1  # TEN_THOUSAND → 0.25 %
    fault.delay.fixed_delay.FromMilliseconds(100)
    fault.delay.percentage.numerator = 500_000
    fault.delay.percentage.denominator = 2  # MILLION → 50 %
    packed = any_pb2.Any()
    packed.Pack(fault)
    route.typed_per_filter_config["envoy.filters.http.fault"].CopyFrom(packed)
    cors = any_pb2.Any(type_url="type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy")
    route.typed_per_filter_config["envoy.filters.http.cors"].CopyFrom(cors)  # gRPC would NACK the whole config
    decoded = _decode(route).policy.fault
    assert decoded.abort_http == 503 and decoded.abort_fraction == pytest.approx(0.0025)
    assert decoded.delay == pytest.approx(0.1) and decoded.delay_fraction == pytest.approx(0.5)


def _call(policy: RoutePolicy, scheme: str = "http", path: str = "/api/v1/x?q=1", prefix: str = "/api/v1/",
          timeout: float = 0.0) -> Call:
    route = Route("r", RouteMatch(PathMatcher("prefix", prefix)), RouteAction("cluster", cluster="c", timeout=timeout),
                  policy)

    class Handle:
        name = "c"
        retried = 0

        def admit_retry(self) -> None:
            self.retried += 1
            return None

        def retry_finished(self) -> None:
            pass

    return Call(scheme, "svc", 80, "GET", path, {}, "svc:80", CompiledRoute(route, None), Handle(), None)


RETRY = RetryPolicy(retry_on=frozenset({"5xx"}), grpc_codes=frozenset({"UNAVAILABLE"}), num_retries=2,
                    base_interval=0.01, max_interval=0.1)


@pytest.mark.parametrize(
    "scheme,outcome,retry_on,expected",
    [
        ("http", Outcome(OK, 503), {"5xx"}, True),
        ("http", Outcome(OK, 404), {"5xx"}, False),
        ("http", Outcome(OK, 502), {"gateway-error"}, True),
        ("http", Outcome(OK, 500), {"gateway-error"}, False),
        ("http", Outcome(CONNECT_FAILURE), {"connect-failure"}, True),
        ("http", Outcome(RESET), {"connect-failure"}, False),
        ("http", Outcome(RESET), {"reset"}, True),
        ("http", Outcome(TIMEOUT), {"5xx"}, True),
        ("http", Outcome(OK, 409), {"retriable-4xx"}, True),
        ("grpc", Outcome(OK, grpc_status="UNAVAILABLE"), set(), True),
        ("grpc", Outcome(OK, grpc_status="INTERNAL"), set(), False),
    ],
)
def test_retry_conditions(scheme: str, outcome: Outcome, retry_on: set, expected: bool) -> None:
    policy = RoutePolicy(retry=RetryPolicy(retry_on=frozenset(retry_on), grpc_codes=frozenset({"UNAVAILABLE"})))
    assert _call(policy, scheme).retriable(outcome) is expected


def test_retry_budget_backoff_and_deadline() -> None:
    call = _call(RoutePolicy(retry=RETRY))
    first = call.retry_delay(Outcome(OK, 503))
    second = call.retry_delay(Outcome(OK, 503))
    assert 0 <= first <= 0.01 and 0 <= second <= 0.02
    assert call.retry_delay(Outcome(OK, 503)) is None  # num_retries exhausted
    assert call.handle.retried == 2
    expired = _call(RoutePolicy(retry=RETRY), timeout=0.000001)
    assert expired.retry_delay(Outcome(OK, 503)) is None  # no retry past the route timeout


def test_rewrites_and_redirect_location() -> None:
    from meshpatch.routing.route_policy import Redirect

    call = _call(RoutePolicy(prefix_rewrite="/v2/"))
    assert call.rewritten_path() == "/v2/x?q=1"
    call = _call(RoutePolicy(regex_rewrite=(re.compile("^/api/v1/(.*)$"), r"/\1/index")))
    assert call.rewritten_path() == "/x/index?q=1"
    call = _call(RoutePolicy(redirect=Redirect(scheme="https", prefix_rewrite="/new/", code=308)))
    assert call.redirect_location() == "https://svc/new/x?q=1"
    call = _call(RoutePolicy(redirect=Redirect(host="other", port=8080, path="/p", strip_query=True)))
    assert call.redirect_location() == "http://other:8080/p"


def test_header_mutation_actions() -> None:
    headers = {"a": "1", "b": "2", "gone": "x"}
    apply_header_ops(headers, (("a", "3", 0), ("b", "4", 1), ("c", "5", 1), ("d", "6", 3), ("a", "7", 2)), ("gone",))
    assert headers == {"a": "7", "b": "2", "c": "5"}


def test_request_hash_follows_envoy_combination_and_terminal() -> None:
    policies = (HashPolicy("header", "x-user"), HashPolicy("query", "id"))
    h1 = xxhash.xxh64_intdigest(b"alice")
    h2 = xxhash.xxh64_intdigest(b"7")
    combined = (((h1 << 1) | (h1 >> 63)) & 0xFFFFFFFFFFFFFFFF) ^ h2
    assert _request_hash(policies, {"x-user": "alice"}, "http", "GET", "/p?id=7", "svc:80", "10.0.0.1") == combined
    terminal = (HashPolicy("header", "x-user", terminal=True), HashPolicy("query", "id"))
    assert _request_hash(terminal, {"x-user": "alice"}, "http", "GET", "/p?id=7", "svc:80", "10.0.0.1") == h1
    assert _request_hash(policies, {}, "http", "GET", "/p", "svc:80", "10.0.0.1") is None
    cookie = (HashPolicy("cookie", "session"),)
    assert _request_hash(cookie, {"cookie": "a=1; session=xyz"}, "http", "GET", "/", "svc:80", "ip") == xxhash.xxh64_intdigest(b"xyz")
    assert _request_hash(cookie, {"cookie": "session=xyz"}, "grpc", "POST", "/S/M", "svc:80", "ip") is None
    source = (HashPolicy("source_ip"),)
    assert _request_hash(source, None, "grpc", "POST", "/S/M", "svc:80", "10.0.0.1") == xxhash.xxh64_intdigest(b"10.0.0.1")


def test_fault_draws_are_independent_and_max_active_is_enforced() -> None:
    from meshpatch.routing.route_policy import Fault

    call = _call(RoutePolicy(fault=Fault(delay=0.01, delay_fraction=0.5, abort_http=503, abort_fraction=0.5)))
    kinds = collections.Counter()
    for _ in range(4000):
        decision = call.fault()
        if decision is None:
            kinds["none"] += 1
            continue
        kinds[(bool(decision.delay), decision.abort_http is not None)] += 1
        decision.done()
    for key in ("none", (True, False), (False, True), (True, True)):
        assert 850 < kinds[key] < 1150, kinds
    limited = _call(RoutePolicy(fault=Fault(abort_http=503, abort_fraction=1.0, max_active=2)))
    held = [limited.fault(), limited.fault()]
    assert all(held) and limited.fault() is None
    held[0].done()
    assert limited.fault() is not None
