"""Consul and Nacos, file registries, and registry-only routing with no xDS.

Consul and Nacos servers cannot run on this machine, so their tests use small
local servers speaking the documented HTTP APIs (tests/support/registries.py):
meshpatch's real client code talks real HTTP to them on loopback."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.support.controlplane import control_plane
from tests.support.registries import AppSession, FakeConsul, FakeNacos
from tests.support.servers import http_server, run_app

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_consul_blocking_queries_health_and_deregistration() -> None:
    with FakeConsul() as consul, http_server("a", "127.0.0.2") as a, http_server("b", "127.0.0.3") as b:
        consul.register("user-service", "u1", "127.0.0.2", a.port, meta={"version": "v1"})
        consul.register("user-service", "u2", "127.0.0.3", b.port, meta={"version": "v1"})
        env = {"MESHPATCH_REGISTRY": f"consul://{consul.address}?wait=5s", "MESHPATCH_RESOLVE_TIMEOUT": "5"}
        with AppSession(env) as app:
            assert app.http("http://user-service/profile", 20) == {"a": 10, "b": 10}
            consul.register("user-service", "u2", "127.0.0.3", b.port, status="critical")  # failing check
            app.until(lambda: app.http("http://user-service/profile", 10), lambda seen: seen == {"a": 10})
            consul.register("user-service", "u2", "127.0.0.3", b.port, status="passing")
            consul.deregister("user-service", "u1")
            app.until(lambda: app.http("http://user-service/profile", 10), lambda seen: seen == {"b": 10})
            # the kubernetes FQDN of the same service in the app's namespace reaches it too
            assert app.http("http://user-service.default.svc.cluster.local/", 2) == {"b": 2}
        blocking = [r for r in consul.requests if r.startswith("/v1/health/service/user-service") and "index=" in r]
        assert blocking and all("wait=5s" in r for r in blocking), consul.requests
        # only the names the app called were asked for
        asked = {r.split("?")[0] for r in consul.requests if r.startswith("/v1/health/service/")}
        assert asked <= {"/v1/health/service/user-service", "/v1/health/service/user-service.default.svc.cluster.local"}


def test_nacos_instance_list_kept_fresh_with_namespace_and_group() -> None:
    with FakeNacos() as nacos, http_server("a", "127.0.0.2") as a, http_server("b", "127.0.0.3") as b:
        nacos.register("order-service", "127.0.0.2", a.port, namespace="dev", group="SHOP")
        nacos.register("order-service", "127.0.0.3", b.port, namespace="dev", group="SHOP")
        nacos.register("order-service", "127.0.0.9", a.port, namespace="", group="DEFAULT_GROUP")  # another namespace
        env = {"MESHPATCH_REGISTRY": f"nacos://{nacos.address}?namespace=dev&group=SHOP&interval=0.2",
               "MESHPATCH_RESOLVE_TIMEOUT": "5"}
        with AppSession(env) as app:
            assert app.http("http://order-service/orders", 20) == {"a": 10, "b": 10}
            nacos.register("order-service", "127.0.0.3", b.port, namespace="dev", group="SHOP", enabled=False)
            app.until(lambda: app.http("http://order-service/orders", 10), lambda seen: seen == {"a": 10})
            nacos.register("order-service", "127.0.0.3", b.port, namespace="dev", group="SHOP", weight=1.0)
            nacos.deregister("order-service", "127.0.0.2", a.port, namespace="dev", group="SHOP")
            app.until(lambda: app.http("http://order-service/orders", 10), lambda seen: seen == {"b": 10})
            nacos.close()  # Nacos goes away: the last list stays
            time.sleep(0.6)
            assert app.http("http://order-service/orders", 5) == {"b": 5}
        first = next(r for r in nacos.requests if "order-service" in r)
        assert "namespaceId=dev" in first and "groupName=SHOP" in first


def test_nacos_3_client_api() -> None:
    with FakeNacos(apis=("v3",)) as nacos, http_server("a", "127.0.0.2") as a:
        nacos.register("svc", "127.0.0.2", a.port)
        env = {"MESHPATCH_REGISTRY": f"nacos://{nacos.address}", "MESHPATCH_RESOLVE_TIMEOUT": "5"}
        with AppSession(env) as app:
            assert app.http("http://svc/", 3) == {"a": 3}
        assert any(r.startswith("/nacos/v3/client/ns/instance/list") for r in nacos.requests)


def test_file_registry_reload_and_no_xds(tmp_path) -> None:
    path = tmp_path / "registry.yaml"
    with http_server("a", "127.0.0.2") as a, http_server("b", "127.0.0.3") as b:
        path.write_text(f"services:\n  inventory:\n  - {{address: 127.0.0.2, port: {a.port}}}\n")
        env = {"MESHPATCH_REGISTRY": f"file://{path}?interval=0.1", "MESHPATCH_RESOLVE_TIMEOUT": "5"}
        with AppSession(env) as app:
            assert app.http("http://inventory/", 4) == {"a": 4}
            tmp = tmp_path / "new.yaml"
            tmp.write_text(f"services:\n  inventory:\n  - 127.0.0.2:{a.port}\n  - 127.0.0.3:{b.port}\n")
            os.replace(tmp, path)
            app.until(lambda: app.http("http://inventory/", 10), lambda seen: seen == {"a": 5, "b": 5})
            path.write_text("services: [broken")  # a bad edit: the last good list stays, one line says why
            time.sleep(0.5)
            assert app.http("http://inventory/", 10) == {"a": 5, "b": 5}
            assert app.stderr().count("not valid YAML") == 1, app.stderr()


def test_registry_only_host_next_to_xds_and_alias() -> None:
    """With xDS configured, a host the control plane does not know is still
    routed when a registry knows it (LDS says "no such listener" first); mesh
    hosts keep their xDS routes."""
    mesh = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: other, namespace: default}
spec:
  hosts: [other.default.svc.cluster.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 80, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.4}]
"""
    with FakeConsul() as consul, http_server("reg", "127.0.0.2") as reg, control_plane(mesh) as cp:
        consul.register("billing", "b1", "127.0.0.2", reg.port)
        env = {"MESHPATCH_REGISTRY": f"consul://{consul.address}", "MESHPATCH_XDS_SERVER": cp.address,
               "MESHPATCH_REGISTRY_ALIASES": "billing=billing.payments.example", "MESHPATCH_RESOLVE_TIMEOUT": "5"}
        code = """
import json, requests
out = {}
for url in ("http://billing/x", "http://billing.payments.example/x"):
    out[url] = requests.get(url, timeout=5).json()["server"]
print("RESULT " + json.dumps(out))
"""
        result = run_app(code, env)
        assert result.returncode == 0, result
        assert result.result == {"http://billing/x": "reg", "http://billing.payments.example/x": "reg"}


