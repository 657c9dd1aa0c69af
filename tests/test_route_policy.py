"""Route actions end to end: retries, timeouts, faults, header mutations,
rewrites, redirects, direct responses, mirroring and query/method matching.

The xDS resources are built here exactly (a real ADS server answers them), the
servers really fail (503, dropped connections, refused ports, slowness, gRPC
UNAVAILABLE), and each library runs as an unmodified app under meshpatch-run.
"""

from __future__ import annotations

import json
import textwrap
import time
from typing import Any, Dict, Iterator, List

import grpc
import pytest
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from google.protobuf import any_pb2, wrappers_pb2
from scipy.stats import binomtest

from tests.support import xds_resources as res
from tests.support.scripted_ads import ScriptedAds
from tests.support.servers import UNARY, free_port, grpc_server, http_server, run_app

pytestmark = pytest.mark.e2e

HTTP = "svc:80"
GRPC = "svc:7070"
RDS_HTTP = "outbound|80||svc.default.svc.cluster.local"
RDS_GRPC = "outbound|7070||svc.default.svc.cluster.local"


def _route(prefix: str, cluster: str, **kwargs: Any) -> rc.Route:
    route = res.route(prefix, cluster=cluster)
    for key, value in kwargs.items():
        if key == "retry":
            route.route.retry_policy.CopyFrom(value)
        elif key == "timeout":
            route.route.timeout.FromNanoseconds(int(value * 1e9))
        elif key == "msd":
            route.route.max_stream_duration.max_stream_duration.FromNanoseconds(int(value * 1e9))
        elif key == "fault":
            packed = any_pb2.Any()
            packed.Pack(value)
            route.typed_per_filter_config["envoy.filters.http.fault"].CopyFrom(packed)
        else:
            raise KeyError(key)
    return route


def _retry(on: str, num: int = 2, per_try: float = 0.0) -> rc.RetryPolicy:
    policy = rc.RetryPolicy(retry_on=on, num_retries=wrappers_pb2.UInt32Value(value=num))
    policy.retry_back_off.base_interval.FromMilliseconds(5)
    if per_try:
        policy.per_try_timeout.FromNanoseconds(int(per_try * 1e9))
    return policy


def _fault(abort_http: int = 0, abort_grpc: int = -1, abort_percent: int = 0, delay: float = 0.0,
           delay_percent: int = 0) -> fault_pb2.HTTPFault:
    fault = fault_pb2.HTTPFault()
    if delay_percent:
        fault.delay.fixed_delay.FromNanoseconds(int(delay * 1e9))
        fault.delay.percentage.numerator = delay_percent
    if abort_percent:
        if abort_grpc >= 0:
            fault.abort.grpc_status = abort_grpc
        else:
            fault.abort.http_status = abort_http
        fault.abort.percentage.numerator = abort_percent
    return fault


class Pods:
    def __init__(self, servers: Dict[str, Any], refused: int) -> None:
        self.servers = servers
        self.refused = refused

    def __getitem__(self, name: str) -> Any:
        return self.servers[name]


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    with http_server("good", "127.0.0.2") as good, http_server("bad", "127.0.0.3") as bad, \
            http_server("slow", "127.0.0.4") as slow, http_server("shadow", "127.0.0.6") as shadow, \
            grpc_server("ggood", "127.0.0.2") as ggood, grpc_server("gbad", "127.0.0.3") as gbad, \
            grpc_server("gslow", "127.0.0.4") as gslow:
        bad.fail_status = 503
        slow.delay = 1.0
        gbad.fail_code = grpc.StatusCode.UNAVAILABLE
        gslow.delay = 1.0
        yield Pods({"good": good, "bad": bad, "slow": slow, "shadow": shadow, "ggood": ggood, "gbad": gbad,
                    "gslow": gslow}, free_port("127.0.0.5"))


