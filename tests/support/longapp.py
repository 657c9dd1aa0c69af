"""An unmodified app that keeps running: ``meshpatch-run python -c CODE`` as a
child process the test talks to line by line (stdin commands, stdout answers).

    with LongApp(code, env) as app:
        app.wait_for("READY")          # the app printed a line starting with READY
        app.send("status")             # one line to its stdin
        info = app.json("STATUS")      # the next "STATUS <json>" line, parsed

Unlike :func:`tests.support.servers.run_app` the app does not have to finish;
it is terminated (then killed) on exit, and its output is kept for failure
messages.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import tempfile
import threading
from typing import Any, Dict, List, Optional

from tests.support.servers import app_env, venv_bin


class LongApp:
    def __init__(self, code: str, env: Optional[Dict[str, str]] = None, patched: bool = True) -> None:
        python = os.path.join(venv_bin(), "python")
        command = [python, "-u", "-c", code]
        if patched:
            command = [os.path.join(venv_bin(), "meshpatch-run"), *command]
        self._scratch = tempfile.TemporaryDirectory(prefix="meshpatch-longapp-")
        self.proc = subprocess.Popen(command, env=app_env(env), cwd=self._scratch.name, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self.lines: "queue.Queue[Optional[str]]" = queue.Queue()
        self.stdout: List[str] = []
        self.stderr: List[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr, False), daemon=True).start()

    def _pump(self, stream: Any, keep: List[str], forward: bool) -> None:
        for line in stream:
            keep.append(line)
            if forward:
                self.lines.put(line.rstrip("\n"))
        if forward:
            self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 60.0) -> str:
        import time

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no line starting with {prefix!r} within {timeout}s\n{self.output()}")
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                raise EOFError(f"the app exited ({self.proc.poll()}) before printing {prefix!r}\n{self.output()}")
            if line.startswith(prefix):
                return line[len(prefix):].strip()

    def json(self, prefix: str, timeout: float = 60.0) -> Any:
        return json.loads(self.wait_for(prefix + " ", timeout))

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def output(self) -> str:
        return f"--- stdout ---\n{''.join(self.stdout)[-3000:]}\n--- stderr ---\n{''.join(self.stderr)[-6000:]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if stream is not None:
                    stream.close()
            except OSError:
                pass
        self._scratch.cleanup()

    def __enter__(self) -> "LongApp":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
