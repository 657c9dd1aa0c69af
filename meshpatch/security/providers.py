"""The bootstrap's ``certificate_providers``: where the workload certificate lives.

istio-agent writes the workload certificate chain, its key and the mesh root
CA to files and names them in the gRPC bootstrap as a ``file_watcher`` plugin
instance (usually ``default``, ``refresh_interval: 900s``).  A provider here
reads those files into an immutable :class:`Material` with a *generation*
number that grows whenever the content changes.  Everything that uses a
certificate (SSL contexts, grpc sub-channels, server credentials) is keyed by
that generation, so a rotation means: new connections use new material,
connections already open keep theirs, nothing is torn down under a request.

When to re-read: gRPC re-reads on ``refresh_interval`` only.  Istio rotates
certificates long before the 900 s interval would notice, so additionally the
files' (inode, size, mtime) are polled at most every :data:`STAT_INTERVAL`
seconds, lazily from whoever asks for the material (no thread; a process that
makes no calls does no I/O).  A read is accepted only if the three files did
not change while being read and the key matches the certificate — istio-agent
writes them one after the other, and a half-rotated pair is kept out.

The registry is process-wide like the bootstrap it comes from; the agent
configures it when it creates its xDS client.
"""

from __future__ import annotations

import hashlib
import logging
import os
import ssl
import tempfile
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, Tuple

from meshpatch.api import MeshError

log = logging.getLogger("meshpatch.security")

FILE_WATCHER = "file_watcher"
DEFAULT_REFRESH = 600.0  # gRPC's default refresh_interval (A29: 10 minutes)
#: Seconds between stat() checks of the files (module attribute: tests lower it).
STAT_INTERVAL = 1.0


class CertificateUnavailable(MeshError):
    """A provider has no usable material (files missing, unreadable or
    mismatched).  A MeshError: the hooks fail the call with the library's
    connection error rather than send it in plaintext."""


class Material:
    """One consistent read of a provider's files; never mutated."""

    __slots__ = ("chain_pem", "key_pem", "ca_pem", "generation", "digest", "provider")

    def __init__(self, chain_pem: Optional[bytes], key_pem: Optional[bytes], ca_pem: Optional[bytes], generation: int,
                 digest: str, provider: str) -> None:
        self.chain_pem = chain_pem
        self.key_pem = key_pem
        self.ca_pem = ca_pem
        self.generation = generation
        self.digest = digest
        self.provider = provider

    def __repr__(self) -> str:
        return f"Material({self.provider} gen {self.generation} {self.digest[:12]})"


def _parse_duration(value: Any, default: float) -> float:
    """A JSON protobuf Duration ("900s", "1.5s") or a number of seconds."""
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and value.strip().endswith("s"):
        seconds = float(value.strip()[:-1])
    else:
        raise ValueError(f"refresh_interval {value!r} is not a duration like \"900s\"")
    if seconds <= 0:
        raise ValueError(f"refresh_interval {value!r} must be positive")
    return seconds


def _stat(path: Optional[str]) -> Optional[Tuple[int, int, int, int]]:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1, -1)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: Optional[str]) -> Optional[bytes]:
    if path is None:
        return None
    with open(path, "rb") as handle:
        return handle.read(1 << 20)


