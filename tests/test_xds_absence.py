"""LDS absence is attributed to the request the server answered: a second
unknown host, subscribed after the first response's ACK, is known absent at
once (it used to wait out MESHPATCH_RESOLVE_TIMEOUT, and a registry-only host
next to xDS was never routed)."""

from __future__ import annotations

import time

from meshpatch.agent import Agent
from meshpatch.bootstrap import load_bootstrap
from meshpatch.config import Settings
from tests.support.controlplane import control_plane


def test_unknown_hosts_one_after_another_are_answered_promptly() -> None:
    with control_plane("") as cp:
        settings = Settings({"MESHPATCH_XDS_SERVER": cp.address, "MESHPATCH_RESOLVE_TIMEOUT": "5"})
        agent = Agent(settings, load_bootstrap(settings))
        try:
            for host in ("first-unknown", "second-unknown", "third-unknown"):
                started = time.monotonic()
                assert agent.router.pick("http", host, 80, "GET", "/") is None
                assert time.monotonic() - started < 2.0, f"{host} waited for the resolve timeout"
        finally:
            agent.stop()
