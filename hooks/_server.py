"""What the server hooks share: wrapping a WSGI or ASGI app so each inbound
request runs in its lane (see :mod:`meshpatch.lanes`).

A request may pass through two hooked layers (a server hook around the app
and a framework hook inside it); the first one marks the request (WSGI
environ / ASGI scope key) and the second one steps aside.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from meshpatch import lanes, safety

MARK = "meshpatch.lane_seen"


def _environ_header(environ: Any) -> Callable[[str], Any]:
    def get(name: str) -> Any:
        return environ.get("HTTP_" + name.upper().replace("-", "_"))

    return get


def enter_wsgi(environ: Any) -> Any:
    """The lane token for one WSGI request, or None (already captured, no lane)."""
    try:
        if environ.get(MARK):
            return None
        environ[MARK] = True
        return lanes.enter(lanes.inbound_lane(_environ_header(environ)))
    except Exception as exc:
        safety.internal_error("hooks.wsgi.lane", exc)
        return None


def wrap_wsgi(app: Any) -> Any:
    """A WSGI app that runs ``app`` in the request's lane.  The lane is current
    while ``app`` runs (not while a streamed body is iterated later)."""
    if app is None or getattr(app, "_meshpatch_wsgi", False):
        return app

    def meshpatch_wsgi(environ: Any, start_response: Any) -> Any:
        token = enter_wsgi(environ)
        if token is None:
            return app(environ, start_response)
        try:
            return app(environ, start_response)
        finally:
            lanes.leave(token)

    meshpatch_wsgi._meshpatch_wsgi = True  # type: ignore[attr-defined]
    meshpatch_wsgi.__wrapped__ = app  # type: ignore[attr-defined]
    return meshpatch_wsgi


def _scope_header(scope: Any) -> Callable[[str], Optional[bytes]]:
    def get(name: str) -> Optional[bytes]:
        wanted = name.encode("latin-1")
        for key, value in scope.get("headers") or ():
            if key.lower() == wanted:
                return value
        return None

    return get


def enter_asgi(scope: Any) -> Any:
    try:
        if scope.get("type") not in ("http", "websocket") or scope.get(MARK):
            return None
        scope[MARK] = True
        return lanes.enter(lanes.inbound_lane(_scope_header(scope)))
    except Exception as exc:
        safety.internal_error("hooks.asgi.lane", exc)
        return None


def wrap_asgi(app: Any) -> Any:
    """An ASGI app that runs ``app`` in the request's lane (the server runs each
    request in its own task, so the lane is that task's)."""
    if app is None or getattr(app, "_meshpatch_asgi", False):
        return app

    async def meshpatch_asgi(scope: Any, receive: Any, send: Any) -> Any:
        token = enter_asgi(scope)
        if token is None:
            return await app(scope, receive, send)
        try:
            return await app(scope, receive, send)
        finally:
            lanes.leave(token)

    meshpatch_asgi._meshpatch_asgi = True  # type: ignore[attr-defined]
    meshpatch_asgi.__wrapped__ = app  # type: ignore[attr-defined]
    return meshpatch_asgi
