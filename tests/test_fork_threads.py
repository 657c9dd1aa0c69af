"""Fork and threads: forks while the xDS client lock is held or while other
threads pick never deadlock a child; picks from many threads and asyncio tasks
at once stay correct while the config changes under them.

The fork scenarios run in an app process (a fork of the pytest process would
carry pytest's own threads along); each child must finish within a deadline,
so a deadlock shows as a timeout, not a hung suite.
"""

from __future__ import annotations

import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator, List

import pytest

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
    forked, code = out["lock_busy"]
    assert code == 0 and forked >= 0.2, out  # the fork waited for the update to finish
    forked, code = out["lock_stuck"]
    assert code == 0 and 0.8 <= forked < 1.5, out  # bounded wait, then fresh locks in the child
    assert [code for _, code in out["busy_forks"]] == [0] * 15, out
    assert out["picker_errors"] == [], out


def test_threads_and_asyncio_tasks_pick_concurrently_through_config_changes(cp: ControlPlane, tmp_path: Path) -> None:
    import asyncio

    from meshpatch.agent import Agent
    from meshpatch.bootstrap import load_bootstrap
    from meshpatch.config import Settings

    settings = Settings({"MESHPATCH_XDS_SERVER": cp.address, "MESHPATCH_RESOLVE_TIMEOUT": "5",
                         "MESHPATCH_RUNTIME_DIR": str(tmp_path)})
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
            if i % 64 == 0:
                time.sleep(0.0005)  # busy, but leave the GIL to the xDS thread now and then

    async def task_picker(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                check(agent.router.pick("http", hosts[(n + i) % len(hosts)], 9080, "GET", "/"))
            except Exception as exc:  # noqa: BLE001
                errors.append(repr(exc))
            i += 1
            counts[0] += 1
            await asyncio.sleep(0)

    async def tasks() -> None:
        await asyncio.gather(*(task_picker(n) for n in range(50)))

    threads = [threading.Thread(target=thread_picker, args=(n,)) for n in range(8)]
    threads.append(threading.Thread(target=lambda: asyncio.run(tasks())))
    try:
        for th in threads:
            th.start()
        for weight in (0, 100, 0, 100):
            time.sleep(0.1)
            cp.write(mesh(weight))
            want = "127.0.0.2" if weight else "127.0.0.3"
            deadline = time.monotonic() + 10
            while agent.router.pick("http", FQDN, 9080, "GET", "/").address != want:  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the change never reached the router"
                time.sleep(0.01)
        time.sleep(0.1)
    finally:
        stop.set()
        for th in threads:
            th.join(10)
        agent.stop()
    assert errors == [], errors[:5]
    assert seen == {"127.0.0.2", "127.0.0.3"} and counts[0] > 5_000
    assert agent.router.pick("http", FQDN, 9080, "GET", "/").address == "127.0.0.2"  # type: ignore[union-attr]
