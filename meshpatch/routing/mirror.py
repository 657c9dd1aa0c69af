"""Fire-and-forget shadow traffic (Envoy request mirroring).

Mirrors run on a small daemon pool, marked as meshpatch's own traffic so the
hooks never route them again, and are dropped (and counted) when the pool is
busy: a shadow copy must never delay or fail the real call.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

from meshpatch.internal import suppressed

MAX_QUEUED = 64

_executor: Optional[ThreadPoolExecutor] = None
_lock = threading.Lock()
_slots = threading.BoundedSemaphore(MAX_QUEUED)
stats = {"sent": 0, "dropped": 0, "failed": 0}


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        with _lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="meshpatch-mirror")
    return _executor


def submit(send: Callable[[], None]) -> bool:
    """Run ``send`` in the background; False when it was dropped."""
    if not _slots.acquire(blocking=False):
        stats["dropped"] += 1
        return False

    def run() -> None:
        try:
            with suppressed():
                send()
            stats["sent"] += 1
        except Exception:
            stats["failed"] += 1
        finally:
            _slots.release()

    try:
        _pool().submit(run)
    except RuntimeError:  # interpreter shutting down
        _slots.release()
        return False
    return True


def reset_after_fork() -> None:
    global _executor, _slots
    _executor = None
    _slots = threading.BoundedSemaphore(MAX_QUEUED)
