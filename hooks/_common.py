"""What every hook shares: the agent lookup and "is this ours to route" checks.

Kept separate so each library hook stays a thin translation between its
library's request object and :meth:`Router.pick`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from meshpatch.internal import is_suppressed

__all__ = ["current_agent", "is_suppressed", "PATCH_MARKER", "mark_patched", "is_patched"]

#: Attribute set on a patched class/module so a second patch() is a no-op.
PATCH_MARKER = "_meshpatch_patched"

_get_agent: Optional[Callable[[], Any]] = None


def current_agent() -> Any:
    """The process agent or None.  ``meshpatch.agent`` is imported on the first
    routed call, not when the hooked library is imported: building the agent
    pulls in grpc and the xDS protos, which an app that never calls out should
    not pay for."""
    get = _get_agent
    if get is None:
        get = _load_get_agent()
    return get()


def _load_get_agent() -> Callable[[], Any]:
    global _get_agent
    from meshpatch.agent import get_agent

    _get_agent = get_agent
    return get_agent


def is_patched(owner: Any) -> bool:
    return bool(getattr(owner, PATCH_MARKER, False))


def mark_patched(owner: Any) -> None:
    setattr(owner, PATCH_MARKER, True)
