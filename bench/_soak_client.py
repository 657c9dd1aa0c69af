"""Soak client: an ordinary app making COUNT calls to the mesh host from THREADS
threads (keep-alive sessions), as fast as it can.  Prints ``progress N`` every
PROGRESS calls (the bench samples this process's RSS and fds then) and a JSON
summary at the end."""

from __future__ import annotations

import json
import sys
import threading

import requests


def main() -> None:
    url, count, threads, progress = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    lock = threading.Lock()
    state = {"done": 0, "failed": 0, "next": progress}
    answered: dict = {}

    def worker() -> None:
        session = requests.Session()
        while True:
            with lock:
                if state["done"] >= count:
                    return
                state["done"] += 1
                report = state["done"] >= state["next"]
                if report:
                    state["next"] += progress
                    done = state["done"]
            try:
                server = session.get(url, timeout=5).json()["server"]
                with lock:
                    answered[server] = answered.get(server, 0) + 1
            except Exception:
                with lock:
                    state["failed"] += 1
            if report:
                print(f"progress {done}", flush=True)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(json.dumps({"done": state["done"], "failed": state["failed"], "answered": answered}), flush=True)


if __name__ == "__main__":
    main()