def test_bad_registry_setting_is_one_clear_line_and_the_app_runs() -> None:
    code = """
import json, requests
try:
    requests.get("http://user-service/", timeout=2)
    out = "sent"
except requests.ConnectionError:
    out = "untouched"
print("RESULT " + json.dumps(out))
"""
    result = run_app(code, {"MESHPATCH_REGISTRY": "consul:/agent:8500"})
    assert result.returncode == 0 and result.result == "untouched", result
    lines = [line for line in result.stderr.splitlines() if "MESHPATCH_REGISTRY" in line]
    assert len(lines) == 1 and "Fix:" in lines[0], result.stderr


def test_forked_child_keeps_the_registry_list_and_follows_changes(tmp_path) -> None:
    """After a fork (gunicorn --preload, multiprocessing) the child routes at once
    from the inherited list and its own new watcher thread sees later changes."""
    path = tmp_path / "registry.yaml"
    with http_server("a", "127.0.0.2") as a, http_server("b", "127.0.0.3") as b:
        path.write_text(f"services:\n  inventory:\n  - 127.0.0.2:{a.port}\n")
        code = f"""
import json, os, time, requests
first = requests.get("http://inventory/", timeout=5).json()["server"]
pid = os.fork()
if pid == 0:
    out = {{"child_first": requests.get("http://inventory/", timeout=5).json()["server"]}}
    with open({str(path)!r} + ".tmp", "w") as f:
        f.write("services:\\n  inventory:\\n  - 127.0.0.3:{b.port}\\n")
    os.replace({str(path)!r} + ".tmp", {str(path)!r})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        server = requests.get("http://inventory/", timeout=5).json()["server"]
        if server == "b":
            break
        time.sleep(0.05)
    out["child_after_change"] = server
    with open({str(tmp_path / "child.json")!r}, "w") as f:
        json.dump(out, f)
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("RESULT " + json.dumps({{"parent_first": first, "child_status": status}}))
"""
        result = run_app(code, {"MESHPATCH_REGISTRY": f"file://{path}?interval=0.1", "MESHPATCH_RESOLVE_TIMEOUT": "5"})
        assert result.returncode == 0, result
        assert result.result == {"parent_first": "a", "child_status": 0}, result
        assert json.loads((tmp_path / "child.json").read_text()) == {"child_first": "a", "child_after_change": "b"}
