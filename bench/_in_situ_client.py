"""Where meshpatch's per-call cost goes *in situ*: each piece of its work run
right before a real requests call, as in a routed call, instead of in a loop.

Runs under ``meshpatch-run`` (started by bench/bench_in_situ.py).  Every mode
makes the same unpatched requests call by name; all but the baseline first do
one piece of meshpatch's work:

* ``wrapt``:   the call through an adapter whose ``send`` and pool-key method are
  wrapped by pass-through wrapt wrappers (why meshpatch does not use wrapt there);
* ``patch``:   the same with pass-through plain-function patches, as meshpatch
  installs them (hooks._common.patch_request_method);
* ``router``:  ``Router.start`` + ``next_endpoint`` + ``attempt_done`` (route match,
  pick, attempt accounting, retry decision);
* ``hook``:    the requests hook's wrapper around a no-op send (router + URL /
  Host rewriting and restoring);
* ``routed``:  no extra work, but the real routed call (patched adapter);
* ``loop``:    calibration, no meshpatch code: an empty 50-iteration loop
  (≈ 150 bytecodes touching no object), the in-situ price of merely
  interpreting that many instructions between two real calls.

Per round every mode runs one short batch in shuffled order; the figure is the
median over rounds of (mode's batch median CPU − baseline's), so machine
drift cancels.  A piece that costs 1 µs in a hot loop costs several here: the
HTTP library, the kernel and the server evict meshpatch's code and data
between two calls.  Prints one JSON line.

Usage: meshpatch-run python bench/_in_situ_client.py IP NAME HTTP_PORT ROUNDS
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List

import requests
import wrapt
from requests import adapters

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _ab_client import _original, batch  # noqa: E402

CLIENTS = 3
BATCH = 20


def main() -> None:
    ip, name, http_port, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    by_name = f"http://{name}:{http_port}/r"
    routed = f"http://{name}:80/r"

    from meshpatch.agent import get_agent
    from meshpatch.hooks import requests_hook
    from meshpatch.hooks._common import patch_request_method
    from meshpatch.routing.outcome import HTTP_ANSWERS

    def session(adapter_class: Any = None) -> Any:
        s = requests.Session()
        s.trust_env = False
        if adapter_class is not None:
            s.mount("http://", adapter_class())
        return s

    send, pool_key = _original(adapters.HTTPAdapter, "send"), _original(adapters.HTTPAdapter, "build_connection_pool_key_attributes")

    def passthrough(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        return wrapped(*args, **kwargs)

    plain = type("Plain", (adapters.HTTPAdapter,), {"send": send, "build_connection_pool_key_attributes": pool_key})
    wrapped = type("Wrapped", (adapters.HTTPAdapter,), {
        "send": wrapt.FunctionWrapper(send, passthrough),
        "build_connection_pool_key_attributes": wrapt.FunctionWrapper(pool_key, passthrough)})
    patched = type("Patched", (plain,), {})

    def passthrough_send(original: Any) -> Any:  # requests' parameters, as requests_hook patches them
        def method(self: Any, request: Any, stream: Any = False, timeout: Any = None, verify: Any = True,
                   cert: Any = None, proxies: Any = None) -> Any:
            return original(self, request, stream, timeout, verify, cert, proxies)
        return method

    def passthrough_pool_key(original: Any) -> Any:
        def method(self: Any, request: Any, verify: Any, cert: Any = None) -> Any:
            return original(self, request, verify, cert)
        return method

    patch_request_method(patched, "send", passthrough_send)
    patch_request_method(patched, "build_connection_pool_key_attributes", passthrough_pool_key)
    sessions = {"plain": [session(plain) for _ in range(CLIENTS)], "wrapt": [session(wrapped) for _ in range(CLIENTS)],
                "patch": [session(patched) for _ in range(CLIENTS)], "routed": [session() for _ in range(CLIENTS)]}
    sessions["routed"][0].get(routed)  # the first routed call waits for xDS
    router = get_agent().router
    headers = requests.structures.CaseInsensitiveDict({"accept": "*/*"})
    answered = HTTP_ANSWERS[200]
    response = requests.Response()
    response.status_code = 200
    prepared = requests.Request("GET", routed, headers={"accept": "*/*"}).prepare()
    no_op_adapter = adapters.HTTPAdapter()

    def no_op_send(adapter: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        return response

    routed_no_op = requests_hook._make_send(no_op_send)

    def router_work() -> None:
        call = router.start("http", name, 80, "GET", "/r", headers)
        call.next_endpoint()
        call.attempt_done(answered)

    def hook_work() -> None:
        routed_no_op(no_op_adapter, prepared, timeout=5)

    def loop_work() -> None:
        for _ in range(50):
            pass

    def mode(kind: str, work: Callable[[], None] = None) -> Callable[[], None]:
        turn = itertools.cycle(sessions["plain" if work is not None or kind == "baseline" else kind])
        url = routed if kind == "routed" else by_name
        if work is None:
            return lambda: next(turn).get(url)

        def call() -> None:
            work()
            next(turn).get(url)
        return call

    modes = {"baseline": mode("baseline"), "wrapt": mode("wrapt"), "patch": mode("patch"), "router": mode("router", router_work),
             "hook": mode("hook", hook_work), "routed": mode("routed"), "loop": mode("loop", loop_work)}
    for call in modes.values():
        batch(call, 200, [], [])
    added: Dict[str, List[float]] = {m: [] for m in modes if m != "baseline"}
    order = list(modes)
    shuffle = random.Random(2).shuffle
    for _ in range(rounds):
        shuffle(order)
        medians = {}
        for m in order:
            cpu: List[float] = []
            batch(modes[m], BATCH, [], cpu)
            medians[m] = statistics.median(cpu)
        for m in added:
            added[m].append(medians[m] - medians["baseline"])

    def summary(values: List[float]) -> Dict[str, float]:
        values = sorted(values)
        n = len(values)
        return {"median": statistics.median(values), "q1": values[n // 4], "q3": values[(3 * n) // 4]}

    print(json.dumps({m: summary(v) for m, v in added.items()}))


if __name__ == "__main__":
    main()