def _resources(pods: Pods) -> Dict[str, Dict[str, Any]]:
    from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS

    def ep(name: str) -> tuple:
        server = pods[name]
        return (server.host, server.port)

    clusters = {
        "good": [ep("good")],
        "flaky": [ep("bad"), ep("good")],
        "allbad": [ep("bad")],
        "refused": [("127.0.0.5", pods.refused), ep("good")],
        "slowfast": [ep("slow"), ep("good")],
        "slow": [ep("slow")],
        "shadow": [ep("shadow")],
        "gflaky": [ep("gbad"), ep("ggood")],
        "ggood": [ep("ggood")],
        "gslow": [ep("gslow")],
    }
    http_routes: List[rc.Route] = [
        _route("/retry-5xx", "flaky", retry=_retry("5xx", 2)),
        _route("/retry-gateway", "flaky", retry=_retry("gateway-error", 2)),
        _route("/retry-codes", "flaky", retry=_retry("retriable-status-codes", 2)),
        _route("/retry-refused", "refused", retry=_retry("connect-failure", 2)),
        _route("/no-retry", "flaky"),
        _route("/exhausted", "allbad", retry=_retry("5xx", 3)),
        _route("/timeout", "slow", timeout=0.3),
        _route("/per-try", "slowfast", retry=_retry("5xx", 2, per_try=0.3)),
        _route("/abort-all", "good", fault=_fault(abort_http=418, abort_percent=100)),
        _route("/abort-half", "good", fault=_fault(abort_http=503, abort_percent=50)),
        _route("/delay", "good", fault=_fault(delay=0.25, delay_percent=100)),
    ]
    retry_codes = http_routes[2].route.retry_policy
    retry_codes.retriable_status_codes.append(503)
    direct = rc.Route(name="direct")
    direct.match.prefix = "/direct"
    direct.direct_response.status = 202
    direct.direct_response.body.inline_string = "answered by the mesh"
    redirect = rc.Route(name="redirect")
    redirect.match.prefix = "/old/"
    redirect.redirect.prefix_rewrite = "/new/"
    redirect.redirect.response_code = rc.RedirectAction.FOUND
    rewrite = _route("/api/v1/", "good")
    rewrite.route.prefix_rewrite = "/v2/"
    regex = _route("/items/", "good")
    regex.route.regex_rewrite.pattern.regex = "^/items/([0-9]+)$"
    regex.route.regex_rewrite.substitution = r"/catalog/item-\1"
    host = _route("/host", "good")
    host.route.host_rewrite_literal = "rewritten.example"
    headers = _route("/headers", "good")
    add = headers.request_headers_to_add.add()
    add.header.key, add.header.value = "x-added", "yes"
    add.append_action = 2  # OVERWRITE_IF_EXISTS_OR_ADD
    headers.request_headers_to_remove.append("x-secret")
    resp = headers.response_headers_to_add.add()
    resp.header.key, resp.header.value = "x-mesh", "meshpatch"
    mirror = _route("/mirror", "good")
    mirror.route.request_mirror_policies.add(cluster="shadow")
    query = _route("/q", "allbad")
    qm = query.match.query_parameters.add(name="pick")
    qm.string_match.exact = "good"
    query.route.cluster = "good"
    method = _route("/q", "allbad")
    hm = method.match.headers.add(name=":method")
    hm.string_match.exact = "POST"
    method.route.cluster = "good"
    catch_all = _route("/", "allbad")
    http_routes += [direct, redirect, rewrite, regex, host, headers, mirror, query, method, catch_all]
    grpc_routes = [
        _route("/meshtest.Echo/Unary", "gflaky", retry=_retry("unavailable", 2), timeout=0.0),
    ]
    grpc_routes[0].match.headers.add(name="x-case").string_match.exact = "retry"
    grpc_routes.append(_route("/meshtest.Echo/", "gflaky"))
    grpc_routes[-1].match.headers.add(name="x-case").string_match.exact = "no-retry"
    grpc_routes.append(_route("/meshtest.Echo/", "ggood", fault=_fault(abort_grpc=8, abort_percent=100)))
    grpc_routes[-1].match.headers.add(name="x-case").string_match.exact = "abort"
    grpc_routes.append(_route("/meshtest.Echo/", "gslow", msd=0.3))
    grpc_routes[-1].match.headers.add(name="x-case").string_match.exact = "deadline"
    grpc_routes.append(_route("/meshtest.Echo/", "ggood", fault=_fault(delay=0.25, delay_percent=100)))
    grpc_routes[-1].match.headers.add(name="x-case").string_match.exact = "delay"
    grpc_routes.append(_route("/", "ggood"))
    domains_http = ["svc", "svc:80"]
    domains_grpc = ["svc", "svc:7070"]
    return {
        LDS: {HTTP: res.listener(HTTP, RDS_HTTP), GRPC: res.listener(GRPC, RDS_GRPC)},
        RDS: {
            RDS_HTTP: res.route_config(RDS_HTTP, [("svc:80", domains_http, http_routes)]),
            RDS_GRPC: res.route_config(RDS_GRPC, [("svc:7070", domains_grpc, grpc_routes)]),
        },
        CDS: {name: res.cluster(name) for name in clusters},
        EDS: {name: res.cla(name, eps) for name, eps in clusters.items()},
    }


