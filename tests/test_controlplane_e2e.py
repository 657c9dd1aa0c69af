"""Istio YAML → our control plane → meshpatch → real servers, for what only HTTP has.

The unit tests (test_controlplane_traffic.py) pin the emitted shapes to
istiod's; this closes the loop: an unmodified ``requests`` app under
``meshpatch-run`` gets the behaviour Envoy would give it for the same
VirtualService / DestinationRule — redirects, direct responses, rewrites,
header operations, mirroring, query/method matching, fault aborts, route
timeouts, retries (and istiod's default policy, which does not retry 503),
consecutive-5xx outlier ejection and circuit breaking — against servers that
really fail.
"""

from __future__ import annotations

import textwrap
import time
from typing import Any, Dict, Iterator

import pytest
from scipy.stats import binomtest

from tests.support.controlplane import ControlPlane
from tests.support.servers import http_server, run_app

SHOP = "shop.default.svc.cluster.local"


def _mesh(good: Any, bad: Any, slow: Any, shadow: Any) -> str:
    def ep(server: Any, role: str, pool: str = "b") -> str:
        return f"{{address: {server.host}, ports: {{http: {server.port}}}, labels: {{role: {role}, pool: {pool}}}}}"

    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: shop}}
        spec:
          hosts: [{SHOP}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 80, name: http, protocol: HTTP}}]
          endpoints: [{ep(good, "good", "a")}, {ep(bad, "bad", "a")}, {ep(slow, "slow")}]
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: shadow}}
        spec:
          hosts: [shadow.default.svc.cluster.local]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 80, name: http, protocol: HTTP}}]
          endpoints: [{ep(shadow, "shadow")}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: shop}}
        spec:
          host: shop
          subsets:
          - {{name: good, labels: {{role: good}}}}
          - {{name: slow, labels: {{role: slow}}}}
          - name: mixed
            labels: {{pool: a}}
            trafficPolicy:
              loadBalancer: {{simple: ROUND_ROBIN}}
          - name: ejecting
            labels: {{pool: a}}
            trafficPolicy:
              outlierDetection: {{consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}
          - name: guarded
            labels: {{role: slow}}
            trafficPolicy:
              connectionPool: {{http: {{http2MaxRequests: 1, http1MaxPendingRequests: 1}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: shop}}
        spec:
          hosts: [shop]
          http:
          - match: [{{uri: {{exact: /old}}}}]
            redirect: {{uri: /new, redirectCode: 302}}
          - match: [{{uri: {{exact: /health}}}}]
            directResponse: {{status: 503, body: {{string: down for maintenance}}}}
          - match: [{{uri: {{prefix: /api/v1/}}}}]
            rewrite: {{uri: /v2/, authority: rewritten.example}}
            headers:
              request: {{set: {{x-added: mesh}}, remove: [x-secret]}}
              response: {{add: {{x-mesh: meshpatch}}}}
            route: [{{destination: {{host: shop, subset: good}}}}]
          - match: [{{uri: {{prefix: /items/}}}}]
            rewrite: {{uriRegexRewrite: {{match: "^/items/([0-9]+)$", rewrite: "/catalog/item-\\\\1"}}}}
            route: [{{destination: {{host: shop, subset: good}}}}]
          - match: [{{uri: {{exact: /mirror}}}}]
            mirror: {{host: shadow}}
            route: [{{destination: {{host: shop, subset: good}}}}]
          - match: [{{uri: {{exact: /teapot}}}}]
            fault: {{abort: {{httpStatus: 418, percentage: {{value: 100}}}}}}
            route: [{{destination: {{host: shop, subset: good}}}}]
          - match: [{{uri: {{prefix: /q}}, queryParams: {{pick: {{exact: good}}}}}}, {{uri: {{prefix: /q}}, method: {{exact: POST}}}}]
            route: [{{destination: {{host: shop, subset: good}}}}]
          - match: [{{uri: {{exact: /slow}}}}]
            timeout: 300ms
            route: [{{destination: {{host: shop, subset: slow}}}}]
          - match: [{{uri: {{exact: /retried}}}}]
            retries: {{attempts: 2, retryOn: 5xx}}
            route: [{{destination: {{host: shop, subset: mixed}}}}]
          - match: [{{uri: {{exact: /default-retry}}}}]
            route: [{{destination: {{host: shop, subset: mixed}}}}]
          - match: [{{uri: {{exact: /eject}}}}]
            retries: {{attempts: 0}}
            route: [{{destination: {{host: shop, subset: ejecting}}}}]
          - match: [{{uri: {{exact: /guarded}}}}]
            retries: {{attempts: 0}}
            route: [{{destination: {{host: shop, subset: guarded}}}}]
          - route: [{{destination: {{host: shop, subset: slow}}}}]
        """)


APP = """
import json, time
from concurrent.futures import ThreadPoolExecutor
import requests
s = requests.Session()
BASE = "http://shop.default.svc.cluster.local"

def call(path, method="GET", **kw):
    start = time.monotonic()
    try:
        r = s.request(method, BASE + path, timeout=5, allow_redirects=False, **kw)
        body = r.json() if r.headers.get("content-type") == "application/json" else None
        return {"status": r.status_code, "json": body, "text": r.text, "headers": dict(r.headers),
                "elapsed": time.monotonic() - start}
    except Exception as exc:
        return {"error": type(exc).__name__, "detail": str(exc)[:200], "elapsed": time.monotonic() - start}

out = {}
out["redirect"] = call("/old")
out["direct"] = call("/health")
out["rewrite"] = call("/api/v1/books?id=7", headers={"x-secret": "s", "x-added": "app"})
out["regex"] = call("/items/42")
out["mirror"] = call("/mirror")
out["teapot"] = call("/teapot")
out["query_good"] = call("/q?pick=good")
out["method_post"] = call("/q", method="POST")
out["query_other"] = call("/q?pick=other")
out["slow"] = call("/slow")
out["retried"] = [call("/retried")["status"] for _ in range(20)]
out["default_retry"] = [call("/default-retry")["status"] for _ in range(60)]
out["eject"] = [call("/eject")["status"] for _ in range(30)]
with ThreadPoolExecutor(4) as ex:
    out["guarded"] = list(ex.map(lambda _: call("/guarded"), range(4)))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def run() -> Iterator[Dict[str, Any]]:
    with http_server("good", "127.0.0.2") as good, http_server("bad", "127.0.0.3") as bad, \
            http_server("slow", "127.0.0.4") as slow, http_server("shadow", "127.0.0.6") as shadow:
        bad.fail_status = 503
        slow.delay = 1.0
        with ControlPlane(_mesh(good, bad, slow, shadow)) as cp:
            assert cp.server.snapshot.config.skipped == []
            app = run_app(APP, {"MESHPATCH_XDS_SERVER": cp.address, "MESHPATCH_RESOLVE_TIMEOUT": "5"}, timeout=120)
            assert app.returncode == 0 and app.result is not None, app
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and not shadow.seen:
                time.sleep(0.05)
            assert cp.server.nacks == 0, cp.server.nack_errors
            yield {"app": app.result, "good": list(good.seen), "bad": list(bad.seen), "slow": list(slow.seen),
                   "shadow": list(shadow.seen)}


def test_redirect_and_direct_response(run: Dict[str, Any]) -> None:
    r = run["app"]["redirect"]
    assert r["status"] == 302, r
    assert {k.lower(): v for k, v in r["headers"].items()}["location"].endswith("/new"), r
    d = run["app"]["direct"]
    assert (d["status"], d["text"]) == (503, "down for maintenance")
    assert not [s for s in run["good"] + run["slow"] if s["path"] in ("/old", "/health")]


def test_rewrites_and_header_operations(run: Dict[str, Any]) -> None:
    r = run["app"]["rewrite"]
    assert r["status"] == 200 and r["json"]["server"] == "good"
    assert r["json"]["path"] == "/v2/books?id=7" and r["json"]["host"] == "rewritten.example"
    sent = r["json"]["headers"]
    assert sent.get("x-added") == "mesh" and "x-secret" not in sent
    assert r["headers"].get("x-mesh") == "meshpatch"
    assert run["app"]["regex"]["json"]["path"] == "/catalog/item-42"


def test_mirror_fault_and_matching(run: Dict[str, Any]) -> None:
    assert run["app"]["mirror"]["json"]["server"] == "good"
    assert [s["path"] for s in run["shadow"]] == ["/mirror"]
    teapot = run["app"]["teapot"]
    assert teapot["status"] == 418 and not [s for s in run["good"] if s["path"] == "/teapot"]
    assert run["app"]["query_good"]["json"]["server"] == "good"
    assert run["app"]["method_post"]["json"]["server"] == "good"
    assert run["app"]["query_other"]["json"]["server"] == "slow"  # fell through to the catch-all


def test_route_timeout(run: Dict[str, Any]) -> None:
    slow = run["app"]["slow"]
    assert slow.get("status") == 504 or "error" in slow, slow
    assert slow["elapsed"] < 0.9


def test_retries_and_istiods_default_policy(run: Dict[str, Any]) -> None:
    assert run["app"]["retried"] == [200] * 20
    # istiod >= 1.24's default policy retries connect failures and gRPC codes, not 503
    statuses = run["app"]["default_retry"]
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0
    assert binomtest(statuses.count(503), len(statuses), 0.5).pvalue > 0.001


def test_consecutive_5xx_ejection(run: Dict[str, Any]) -> None:
    statuses = run["app"]["eject"]
    bad_hits = [s for s in run["bad"] if s["path"] == "/eject"]
    assert len(bad_hits) == 2, f"the failing host was not ejected after 2 consecutive 5xx: {len(bad_hits)} hits"
    assert statuses.count(503) == 2 and statuses[-20:] == [200] * 20


def test_circuit_breaker(run: Dict[str, Any]) -> None:
    results = run["app"]["guarded"]
    slow_hits = [s for s in run["slow"] if s["path"] == "/guarded"]
    refused = [r for r in results if "error" in r or r.get("status") == 503]
    assert len(slow_hits) < 4 and refused, results
    assert all(r["elapsed"] < 0.5 for r in refused), results
