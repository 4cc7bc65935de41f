"""Safe paths and atomic writes, shared by every module that touches the data root.

:func:`safe_join` is the one way an untrusted string (a spec field, a pipeline name, a run id)
becomes a path: the result is always confined under its root. :func:`confined_files` is the one
way a spec's path or glob becomes files to read: every match, resolved, lies inside the data
root (or a root the settings allow). :func:`atomic_replace` and the ``atomic_write_*`` helpers
write to a temporary file in the target's directory, fsync it and rename it into place, so a
reader sees the old content or the new one, never a torn file, and a retried task simply
overwrites its own output.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
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


def atomic_replace(path: Path, write: Callable[[Path], None], *, mode: int = 0o644) -> Path:
    """Call ``write(temp_path)`` on a temporary name beside ``path``, fsync what it wrote and
    rename it over ``path`` with permissions ``mode``; create parent dirs.

    The temporary file is private (0600) from its first byte, so ``mode=0o600`` never exposes
    a secret; other modes are set just before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    temp = Path(temp_name)
    try:
        write(temp)
        _fsync_file(temp)
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); create parent dirs."""
    return atomic_replace(path, lambda temp: temp.write_bytes(data), mode=mode)


def atomic_write_text(path: Path, text: str, *, mode: int = 0o644) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created, with its folder, if missing) for
    the ``with`` block: one holder at a time across processes; released if the holder dies."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _fsync_file(path: Path) -> None:
    """Persist a written file's bytes before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


_GLOB_MAGIC = ("*", "?", "[")


def _literal_prefix(pattern: str) -> str:
    """The leading path parts of a glob pattern that hold no wildcard."""
    parts = PurePosixPath(pattern).parts
    literal = []
    for part in parts:
        if any(char in part for char in _GLOB_MAGIC):
            break
        literal.append(part)
    return str(PurePosixPath(*literal)) if literal else "."


def _within(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def confine_pattern(pattern: str, roots: Sequence[Path], *, field: str) -> str:
    """Check that a path or glob from a spec stays inside one of ``roots``; return it.

    A relative pattern lives under ``roots[0]`` (the data root); an absolute one must lie under
    one of the roots. The wildcard-free leading part is resolved (symlinks followed), so a link
    out of the root is refused before anything is listed. Errors are ValueErrors that start
    with ``field`` and name the pattern, never anything read from a file.
    """
    if not roots:
        raise ValueError(f"{field}: no data root is configured")
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"{field}: expected a non-empty path or glob")
    if "\x00" in pattern:
        raise ValueError(f"{field}: {pattern!r} contains a NUL byte")
    if ".." in PurePosixPath(pattern).parts:
        raise ValueError(f"{field}: {pattern!r} must not contain '..'")
    resolved_roots = [Path(root).resolve() for root in roots]
    prefix = _literal_prefix(pattern)
    anchor = Path(prefix) if Path(prefix).is_absolute() else resolved_roots[0] / prefix
    if not _within(anchor.resolve(), resolved_roots):
        raise ValueError(f"{field}: {pattern!r} is outside the data root "
                         f"{str(resolved_roots[0])!r} and the allowed data roots")
    return pattern


def confined_files(pattern: str, roots: Sequence[Path], *, field: str) -> list[Path]:
    """The files matching ``pattern`` (a path or glob, see :func:`confine_pattern`), sorted.

    Every match is resolved (symlinks followed) and must still lie inside one of ``roots``: a
    link that leads out is refused with a ValueError naming ``field`` and the match, so no file
    outside the roots is ever opened by a caller that reads only what this returns.
    """
    confine_pattern(pattern, roots, field=field)
    resolved_roots = [Path(root).resolve() for root in roots]
    if Path(pattern).is_absolute():
        matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
    else:
        # root_dir keeps glob characters in the root's own name from being interpreted.
        matches = [resolved_roots[0] / p
                   for p in glob.glob(pattern, root_dir=resolved_roots[0], recursive=True)]
    files = []
    for match in matches:
        target = match.resolve()
        if not _within(target, resolved_roots):
            raise ValueError(f"{field}: {str(match)!r} leads outside the data root "
                             f"{str(resolved_roots[0])!r} (through a symbolic link)")
        if target.is_file():
            files.append(target)
    return sorted(set(files))
