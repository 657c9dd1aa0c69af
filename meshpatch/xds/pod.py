"""Which process of a pod holds the one upstream xDS stream: an flock on a file.

istio-agent serves one downstream stream at a time (a new one makes it close
the previous one with status OK), and istiod pays per stream, so the meshpatch
processes of a pod that present the same bootstrap (same server, credentials
and node) elect one of them to hold the upstream stream; the others get their
config from it over a Unix socket next to the lock (:mod:`meshpatch.xds.relay`).

The lock is an ``flock`` on ``<dir>/leader.lock``: the kernel drops it the
moment the holder dies (SIGKILL, OOM kill) and no stale state can outlive it.
``<dir>`` is per bootstrap: ``$MESHPATCH_RUNTIME_DIR`` (default
``/tmp/meshpatch-<uid>``) / a hash of the server and node.  Two points need
care:

* flock locks belong to the open file description, which a forked child
  shares: the child closes its copy without unlocking (closing one of several
  descriptors never releases the lock), so it never holds leadership it cannot
  serve.
* A holder that exits cleanly removes the socket and the lock file while still
  holding the lock; a waiter that locked the unlinked file notices (its inode
  no longer is the path's) and tries again, so two leaders can never coexist.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from typing import Any, Dict, Optional

log = logging.getLogger("meshpatch.xds")

# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107


def sharing_key(server_identity: Dict[str, Any], node: Dict[str, Any]) -> str:
    """Processes with equal keys would receive the same config from the same server."""
    blob = json.dumps({"server": server_identity, "node": node}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_base_dir() -> str:
    return os.path.join("/tmp", f"meshpatch-{os.getuid()}")


class PodUnavailable(Exception):
    """The runtime directory cannot be used safely; the process keeps its own stream."""


class _Race(Exception):
    """The directory changed under us (a leader left and cleaned up): try again."""


def _private_dir(path: str, strict: bool = True) -> None:
    """Create ``path`` (mode 0700) or check that an existing one is ours and private:
    any process that can write there could impersonate the leader.  The base
    directory may be shared (an emptyDir is 0777); the per-key one may not."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path) if strict else os.stat(path)
    except (FileExistsError, FileNotFoundError):
        raise _Race() from None  # a leaving leader removed it under us
    except OSError as exc:
        raise PodUnavailable(f"cannot create {path}: {exc.strerror}") from None
    if not strict:
        if not stat.S_ISDIR(st.st_mode):
            raise PodUnavailable(f"{path} is not a directory")
        return
    if not stat.S_ISDIR(st.st_mode):
        raise PodUnavailable(f"{path} is not a directory")
    if st.st_uid != os.getuid():
        raise PodUnavailable(f"{path} belongs to uid {st.st_uid}, not {os.getuid()}")
    if st.st_mode & 0o022:
        raise PodUnavailable(f"{path} is writable by others (mode {oct(st.st_mode & 0o777)})")


class PodLock:
    """Leadership for one sharing key, held by at most one process at a time."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.lock_path = os.path.join(directory, "leader.lock")
        self.socket_path = os.path.join(directory, "xds.sock")
        if len(self.socket_path) > MAX_SOCKET_PATH:
            raise PodUnavailable(f"socket path {self.socket_path} is longer than {MAX_SOCKET_PATH} bytes")
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take leadership if nobody holds it; never blocks."""
        if self._fd is not None:
            return True
        for _ in range(5):
            try:
                return self._try_acquire()
            except _Race:
                continue
        return False

    def _try_acquire(self) -> bool:
        import fcntl

        _private_dir(os.path.dirname(self.directory), strict=False)
        _private_dir(self.directory)
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # the directory was just removed by a leader leaving
            raise _Race() from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        try:
            mine = os.fstat(fd)
            current = os.stat(self.lock_path)
        except FileNotFoundError:
            os.close(fd)
            raise _Race() from None
        if (mine.st_dev, mine.st_ino) != (current.st_dev, current.st_ino):
            os.close(fd)  # we locked a file a leaving leader had already unlinked
            raise _Race()
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the pid is only for people looking
        self._fd = fd
        return True

    def release(self) -> None:
        """Clean exit: remove the socket and lock file while still holding the lock."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        for path in (self.socket_path, self.lock_path):
            try:
                os.unlink(path)
            except OSError:
                pass
        os.close(fd)  # releases the flock
        try:
            os.rmdir(self.directory)
        except OSError:
            pass  # another process is using it

    def abandon_after_fork(self) -> None:
        """In a forked child: drop our copy of the parent's lock without unlocking it."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def holder_pid(self) -> Optional[int]:
        try:
            with open(self.lock_path, "r", encoding="ascii") as fh:
                return int(fh.read().strip() or 0) or None
        except (OSError, ValueError):
            return None


def pod_lock_for(base_dir: Optional[str], server_identity: Dict[str, Any], node: Dict[str, Any]) -> PodLock:
    base = base_dir or default_base_dir()
    return PodLock(os.path.join(base, sharing_key(server_identity, node)))