@pytest.fixture(scope="module")
def ads(pods: Pods) -> Iterator[ScriptedAds]:
    server = ScriptedAds().start()
    server.serve(_resources(pods))
    yield server
    server.stop()


HTTP_APP = """
import json, sys, time, {lib}
results = {{}}
{client}
def call(path, method="GET", headers=None, **kw):
    start = time.monotonic()
    try:
        r = {request}
        return {{"status": r.status_code, "json": r.json() if r.headers.get("content-type") == "application/json" else None,
                 "text": r.text, "headers": dict(r.headers), "url": str(r.url), "elapsed": time.monotonic() - start,
                 "history": [h.status_code for h in getattr(r, "history", [])]}}
    except Exception as exc:
        return {{"error": type(exc).__name__, "elapsed": time.monotonic() - start}}
BASE = "http://svc:80"
results["retry5xx"] = [call("/retry-5xx")["status"] for _ in range(20)]
results["retry_gateway"] = [call("/retry-gateway")["status"] for _ in range(10)]
results["retry_codes"] = [call("/retry-codes")["status"] for _ in range(10)]
results["retry_refused"] = [call("/retry-refused").get("status") for _ in range(10)]
results["no_retry"] = [call("/no-retry")["status"] for _ in range(40)]
results["exhausted"] = call("/exhausted")
results["timeout"] = call("/timeout")
results["per_try"] = [call("/per-try") for _ in range(4)]
results["abort"] = call("/abort-all")
results["abort_half"] = [call("/abort-half")["status"] for _ in range(200)]
results["delay"] = call("/delay")
results["direct"] = call("/direct")
results["redirect"] = call("/old/page?x=1")
results["rewrite"] = call("/api/v1/books?id=7")
results["regex"] = call("/items/42")
results["host"] = call("/host")
results["headers"] = call("/headers", headers={{"x-secret": "s", "x-added": "app"}})
results["mirror"] = call("/mirror")
results["query_good"] = call("/q?pick=good")
results["query_other"] = call("/q?pick=other")
results["method_post"] = call("/q", method="POST")
print("RESULT " + json.dumps(results))
"""

CLIENTS = {
    "requests": ("s = requests.Session()",
                 "s.request(method, BASE + path, headers=headers, timeout=5)"),
    "httpx": ("c = httpx.Client(follow_redirects=True, timeout=5)",
              "c.request(method, BASE + path, headers=headers)"),
}


def _run_http(ads: ScriptedAds, lib: str) -> Dict[str, Any]:
    client, request = CLIENTS[lib]
    code = HTTP_APP.format(lib=lib, client=client, request=request)
    run = run_app(code, {"MESHPATCH_XDS_SERVER": ads.address, "MESHPATCH_RESOLVE_TIMEOUT": "5"}, timeout=120)
    assert run.returncode == 0, run
    return run.result


