"""The non-blocking writer the model service logs through (:class:`PredictionLog`).

:meth:`~PredictionLog.log` only appends to a bounded in-memory buffer and returns; a background
thread writes the buffer in batches (``executemany`` / one script call). What it does when the
backend is down:

- **Spill.** With a spill directory a batch whose write failed is appended, in order, to the
  writer's own spill file (:mod:`~airmlops.serving.prediction_log.spill`) and leaves memory.
  While the backend is down, and while a spill is being replayed, newer entries follow it to
  the file in batches (after the same linger), so memory holds only what arrived in the last
  linger interval. Batches of at most ``batch_size`` entries are spilled only while the backend
  is down or a spill is replayed. At :meth:`~PredictionLog.close`, entries not yet written are
  spilled, not dropped.
- **Replay.** The writer probes the backend with the retry backoff (``retry_initial`` doubling
  to ``retry_max`` seconds) by writing the next spilled chunk (``batch_size`` entries). Once
  it answers, the spill is replayed in order, before any newer entry, and the file is deleted
  when it is all written. On Redis "stored once" holds while the request's records are kept
  (``label_window_days``, the last ``stream_maxlen`` requests).
- **Orphans.** At start, and every few seconds after a successful write, a log adopts the
  spill files of dead writers for its backend and replays them before its memory.
- **Disk bound.** Beyond ``spill_max_bytes`` entries are dropped and counted (``dropped``),
  with one ERROR line per episode (until the spill is replayed).
- **Quarantine.** When the same spilled chunk has failed :data:`ISOLATE_AFTER` times in a row
  and the backend answers ``ping``, it refuses entries: the poison ones are isolated
  (:mod:`~airmlops.serving.prediction_log.poison`), appended with their error to
  ``<spill dir>/quarantine/<spill file name>`` (within ``spill_max_bytes``; beyond it they are
  dropped and counted) and counted (``quarantined``), one ERROR line per quarantine file, and
  the replay goes on. A poison entry in memory is spilled, then isolated the same way
  (without a spill directory it is retried like any failed write).
- **What can still be lost.** Without a spill directory (``spill_max_bytes=0``) entries wait in
  memory (up to ``buffer_size``, beyond which they are dropped) and are dropped at close. With
  one, a ``kill -9`` of a worker loses what is in its memory and not yet written or spilled:
  the entries of the last linger interval plus the batch in flight (more if one backend call
  hangs until its timeout: what arrived meanwhile). A crash of the machine can lose the spilled
  batch whose fsync had not returned.

Counters (logged, buffered, spilled, failed writes, dropped, quarantined) and the state (``ok`` or
``spilling``) are in :meth:`~PredictionLog.stats` and are pushed to an optional ``observer`` as
they change (the service turns them into Prometheus metrics and its ``/readyz`` body).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from airmlops.serving.prediction_log.backend import LogBackend
from airmlops.serving.prediction_log.poison import answers, isolate
from airmlops.serving.prediction_log.records import (
    LabelRecord,
    LogStats,
    Observer,
    PredictionRecord,
    Record,
    split_records,
)
from airmlops.serving.prediction_log.spill import (
    SpillFile,
    SpillFiles,
    encode_entry,
    fitting,
    quarantine_entry,
    read_chunk,
)

log = logging.getLogger(__name__)

ADOPT_INTERVAL_S = 5.0
"""How often (at most) a log looks for orphaned spill files after a successful write."""
ISOLATE_AFTER = 3
"""After this many failed writes in a row of the same spilled chunk, if the backend answers
``ping``, the chunk's poison entries are isolated and quarantined."""


