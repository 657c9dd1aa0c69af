"""The demo is the end-to-end proof: a real control plane, real servers on
127.0.0.2/3, and an unmodified client under meshpatch-run, with a live
routing change.  The smaller tests pin the demo's own pieces so a broken demo
points at the right part."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import grpc
import pytest
import requests
import yaml

TOLERANCE = 8.0


def load(repo_root: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"demo_{name}", repo_root / "demo" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def mesh_docs(repo_root: Path) -> dict[str, dict]:
    docs = {}
    for path in sorted((repo_root / "demo" / "mesh").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


def test_processes_run_the_installed_package(repo_root: Path, venv_bin: Path, tmp_path: Path) -> None:
    """tests/run.sh promises that the processes the tests start (the demo's
    control plane, services and client among them) run a regular install of
    meshpatch, so packaging mistakes fail the suite.  (In-process imports use
    the source tree on purpose: pyproject's pytest `pythonpath`.)"""
    if os.environ.get("MESHPATCH_TESTS_INSTALLED") != "1":
        pytest.skip("only under tests/run.sh, which installs meshpatch non-editable")
    probe = (
        "import json, sysconfig, meshpatch, meshpatch.hooks, meshpatch.hooks.requests_hook;"
        "print(json.dumps([sysconfig.get_paths()['purelib'], meshpatch.__file__, meshpatch.hooks.__file__]))"
    )
    out = subprocess.run([str(venv_bin / "python"), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    site_dir, *files = (Path(p).resolve() for p in json.loads(out.stdout))
    for where in files:
        assert site_dir in where.parents, f"{where} is not in {site_dir}: not a regular install"
    assert (site_dir / "meshpatch.pth").is_file()
    assert (site_dir / "meshpatch" / "_sitecustomize" / "sitecustomize.py").is_file()


def test_mesh_config_is_a_20_80_canary_over_both_ports(repo_root: Path) -> None:
    docs = mesh_docs(repo_root)
    assert set(docs) == {"ServiceEntry", "DestinationRule", "VirtualService"}
    se, dr, vs = docs["ServiceEntry"]["spec"], docs["DestinationRule"]["spec"], docs["VirtualService"]["spec"]
    host = "reviews.default.svc.cluster.local"
    assert se["hosts"] == [host] and se["resolution"] == "STATIC"
    assert {(p["number"], p["protocol"]) for p in se["ports"]} == {(9080, "HTTP"), (7070, "GRPC")}
    by_version = {ep["labels"]["version"]: ep["address"] for ep in se["endpoints"]}
    assert by_version == {"v1": "127.0.0.2", "v2": "127.0.0.3"}
    assert dr["host"] == host
    assert {s["name"]: s["labels"] for s in dr["subsets"]} == {"v1": {"version": "v1"}, "v2": {"version": "v2"}}
    assert vs["hosts"] == [host]
    (route,) = vs["http"]
    assert "match" not in route  # one route for every port
    assert [(d["destination"]["subset"], d["weight"]) for d in route["route"]] == [("v1", 20), ("v2", 80)]


def test_live_edit_rewrites_only_the_weights(repo_root: Path, tmp_path: Path) -> None:
    demo = load(repo_root, "demo")
    original = (repo_root / "demo" / "mesh" / demo.VIRTUAL_SERVICE).read_text()
    path = tmp_path / demo.VIRTUAL_SERVICE
    path.write_text(original)
    demo.rewrite_weights(path, [80, 20])
    edited = yaml.safe_load(path.read_text())
    expected = yaml.safe_load(original)
    expected["spec"]["http"][0]["route"][0]["weight"] = 80
    expected["spec"]["http"][0]["route"][1]["weight"] = 20
    assert edited == expected
    with pytest.raises(demo.DemoFailed):
        demo.rewrite_weights(path, [100])


def test_client_report_lines_parse_back(repo_root: Path) -> None:
    demo, client = load(repo_root, "demo"), load(repo_root, "client")
    seen = client.collections.Counter({"v1": 99, "v2": 396, "error": 5})
    line = client.split_line("httpx", seen, 500, "ConnectError: boom")
    match = demo.SPLIT_LINE.match("  " + line)
    assert match and match["lib"] == "httpx"
    assert (float(match["v1"]), float(match["v2"])) == (19.8, 79.2)
    assert demo.check({"requests": (19.8, 80.2, ""), "httpx": (19.8, 79.2, match["rest"].strip()),
                       "grpc": (30.0, 70.0, "")}, (20, 80), TOLERANCE) == [
        f"httpx: {match['rest'].strip()}",
        "grpc: v1 30.0% v2 70.0%, expected 20/80 ±8",
    ]


def test_service_answers_http_and_grpc_with_its_version(repo_root: Path, free_port) -> None:
    http_port, grpc_port = free_port("127.0.0.3"), free_port("127.0.0.3")
    proc = subprocess.Popen(
        [sys.executable, str(repo_root / "demo" / "service.py"), "--version", "v7", "--address", "127.0.0.3",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and "ready" in proc.stdout.readline()
        reply = requests.get(f"http://127.0.0.3:{http_port}/reviews/1", timeout=5).json()
        assert reply == {"version": "v7", "pod": "127.0.0.3", "path": "/reviews/1"}
        with grpc.insecure_channel(f"127.0.0.3:{grpc_port}") as channel:
            assert channel.unary_unary("/demo.Reviews/GetVersion")(b"", timeout=5) == b"v7"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0


ROUND = re.compile(r"^\s+round (\d):$")
SPLIT = re.compile(r"^\s+(requests|httpx|grpc)\s+v1\s+([\d.]+)%\s+v2\s+([\d.]+)%\s+\((\d+) calls\)(.*)$")
REGISTRY_SPLIT = re.compile(
    r"^\s+(ratings|details)\s+(requests|httpx|grpc)\s+v1\s+([\d.]+)%\s+v2\s+([\d.]+)%\s+\((\d+) calls\)(.*)$")


@pytest.mark.e2e
@pytest.mark.timeout(90)
def test_demo_end_to_end(repo_root: Path, venv_bin: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [str(venv_bin / "python"), str(repo_root / "demo" / "demo.py"), "--bin", str(venv_bin)],
        cwd=repo_root, capture_output=True, text=True, timeout=80,
    )
    elapsed = time.monotonic() - started
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, report

    splits: dict[int, dict[str, tuple[float, float, int, str]]] = {}
    current = 0
    for line in result.stdout.splitlines():
        if m := ROUND.match(line):
            current = int(m[1])
        elif (m := SPLIT.match(line)) and current:
            splits.setdefault(current, {})[m[1]] = (float(m[2]), float(m[3]), int(m[4]), m[5].strip())
    assert set(splits) == {1, 2}, report
    for round_no, want in ((1, (20, 80)), (2, (80, 20))):
        assert set(splits[round_no]) == {"requests", "httpx", "grpc"}, report
        for lib, (v1, v2, calls, rest) in splits[round_no].items():
            assert calls >= 200, report
            assert rest == "", f"round {round_no} {lib}: {rest}"  # no failed calls
            assert abs(v1 - want[0]) <= TOLERANCE and abs(v2 - want[1]) <= TOLERANCE, (round_no, lib, v1, v2)
            assert v1 + v2 == pytest.approx(100.0, abs=0.2)
    # round 3, the registry step: ratings only in ZooKeeper (round robin over
    # its v1/v2 providers), details v1 in ZooKeeper + v2 in the mesh (30/70)
    registry: dict[tuple[str, str], tuple[float, float, str]] = {}
    for line in result.stdout.splitlines():
        if m := REGISTRY_SPLIT.match(line):
            registry[(m[1], m[2])] = (float(m[3]), float(m[4]), m[6].strip())
    assert set(registry) == {(s, lib) for s in ("ratings", "details") for lib in ("requests", "httpx", "grpc")}, report
    for (service, lib), (v1, v2, rest) in registry.items():
        want = {"ratings": (50, 50), "details": (30, 70)}[service]
        assert rest == "", f"round 3 {service} {lib}: {rest}"
        assert abs(v1 - want[0]) <= TOLERANCE and abs(v2 - want[1]) <= TOLERANCE, (service, lib, v1, v2)
    assert "demo OK" in result.stdout
    assert elapsed < 60, f"demo took {elapsed:.1f} s (budget 60 s)"


def test_registry_step_config(repo_root: Path) -> None:
    """details: v2 is the only mesh endpoint, v1 must come from ZooKeeper; the
    demo's aliases name the hosts the client calls."""
    demo, client = load(repo_root, "demo"), load(repo_root, "client")
    docs = [doc for path in sorted((repo_root / "demo" / "mesh").glob("details-*.yaml"))
            for doc in yaml.safe_load_all(path.read_text())]
    se = next(d["spec"] for d in docs if d["kind"] == "ServiceEntry")
    assert [(ep["address"], ep["labels"]["version"]) for ep in se["endpoints"]] == [("127.0.0.7", "v2")]
    vs = next(d["spec"] for d in docs if d["kind"] == "VirtualService")
    assert [(r["destination"]["subset"], r["weight"]) for r in vs["http"][0]["route"]] == [("v1", 30), ("v2", 70)]
    in_zookeeper = {(svc, ver) for svc, ver, _, iface in demo.REGISTRY_PODS if iface}
    assert in_zookeeper == {("ratings", "v1"), ("ratings", "v2"), ("details", "v1")}
    hosts = {url.split("/")[2].split(":")[0] for url, _ in client.REGISTRY_SERVICES.values()}
    assert hosts == {alias.split("=")[1] for alias in demo.ALIASES.split(",")}
    line = client.split_line("grpc", client.collections.Counter({"v1": 3, "v2": 7}), 10, "", "details")
    match = demo.REGISTRY_LINE.match("  " + line)
    assert match and (match["svc"], match["lib"], match["v1"], match["v2"]) == ("details", "grpc", "30.0", "70.0")
