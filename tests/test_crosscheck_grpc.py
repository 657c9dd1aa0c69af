"""grpcio's native xDS client vs meshpatch: same xDS, same servers, same outcome.

For every feature grpcio's own client implements (xds-istio.md §1, §2, §5)
one table row: the Istio config (or raw Envoy fields where Istio has none),
what the pods do, the calls, and the comparison.  Each check first pins down
what grpcio itself does (so a row cannot pass because both sides failed the
same silly way), then holds meshpatch to it: the same routing decisions, the
same status codes, the same attempts seen by the servers, distributions that
a chi-square test cannot tell apart.  Harness: tests/support/crosscheck.py.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Dict, Iterator, List, Mapping, Optional, Sequence

import pytest
from google.protobuf import duration_pb2, wrappers_pb2

from envoy.config.cluster.v3 import outlier_detection_pb2
from envoy.config.route.v3 import route_pb2
from tests.support.crosscheck import (
    DOWN, MESHPATCH, NATIVE, Batch, Behaviour, Ep, Harness, Outcome, Row, both, chi2_fits, chi2_same,
)

ALL = "-".join  # readability helper for md_each keys


# --------------------------------------------------------------------------- config snippets


def subsets(*pods: str) -> str:
    return "subsets:\n" + "".join(f"- {{name: {p}, labels: {{pod: {p}}}}}\n" for p in pods)


def to(pod: str, weight: Optional[int] = None) -> str:
    w = f", weight: {weight}" if weight is not None else ""
    return f"{{destination: {{host: {{host}}, subset: {pod}}}{w}}}"


def eps(*pods: str, **kw: object) -> List[Ep]:
    return [Ep(p, **kw) for p in pods]  # type: ignore[arg-type]


# --------------------------------------------------------------------------- checks


def routed(*expected: str):
    """Batch i: every call answered by pod ``expected[i]`` (or ending in ``error:CODE``)."""

    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        for i, exp in enumerate(expected):
            want = exp if exp.startswith("error:") else f"ok:{exp}"
            n = len(native[i].results)
            assert native[i].codes == Counter({want: n}), f"grpcio, batch {i}: {dict(native[i].codes)}, expected all {want}"
            assert mesh[i].codes == native[i].codes, f"batch {i}: meshpatch {dict(mesh[i].codes)} vs grpcio {dict(native[i].codes)}"

    return check


def split(expected: Mapping[str, float], batch: int = 0):
    """Calls spread over pods as ``expected`` (shares), for both clients, and alike."""

    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        counts = {}
        for tag, outs in both(native, mesh):
            c = Counter({k[3:]: v for k, v in outs[batch].codes.items() if k.startswith("ok:")})
            assert sum(c.values()) == len(outs[batch].results), f"{tag}: failures {dict(outs[batch].codes)}"
            chi2_fits(c, expected, f"{tag} split")
            counts[tag] = c
        chi2_same(counts[NATIVE], counts[MESHPATCH], "split")

    return check


def mesh_split(expected: Mapping[str, float], batch: int = 0):
    """meshpatch's calls spread over pods as ``expected`` (a deliberate difference)."""

    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        c = Counter({k[3:]: v for k, v in mesh[batch].codes.items() if k.startswith("ok:")})
        assert sum(c.values()) == len(mesh[batch].results), f"meshpatch: failures {dict(mesh[batch].codes)}"
        chi2_fits(c, expected, "meshpatch split")

    return check


def mesh_attempts(expected_tries: int, result: str):
    """meshpatch: every request took ``expected_tries`` attempts and ended in ``result``."""

    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        o = mesh[0]
        n = len(o.results)
        want = result if result.startswith("error:") else "ok"
        codes = Counter(r if r.startswith("error:") else "ok" for r in o.codes.elements())
        assert codes == Counter({want: n}), f"meshpatch: {dict(o.codes)}, expected all {result}"
        assert o.tries == Counter({expected_tries: n}), f"meshpatch: attempts per request {dict(o.tries)}"

    return check