class FileWatcherProvider:
    """gRPC's ``file_watcher`` plugin: certificate_file + private_key_file
    (both or neither) and/or ca_certificate_file."""

    def __init__(self, name: str, config: Dict[str, Any]) -> None:
        self.name = name
        self.cert_file: Optional[str] = config.get("certificate_file") or None
        self.key_file: Optional[str] = config.get("private_key_file") or None
        self.ca_file: Optional[str] = config.get("ca_certificate_file") or None
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("certificate_file and private_key_file must be set together")
        if not self.cert_file and not self.ca_file:
            raise ValueError("at least one of certificate_file or ca_certificate_file is required")
        self.refresh_interval = _parse_duration(config.get("refresh_interval"), DEFAULT_REFRESH)
        self._lock = threading.Lock()
        self._material: Optional[Material] = None
        self._stats: Optional[Tuple[Any, ...]] = None
        self._next_stat = 0.0
        self._next_reload = 0.0
        self.reloads = 0  # reads that produced a new generation
        self.rejected = 0  # reads refused (changed while reading, key mismatch, unreadable)
        self.last_error = ""

    @property
    def has_identity(self) -> bool:
        return self.cert_file is not None

    @property
    def has_ca(self) -> bool:
        return self.ca_file is not None

    def config(self) -> Dict[str, Any]:
        """The plugin config as the bootstrap had it (handed on to grpc-core)."""
        out: Dict[str, Any] = {"refresh_interval": f"{self.refresh_interval:g}s"}
        if self.cert_file:
            out["certificate_file"] = self.cert_file
            out["private_key_file"] = self.key_file
        if self.ca_file:
            out["ca_certificate_file"] = self.ca_file
        return out

    def paths(self) -> List[str]:
        return [p for p in (self.cert_file, self.key_file, self.ca_file) if p]

    # -- the request path ----------------------------------------------------

    def material(self) -> Material:
        """The current material; checks the files when a check is due.  Raises
        :class:`CertificateUnavailable` if there never was a good read."""
        now = time.monotonic()
        material = self._material
        if now >= self._next_stat or material is None:
            material = self._check(now)
        if material is None:
            raise CertificateUnavailable(f"certificate provider {self.name!r}: {self.last_error or 'no certificate yet'}")
        return material

    def _check(self, now: float) -> Optional[Material]:
        # Whoever gets the lock checks; everyone else keeps using what is there.
        if not self._lock.acquire(blocking=self._material is None):
            return self._material
        try:
            if now < self._next_stat and self._material is not None:
                return self._material
            self._next_stat = now + STAT_INTERVAL
            stats = tuple(_stat(p) for p in (self.cert_file, self.key_file, self.ca_file))
            if self._material is not None and stats == self._stats and now < self._next_reload:
                return self._material
            self._reload(stats, now)
            return self._material
        finally:
            self._lock.release()

    def _reload(self, before: Tuple[Any, ...], now: float) -> None:
        try:
            chain, key, ca = _read(self.cert_file), _read(self.key_file), _read(self.ca_file)
        except OSError as exc:
            self._reject(f"cannot read certificate files: {exc}")
            return
        after = tuple(_stat(p) for p in (self.cert_file, self.key_file, self.ca_file))
        if after != before:
            self._reject("certificate files changed while being read; retrying")
            self._next_stat = 0.0  # look again on the next use
            return
        digest = hashlib.sha256(b"\0".join(x or b"" for x in (chain, key, ca))).hexdigest()
        self._stats = after
        self._next_reload = now + self.refresh_interval
        current = self._material
        if current is not None and current.digest == digest:
            return
        try:
            _validate(chain, key, ca)
        except (ssl.SSLError, ValueError, OSError) as exc:
            self._reject(f"certificate material is not usable ({exc}); keeping the previous generation")
            self._stats = None  # re-validate on the next check
            return
        generation = current.generation + 1 if current is not None else 1
        self._material = Material(chain, key, ca, generation, digest, self.name)
        self.reloads += 1
        self.last_error = ""
        if current is not None:
            log.info("meshpatch: certificate provider %s rotated to generation %d", self.name, generation)

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        if reason != self.last_error:
            log.warning("meshpatch: certificate provider %s: %s", self.name, reason)
        self.last_error = reason

    def status(self) -> Dict[str, Any]:
        material = self._material
        return {
            "plugin": FILE_WATCHER,
            "files": self.paths(),
            "refresh_interval": self.refresh_interval,
            "generation": material.generation if material else 0,
            "reloads": self.reloads,
            "rejected": self.rejected,
            "last_error": self.last_error,
        }


