"""An endpoint that dies under load: requests move off it.

Written ahead of issue 3: moving traffic off a dead endpoint needs per-attempt
outcome reporting from the hooks, retries on connect failure and ejection of
an endpoint after connect failures (``meshpatch.routing.outcome`` and the route
policies).  The test skips itself where that module does not exist and runs
as is where it does.  The bench with the same scenario at 500 req/s is
bench/bench_endpoint_kill.py.
"""

from __future__ import annotations

import importlib.util
import textwrap
import threading
import time
from typing import Dict

import pytest

from tests.support.controlplane import control_plane
from tests.support.servers import http_server, run_app

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("meshpatch.routing.outcome") is None,
                       reason="needs issue 3: per-attempt outcomes, retries and connect-failure ejection"),
]

HOST = "reviews.default.svc.cluster.local"


def mesh(ports: Dict[str, int]) -> str:
    eps = "\n".join(f"  - {{address: {a}, ports: {{http: {p}}}}}" for a, p in ports.items())
    return textwrap.dedent(f"""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {{name: reviews, namespace: default}}
        spec:
          hosts: [{HOST}]
          location: MESH_INTERNAL
          resolution: STATIC
          ports: [{{number: 9080, name: http, protocol: HTTP}}]
          endpoints:
        """) + eps + "\n"


LOAD_APP = textwrap.dedent("""
    import json, threading, time, requests
    results, lock = [], threading.Lock()
    end = time.monotonic() + {seconds}
    def worker():
        session = requests.Session()
        while time.monotonic() < end:
            t = time.monotonic()
            try:
                server = session.get("http://{host}:9080/", timeout=5).json()["server"]
            except Exception as exc:
                server = "error: " + type(exc).__name__
            with lock:
                results.append([t, server])
            time.sleep(max(0.0, {interval} - (time.monotonic() - t)))
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    print("RESULT " + json.dumps(results))
""")


def test_dead_endpoint_is_left_within_a_few_calls() -> None:
    with http_server("a", "127.0.0.2") as a, http_server("b", "127.0.0.3") as b, http_server("c", "127.0.0.4") as c:
        pods = {"127.0.0.2": a.port, "127.0.0.3": b.port, "127.0.0.4": c.port}
        with control_plane(mesh(pods)) as cp:
            out: Dict[str, object] = {}
            app = threading.Thread(target=lambda: out.setdefault("run", run_app(
                LOAD_APP.format(seconds=5, host=HOST, interval=4 / 200),
                {"MESHPATCH_XDS_SERVER": cp.address, "MESHPATCH_RESOLVE_TIMEOUT": "5"}, timeout=60)))
            app.start()
            time.sleep(2.0)
            b.kill()
            app.join()
    run = out["run"]
    assert run.returncode == 0, run  # type: ignore[attr-defined]
    results = run.result  # type: ignore[attr-defined]
    failed = [r for r in results if r[1].startswith("error")]
    assert len(results) > 500
    assert 1 - len(failed) / len(results) >= 0.999, (len(failed), len(results), failed[:3])
    late = [r for r in results if r[0] > results[-1][0] - 1.5]
    assert all(r[1] in ("a", "c") for r in late)  # the dead one gets nothing any more