class PredictionLog:
    """Buffers log entries in memory and writes them from a background thread.

    :meth:`log` and :meth:`log_labels` never block on the backend: they append to a buffer of
    at most ``buffer_size`` entries (beyond it, new entries are dropped and counted) and return.
    The writer takes up to ``batch_size`` entries at a time, in order, and removes them only
    once the backend has stored them (or, with a ``spill_dir``, spilled them to disk: see the
    module docstring). A failed write is counted and the backend is tried again after a backoff
    (``retry_initial`` doubling up to ``retry_max`` seconds) until it answers or the log is
    closed. With ``linger`` (seconds) the writer waits that long after the first entry for more
    before a write (or a spill) that would not be full, so one call carries many entries; a
    :meth:`flush` or :meth:`close` cuts the wait short. Call :meth:`close` to flush (bounded by
    a timeout), spill what is left and stop.

    The spill directory holds at most ``spill_max_bytes`` (every file in it, whoever wrote it).
    """

    def __init__(
        self,
        backend: LogBackend,
        *,
        buffer_size: int = 100_000,
        batch_size: int = 1000,
        retry_initial: float = 0.2,
        retry_max: float = 5.0,
        linger: float = 0.0,
        observer: Observer | None = None,
        spill_dir: Path | None = None,
        spill_max_bytes: int = 1 << 30,
    ) -> None:
        if buffer_size < 1 or batch_size < 1:
            raise ValueError("buffer_size and batch_size must be at least 1")
        if linger < 0:
            raise ValueError("linger must not be negative")
        if spill_max_bytes < 0:
            raise ValueError("spill_max_bytes must not be negative")
        self.backend = backend
        self.buffer_size = buffer_size
        self.batch_size = batch_size
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.linger = linger
        self.spill_max_bytes = spill_max_bytes
        self._observer = observer
        self._condition = threading.Condition()
        self._buffer: deque[Record] = deque()
        self._in_flight = 0
        self._flushing = 0
        self._stopping = False
        self._logged = self._labels_logged = self._failed_writes = self._dropped = 0
        self._last_drop: float | None = None
        self._backend_up = True
        self._retry_at = 0.0
        self._retry_delay = retry_initial
        # Spilling: the writer thread's own state, but for the _spilled count.
        self._spilled = 0
        self._spill_due: float | None = None
        self._spill_full_logged = False
        self._last_adopt = 0.0
        self._quarantined = 0
        self._refused_at: tuple[str, int] | None = None  # the chunk that keeps failing
        self._refusals = 0
        self._quarantine_logged: set[Path] = set()
        self._spill: SpillFiles | None = None
        if spill_dir is not None:
            self._open_spill_dir(Path(spill_dir))
        self._thread = threading.Thread(target=self._run, name="prediction-log-writer",
                                        daemon=True)
        self._thread.start()

    @property
    def spill_dir(self) -> Path | None:
        """Where this log spills; None without one (or when it proved unusable)."""
        return None if self._spill is None else self._spill.directory

    # -- producers ------------------------------------------------------------------------

    def log(self, records: Sequence[PredictionRecord]) -> int:
        """Buffer prediction records; return how many were accepted (the rest are dropped)."""
        return self._append(records)

    def log_labels(self, records: Sequence[LabelRecord]) -> int:
        """Buffer label records; return how many were accepted (the rest are dropped)."""
        return self._append(records)

    def _append(self, records: Sequence[Record]) -> int:
        """Buffer what fits of ``records``; count (and log) the rest as dropped."""
        if not records:
            return 0
        with self._condition:
            if self._stopping:
                accepted = 0
            else:
                room = self.buffer_size - len(self._buffer) - self._in_flight
                accepted = max(0, min(room, len(records)))
                was_empty = not self._buffer
                self._buffer.extend(records[:accepted])
                # Wake the writer when it may be idle or has a full batch; while it lingers,
                # waking it for every entry would only cost CPU.
                if was_empty or not self.linger or len(self._buffer) >= self.batch_size:
                    self._condition.notify_all()
            dropped = len(records) - accepted
            if dropped:
                self._count_dropped(dropped)
            buffered = len(self._buffer) + self._in_flight
        if dropped:
            log.warning("prediction log buffer full (%d entries): dropped %d", self.buffer_size,
                        dropped)
            self._notify("dropped", dropped)
        self._notify("buffered", buffered)
        return accepted

    # -- state ------------------------------------------------------------------------------

    def stats(self) -> LogStats:
        """The counters now."""
        with self._condition:
            since = None if self._last_drop is None else \
                round(time.monotonic() - self._last_drop, 3)
            return LogStats(
                logged=self._logged,
                labels_logged=self._labels_logged,
                buffered=len(self._buffer) + self._in_flight,
                spilled=self._spilled,
                failed_writes=self._failed_writes,
                dropped=self._dropped,
                backend_up=self._backend_up,
                state="spilling" if self._spilled else "ok",
                seconds_since_drop=since,
                quarantined=self._quarantined,
            )

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every accepted entry (and every spilled one) is stored, or set aside
        for good (quarantined, or dropped: both counted in :meth:`stats`); False if
        ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._condition:
            self._flushing += 1  # the writer stops lingering
            self._condition.notify_all()
            try:
                while self._buffer or self._in_flight or self._spilled:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not self._thread.is_alive():
                        return False
                    self._condition.wait(min(remaining, 0.5))
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout: float = 10.0) -> bool:
        """Flush for at most ``timeout`` seconds, stop the writer and close the backend.

        Returns True when everything accepted was stored (or quarantined: see the module
        docstring). With a spill directory, entries not written are spilled (a later log on the
        directory replays them); without one they are counted as dropped.
        """
        flushed = self.flush(timeout)
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        self._thread.join(timeout=max(1.0, self.retry_max + 1.0))
        with self._condition:
            lost = len(self._buffer) + self._in_flight
            self._buffer.clear()
            self._in_flight = 0
            if lost:
                self._count_dropped(lost)
        if lost:
            log.warning("prediction log closed with %d entries unwritten", lost)
            self._notify("dropped", lost)
        try:
            self.backend.close()
        except Exception:  # closing a broken connection must not fail shutdown
            log.debug("closing the prediction log backend failed", exc_info=True)
        return flushed and not lost

    def _count_dropped(self, count: int) -> None:
        """Count ``count`` dropped entries (holding the condition)."""
        self._dropped += count
        self._last_drop = time.monotonic()

    def _notify(self, event: str, amount: int) -> None:
        """Tell the observer; its failures are logged at DEBUG, never raised."""
        if self._observer is None:
            return
        try:
            self._observer(event, amount)
        except Exception:  # metrics must never break logging
            log.debug("prediction log observer failed on %s", event, exc_info=True)

    # -- writer thread ------------------------------------------------------------------------

    def _has_spill(self) -> bool:
        """Entries are on disk: they go to the backend before anything in memory."""
        return self._spill is not None and self._spill.pending

    def _linger(self) -> None:
        """Wait (holding the condition) up to ``linger`` seconds for a full batch."""
        deadline = time.monotonic() + self.linger
        while (len(self._buffer) < self.batch_size and not self._stopping
               and not self._flushing):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._condition.wait(remaining)

    def _next_step(self) -> str:
        """Wait (holding the condition) until there is work; say which: ``spill`` a batch
        from memory, ``replay`` a spilled chunk, ``write`` a batch from memory, or ``stop``."""
        while True:
            if self._stopping:
                return "stop"
            now = time.monotonic()
            due = now >= self._retry_at
            # Memory queues behind the spill, and goes to disk while the backend is down.
            to_disk = self._spill is not None and bool(self._buffer) and \
                (self._has_spill() or not due)
            if to_disk:
                if self._spill_due is None:
                    self._spill_due = now + self.linger
                if (len(self._buffer) >= self.batch_size or self._flushing
                        or now >= self._spill_due):
                    return "spill"
            if due and self._has_spill():
                return "replay"
            if due and self._buffer and not to_disk:
                if self.linger and self._backend_up:
                    self._linger()
                return "stop" if self._stopping else "write"
            wakes = [self._spill_due] if to_disk and self._spill_due is not None else []
            if not due:
                wakes.append(self._retry_at)
            self._condition.wait(max(0.0, min(wakes) - now) if wakes else None)

    def _take_batch(self) -> list[Record]:
        """The oldest ``batch_size`` entries of the buffer, now in flight (holding the lock)."""
        count = min(self.batch_size, len(self._buffer))
        self._in_flight = count
        self._spill_due = None
        return [self._buffer.popleft() for _ in range(count)]

    def _run(self) -> None:
        """The writer thread: one step at a time until the log closes."""
        while True:
            with self._condition:
                step = self._next_step()
                batch = self._take_batch() if step in ("write", "spill") else []
            if step == "stop":
                self._stop()
                return
            if step == "write":
                self._write(batch)
            elif step == "spill":
                self._spill_batch(batch)
            else:
                self._replay()

    def _write(self, batch: list[Record]) -> None:
        """Write a batch from memory; when that fails, spill it or put it back in front."""
        predictions, labels = split_records(batch)
        try:
            self.backend.write(predictions, labels)
        except Exception as error:
            self._write_failed(error)
            if self._spill is not None:
                self._spill_batch(batch)
            else:
                with self._condition:
                    self._buffer.extendleft(reversed(batch))  # keep them, in order
                    self._in_flight = 0
            return
        self._written(predictions, labels)
        with self._condition:
            self._in_flight = 0
            self._condition.notify_all()

    def _write_failed(self, error: Exception) -> None:
        """Count a failed backend write and schedule the next try (backoff)."""
        with self._condition:
            self._failed_writes += 1
            was_up, self._backend_up = self._backend_up, False
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, self.retry_max)
            waiting = len(self._buffer) + self._in_flight + self._spilled
        if was_up:
            log.warning("prediction log backend %s failed (%s: %s); %d entries waiting, %s",
                        self.backend.location, type(error).__name__, error, waiting,
                        "spilling to disk" if self._spill is not None else "retrying")
        self._notify("failed_writes", 1)
        self._notify("backend_up", 0)

    def _written(self, predictions: Sequence[PredictionRecord],
                 labels: Sequence[LabelRecord]) -> None:
        """Count a successful backend write; observers hear about it before flush() can
        return (it waits for the entries in flight or spilled)."""
        with self._condition:
            self._logged += len(predictions)
            self._labels_logged += len(labels)
            was_up, self._backend_up = self._backend_up, True
            self._retry_at, self._retry_delay = 0.0, self.retry_initial
            buffered = len(self._buffer)
            spilled = self._spilled
        if not was_up:
            log.warning("prediction log backend %s is back; %d entries in memory, %d spilled",
                        self.backend.location, buffered, spilled)
            self._notify("backend_up", 1)
        if predictions:
            self._notify("logged", len(predictions))
        if labels:
            self._notify("labels_logged", len(labels))
        self._notify("buffered", buffered)
        if self._spill is not None and time.monotonic() - self._last_adopt >= ADOPT_INTERVAL_S:
            self._adopt_orphans()

    def _stop(self) -> None:
        """Spill what is still in memory, then let go of the spill files: what is not
        replayed stays for the next log on the directory."""
        if self._spill is None:
            return  # close() counts what is left as dropped
        while True:
            with self._condition:
                if not self._buffer:
                    break
                batch = self._take_batch()
            self._spill_batch(batch)
        left = self._spill.release_all()
        if left:
            log.warning("prediction log closed with %d entries spilled in %s; the next log on "
                        "that directory replays them", left, self.spill_dir)

    # -- spilling and replaying (writer thread) -------------------------------------------------

    def _open_spill_dir(self, directory: Path) -> None:
        """Start spilling to ``directory`` and adopt its orphans; an unusable directory is
        logged and the log keeps entries in memory only."""
        self._spill = SpillFiles(directory, self.backend.location)
        try:
            self._spill.prepare()
            self._adopt_orphans()
        except OSError as error:
            log.error("prediction log spill directory %s is unusable (%s): entries wait in "
                      "memory only while the backend is down", directory, error)
            self._spill = None

    def _spill_batch(self, batch: list[Record]) -> None:
        """Append ``batch`` (in flight) to this log's spill file and fsync it; what does not
        fit under ``spill_max_bytes`` (or cannot be written) is dropped and counted."""
        assert self._spill is not None
        lines = [encode_entry(r) for r in batch]
        written, reason = 0, ""
        try:
            fit = fitting(lines, self.spill_max_bytes - self._spill.used_bytes())
            if fit < len(lines):
                reason = f"the spill directory is full ({self.spill_max_bytes} bytes)"
            if fit:
                self._spill.append(lines[:fit])
                written = fit
        except OSError as error:
            reason = f"spilling to {self.spill_dir} failed: {error}"
        lost = len(batch) - written
        with self._condition:
            self._in_flight = 0
            self._spilled += written
            if lost:
                self._count_dropped(lost)
            buffered, spilled = len(self._buffer), self._spilled
            self._condition.notify_all()
        if lost:
            if not self._spill_full_logged:
                self._spill_full_logged = True
                log.error("prediction log entries dropped: %s (%d spilled); further drops are "
                          "counted, not logged, until the spill is replayed", reason, spilled)
            self._notify("dropped", lost)
        self._notify("spilled", spilled)
        self._notify("buffered", buffered)

    def _replay(self) -> None:
        """Write the next spilled chunk (the oldest spill file first); this is also how the
        writer probes a backend that was down."""
        assert self._spill is not None
        spill = self._spill.oldest()
        assert spill is not None
        try:
            chunk = read_chunk(spill, self.batch_size)
        except OSError as error:
            log.error("reading spill file %s failed (%s): its %d entries are dropped",
                      spill.path, error, spill.entries)
            self._finish(spill, dropped=spill.entries, delete=False)
            return
        if chunk.offset == spill.offset:  # nothing left to read: the file was cut short
            log.error("spill file %s ends before its %d entries; they are dropped", spill.path,
                      spill.entries)
            self._finish(spill, dropped=spill.entries)
            return
        predictions, labels = split_records(chunk.records)
        if chunk.records:
            try:
                self.backend.write(predictions, labels)
            except Exception as error:
                self._write_failed(error)
                if not self._refused(spill):
                    return
                found = isolate(self.backend, chunk.records, error)
                if found is None:
                    return  # the backend stopped answering: keep the chunk, back off
                if found.poison:
                    self._quarantine(spill, found.poison)
                predictions, labels = split_records(found.stored)
        self._refused_at = None
        spill.offset = chunk.offset
        spill.entries -= chunk.lines
        if spill.replayed:
            self._finish(spill)
        if chunk.records:
            self._written(predictions, labels)
        self._replayed(spill, chunk.lines, chunk.bad)

    def _refused(self, spill: SpillFile) -> bool:
        """Count a failed write of the chunk at ``spill.offset``: True when it has failed
        :data:`ISOLATE_AFTER` times in a row and the backend answers (it refuses entries)."""
        chunk = (spill.path.name, spill.offset)
        if chunk != self._refused_at:
            self._refused_at, self._refusals = chunk, 0
        self._refusals += 1
        return self._refusals >= ISOLATE_AFTER and answers(self.backend)

    def _quarantine(self, spill: SpillFile, poison: list[tuple[Record, Exception]]) -> None:
        """Set the refused entries of ``spill`` aside in its quarantine file and count them;
        what does not fit under ``spill_max_bytes`` (or cannot be written) is dropped and
        counted."""
        assert self._spill is not None
        lines = [quarantine_entry(record, error) for record, error in poison]
        path, kept, reason = spill.path, 0, ""
        try:
            path, kept = self._spill.quarantine(spill.path.name, lines, self.spill_max_bytes)
            if kept < len(lines):
                reason = f"the spill directory is full ({self.spill_max_bytes} bytes)"
        except OSError as failure:
            reason = f"writing the quarantine of {spill.path} failed: {failure}"
        lost = len(lines) - kept
        with self._condition:
            self._quarantined += kept
            if lost:
                self._count_dropped(lost)
        refusal = poison[0][1]
        if kept and path not in self._quarantine_logged:
            self._quarantine_logged.add(path)
            log.error("prediction log backend %s refused %d entries while it answers (%s: "
                      "%.200s): they are quarantined in %s and the replay goes on; later "
                      "refusals into that file are counted, not logged", self.backend.location,
                      kept, type(refusal).__name__, refusal, path)
        if lost:
            log.error("prediction log dropped %d entries its backend refused: %s", lost,
                      reason)
            self._notify("dropped", lost)
        if kept:
            self._notify("quarantined", kept)

    def _replayed(self, spill: SpillFile, lines: int, bad: int) -> None:
        """Count ``lines`` spilled entries as gone (``bad`` of them unreadable, dropped)."""
        if bad:
            log.warning("spill file %s: %d unreadable entries skipped", spill.path, bad)
            self._notify("dropped", bad)
        # Only this thread changes the count: observers hear it before flush() can return.
        with self._condition:
            spilled = self._spilled - lines
        self._notify("spilled", spilled)
        with self._condition:
            self._spilled -= lines
            if bad:
                self._count_dropped(bad)
            self._condition.notify_all()

    def _finish(self, spill: SpillFile, *, dropped: int = 0, delete: bool = True) -> None:
        """Let go of a replayed spill file (deleted only now that every entry is stored);
        its ``dropped`` unreplayable entries are counted."""
        assert self._spill is not None
        left = spill.entries
        try:
            self._spill.release(spill, delete=delete)
        except OSError as error:
            log.warning("removing spill file %s failed: %s", spill.path, error)
        with self._condition:
            self._spilled -= left
            if dropped:
                self._count_dropped(dropped)
            spilled = self._spilled
            self._condition.notify_all()
        if dropped:
            self._notify("dropped", dropped)
            self._notify("spilled", spilled)
        if not self._has_spill():
            self._spill_full_logged = False
            log.info("prediction log spill replayed to %s", self.backend.location)

    def _adopt_orphans(self) -> None:
        """Take over the orphaned spill files for this backend; they are replayed before
        memory."""
        assert self._spill is not None
        self._last_adopt = time.monotonic()
        adopted = self._spill.adopt_orphans()
        if not adopted:
            return
        count = sum(spill.entries for spill in adopted)
        with self._condition:
            self._spilled += count
            spilled = self._spilled
            self._condition.notify_all()
        log.warning("prediction log adopted %d orphaned spill file(s) with %d entries (%s); "
                    "replaying them", len(adopted), count,
                    ", ".join(spill.path.name for spill in adopted))
        self._notify("spilled", spilled)
