"""Process-start activation: read the settings once and register lazy library hooks.

Three entry points reach :func:`activate`: the ``meshpatch.pth`` line (env-gated
before it even imports meshpatch), the ``meshpatch.start`` PEP 829 twin and the
``sitecustomize`` that ``meshpatch-run`` puts first on ``PYTHONPATH``.  Under
``meshpatch-run`` in an environment where meshpatch is installed both the
``.pth`` and ``sitecustomize`` fire, so activation is idempotent.

Nothing here may import wrapt, logging, typing, dataclasses or a patched library:
this module runs in every enabled interpreter before the app's ``__main__``,
within a 15 ms budget.  Hooks are registered through :mod:`meshpatch._importhook`
and the real patching code is imported only when the app imports the library.

Why the ``.pth`` path does the work immediately instead of deferring it to the
end of ``site`` processing like autowrapt: registering a meta-path finder needs
neither the final ``sys.path`` nor entry points, and doing it at once guarantees
the hooks exist before any later ``.pth`` file, ``sitecustomize`` or the app's
main module can import ``requests``/``httpx``/``grpc``.
"""

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from types import ModuleType
    from typing import Dict, Optional

#: hook name (as in MESHPATCH_HOOKS) -> the module(s) whose import triggers it.
#: The server hooks (inbound lane capture) watch the frameworks and servers
#: that call WSGI/ASGI apps; whichever the app imports is patched.
HOOK_TARGETS = {
    "requests": "requests",
    "httpx": "httpx",
    "grpc": "grpc",
    "wsgi": ("flask", "django.core.handlers.wsgi", "wsgiref.handlers", "gunicorn.workers.base"),
    "asgi": ("starlette.applications", "django.core.handlers.asgi", "uvicorn.config"),
    "grpc_server": ("grpc",),
}

_activated = False
_source: "Optional[str]" = None
_config_error: "Optional[str]" = None
_states: "Dict[str, Dict[str, str]]" = {}
_settings = None


def _gate_open() -> bool:
    from meshpatch.config import enabled_in

    return enabled_in(os.environ)


def activate_from_pth() -> None:
    """Called by the ``meshpatch.pth`` line, which has already checked the gate."""
    activate("pth")


def activate_from_start() -> None:
    """PEP 829 entry point.  ``.start`` entries run unconditionally, so gate here."""
    if os.environ.get("MESHPATCH_ENABLED", "").strip().lower() in ("", "0", "false", "no", "off"):
        return
    activate("start")


def activate_from_sitecustomize() -> None:
    """Called by meshpatch's ``sitecustomize``; honours the gate for hand-made PYTHONPATHs."""
    if _gate_open():
        activate("sitecustomize")


def activate(source: str = "api") -> bool:
    """Register the selected hooks once per process; never raises.

    Returns whether meshpatch is active (False after a configuration error).
    """
    global _activated, _source
    if _activated:
        return _config_error is None
    _activated = True
    _source = source
    try:
        _activate()
    except Exception as exc:
        try:
            from meshpatch import safety

            safety.internal_error("activation", exc)
        except Exception:
            pass
        return False
    return _config_error is None


def _activate() -> None:
    global _config_error, _settings
    from meshpatch.config import KNOWN_HOOKS, ConfigError, Settings

    try:
        settings = Settings(os.environ)
        from meshpatch.config import LaneSettings, parse_admin_address

        LaneSettings(os.environ)
        admin = parse_admin_address(os.environ)
    except ConfigError as exc:
        _config_error = str(exc)
        for name in KNOWN_HOOKS:
            _states[name] = {"state": "off", "detail": "configuration error: " + _config_error}
        _warn(_config_error)
        return
    _settings = settings

    from meshpatch import _importhook

    for name in KNOWN_HOOKS:
        if name not in settings.hooks:
            _states[name] = {"state": "disabled", "detail": _disabled_reason(name)}
            continue
        targets = HOOK_TARGETS[name]
        if isinstance(targets, str):
            targets = (targets,)
        early = [target for target in targets if target in sys.modules]
        if early:
            detail = f"{early[0]} was imported before meshpatch activated; patching it now"
        else:
            detail = f"waiting for the app to import {' or '.join(targets)}"
        _states[name] = {"state": "pending", "detail": detail}
        for target in targets:
            _importhook.when_imported(target, _applier(name))
    if admin is not None:
        _start_admin(admin)


def _start_admin(address: "object") -> None:
    """The admin endpoint (MESHPATCH_ADMIN) is served from a daemon thread that
    does its own imports, so start-up only pays for creating the thread."""
    import threading

    def serve() -> None:
        try:
            from meshpatch import admin

            admin.serve(address)
        except Exception as exc:
            from meshpatch import safety

            safety.internal_error("admin", exc)

    threading.Thread(target=serve, name="meshpatch-admin-start", daemon=True).start()


def _disabled_reason(name: str) -> str:
    disabled = os.environ.get("MESHPATCH_DISABLED_HOOKS", "")
    listed = {part.strip().lower() for part in disabled.split(",")}
    if name in listed or "*" in listed:
        return "disabled by MESHPATCH_DISABLED_HOOKS"
    return "not listed in MESHPATCH_HOOKS"


def _applier(name: str):
    def apply(module: "ModuleType") -> None:
        try:
            hook = __import__(f"meshpatch.hooks.{name}_hook", fromlist=["patch"])
            detail = hook.patch(module)
        except Exception as exc:
            _states[name] = {"state": "failed", "detail": f"{type(exc).__name__}: {exc}"}
            from meshpatch import safety

            safety.internal_error(f"hooks.{name}.patch", exc)
            return
        previous = _states.get(name, {})
        if "before meshpatch activated" in previous.get("detail", ""):
            detail = f"{detail} (imported before activation: references bound earlier escape)"
        if previous.get("state") == "applied" and detail and detail not in previous.get("detail", ""):
            detail = f"{previous['detail']}; {detail}"  # a hook with several targets (server hooks)
        _states[name] = {"state": "applied", "detail": detail or "patched"}

    return apply


def _warn(message: str) -> None:
    """One line on stderr (logging's last-resort handler unless the app configured one)."""
    import logging

    logging.getLogger("meshpatch").warning("meshpatch: %s", message)


def hook_states() -> "Dict[str, Dict[str, str]]":
    """Per hook: ``state`` (pending/applied/disabled/failed/off) and a ``detail`` saying why."""
    return {name: dict(state) for name, state in _states.items()}


def status() -> "Dict[str, object]":
    """What the status CLI shows: gate, whether and how activation ran, hook states."""
    return {
        "enabled": _gate_open(),
        "activated": _activated,
        "source": _source,
        "config_error": _config_error,
        "hooks": hook_states(),
    }


def settings():
    """The parsed :class:`meshpatch.config.Settings` (None before activation or after a config error)."""
    return _settings
