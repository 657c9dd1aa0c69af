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
        owner, attr, wrapper, label = module.Starlette, "__call__", _framework_call, "Starlette.__call__"
    elif name == "django.core.handlers.asgi":
        owner, attr, wrapper, label = module.ASGIHandler, "__call__", _framework_call, "Django ASGIHandler"
    elif name == "uvicorn.config":
        owner, attr, wrapper, label = module.Config, "load", _uvicorn_load, "uvicorn Config.load"
    else:
        return f"{name}: nothing to patch"
    if is_patched(owner):
        return f"{label} already patched"
    wrapt.wrap_function_wrapper(owner, attr, wrapper)
    mark_patched(owner)
    return f"{label}: inbound lanes captured"


async def _framework_call(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Any) -> Any:
    scope = args[0] if args else kwargs.get("scope")
    token = enter_asgi(scope) if isinstance(scope, dict) else None
    if token is None:
        return await wrapped(*args, **kwargs)
    from meshpatch import lanes

    try:
        return await wrapped(*args, **kwargs)
    finally:
        lanes.leave(token)


def _uvicorn_load(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Any) -> Any:
    result = wrapped(*args, **kwargs)
    try:
        instance.loaded_app = wrap_asgi(instance.loaded_app)
    except Exception as exc:
        from meshpatch import safety

        safety.internal_error("hooks.asgi.uvicorn", exc)
    return result