def _validate(chain: Optional[bytes], key: Optional[bytes], ca: Optional[bytes]) -> None:
    """Refuse material OpenSSL would refuse later (key/cert mismatch, bad PEM)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if chain is not None:
        with pem_file(chain, key) as path:
            context.load_cert_chain(path)
    if ca is not None:
        context.load_verify_locations(cadata=ca.decode("ascii", "replace"))


class pem_file:
    """A private, short-lived file holding PEM data, for OpenSSL APIs that only
    take paths (``load_cert_chain``).  An anonymous memfd where available, so the
    key never touches a directory; else a 0600 temp file removed on exit."""

    def __init__(self, *parts: Optional[bytes]) -> None:
        self._data = b"\n".join(p for p in parts if p)
        self._fd = -1
        self._path = ""

    def __enter__(self) -> str:
        memfd = getattr(os, "memfd_create", None)
        if memfd is not None and os.path.isdir("/proc/self/fd"):
            try:
                self._fd = memfd("meshpatch-pem", getattr(os, "MFD_CLOEXEC", 0))
            except OSError:
                self._fd = -1
            if self._fd >= 0:
                os.write(self._fd, self._data)
                return f"/proc/self/fd/{self._fd}"
        fd, self._path = tempfile.mkstemp(prefix="meshpatch-", suffix=".pem")
        with os.fdopen(fd, "wb") as handle:
            handle.write(self._data)
        return self._path

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        if self._path:
            try:
                os.unlink(self._path)
            except OSError:
                pass


# -- the process registry ------------------------------------------------------

_providers: Dict[str, FileWatcherProvider] = {}
_problems: Dict[str, str] = {}


def configure(certificate_providers: Optional[Dict[str, Any]]) -> None:
    """Install the bootstrap's providers (replacing any earlier set).  An
    instance this version cannot use is left out, so xDS naming it is NACKed
    with the reason recorded here."""
    providers: Dict[str, FileWatcherProvider] = {}
    problems: Dict[str, str] = {}
    for name, entry in (certificate_providers or {}).items():
        if not isinstance(entry, dict):
            problems[name] = "not an object"
            continue
        plugin = entry.get("plugin_name")
        if plugin != FILE_WATCHER:
            problems[name] = f"plugin {plugin!r} is not supported (only {FILE_WATCHER})"
            continue
        try:
            providers[name] = FileWatcherProvider(name, dict(entry.get("config") or {}))
        except ValueError as exc:
            problems[name] = str(exc)
    for name, reason in problems.items():
        log.warning("meshpatch: certificate provider instance %s in the bootstrap is unusable: %s", name, reason)
    global _providers, _problems
    _providers, _problems = providers, problems


def get(name: str) -> Optional[FileWatcherProvider]:
    return _providers.get(name)


def why_unknown(name: str) -> str:
    """The NACK reason for an instance name the bootstrap does not provide."""
    if name in _problems:
        return f"certificate provider instance {name!r} is unusable: {_problems[name]}"
    known = ", ".join(sorted(_providers)) or "none"
    return f"unrecognized certificate provider instance name {name!r} (bootstrap certificate_providers: {known})"


def names() -> Iterable[str]:
    return list(_providers)


def bootstrap_section(poll_cap: Optional[float] = None) -> Dict[str, Any]:
    """``certificate_providers`` for a grpc-core bootstrap pointing at the same
    files.  ``poll_cap`` shortens grpc-core's refresh interval, its only way of
    noticing a rotation (it does not watch the files)."""
    out: Dict[str, Any] = {}
    for name, provider in _providers.items():
        config = provider.config()
        if poll_cap is not None and provider.refresh_interval > poll_cap:
            config["refresh_interval"] = f"{poll_cap:g}s"
        out[name] = {"plugin_name": FILE_WATCHER, "config": config}
    return out


def _after_fork_in_child() -> None:
    # A lock held by a thread that does not exist in the child would never be released.
    for provider in list(_providers.values()):
        provider._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def status() -> Dict[str, Any]:
    out: Dict[str, Any] = {name: p.status() for name, p in _providers.items()}
    for name, reason in _problems.items():
        out[name] = {"unusable": reason}
    return out