@pytest.fixture(scope="module", params=["requests", "httpx"])
def http_results(request: Any, ads: ScriptedAds, pods: Pods) -> Dict[str, Any]:
    for name in ("good", "bad", "shadow"):
        pods[name].seen.clear()
    results = _run_http(ads, request.param)
    results["_lib"] = request.param
    results["_seen"] = {name: list(pods[name].seen) for name in ("good", "bad", "shadow")}
    return results


def test_retries_on_5xx_gateway_and_status_codes_reach_the_healthy_host(http_results: Dict[str, Any]) -> None:
    assert http_results["retry5xx"] == [200] * 20
    assert http_results["retry_gateway"] == [200] * 10
    assert http_results["retry_codes"] == [200] * 10


def test_retry_on_connect_failure_moves_to_another_host(http_results: Dict[str, Any]) -> None:
    assert http_results["retry_refused"] == [200] * 10


def test_without_retry_policy_failures_reach_the_app(http_results: Dict[str, Any]) -> None:
    statuses = http_results["no_retry"]
    assert set(statuses) == {200, 503}
    assert binomtest(statuses.count(503), len(statuses), 0.5).pvalue > 0.001


def test_retries_are_bounded_and_never_hit_the_same_host_twice_when_another_exists(http_results: Dict[str, Any]) -> None:
    assert http_results["exhausted"]["status"] == 503
    bad_hits = [s for s in http_results["_seen"]["bad"] if s["path"] == "/exhausted"]
    assert len(bad_hits) == 4  # 1 try + 3 retries, all on the only (failing) host
    # every /retry-5xx call reached the bad host at most once
    attempts = [s for s in http_results["_seen"]["bad"] if s["path"] == "/retry-5xx"]
    assert len(attempts) <= 20


def test_route_timeout_and_per_try_timeout(http_results: Dict[str, Any]) -> None:
    timeout = http_results["timeout"]
    assert "error" in timeout and timeout["elapsed"] < 0.9
    for result in http_results["per_try"]:
        assert result["status"] == 200 and result["json"]["server"] == "good"
        assert result["elapsed"] < 0.9


def test_fault_abort_and_delay(http_results: Dict[str, Any]) -> None:
    abort = http_results["abort"]
    assert abort["status"] == 418 and "fault filter abort" in abort["text"]
    assert not [s for s in http_results["_seen"]["good"] if s["path"] == "/abort-all"]
    half = http_results["abort_half"]
    assert binomtest(half.count(503), len(half), 0.5).pvalue > 0.001
    assert http_results["delay"]["status"] == 200 and http_results["delay"]["elapsed"] >= 0.25


def test_direct_response_and_redirect(http_results: Dict[str, Any]) -> None:
    direct = http_results["direct"]
    assert direct["status"] == 202 and direct["text"] == "answered by the mesh"
    redirect = http_results["redirect"]
    assert redirect["history"] == [302]
    assert redirect["url"] == "http://svc/new/page?x=1" or redirect["url"] == "http://svc:80/new/page?x=1"
    assert redirect["status"] == 503  # /new/ lands on the catch-all, whose only host fails


def test_path_and_host_rewrites(http_results: Dict[str, Any]) -> None:
    assert http_results["rewrite"]["json"]["path"] == "/v2/books?id=7"
    assert http_results["regex"]["json"]["path"] == "/catalog/item-42"
    assert http_results["host"]["json"]["host"] == "rewritten.example"
    assert http_results["rewrite"]["url"].startswith("http://svc")  # the app still sees its own URL


def test_header_mutations(http_results: Dict[str, Any]) -> None:
    seen = [s for s in http_results["_seen"]["good"] if s["path"] == "/headers"]
    assert seen, "the /headers request never reached the server"
    result = http_results["headers"]
    assert result["json"]["server"] == "good"
    sent = result["json"]["headers"]
    assert sent.get("x-added") == "yes"  # OVERWRITE_IF_EXISTS_OR_ADD replaced the app's value
    assert "x-secret" not in sent  # request_headers_to_remove
    assert result["headers"].get("x-mesh") == "meshpatch"  # response_headers_to_add


