"""meshpatch's process-start hook, placed first on PYTHONPATH by ``meshpatch-run``.

Only one ``sitecustomize`` can win the import, so after activating meshpatch
this module steps aside and imports the user's own ``sitecustomize`` (if any),
the way ddtrace does: drop our directory from ``sys.path``, pop ourselves from
``sys.modules``, import again, put ourselves back if there was none, and
re-insert the directory so child processes and introspection still see it.

Everything is inside ``try``/``except``: a broken agent must never stop the
interpreter from starting.
"""

try:
    import os
    import sys

    try:
        from meshpatch.activation import activate_from_sitecustomize
    except ImportError:
        # A different Python than the one meshpatch is installed in (e.g. the
        # first `python` on PATH is not the venv's): say so once, run unpatched.
        if os.environ.get("MESHPATCH_ENABLED", "").strip().lower() not in ("", "0", "false", "no", "off"):
            sys.stderr.write(
                f"meshpatch: not installed for {sys.executable}; this process runs unpatched "
                "(run the app with the Python environment meshpatch is installed in)\n"
            )
    else:
        try:
            activate_from_sitecustomize()
        except Exception:
            pass  # activation never raises; belt and braces for a broken install

    def _chain_user_sitecustomize() -> None:
        here = os.path.dirname(os.path.abspath(__file__))
        real_here = os.path.realpath(here)
        removed = []
        for index in range(len(sys.path) - 1, -1, -1):
            entry = sys.path[index]
            try:
                absolute = os.path.abspath(entry or os.curdir)
            except Exception:
                continue
            if absolute == here or os.path.realpath(absolute) == real_here:
                removed.append((index, entry))
                del sys.path[index]
        ours = sys.modules.pop("sitecustomize", None)
        try:
            import sitecustomize  # (the user's one, if any)

            if getattr(sitecustomize, "__file__", None) is None and ours is not None:
                # Only a namespace package (a stray "sitecustomize/" directory on
                # sys.path, e.g. a source checkout): no user code to run.
                sys.modules["sitecustomize"] = ours
            elif ours is not None:
                # Another sitecustomize (the user's, or the distribution's such as
                # Debian's /usr/lib/python3.X/sitecustomize.py) now owns the name;
                # keep ours findable under its package path, as ddtrace does.
                sys.modules["meshpatch._sitecustomize.sitecustomize"] = ours
        except ImportError as exc:
            if ours is not None:
                sys.modules["sitecustomize"] = ours
            if exc.name != "sitecustomize":
                # The user's sitecustomize exists but failed: report it the way
                # site.execsitecustomize would have.
                sys.stderr.write(
                    "Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
                    f"{type(exc).__name__}: {exc}\n"
                )
        except Exception as exc:
            if ours is not None:
                sys.modules["sitecustomize"] = ours
            sys.stderr.write(
                "Error in sitecustomize; set PYTHONVERBOSE for traceback:\n"
                f"{type(exc).__name__}: {exc}\n"
            )
        finally:
            for index, entry in reversed(removed):
                sys.path.insert(index, entry)

    _chain_user_sitecustomize()
    del _chain_user_sitecustomize
except Exception:
    pass
