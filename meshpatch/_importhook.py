"""Post-import hooks that cost nothing but ``sys`` at interpreter start.

Why not ``wrapt.importer.when_imported``: importing wrapt takes 12-50 ms and the
whole enabled-but-idle start-up budget is 15 ms.  This finder only looks at the
handful of module names that have a pending hook; for those it asks the finders
behind it for the real spec and wraps the loader so the hook runs right after
the module body has executed (the same technique wrapt and ddtrace use).

A hook fires exactly once: when its module finishes importing, or immediately
if the module is already in ``sys.modules``.  A failing hook never breaks the
application's import; the error goes to :func:`meshpatch.safety.internal_error`.
"""

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:  # pragma: no cover
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any, Callable, Dict, List, Optional, Sequence

    Hook = Callable[[ModuleType], None]

_hooks: "Dict[str, List[Hook]]" = {}
_finder: "Optional[_HookFinder]" = None


def when_imported(name: str, hook: "Hook") -> None:
    """Run ``hook(module)`` once ``name`` has been imported (now, if it already is)."""
    module = sys.modules.get(name)
    if module is not None and _is_initialised(module):
        _run(name, hook, module)
        return
    _hooks.setdefault(name, []).append(hook)
    _install()


def pending() -> "List[str]":
    """Module names whose hooks have not fired yet (for status output and tests)."""
    return sorted(name for name, hooks in _hooks.items() if hooks)


def installed_finder() -> "Optional[_HookFinder]":
    return _finder


def _is_initialised(module: "ModuleType") -> bool:
    # A module that is still executing (circular import) has ``_initializing``
    # set on its spec; firing then would patch a half-built module.
    spec = getattr(module, "__spec__", None)
    return not getattr(spec, "_initializing", False)


def _install() -> None:
    global _finder
    if _finder is None:
        _finder = _HookFinder()
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def _fire(name: str, module: "ModuleType") -> None:
    hooks = _hooks.pop(name, None)
    if not hooks:
        return
    for hook in hooks:
        _run(name, hook, module)


def _run(name: str, hook: "Hook", module: "ModuleType") -> None:
    try:
        hook(module)
    except Exception as exc:  # never break the app's import
        try:
            from meshpatch import safety

            safety.internal_error(f"import hook for {name}", exc)
        except Exception:
            pass


class _HookFinder:
    """A meta-path finder that only ever claims modules with pending hooks."""

    def find_spec(
        self, fullname: str, path: "Optional[Sequence[str]]" = None, target: "Any" = None
    ) -> "Optional[ModuleSpec]":
        if fullname not in _hooks:
            return None
        try:
            meta_path = sys.meta_path
            start = meta_path.index(self) + 1 if self in meta_path else 0
            finders = meta_path[start:]
        except Exception:
            return None
        for finder in finders:
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        spec.loader = _HookLoader(loader)
        return spec


class _HookLoader:
    """Delegates to the real loader, then fires the hooks for the module."""

    __slots__ = ("loader",)

    def __init__(self, loader: "Any") -> None:
        self.loader = loader

    def create_module(self, spec: "ModuleSpec") -> "Optional[ModuleType]":
        create = getattr(self.loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: "ModuleType") -> None:
        # Put the real loader back first so importlib.resources, pkgutil and
        # friends see the loader they expect.
        loader = self.loader
        if getattr(module, "__loader__", None) is self:
            try:
                module.__loader__ = loader
            except AttributeError:
                pass
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = loader
        loader.exec_module(module)
        name = module.__name__
        _fire(name, sys.modules.get(name, module))

    def __getattr__(self, name: str) -> "Any":
        return getattr(self.loader, name)
