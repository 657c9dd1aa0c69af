"""``meshpatch control-plane``: the installed console script, as a real process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Tuple

import pytest

from tests.support.controlplane import LDS, AdsClient, decode

MESH = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo}
spec:
  hosts: [echo.default.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 7070, name: grpc, protocol: GRPC}]
  endpoints: [{address: 127.0.0.2}]
"""
READY = "meshpatch control plane serving xDS on "


def _meshpatch(venv_bin: Path) -> List[str]:
    script = venv_bin / "meshpatch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "meshpatch.cli.main"]


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHPATCH_")}


def _start(venv_bin: Path, *args: str) -> Tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        _meshpatch(venv_bin) + ["control-plane", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + 15
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(READY):
            return proc, line[len(READY):].split(" ")[0]
    proc.kill()
    proc.wait()
    raise AssertionError("control plane did not become ready:\n" + "".join(seen))


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    p = tmp_path / "mesh.yaml"
    p.write_text(MESH)
    return p


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serves_tcp_until_signal_then_exits_zero(venv_bin: Path, config: Path, sig: int) -> None:
    proc, address = _start(venv_bin, "--config", str(config), "--listen", "127.0.0.1:0")
    try:
        assert address.startswith("127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0
        with AdsClient(address) as c:
            c.send(LDS, ["echo:7070"])
            assert list(decode(c.recv())) == ["echo:7070"]
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err


def test_serves_on_unix_socket(venv_bin: Path, config: Path, tmp_path: Path) -> None:
    sock = tmp_path / "xds.sock"
    proc, address = _start(venv_bin, "--config", str(config.parent), "--listen", f"unix://{sock}")
    try:
        assert address == f"unix://{sock}"
        with AdsClient(address) as c:
            c.send(LDS, [])
            assert list(decode(c.recv())) == ["echo.default.svc.cluster.local:7070"]
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    assert proc.returncode == 0


def test_bad_config_path_is_one_clear_error_and_exit_2(venv_bin: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    res = subprocess.run(
        _meshpatch(venv_bin) + ["control-plane", "--config", str(missing)],
        capture_output=True, text=True, timeout=30, env=_env(),
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "no such file" in lines[0], res.stderr


def test_invalid_listen_address_exits_2(venv_bin: Path, config: Path) -> None:
    res = subprocess.run(
        _meshpatch(venv_bin) + ["control-plane", "--config", str(config), "--listen", "nonsense"],
        capture_output=True, text=True, timeout=30, env=_env(),
    )
    assert res.returncode == 2 and "--listen" in res.stderr
