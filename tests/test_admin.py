"""The admin endpoint and its CLIs against a running, unmodified app, and the
doctor (``meshpatch doctor`` / ``meshpatch-run --info``) for good and bad
environments."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import textwrap
import time
from typing import Any, Dict, Iterator, List

import pytest
from google.protobuf import struct_pb2

from meshpatch.config import ConfigError, parse_admin_address
from tests.support import xds_resources as res
from tests.support.controlplane import ControlPlane
from tests.support.scripted_ads import ScriptedAds
from tests.support.servers import app_env, http_server, run_app, venv_bin

pytestmark = pytest.mark.e2e

RDS_HTTP = "outbound|80||svc.default.svc.cluster.local"


@pytest.mark.parametrize("raw, expected", [
    ("", None), ("0", None), ("off", None),
    ("unix:///run/mp/admin.sock", ("unix", "/run/mp/admin.sock")),
    ("unix:/tmp/a.sock", ("unix", "/tmp/a.sock")),
    ("127.0.0.1:15000", ("tcp", "127.0.0.1", 15000)),
    ("127.0.0.9:0", ("tcp", "127.0.0.9", 0)),
    ("localhost:15000", ("tcp", "127.0.0.1", 15000)),
    ("[::1]:15000", ("tcp", "::1", 15000)),
])
def test_admin_address_accepts_loopback_and_unix_sockets(raw: str, expected: Any) -> None:
    assert parse_admin_address({"MESHPATCH_ADMIN": raw}) == expected


@pytest.mark.parametrize("raw", ["0.0.0.0:15000", "10.1.2.3:15000", ":15000", "pod.example:15000",
                                 "unix:relative.sock", "15000", "127.0.0.1:99999", "127.1:80"])
def test_admin_address_refuses_anything_that_could_listen_beyond_this_host(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_admin_address({"MESHPATCH_ADMIN": raw})
    assert info.value.variable == "MESHPATCH_ADMIN"


def test_pid_placeholder() -> None:
    assert parse_admin_address({"MESHPATCH_ADMIN": "unix:///tmp/mp-{pid}.sock"}) == ("unix", f"/tmp/mp-{os.getpid()}.sock")


@pytest.fixture(scope="module")
def mesh() -> Iterator[Dict[str, Any]]:
    from meshpatch.xds.type_urls import CDS, EDS, LDS, RDS

    with http_server("base", "127.0.0.2") as base, http_server("gray", "127.0.0.3") as gray:
        cla = res.cla("good", [(base.host, base.port), (gray.host, gray.port)], locality=("eu", "zone-1", ""))
        labels = struct_pb2.Struct()
        labels.update({"labels": {"lane": "gray"}})
        cla.endpoints[0].lb_endpoints[1].metadata.filter_metadata["meshpatch"].CopyFrom(labels)
        bad_listener = res.listener("nack:80", "whatever")
        bad_listener.ClearField("api_listener")  # not an API listener: the client NACKs it
        db = {
            LDS: {"svc:80": res.listener("svc:80", RDS_HTTP), "nack:80": bad_listener},
            RDS: {RDS_HTTP: res.route_config(RDS_HTTP, [("svc", ["svc", "svc:80"],
                                                          [res.route("/", cluster="good", name="all")])])},
            CDS: {"good": res.cluster("good")},
            EDS: {"good": cla},
        }
        server = ScriptedAds().start()
        server.serve(db)
        try:
            yield {"ads": server, "base": base, "gray": gray}
        finally:
            server.stop()


APP = textwrap.dedent("""
    import json, os, sys, requests
    session = requests.Session()
    seen = [session.get("http://svc/x", headers={"x-mesh-lane": "gray"}, timeout=5).json()["server"],
            session.get("http://svc/x", timeout=5).json()["server"]]
    try:
        requests.get("http://nack/", timeout=2)
    except Exception:
        pass
    print("READY " + json.dumps({"pid": os.getpid(), "seen": seen}), flush=True)
    sys.stdin.read()
