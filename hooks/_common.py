"""What every hook shares: the agent lookup and "is this ours to route" checks.

Kept separate so each library hook stays a thin translation between its
library's request object and :meth:`Router.pick`.
"""

from __future__ import annotations

import functools
from types import FunctionType
from typing import Any, Callable

from meshpatch.internal import is_suppressed

__all__ = ["current_agent", "is_suppressed", "PATCH_MARKER", "mark_patched", "is_patched", "patch_request_method"]

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


def patch_request_method(owner: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """Replace ``owner.<name>`` by ``make(original)``: a plain function, for the
    methods that run on every request (``HTTPAdapter.send`` and its pool-key
    method, the httpx transports' ``handle_request``).

    Everything else is patched with wrapt.  Its FunctionWrapper binds a new
    proxy and packs the arguments into a tuple and a dict on every call: 0.4 µs
    per call in a loop, 1.5 µs between real calls, 3-5 µs per requests call for
    the two wrapped methods (bench/bench_in_situ.py) -- a fifth of meshpatch's
    whole cost per call.  ``original`` is callable as ``original(self, *args)``
    also when the attribute was already wrapped by someone else (a descriptor:
    bound per call, as attribute access would); ``__wrapped__`` and the name and
    docstring are the original's, so introspection and unpatching work as with wrapt.
    """
    raw = next(klass.__dict__[name] for klass in owner.__mro__ if name in klass.__dict__)
    original: Callable[..., Any] = raw
    if type(raw) is not FunctionType:  # not isinstance: a wrapt proxy claims its target's class
        descriptor = raw

        def original(self: Any, *args: Any, **kwargs: Any) -> Any:
            return descriptor.__get__(self, type(self))(*args, **kwargs)

    patched = make(original)
    functools.update_wrapper(patched, raw)
    setattr(owner, name, patched)


def is_patched(owner: Any) -> bool:
    return bool(getattr(owner, PATCH_MARKER, False))


def mark_patched(owner: Any) -> None:
    setattr(owner, PATCH_MARKER, True)
