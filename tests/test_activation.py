"""Process-start activation, checked in real interpreters started the way users start them.

Every test runs a fresh ``python`` (the venv's, with the installed package) as
an unmodified app, either plainly or under the installed ``meshpatch-run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Set

import pytest

from tests.support.servers import app_env, run_app, venv_bin

PYTHON = os.path.join(venv_bin(), "python")
MESHPATCH_RUN = os.path.join(venv_bin(), "meshpatch-run")

#: Modules the disabled gate must never load (prefix match on dotted names).
FORBIDDEN_WHEN_OFF = ("meshpatch", "wrapt", "requests", "httpx", "grpc", "logging", "urllib3")
#: Heavy or library modules that enabled-but-idle start-up must not load either.
FORBIDDEN_AT_START = ("wrapt", "requests", "httpx", "grpc", "logging", "urllib3", "typing", "dataclasses",
                      "importlib.util", "meshpatch.agent", "meshpatch.hooks")

STATUS = "import json, meshpatch.activation as a; print('RESULT ' + json.dumps(a.status()))"


def imported_at_start(env_extra: Dict[str, str]) -> List[str]:
    """Module names ``python -X importtime -c pass`` reports (start-up only)."""
    proc = subprocess.run([PYTHON, "-X", "importtime", "-c", "pass"], env=app_env(env_extra),
                          capture_output=True, text=True, timeout=30, cwd="/")
    assert proc.returncode == 0, proc.stderr
    names = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                names.append(name)
    assert "site" in names, proc.stderr  # the parse worked
    return names


def _matches(names: List[str], prefixes: tuple) -> Set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("gate", [None, "", "0", "false", "off"])
def test_gate_off_imports_nothing_beyond_os(gate: object) -> None:
    env = {} if gate is None else {"MESHPATCH_ENABLED": str(gate)}
    names = imported_at_start(env)
    assert _matches(names, FORBIDDEN_WHEN_OFF) == set()


def test_gate_on_imports_only_the_tiny_activation_modules() -> None:
    names = imported_at_start({"MESHPATCH_ENABLED": "1"})
    ours = _matches(names, ("meshpatch",))
    # The positive control for the test above: the same parse does see meshpatch when on.
    assert "meshpatch.activation" in ours
    assert ours <= {"meshpatch", "meshpatch.activation", "meshpatch.config", "meshpatch._importhook"}
    assert _matches(names, FORBIDDEN_AT_START) == set()


def test_lazy_patching_happens_at_the_apps_import() -> None:
    code = textwrap.dedent("""
        import json, sys
        import meshpatch.activation as a
        before = {m: m in sys.modules for m in ("requests", "httpx", "grpc", "wrapt")}
        states_before = a.hook_states()
        import requests, httpx, grpc, grpc.aio, wrapt
        wrapped = {
            # per-request methods: plain-function patches keeping the original as __wrapped__
            "requests": hasattr(requests.adapters.HTTPAdapter.__dict__["send"], "__wrapped__"),
            "httpx": hasattr(httpx.HTTPTransport.__dict__["handle_request"], "__wrapped__"),
            "httpx_async": hasattr(httpx.AsyncHTTPTransport.__dict__["handle_async_request"], "__wrapped__"),
            "grpc": isinstance(grpc.insecure_channel, wrapt.FunctionWrapper) and isinstance(grpc.secure_channel, wrapt.FunctionWrapper),
            "grpc_aio": isinstance(grpc.aio.insecure_channel, wrapt.FunctionWrapper) and isinstance(grpc.aio.secure_channel, wrapt.FunctionWrapper),
        }
        print("RESULT " + json.dumps({"before": before, "states_before": states_before,
                                       "wrapped": wrapped, "states": a.hook_states()}))
    """)
    run = run_app(code)
    assert run.returncode == 0, run
    result = run.result
    assert result["before"] == {"requests": False, "httpx": False, "grpc": False, "wrapt": False}
    assert {name: s["state"] for name, s in result["states_before"].items()} == {
        "requests": "pending", "httpx": "pending", "grpc": "pending",
        "wsgi": "pending", "asgi": "pending", "grpc_server": "pending"}
    assert all(result["wrapped"].values()), result["wrapped"]
    # the server hooks (inbound lane capture) wait for a web framework / server the app never imports
    assert {name: s["state"] for name, s in result["states"].items()} == {
        "requests": "applied", "httpx": "applied", "grpc": "applied",
        "wsgi": "pending", "asgi": "pending", "grpc_server": "applied"}
    assert "grpc.aio" in result["states"]["grpc"]["detail"]


def test_meshpatch_run_execs_the_command_in_place(tmp_path: Path) -> None:
    code = "import os, sys; print(os.getpid()); print(os.environ['MESHPATCH_ENABLED']); print(os.environ['PYTHONPATH']); sys.exit(7)"
    env = app_env({"PYTHONPATH": "/some/user/dir"})
    proc = subprocess.Popen([MESHPATCH_RUN, "--", "python", "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 7, err  # the program's own exit status
    pid, enabled, pythonpath = out.split()
    assert int(pid) == proc.pid  # exec'd, no wrapper process left in between
    assert enabled == "1"
    boot, user = pythonpath.split(os.pathsep)
    assert user == "/some/user/dir"
    assert os.path.isfile(os.path.join(boot, "sitecustomize.py"))
    assert os.path.basename(boot) == "_sitecustomize"


def test_meshpatch_run_usage_errors(tmp_path: Path) -> None:
    env = app_env()
    none = subprocess.run([MESHPATCH_RUN], env=env, capture_output=True, text=True, timeout=30)
    assert none.returncode == 2 and "usage: meshpatch-run" in none.stderr
    dashdash = subprocess.run([MESHPATCH_RUN, "--"], env=env, capture_output=True, text=True, timeout=30)
    assert dashdash.returncode == 2
    missing = subprocess.run([MESHPATCH_RUN, "no-such-command-xyz"], env=env, capture_output=True, text=True,
                             timeout=30)
    assert missing.returncode == 127
    assert missing.stderr.strip() == "meshpatch-run: command not found: no-such-command-xyz"
    not_exec = tmp_path / "script.sh"
    not_exec.write_text("#!/bin/sh\necho hi\n")
    by_path = subprocess.run([MESHPATCH_RUN, str(not_exec)], env=env, capture_output=True, text=True, timeout=30)
    assert by_path.returncode == 127
    not_exec.chmod(0o755)
    ok = subprocess.run([MESHPATCH_RUN, str(not_exec)], env=env, capture_output=True, text=True, timeout=30)
    assert ok.returncode == 0 and ok.stdout == "hi\n"


def test_activation_is_idempotent_when_pth_and_sitecustomize_both_fire() -> None:
    code = textwrap.dedent("""
        import json, sys, sitecustomize
        import meshpatch.activation as a, meshpatch._importhook as ih
        finders = [f for f in sys.meta_path if type(f).__name__ == "_HookFinder"]
        again = a.activate("test")
        import requests
        import meshpatch.hooks.requests_hook as rh
        send = requests.adapters.HTTPAdapter.__dict__["send"]
        print("RESULT " + json.dumps({
            "sitecustomize": (sys.modules.get("meshpatch._sitecustomize.sitecustomize") or sitecustomize).__file__,
            "source": a.status()["source"],
            "finders": len(finders), "again": again,
            "outer_wrapped": hasattr(send, "__wrapped__"),
            "inner_wrapped": hasattr(send.__wrapped__, "__wrapped__"),
            "repatch": rh.patch(requests),
        }))
    """)
    run = run_app(code)
    assert run.returncode == 0, run
    r = run.result
    assert r["sitecustomize"].endswith(os.path.join("_sitecustomize", "sitecustomize.py"))  # ours ran too
    assert r["source"] == "pth"  # ... but the .pth got there first and did the work
    assert r["finders"] == 1
    assert r["again"] is True
    assert r["outer_wrapped"] and not r["inner_wrapped"]
    assert r["repatch"] == "already patched"


def test_sitecustomize_alone_activates_and_respects_the_gate(tmp_path: Path) -> None:
    """An interpreter without meshpatch.pth (e.g. another Python install that can
    import meshpatch) is activated by the sitecustomize meshpatch-run prepends."""
    import meshpatch

    boot = os.path.join(os.path.dirname(meshpatch.__file__), "_sitecustomize")
    packages = os.path.dirname(os.path.dirname(os.path.abspath(meshpatch.__file__)))
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    if os.path.abspath(base_python) == os.path.abspath(sys.executable):
        pytest.skip("no base interpreter distinct from the venv")
    code = "import sys; m = sys.modules.get('meshpatch.activation'); print(m.status()['source'] if m else None)"
    results = {}
    for gate in ("1", "0"):
        env = app_env({"PYTHONPATH": os.pathsep.join([boot, packages]), "MESHPATCH_ENABLED": gate})
        proc = subprocess.run([base_python, "-c", code], env=env, capture_output=True, text=True, timeout=30,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        results[gate] = proc.stdout.strip()
    assert results == {"1": "sitecustomize", "0": "None"}


def test_pep829_start_entry_point_checks_the_gate_itself(tmp_path: Path) -> None:
    """``.start`` entries run unconditionally (3.15+); simulate that with ``-S``."""
    import meshpatch

    packages = os.path.dirname(os.path.dirname(os.path.abspath(meshpatch.__file__)))
    code = ("import meshpatch.activation as a; a.activate_from_start(); "
            "import sys; print(a.status()['source'], 'wrapt' in sys.modules, 'logging' in sys.modules)")
    site_packages = Path(packages)
    out = {}
    for gate in ("", "1"):
        env = app_env({"PYTHONPATH": packages, "MESHPATCH_ENABLED": gate})
        proc = subprocess.run([PYTHON, "-S", "-c", code], env=env, capture_output=True, text=True, timeout=30,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        out[gate] = proc.stdout.split()
    assert out[""] == ["None", "False", "False"]
    assert out["1"] == ["start", "False", "False"]
    if (site_packages / "meshpatch.start").exists():  # installed layout (non-editable or editable)
        assert (site_packages / "meshpatch.start").read_text().strip() == "meshpatch.activation:activate_from_start"


def test_user_sitecustomize_is_chained(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import builtins\nbuiltins.USER_SITECUSTOMIZE_RAN = True\n")
    code = textwrap.dedent("""
        import builtins, json, sys, sitecustomize
        import meshpatch.activation as a
        print("RESULT " + json.dumps({
            "ran": getattr(builtins, "USER_SITECUSTOMIZE_RAN", False),
            "module": sitecustomize.__file__,
            "boot_on_path": any(p.endswith("_sitecustomize") for p in sys.path),
            "activated": a.status()["activated"],
        }))
    """)
    run = run_app(code, {"PYTHONPATH": str(user)})
    assert run.returncode == 0, run
    assert run.result == {"ran": True, "module": str(user / "sitecustomize.py"), "boot_on_path": True,
                          "activated": True}


def test_broken_user_sitecustomize_is_reported_and_the_app_still_runs(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "sitecustomize.py").write_text("raise RuntimeError('user bug')\n")
    code = "import json, meshpatch.activation as a; print('RESULT ' + json.dumps(a.status()['activated']))"
    run = run_app(code, {"PYTHONPATH": str(user)})
    assert run.returncode == 0, run
    assert run.result is True
    assert "Error in sitecustomize" in run.stderr and "RuntimeError: user bug" in run.stderr


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"MESHPATCH_HOOKS": "requests"},
         {"requests": ("applied", ""), "httpx": ("disabled", "not listed in MESHPATCH_HOOKS"),
          "grpc": ("disabled", "not listed in MESHPATCH_HOOKS")}),
        ({"MESHPATCH_DISABLED_HOOKS": "grpc, httpx"},
         {"requests": ("applied", ""), "httpx": ("disabled", "disabled by MESHPATCH_DISABLED_HOOKS"),
          "grpc": ("disabled", "disabled by MESHPATCH_DISABLED_HOOKS")}),
        ({"MESHPATCH_HOOKS": "*", "MESHPATCH_DISABLED_HOOKS": "requests"},
         {"requests": ("disabled", "disabled by MESHPATCH_DISABLED_HOOKS"), "httpx": ("applied", ""),
          "grpc": ("applied", "")}),
    ],
)
def test_hook_selection(env: Dict[str, str], expected: Dict[str, tuple]) -> None:
    code = textwrap.dedent("""
        import json
        import requests, httpx, grpc, grpc.aio, wrapt
        import meshpatch.activation as a
        wrapped = {
            "requests": hasattr(requests.adapters.HTTPAdapter.__dict__["send"], "__wrapped__"),
            "httpx": hasattr(httpx.HTTPTransport.__dict__["handle_request"], "__wrapped__"),
            "grpc": isinstance(grpc.insecure_channel, wrapt.FunctionWrapper)
                    or isinstance(grpc.aio.insecure_channel, wrapt.FunctionWrapper),
        }
        print("RESULT " + json.dumps({"wrapped": wrapped, "states": a.hook_states()}))
    """)
    run = run_app(code, env)
    assert run.returncode == 0, run
    for name, (state, detail) in expected.items():
        assert run.result["states"][name]["state"] == state
        assert detail in run.result["states"][name]["detail"]
        assert run.result["wrapped"][name] is (state == "applied")


@pytest.mark.parametrize(
    "env, variable",
    [
        ({"MESHPATCH_HOOKS": "requests,urllib"}, "MESHPATCH_HOOKS"),
        ({"MESHPATCH_RESOLVE_TIMEOUT": "soon"}, "MESHPATCH_RESOLVE_TIMEOUT"),
        ({"MESHPATCH_XDS_SERVER": "nohostport"}, "MESHPATCH_XDS_SERVER"),
        ({"MESHPATCH_FAIL_MODE": "sometimes"}, "MESHPATCH_FAIL_MODE"),
        ({"MESHPATCH_HOLD_UNTIL_READY": "forever"}, "MESHPATCH_HOLD_UNTIL_READY"),
        ({"MESHPATCH_SHARE_STREAM": "perhaps"}, "MESHPATCH_SHARE_STREAM"),
        ({"MESHPATCH_RUNTIME_DIR": "run/meshpatch"}, "MESHPATCH_RUNTIME_DIR"),
    ],
)
def test_bad_setting_is_one_clear_line_and_the_app_runs_unpatched(env: Dict[str, str], variable: str) -> None:
    code = textwrap.dedent("""
        import json, requests
        import meshpatch.activation as a
        print("RESULT " + json.dumps({
            "wrapped": hasattr(requests.adapters.HTTPAdapter.__dict__["send"], "__wrapped__"),
            "status": a.status(),
        }))
    """)
    run = run_app(code, env)
    assert run.returncode == 0, run
    assert run.result["wrapped"] is False
    assert run.result["status"]["config_error"].startswith(variable)
    assert {s["state"] for s in run.result["status"]["hooks"].values()} == {"off"}
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, run.stderr
    assert variable in lines[0] and "Fix:" in lines[0] and "unpatched" in lines[0]


def test_child_python_processes_inherit_activation() -> None:
    code = textwrap.dedent("""
        import json, subprocess, sys
        child = "import json, sys, requests, meshpatch.activation as a; " \\
                "print(json.dumps([a.status()['activated'], " \\
                "hasattr(requests.adapters.HTTPAdapter.__dict__['send'], '__wrapped__')]))"
        direct = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=30)
        shell = subprocess.run("python -c \\"$CHILD\\"", shell=True, capture_output=True, text=True, timeout=30,
                               env={**__import__("os").environ, "CHILD": child})
        print("RESULT " + json.dumps({"direct": json.loads(direct.stdout), "shell": json.loads(shell.stdout)}))
    """)
    run = run_app(code)
    assert run.returncode == 0, run
    assert run.result == {"direct": [True, True], "shell": [True, True]}


def test_unpatched_app_stays_unpatched() -> None:
    """Control: the same probe without meshpatch-run sees no activation."""
    run = run_app("import sys, json; print('RESULT ' + json.dumps('meshpatch.activation' in sys.modules))",
                  patched=False)
    assert run.returncode == 0, run
    assert run.result is False


def test_foreign_interpreter_says_it_runs_unpatched(tmp_path: Path) -> None:
    """``meshpatch-run`` reaching a Python that cannot import meshpatch: one line, app unharmed."""
    import meshpatch

    boot = os.path.join(os.path.dirname(meshpatch.__file__), "_sitecustomize")
    base_python = getattr(sys, "_base_executable", None) or sys.executable
    if os.path.abspath(base_python) == os.path.abspath(sys.executable):
        pytest.skip("no base interpreter distinct from the venv")
    env = app_env({"PYTHONPATH": boot, "MESHPATCH_ENABLED": "1"})
    proc = subprocess.run([base_python, "-c", "print('app ran')"], env=env, capture_output=True, text=True,
                          timeout=30, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == "app ran\n"
    assert proc.stderr.count("\n") == 1 and "runs unpatched" in proc.stderr
