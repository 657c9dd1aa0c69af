"""OpenTelemetry spans and metrics of routed calls, read back with the SDK's
in-memory span exporter and metric reader inside unmodified apps under
meshpatch-run (the app installs the SDK, as an instrumented app would).

The mesh (a scripted ADS server, real failing servers on loopback):
``svc:80`` routes ``/ok`` → cluster ``good``, ``/retry`` → ``flaky`` (a 503
server and a good one, retry on 5xx), ``/fail`` → ``allbad``, ``/empty`` → a
cluster with no endpoints; ``svc:7070`` (gRPC) routes to ``ggood``, and with
``x-case: retry`` to ``gflaky`` (UNAVAILABLE + good, retry on unavailable).

Three set-ups: the SDK with no instrumentation (meshpatch records its own
CLIENT span per call), opentelemetry-instrumentation-requests/httpx/grpc
applied after meshpatch (their span is current when meshpatch routes) and
applied before meshpatch activated (their spans start inside meshpatch's
attempts) — each call must end up with exactly one described client span.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any, Dict, Iterator, List

import grpc
import pytest
from envoy.config.route.v3 import route_components_pb2 as rc
from google.protobuf import wrappers_pb2

from tests.support import xds_resources as res
from tests.support.scripted_ads import ScriptedAds
from tests.support.servers import grpc_server, http_server, run_app

pytestmark = pytest.mark.e2e

RDS_HTTP = "outbound|80||svc.default.svc.cluster.local"
RDS_GRPC = "outbound|7070||svc.default.svc.cluster.local"


def _retry(on: str, num: int) -> rc.RetryPolicy:
    policy = rc.RetryPolicy(retry_on=on, num_retries=wrappers_pb2.UInt32Value(value=num))
    policy.retry_back_off.base_interval.FromMilliseconds(2)
    return policy


@pytest.fixture(scope="module")
def mesh() -> Iterator[Dict[str, Any]]:
    from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS

    with http_server("good", "127.0.0.2") as good, http_server("bad", "127.0.0.3") as bad, \
            grpc_server("ggood", "127.0.0.2") as ggood, grpc_server("gbad", "127.0.0.3") as gbad:
        bad.fail_status = 503
        gbad.fail_code = grpc.StatusCode.UNAVAILABLE
        clusters = {
            "good": [(good.host, good.port)],
            "flaky": [(bad.host, bad.port), (good.host, good.port)],
            "allbad": [(bad.host, bad.port)],
            "empty": [],
            "ggood": [(ggood.host, ggood.port)],
            "gflaky": [(gbad.host, gbad.port), (ggood.host, ggood.port)],
        }
        ok = res.route("/ok", cluster="good", name="ok-route")
        retry = res.route("/retry", cluster="flaky", name="retry-route")
        retry.route.retry_policy.CopyFrom(_retry("5xx", 3))
        grpc_retry = res.route("/", cluster="gflaky", headers={"x-case": "retry"}, name="grpc-retry")
        grpc_retry.route.retry_policy.CopyFrom(_retry("unavailable", 3))
        http_routes = [ok, retry, res.route("/fail", cluster="allbad", name="fail-route"),
                       res.route("/empty", cluster="empty", name="empty-route")]
        grpc_routes = [grpc_retry, res.route("/", cluster="ggood", name="grpc-route")]
        db = {
            LDS: {"svc:80": res.listener("svc:80", RDS_HTTP), "svc:7070": res.listener("svc:7070", RDS_GRPC)},
            RDS: {RDS_HTTP: res.route_config(RDS_HTTP, [("svc", ["svc", "svc:80"], http_routes)]),
                  RDS_GRPC: res.route_config(RDS_GRPC, [("svc-grpc", ["svc:7070"], grpc_routes)])},
            CDS: {name: res.cluster(name) for name in clusters},
            EDS: {name: res.cla(name, eps, locality=("region-1", "zone-a", "")) for name, eps in clusters.items()},
        }
        server = ScriptedAds().start()
        server.serve(db)
        try:
            yield {"ads": server, "good": good, "bad": bad, "ggood": ggood, "gbad": gbad}
        finally:
            server.stop()


# The app: installs the SDK (unless told not to), optionally OTel's client
# instrumentations (before or after meshpatch), makes the calls, prints spans
# and meshpatch's metrics.
APP = textwrap.dedent("""
    import json, os, sys
    MODE = os.environ["TEST_MODE"]  # sdk | otel-after | otel-before | nosdk
    CALLS = json.loads(os.environ["TEST_CALLS"])
    if MODE != "nosdk":
        from opentelemetry import trace, metrics
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))

    def instrument():
        from opentelemetry.instrumentation.requests import RequestsInstrumentor
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
        from opentelemetry.instrumentation.grpc import GrpcInstrumentorClient
        RequestsInstrumentor().instrument()
        HTTPXClientInstrumentor().instrument()
        GrpcInstrumentorClient().instrument()

    if MODE == "otel-before":
        import requests, httpx, grpc
        instrument()  # OTel wraps first; meshpatch activates late and wraps on top
        os.environ["MESHPATCH_ENABLED"] = "1"
        import meshpatch.activation
        meshpatch.activation.activate("late")
    import requests, httpx, grpc
    if MODE == "otel-after":
        instrument()  # meshpatch patched at import; OTel wraps on top

    H = "http://svc"
    results = []
    errors = []  # why a call failed, for the assertion message
    session = requests.Session()
    client = httpx.Client()
    channel = grpc.insecure_channel("svc:7070")
    unary = channel.unary_unary("/meshtest.Echo/Unary")
    for kind, arg in CALLS:
        try:
            if kind == "requests":
                r = session.get(arg, timeout=5)
                results.append([kind, arg, r.status_code, r.json()["server"] if r.status_code == 200 else None])
            elif kind == "httpx":
                r = client.get(arg, timeout=5)
                results.append([kind, arg, r.status_code, r.json()["server"] if r.status_code == 200 else None])
            elif kind == "grpc":
                md = (("x-case", arg),) if arg else None
                reply = json.loads(unary(b"hi", metadata=md, timeout=5))
                results.append([kind, arg, "OK", reply["server"]])
        except Exception as exc:
            results.append([kind, arg, type(exc).__name__, None])
            errors.append([kind, arg, str(exc)[:400]])

    out = {"results": results, "errors": errors}
    if MODE != "nosdk":
        spans = []
        for s in exporter.get_finished_spans():
            spans.append({"name": s.name, "kind": s.kind.name, "scope": s.instrumentation_scope.name,
                          "attrs": dict(s.attributes), "status": s.status.status_code.name,
                          "trace": s.context.trace_id, "parent": s.parent.span_id if s.parent else None})
        out["spans"] = spans
        points = []
        for rm in reader.get_metrics_data().resource_metrics:
            for sm in rm.scope_metrics:
                if sm.scope.name != "meshpatch":
                    continue
                for m in sm.metrics:
                    for p in m.data.data_points:
                        value = getattr(p, "value", None)
                        if value is None:
                            value = {"count": p.count, "sum": p.sum}
                        points.append({"name": m.name, "attrs": dict(p.attributes), "value": value})
        out["metrics"] = points
    else:
        from opentelemetry import trace
        import meshpatch.telemetry as t
        out["provider"] = type(trace.get_tracer_provider()).__name__
        out["telemetry"] = t.state()
    print("RESULT " + json.dumps(out))
