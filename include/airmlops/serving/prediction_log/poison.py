"""Telling the entries a backend refuses from a backend that is down.

A batch write is all or none, so one entry the backend refuses (a value too large or not
encodable for it: a poison entry) fails every batch it is in. :func:`isolate` writes such a
batch by halves, in order: a half that is stored is stored (the backends store each entry once,
so a repeat is harmless), and an entry refused alone twice while :meth:`LogBackend.ping` still
answers is poison. When ping fails the backend is down, not refusing: isolation stops, and the
caller keeps the batch and retries it later.
"""

from __future__ import annotations

import dataclasses
import logging

from airmlops.serving.prediction_log.backend import LogBackend
from airmlops.serving.prediction_log.records import Record, split_records

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Isolation:
    """What :func:`isolate` found: the entries ``stored``, in order, and the ``poison`` ones
    with the error each was refused with."""

    stored: list[Record] = dataclasses.field(default_factory=list)
    poison: list[tuple[Record, Exception]] = dataclasses.field(default_factory=list)


def answers(backend: LogBackend) -> bool:
    """``backend`` answers :meth:`LogBackend.ping`."""
    try:
        backend.ping()
    except Exception as error:
        log.debug("prediction log backend %s does not answer: %s", backend.location, error)
        return False
    return True


def isolate(backend: LogBackend, records: list[Record], failed: Exception) -> Isolation | None:
    """Write ``records`` (whose write just failed with ``failed``) by halves, in order; return
    the entries stored and the poison ones, or None when the backend stopped answering."""
    found = Isolation()
    return found if _bisect(backend, records, failed, found) else None


def _write(backend: LogBackend, records: list[Record]) -> Exception | None:
    """Write ``records``; the error, or None when they are stored."""
    try:
        backend.write(*split_records(records))
    except Exception as error:
        return error
    return None


def _bisect(backend: LogBackend, records: list[Record], failed: Exception | None,
            found: Isolation) -> bool:
    """Write ``records`` (unless ``failed`` says it just failed), else each half; an entry is
    poison when it is refused alone twice while the backend answers. False when the backend
    stopped answering."""
    if failed is None:
        failed = _write(backend, records)
        if failed is None:
            found.stored.extend(records)
            return True
    if len(records) > 1:
        middle = len(records) // 2
        return (_bisect(backend, records[:middle], None, found)
                and _bisect(backend, records[middle:], None, found))
    if not answers(backend):
        return False
    again = _write(backend, records)  # once more, alone: a refusal that happens twice is its own
    if again is None:
        found.stored.extend(records)
        return True
    if not answers(backend):
        return False
    found.poison.append((records[0], again))
    return True