""")


@pytest.fixture(scope="module")
def running_app(mesh: Dict[str, Any]) -> Iterator[Dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="mp-admin-") as scratch:
        sock = os.path.join(scratch, "run", "admin-{pid}.sock")
        env = app_env({"MESHPATCH_XDS_SERVER": mesh["ads"].address, "MESHPATCH_RESOLVE_TIMEOUT": "5",
                       "MESHPATCH_ADMIN": f"unix://{sock}"})
        proc = subprocess.Popen([os.path.join(venv_bin(), "meshpatch-run"), os.path.join(venv_bin(), "python"),
                                 "-c", APP], env=env, cwd=scratch, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            assert line.startswith("READY "), (line, proc.stderr.read() if proc.poll() is not None else "")
            info = json.loads(line[6:])
            path = sock.replace("{pid}", str(info["pid"]))
            deadline = time.monotonic() + 10
            while not os.path.exists(path) and time.monotonic() < deadline:
                time.sleep(0.05)
            yield {"pid": info["pid"], "seen": info["seen"], "admin": f"unix://{sock}", "path": path,
                   "env": env}
        finally:
            proc.stdin.close()  # type: ignore[union-attr]
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        # the process removed its socket on exit
        assert not os.path.exists(path)


def _cli(*args: str, env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(venv_bin(), "meshpatch"), *args], capture_output=True, text=True,
                          timeout=60, env=app_env(env or {}))


def test_status_cli_shows_hooks_resources_clusters_and_lanes(running_app: Dict[str, Any], mesh: Dict[str, Any]) -> None:
    assert running_app["seen"] == ["gray", "base"]  # the lane label steered the tagged call
    assert oct(os.stat(running_app["path"]).st_mode & 0o777) == "0o600"
    status = _cli("status", "--admin", running_app["admin"], "--pid", str(running_app["pid"]), "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["pid"] == running_app["pid"]
    assert data["activation"]["hooks"]["requests"]["state"] == "applied"
    assert data["activation"]["hooks"]["wsgi"]["state"] == "pending"
    xds = data["xds"]
    assert xds["server"] == mesh["ads"].address and xds["connected"] is True and xds["state"] == "READY"
    lds = {r["name"]: r for r in xds["types"]["LDS"]["resources"]}
    assert lds["svc:80"]["status"] == "ACKED" and lds["svc:80"]["version"] == "v1"
    assert lds["nack:80"]["status"] == "NACKED" and "api_listener" in lds["nack:80"]["error"]
    assert xds["types"]["LDS"]["nacks"] >= 1 and "nack:80" in xds["types"]["LDS"]["last_error"]
    assert xds["types"]["EDS"]["config_age_s"] is not None
    for kind in ("RDS", "CDS", "EDS"):
        assert [r["status"] for r in xds["types"][kind]["resources"]] == ["ACKED"]
    (target,) = [t for t in data["targets"] if t["target"] == "svc:80"]
    assert target["in_mesh"] and target["route_config"] == RDS_HTTP and target["routes"][0]["clusters"] == {"good": 100}
    (cluster,) = data["clusters"]
    assert cluster["name"] == "good" and cluster["state"] == "resolved" and cluster["lanes"] == ["gray"]
    endpoints = {(e["address"], e["port"]): e for e in cluster["endpoints"]}
    base, gray = mesh["base"], mesh["gray"]
    assert endpoints[(base.host, base.port)]["lane"] is None
    assert endpoints[(gray.host, gray.port)]["lane"] == "gray"
    assert all(e["health"] == "HEALTHY" and e["in_rotation"] and e["locality"] == "eu/zone-1/"
               for e in endpoints.values())
    assert data["lanes"] == {"enabled": True, "header": "x-mesh-lane", "baggage_key": "mesh.lane", "label": "lane"}

    text = _cli("status", "--admin", running_app["admin"].replace("{pid}", str(running_app["pid"])))
    assert text.returncode == 0, text.stderr
    for expected in ("HOOKS", "requests", "applied", "LDS", "NACKED", "not an API listener", "svc:80", "good",
                     f"{gray.host}:{gray.port}", "lane gray", "lane baseline", "in rotation"):
        assert expected in text.stdout, (expected, text.stdout)


def test_config_dump_cli(running_app: Dict[str, Any]) -> None:
    admin = running_app["admin"].replace("{pid}", str(running_app["pid"]))
    dump = _cli("config-dump", "--admin", admin, "--json")
    assert dump.returncode == 0, dump.stderr
    data = json.loads(dump.stdout)
    types = data["xds"]["types"]
    (cluster,) = types["CDS"]["resources"]
    assert cluster["name"] == "good" and cluster["status"] == "ACKED"
    assert cluster["resource"]["name"] == "good"  # the resource itself (raw when kept, else decoded)
    (route_config,) = types["RDS"]["resources"]
    assert "svc" in json.dumps(route_config["resource"])
    only_eds = _cli("config-dump", "--admin", admin, "--type", "EDS")
    assert only_eds.returncode == 0 and "EDS" in only_eds.stdout and "LDS" not in only_eds.stdout
    assert "good  ACKED  version v1" in only_eds.stdout


def test_admin_env_picks_the_address_and_errors_are_plain(running_app: Dict[str, Any]) -> None:
    ok = _cli("status", "--pid", str(running_app["pid"]), env={"MESHPATCH_ADMIN": running_app["admin"]})
    assert ok.returncode == 0 and "HOOKS" in ok.stdout
    missing_pid = _cli("status", env={"MESHPATCH_ADMIN": running_app["admin"]})
    assert missing_pid.returncode == 1 and "--pid" in missing_pid.stderr
    nobody = _cli("status", "--admin", "unix:///nonexistent/admin.sock")
    assert nobody.returncode == 1 and "cannot reach the admin endpoint" in nobody.stderr
    refused = _cli("status", "--admin", "0.0.0.0:1")
    assert refused.returncode == 1 and "loopback" in refused.stderr


def test_tcp_admin_and_a_refused_address_turns_meshpatch_off(mesh: Dict[str, Any], free_port: Any) -> None:
    port = free_port("127.0.0.1")
    code = textwrap.dedent(f"""
        import json, time, subprocess, os, sys, requests
        requests.get("http://svc/x", timeout=5)
        out = None
        for _ in range(100):
            proc = subprocess.run([os.path.join(os.path.dirname(sys.executable), "meshpatch"), "status", "--json",
                                   "--admin", "127.0.0.1:{port}"], capture_output=True, text=True)
            if proc.returncode == 0:
                out = json.loads(proc.stdout)
                break
            time.sleep(0.05)
        print("RESULT " + json.dumps({{"pid": os.getpid(), "status_pid": out and out["pid"],
                                       "clusters": out and [c["name"] for c in out["clusters"]]}}))
    """)
    run = run_app(code, {"MESHPATCH_XDS_SERVER": mesh["ads"].address, "MESHPATCH_RESOLVE_TIMEOUT": "5",
                         "MESHPATCH_ADMIN": f"127.0.0.1:{port}"})
    assert run.returncode == 0, run
    assert run.result["status_pid"] == run.result["pid"] and run.result["clusters"] == ["good"]

    refused = run_app("import json, meshpatch.activation as a; print('RESULT ' + json.dumps(a.status()))",
                      {"MESHPATCH_ADMIN": "0.0.0.0:15000"})
    assert refused.returncode == 0, refused
    assert "MESHPATCH_ADMIN" in refused.result["config_error"] and "loopback" in refused.result["config_error"]
    assert refused.result["hooks"]["requests"]["state"] == "off"
    assert "MESHPATCH_ADMIN" in refused.stderr  # reported once, naming the variable


def _doctor(env: Dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(venv_bin(), "meshpatch"), "doctor", *args], capture_output=True,
                          text=True, timeout=60, env=app_env(env))


def test_doctor_good_environment() -> None:
    with ControlPlane("") as cp:
        proc = _doctor({"MESHPATCH_XDS_SERVER": cp.address, "MESHPATCH_ADMIN": "unix:///tmp/mp-{pid}.sock"})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"xDS: {cp.address} from MESHPATCH_XDS_SERVER" in proc.stdout and "server answers" in proc.stdout
        assert "no problems found" in proc.stdout
        for hook in ("requests", "httpx", "grpc", "wsgi", "asgi", "grpc_server"):
            assert f"+ {hook}" in proc.stdout
        assert "admin endpoint: unix:/tmp/mp-" in proc.stdout
        # meshpatch-run --info is the same report, for the environment the command would get
        info = subprocess.run([os.path.join(venv_bin(), "meshpatch-run"), "--info"], capture_output=True, text=True,
                              timeout=60, env=app_env({"MESHPATCH_XDS_SERVER": cp.address,
                                                       "MESHPATCH_DISABLED_HOOKS": "httpx"}))
        assert info.returncode == 0, info.stdout
        assert "enabled: yes" in info.stdout and "- httpx" in info.stdout
        assert "disabled by MESHPATCH_DISABLED_HOOKS" in info.stdout
        as_json = json.loads(_doctor({"MESHPATCH_XDS_SERVER": cp.address}, "--json").stdout)
        assert as_json["bootstrap"]["found"] and as_json["bootstrap"]["reachable"] and as_json["problems"] == []


@pytest.mark.parametrize("env, named", [
    ({}, "no xDS configuration"),
    ({"GRPC_XDS_BOOTSTRAP": "/nonexistent/bootstrap.json"}, "GRPC_XDS_BOOTSTRAP"),
    ({"MESHPATCH_XDS_SERVER": "127.0.0.1:1", "MESHPATCH_HOOKS": "requests,urllib"}, "MESHPATCH_HOOKS"),
    ({"MESHPATCH_XDS_SERVER": "127.0.0.1:1", "MESHPATCH_LANE_HEADER": "bad header"}, "MESHPATCH_LANE_HEADER"),
    ({"MESHPATCH_XDS_SERVER": "127.0.0.1:1", "MESHPATCH_ADMIN": "0.0.0.0:1"}, "MESHPATCH_ADMIN"),
    ({"MESHPATCH_XDS_SERVER": "127.0.0.1:1", "MESHPATCH_HOOKS": "wsgi"}, "no client hook would apply"),
])
def test_doctor_bad_environments_name_the_problem(env: Dict[str, str], named: str) -> None:
    proc = _doctor(env)
    assert proc.returncode == 1, proc.stdout
    problems = proc.stdout.split("PROBLEMS", 1)[1]
    assert named in problems, proc.stdout


def test_doctor_says_when_the_xds_server_does_not_answer() -> None:
    proc = _doctor({"MESHPATCH_XDS_SERVER": "127.0.0.1:1"})
    assert proc.returncode == 0, proc.stdout  # not a configuration problem: the app would route once it answers
    assert "server does NOT answer" in proc.stdout and "note: the xDS server 127.0.0.1:1 does not answer" in proc.stdout
