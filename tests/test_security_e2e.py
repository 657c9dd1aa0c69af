"""End to end, client side: unmodified apps under ``meshpatch-run`` call
``http://reviews…`` and ``insecure_channel("reviews…")``; the local control
plane's DestinationRule says ISTIO_MUTUAL; meshpatch originates mTLS with the
certificates istio-agent would have written (a bootstrap's
``certificate_providers``) to servers that require a client certificate and
report the caller's SPIFFE identity.

* ``reviews`` (127.0.0.2) presents ``spiffe://cluster.local/ns/default/sa/reviews``;
* ``fake`` (127.0.0.3) claims service account ``reviews`` in its ServiceEntry
  but presents ``…/sa/impostor``: every library must refuse it before sending;
* ``plain`` (127.0.0.4) has no DestinationRule: plaintext stays plaintext.
"""

from __future__ import annotations

import contextlib
import json
import textwrap
import time
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest

from tests.support.controlplane import bootstrap_config, control_plane
from tests.support.longapp import LongApp
from tests.support.mtls import mtls_grpc_server, mtls_http_server
from tests.support.pki import MeshCA, spiffe_id, with_certificate_providers
from tests.support.servers import grpc_server, http_server, run_app

pytestmark = pytest.mark.e2e

REVIEWS = "reviews.default.svc.cluster.local"
FAKE = "fake.default.svc.cluster.local"
PLAIN = "plain.default.svc.cluster.local"
CLIENT_ID = spiffe_id("default", "client")


def mesh_yaml(ports: Dict[str, Dict[str, int]]) -> str:
    def service(host: str, name: str, address: str, pod: Dict[str, int], sa: str, tls: bool) -> str:
        out = textwrap.dedent(f"""\
            ---
            apiVersion: networking.istio.io/v1
            kind: ServiceEntry
            metadata: {{name: {name}, namespace: default}}
            spec:
              hosts: [{host}]
              location: MESH_INTERNAL
              resolution: STATIC
              ports: [{{number: 9080, name: http, protocol: HTTP}}, {{number: 7070, name: grpc, protocol: GRPC}}]
              endpoints:
              - {{address: {address}, serviceAccount: {sa}, ports: {{http: {pod['http']}, grpc: {pod['grpc']}}}}}
            """)
        if tls:
            out += textwrap.dedent(f"""\
                ---
                apiVersion: networking.istio.io/v1
                kind: DestinationRule
                metadata: {{name: {name}, namespace: default}}
                spec:
                  host: {host}
                  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
                """)
        return out

    return (service(REVIEWS, "reviews", "127.0.0.2", ports["reviews"], "reviews", True)
            + service(FAKE, "fake", "127.0.0.3", ports["fake"], "reviews", True)
            + service(PLAIN, "plain", "127.0.0.4", ports["plain"], "plain", False))


class Mesh:
    def __init__(self, cp: Any, ca: MeshCA, tmp: Path, servers: Dict[str, Any]) -> None:
        self.cp = cp
        self.ca = ca
        self.servers = servers
        self.client_certs = ca.workload_dir(tmp / "client-certs", "default", "client")
        self.bootstrap = tmp / "bootstrap.json"
        self.bootstrap.write_text(json.dumps(with_certificate_providers(bootstrap_config(cp.address), self.client_certs)))

    def env(self) -> Dict[str, str]:
        return {"GRPC_XDS_BOOTSTRAP": str(self.bootstrap), "MESHPATCH_RESOLVE_TIMEOUT": "10"}

    def run(self, code: str) -> Any:
        run = run_app(textwrap.dedent(code), self.env(), timeout=120)
        if run.returncode != 0 or run.result is None:
            pytest.fail(f"app exited {run.returncode}\n--- stdout ---\n{run.stdout[-3000:]}"
                        f"\n--- stderr ---\n{run.stderr[-6000:]}", pytrace=False)
        return run.result


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("security-e2e")
    ca = MeshCA()
    reviews, impostor = ca.issue("default", "reviews"), ca.issue("default", "impostor")
    with contextlib.ExitStack() as stack:
        servers = {
            "reviews_http": stack.enter_context(mtls_http_server("reviews", "127.0.0.2", reviews)),
            "reviews_grpc": stack.enter_context(mtls_grpc_server("reviews", "127.0.0.2", reviews)),
            "fake_http": stack.enter_context(mtls_http_server("fake", "127.0.0.3", impostor)),
            "fake_grpc": stack.enter_context(mtls_grpc_server("fake", "127.0.0.3", impostor)),
            "plain_http": stack.enter_context(http_server("plain", "127.0.0.4")),
            "plain_grpc": stack.enter_context(grpc_server("plain", "127.0.0.4")),
        }
        ports = {name: {"http": servers[f"{name}_http"].port, "grpc": servers[f"{name}_grpc"].port}
                 for name in ("reviews", "fake", "plain")}
        cp = stack.enter_context(control_plane(mesh_yaml(ports)))
        yield Mesh(cp, ca, tmp, servers)


