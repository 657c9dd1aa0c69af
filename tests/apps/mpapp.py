"""multiprocessing app: ``python mpapp.py fork|spawn N``.  The parent calls the
mesh first (so its agent holds the pod's stream), then runs N worker
processes; every process runs the test reporter until terminated."""

import multiprocessing
import os
import signal
import sys
import time

import requests

import mpreport


def worker() -> None:
    mpreport.start()
    while True:
        time.sleep(1)


def main() -> None:
    method, count = sys.argv[1], int(sys.argv[2])
    requests.get(f"http://{os.environ['MESH_HOST']}:9080/", timeout=10)  # the agent starts here, in the parent
    mpreport.start()
    ctx = multiprocessing.get_context(method)
    children = [ctx.Process(target=worker, daemon=True) for _ in range(count)]
    for child in children:
        child.start()

    def stop(*_):
        for child in children:
            child.terminate()
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