def attempts(expected_tries: int, result: str, served_total: Optional[int] = None):
    """Every request took ``expected_tries`` attempts (as the pods saw them) and ended in ``result``."""

    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        n = len(native[0].results)
        want = result if result.startswith("error:") else None
        for tag, outs in both(native, mesh):
            o = outs[0]
            codes = Counter(r if r.startswith("error:") else "ok" for r in o.codes.elements())
            assert codes == Counter({want or "ok": n}), f"{tag}: {dict(o.codes)}, expected all {result}"
            if served_total is not None:
                assert sum(o.served.values()) == served_total, f"{tag}: pods saw {dict(o.served)}"
            else:
                assert o.tries == Counter({expected_tries: n}), f"{tag}: attempts per request {dict(o.tries)}, expected {expected_tries}"

    return check


def codes_share(expected: Mapping[str, float], servers_see_only_ok: bool = True):
    """Status codes in ``expected`` shares (chi-square), alike for both; aborted calls never reach a pod."""

    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        counts = {}
        for tag, outs in both(native, mesh):
            c = Counter(r if r.startswith("error:") else "ok" for r in outs[0].codes.elements())
            chi2_fits(c, expected, f"{tag} status codes")
            if servers_see_only_ok:
                assert sum(outs[0].served.values()) == c["ok"], f"{tag}: pods saw {dict(outs[0].served)} for {dict(c)}"
            counts[tag] = c
        chi2_same(counts[NATIVE], counts[MESHPATCH], "status codes")

    return check


def delayed(share: float, at_least_ms: float, result: str = "ok"):
    """``share`` of the calls took at least ``at_least_ms`` (and no call failed)."""

    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        counts = {}
        for tag, outs in both(native, mesh):
            o = outs[0]
            assert all(r.startswith(result) for r, _ in o.results), f"{tag}: {dict(o.codes)}"
            slow = sum(ms >= at_least_ms for ms in o.latencies)
            c = Counter({"slow": slow, "fast": len(o.results) - slow})
            if share in (0.0, 1.0):
                assert c["slow" if share else "fast"] == len(o.results), f"{tag}: latencies {o.latencies}"
            else:
                chi2_fits(c, {"slow": share, "fast": 1 - share}, f"{tag} delayed calls")
            counts[tag] = c
        chi2_same(counts[NATIVE], counts[MESHPATCH], "delayed calls")

    return check


def deadline(code: str, low_ms: float, high_ms: float, native_low_ms: float = 0.0):
    """All calls end in ``code`` within [low_ms, high_ms].  grpcio times
    max_stream_duration from a cycle-counter call start that is off by a
    per-process constant (0 to >2 s measured on this VM), so its calls may end
    early: only the upper bound holds for it unless ``native_low_ms`` is given."""

    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        for tag, outs in both(native, mesh):
            o = outs[0]
            low = native_low_ms if o.client == NATIVE else low_ms
            assert o.codes == Counter({code: len(o.results)}), f"{tag}: {dict(o.codes)}, expected all {code}"
            assert all(low <= ms <= high_ms for ms in o.latencies), f"{tag}: latencies {o.latencies} not in [{low}, {high_ms}] ms"

    return check


def ring_hash(keys: int, same_hosts_as_grpcio: bool):
    """Every key sticks to one pod; keys spread over several pods; optionally the
    very same pod per key as grpcio (same ring, same xxHash)."""

    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        maps = {}
        for tag, outs in both(native, mesh):
            o = outs[0]
            by_key: Dict[int, set] = defaultdict(set)
            for i, (r, _) in enumerate(o.results):
                assert r.startswith("ok:"), f"{tag}: {dict(o.codes)}"
                by_key[i % keys].add(r[3:])
            loose = {k: v for k, v in by_key.items() if len(v) > 1}
            assert not loose, f"{tag}: keys not sticky: {loose}"
            maps[tag] = {k: next(iter(v)) for k, v in by_key.items()}
            assert len(set(maps[tag].values())) >= 2, f"{tag}: every key on one pod {maps[tag]}"
        if same_hosts_as_grpcio:
            differ = {k: (maps[NATIVE][k], maps[MESHPATCH][k]) for k in maps[NATIVE] if maps[NATIVE][k] != maps[MESHPATCH][k]}
            assert not differ, f"keys on other pods than grpcio's (grpcio, meshpatch): {differ}"
        else:
            chi2_same(Counter(maps[NATIVE].values()), Counter(maps[MESHPATCH].values()), "keys per pod")

    return check


