"""A pod's worker processes share one upstream xDS stream: real launchers.

Each variant runs an unmodified-style app under ``meshpatch-run`` with four
worker processes: gunicorn with and without ``--preload``, uvicorn
``--workers 4`` (spawned), and ``multiprocessing`` with fork and with spawn.
Every worker runs a small reporter (tests/apps/mpreport.py, started by the
launcher's own hooks) that picks the mesh host every 5 ms and, on each change,
makes a real ``requests`` call through the mesh and writes what answered to a
file.  From those files the test checks that every worker routes by the
current config, measures how long a change takes to reach all of them, and
compares with what the control plane saw: one stream, however many workers.

The gunicorn variants also SIGKILL the worker holding the stream (what an OOM
kill does): another worker takes over within a second and gunicorn's
replacement worker joins as a follower; upstream sees exactly one more stream.
The ``--preload`` variant runs behind an istio-agent-like proxy that serves one
stream at a time (tests/support/ads_proxy.py), which must never have had to
close one.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from tests.support.ads_proxy import AdsProxy
from tests.support.controlplane import ControlPlane, control_plane
from tests.support.servers import app_env, free_port, http_server, venv_bin
from tests.test_agent_e2e import FQDN, mesh

pytestmark = pytest.mark.e2e

APPS = Path(__file__).parent / "apps"
BIN = Path(venv_bin())
WORKERS = 4
PROPAGATION_LIMIT = 1.0  # seconds for a change to reach every worker
TAKEOVER_LIMIT = 1.0  # seconds from the leader's death to the new leader's upstream stream


class PodRun:
    """An app launched with N workers under meshpatch-run, read through report files."""

    def __init__(self, command: List[str], env: Dict[str, str], report_dir: Path, cwd: Path) -> None:
        self.report_dir = report_dir
        full_env = app_env(env)
        self.proc = subprocess.Popen([str(BIN / "meshpatch-run"), *command], env=full_env, cwd=str(cwd),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)

    def reports(self, live_only: bool = True) -> Dict[int, dict]:
        out = {}
        for path in self.report_dir.glob("*.json"):
            try:
                report = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced right now
            if live_only and not _alive(report["pid"]):
                continue
            out[report["pid"]] = report
        return out

    def wait(self, predicate, what: str, timeout: float = 30.0) -> Dict[int, dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the app exited ({self.proc.returncode}) while waiting for {what}:\n"
                                     + self._output())
            reports = self.reports()
            if predicate(reports):
                return reports
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; reports: {json.dumps(self.reports(), indent=1)[-3000:]}")

    def _output(self) -> str:
        try:
            out, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            return "(no output)"
        return (out or "")[-2000:] + "\n" + (err or "")[-6000:]

    def stop(self) -> str:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers (spawned children)
        return self._output()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (killed, not yet reaped by its parent) is dead for us
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def on(address: str, server: str):
    """Predicate: at least WORKERS live workers, each one's latest transition going
    to ``address`` with the real call through the mesh answered by ``server``."""
    def check(reports: Dict[int, dict]) -> bool:
        if len(reports) < WORKERS:
            return False
        return all(r["transitions"][-1][1:] == [address, server] for r in reports.values())
    return check


def propagation(reports: Dict[int, dict], since: float, address: str) -> float:
    times = []
    for report in reports.values():
        hits = [t for t, addr, _ in report["transitions"] if t >= since and addr == address]
        times.append((hits[0] if hits else report["started"]) - since)
    return max(times)


@contextlib.contextmanager
def pod_app(tmp_path: Path, command: List[str], xds: str, extra: Optional[Dict[str, str]] = None) -> Iterator[PodRun]:
    reports = tmp_path / "reports"
    reports.mkdir()
    env = {
        "MESHPATCH_XDS_SERVER": xds,
        "MESHPATCH_RESOLVE_TIMEOUT": "5",
        "MESHPATCH_RUNTIME_DIR": str(tmp_path / "run"),
        "REPORT_DIR": str(reports),
        "MESH_HOST": FQDN,
        "PYTHONPATH": str(APPS),
        **(extra or {}),
    }
    run = PodRun(command, env, reports, APPS)
    try:
        yield run
    finally:
        output = run.stop()
        if "Traceback" in output and "KeyboardInterrupt" not in output:
            print(output)


def check_pod(run: PodRun, cp: ControlPlane, results: Dict[str, float], opened: int = 1) -> Dict[int, dict]:
    """``opened``: upstream streams expected so far (a holder that forks ends its
    stream for the fork and opens a new one after the burst: see pause_for_fork)."""
    reports = run.wait(on("127.0.0.2", "v1"), "every worker routing to v1", timeout=60)
    assert cp.server.wait_for(lambda: cp.server.streams_active == 1), cp.server.stats()
    assert 1 <= cp.server.streams_opened <= opened, cp.server.stats()
    opened_before = cp.server.streams_opened
    roles = sorted(r["role"] for r in reports.values())
    assert roles.count("leader") == 1 and roles.count("follower") == len(roles) - 1, reports
    since = time.time()
    cp.write(mesh(0))
    reports = run.wait(on("127.0.0.3", "v2"), "every worker following the change to v2", timeout=10)
    results["propagation_s"] = propagation(reports, since, "127.0.0.3")
    assert results["propagation_s"] < PROPAGATION_LIMIT, results
    assert cp.server.streams_opened == opened_before
    assert all(r["errors"] == 0 for r in reports.values()), reports
    return reports


def kill_leader(run: PodRun, cp: ControlPlane, reports: Dict[int, dict], results: Dict[str, float]) -> None:
    leader = next(pid for pid, r in reports.items() if r["role"] == "leader")
    start = time.monotonic()
    os.kill(leader, signal.SIGKILL)
    assert cp.server.wait_for(lambda: cp.server.streams_opened == 2, timeout=5), "nobody took over upstream"
    results["takeover_s"] = time.monotonic() - start
    assert results["takeover_s"] < TAKEOVER_LIMIT, results
    reports = run.wait(lambda rs: len(rs) >= WORKERS and leader not in rs
                       and sorted(r["role"] for r in rs.values()).count("leader") == 1,
                       "a new leader and a replacement worker", timeout=30)
    assert all(r["errors"] == 0 for r in reports.values()), reports
    since = time.time()
    cp.write(mesh(100))
    reports = run.wait(on("127.0.0.2", "v1"), "every worker (new one included) back on v1", timeout=10)
    results["propagation_after_takeover_s"] = propagation(reports, since, "127.0.0.2")
    assert results["propagation_after_takeover_s"] < PROPAGATION_LIMIT, results
    assert cp.server.streams_opened == 2 and cp.server.streams_active == 1, cp.server.stats()


@pytest.fixture()
def pods() -> Iterator[None]:
    with http_server("v1", "127.0.0.2", 9001), http_server("v2", "127.0.0.3", 9002):
        yield


def gunicorn(port: int, preload: bool) -> List[str]:
    cmd = [str(BIN / "gunicorn"), "-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "-c", str(APPS / "gunicorn_conf.py"),
           "--graceful-timeout", "2"]
    if preload:
        cmd.append("--preload")
    return cmd + ["wsgiapp:app"]


def test_gunicorn_preload_behind_a_single_stream_agent(pods: None, tmp_path: Path) -> None:
    results: Dict[str, float] = {}
    with control_plane(mesh(100)) as cp, AdsProxy(cp.address, single_stream=True) as agent_proxy:
        with pod_app(tmp_path, gunicorn(free_port(), preload=True), agent_proxy.address) as run:
            reports = check_pod(run, cp, results)
            assert agent_proxy.streams_opened == 1 and agent_proxy.closed_by_newer == 0
            kill_leader(run, cp, reports, results)
    print("gunicorn --preload:", results)


def test_gunicorn_without_preload(pods: None, tmp_path: Path) -> None:
    results: Dict[str, float] = {}
    with control_plane(mesh(100)) as cp:
        with pod_app(tmp_path, gunicorn(free_port(), preload=False), cp.address) as run:
            reports = check_pod(run, cp, results)
            kill_leader(run, cp, reports, results)
    print("gunicorn:", results)


def test_uvicorn_workers(pods: None, tmp_path: Path) -> None:
    results: Dict[str, float] = {}
    port = free_port()
    cmd = [str(BIN / "uvicorn"), "asgiapp:app", "--workers", str(WORKERS), "--host", "127.0.0.1", "--port", str(port),
           "--app-dir", str(APPS), "--log-level", "warning"]
    with control_plane(mesh(100)) as cp:
        with pod_app(tmp_path, cmd, cp.address) as run:
            check_pod(run, cp, results)
    print("uvicorn:", results)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_multiprocessing(pods: None, tmp_path: Path, method: str) -> None:
    """The parent calls the mesh first (it holds the stream), then starts workers.
    With fork, the holder ends its stream for the instant of each fork burst (a
    gRPC call in flight across fork() can crash or hang the child's gRPC) and
    opens a new one after: never two at once, as the agent-like proxy shows."""
    results: Dict[str, float] = {}
    cmd = [str(BIN / "python"), str(APPS / "mpapp.py"), method, str(WORKERS - 1)]
    with control_plane(mesh(100)) as cp, AdsProxy(cp.address, single_stream=True) as agent_proxy:
        with pod_app(tmp_path, cmd, agent_proxy.address) as run:
            reports = check_pod(run, cp, results, opened=WORKERS if method == "fork" else 1)
            parent = run.proc.pid
            assert reports[parent]["role"] == "leader"
            assert agent_proxy.closed_by_newer == 0
    print(f"multiprocessing {method}:", results)
