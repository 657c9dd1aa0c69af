"""Table-driven checks of matchers, virtual-host selection and the LB tree."""

from __future__ import annotations

import collections

import pytest
from scipy.stats import chisquare

from meshpatch.routing.domains import select_virtual_host
from meshpatch.routing.lb import EmptyPicker, RoundRobin, build_picker
from meshpatch.routing.matchers import HeaderMatcher, PathMatcher, StringMatcher
from meshpatch.routing.model import Endpoint, EndpointsConfig, LocalityEndpoints, VirtualHost


@pytest.mark.parametrize(
    "kind,value,case,path,expected",
    [
        ("prefix", "/", True, "/anything", True),
        ("prefix", "", True, "/x", True),
        ("prefix", "/api", True, "/api/v1", True),
        ("prefix", "/api", True, "/API/v1", False),
        ("prefix", "/api", False, "/API/v1", True),
        ("path", "/exact", True, "/exact", True),
        ("path", "/exact", True, "/exact/", False),
        ("path", "/Exact", False, "/exact", True),
        ("regex", r"/v[0-9]+/.*", True, "/v12/x", True),
        ("regex", r"/v[0-9]+", True, "/v12/x", False),  # full match, not search
        ("regex", r"/abc", False, "/ABC", True),
        ("prefix", "/echo.Echo/", True, "/echo.Echo/Call", True),
    ],
)
def test_path_matcher(kind: str, value: str, case: bool, path: str, expected: bool) -> None:
    assert PathMatcher(kind, value, case).matches(path) is expected


@pytest.mark.parametrize(
    "matcher,value,expected",
    [
        (HeaderMatcher("x-user", "string", StringMatcher("exact", "alice")), "alice", True),
        (HeaderMatcher("x-user", "string", StringMatcher("exact", "alice")), "bob", False),
        (HeaderMatcher("x-user", "string", StringMatcher("exact", "alice")), None, False),
        (HeaderMatcher("x-user", "string", StringMatcher("exact", "alice"), invert=True), "bob", True),
        (HeaderMatcher("x-user", "string", StringMatcher("exact", "alice"), invert=True), None, False),
        (HeaderMatcher("x-user", "string", StringMatcher("exact", "alice"), invert=True, treat_missing_as_empty=True), None, True),
        (HeaderMatcher("x-user", "string", StringMatcher("exact", "ALICE", ignore_case=True)), "alice", True),
        (HeaderMatcher("x-user", "string", StringMatcher("prefix", "al")), "alice", True),
        (HeaderMatcher("x-user", "string", StringMatcher("suffix", "ce")), "alice", True),
        (HeaderMatcher("x-user", "string", StringMatcher("contains", "lic")), "alice", True),
        (HeaderMatcher("x-user", "string", StringMatcher("contains", "xyz")), "alice", False),
        (HeaderMatcher("x-user", "string", StringMatcher("regex", "a.*e")), "alice", True),
        (HeaderMatcher("x-user", "string", StringMatcher("regex", "a.*e")), "alicex", False),
        (HeaderMatcher("x-user", "present", present=True), "", True),
        (HeaderMatcher("x-user", "present", present=True), None, False),
        (HeaderMatcher("x-user", "present", present=False), None, True),
        (HeaderMatcher("x-user", "present", present=True, invert=True), None, True),
        (HeaderMatcher("x-n", "range", range_=(10, 20)), "10", True),
        (HeaderMatcher("x-n", "range", range_=(10, 20)), "20", False),
        (HeaderMatcher("x-n", "range", range_=(10, 20)), "abc", False),
    ],
)
def test_header_matcher(matcher: HeaderMatcher, value: object, expected: bool) -> None:
    assert matcher.matches(value) is expected


def test_bad_regex_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="invalid regex"):
        PathMatcher("regex", "(unclosed", True)


def _vh(name: str, *domains: str) -> VirtualHost:
    return VirtualHost(name, domains, ())


@pytest.mark.parametrize(
    "host,port,expected",
    [
        ("echo.default.svc.cluster.local", 7070, "exact-port"),
        ("echo", 7070, "short"),
        ("ECHO", 7070, "short"),
        ("other.default.svc.cluster.local", 7070, "suffix-long"),
        ("x.svc.cluster.local", 7070, "suffix-short"),
        ("api-gateway", 80, "prefix"),
        ("nothing.example", 80, "star"),
    ],
)
def test_virtual_host_specificity(host: str, port: int, expected: str) -> None:
    vhosts = [
        _vh("star", "*"),
        _vh("prefix", "api-*"),
        _vh("suffix-short", "*.svc.cluster.local:7070"),
        _vh("suffix-long", "*.default.svc.cluster.local:7070"),
        _vh("exact-port", "echo.default.svc.cluster.local:7070", "echo.default.svc.cluster.local"),
        _vh("short", "echo:7070", "echo"),
    ]
    assert select_virtual_host(vhosts, host, port).name == expected  # type: ignore[union-attr]