""")


def _run(mesh: Dict[str, Any], mode: str, calls: List[List[str]]) -> Dict[str, Any]:
    env = {"MESHPATCH_XDS_SERVER": mesh["ads"].address, "MESHPATCH_RESOLVE_TIMEOUT": "5",
           "TEST_MODE": mode, "TEST_CALLS": json.dumps(calls)}
    run = run_app(APP, env, patched=(mode != "otel-before"))
    assert run.returncode == 0, run
    assert run.result is not None, run
    return run.result


def _metric(points: List[Dict[str, Any]], name: str, **attrs: Any) -> Any:
    """Sum of a counter's points whose attributes include ``attrs``."""
    total = 0
    for p in points:
        if p["name"] == name and all(p["attrs"].get(k) == v for k, v in attrs.items()):
            total += p["value"] if not isinstance(p["value"], dict) else p["value"]["count"]
    return total


CALLS = [
    ["requests", "http://svc/ok"], ["requests", "http://svc/ok"],
    ["requests", "http://svc/retry"], ["requests", "http://svc/retry"], ["requests", "http://svc/retry"],
    ["requests", "http://svc/fail"], ["requests", "http://svc/empty"],
    ["httpx", "http://svc/ok"], ["httpx", "http://svc/retry"], ["httpx", "http://svc/retry"],
    ["grpc", ""], ["grpc", "retry"], ["grpc", "retry"],
]


def _client_spans(result: Dict[str, Any]) -> List[Dict[str, Any]]:
    return [s for s in result["spans"] if s["kind"] == "CLIENT"]


