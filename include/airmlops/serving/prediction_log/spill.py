"""Spill files: where a :class:`~airmlops.serving.prediction_log.PredictionLog` keeps entries
on disk while its backend is down, in order, until they are replayed.

- **Format.** Each writer appends to its own file, ``<pid>-<random>.jsonl`` in the pipeline's
  spill directory (``<data_root>/prediction-log/spill/<pipeline>/``, mode 0700): a header line
  naming the backend, then one JSON entry per line, tagged ``prediction`` or ``label``; floats
  round-trip exactly. A file is created under a temporary name, locked, headed and fsync'ed,
  then renamed, so no other log ever sees it unlocked.
- **Fsync policy.** The file is fsync'ed after each spilled batch, before the entries count as
  spilled; a failed append is truncated away, so no torn entry stays behind.
- **Exactly once.** A file is deleted only after its last chunk is committed to the backend, so
  a crash in between replays a chunk again; the backends store each entry once.
- **Orphans.** Each spill file is held with an exclusive ``flock`` by its writer. A log adopts
  the files of the same directory whose lock it can take (their writer died: a killed worker,
  a closed log) and whose header names its own backend, replays them and deletes them.
- **Disk bound.** The spill directory of a pipeline holds at most ``spill_max_bytes`` (all
  workers' files together, its quarantine folder included); what does not fit is not written
  (the writer counts it dropped).
- **Quarantine.** Entries the backend refuses while it answers (poison entries: see
  :mod:`~airmlops.serving.prediction_log.writer`) are appended to
  ``<spill dir>/quarantine/<spill file name>`` (mode 0600, fsync'ed): the spill file's header,
  then each entry's line with one more field, ``quarantined``, holding the error's type and
  message. :func:`decode_entry` ignores that field, so a quarantine file is a spill file: moved
  back into the spill directory under a new spill file name, it is adopted and replayed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from airmlops.paths import _fsync_directory, safe_join
from airmlops.serving.prediction_log.records import (
    LabelRecord,
    PredictionRecord,
    Record,
    check_pipeline,
    clean_row,
)

log = logging.getLogger(__name__)

SPILL_FILE_PATTERN = re.compile(r"^[0-9]{1,10}-[0-9a-f]{16}\.jsonl$")
"""A spill file's name: ``<pid>-<random>.jsonl``."""
SPILL_TEMP_PATTERN = re.compile(r"^\.[0-9]{1,10}-[0-9a-f]{16}\.jsonl\.tmp$")
"""A spill file being created (renamed to its name once locked and headed)."""
QUARANTINE_DIR = "quarantine"
"""The folder of the spill directory that holds the entries the backend refused."""
QUARANTINE_ERROR_CHARS = 1000
"""At most this much of a refusal's message is kept beside each quarantined entry."""
_READ_BLOCK = 1 << 20
_ABANDONED_TEMP_S = 60.0


def spill_dir_path(data_root: Path, pipeline: str) -> Path:
    """``<data_root>/prediction-log/spill/<pipeline>``: where the log of ``pipeline`` spills."""
    return safe_join(Path(data_root), "prediction-log", "spill", check_pipeline(pipeline))


def encode_entry(record: Record) -> bytes:
    """One spill line: the record as JSON tagged with its kind. Python writes a float as its
    shortest repr, which reads back as the same float (NaN and infinities as NaN/Infinity)."""
    if isinstance(record, PredictionRecord):
        entry: dict[str, Any] = {
            "kind": "prediction", "request_id": record.request_id,
            "position": int(record.position), "ts_us": int(record.ts_us),
            "model_version": record.model_version, "entity_id": record.entity_id,
            "inputs": clean_row(record.inputs), "features": clean_row(record.features),
            "prediction": float(record.prediction),
            "probability": None if record.probability is None else float(record.probability),
        }
    else:
        entry = {"kind": "label", "request_id": record.request_id, "entity_id": record.entity_id,
                 "label": float(record.label), "ts_us": int(record.ts_us)}
    return (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode("utf-8")


def quarantine_entry(record: Record, error: BaseException) -> bytes:
    """One quarantine line: the record's spill line with a ``quarantined`` field, the type
    and message of the error the backend refused it with."""
    entry = json.loads(encode_entry(record))
    entry["quarantined"] = {"error_type": type(error).__name__,
                            "error": str(error)[:QUARANTINE_ERROR_CHARS]}
    return (json.dumps(entry, separators=(",", ":")) + "\n").encode("utf-8")


def decode_entry(line: bytes) -> Record:
    """The record of one spill line (:func:`encode_entry`) or quarantine line
    (:func:`quarantine_entry`: why it was refused is left out)."""
    entry = json.loads(line)
    entry.pop("quarantined", None)
    kind = entry.pop("kind")
    if kind == "prediction":
        return PredictionRecord(**entry)
    if kind == "label":
        return LabelRecord(**entry)
    raise ValueError(f"unknown spill entry kind {kind!r}")


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@dataclasses.dataclass(eq=False)
class SpillFile:
    """A spill file whose lock this log holds: its own (appended to), or an adopted orphan."""

    path: Path
    fd: int
    offset: int
    """Where the next entry to replay starts."""
    size: int
    entries: int
    """Entries not replayed yet."""
    own: bool

    @property
    def replayed(self) -> bool:
        """Every entry up to the end of the file has been replayed."""
        return self.offset >= self.size

    def close(self, *, delete: bool) -> None:
        """Release the lock; delete the file first when it is all replayed."""
        try:
            if delete:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)