def test_virtual_host_without_port_form() -> None:
    vhosts = [_vh("a", "reviews")]
    assert select_virtual_host(vhosts, "reviews", 9080).name == "a"  # type: ignore[union-attr]
    assert select_virtual_host([_vh("b", "other")], "reviews", 9080) is None


def _ep(addr: str, health: int = 1) -> Endpoint:
    return Endpoint(addr, 80, health)


def test_round_robin_is_even_and_cyclic() -> None:
    picker = RoundRobin([_ep("a"), _ep("b"), _ep("c")])
    seq = [picker.pick().address for _ in range(9)]  # type: ignore[union-attr]
    assert collections.Counter(seq) == {"a": 3, "b": 3, "c": 3}
    assert seq[:3] == seq[3:6]


def test_unhealthy_endpoints_are_skipped() -> None:
    cla = EndpointsConfig("c", (LocalityEndpoints("r/z/s", 1, 0, (_ep("a", 2), _ep("b", 0), _ep("c", 3), _ep("d", 1))),))
    picker = build_picker(cla)
    assert {picker.pick().address for _ in range(20)} == {"b", "d"}  # type: ignore[union-attr]


def test_lowest_ready_priority_wins_and_fails_over() -> None:
    p0 = LocalityEndpoints("r/a/", 1, 0, (_ep("p0", 2),))  # unhealthy only
    p1 = LocalityEndpoints("r/b/", 1, 1, (_ep("p1"),))
    p2 = LocalityEndpoints("r/c/", 1, 2, (_ep("p2"),))
    assert build_picker(EndpointsConfig("c", (p2, p1, p0))).pick().address == "p1"  # type: ignore[union-attr]
    healthy_p0 = LocalityEndpoints("r/a/", 1, 0, (_ep("p0"),))
    assert build_picker(EndpointsConfig("c", (p2, p1, healthy_p0))).pick().address == "p0"  # type: ignore[union-attr]
    assert isinstance(build_picker(EndpointsConfig("c", (p0,))), EmptyPicker)
    assert build_picker(EndpointsConfig("c", ())).pick() is None


def test_locality_weights_chi_square() -> None:
    a = LocalityEndpoints("r/a/", 1, 0, (_ep("a1"), _ep("a2")))
    b = LocalityEndpoints("r/b/", 3, 0, (_ep("b1"),))
    picker = build_picker(EndpointsConfig("c", (a, b)))
    n = 8000
    counts = collections.Counter(picker.pick().address for _ in range(n))  # type: ignore[union-attr]
    observed = [counts["a1"], counts["a2"], counts["b1"]]
    expected = [n * 0.125, n * 0.125, n * 0.75]
    assert chisquare(observed, expected).pvalue > 0.001, observed


def test_zero_weight_locality_is_skipped_when_others_weighted() -> None:
    a = LocalityEndpoints("r/a/", 0, 0, (_ep("a"),))
    b = LocalityEndpoints("r/b/", 5, 0, (_ep("b"),))
    picker = build_picker(EndpointsConfig("c", (a, b)))
    assert {picker.pick().address for _ in range(50)} == {"b"}  # type: ignore[union-attr]


from hypothesis import given, settings, strategies as st  # noqa: E402

from meshpatch.routing.model import Route, RouteAction, RouteMatch  # noqa: E402
from meshpatch.routing.target import CompiledRoute, RouteTable  # noqa: E402

_segments = st.sampled_from(["", "/", "/a", "/a/", "/ab", "/a/b", "/A", "/b", "/a/b/c"])
_matchers = st.one_of(
    st.builds(lambda v, c: PathMatcher("prefix", v, c), _segments, st.booleans()),
    st.builds(lambda v, c: PathMatcher("path", v or "/", c), _segments, st.booleans()),
    st.builds(lambda v: PathMatcher("regex", v), st.sampled_from(["/a.*", "/[ab]/.*", ".*c", "/A/?b?"])),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_matchers, min_size=0, max_size=30), st.lists(_segments, min_size=1, max_size=5))
def test_route_index_equals_linear_scan(matchers: list, paths: list) -> None:
    routes = tuple(
        CompiledRoute(Route(str(i), RouteMatch(m), RouteAction("cluster", cluster="c")), None)
        for i, m in enumerate(matchers)
    )
    table = RouteTable(routes)
    table.indexed = True  # force the index even for small tables
    for path in paths + ["/a/b/c/d", "/zzz"]:
        expected = [r.name for r in routes if r.path.matches(path)]
        assert [r.name for r in table.candidates(path)] == expected
