"""Fork and threads: forks while the xDS client lock is held or while other
threads pick never deadlock a child; picks from many threads and asyncio tasks
at once stay correct while the config changes under them.

The fork scenarios run in an app process (a fork of the pytest process would
carry pytest's own threads along); each child must finish within a deadline,
so a deadlock shows as a timeout, not a hung suite.
"""

from __future__ import annotations

import os
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest

from meshpatch.xds.type_urls import EDS as EDS_TYPE
from tests.support.controlplane import ControlPlane, control_plane
from tests.support.servers import http_server, run_app
from tests.test_agent_e2e import FQDN, mesh

FORK_APP = textwrap.dedent("""
    import json, os, threading, time, requests
    from meshpatch.agent import get_agent

    HOST = "{host}"
    assert requests.get(f"http://{{HOST}}:9080/").json()["server"] == "v1"   # agent started, stream up
    agent = get_agent()

    def child_work():
        # Everything a worker does first: route a known host, resolve a new one, take the locks.
        ok = requests.get(f"http://{{HOST}}:9080/").json()["server"] == "v1"
        agent.router.pick("http", "new-{{}}.default.svc.cluster.local".format(os.getpid()), 80, "GET", "/")
        with agent.client.lock:
            pass
        return ok

    def fork_and_wait(deadline=10.0):
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if child_work() else 3)
            except BaseException:
                os._exit(4)
        forked = time.monotonic() - start
        while time.monotonic() - start < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return forked, os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return forked, "deadlock"

    out = {{}}
    # 1. Another thread holds the client lock (an xDS update in progress) for 0.3 s.
    held = threading.Event()
    def hold(seconds):
        with agent.client.lock:
            held.set()
            time.sleep(seconds)
    t = threading.Thread(target=hold, args=(0.3,)); t.start(); held.wait()
    out["lock_busy"] = fork_and_wait(); t.join(); held.clear()
    # 2. A lock held for longer than the fork is willing to wait (1 s): the child still works.
    t = threading.Thread(target=hold, args=(1.6,)); t.start(); held.wait()
    out["lock_stuck"] = fork_and_wait(); t.join()
    # 3. Forks while 8 threads pick known hosts and create new ones (their waits, events, create lock).
    stop = threading.Event()
    errors = []
    def picker(n):
        i = 0
        while not stop.is_set():
            i += 1
            try:
                agent.router.pick("http", HOST, 9080, "GET", "/")
                if i % 50 == 0:
                    agent.router.pick("http", f"t{{n}}-{{i}}.default.svc.cluster.local", 80, "GET", "/")
            except Exception as exc:
                errors.append(repr(exc))
    threads = [threading.Thread(target=picker, args=(n,)) for n in range(8)]
    for th in threads: th.start()
    out["busy_forks"] = [fork_and_wait() for _ in range(15)]
    stop.set()
    for th in threads: th.join()
    out["picker_errors"] = errors[:5]
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture()
def cp() -> Iterator[ControlPlane]:
    with control_plane(mesh(100)) as plane:
        yield plane


@pytest.mark.parametrize("share", ["1", "0"])
def test_fork_never_deadlocks_the_child(cp: ControlPlane, tmp_path: Path, share: str) -> None:
    with http_server("v1", "127.0.0.2", 9001), http_server("v2", "127.0.0.3", 9002):
        run = run_app(FORK_APP.format(host=FQDN), {
            "MESHPATCH_XDS_SERVER": cp.address, "MESHPATCH_RESOLVE_TIMEOUT": "0.2",
            "MESHPATCH_RUNTIME_DIR": str(tmp_path), "MESHPATCH_SHARE_STREAM": share,
        }, timeout=120)
    assert run.returncode == 0, run
    out = run.result
    out["stderr"] = run.stderr[-3000:]  # shown with any failure below
    forked, code = out["lock_busy"]
    assert code == 0 and forked >= 0.2, out  # the fork waited for the update to finish
    forked, code = out["lock_stuck"]
    assert code == 0 and 0.8 <= forked < 1.5, out  # bounded wait, then fresh locks in the child
    assert [code for _, code in out["busy_forks"]] == [0] * 15, out
    assert out["picker_errors"] == [], out


@pytest.fixture()
def remote_cp(tmp_path: Path) -> Iterator[Any]:
    """The control plane in its own process, as in a cluster: the picking threads
    here then compete only with this process's own xDS work for the GIL."""
    import subprocess
    import sys

    from tests.support.servers import free_port

    config = tmp_path / "cp"
    config.mkdir()
    (config / "mesh.yaml").write_text(mesh(100))
    port = free_port()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "meshpatch"), "control-plane", "--config", str(config),
                             "--listen", f"127.0.0.1:{port}", "--poll-interval", "0.05", "--log-level", "ERROR"])
    import socket

    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "control plane did not start"
            time.sleep(0.05)

    class Remote:
        address = f"127.0.0.1:{port}"

        @staticmethod
        def write(text: str) -> None:
            tmp = config / ".tmp"
            tmp.write_text(text)
            os.replace(tmp, config / "mesh.yaml")

    try:
        yield Remote
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("threads, tasks", [(8, 50)])
def test_threads_and_asyncio_tasks_pick_concurrently_through_config_changes(remote_cp: Any, tmp_path: Path,
                                                                            threads: int, tasks: int) -> None:
    import asyncio

    from meshpatch.agent import Agent
    from meshpatch.bootstrap import load_bootstrap
    from meshpatch.config import Settings

    settings = Settings({"MESHPATCH_XDS_SERVER": remote_cp.address, "MESHPATCH_RESOLVE_TIMEOUT": "10",
                         "MESHPATCH_RUNTIME_DIR": str(tmp_path / "run")})
    agent = Agent(settings, load_bootstrap(settings))
    hosts = [FQDN, "reviews", "reviews.default", "reviews.default.svc"]
    errors: List[str] = []
    seen = set()
    stop = threading.Event()
    counts = [0]

    def check(pick: object) -> None:
        address = getattr(pick, "address", None)
        if address not in ("127.0.0.2", "127.0.0.3"):
            errors.append(f"bad pick {pick!r}")
        seen.add(address)

    def thread_picker(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                check(agent.router.pick("http", hosts[(n + i) % len(hosts)], 9080, "GET", f"/{i}"))
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
            i += 1
            counts[0] += 1
            if i % 4 == 0:
                # An app thread does I/O between calls.  Pure CPU loops would starve the
                # xDS thread's gRPC I/O of the GIL (CPython's convoy effect): updates then
                # take seconds to land; that is a latency matter, not what this test checks.
                time.sleep(0.001)

    async def task_picker(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                check(agent.router.pick("http", hosts[(n + i) % len(hosts)], 9080, "GET", "/"))
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
            i += 1
            counts[0] += 1
            await asyncio.sleep(0.001 if i % 4 == 0 else 0)  # tasks await I/O too

    async def all_tasks() -> None:
        await asyncio.gather(*(task_picker(n) for n in range(tasks)))

    pool = [threading.Thread(target=thread_picker, args=(n,)) for n in range(threads)]
    pool.append(threading.Thread(target=lambda: asyncio.run(all_tasks())))
    try:
        for th in pool:
            th.start()
        for weight in (0, 100, 0, 100):
            time.sleep(0.2)
            remote_cp.write(mesh(weight))
            want = "127.0.0.2" if weight else "127.0.0.3"
            deadline = time.monotonic() + 30
            while agent.router.pick("http", FQDN, 9080, "GET", "/").address != want:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, ("the change never reached the router", weight,
                                                     agent.client.type_stats(EDS_TYPE), errors[:3])
                time.sleep(0.01)
        time.sleep(0.1)
    finally:
        stop.set()
        for th in pool:
            th.join(10)
        agent.stop()
    assert errors == [], errors[:5]
    assert seen == {"127.0.0.2", "127.0.0.3"} and counts[0] > 2_000
    assert agent.router.pick("http", FQDN, 9080, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