CLIENTS_APP = f"""
import asyncio, json
import requests, httpx, grpc, grpc.aio
UNARY = "/meshtest.Echo/Unary"
out = {{}}

def record(kind, replies):
    out[kind] = {{"peers": sorted({{str(r.get("peer")) for r in replies}}),
                  "connections": sorted({{r.get("connection") for r in replies if r.get("connection")}}),
                  "servers": sorted({{r["server"] for r in replies}}), "n": len(replies)}}

s = requests.Session()
record("requests", [s.get("http://{REVIEWS}:9080/r/%d" % i).json() for i in range(10)])
c = httpx.Client()
record("httpx", [c.get("http://{REVIEWS}:9080/x/%d" % i).json() for i in range(10)])

async def aio_httpx():
    async with httpx.AsyncClient() as ac:
        return [(await ac.get("http://{REVIEWS}:9080/a/%d" % i)).json() for i in range(5)]
record("httpx_async", asyncio.run(aio_httpx()))

ch = grpc.insecure_channel("{REVIEWS}:7070")
record("grpc", [json.loads(ch.unary_unary(UNARY)(b"x", timeout=10)) for i in range(10)])

async def aio_grpc():
    async with grpc.aio.insecure_channel("{REVIEWS}:7070") as ach:
        return [json.loads(await ach.unary_unary(UNARY)(b"x", timeout=10)) for i in range(5)]
record("grpc_aio", asyncio.run(aio_grpc()))

# the impostor: every library must refuse it
refused = {{}}
for kind, call in (("requests", lambda: s.get("http://{FAKE}:9080/")),
                   ("httpx", lambda: c.get("http://{FAKE}:9080/")),
                   ("grpc", lambda: grpc.insecure_channel("{FAKE}:7070").unary_unary(UNARY)(b"x", timeout=10))):
    try:
        call()
        refused[kind] = "SENT"
    except Exception as exc:
        refused[kind] = type(exc).__name__ + ": " + str(exc)[:400]

async def aio_fake():
    async with grpc.aio.insecure_channel("{FAKE}:7070") as ach:
        try:
            await ach.unary_unary(UNARY)(b"x", timeout=10)
            return "SENT"
        except grpc.aio.AioRpcError as exc:
            return "AioRpcError: " + str(exc.code()) + " " + exc.details()[:300]
refused["grpc_aio"] = asyncio.run(aio_fake())
async def httpx_fake():
    async with httpx.AsyncClient() as ac:
        try:
            await ac.get("http://{FAKE}:9080/")
            return "SENT"
        except httpx.ConnectError as exc:
            return "ConnectError: " + str(exc)[:300]
refused["httpx_async"] = asyncio.run(httpx_fake())
out["refused"] = refused

# no DestinationRule: plaintext, as before
out["plain"] = [s.get("http://{PLAIN}:9080/p").json()["server"],
                json.loads(grpc.insecure_channel("{PLAIN}:7070").unary_unary(UNARY)(b"x", timeout=10))["server"]]
from meshpatch import introspect  # what `meshpatch status` shows
status = introspect.status()
out["clusters_mtls"] = {{c["name"]: c["mtls"] for c in status["clusters"]}}
out["providers"] = status["security"]["certificate_providers"]
print("RESULT " + json.dumps(out))
"""