def circuit_breaker(ok: int, dropped: int):
    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        for tag, outs in both(native, mesh):
            c = Counter(r if r.startswith("error:") else "ok" for r in outs[0].codes.elements())
            assert c == Counter({"ok": ok, "error:UNAVAILABLE": dropped}), f"{tag}: {dict(outs[0].codes)}"
            assert sum(outs[0].served.values()) == ok, f"{tag}: dropped calls reached a pod: {dict(outs[0].served)}"

    return check


def ejected(bad: str):
    """After the first batch and a pause, the failing pod gets nothing and no call fails."""

    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        for tag, outs in both(native, mesh):
            before, after = outs[0], outs[-1]
            assert before.served[bad] > 0, f"{tag}: {bad} got no calls before ejection {dict(before.served)}"
            assert after.served[bad] == 0 and all(r.startswith("ok:") for r, _ in after.results), (
                f"{tag}: after ejection {bad} still served {after.served[bad]}; results {dict(after.codes)}")

    return check


def backoff_like_grpcio(base_ms: float, result_check):
    """grpcio (C-core) waits base x 2^(n-1) with +/-20 % jitter before retry n, so
    every first retry comes 0.8-1.2 x base after the first attempt (plus a round
    trip).  Envoy-style full jitter (uniform in [0, base]) lands below 0.8 x base
    80 % of the time: 12 requests all inside the band by chance is 0.2^12."""

    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        result_check(native, mesh)
        for tag, outs in both(native, mesh):
            gaps = sorted(round(g[0]) for g in outs[0].retry_gaps_ms if g)
            assert len(gaps) == len(outs[0].results), f"{tag}: not every request was retried: {gaps}"
            outside = [g for g in gaps if not 0.8 * base_ms - 5 <= g <= 1.2 * base_ms + 80]
            assert not outside, f"{tag}: first-retry gaps {gaps} ms outside 0.8-1.2 x {base_ms:.0f} ms"

    return check


def mean_latency(low_ms: float, high_ms: float, result_check):
    def check(native: List[Outcome], mesh: List[Outcome]) -> None:
        result_check(native, mesh)
        for tag, outs in both(native, mesh):
            lat = outs[0].latencies
            mean = sum(lat) / len(lat)
            assert low_ms <= mean <= high_ms, f"{tag}: mean latency {mean:.0f} ms not in [{low_ms}, {high_ms}]"

    return check


# --------------------------------------------------------------------------- raw Envoy patches


def _rds(fn):
    """A patch for this row's RouteConfiguration: ``fn(routes_by_name)``."""

    def patch(type_url: str, msg) -> None:
        if isinstance(msg, route_pb2.RouteConfiguration):
            for vh in msg.virtual_hosts:
                fn({r.name: r for r in vh.routes})

    return patch


def _string_matchers(routes) -> None:
    routes["suffix"].match.headers[0].string_match.suffix = "-tail"
    routes["contains"].match.headers[0].string_match.contains = "mid"
    ic = routes["ignore-case"].match.headers[0]
    ic.string_match.exact, ic.string_match.ignore_case = "MiXeD", True
    rng = routes["range"].match.headers[0]
    rng.range_match.start, rng.range_match.end = 10, 20
    inv = routes["not-in-range"].match.headers[0]
    inv.range_match.start, inv.range_match.end = 10, 20
    inv.invert_match = True


def _outlier(**fields: object):
    def patch(type_url: str, msg) -> None:
        if type_url.endswith("Cluster"):
            od = outlier_detection_pb2.OutlierDetection(
                interval=duration_pb2.Duration(seconds=1), base_ejection_time=duration_pb2.Duration(seconds=30),
                max_ejection_percent=wrappers_pb2.UInt32Value(value=50),
            )
            for k, v in fields.items():
                getattr(od, k).value = v
            msg.outlier_detection.CopyFrom(od)

    return patch


# --------------------------------------------------------------------------- rows

