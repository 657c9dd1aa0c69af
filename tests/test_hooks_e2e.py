"""End to end: unmodified apps under ``meshpatch-run``, the real agent, the real
local control plane, real servers on 127.0.0.2 (v1) and 127.0.0.3 (v2).

The mesh (Istio YAML served by the control plane):

* ``reviews.default.svc.cluster.local``: ports 9080 (HTTP), 9443 (HTTPS), 7070
  (gRPC), 7443 (gRPC over TLS); a VirtualService sends ``/empty…`` to a subset
  with no endpoints, ``x-version: v1`` to v1, everything else 30 % v1 / 70 % v2.
* ``ratings.default.svc.cluster.local``: only ``/only…`` has a route.

Each test starts one app process that makes many calls through *one* Session /
Client / channel and prints what the servers said; per-request routing shows as
both versions answering through the same object, in the configured proportion.
Mesh hostnames never reach DNS only inside ``unshare -n`` (tests/run.sh does that).
"""

from __future__ import annotations

import contextlib
import json
import textwrap
from typing import Any, Dict, Iterator

import pytest

from tests.support.controlplane import control_plane
from tests.support.servers import grpc_server, http_server, run_app, tls_identity

pytestmark = pytest.mark.e2e

REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"
CALLS = 200
V1_SHARE = 0.30
# 200 calls at p=0.3: sd ≈ 6.5 calls; ±25 calls is ~4 sd (flake rate < 1e-4).
TOLERANCE = 25


