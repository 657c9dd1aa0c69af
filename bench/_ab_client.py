"""In-process A/B benchmark client: meshpatch's added cost per call, measured
without comparing two processes.

Runs under ``meshpatch-run``.  For each library it alternates short batches of
calls in one process, one interpreter, one server:

* ``direct``: the IP URL through an *unpatched* adapter / transport (a
  subclass holding the original methods; for gRPC a channel made by the
  original ``insecure_channel``), i.e. no meshpatch code at all;
* ``name``: the mesh hostname, unpatched, resolved by the system (a private
  /etc/hosts; only when the runner set one up): what the app pays without
  meshpatch for calling by name;
* ``mesh``: the mesh hostname, patched, routed by meshpatch.

requests runs with ``trust_env = False`` in every mode (see main()).
Short batches of the modes in shuffled order, compared round by round, cancel
the drift that dominates cross-process comparisons on a shared 2-core machine.
Prints one JSON line: per library and mode the median of all per-call samples
(microseconds), wall clock and the calling thread's CPU time, and per pair of
modes the median over rounds of the difference of their batch medians.

Usage: meshpatch-run python bench/_ab_client.py IP NAME HTTP_PORT GRPC_PORT
       MESH_HTTP_URL MESH_GRPC_TARGET ROUNDS BATCH [with-name]
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import grpc
import httpx
import requests
from requests import adapters

CLOCK = time.perf_counter


def _original(owner: Any, name: str) -> Any:
    wrapper = owner.__dict__[name]
    original = getattr(wrapper, "__wrapped__", None)
    if original is None:
        raise SystemExit(f"{owner.__name__}.{name} is not patched: run under meshpatch-run")
    return original


def unpatched_clients() -> Tuple[Any, Any]:
    """A requests Session and an httpx Client whose adapter / transport are
    subclasses restoring the original, unwrapped methods: calls through them run
    no meshpatch code, and nothing is swapped at run time (swapping class
    attributes would invalidate the interpreter's attribute caches and bias
    whichever mode runs next)."""
    direct_adapter = type("DirectAdapter", (adapters.HTTPAdapter,), {
        "send": _original(adapters.HTTPAdapter, "send"),
        "build_connection_pool_key_attributes": _original(adapters.HTTPAdapter, "build_connection_pool_key_attributes"),
    })
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", direct_adapter())
    transport = type("DirectTransport", (httpx.HTTPTransport,), {
        "handle_request": _original(httpx.HTTPTransport, "handle_request"),
    })
    return session, httpx.Client(transport=transport())


def batch(call: Callable[[], None], n: int, wall: List[float], cpu: List[float]) -> None:
    """Per call: wall-clock latency and this thread's CPU time (the client's own
    work, which is where meshpatch's cost lives, minus the machine's noise)."""
    clock = CLOCK
    thread_clock = time.thread_time
    for _ in range(n):
        start = clock()
        start_cpu = thread_clock()
        call()
        cpu.append((thread_clock() - start_cpu) * 1e6)
        wall.append((clock() - start) * 1e6)


#: Clients per mode, used in turn: one session / client / channel per mode would
#: let the accidents of one object's memory layout and its server thread pass
#: for a difference between modes (two identical modes differ by ~5 % that way).
CLIENTS = 3


def main() -> None:
    ip, name, http_port, grpc_port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    mesh_url, mesh_target = sys.argv[5], sys.argv[6]
    rounds, size = int(sys.argv[7]), int(sys.argv[8])
    with_name = len(sys.argv) > 9 and sys.argv[9] == "with-name"
    modes = ["direct", "mesh"] + (["name"] if with_name else [])
    urls = {"direct": f"http://{ip}:{http_port}/r", "name": f"http://{name}:{http_port}/r", "mesh": mesh_url}
    targets = {"direct": f"{ip}:{grpc_port}", "name": f"{name}:{grpc_port}", "mesh": mesh_target}
    original_channel = getattr(grpc.insecure_channel, "__wrapped__", grpc.insecure_channel)

    def clients(mode: str) -> Tuple[List[Any], List[Any], List[Any]]:
        sessions, http_clients, unaries = [], [], []
        for _ in range(CLIENTS):
            if mode == "mesh":
                session, client = requests.Session(), httpx.Client()
                channel = grpc.insecure_channel(targets[mode])
            else:
                session, client = unpatched_clients()
                channel = original_channel(targets[mode])
            # trust_env off: no proxy/netrc/CA-bundle lookups from the environment
            # per call, file-system work that swings by tens of microseconds on a
            # shared machine and has nothing to do with routing (same in every mode).
            session.trust_env = False
            sessions.append(session)
            http_clients.append(client)
            unaries.append(channel.unary_unary("/bench.Echo/Call", request_serializer=None, response_deserializer=None))
        return sessions, http_clients, unaries

    def in_turn(calls: List[Callable[[], None]]) -> Callable[[], None]:
        turn = itertools.cycle(calls)
        return lambda: next(turn)()

    def http_call(get: Callable[..., Any], url: str) -> Callable[[], None]:
        def call() -> None:
            response = get(url)
            assert response.status_code == 200
        return call

    def grpc_call(unary: Any) -> Callable[[], None]:
        def call() -> None:
            assert unary(b"ping", timeout=5)
        return call

    calls: Dict[str, Dict[str, Callable[[], None]]] = {"requests": {}, "httpx": {}, "grpc": {}}
    for mode in modes:
        sessions, http_clients, unaries = clients(mode)
        calls["requests"][mode] = in_turn([http_call(s.get, urls[mode]) for s in sessions])
        calls["httpx"][mode] = in_turn([http_call(c.get, urls[mode]) for c in http_clients])
        calls["grpc"][mode] = in_turn([grpc_call(u) for u in unaries])
    out: Dict[str, Any] = {}
    shuffle = random.Random(1).shuffle
    for lib, by_mode in calls.items():
        wall: Dict[str, List[float]] = {m: [] for m in modes}
        cpu: Dict[str, List[float]] = {m: [] for m in modes}
        # per round, one mode's batch median minus another's of the same round:
        # neighbours in time, so the machine's drift cancels pair by pair
        pairs = [("mesh", "direct")] + ([("mesh", "name"), ("name", "direct")] if with_name else [])
        paired: Dict[str, Dict[str, List[float]]] = {k: {f"{a}-{b}": [] for a, b in pairs} for k in ("wall", "cpu")}
        for mode in modes:  # warm-up: connections, pools, the first (waiting) mesh call
            batch(by_mode[mode], 200, [], [])
        order = list(modes)
        for _ in range(rounds):
            shuffle(order)  # no mode always runs first or after the same one
            medians: Dict[str, Tuple[float, float]] = {}
            for mode in order:
                w: List[float] = []
                c: List[float] = []
                batch(by_mode[mode], size, w, c)
                wall[mode].extend(w)
                cpu[mode].extend(c)
                medians[mode] = (statistics.median(w), statistics.median(c))
            for a, b in pairs:
                paired["wall"][f"{a}-{b}"].append(medians[a][0] - medians[b][0])
                paired["cpu"][f"{a}-{b}"].append(medians[a][1] - medians[b][1])
        out[lib] = {"wall": {m: statistics.median(s) for m, s in wall.items()},
                    "cpu": {m: statistics.median(s) for m, s in cpu.items()},
                    "paired": {k: {m: statistics.median(d) for m, d in by.items()} for k, by in paired.items()}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