P3 = ("p1", "p2", "p3")
# Everything istiod sends (or we add for meshpatch) that gRPC does not implement.
EXTRAS_DR = """
trafficPolicy:
  loadBalancer: {simple: ROUND_ROBIN, warmupDurationSecs: 10s, localityLbSetting: {distribute: [{from: "r1/*", to: {"r1/*": 100}}]}}
  connectionPool: {tcp: {maxConnections: 100, connectTimeout: 2s}, http: {http1MaxPendingRequests: 50, maxRetries: 5}}
  outlierDetection: {consecutive5xxErrors: 50, consecutiveGatewayErrors: 50, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 10}
""" + subsets("p1", "p2")
EXTRAS_VS = f"""
- name: moved
  match: [{{uri: {{exact: /echo.Echo/Moved}}}}]
  redirect: {{uri: /elsewhere, authority: other.example}}
- name: canned
  match: [{{uri: {{exact: /echo.Echo/Canned}}}}]
  directResponse: {{status: 200, body: {{string: canned}}}}
- name: main
  headers: {{request: {{set: {{x-set: "1"}}, remove: [x-drop]}}, response: {{add: {{x-resp: "1"}}}}}}
  rewrite: {{uri: /rewritten/, authority: rewritten.example}}
  mirror: {{host: {{host}}, subset: p2}}
  mirrorPercentage: {{value: 50}}
  retries: {{attempts: 2, perTryTimeout: 5s, retryOn: "unavailable,5xx,reset", retryRemoteLocalities: true, retryIgnorePreviousHosts: false}}
  route: [{{destination: {{host: {{host}}, subset: p1}}, headers: {{request: {{add: {{x-dst: "1"}}}}}}}}]
"""
REST = "- route: [" + to("p6") + "]"
UNAVAILABLE = Behaviour(fail="UNAVAILABLE")

