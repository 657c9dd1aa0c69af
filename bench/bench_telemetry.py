"""Cost of meshpatch's telemetry (and lane checks) on the pick path.

A routed call's life as the hooks drive it — ``Router.start`` → ``next_endpoint``
(the attempt begins) → ``attempt_done`` (reported, retry decided) — against
the realistic config of bench_pick.py (100 routes, 10k endpoints), served over real xDS.

* ``no SDK``: opentelemetry-api installed, no SDK (the default for an app);
* ``telemetry stubbed``: the same with meshpatch.telemetry's entry points
  replaced by empty functions — the difference is what telemetry adds beyond
  the bare calls into it;
* per function: each telemetry entry point timed alone (no SDK); without an
  SDK a call consults only ``routed`` (which says no provider is set), so that
  plus the router's perf_counter reads is the whole per-call telemetry cost;
* ``SDK``: an SDK TracerProvider (no exporter) and MeterProvider with an
  in-memory reader installed — meshpatch then records a span and metrics per
  call (for reference; that cost is the app's choice).

Batches of the modes are interleaved and the medians reported.

    .venv/bin/python bench/bench_telemetry.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_pick import build  # noqa: E402
from meshpatch import lanes, telemetry  # noqa: E402
from meshpatch.routing import call as call_module  # noqa: E402
from meshpatch.routing import router as router_module  # noqa: E402
from meshpatch.routing.outcome import SUCCESS  # noqa: E402

BATCH = 2000
ENTRY_POINTS = ("routed", "rejected", "attempt_started", "attempt_ended", "retried", "call_ended")


def lifecycle(router: Any, headers: Dict[str, str]) -> Callable[[], None]:
    start = router.start

    def one() -> None:
        call = start("http", "bench", 80, "GET", "/reviews/1", headers)
        call.next_endpoint()  # the attempt begins
        call.attempt_done(SUCCESS)  # ends: reported, retry decided

    return one


def timed(fn: Callable[[], None], batch: int = BATCH) -> float:
    begin = time.perf_counter()
    for _ in range(batch):
        fn()
    return (time.perf_counter() - begin) / batch * 1e6


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class Stubbed:
    """Swap telemetry's entry points (as seen by router and call) for empty functions."""

    def __init__(self) -> None:
        self.saved = {name: getattr(telemetry, name) for name in ENTRY_POINTS}

    def __enter__(self) -> None:
        for name in ENTRY_POINTS:
            setattr(telemetry, name, _noop)

    def __exit__(self, *exc: Any) -> None:
        for name, fn in self.saved.items():
            setattr(telemetry, name, fn)


def per_function(router: Any, headers: Dict[str, str]) -> Dict[str, float]:
    call = router.start("http", "bench", 80, "GET", "/reviews/1", headers)
    call.next_endpoint(begin=False)
    perf_counter = router_module.perf_counter
    cases = {
        "2 x perf_counter (Router.start)": lambda: (perf_counter(), perf_counter()),
        "routed": lambda: telemetry.routed(call, 0.0, "bench"),
        "attempt_started": lambda: telemetry.attempt_started(call),
        "attempt_ended": lambda: telemetry.attempt_ended(call, SUCCESS),
        "call_ended": lambda: (setattr(call, "tel_done", False), telemetry.call_ended(call, SUCCESS)),
        "lanes.outbound_http (no lane)": lambda: lanes.outbound_http(headers),
    }
    out = {}
    for name, fn in cases.items():
        out[name] = statistics.median(timed(fn) for _ in range(15))
    setattr_cost = statistics.median(timed(lambda: setattr(call, "tel_done", False)) for _ in range(15))
    out["call_ended"] -= setattr_cost  # the reset only lets call_ended run its full path every time
    return out


def main() -> None:
    ads, client, router = build("ROUND_ROBIN")
    headers = {"x-tenant": "none", "accept": "*/*"}
    one = lifecycle(router, headers)
    one()
    stub = Stubbed()
    real: List[float] = []
    stubbed: List[float] = []
    for _ in range(30):
        real.append(timed(one))
        with stub:
            stubbed.append(timed(one))
    functions = per_function(router, headers)

    from opentelemetry import metrics, trace
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider

    trace.set_tracer_provider(TracerProvider())
    metrics.set_meter_provider(MeterProvider(metric_readers=[InMemoryMetricReader()]))
    with_sdk = [timed(one, 500) for _ in range(15)]

    real_median, stub_median = statistics.median(real), statistics.median(stubbed)
    # Without an SDK a call consults telemetry once (routed says no provider is
    # set); the other entry points run only for calls routed while one is set.
    total = functions["2 x perf_counter (Router.start)"] + functions["routed"]
    print("routed call life cycle (start, next_endpoint, attempt_done), 100 routes, 10k endpoints")
    print(f"  no SDK            : median {real_median:.2f} us/call")
    print(f"  telemetry stubbed : median {stub_median:.2f} us/call  -> telemetry adds {real_median - stub_median:.2f} us "
          "beyond the bare calls")
    print("  per telemetry entry point, no SDK (median us/call):")
    for name, value in functions.items():
        only_sdk = name in ("attempt_started", "attempt_ended", "call_ended")
        print(f"    {name:<34} {value:.3f}" + ("   (called only when a provider is set)" if only_sdk else ""))
    print(f"  telemetry total on the pick path, no SDK: {total:.2f} us/call (budget 2 us)")
    print(f"  with SDK tracer + meter (span + metrics per call): median {statistics.median(with_sdk):.2f} us/call")
    client.stop()
    ads.stop()


if __name__ == "__main__":
    main()
