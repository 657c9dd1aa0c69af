"""Python bytecodes and functions meshpatch runs per routed call, per hook.

Between two real calls the kernel, the HTTP/gRPC library and the server evict
the interpreter's and meshpatch's code and data; measured in situ every bytecode
then costs about 20 ns (bench_in_situ.py's calibration piece), so the count is a
noise-free predictor of the added latency bench_overhead.py measures.  Same set-up
as bench_hook_cost.py (in-process ADS server, one service, a catch-all route, one
endpoint, the hook around a no-op send); one warmed call per hook is traced with
``sys.settrace`` opcode events, counting only meshpatch's own code.

    .venv/bin/python bench/bench_bytecodes.py
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path
from typing import Any, Callable, Counter, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_hook_cost as hook_cost  # noqa: E402

PACKAGE = str(Path(__file__).resolve().parents[1] / "meshpatch")


def traced(call: Callable[[], Any]) -> Tuple[Counter[str], int]:
    """(bytecodes per meshpatch function, meshpatch function calls) of one call."""
    bytecodes: Counter[str] = collections.Counter()
    frames = 0

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal frames
        filename = frame.f_code.co_filename
        if not filename.startswith(PACKAGE):
            return None
        if event == "call":
            frames += 1
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
        elif event == "opcode":
            bytecodes[f"{filename[len(PACKAGE) + 1:]}:{frame.f_code.co_name}"] += 1
        return trace

    sys.settrace(trace)
    try:
        call()
    finally:
        sys.settrace(None)
    return bytecodes, frames


def main() -> None:
    ads = hook_cost.serve_mesh()
    os.environ["MESHPATCH_XDS_SERVER"] = ads.address
    os.environ["MESHPATCH_SHARE_STREAM"] = "0"
    from meshpatch.agent import get_agent

    get_agent()
    try:
        print("meshpatch's Python work per routed call (hook + router around a no-op send)")
        print(f"  {'hook':9} {'bytecodes':>9} {'functions':>9}   biggest")
        for name, case in (("requests", hook_cost.requests_case), ("httpx", hook_cost.httpx_case),
                           ("grpc", hook_cost.grpc_case)):
            _, mesh = case()
            for _ in range(200):  # warm: first call waits for xDS, then the interpreter specialises
                mesh()
            bytecodes, frames = traced(mesh)
            top = ", ".join(f"{where} {count}" for where, count in bytecodes.most_common(3))
            print(f"  {name:9} {sum(bytecodes.values()):9} {frames:9}   {top}")
        print("  at ~20 ns per bytecode in situ, 500 bytecodes are ~10 us added per call")
    finally:
        ads.stop()


if __name__ == "__main__":
    main()