@dataclasses.dataclass(frozen=True)
class Chunk:
    """Entries read from a spill file: ``offset`` is where the next chunk starts, ``lines``
    how many lines were read and ``bad`` how many of them were not entries."""

    records: list[Record]
    offset: int
    lines: int
    bad: int


def fitting(lines: list[bytes], room: int) -> int:
    """How many of ``lines``, in order, fit in ``room`` bytes."""
    size = count = 0
    for line in lines:
        if size + len(line) > room:
            break
        size += len(line)
        count += 1
    return count


def read_chunk(spill: SpillFile, max_lines: int) -> Chunk:
    """Up to ``max_lines`` entries from ``spill.offset``. A torn last line (its writer died
    mid-write, before its fsync) counts as one bad line and ends the file."""
    records: list[Record] = []
    position, pending, lines, bad = spill.offset, b"", 0, 0
    while lines < max_lines:
        block = os.pread(spill.fd, _READ_BLOCK, position + len(pending))
        if not block:
            if pending:
                bad += 1
                position += len(pending)
            break
        pending += block
        start = 0
        while lines < max_lines:
            end = pending.find(b"\n", start)
            if end < 0:
                break
            lines += 1
            try:
                records.append(decode_entry(pending[start:end]))
            except (ValueError, TypeError, KeyError, AttributeError):
                bad += 1
            start = end + 1
        position += start
        pending = pending[start:]
    return Chunk(records, position, lines, bad)