def mesh_yaml(pods: Dict[str, Dict[str, int]]) -> str:
    def endpoint(version: str, address: str) -> str:
        ports = pods[version]
        return textwrap.dedent(f"""\
          - address: {address}
            labels: {{app: reviews, version: {version}}}
            ports: {{http: {ports['http']}, https: {ports['https']}, grpc: {ports['grpc']}, grpc-tls: {ports['grpc_tls']}}}
        """)

    reviews_endpoints = endpoint("v1", "127.0.0.2") + endpoint("v2", "127.0.0.3")
    reviews_endpoints = textwrap.indent(reviews_endpoints, "  ")
    v1 = pods["v1"]
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: reviews, namespace: default}}
        spec:
          hosts: [{REVIEWS}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports:
          - {{number: 9080, name: http, protocol: HTTP}}
          - {{number: 9443, name: https, protocol: HTTP}}
          - {{number: 7070, name: grpc, protocol: GRPC}}
          - {{number: 7443, name: grpc-tls, protocol: GRPC}}
          endpoints:
        """) + reviews_endpoints + textwrap.dedent(f"""\
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {{name: reviews, namespace: default}}
        spec:
          host: {REVIEWS}
          subsets:
          - {{name: v1, labels: {{version: v1}}}}
          - {{name: v2, labels: {{version: v2}}}}
          - {{name: v3, labels: {{version: v3}}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: reviews, namespace: default}}
        spec:
          hosts: [{REVIEWS}]
          http:
          - match: [{{uri: {{prefix: /empty}}}}]
            route: [{{destination: {{host: {REVIEWS}, subset: v3}}}}]
          - match: [{{headers: {{x-version: {{exact: v1}}}}}}]
            route: [{{destination: {{host: {REVIEWS}, subset: v1}}}}]
          - route:
            - {{destination: {{host: {REVIEWS}, subset: v1}}, weight: {int(V1_SHARE * 100)}}}
            - {{destination: {{host: {REVIEWS}, subset: v2}}, weight: {100 - int(V1_SHARE * 100)}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: ratings, namespace: default}}
        spec:
          hosts: [{RATINGS}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports:
          - {{number: 9080, name: http, protocol: HTTP}}
          - {{number: 7070, name: grpc, protocol: GRPC}}
          endpoints:
          - address: 127.0.0.2
            ports: {{http: {v1['http']}, grpc: {v1['grpc']}}}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {{name: ratings, namespace: default}}
        spec:
          hosts: [{RATINGS}]
          http:
          - match: [{{uri: {{prefix: /only}}}}]
            route: [{{destination: {{host: {RATINGS}}}}}]
        """)


class Mesh:
    def __init__(self, cp: Any, ca: str, servers: Dict[str, Any], pods: Dict[str, Dict[str, int]]) -> None:
        self.cp = cp
        self.ca = ca
        self.servers = servers
        self.pods = pods

    def env(self) -> Dict[str, str]:
        return {
            "MESHPATCH_XDS_SERVER": self.cp.address,
            # a loaded 2-core box may need more than the default 1 s for the first LDS→EDS round
            "MESHPATCH_RESOLVE_TIMEOUT": "10",
            "MESHTEST": json.dumps({"ca": self.ca, "pods": self.pods}),
        }

    def run(self, code: str, **kwargs: Any) -> Any:
        run = run_app(textwrap.dedent(code), self.env(), timeout=120, **kwargs)
        if run.returncode != 0 or run.result is None:
            pytest.fail(f"app exited {run.returncode}\n--- stdout ---\n{run.stdout[-3000:]}"
                        f"\n--- stderr ---\n{run.stderr[-6000:]}", pytrace=False)
        return run


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with contextlib.ExitStack() as stack:
        ident = stack.enter_context(tls_identity(REVIEWS))
        servers: Dict[str, Any] = {}
        pods: Dict[str, Dict[str, int]] = {}
        for version, address in (("v1", "127.0.0.2"), ("v2", "127.0.0.3")):
            servers[f"{version}_http"] = stack.enter_context(http_server(version, address))
            servers[f"{version}_https"] = stack.enter_context(http_server(version, address, tls=ident))
            servers[f"{version}_grpc"] = stack.enter_context(grpc_server(version, address))
            servers[f"{version}_grpc_tls"] = stack.enter_context(grpc_server(version, address, tls=ident))
            pods[version] = {kind: servers[f"{version}_{kind}"].port for kind in ("http", "https", "grpc", "grpc_tls")}
        cp = stack.enter_context(control_plane(mesh_yaml(pods)))
        yield Mesh(cp, ident.ca_path, servers, pods)


def assert_split(counts: Dict[str, int], total: int = CALLS) -> None:
    assert set(counts) <= {"v1", "v2"}, counts
    assert sum(counts.values()) == total, counts
    assert abs(counts.get("v1", 0) - V1_SHARE * total) <= TOLERANCE, counts


#: Defined in each app: every attempt the hooks began was ended (the clusters'
#: in-flight and per-endpoint active counts are back to zero).
UNENDED_ATTEMPTS = """
def _accounting():
    import time
    from meshpatch.agent import get_agent
    handles = get_agent().router.clusters._handles
    deadline = time.monotonic() + 3
    while True:
        left = {n: [h.in_flight, sum(s.active for s in h.states.values())] for n, h in list(handles.items())
                if h.in_flight or any(s.active for s in h.states.values())}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)
"""


# -- requests ---------------------------------------------------------------------


REQUESTS_APP = f"""
import collections, json, os
import requests
cfg = json.loads(os.environ["MESHTEST"])
H = "http://{REVIEWS}:9080"
out = {{}}
s = requests.Session()
split, conns = collections.Counter(), collections.defaultdict(set)
for i in range({CALLS}):
    d = s.get(H + f"/split/{{i}}").json()
    split[d["server"]] += 1
    conns[d["server"]].add(d["connection"])
out["split"] = split
out["connections"] = {{k: len(v) for k, v in conns.items()}}
out["module_get"] = collections.Counter(requests.get(H + "/get").json()["server"] for _ in range(40))

r = s.get(H + "/names?q=1")
d = r.json()
out["names"] = {{"url": r.url, "request_url": r.request.url, "host": d["host"], "path": d["path"],
                "bind": d["bind"], "host_header_left": "Host" in r.request.headers}}
out["custom_host"] = s.get(H + "/h", headers={{"Host": "custom.example"}}).json()["host"]
out["header_route"] = collections.Counter(
    s.get(H + "/hdr", headers={{"x-version": "v1"}}).json()["server"] for _ in range(20))
out["post"] = s.post(H + "/post", data=b"hello").json()["body"]

r = s.get(H + "/redirect?to=/final")
out["redirect"] = {{"url": r.url, "history": [h.url for h in r.history], "path": r.json()["path"],
                   "host": r.json()["host"]}}

r = s.get("https://{REVIEWS}:9443/tls", verify=cfg["ca"])
out["https"] = {{"url": r.url, "sni": r.json()["sni"], "host": r.json()["host"], "server": r.json()["server"]}}
try:
    requests.get(f"https://127.0.0.2:{{cfg['pods']['v1']['https']}}/", verify=cfg["ca"])
    out["ip_tls"] = "ok"
except requests.exceptions.SSLError:
    out["ip_tls"] = "SSLError"

for key, url in (("no_upstream", H + "/empty"), ("no_route", "http://{RATINGS}:9080/other")):
    try:
        s.get(url)
        out[key] = "sent"
    except requests.exceptions.ConnectionError as exc:
        out[key] = str(exc)
out["ratings_only"] = s.get("http://{RATINGS}:9080/only").json()["bind"]
out["direct"] = s.get(f"http://127.0.0.3:{{cfg['pods']['v2']['http']}}/direct").json()["host"]

from meshpatch.agent import get_agent
from meshpatch.internal import suppressed
with suppressed():
    try:
        requests.get("http://suppressed.default.svc.cluster.local:9080/", timeout=5)
        out["suppressed"] = "sent"
    except requests.exceptions.ConnectionError:
        out["suppressed"] = "ConnectionError"
out["targets"] = sorted(get_agent().router.targets())
{UNENDED_ATTEMPTS}
out["unended_attempts"] = _accounting()
print("RESULT " + json.dumps(out))
"""


def test_requests_routes_each_request(mesh: Mesh) -> None:
    r = mesh.run(REQUESTS_APP).result
    assert r["unended_attempts"] == {}  # each begun attempt was reported ended
    assert_split(r["split"])
    assert r["connections"] == {"v1": 1, "v2": 1}  # keep-alive per endpoint
    assert set(r["module_get"]) == {"v1", "v2"} and sum(r["module_get"].values()) == 40
    names = r["names"]
    assert names["url"] == names["request_url"] == f"http://{REVIEWS}:9080/names?q=1"
    assert names["host"] == f"{REVIEWS}:9080" and names["path"] == "/names?q=1"
    assert names["bind"].split(":")[0] in ("127.0.0.2", "127.0.0.3")
    assert names["host_header_left"] is False  # our Host header is not left on the app's request
    assert r["custom_host"] == "custom.example"
    assert r["header_route"] == {"v1": 20}
    assert r["post"] == "hello"
    assert r["redirect"] == {"url": f"http://{REVIEWS}:9080/final", "history": [f"http://{REVIEWS}:9080/redirect?to=/final"],
                             "path": "/final", "host": f"{REVIEWS}:9080"}
    assert r["https"]["url"] == f"https://{REVIEWS}:9443/tls"
    assert r["https"]["sni"] == REVIEWS and r["https"]["host"] == f"{REVIEWS}:9443"
    assert r["ip_tls"] == "SSLError"  # control: the certificate does not name the pod address
    assert "no healthy upstream" in r["no_upstream"] and REVIEWS in r["no_upstream"]
    assert "no route matched" in r["no_route"] and "/other" in r["no_route"]
    assert r["ratings_only"] == f"127.0.0.2:{mesh.pods['v1']['http']}"
    assert r["direct"] == f"127.0.0.3:{mesh.pods['v2']['http']}"
    assert r["suppressed"] == "ConnectionError"  # not rerouted: plain DNS, which fails in the netns
    assert not any(t.startswith("suppressed.") for t in r["targets"])
    assert f"{REVIEWS}:9080" in r["targets"]


# -- httpx ------------------------------------------------------------------------


HTTPX_APP = f"""
import asyncio, collections, json, os
import httpx
cfg = json.loads(os.environ["MESHTEST"])
H = "http://{REVIEWS}:9080"
out = {{}}
client = httpx.Client()
split, conns = collections.Counter(), collections.defaultdict(set)
for i in range({CALLS}):
    d = client.get(H + f"/split/{{i}}").json()
    split[d["server"]] += 1
    conns[d["server"]].add(d["connection"])
out["split"] = split
out["connections"] = {{k: len(v) for k, v in conns.items()}}
out["module_get"] = collections.Counter(httpx.get(H + "/get").json()["server"] for _ in range(20))
r = client.get(H + "/names?q=1")
out["names"] = {{"url": str(r.url), "request_url": str(r.request.url), "host": r.json()["host"],
                "path": r.json()["path"], "sni_left": "sni_hostname" in r.request.extensions}}
out["header_route"] = collections.Counter(
    client.get(H + "/hdr", headers={{"x-version": "v1"}}).json()["server"] for _ in range(20))
r = httpx.get("https://{REVIEWS}:9443/tls", verify=cfg["ca"])
out["https"] = {{"url": str(r.url), "sni": r.json()["sni"], "host": r.json()["host"]}}
for key, url in (("no_upstream", H + "/empty"), ("no_route", "http://{RATINGS}:9080/other")):
    try:
        client.get(url)
        out[key] = "sent"
    except httpx.ConnectError as exc:
        out[key] = str(exc)

seen = []
mock = httpx.Client(transport=httpx.MockTransport(lambda req: (seen.append(str(req.url)), httpx.Response(204))[1]))
out["mock"] = [mock.get(H + "/mock").status_code, seen]

async def main_tls():
    async with httpx.AsyncClient(verify=cfg["ca"]) as ac:
        r = await ac.get("https://{REVIEWS}:9443/atls")
        try:
            await ac.get(H + "/empty")
            err = "sent"
        except httpx.ConnectError as exc:
            err = str(exc)
        return str(r.url), r.json()["sni"], err

async def main_split():
    async with httpx.AsyncClient() as ac:
        counts = collections.Counter()
        for i in range({CALLS}):
            counts[(await ac.get(H + f"/async/{{i}}")).json()["server"]] += 1
        return counts

out["async_split"] = asyncio.run(main_split())
out["async_tls"] = asyncio.run(main_tls())
{UNENDED_ATTEMPTS}
out["unended_attempts"] = _accounting()
print("RESULT " + json.dumps(out))
"""


def test_httpx_routes_each_request_sync_and_async(mesh: Mesh) -> None:
    r = mesh.run(HTTPX_APP).result
    assert r["unended_attempts"] == {}  # each begun attempt was reported ended
    assert_split(r["split"])
    assert r["connections"] == {"v1": 1, "v2": 1}
    assert set(r["module_get"]) == {"v1", "v2"}
    assert r["names"] == {"url": f"http://{REVIEWS}:9080/names?q=1", "request_url": f"http://{REVIEWS}:9080/names?q=1",
                          "host": f"{REVIEWS}:9080", "path": "/names?q=1", "sni_left": False}
    assert r["header_route"] == {"v1": 20}
    assert r["https"] == {"url": f"https://{REVIEWS}:9443/tls", "sni": REVIEWS, "host": f"{REVIEWS}:9443"}
    assert "no healthy upstream" in r["no_upstream"]
    assert "no route matched" in r["no_route"]
    assert r["mock"] == [204, [f"http://{REVIEWS}:9080/mock"]]  # custom transports are left alone
    assert_split(r["async_split"])
    assert r["async_tls"][:2] == [f"https://{REVIEWS}:9443/atls", REVIEWS]
    assert "no healthy upstream" in r["async_tls"][2]


# -- grpc -------------------------------------------------------------------------


GRPC_APP = f"""
import collections, json, os
import grpc
from tests_servers_constants import *
cfg = json.loads(os.environ["MESHTEST"])
T = "{REVIEWS}:7070"
out = {{}}
channel = grpc.insecure_channel(T)
out["channel_type"] = [isinstance(channel, grpc.Channel), type(channel).__name__]
grpc.channel_ready_future(channel).result(timeout=10)
unary = channel.unary_unary(UNARY)
split, authorities = collections.Counter(), set()
for i in range({CALLS}):
    d = json.loads(unary(b"%d" % i, timeout=10))
    split[d["server"]] += 1
    authorities.add(d["authority"])
out["split"] = split
out["authorities"] = sorted(authorities)
out["forms"] = {{
    "with_call": json.loads(unary.with_call(b"w", timeout=10)[0])["method"],
    "future": json.loads(unary.future(b"f", timeout=10).result())["method"],
    "server_stream": [json.loads(x)["method"] for x in channel.unary_stream(SERVER_STREAM)(b"s", timeout=10)],
    "client_stream": json.loads(channel.stream_unary(CLIENT_STREAM)(iter([b"a", b"b"]), timeout=10))["request"],
    "bidi": [json.loads(x)["request"] for x in channel.stream_stream(BIDI_STREAM)(iter([b"a", b"b"]), timeout=10)],
}}
out["metadata_route"] = collections.Counter(
    json.loads(unary(b"m", metadata=(("x-version", "v1"),), timeout=10))["server"] for _ in range(20))

class AddVersion(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(self, continuation, details, request):
        details = details._replace(metadata=list(details.metadata or ()) + [("x-version", "v1")])
        return continuation(details, request)

intercepted = grpc.intercept_channel(channel, AddVersion())
out["interceptor_route"] = collections.Counter(
    json.loads(intercepted.unary_unary(UNARY)(b"i", timeout=10))["server"] for _ in range(20))

with grpc.insecure_channel("dns:///" + T) as dns_channel:
    out["dns_target"] = sorted({{json.loads(dns_channel.unary_unary(UNARY)(b"d", timeout=10))["authority"] for _ in range(10)}})

with open(cfg["ca"], "rb") as f:
    creds = grpc.ssl_channel_credentials(root_certificates=f.read())
tls = grpc.secure_channel("{REVIEWS}:7443", creds)
tls_seen = collections.Counter()
for _ in range(40):
    d = json.loads(tls.unary_unary(UNARY)(b"t", timeout=10))
    tls_seen[d["server"]] += 1
out["tls"] = [sorted(tls_seen), d["authority"]]

errors = {{}}
for key, target, method in (("no_upstream", T, "/empty.Svc/Call"), ("no_route", "{RATINGS}:7070", UNARY)):
    ch = grpc.insecure_channel(target)
    try:
        ch.unary_unary(method)(b"x", timeout=10)
        errors[key] = "sent"
    except grpc.RpcError as exc:
        errors[key] = [str(exc.code()), exc.details()]
    fut = ch.unary_unary(method).future(b"x")
    errors[key + "_future"] = str(fut.exception().code())
    try:
        list(ch.unary_stream(method)(b"x"))
    except grpc.RpcError as exc:
        errors[key + "_stream"] = str(exc.code())
out["errors"] = errors

direct = grpc.insecure_channel("127.0.0.3:%d" % cfg["pods"]["v2"]["grpc"])
out["direct"] = [type(direct).__name__, json.loads(direct.unary_unary(UNARY)(b"x", timeout=10))["server"]]
endpoints = sorted(":".join(map(str, e)) for e in channel.endpoints())
channel.close()
try:
    unary(b"closed", timeout=5)
    out["after_close"] = "sent"
except ValueError as exc:
    out["after_close"] = "ValueError"
except grpc.RpcError as exc:
    out["after_close"] = str(exc.code())
out["endpoints"] = endpoints
{UNENDED_ATTEMPTS}
out["unended_attempts"] = _accounting()
print("RESULT " + json.dumps(out))
"""

GRPC_AIO_APP = f"""
import asyncio, collections, json, os
import grpc, grpc.aio
from tests_servers_constants import *
cfg = json.loads(os.environ["MESHTEST"])
T = "{REVIEWS}:7070"

async def main():
    out = {{}}
    async with grpc.aio.insecure_channel(T) as channel:
        out["channel_type"] = [isinstance(channel, grpc.aio.Channel), type(channel).__name__]
        await asyncio.wait_for(channel.channel_ready(), 10)
        unary = channel.unary_unary(UNARY)
        split, authorities = collections.Counter(), set()
        for i in range({CALLS}):
            d = json.loads(await unary(b"%d" % i, timeout=10))
            split[d["server"]] += 1
            authorities.add(d["authority"])
        out["split"] = split
        out["authorities"] = sorted(authorities)
        out["server_stream"] = [json.loads(x)["method"] async for x in channel.unary_stream(SERVER_STREAM)(b"s", timeout=10)]
        call = channel.stream_stream(BIDI_STREAM)(timeout=10)
        await call.write(b"one")
        first = json.loads(await call.read())["request"]
        await call.done_writing()
        out["bidi"] = first
        out["metadata_route"] = collections.Counter([
            json.loads(await unary(b"m", metadata=(("x-version", "v1"),), timeout=10))["server"] for _ in range(20)])
        try:
            await channel.unary_unary("/empty.Svc/Call")(b"x", timeout=10)
            out["no_upstream"] = "sent"
        except grpc.aio.AioRpcError as exc:
            out["no_upstream"] = [str(exc.code()), exc.details()]
        failed = channel.unary_stream("/empty.Svc/Call")(b"x")
        try:
            async for _ in failed:
                pass
        except grpc.aio.AioRpcError as exc:
            out["no_upstream_stream"] = str(exc.code())
    await asyncio.sleep(0.3)  # the done-callbacks' reports run on this loop
    out["unended_attempts"] = _accounting()
    return out

{UNENDED_ATTEMPTS}
print("RESULT " + json.dumps(asyncio.run(main())))
"""

CONSTANTS = (
    "UNARY = {u!r}\nSERVER_STREAM = {s!r}\nCLIENT_STREAM = {c!r}\nBIDI_STREAM = {b!r}\n"
)


def _with_constants(code: str) -> str:
    from tests.support import servers

    constants = CONSTANTS.format(u=servers.UNARY, s=servers.SERVER_STREAM, c=servers.CLIENT_STREAM,
                                 b=servers.BIDI_STREAM)
    return code.replace("from tests_servers_constants import *\n", constants)


def test_grpc_routes_each_rpc_on_one_channel(mesh: Mesh) -> None:
    r = mesh.run(_with_constants(GRPC_APP)).result
    assert r["unended_attempts"] == {}  # each begun attempt was reported ended
    assert r["channel_type"] == [True, "MeshChannel"]
    assert_split(r["split"])
    assert r["authorities"] == [f"{REVIEWS}:7070"]
    from tests.support.servers import BIDI_STREAM, SERVER_STREAM, UNARY

    assert r["forms"] == {"with_call": UNARY, "future": UNARY, "server_stream": [SERVER_STREAM] * 3,
                          "client_stream": "a,b", "bidi": ["a", "b"]}
    assert r["metadata_route"] == {"v1": 20}
    assert r["interceptor_route"] == {"v1": 20}
    assert r["dns_target"] == [f"{REVIEWS}:7070"]
    assert r["tls"] == [["v1", "v2"], f"{REVIEWS}:7443"]
    errors = r["errors"]
    assert errors["no_upstream"][0] == "StatusCode.UNAVAILABLE" and "no healthy upstream" in errors["no_upstream"][1]
    assert errors["no_route"][0] == "StatusCode.UNAVAILABLE" and "no route matched" in errors["no_route"][1]
    for key in ("no_upstream", "no_route"):
        assert errors[f"{key}_future"] == errors[f"{key}_stream"] == "StatusCode.UNAVAILABLE"
    assert r["direct"] == ["Channel", "v2"]  # IP targets keep grpc's own channel
    assert r["after_close"] == "ValueError"
    assert set(r["endpoints"]) == {f"127.0.0.2:{mesh.pods['v1']['grpc']}", f"127.0.0.3:{mesh.pods['v2']['grpc']}"}


def test_grpc_aio_routes_each_rpc_on_one_channel(mesh: Mesh) -> None:
    r = mesh.run(_with_constants(GRPC_AIO_APP)).result
    assert r["unended_attempts"] == {}  # each begun attempt was reported ended
    assert r["channel_type"] == [True, "MeshAioChannel"]
    assert_split(r["split"])
    assert r["authorities"] == [f"{REVIEWS}:7070"]
    assert len(r["server_stream"]) == 3
    assert r["bidi"] == "one"
    assert r["metadata_route"] == {"v1": 20}
    assert r["no_upstream"][0] == "StatusCode.UNAVAILABLE" and "no healthy upstream" in r["no_upstream"][1]
    assert r["no_upstream_stream"] == "StatusCode.UNAVAILABLE"


# -- fail-open ----------------------------------------------------------------------


FAIL_OPEN_APP = """
import asyncio, json, os
import grpc, httpx, requests
from meshpatch import safety
from meshpatch.agent import get_agent
from tests_servers_constants import *
cfg = json.loads(os.environ["MESHTEST"])

def boom(*args, **kwargs):
    raise RuntimeError("router bug")

get_agent().router.pick = boom
get_agent().router.start = boom
H = "http://127.0.0.2:%d" % cfg["pods"]["v1"]["http"]
out = {
    "requests": [requests.get(H + "/a").json()["server"], requests.get(H + "/b").json()["server"]],
    "httpx": [httpx.get(H + "/c").json()["server"], httpx.get(H + "/d").json()["server"]],
}
channel = grpc.insecure_channel("reviews.default.svc.cluster.local:7070")
try:
    channel.unary_unary(UNARY)(b"x", timeout=3)
    out["grpc"] = "sent"
except grpc.RpcError as exc:
    out["grpc"] = str(exc.code())  # the original target, which DNS cannot resolve in the netns
out["counts"] = safety.error_counts()
print("RESULT " + json.dumps(out))
"""


def test_internal_errors_fail_open_and_log_once_per_site(mesh: Mesh) -> None:
    run = mesh.run(_with_constants(FAIL_OPEN_APP))
    r = run.result
    assert r["requests"] == ["v1", "v1"] and r["httpx"] == ["v1", "v1"]
    assert r["grpc"] == "StatusCode.UNAVAILABLE"
    assert r["counts"]["hooks.requests.send"] == 2
    assert r["counts"]["hooks.httpx.handle_request"] == 2
    assert r["counts"]["hooks.grpc.pick"] >= 1
    assert run.stderr.count("meshpatch internal error in hooks.requests.send") == 1
    assert run.stderr.count("meshpatch internal error in hooks.httpx.handle_request") == 1


# -- objects created before the patch ----------------------------------------------------


LATE_ACTIVATION_APP = f"""
import collections, json, os
import httpx, requests
session, client = requests.Session(), httpx.Client()  # made before meshpatch patched anything
os.environ["MESHPATCH_ENABLED"] = "1"
import meshpatch.activation as a
a.activate("late")
H = "http://{REVIEWS}:9080"
out = {{
    "states": a.hook_states(),
    "requests": collections.Counter(session.get(H + "/late").json()["server"] for _ in range(40)),
    "httpx": collections.Counter(client.get(H + "/late").json()["server"] for _ in range(40)),
}}
print("RESULT " + json.dumps(out))
"""


def test_sessions_and_clients_made_before_the_patch_are_routed(mesh: Mesh) -> None:
    r = mesh.run(LATE_ACTIVATION_APP, patched=False).result
    for name in ("requests", "httpx"):
        assert r["states"][name]["state"] == "applied"
        assert "imported before activation" in r["states"][name]["detail"]
        assert set(r[name]) == {"v1", "v2"} and sum(r[name].values()) == 40
