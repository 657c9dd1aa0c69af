"""``meshpatch-run [--] CMD ARGS...``: run an unmodified program with meshpatch on.

Like ``ddtrace-run`` and ``opentelemetry-instrument``, it only prepares the
environment and ``exec``s the command (no resident wrapper process, signals
and exit codes are the program's own):

* ``MESHPATCH_ENABLED=1`` opens the activation gate, and
* the shipped ``sitecustomize`` directory goes first on ``PYTHONPATH``, so any
  Python interpreter the command starts activates meshpatch and then chains to
  the user's own ``sitecustomize``.

Both are inherited by child processes, so Python programs the app spawns are
patched too.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import List, NoReturn, Optional

USAGE = "usage: meshpatch-run [--] COMMAND [ARGS...]\n       meshpatch-run --info\n"
HELP = (
    USAGE
    + "\nRun COMMAND with meshpatch enabled: requests/httpx/grpc calls to mesh hostnames are\n"
    "routed per request by the xDS control plane (MESHPATCH_XDS_SERVER=host:port or\n"
    "GRPC_XDS_BOOTSTRAP). Sets MESHPATCH_ENABLED=1 and puts meshpatch's sitecustomize first on\n"
    "PYTHONPATH, then replaces itself with COMMAND (found on PATH).\n"
    "\n--info prints what meshpatch would do in this environment (same as `meshpatch doctor`)\n"
    "without running anything; exit status 1 when there is a problem.\n"
)


def sitecustomize_dir() -> str:
    """The installed ``meshpatch/_sitecustomize`` directory."""
    import meshpatch

    return os.path.join(os.path.dirname(os.path.abspath(meshpatch.__file__)), "_sitecustomize")


def prepared_environment(environ: "os._Environ[str] | dict[str, str]") -> "dict[str, str]":
    """The environment COMMAND runs with (also used by tests and the status CLI)."""
    env = dict(environ)
    env["MESHPATCH_ENABLED"] = "1"
    boot = sitecustomize_dir()
    entries = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    entries = [entry for entry in entries if os.path.abspath(entry) != boot]
    env["PYTHONPATH"] = os.pathsep.join([boot, *entries])
    return env


def resolve(command: str) -> Optional[str]:
    """Like a shell: a name with a slash is a path, anything else is looked up on PATH."""
    if os.sep in command or (os.altsep and os.altsep in command):
        return command if os.path.isfile(command) and os.access(command, os.X_OK) else None
    return shutil.which(command)


def main(argv: Optional[List[str]] = None) -> NoReturn:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        sys.stdout.write(HELP)
        sys.exit(0)
    if args and args[0] == "--info":
        from meshpatch.cli.doctor import print_report

        sys.exit(print_report(prepared_environment(os.environ), as_json="--json" in args[1:]))
    if args and args[0] == "--":
        args = args[1:]
    elif args and args[0].startswith("-"):
        sys.stderr.write(f"meshpatch-run: unknown option {args[0]!r} (put -- before a command that starts with -)\n")
        sys.stderr.write(USAGE)
        sys.exit(2)
    if not args:
        sys.stderr.write("meshpatch-run: no command given\n")
        sys.stderr.write(USAGE)
        sys.exit(2)
    command = args[0]
    path = resolve(command)
    if path is None:
        sys.stderr.write(f"meshpatch-run: command not found: {command}\n")
        sys.exit(127)
    env = prepared_environment(os.environ)
    try:
        os.execve(path, args, env)
    except OSError as exc:
        sys.stderr.write(f"meshpatch-run: cannot execute {command}: {exc.strerror or exc}\n")
        sys.exit(126)


if __name__ == "__main__":  # pragma: no cover
    main()
