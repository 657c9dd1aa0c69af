"""WSGI servers and frameworks: capture the canary lane of inbound requests.

Framework level (any server): ``flask.Flask.wsgi_app`` and Django's
``WSGIHandler.__call__``.  Server level (any WSGI app): ``wsgiref``'s
``BaseHandler.run`` (wsgiref.simple_server and threaded variants) and
gunicorn's ``Worker.load_wsgi``.  Whichever the app imports is patched when it
imports it; a request seen by two of them is captured once.
"""

from __future__ import annotations

from typing import Any, Tuple

from ._common import is_patched, mark_patched
from ._server import enter_wsgi, wrap_wsgi


def patch(module: Any) -> str:
    import wrapt

    name = module.__name__
    if name == "flask":
        owner, attr, wrapper, label = module.Flask, "wsgi_app", _framework_call, "Flask.wsgi_app"
    elif name == "django.core.handlers.wsgi":
        owner, attr, wrapper, label = module.WSGIHandler, "__call__", _framework_call, "Django WSGIHandler"
    elif name == "wsgiref.handlers":
        owner, attr, wrapper, label = module.BaseHandler, "run", _wsgiref_run, "wsgiref BaseHandler.run"
    elif name == "gunicorn.workers.base":
        owner, attr, wrapper, label = module.Worker, "load_wsgi", _gunicorn_load, "gunicorn Worker.load_wsgi"
    else:
        return f"{name}: nothing to patch"
    if is_patched(owner):
        return f"{label} already patched"
    wrapt.wrap_function_wrapper(owner, attr, wrapper)
    mark_patched(owner)
    return f"{label}: inbound lanes captured"


def _framework_call(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Any) -> Any:
    """Flask.wsgi_app(environ, start_response) / WSGIHandler(environ, start_response)."""
    environ = args[0] if args else kwargs.get("environ")
    token = enter_wsgi(environ) if environ is not None else None
    if token is None:
        return wrapped(*args, **kwargs)
    from meshpatch import lanes

    try:
        return wrapped(*args, **kwargs)
    finally:
        lanes.leave(token)


def _wsgiref_run(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Any) -> Any:
    if args:
        args = (wrap_wsgi(args[0]),) + tuple(args[1:])
    elif "application" in kwargs:
        kwargs = dict(kwargs, application=wrap_wsgi(kwargs["application"]))
    return wrapped(*args, **kwargs)


def _gunicorn_load(wrapped: Any, instance: Any, args: Tuple[Any, ...], kwargs: Any) -> Any:
    result = wrapped(*args, **kwargs)
    try:
        import inspect

        app = instance.wsgi
        # An ASGI app under an ASGI worker class (uvicorn's): the asgi hook's business.
        if not (inspect.iscoroutinefunction(app) or inspect.iscoroutinefunction(getattr(app, "__call__", None))):
            instance.wsgi = wrap_wsgi(app)
    except Exception as exc:
        from meshpatch import safety

        safety.internal_error("hooks.wsgi.gunicorn", exc)
    return result
