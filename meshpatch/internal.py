"""Marks meshpatch's own traffic so the hooks never reroute it.

The xDS stream, registry clients and exporters may use the very libraries the
hooks patch (grpcio, requests); they run inside :func:`suppressed` and the hooks
check :func:`is_suppressed` first.  A ContextVar (not a thread-local) so that
asyncio tasks spawned by meshpatch inherit the mark and app tasks do not.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator

_SUPPRESSED: ContextVar[bool] = ContextVar("meshpatch_suppressed", default=False)

is_suppressed = _SUPPRESSED.get


@contextlib.contextmanager
def suppressed() -> Iterator[None]:
    token = _SUPPRESSED.set(True)
    try:
        yield
    finally:
        _SUPPRESSED.reset(token)


def suppress_current_context() -> None:
    """For meshpatch's own long-lived threads: everything they do is internal."""
    _SUPPRESSED.set(True)
