"""Where the Istio YAML comes from: one file, or the *.yaml/*.yml files of a directory.

Change detection is by (path, mtime_ns, size, inode) signature so an atomic
``os.replace`` of a file with identical size and timestamp still counts as a
change.  Hidden files are ignored: editors and atomic writers put their
temporary files there.
"""

from __future__ import annotations

import os
from typing import List, Tuple

from .istio_config import ConfigLoadError, IstioConfig, parse_files

YAML_SUFFIXES = (".yaml", ".yml")
Signature = Tuple[Tuple[str, int, int, int], ...]


class ConfigPathError(Exception):
    """The configured path does not exist or is neither a file nor a directory."""


def config_files(path: str) -> List[str]:
    if os.path.isdir(path):
        try:
            entries = sorted(os.listdir(path))
        except OSError as exc:
            raise ConfigPathError(f"cannot list config directory {path}: {exc}") from None
        return [
            os.path.join(path, e)
            for e in entries
            if not e.startswith(".") and e.endswith(YAML_SUFFIXES) and os.path.isfile(os.path.join(path, e))
        ]
    if os.path.isfile(path):
        return [path]
    if os.path.exists(path):
        raise ConfigPathError(f"config path {path} is neither a file nor a directory")
    raise ConfigPathError(f"config path {path} does not exist")


def signature(path: str) -> Signature:
    out = []
    for f in config_files(path):
        try:
            st = os.stat(f)
        except OSError:
            continue  # removed between listing and stat: the next poll sees the new state
        out.append((f, st.st_mtime_ns, st.st_size, st.st_ino))
    # A removed or added file changes the tuple itself.
    return tuple(out)


def load(path: str) -> IstioConfig:
    """Parse every file; raises ConfigLoadError when any file is unreadable or not YAML."""
    files = config_files(path)
    try:
        return parse_files(files)
    except ConfigLoadError:
        raise
    except OSError as exc:  # pragma: no cover - races with deletion
        raise ConfigLoadError(str(exc)) from None