def test_mtls_origination_and_spiffe_checks_for_every_library(mesh: Mesh) -> None:
    before = {k: (getattr(v, "requests", None), getattr(v, "calls", None)) for k, v in mesh.servers.items()}
    r = mesh.run(CLIENTS_APP)
    for kind in ("requests", "httpx", "httpx_async", "grpc", "grpc_aio"):
        assert r[kind]["servers"] == ["reviews"], (kind, r[kind])
        assert r[kind]["peers"] == [str([CLIENT_ID])], (kind, r[kind])  # the server saw the client's identity
    for kind in ("requests", "httpx", "httpx_async"):
        assert len(r[kind]["connections"]) == 1, (kind, r[kind])  # one mTLS connection, reused
    for kind, error in r["refused"].items():
        assert error != "SENT" and ("impostor" in error or "SANs" in error), (kind, error)
    # refused before a byte of the request: the impostor servers never saw a request
    assert mesh.servers["fake_http"].requests == before["fake_http"][0]
    assert mesh.servers["fake_grpc"].calls == before["fake_grpc"][1]
    assert r["plain"] == ["plain", "plain"]
    mtls = r["clusters_mtls"]
    assert mtls[f"outbound|9080||{REVIEWS}"]["match_subject_alt_names"] == [f"exact {spiffe_id('default', 'reviews')!r}"]
    assert mtls[f"outbound|9080||{PLAIN}"] is None
    assert r["providers"]["default"]["generation"] == 1 and r["providers"]["default"]["reloads"] == 1


ROTATION_APP = f"""
import json, sys, threading, time
import requests, httpx, grpc
UNARY = "/meshtest.Echo/Unary"
stop = threading.Event()
stats = {{}}

def loop(kind, call):
    ok, errors, serials = 0, [], []
    while not stop.is_set():
        try:
            reply = call()
            ok += 1
            if not serials or serials[-1] != reply["peer_serial"]:
                serials.append(reply["peer_serial"])
        except Exception as exc:
            errors.append(repr(exc)[:300])
        time.sleep(0.01)
    stats[kind] = {{"ok": ok, "errors": errors, "serials": serials}}

s, c, ch = requests.Session(), httpx.Client(), grpc.insecure_channel("{REVIEWS}:7070")
workers = [threading.Thread(target=loop, args=args) for args in (
    ("requests", lambda: s.get("http://{REVIEWS}:9080/rot").json()),
    ("httpx", lambda: c.get("http://{REVIEWS}:9080/rot").json()),
    ("grpc", lambda: json.loads(ch.unary_unary(UNARY)(b"x", timeout=10))),
)]
for w in workers:
    w.start()
time.sleep(0.5)
print("READY", flush=True)
sys.stdin.readline()  # the test rotated the certificate files and waited
stop.set()
for w in workers:
    w.join()
print("RESULT " + json.dumps(stats), flush=True)
"""


def test_certificate_rotation_under_load_loses_no_call(mesh: Mesh) -> None:
    with LongApp(ROTATION_APP, mesh.env()) as app:
        app.wait_for("READY")
        time.sleep(0.5)
        old_serial = mesh.client_certs.current.chain_pem
        mesh.client_certs.rotate()  # istio-agent writes cert, key, root one after the other
        assert mesh.client_certs.current.chain_pem != old_serial
        time.sleep(3.0)  # stat poll (1 s) + new connections + steady calls on the new certificate
        app.send("done")
        stats = app.json("RESULT")
    for kind, result in stats.items():
        assert result["errors"] == [], (kind, result["errors"][:3])
        assert result["ok"] > 20, (kind, result)
        # the server saw the old certificate, then only the new one: new connections use it
        assert len(result["serials"]) == 2, (kind, result["serials"])
