"""ASGI servers and frameworks: capture the canary lane of inbound requests.

Framework level: ``starlette.applications.Starlette.__call__`` (FastAPI is a
Starlette subclass) and Django's ``ASGIHandler.__call__``.  Server level (any
ASGI app): uvicorn's ``Config.load`` wraps the app it loaded.
"""

from __future__ import annotations

from typing import Any, Tuple

from ._common import is_patched, mark_patched
from ._server import enter_asgi, wrap_asgi


def patch(module: Any) -> str:
    import wrapt

    name = module.__name__
    if name == "starlette.applications":
        owner, label = module.Starlette, "Starlette.__call__"
    elif name == "django.core.handlers.asgi":
        owner, label = module.ASGIHandler, "Django ASGIHandler"
    elif name == "uvicorn.config":
        owner, label = module.Config, "uvicorn Config.load"
    else:
        return f"{name}: nothing to patch"
    if is_patched(owner):
        return f"{label} already patched"
    if name == "uvicorn.config":
        wrapt.wrap_function_wrapper(owner, "load", _uvicorn_load)
    else:
        _replace_call(owner)
    mark_patched(owner)
    return f"{label}: inbound lanes captured"


def _replace_call(owner: Any) -> None:
    """``owner.__call__`` becomes a real ``async def``: servers (uvicorn) tell ASGI
    3 from ASGI 2 with inspect.iscoroutinefunction, which a wrapt proxy fails."""
    original = owner.__call__

    async def __call__(self: Any, scope: Any, receive: Any, send: Any) -> Any:
        token = enter_asgi(scope) if isinstance(scope, dict) else None
        if token is None:
            return await original(self, scope, receive, send)
        from meshpatch import lanes

        try:
            return await original(self, scope, receive, send)
        finally:
            lanes.leave(token)

    __call__.__wrapped__ = original  # type: ignore[attr-defined]
    __call__.__qualname__ = getattr(original, "__qualname__", "__call__")
    owner.__call__ = __call__


def _uvicorn_load(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Any) -> Any:
    result = wrapped(*args, **kwargs)
    try:
        instance.loaded_app = wrap_asgi(instance.loaded_app)
    except Exception as exc:
        from meshpatch import safety

        safety.internal_error("hooks.asgi.uvicorn", exc)
    return result
