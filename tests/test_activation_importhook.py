"""The start-up post-import hook finder, on throw-away modules in a temp dir."""

from __future__ import annotations

import importlib
import importlib.resources
import sys
from pathlib import Path
from typing import Iterator, List

import pytest

from meshpatch import _importhook, safety


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Path]:
    """A temp dir on sys.path; afterwards its modules, pending hooks and our finder are gone."""
    sys.path.insert(0, str(tmp_path))
    before = set(sys.modules)
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in set(sys.modules) - before:
            if name.startswith("mp_probe"):
                del sys.modules[name]
        for name in list(_importhook._hooks):
            if name.startswith("mp_probe"):
                del _importhook._hooks[name]
        finder = _importhook.installed_finder()
        if finder is not None and not _importhook.pending() and finder in sys.meta_path:
            sys.meta_path.remove(finder)
        importlib.invalidate_caches()


def write(directory: Path, name: str, body: str) -> None:
    (directory / f"{name}.py").write_text(body)
    importlib.invalidate_caches()


def test_hook_fires_once_after_the_module_body_ran(modules: Path) -> None:
    write(modules, "mp_probe_a", "VALUE = 42\n")
    seen: List[int] = []
    _importhook.when_imported("mp_probe_a", lambda m: seen.append(m.VALUE))
    assert seen == [] and "mp_probe_a" in _importhook.pending()
    import mp_probe_a  # noqa: F401

    assert seen == [42]
    importlib.reload(mp_probe_a)
    del sys.modules["mp_probe_a"]
    import mp_probe_a  # noqa: F401,F811

    assert seen == [42]  # once, not per import
    assert "mp_probe_a" not in _importhook.pending()


def test_hook_fires_immediately_for_an_imported_module(modules: Path) -> None:
    write(modules, "mp_probe_b", "X = 1\n")
    import mp_probe_b

    seen: List[object] = []
    _importhook.when_imported("mp_probe_b", seen.append)
    assert seen == [mp_probe_b]


def test_the_module_keeps_its_real_loader(modules: Path) -> None:
    package = modules / "mp_probe_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "data.txt").write_text("payload")
    importlib.invalidate_caches()
    fired: List[str] = []
    _importhook.when_imported("mp_probe_pkg", lambda m: fired.append(type(m.__loader__).__name__))
    import mp_probe_pkg

    assert fired == ["SourceFileLoader"]  # the loader was already restored when the hook ran
    assert type(mp_probe_pkg.__spec__.loader).__name__ == "SourceFileLoader"
    assert importlib.resources.files("mp_probe_pkg").joinpath("data.txt").read_text() == "payload"


def test_a_failing_hook_never_breaks_the_import(modules: Path) -> None:
    write(modules, "mp_probe_c", "OK = True\n")
    before = safety.error_counts().get("import hook for mp_probe_c", 0)
    later: List[bool] = []

    def broken(module: object) -> None:
        raise RuntimeError("hook bug")

    _importhook.when_imported("mp_probe_c", broken)
    _importhook.when_imported("mp_probe_c", lambda m: later.append(m.OK))
    import mp_probe_c

    assert mp_probe_c.OK is True
    assert later == [True]  # the other hook still ran
    assert safety.error_counts()["import hook for mp_probe_c"] == before + 1


def test_a_failed_import_keeps_the_hook_for_the_next_attempt(modules: Path) -> None:
    write(modules, "mp_probe_d", "raise ImportError('not yet')\n")
    seen: List[str] = []
    _importhook.when_imported("mp_probe_d", lambda m: seen.append(m.STATE))
    with pytest.raises(ImportError, match="not yet"):
        import mp_probe_d  # noqa: F401
    assert seen == [] and "mp_probe_d" in _importhook.pending()
    write(modules, "mp_probe_d", "STATE = 'fixed'\n")
    sys.modules.pop("mp_probe_d", None)
    import mp_probe_d  # noqa: F401,F811

    assert seen == ["fixed"]


def test_submodules_and_unwatched_modules(modules: Path) -> None:
    package = modules / "mp_probe_e"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "sub.py").write_text("NAME = 'sub'\n")
    importlib.invalidate_caches()
    seen: List[str] = []
    _importhook.when_imported("mp_probe_e.sub", lambda m: seen.append(m.NAME))
    import mp_probe_e

    assert seen == []  # the parent alone does not fire the submodule's hook
    assert not isinstance(mp_probe_e.__spec__.loader, _importhook._HookLoader)
    import mp_probe_e.sub  # noqa: F401

    assert seen == ["sub"]


def test_missing_module_is_a_normal_import_error(modules: Path) -> None:
    _importhook.when_imported("mp_probe_missing", lambda m: None)
    with pytest.raises(ModuleNotFoundError):
        import mp_probe_missing  # noqa: F401