def _check_results(result: Dict[str, Any], passthrough: str = "") -> None:
    by_call = [(k, a, status) for k, a, status, _ in result["results"]]
    assert [s for k, a, s in by_call if a.endswith("/ok") or a.endswith("/retry")] == [200] * 8, \
        (result["results"], result.get("errors"))
    assert [s for k, a, s in by_call if a.endswith("/fail")] == [503]
    assert [s for k, a, s in by_call if a.endswith("/empty")] == ["ConnectionError"]
    assert [s for k, a, s in by_call if k == "grpc"] == ["OK", "OK", "OK"]


def test_sdk_without_instrumentation_gets_one_meshpatch_span_per_routed_call(mesh: Dict[str, Any]) -> None:
    good, bad = mesh["good"], mesh["bad"]
    passthrough = f"http://{good.host}:{good.port}/direct"
    result = _run(mesh, "sdk", CALLS + [["requests", passthrough]])
    _check_results(result)
    spans = _client_spans(result)
    # one span per routed call, all meshpatch's own; none for the passed-through call
    assert {s["scope"] for s in spans} == {"meshpatch"}
    routed = [c for c in CALLS if not c[1].endswith("/empty")]  # /empty fails before any attempt: no span
    assert len(spans) == len(routed)
    by_route: Dict[str, List[Dict[str, Any]]] = {}
    for s in spans:
        by_route.setdefault(s["attrs"]["meshpatch.route"], []).append(s["attrs"] | {"_status": s["status"],
                                                                                     "_name": s["name"]})
    ok = by_route["ok-route"]
    assert len(ok) == 3
    for attrs in ok:
        assert attrs["server.address"] == good.host and attrs["server.port"] == good.port
        assert attrs["network.peer.address"] == good.host
        assert attrs["meshpatch.cluster"] == "good" and attrs["meshpatch.locality"] == "region-1/zone-a/"
        assert attrs["meshpatch.retries"] == 0 and attrs["meshpatch.passthrough"] is False
        assert attrs["meshpatch.authority"] == "svc:80" and attrs["_status"] == "UNSET" and attrs["_name"] == "GET"
    retried = by_route["retry-route"]
    assert len(retried) == 5
    for attrs in retried:  # the final attempt always lands on the good endpoint
        assert attrs["server.address"] == good.host and attrs["meshpatch.cluster"] == "flaky"
        assert attrs["_status"] == "UNSET"
    # round robin over [bad, good] with retries excluding tried hosts: at least 4 of 5 calls start on bad
    assert sum(a["meshpatch.retries"] for a in retried) >= 4
    assert all(a["meshpatch.retries"] in (0, 1) for a in retried)
    (failed,) = by_route["fail-route"]
    assert failed["_status"] == "ERROR" and failed["error.type"] == "503"
    assert failed["server.address"] == bad.host and failed["meshpatch.cluster"] == "allbad"
    grpc_spans = by_route["grpc-route"] + by_route["grpc-retry"]
    assert len(grpc_spans) == 3 and {a["_name"] for a in grpc_spans} == {"meshtest.Echo/Unary"}
    assert all(a["server.address"] == mesh["ggood"].host and a["server.port"] == mesh["ggood"].port for a in grpc_spans)

    points = result["metrics"]
    retries_seen = sum(a["meshpatch.retries"] for a in retried) + sum(a["meshpatch.retries"] for a in by_route["grpc-retry"])
    assert _metric(points, "meshpatch.client.retries") == retries_seen
    good_ep, bad_ep = f"{good.host}:{good.port}", f"{bad.host}:{bad.port}"
    assert _metric(points, "meshpatch.client.calls", **{"meshpatch.cluster": "good", "meshpatch.endpoint": good_ep,
                                                       "meshpatch.result": "success"}) == 3
    assert _metric(points, "meshpatch.client.calls", **{"meshpatch.cluster": "flaky", "meshpatch.result": "success"}) == 5
    assert _metric(points, "meshpatch.client.calls", **{"meshpatch.cluster": "allbad", "meshpatch.endpoint": bad_ep,
                                                       "meshpatch.result": "failure"}) == 1
    assert _metric(points, "meshpatch.client.failures", **{"meshpatch.cluster": "allbad", "error.type": "503"}) == 1
    assert _metric(points, "meshpatch.client.failures", **{"meshpatch.cluster": "empty",
                                                          "error.type": "no_healthy_upstream"}) == 1
    # per endpoint attempts: every retry of flaky was caused by a failed attempt on the bad endpoint
    http_retries = sum(a["meshpatch.retries"] for a in retried)
    assert _metric(points, "meshpatch.client.attempts", **{"meshpatch.cluster": "flaky", "meshpatch.endpoint": bad_ep,
                                                          "meshpatch.result": "failure"}) == http_retries
    assert _metric(points, "meshpatch.client.attempts", **{"meshpatch.cluster": "flaky", "meshpatch.endpoint": good_ep,
                                                          "meshpatch.result": "success"}) == 5
    assert _metric(points, "meshpatch.client.passthrough") == 1
    assert _metric(points, "meshpatch.pick.duration", **{"meshpatch.result": "routed"}) == len(CALLS)
    assert _metric(points, "meshpatch.pick.duration", **{"meshpatch.result": "passthrough"}) == 1
    for kind in ("LDS", "RDS", "CDS", "EDS"):
        assert _metric(points, "meshpatch.xds.acks", **{"xds.type": kind}) >= 1
        assert _metric(points, "meshpatch.xds.nacks", **{"xds.type": kind}) == 0
        ages = [p["value"] for p in points if p["name"] == "meshpatch.xds.config_age" and p["attrs"] == {"xds.type": kind}]
        assert len(ages) == 1 and 0 <= ages[0] < 60
    assert [p["value"] for p in points if p["name"] == "meshpatch.xds.connected"] == [1]
    assert _metric(points, "meshpatch.xds.reconnects") == 0


