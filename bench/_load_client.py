"""Load client for the robustness benches: an ordinary app (it knows nothing of
meshpatch) calling the mesh host at a steady rate from a few threads.

Usage: python bench/_load_client.py URL SECONDS RATE THREADS
Prints a JSON line per second (ok / failed / answered-by counts) to stderr and
one summary JSON line to stdout at the end.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
import time

import requests


def main() -> None:
    url, seconds, rate, threads = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    lock = threading.Lock()
    per_second: "collections.defaultdict[int, collections.Counter]" = collections.defaultdict(collections.Counter)
    errors: "collections.Counter[str]" = collections.Counter()
    start = time.monotonic()
    end = start + seconds
    interval = threads / rate

    def worker(offset: float) -> None:
        session = requests.Session()
        next_at = start + offset
        while True:
            now = time.monotonic()
            if now >= end:
                return
            if next_at > now:
                time.sleep(next_at - now)
            next_at += interval
            second = int(time.monotonic() - start)
            try:
                answer = session.get(url, timeout=5).json()["server"]
                with lock:
                    per_second[second]["ok"] += 1
                    per_second[second][answer] += 1
            except Exception as exc:  # every failure is counted and named
                with lock:
                    per_second[second]["failed"] += 1
                    errors[type(exc).__name__ + ": " + str(exc)[:120]] += 1

    pool = [threading.Thread(target=worker, args=(i * interval / threads,)) for i in range(threads)]
    for t in pool:
        t.start()
    last = 0
    while any(t.is_alive() for t in pool):
        time.sleep(0.25)
        now = int(time.monotonic() - start)
        while last < now:
            with lock:
                sys.stderr.write(json.dumps({"t": last, **per_second[last]}) + "\n")
            sys.stderr.flush()
            last += 1
    for t in pool:
        t.join()
    total = collections.Counter()
    for counts in per_second.values():
        total.update(counts)
    print(json.dumps({"total": dict(total), "errors": dict(errors.most_common(5)),
                      "seconds": {k: dict(v) for k, v in sorted(per_second.items())}}))


if __name__ == "__main__":
    main()
