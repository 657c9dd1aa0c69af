"""Per-request pick cost for a host known only to a registry (no xDS at all):
the registry-only target has the same snapshot shape as an xDS host, so the
pick should cost what bench_pick.py's does.  100 instances from a registry
source (a file), round robin.

    .venv/bin/python bench/bench_registry_pick.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshpatch.registries.catalog import Catalog  # noqa: E402
from meshpatch.registries.config import parse_registries  # noqa: E402
from meshpatch.registries.file import FileRegistry  # noqa: E402
from meshpatch.routing.router import Router  # noqa: E402

BATCH = 2000


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        path = os.path.join(work, "registry.yaml")
        with open(path, "w") as handle:
            handle.write("services:\n  bench-service:\n")
            for i in range(100):
                handle.write(f"  - {{address: 10.0.{i // 250}.{i % 250 + 1}, port: 8080, labels: {{version: v{i % 2}}}}}\n")
        (uri,) = parse_registries(f"file://{path}", ["file"])
        catalog = Catalog([FileRegistry(uri)], {})
        router = Router(None, 5.0, catalog.start, catalog)
        assert router.pick("http", "bench-service", 80, "GET", "/x") is not None
        pick = router.pick
        samples = []
        for _ in range(50):
            started = time.perf_counter()
            for _ in range(BATCH):
                pick("http", "bench-service", 80, "GET", "/api/items")
            samples.append((time.perf_counter() - started) / BATCH * 1e6)
        catalog.stop()
    print("pick cost, registry-only host (no xDS), 100 instances, round robin")
    print(f"  1 thread : median {statistics.median(samples):.2f} us/pick")


if __name__ == "__main__":
    main()
