"""What every hook shares: the agent lookup and "is this ours to route" checks.

Kept separate so each library hook stays a thin translation between its
library's request object and :meth:`Router.pick`.
"""

from __future__ import annotations

from typing import Any

from meshpatch.internal import is_suppressed

__all__ = ["current_agent", "is_suppressed", "PATCH_MARKER", "mark_patched", "is_patched"]

#: Attribute set on a patched class/module so a second patch() is a no-op.
PATCH_MARKER = "_meshpatch_patched"

_agent_module: Any = None  # meshpatch.agent, once loaded


def current_agent() -> Any:
    """The process agent or None.  ``meshpatch.agent`` is imported on the first
    routed call, not when the hooked library is imported: building the agent
    pulls in grpc and the xDS protos, which an app that never calls out should
    not pay for.  Once it exists the agent is read straight from its module
    (no call into it per request)."""
    module = _agent_module
    if module is None:
        module = _load_agent_module()
    agent = module._agent
    return agent if agent is not None else module.get_agent()


def _load_agent_module() -> Any:
    global _agent_module
    from meshpatch import agent

    _agent_module = agent
    return agent


def is_patched(owner: Any) -> bool:
    return bool(getattr(owner, PATCH_MARKER, False))


def mark_patched(owner: Any) -> None:
    setattr(owner, PATCH_MARKER, True)
