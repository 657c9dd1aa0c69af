"""Fail-open bookkeeping: an internal error is logged once per site and counted.

The app must never break because of the agent.  Every hook wraps its meshpatch
work in ``try``/``except Exception`` and calls :func:`internal_error`, then makes
the original call.  Counts are kept per site for the status CLI and metrics.
"""

from __future__ import annotations

import threading
from typing import Dict

_counts: Dict[str, int] = {}
_lock = threading.Lock()


def internal_error(site: str, exc: BaseException) -> None:
    with _lock:
        first = site not in _counts
        _counts[site] = _counts.get(site, 0) + 1
    if first:
        import logging

        logging.getLogger("meshpatch").warning(
            "meshpatch internal error in %s; the call proceeds unpatched (logged once, counted): %r",
            site,
            exc,
            exc_info=exc,
        )


def error_counts() -> Dict[str, int]:
    with _lock:
        return dict(_counts)


def reinit_after_fork() -> None:
    """In a forked child: the lock may have been held by a thread that is gone."""
    global _lock
    _lock = threading.Lock()
