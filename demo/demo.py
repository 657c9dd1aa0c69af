"""The demo's core: a local mesh, a canary split, a live change of it, and registries.

It starts meshpatch's local control plane on the Istio YAML in demo/mesh/,
two versions of the `reviews` service on 127.0.0.2 (v1) and 127.0.0.3 (v2),
and the unmodified client app under `meshpatch-run`.  The client reports the
split it sees per library (20/80 from the VirtualService); then the
VirtualService is rewritten to 80/20 while everything keeps running, and the
same client process reports the new split.

Then the registry step: a real ZooKeeper (Debian's package) runs next to the
mesh, and the same client calls two more services by name: `ratings`, which
lives only in ZooKeeper (two Dubbo providers, 127.0.0.4 v1 and 127.0.0.5 v2,
round robin), and `details`, whose v1 is a ZooKeeper provider (127.0.0.6) and
whose v2 is in the mesh (127.0.0.7), split 30/70 by a VirtualService over
DestinationRule subsets that select the ZooKeeper instance by its labels.

The demo checks every split itself and exits non-zero when one is off by
more than the tolerance, so it doubles as the end-to-end test
(tests/test_demo.py).

Run it through `bash demo/run.sh` (sets up the venv and a loopback-only
network namespace); directly, it uses the interpreter it runs under:

    .venv/bin/python demo/demo.py [--calls 500] [--tolerance 8]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Callable, Optional

DEMO_DIR = Path(__file__).resolve().parent
MESH_DIR = DEMO_DIR / "mesh"
sys.path.insert(0, str(DEMO_DIR.parent))  # tests.support.registries: starts Debian's ZooKeeper
from tests.support.registries import ZooKeeperServer, zookeeper_missing  # noqa: E402

VIRTUAL_SERVICE = "reviews-virtualservice.yaml"
LIBRARIES = ("requests", "httpx", "grpc")
PODS = (("v1", "127.0.0.2"), ("v2", "127.0.0.3"))
HTTP_PORT, GRPC_PORT = 9080, 7070
SPLIT_LINE = re.compile(
    r"^\s*(?P<lib>\w+)\s+v1\s+(?P<v1>[\d.]+)%\s+v2\s+(?P<v2>[\d.]+)%\s+\((?P<calls>\d+) calls\)(?P<rest>.*)$"
)
REGISTRY_LINE = re.compile(
    r"^\s*(?P<svc>ratings|details)\s+(?P<lib>\w+)\s+v1\s+(?P<v1>[\d.]+)%\s+v2\s+(?P<v2>[\d.]+)%\s+"
    r"\((?P<calls>\d+) calls\)(?P<rest>.*)$"
)
#: The registry step's pods: (service, version, address, Dubbo interface or None = mesh only).
REGISTRY_PODS = (
    ("ratings", "v1", "127.0.0.4", "demo.Ratings"),
    ("ratings", "v2", "127.0.0.5", "demo.Ratings"),
    ("details", "v1", "127.0.0.6", "demo.Details"),
    ("details", "v2", "127.0.0.7", None),
)
ALIASES = "demo.Ratings=ratings,demo.Details=details.default.svc.cluster.local"
REGISTRY_WANT = {"ratings": (50, 50), "details": (30, 70)}


class DemoFailed(Exception):
    """The demo ran but did not show what it claims."""


def say(message: str) -> None:
    print(f"==> {message}", flush=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, deadline: float, proc: subprocess.Popen, what: str) -> None:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DemoFailed(f"{what} exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise DemoFailed(f"{what} did not listen on {host}:{port} in time")


def _die_with_parent() -> None:
    """Children get SIGTERM if the demo itself is killed (even with SIGKILL),
    so no server outlives it; runs in the child between fork and exec."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    os.setsid()


class Processes:
    """Every process the demo starts, stopped in reverse order at the end."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
        proc = subprocess.Popen(argv, env=env, preexec_fn=_die_with_parent, **kwargs)
        self.procs.append((name, proc))
        return proc

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for _, proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


def plain_env() -> dict[str, str]:
    """The servers and the control plane must not be patched themselves."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHPATCH_")}