def test_mirror_sends_a_shadow_copy(http_results: Dict[str, Any]) -> None:
    assert http_results["mirror"]["status"] == 200 and http_results["mirror"]["json"]["server"] == "good"
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not http_results["_seen"]["shadow"]:
        time.sleep(0.05)
    shadow = [s for s in http_results["_seen"]["shadow"] if s["path"] == "/mirror"]
    assert shadow and shadow[0]["host"] == "svc-shadow:80"


def test_query_and_method_matching(http_results: Dict[str, Any]) -> None:
    assert http_results["query_good"]["status"] == 200
    assert http_results["query_other"]["status"] == 503
    assert http_results["method_post"]["status"] == 200


GRPC_APP = """
import asyncio, json, time, grpc
from tests_constants import UNARY
results = {}
channel = grpc.insecure_channel("svc:7070")
unary = channel.unary_unary(UNARY)
def call(case):
    start = time.monotonic()
    try:
        reply = json.loads(unary(b"x", timeout=5, metadata=(("x-case", case),)))
        return {"server": reply["server"], "elapsed": time.monotonic() - start}
    except grpc.RpcError as exc:
        return {"code": exc.code().name, "elapsed": time.monotonic() - start}
results["retry"] = [call("retry") for _ in range(20)]
results["no_retry"] = [call("no-retry") for _ in range(40)]
results["abort"] = call("abort")
results["deadline"] = call("deadline")
results["delay"] = call("delay")
async def aio():
    async with grpc.aio.insecure_channel("svc:7070") as ch:
        stub = ch.unary_unary(UNARY)
        out = []
        for _ in range(10):
            try:
                reply = json.loads(await stub(b"x", timeout=5, metadata=(("x-case", "retry"),)))
                out.append(reply["server"])
            except grpc.aio.AioRpcError as exc:
                out.append(exc.code().name)
        try:
            await stub(b"x", timeout=5, metadata=(("x-case", "abort"),))
            out.append("no abort")
        except grpc.aio.AioRpcError as exc:
            out.append(exc.code().name)
        return out
results["aio"] = asyncio.run(aio())
print("RESULT " + json.dumps(results))
"""


@pytest.fixture(scope="module")
def grpc_results(ads: ScriptedAds, pods: Pods) -> Dict[str, Any]:
    code = "UNARY = %r\n" % UNARY + GRPC_APP.replace("from tests_constants import UNARY\n", "")
    run = run_app(code, {"MESHPATCH_XDS_SERVER": ads.address, "MESHPATCH_RESOLVE_TIMEOUT": "5"}, timeout=120)
    assert run.returncode == 0, run
    return run.result


def test_grpc_retries_on_unavailable(grpc_results: Dict[str, Any]) -> None:
    assert [r.get("server") for r in grpc_results["retry"]] == ["ggood"] * 20
    no_retry = [r.get("server") or r.get("code") for r in grpc_results["no_retry"]]
    assert set(no_retry) == {"ggood", "UNAVAILABLE"}


def test_grpc_fault_abort_delay_and_max_stream_duration(grpc_results: Dict[str, Any]) -> None:
    assert grpc_results["abort"]["code"] == "RESOURCE_EXHAUSTED"  # grpc_status 8
    assert grpc_results["delay"]["server"] == "ggood" and grpc_results["delay"]["elapsed"] >= 0.25
    deadline = grpc_results["deadline"]
    assert deadline["code"] == "DEADLINE_EXCEEDED" and deadline["elapsed"] < 0.9


def test_grpc_aio_retries_and_fault(grpc_results: Dict[str, Any]) -> None:
    assert grpc_results["aio"][:10] == ["ggood"] * 10
    assert grpc_results["aio"][10] == "RESOURCE_EXHAUSTED"
