"""Shared pytest fixtures: only small, common helpers live here.

The suite runs against the *installed* package (tests/run.sh installs it
non-editable and runs `.venv/bin/pytest`), inside a loopback-only network
namespace; nothing here changes sockets or imports.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end run of real processes (runs in CI)")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The source checkout (for demo/, bench/ and data files, not for imports)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def venv_bin() -> Path:
    """The bin dir of the venv running the tests: its `python`, `meshpatch` and
    `meshpatch-run` are the installed ones under test."""
    return Path(sys.executable).parent


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@pytest.fixture
def free_port() -> Callable[..., int]:
    """`free_port()` or `free_port("127.0.0.2")`: a TCP port free on that
    loopback address right now (another process may still take it later)."""
    return _free_port
