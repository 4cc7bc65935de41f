"""Safe paths and atomic writes, shared by every module that touches the data root.

:func:`safe_join` is the one way an untrusted string (a spec field, a pipeline name, a run id)
becomes a path: the result is always confined under its root. The ``atomic_write_*`` helpers
write to a temporary file in the target's directory, fsync it and rename it into place, so a
reader sees the old content or the new one, never a torn file, and a retried task simply
overwrites its own output.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any


def safe_join(root: Path, *parts: str) -> Path:
    """Join ``parts`` under ``root`` and return the resolved path, confined under ``root``.

    Rejects (with a ValueError naming the offending part) empty, absolute, ``..`` and
    NUL-containing parts, and any part whose resolved path leaves ``root`` (through a symlink,
    for instance). A part may contain ``/`` to name a sub-folder.
    """
    base = Path(root).resolve()
    current = base
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"path part {part!r} is not a string")
        if not part:
            raise ValueError("path part '' is empty")
        if "\x00" in part:
            raise ValueError(f"path part {part!r} contains a NUL byte")
        pure = PurePosixPath(part)
        if pure.is_absolute() or Path(part).is_absolute():
            raise ValueError(f"path part {part!r} is absolute")
        if ".." in pure.parts:
            raise ValueError(f"path part {part!r} contains '..'")
        current = (current / part).resolve()
        if not current.is_relative_to(base):
            raise ValueError(f"path part {part!r} escapes the root {str(base)!r}")
    return current


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); create parent dirs."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp makes 0600; other processes read these files
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