@pytest.mark.parametrize("mode", ["otel-after", "otel-before"])
def test_with_opentelemetry_instrumentation_in_either_order_no_double_spans(mesh: Dict[str, Any], mode: str) -> None:
    good = mesh["good"]
    passthrough = f"http://{good.host}:{good.port}/direct"
    result = _run(mesh, mode, CALLS + [["requests", passthrough], ["httpx", passthrough]])
    _check_results(result)
    spans = _client_spans(result)
    # meshpatch never adds a span of its own when an instrumentation describes the call
    assert "meshpatch" not in {s["scope"] for s in spans}, spans
    described = [s for s in spans if "meshpatch.cluster" in s["attrs"]]
    undescribed = [s for s in spans if "meshpatch.cluster" not in s["attrs"]]
    # the two passed-through calls: their instrumentation span says so, nothing else
    assert len(undescribed) == 2 + 1, undescribed  # + the /empty call: no endpoint was ever picked
    passed = [s for s in undescribed if s["attrs"].get("meshpatch.passthrough") is True]
    assert len(passed) == 2
    for s in described:
        attrs = s["attrs"]
        assert attrs["meshpatch.passthrough"] is False
        assert attrs["server.address"] in (good.host, mesh["bad"].host, mesh["ggood"].host, mesh["gbad"].host)
        assert attrs["meshpatch.locality"] == "region-1/zone-a/"
    scopes = {s["scope"] for s in described}
    assert {"opentelemetry.instrumentation.requests", "opentelemetry.instrumentation.httpx",
            "opentelemetry.instrumentation.grpc"} <= scopes, scopes

    requests_spans = [s for s in described if s["scope"] == "opentelemetry.instrumentation.requests"]
    # requests instrumentation wraps Session.send, above meshpatch in both orders: one span per call,
    # carrying the final endpoint and the retry count
    assert len(requests_spans) == 6
    assert sum(s["attrs"]["meshpatch.retries"] for s in requests_spans) >= 2
    httpx_spans = [s for s in described if s["scope"] == "opentelemetry.instrumentation.httpx"]
    grpc_spans = [s for s in described if s["scope"] == "opentelemetry.instrumentation.grpc"]
    if mode == "otel-after":
        # OTel's transport/channel wrappers sit above meshpatch: one span per call
        assert len(httpx_spans) == 3 and len(grpc_spans) == 3
    else:
        # OTel sits below meshpatch: a span per attempt, each naming its own endpoint
        # and how many retries preceded it
        retried_httpx = [s for s in httpx_spans if s["attrs"]["meshpatch.route"] == "retry-route"]
        assert len(httpx_spans) == 3 + sum(1 for s in retried_httpx if s["attrs"]["meshpatch.retries"] > 0)
        for s in retried_httpx:
            expected = mesh["bad"].host if s["status"] == "ERROR" or s["attrs"].get("http.response.status_code") == 503 \
                else good.host
            assert s["attrs"]["server.address"] == expected
        assert len(grpc_spans) >= 3
    # spans of one call share its trace; no meshpatch span is nested under them
    assert all(s["parent"] is None for s in spans if s["scope"] != "opentelemetry.instrumentation.grpc")


def test_without_an_sdk_nothing_is_recorded_and_calls_work(mesh: Dict[str, Any]) -> None:
    result = _run(mesh, "nosdk", CALLS)
    _check_results(result)
    assert result["provider"] == "ProxyTracerProvider"
    assert result["telemetry"]["opentelemetry_api"] is True
    assert result["telemetry"]["tracer_provider"] is None and result["telemetry"]["meter_provider"] is None
    assert result["telemetry"]["span_processor_added"] is False