class SpillFiles:
    """The spill files one log holds in its spill directory: its own file (created on the
    first spill) and the orphans it adopted, replayed oldest first (adopted ones first)."""

    def __init__(self, directory: Path, location: str) -> None:
        self.directory = Path(directory)
        self.location = location
        self.header = (json.dumps({"spill": 1, "backend": location}) + "\n").encode()
        self.own: SpillFile | None = None
        self.adopted: list[SpillFile] = []
        self._foreign: set[str] = set()

    def prepare(self) -> None:
        """Create the directory, private to this user; raises OSError when it is unusable."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    @property
    def pending(self) -> bool:
        """Entries are on disk: they go to the backend before anything in memory."""
        return bool(self.adopted) or (self.own is not None and not self.own.replayed)

    def oldest(self) -> SpillFile | None:
        """The file to replay from next."""
        return self.adopted[0] if self.adopted else self.own

    def used_bytes(self) -> int:
        """Bytes in the spill directory (every worker's files, and the quarantine's)."""
        quarantine = self.directory / QUARANTINE_DIR
        return _files_bytes(self.directory) + \
            (_files_bytes(quarantine) if quarantine.is_dir() else 0)

    def quarantine(self, name: str, lines: list[bytes], max_bytes: int) -> tuple[Path, int]:
        """Append what fits under ``max_bytes`` (the whole spill directory) of ``lines`` to
        the quarantine file ``name`` (created 0600 with this log's header) and fsync it;
        return its path and how many lines it took. On failure the file is cut back and
        OSError is raised."""
        directory = self.directory / QUARANTINE_DIR
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / name
        size = path.stat().st_size if path.exists() else 0
        head = b"" if size else self.header
        fit = fitting(lines, max_bytes - self.used_bytes() - len(head))
        if not fit:
            return path, 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            _write_all(fd, head + b"".join(lines[:fit]))
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
        finally:
            os.close(fd)
        if not size:
            _fsync_directory(directory)
        return path, fit

    def append(self, lines: list[bytes]) -> None:
        """Append ``lines`` to this log's own file (created on first use) and fsync it; on
        failure the file is cut back so no torn entry stays behind, and OSError is raised."""
        if self.own is None:
            self.own = self._create_file()
        own = self.own
        data = b"".join(lines)
        try:
            _write_all(own.fd, data)
            os.fsync(own.fd)
        except OSError:
            try:
                os.ftruncate(own.fd, own.size)
            except OSError:
                log.debug("truncating %s failed", own.path, exc_info=True)
            raise
        own.size += len(data)
        own.entries += len(lines)

    def _create_file(self) -> SpillFile:
        """This log's spill file: created under a temporary name, locked, headed with the
        backend's location and fsync'ed, then renamed to ``<pid>-<random>.jsonl`` (so no other
        log ever sees it unlocked)."""
        name = f"{os.getpid()}-{secrets.token_hex(8)}.jsonl"
        path, temp = self.directory / name, self.directory / f".{name}.tmp"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _write_all(fd, self.header)
            os.fsync(fd)
            os.rename(temp, path)
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        _fsync_directory(self.directory)
        size = len(self.header)
        return SpillFile(path, fd, offset=size, size=size, entries=0, own=True)

    def release(self, spill: SpillFile, *, delete: bool) -> None:
        """Stop holding ``spill``: delete it (when ``delete``) and release its lock."""
        if spill.own:
            self.own = None
        else:
            self.adopted.remove(spill)
        spill.entries = 0
        spill.close(delete=delete)

    def release_all(self) -> int:
        """Release every file (deleting the replayed ones); return the entries left on disk
        for the next log on the directory."""
        files = [*self.adopted, *([self.own] if self.own is not None else [])]
        self.adopted, self.own = [], None
        left = 0
        for spill in files:
            left += spill.entries
            try:
                spill.close(delete=spill.replayed)
            except OSError as error:
                log.warning("closing spill file %s failed: %s", spill.path, error)
        return left

    def adopt_orphans(self) -> list[SpillFile]:
        """Take over the spill files in the directory whose lock is free (their writer is
        gone) and whose header names this log's backend; return the ones taken."""
        held = {f.path.name for f in self.adopted}
        if self.own is not None:
            held.add(self.own.path.name)
        adopted: list[SpillFile] = []
        try:
            with os.scandir(self.directory) as entries:
                names = sorted(entry.name for entry in entries)
            for name in names:
                path = self.directory / name
                if SPILL_TEMP_PATTERN.fullmatch(name):
                    _remove_abandoned(path)
                elif (SPILL_FILE_PATTERN.fullmatch(name) and name not in held
                      and name not in self._foreign):
                    spill = self._try_adopt(path)
                    if spill is not None:
                        adopted.append(spill)
        except OSError as error:
            log.warning("looking for orphaned spill files in %s failed: %s", self.directory,
                        error)
        self.adopted.extend(adopted)
        return adopted

    def _try_adopt(self, path: Path) -> SpillFile | None:
        """``path`` locked and counted, or None: its writer is alive, it is gone, or it is
        not for this backend (then it is never tried again)."""
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its writer is alive
            os.close(fd)
            return None
        try:
            spill = self._locked_orphan(path, fd)
        except (OSError, ValueError, AttributeError) as error:
            self._foreign.add(path.name)
            log.warning("spill file %s cannot be adopted: %s", path, error)
            spill = None
        if spill is None:
            os.close(fd)
        return spill

    def _locked_orphan(self, path: Path, fd: int) -> SpillFile | None:
        """The orphan ``path`` whose lock ``fd`` holds, if it is still that file and its
        header names this log's backend."""
        status = os.fstat(fd)
        try:
            named = os.stat(path)
        except FileNotFoundError:
            named = None
        if named is None or (named.st_dev, named.st_ino) != (status.st_dev, status.st_ino):
            return None  # replayed and deleted by its writer after we opened it
        head = os.pread(fd, 64 * 1024, 0)
        end = head.find(b"\n")
        header = json.loads(head[:end]) if end > 0 else {}
        if header.get("backend") != self.location:
            self._foreign.add(path.name)
            log.info("spill file %s is not for %s (%s); left for its own backend",
                     path.name, self.location, header.get("backend"))
            return None
        entries, position = 0, end + 1
        while block := os.pread(fd, _READ_BLOCK, position):
            entries += block.count(b"\n")
            position += len(block)
        return SpillFile(path, fd, offset=end + 1, size=status.st_size, entries=entries,
                         own=False)


def _files_bytes(directory: Path) -> int:
    """Bytes in the plain files of ``directory``."""
    total = 0
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:  # replayed and deleted meanwhile
                continue
    return total


def _remove_abandoned(path: Path) -> None:
    """Delete a spill file its creator never finished (it died between creating and renaming
    it); recent ones may still be in the making."""
    try:
        if time.time() - path.stat().st_mtime < _ABANDONED_TEMP_S:
            return
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
