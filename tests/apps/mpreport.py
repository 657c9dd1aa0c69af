"""Worker-side reporter for test_multiprocess.py (imported by the test apps).

Every 5 ms it asks the process's meshpatch agent where the mesh host goes; on
each change it makes a real ``requests`` call to the host (routed by the
hooks) and rewrites ``$REPORT_DIR/<pid>.json`` with the transitions so far,
this process's role in the pod (leader / follower / direct) and any errors.
"""

from __future__ import annotations

import json
import os
import threading
import time

_started_in = None


def start() -> None:
    """Start the reporter in this process (once per process, never inherited by a fork)."""
    global _started_in
    if _started_in == os.getpid():
        return
    _started_in = os.getpid()
    threading.Thread(target=_poll, name="mpreport", daemon=True).start()


def _poll() -> None:
    import requests

    from meshpatch.agent import get_agent

    host = os.environ["MESH_HOST"]
    path = os.path.join(os.environ["REPORT_DIR"], f"{os.getpid()}.json")
    report = {"pid": os.getpid(), "started": time.time(), "transitions": [], "role": "", "errors": 0, "error": ""}
    last = object()
    written = None
    while True:
        agent = get_agent()
        try:
            pick = agent.router.pick("http", host, 9080, "GET", "/")
            address = pick.address if pick is not None else None
        except Exception as exc:  # counted: a test fails on any
            address = "error"
            report["errors"] += 1
            report["error"] = repr(exc)
        if address != last:
            now = time.time()
            served = None
            if address not in (None, "error"):
                try:
                    served = requests.get(f"http://{host}:9080/", timeout=5).json()["server"]
                except Exception as exc:
                    served = "error"
                    report["errors"] += 1
                    report["error"] = repr(exc)
            report["transitions"].append([now, address, served])
            last = address
        report["role"] = getattr(agent.client.transport, "role", "direct")
        snapshot = json.dumps(report)
        if snapshot != written:
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(snapshot)
            os.replace(tmp, path)
            written = snapshot
        time.sleep(0.005)