ROWS: List[Row] = [
    # --- path matching (A28, case-insensitive since 1.34)
    Row("path-prefix", eps("p1", "p2"), dr_spec=subsets("p1", "p2"), vs_http=f"""
- match: [{{uri: {{prefix: /echo.Echo/}}}}]
  route: [{to("p1")}]
- route: [{to("p2")}]
""", batches=[Batch(10), Batch(10, method="/other.Svc/Call"), Batch(10, method="/echo.EchoX/Call")],
        check=routed("p1", "p2", "p2")),
    Row("path-exact-regex", eps("p1", "p2", "p3"), dr_spec=subsets("p1", "p2", "p3"), vs_http=f"""
- match: [{{uri: {{exact: /echo.Echo/Exact}}}}]
  route: [{to("p1")}]
- match: [{{uri: {{regex: "/echo\\\\.Echo/Re[0-9]+"}}}}]
  route: [{to("p2")}]
- route: [{to("p3")}]
""", batches=[Batch(10, method="/echo.Echo/Exact"), Batch(10, method="/echo.Echo/Re42"),
              Batch(10, method="/echo.Echo/Re42x"), Batch(10, method="/echo.Echo/ExactX")],
        check=routed("p1", "p2", "p3", "p3")),
    Row("path-ignore-case", eps("p1", "p2", "p3"), dr_spec=subsets("p1", "p2", "p3"), vs_http=f"""
- match: [{{uri: {{prefix: /ECHO.echo/}}, ignoreUriCase: true}}]
  route: [{to("p1")}]
- match: [{{uri: {{exact: /OTHER.Svc/CALL}}, ignoreUriCase: true}}]
  route: [{to("p2")}]
- route: [{to("p3")}]
""", batches=[Batch(10), Batch(10, method="/other.svc/call"), Batch(10, method="/other.Svc/Call2")],
        check=routed("p1", "p2", "p3")),
    # --- header matching (A28, A63)
    Row("headers-istio", eps("p1", "p2", "p3", "p4", "p5", "p6"), dr_spec=subsets("p1", "p2", "p3", "p4", "p5", "p6"), vs_http=f"""
- match: [{{headers: {{x-exact: {{exact: yes-exact}}}}}}]
  route: [{to("p1")}]
- match: [{{headers: {{x-prefix: {{prefix: pre}}}}}}]
  route: [{to("p2")}]
- match: [{{headers: {{x-regex: {{regex: "v[0-9]+"}}}}}}]
  route: [{to("p3")}]
- match: [{{headers: {{x-present: {{regex: "*"}}}}}}]
  route: [{to("p4")}]
- match: [{{headers: {{x-gated: {{exact: "1"}}}}, withoutHeaders: {{x-gate: {{exact: closed}}}}}}]
  route: [{to("p5")}]
{REST}
""", batches=[Batch(5, md=[("x-exact", "yes-exact")]), Batch(5, md=[("x-exact", "yes-exactly")]),
              Batch(5, md=[("x-prefix", "prefixed")]), Batch(5, md=[("x-regex", "v12")]), Batch(5, md=[("x-regex", "v12a")]),
              Batch(5, md=[("x-present", "")]), Batch(5, md=[("x-gated", "1"), ("x-gate", "open")]),
              Batch(5, md=[("x-gated", "1"), ("x-gate", "closed")])],
        check=routed("p1", "p6", "p2", "p3", "p6", "p4", "p5", "p6")),
    Row("headers-missing-inverted", eps("p1", "p2"), dr_spec=subsets("p1", "p2"), vs_http=f"""
- match: [{{headers: {{x-gated: {{exact: "1"}}}}, withoutHeaders: {{x-gate: {{exact: closed}}}}}}]
  route: [{to("p1")}]
- route: [{to("p2")}]
""", batches=[Batch(5, md=[("x-gated", "1")])], check=routed("p2")),  # gRPC: a missing header never matches, inverted or not
    Row("headers-string-matchers", eps("p1", "p2", "p3", "p4", "p5", "p6"), dr_spec=subsets("p1", "p2", "p3", "p4", "p5", "p6"),
        vs_http="".join(f"""
- name: {name}
  match: [{{headers: {{{hdr}: {{exact: placeholder}}}}}}]
  route: [{to(pod)}]""" for name, hdr, pod in [("suffix", "x-suffix", "p1"), ("contains", "x-contains", "p2"),
                                              ("ignore-case", "x-ic", "p3"), ("range", "x-num", "p4"),
                                              ("not-in-range", "x-num2", "p5")]) + "\n" + REST,
        patch=_rds(_string_matchers),
        batches=[Batch(5, md=[("x-suffix", "has-tail")]), Batch(5, md=[("x-suffix", "tail-not")]),
                 Batch(5, md=[("x-contains", "somidx")]), Batch(5, md=[("x-ic", "mixed")]),
                 Batch(5, md=[("x-num", "15")]), Batch(5, md=[("x-num", "20")]), Batch(5, md=[("x-num", "abc")]),
                 Batch(5, md=[("x-num2", "5")]), Batch(5, md=[("x-num2", "12")])],
        check=routed("p1", "p6", "p2", "p3", "p4", "p6", "p6", "p5", "p6")),
    Row("pseudo-headers", eps("p1", "p2", "p3", "p4"), dr_spec=subsets("p1", "p2", "p3", "p4"), vs_http=f"""
- match: [{{method: {{exact: POST}}}}]
  route: [{to("p1")}]
- match: [{{authority: {{prefix: pseudo-headers}}}}]
  route: [{to("p2")}]
- match: [{{scheme: {{exact: http}}}}]
  route: [{to("p3")}]
- route: [{to("p4")}]
""", batches=[Batch(5)], check=routed("p4")),
    Row("query-params", eps("p1", "p2"), dr_spec=subsets("p1", "p2"), vs_http=f"""
- match: [{{queryParams: {{q: {{regex: "*"}}}}}}]
  route: [{to("p1")}]
- route: [{to("p2")}]
""", batches=[Batch(5, method="/echo.Echo/Call?q=1")], check=routed("p2")),
    Row("bin-and-content-type", eps("p1", "p2", "p3"), dr_spec=subsets("p1", "p2", "p3"), vs_http=f"""
- match: [{{headers: {{x-data-bin: {{regex: "*"}}}}}}]
  route: [{to("p1")}]
- match: [{{headers: {{content-type: {{exact: application/grpc}}}}}}]
  route: [{to("p2")}]
- route: [{to("p3")}]
""", batches=[Batch(5, md=[("x-data-bin", "\x00\x01")]), Batch(5)], check=routed("p2", "p2")),
    # --- what istiod sends (or we add) beyond gRPC's feature set must not disturb it
    Row("istio-extras-tolerated", eps("p1", "p2", locality="r1/z1/s1"), dr_spec=EXTRAS_DR, vs_http=EXTRAS_VS,
        batches=[Batch(10)], check=routed("p1")),
    Row("redirect-and-direct-response-routes", eps("p1", "p2", locality="r1/z1/s1"), dr_spec=EXTRAS_DR, vs_http=EXTRAS_VS,
        batches=[Batch(5, method="/echo.Echo/Moved"), Batch(5, method="/echo.Echo/Canned")],
        check=routed("error:UNAVAILABLE", "error:UNAVAILABLE")),  # gRPC: "matching route has inappropriate action"
    # --- weighted clusters (A28)
    Row("weighted-clusters", eps("p1", "p2"), dr_spec=subsets("p1", "p2"),
        vs_http=f"- route: [{to('p1', 20)}, {to('p2', 80)}]", batches=[Batch(500)], check=split({"p1": .2, "p2": .8})),
    Row("weighted-three-way", eps("p1", "p2", "p3", "p4"), dr_spec=subsets("p1", "p2", "p3", "p4"),
        vs_http=f"- route: [{to('p1', 50)}, {to('p2', 0)}, {to('p3', 30)}, {to('p4', 20)}]",
        batches=[Batch(500)], check=split({"p1": .5, "p2": 0.0, "p3": .3, "p4": .2})),
    # --- round robin, locality weights, priorities (A27, A56)
    Row("round-robin", eps(*P3), batches=[Batch(300)], check=split({"p1": 1 / 3, "p2": 1 / 3, "p3": 1 / 3})),
    Row("round-robin-endpoint-weights", [Ep("p1", weight=1), Ep("p2", weight=4)], batches=[Batch(300)],
        check=split({"p1": .5, "p2": .5}),
        divergence=mesh_split({"p1": .2, "p2": .8}),
        divergence_reason="grpcio's round robin ignores endpoint weights; meshpatch's is weighted, as Envoy's"),
    Row("locality-weights", [Ep("p1", locality="r1/z1/s1"), Ep("p2", locality="r1/z1/s1"), Ep("p3", locality="r1/z2/s1")],
        dr_spec='trafficPolicy: {loadBalancer: {localityLbSetting: {distribute: [{from: "r1/z1/*", to: {"r1/z1/*": 75, "r1/z2/*": 25}}]}}}',
        batches=[Batch(600)], check=split({"p1": .375, "p2": .375, "p3": .25})),
    Row("priority-local-first", [Ep("p1", locality="r1/z1/s1"), Ep("p2", locality="r1/z2/s1"), Ep("p3", locality="r2/z1/s1")],
        dr_spec="trafficPolicy: {outlierDetection: {consecutive5xxErrors: 5}}", batches=[Batch(30)], check=routed("p1")),
    Row("priority-failover", [Ep(DOWN, locality="r1/z1/s1"), Ep("p2", locality="r1/z2/s1"), Ep("p3", locality="r2/z1/s1")],
        dr_spec="trafficPolicy: {outlierDetection: {consecutive5xxErrors: 5}}", batches=[Batch(30)], check=routed("p2")),
    # --- retries on gRPC status codes (A44)
    Row("retry-unavailable", eps(*P3), behaviours={p: Behaviour("UNAVAILABLE", fail_first=2) for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 3, retryOn: unavailable}}",
        batches=[Batch(20)], check=attempts(3, "ok")),
    Row("retry-exhausted", eps(*P3), behaviours={p: UNAVAILABLE for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 2, retryOn: unavailable}}",
        batches=[Batch(20)], check=attempts(3, "error:UNAVAILABLE")),
    Row("retry-code-not-listed", eps(*P3), behaviours={p: UNAVAILABLE for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 3, retryOn: \"cancelled,5xx,503\"}}",
        batches=[Batch(20)], check=attempts(1, "error:UNAVAILABLE")),
    Row("retry-resource-exhausted", eps(*P3), behaviours={p: Behaviour("RESOURCE_EXHAUSTED", fail_first=1) for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 2, retryOn: resource-exhausted}}",
        batches=[Batch(20)], check=attempts(2, "ok")),
    Row("retry-mesh-default", eps(*P3), behaviours={p: Behaviour("UNAVAILABLE", fail_first=2) for p in P3},
        batches=[Batch(20)], check=attempts(3, "ok")),
    Row("retry-mesh-default-internal-not-retried", eps(*P3), behaviours={p: Behaviour("INTERNAL", fail_first=1) for p in P3},
        batches=[Batch(20)], check=attempts(1, "error:INTERNAL")),
    Row("retry-disabled", eps(*P3), behaviours={p: Behaviour("UNAVAILABLE", fail_first=1) for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 0}}",
        batches=[Batch(20)], check=attempts(1, "error:UNAVAILABLE")),
    Row("retry-capped-at-5-attempts", eps(*P3), behaviours={p: UNAVAILABLE for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 9, retryOn: unavailable}}",
        batches=[Batch(4)], check=attempts(5, "error:UNAVAILABLE")),
    Row("retry-backoff", eps(*P3), behaviours={p: Behaviour("UNAVAILABLE", fail_first=2) for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 2, retryOn: unavailable, backoff: 200ms}}",
        batches=[Batch(6, concurrency=3)], check=mean_latency(100, 1500, attempts(3, "ok"))),
    Row("retry-backoff-jitter", eps(*P3), behaviours={p: Behaviour("UNAVAILABLE", fail_first=2) for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 2, retryOn: unavailable, backoff: 200ms}}",
        batches=[Batch(12, concurrency=3)], check=backoff_like_grpcio(200, attempts(3, "ok"))),
    Row("retry-many-at-once", eps(*P3), behaviours={p: Behaviour("UNAVAILABLE", fail_first=1) for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 2, retryOn: unavailable, backoff: 100ms}}",
        batches=[Batch(12, concurrency=12)], check=attempts(2, "ok")),
    Row("retry-per-try-timeout-ignored", eps(*P3), behaviours={p: Behaviour(delay=0.3) for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 2, perTryTimeout: 100ms, retryOn: \"unavailable,deadline-exceeded\"}}",
        batches=[Batch(4, concurrency=4)], check=attempts(1, "ok"),
        divergence=mesh_attempts(3, "error:DEADLINE_EXCEEDED"),
        divergence_reason="grpcio ignores per_try_timeout (A44); meshpatch applies it, as Envoy does"),
    # --- fault injection (A33)
    Row("fault-abort-grpc-status", eps(*P3),
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  fault: {{abort: {{grpcStatus: UNAVAILABLE, percentage: {{value: 100}}}}}}",
        batches=[Batch(20)], check=attempts(0, "error:UNAVAILABLE", served_total=0)),
    Row("fault-abort-http-status", eps("p1"), vs_http="".join(f"""
- match: [{{headers: {{x-status: {{exact: "{status}"}}}}}}]
  fault: {{abort: {{httpStatus: {status}, percentage: {{value: 100}}}}}}
  route: [{{destination: {{host: {{host}}}}}}]""" for status in (503, 404, 429, 401, 403, 400)),
        batches=[Batch(3, md=[("x-status", str(s))]) for s in (503, 404, 429, 401, 403, 400)],
        check=routed("error:UNAVAILABLE", "error:UNIMPLEMENTED", "error:UNAVAILABLE", "error:UNAUTHENTICATED",
                     "error:PERMISSION_DENIED", "error:INTERNAL")),
    Row("fault-abort-percentage", eps(*P3),
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  fault: {{abort: {{grpcStatus: RESOURCE_EXHAUSTED, percentage: {{value: 30}}}}}}",
        batches=[Batch(300)], check=codes_share({"ok": .7, "error:RESOURCE_EXHAUSTED": .3})),
    Row("fault-delay", eps(*P3),
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  fault: {{delay: {{fixedDelay: 200ms, percentage: {{value: 100}}}}}}",
        batches=[Batch(6, concurrency=6)], check=delayed(1.0, 195)),
    Row("fault-delay-percentage", eps(*P3),
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  fault: {{delay: {{fixedDelay: 250ms, percent: 50}}}}",
        batches=[Batch(80, concurrency=40)], check=delayed(0.5, 240)),
    # --- timeouts: max_stream_duration (A31)
    Row("timeout-max-stream-duration", eps(*P3), behaviours={p: Behaviour(delay=1.5) for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  timeout: 300ms",
        batches=[Batch(4, concurrency=4)], check=deadline("error:DEADLINE_EXCEEDED", 280, 1000)),
    Row("timeout-app-deadline-shorter", eps(*P3), behaviours={p: Behaviour(delay=1.5) for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  timeout: 20s",
        batches=[Batch(4, concurrency=4, timeout=0.2)], check=deadline("error:DEADLINE_EXCEEDED", 180, 900, native_low_ms=180)),
    Row("timeout-not-reached", eps(*P3), behaviours={p: Behaviour(delay=0.2) for p in P3},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  timeout: 20s",
        batches=[Batch(4, concurrency=4)], check=delayed(1.0, 190)),
    # --- ring hash with a header hash policy (A42)
    Row("ring-hash-sticky", eps("p1", "p2", "p3", "p4"),
        dr_spec="trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user, ringHash: {minimumRingSize: 1024}}}}",
        batches=[Batch(120, md_each=[[("x-user", f"user-{k}")] for k in range(30)])], check=ring_hash(30, same_hosts_as_grpcio=False)),
    Row("ring-hash-same-hosts-as-grpcio", eps("p1", "p2", "p3", "p4"),
        dr_spec="trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}",
        batches=[Batch(60, md_each=[[("x-user", f"user-{k}")] for k in range(30)])], check=ring_hash(30, same_hosts_as_grpcio=True)),
    Row("ring-hash-no-header-is-random", eps("p1", "p2", "p3", "p4"),
        dr_spec="trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}",
        batches=[Batch(400)], check=split({"p1": .25, "p2": .25, "p3": .25, "p4": .25})),
    # --- circuit breaking: max_requests (A32)
    Row("circuit-breaker-max-requests", eps(*P3), behaviours={p: Behaviour(delay=0.8) for p in P3},
        dr_spec="trafficPolicy: {connectionPool: {http: {http2MaxRequests: 2}}}",
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 0}}",
        batches=[Batch(6, concurrency=6)], check=circuit_breaker(ok=2, dropped=4)),
    # --- outlier detection: failure percentage and success rate (A50)
    Row("outlier-failure-percentage", eps(*P3), behaviours={"p3": UNAVAILABLE},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 0}}",
        patch=_outlier(enforcing_success_rate=0, failure_percentage_threshold=50, enforcing_failure_percentage=100,
                       failure_percentage_minimum_hosts=3, failure_percentage_request_volume=5),
        batches=[Batch(60), Batch(sleep=2.5), Batch(60)], check=ejected("p3")),
    Row("outlier-success-rate", eps("p1", "p2", "p3", "p4", "p5"), behaviours={"p5": UNAVAILABLE},
        vs_http=f"- route: [{{destination: {{host: {{host}}}}}}]\n  retries: {{attempts: 0}}",
        patch=_outlier(enforcing_success_rate=100, success_rate_minimum_hosts=5, success_rate_request_volume=5,
                       enforcing_failure_percentage=0),
        batches=[Batch(100), Batch(sleep=2.5), Batch(100)], check=ejected("p5")),
]