def rewrite_weights(path: Path, weights: list[int]) -> None:
    """Edit the VirtualService the way a person would: change the numbers,
    keep the rest of the file; replace atomically so the watcher never reads
    half a file."""
    text = path.read_text()
    found = re.findall(r"(?m)^(\s*weight:\s*)\d+\s*$", text)
    if len(found) != len(weights):
        raise DemoFailed(f"{path.name}: expected {len(weights)} weights, found {len(found)}")
    values = iter(weights)
    text = re.sub(r"(?m)^(\s*weight:\s*)\d+\s*$", lambda m: f"{m.group(1)}{next(values)}", text)
    text = text.replace("20% to v1, 80% to v2", f"{weights[0]}% to v1, {weights[1]}% to v2")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class LogTail:
    """Collects a process's output lines (for waiting on a reload message and
    for showing the log when something fails)."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    def wait_for(self, start: int, predicate: Callable[[str], bool], timeout: float) -> Optional[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def tail(self, n: int = 30) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])


def wait_for_push(cp_log: LogTail, mark: int) -> None:
    """Wait until the control plane has re-read the YAML and sent the new
    routes on the client's stream (its DEBUG log says both), instead of
    sleeping a guessed time; fall back to a pause if the log format changes."""
    loaded = cp_log.wait_for(mark, lambda line: " loaded " in line, 10.0)
    if loaded is None:
        say("the control plane logged no reload within 10 s; going on anyway")
        return
    version = re.search(r"\(version (\S+)\)", loaded)
    say("control plane reloaded: " + loaded.split(" loaded ", 1)[1].split(": ", 1)[-1])
    if version is None:
        time.sleep(1.0)
        return
    wanted = f"sent RouteConfiguration version {version[1]} "
    if cp_log.wait_for(mark, lambda line: wanted in line, 10.0) is None:
        say("no push of the new routes seen within 10 s; going on anyway")
        return
    say(f"control plane pushed the new routes (version {version[1]}) to the client")
    time.sleep(0.2)  # the client applies the push on its own xDS thread


def read_round(lines: "queue.Queue[Optional[str]]", echo: Callable[[str], None], deadline: float) -> dict[str, tuple[float, float, str]]:
    """Read one round of the client's report: {library: (v1 %, v2 %, rest)}."""
    splits: dict[str, tuple[float, float, str]] = {}
    while len(splits) < len(LIBRARIES):
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise DemoFailed("the client took too long") from None
        if line is None:
            raise DemoFailed("the client exited before reporting every library")
        if line.startswith("waiting for Enter"):
            continue  # the client's prompt between rounds; demo.py answers it
        echo(line)
        match = SPLIT_LINE.match(line)
        if match:
            splits[match["lib"]] = (float(match["v1"]), float(match["v2"]), match["rest"].strip())
    return splits


def read_registry_round(lines: "queue.Queue[Optional[str]]", echo: Callable[[str], None],
                        deadline: float) -> dict[tuple[str, str], tuple[float, float, str]]:
    """The registry round: {(service, library): (v1 %, v2 %, rest)}."""
    splits: dict[tuple[str, str], tuple[float, float, str]] = {}
    while len(splits) < len(REGISTRY_WANT) * len(LIBRARIES):
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise DemoFailed("the client took too long") from None
        if line is None:
            raise DemoFailed("the client exited before reporting every service")
        if line.startswith("waiting for Enter"):
            continue
        echo(line)
        match = REGISTRY_LINE.match(line)
        if match:
            splits[(match["svc"], match["lib"])] = (float(match["v1"]), float(match["v2"]), match["rest"].strip())
    return splits


def check_registry(splits: dict[tuple[str, str], tuple[float, float, str]], tolerance: float) -> list[str]:
    problems = []
    for service, want in REGISTRY_WANT.items():
        per_library = {lib: splits[(service, lib)] for lib in LIBRARIES if (service, lib) in splits}
        problems += [f"{service} {p}" for p in check(per_library, want, tolerance)]
    return problems


def pump_lines(stream: IO[str]) -> "queue.Queue[Optional[str]]":
    """Lines of a child's output on a queue (None at EOF), so reads can time out."""
    lines: "queue.Queue[Optional[str]]" = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def check(splits: dict[str, tuple[float, float, str]], want: tuple[int, int], tolerance: float) -> list[str]:
    problems = []
    for lib in LIBRARIES:
        if lib not in splits:
            problems.append(f"{lib}: no report")
            continue
        v1, v2, rest = splits[lib]
        if abs(v1 - want[0]) > tolerance or abs(v2 - want[1]) > tolerance:
            problems.append(f"{lib}: v1 {v1}% v2 {v2}%, expected {want[0]}/{want[1]} ±{tolerance:g} {rest}".rstrip())
        elif "errors" in rest:
            problems.append(f"{lib}: {rest}")
    return problems


def run_demo(calls: int, tolerance: float, bin_dir: Path, time_budget: float) -> None:
    started = time.monotonic()
    deadline = started + time_budget
    meshpatch, meshpatch_run = bin_dir / "meshpatch", bin_dir / "meshpatch-run"
    for exe in (meshpatch, meshpatch_run):
        if not os.access(exe, os.X_OK):
            raise DemoFailed(f"{exe} not found: install meshpatch into that venv (bash demo/run.sh does)")

    missing = zookeeper_missing()
    if missing:
        raise DemoFailed(f"ZooKeeper is needed for the registry step: {missing} (bash demo/run.sh installs it)")

    procs = Processes()
    work = Path(tempfile.mkdtemp(prefix="meshpatch-demo-"))
    cp_log: Optional[LogTail] = None
    zookeeper: Optional[ZooKeeperServer] = None
    try:
        zookeeper = ZooKeeperServer()
        say(f"ZooKeeper (Debian's zookeeper package) on {zookeeper.address}: the service registry of the not-yet-mesh services")
        zookeeper.start(timeout=max(5.0, deadline - time.monotonic()), preexec_fn=_die_with_parent)
        mesh = work / "mesh"
        shutil.copytree(MESH_DIR, mesh)  # the live edit changes a copy, never the repo
        port = free_port()
        say(f"control plane: meshpatch control-plane --config {mesh} --listen 127.0.0.1:{port}")
        cp = procs.start(
            "control-plane",
            [str(meshpatch), "control-plane", "--config", str(mesh), "--listen", f"127.0.0.1:{port}",
             "--log-level", "DEBUG"],  # captured, not shown: wait_for_push reads it
            plain_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert cp.stdout is not None
        cp_log = LogTail(cp.stdout)

        for version, address in PODS:
            say(f"service reviews {version} on {address} (HTTP :{HTTP_PORT}, gRPC :{GRPC_PORT})")
            svc = procs.start(
                f"reviews-{version}",
                [sys.executable, str(DEMO_DIR / "service.py"), "--version", version, "--address", address,
                 "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT)],
                plain_env(),
                stdout=subprocess.DEVNULL,
            )
            wait_for_port(address, HTTP_PORT, deadline, svc, f"reviews {version}")
            wait_for_port(address, GRPC_PORT, deadline, svc, f"reviews {version}")
        for service, version, address, interface in REGISTRY_PODS:
            where = f"registered in ZooKeeper as Dubbo provider {interface}" if interface else "in the mesh (ServiceEntry)"
            say(f"service {service} {version} on {address}: {where}")
            argv = [sys.executable, str(DEMO_DIR / "service.py"), "--version", version, "--address", address,
                    "--http-port", str(HTTP_PORT), "--grpc-port", str(GRPC_PORT)]
            if interface:
                argv += ["--zookeeper", zookeeper.address, "--dubbo-interface", interface]
            svc = procs.start(f"{service}-{version}", argv, plain_env(), stdout=subprocess.PIPE, text=True)
            assert svc.stdout is not None
            if "ready" not in svc.stdout.readline():  # printed after the ZooKeeper registration
                raise DemoFailed(f"service {service} {version} did not start (exit {svc.poll()})")
        wait_for_port("127.0.0.1", port, deadline, cp, "the control plane")

        env = plain_env()
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["MESHPATCH_XDS_SERVER"] = f"127.0.0.1:{port}"
        # A loaded 2-core CI box can take more than the default 1 s for the
        # first LDS→RDS→CDS→EDS round; give the first call more time.
        env["MESHPATCH_RESOLVE_TIMEOUT"] = "5"
        env["MESHPATCH_REGISTRY"] = f"zookeeper://{zookeeper.address}/dubbo"
        env["MESHPATCH_REGISTRY_ALIASES"] = ALIASES
        say(f"client: MESHPATCH_XDS_SERVER=127.0.0.1:{port} MESHPATCH_REGISTRY={env['MESHPATCH_REGISTRY']} "
            f"MESHPATCH_REGISTRY_ALIASES={ALIASES}")
        say(f"        meshpatch-run python demo/client.py --calls {calls} --rounds 2 --registry-round")
        client = procs.start(
            "client",
            [str(meshpatch_run), "python", str(DEMO_DIR / "client.py"), "--calls", str(calls), "--rounds", "2",
             "--registry-round"],
            env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        assert client.stdout is not None
        client_lines = pump_lines(client.stdout)
        echo = lambda line: print(f"    {line}", flush=True)  # noqa: E731

        say("round 1: VirtualService reviews says v1 20% / v2 80%")
        first = read_round(client_lines, echo, deadline)
        problems = [f"round 1: {p}" for p in check(first, (20, 80), tolerance)]
        if problems:  # no point in changing routes that do not work
            raise DemoFailed("splits off:\n  " + "\n  ".join(problems))

        say("editing the VirtualService live: v1 80% / v2 20% (client and servers keep running)")
        mark = len(cp_log.lines)
        rewrite_weights(mesh / VIRTUAL_SERVICE, [80, 20])
        wait_for_push(cp_log, mark)

        say("round 2: same client process, same connections")
        assert client.stdin is not None
        client.stdin.write("\n")
        client.stdin.flush()
        second = read_round(client_lines, echo, deadline)
        problems += [f"round 2: {p}" for p in check(second, (80, 20), tolerance)]

        say("round 3, registries: ratings lives only in ZooKeeper (no mesh rule: round robin over its 2 providers);")
        say("         details v1 is in ZooKeeper, v2 in the mesh; its VirtualService says v1 30% / v2 70%")
        client.stdin.write("\n")
        client.stdin.flush()
        third = read_registry_round(client_lines, echo, deadline)
        client.stdin.close()
        problems += [f"round 3: {p}" for p in check_registry(third, tolerance)]
        try:
            if client.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
                problems.append(f"client exited with code {client.returncode}")
        except subprocess.TimeoutExpired:
            problems.append("client did not exit after its last round")

        def summary(splits: dict[str, tuple[float, float, str]]) -> str:
            return ", ".join(f"{lib} {splits[lib][0]:.1f}/{splits[lib][1]:.1f}" for lib in LIBRARIES if lib in splits)

        say(f"before the edit (want 20/80): {summary(first)}")
        say(f"after the edit  (want 80/20): {summary(second)}")
        for service, want in REGISTRY_WANT.items():
            say(f"{service:<7} (want {want[0]}/{want[1]}): " + ", ".join(
                f"{lib} {third[(service, lib)][0]:.1f}/{third[(service, lib)][1]:.1f}" for lib in LIBRARIES if (service, lib) in third))
        if problems:
            raise DemoFailed("splits off:\n  " + "\n  ".join(problems))
        say(f"demo OK: every split within ±{tolerance:g} points ({time.monotonic() - started:.1f} s)")
    except DemoFailed:
        if cp_log is not None:
            print("---- control plane log (last lines) ----\n" + cp_log.tail(), file=sys.stderr, flush=True)
        raise
    finally:
        procs.stop_all()
        if zookeeper is not None:
            zookeeper.close()
        shutil.rmtree(work, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500, help="calls per library per round (default 500)")
    parser.add_argument("--tolerance", type=float, default=8.0, help="allowed deviation in percentage points")
    parser.add_argument("--bin", type=Path, default=Path(sys.executable).parent,
                        help="venv bin dir with meshpatch and meshpatch-run (default: this interpreter's)")
    parser.add_argument("--time-budget", type=float, default=55.0, help="give up after this many seconds")
    args = parser.parse_args(argv)

    def on_signal(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds through the finally that stops every process

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        run_demo(args.calls, args.tolerance, args.bin, args.time_budget)
    except DemoFailed as exc:
        print(f"demo FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