# Rows whose meshpatch feature has not landed on this branch yet: strict xfail, so
# they fail loudly ("XPASS(strict)") the day the feature arrives.
_LEAD = "issue3 (route actions, hooks)"
_LB = "issue3-lb (load balancing, resilience)"
MESHPATCH_MISSING: Dict[str, str] = {}


def _params(xfail: bool) -> Iterator[object]:
    for row in ROWS:
        reason = row.meshpatch_missing or MESHPATCH_MISSING.get(row.name, "")
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason and xfail else []
        yield pytest.param(row, id=row.name, marks=marks)


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    h = Harness(ROWS)
    try:
        yield h
    finally:
        h.close()


@pytest.mark.parametrize("row", list(_params(xfail=False)))
def test_grpcio_does_what_the_row_says(harness: Harness, row: Row) -> None:
    """Never xfailed: the row's expectations hold for grpcio itself (a missing
    meshpatch feature must not hide a wrong row)."""
    got = harness.outcome(row)
    row.check(got[NATIVE], got[NATIVE])


@pytest.mark.parametrize("row", list(_params(xfail=True)))
def test_meshpatch_same_outcome_as_grpcio(harness: Harness, row: Row) -> None:
    """Same outcome as grpcio, or, for a documented deliberate difference, the
    outcome meshpatch intends (``Row.divergence``)."""
    got = harness.outcome(row)
    if row.divergence is not None:
        assert row.divergence_reason
        row.divergence(got[NATIVE], got[MESHPATCH])
        return
    row.check(got[NATIVE], got[MESHPATCH])


def test_grpcio_accepted_every_resource(harness: Harness) -> None:
    """Runs last: grpcio ACKed everything the rows made it fetch (our extras
    beyond istiod's proxyless shapes must not cost native clients anything)."""
    assert harness.nacks(NATIVE) == []


def test_meshpatch_accepted_every_resource(harness: Harness) -> None:
    assert harness.nacks(MESHPATCH) == []
