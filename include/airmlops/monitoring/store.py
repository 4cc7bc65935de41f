"""The monitoring table: one SQLite file per pipeline, one row per window.

``<data_root>/monitoring/<pipeline>.sqlite``, table ``windows``. The policy reads it
(:meth:`MonitoringStore.history`, :meth:`MonitoringStore.last_retraining`) and the UI shows it.
Writes are idempotent per window: :meth:`~MonitoringStore.record_window` upserts by
``window_id`` (a repeated monitoring run for the same window, or labels arriving later,
update the row instead of adding one) and keeps the decision already taken;
:meth:`~MonitoringStore.record_decision` never turns a recorded retraining back into "none", so
the cooldown cannot be lost by a replay. Times are stored as ISO 8601 in UTC.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.monitoring.judgement import WindowNumbers
from airmlops.monitoring.policy import Decision, WindowRecord, check_window_id
from airmlops.names import NAME_PATTERN, is_name
from airmlops.times import assume_utc, utc

if TYPE_CHECKING:
    from airmlops.monitoring.measurement import WindowReport

SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    window_id TEXT PRIMARY KEY,
    "start" TEXT NOT NULL,
    "end" TEXT NOT NULL,
    rows INTEGER NOT NULL,
    sampled INTEGER NOT NULL,
    drift_share REAL,
    columns JSON NOT NULL,
    prediction_drift JSON,
    breaches JSON NOT NULL,
    performance JSON,
    estimated_performance JSON,
    label_count INTEGER NOT NULL,
    quality JSON NOT NULL,
    notes JSON NOT NULL,
    html_path TEXT,
    decision TEXT,
    reason TEXT,
    evidence JSON,
    dedup_key TEXT,
    triggered_run_id TEXT,
    decided_at TEXT,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS windows_by_start ON windows ("start");
"""

JSON_COLUMNS = ("columns", "prediction_drift", "breaches", "performance", "quality", "notes",
                "evidence", "estimated_performance")
REPORT_COLUMNS = ("start", "end", "rows", "sampled", "drift_share", "columns",
                  "prediction_drift", "breaches", "performance", "label_count", "quality",
                  "notes", "html_path", "updated", "estimated_performance")
ADDED_COLUMNS = {"estimated_performance": "JSON"}
"""Columns added after the table was first released: a table made before gets them (null)."""


@dataclass(frozen=True)
class Retraining:
    """The last window that decided to retrain."""

    window_id: str
    decided_at: dt.datetime
    triggered_run_id: str | None
    reason: str


def _time(text: str | None) -> dt.datetime | None:
    """A stored time (ISO 8601 in UTC), or None."""
    return assume_utc(text) if text else None


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, default=str)


class MonitoringStore:
    """The monitoring tables of every pipeline under ``<data_root>/monitoring``."""

    def __init__(self, data_root: Path | str) -> None:
        self.directory = Path(data_root) / "monitoring"

    def path(self, pipeline: str) -> Path:
        """The SQLite file of ``pipeline`` (the name is validated: it becomes a file name)."""
        if not is_name(pipeline):
            raise ValueError(f"pipeline {pipeline!r} must match {NAME_PATTERN}")
        return self.directory / f"{pipeline}.sqlite"

    @contextlib.contextmanager
    def _connect(self, pipeline: str) -> Iterator[sqlite3.Connection]:
        path = self.path(pipeline)
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, timeout=30.0)
        try:
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.executescript(SCHEMA)
            _add_missing_columns(connection)
            with connection:  # one transaction: commit, or roll back on error
                yield connection
        finally:
            connection.close()

    def record_window(self, pipeline: str, report: WindowReport, *, created: dt.datetime) -> None:
        """Insert or update the window's report; its decision (if any) is kept."""
        check_window_id(report.window_id)
        data = report.to_dict()
        values = {
            "start": utc(report.start, "start").isoformat(),
            "end": utc(report.end, "end").isoformat(),
            "rows": report.rows, "sampled": report.sampled, "drift_share": report.drift_share,
            "columns": _json(data["columns"]), "prediction_drift": _json(data["prediction_drift"]),
            "breaches": _json(list(report.breaches)), "performance": _json(report.performance),
            "label_count": report.label_count, "quality": _json(report.quality),
            "notes": _json(list(report.notes)), "html_path": report.html_path,
            "estimated_performance": _json(report.estimated_performance),
            "updated": utc(created, "created").isoformat(),
        }
        names = ", ".join(f'"{c}"' for c in REPORT_COLUMNS)
        marks = ", ".join(f":{c}" for c in REPORT_COLUMNS)
        updates = ", ".join(f'"{c}" = excluded."{c}"' for c in REPORT_COLUMNS)
        with self._connect(pipeline) as connection:
            connection.execute(
                f"INSERT INTO windows (window_id, created, {names}) "  # noqa: S608 (fixed names)
                f"VALUES (:window_id, :updated, {marks}) "
                f"ON CONFLICT(window_id) DO UPDATE SET {updates}",
                {"window_id": report.window_id, **values},
            )

    def record_decision(self, pipeline: str, window_id: str, decision: Decision, *,
                        decided_at: dt.datetime, triggered_run_id: str | None = None) -> bool:
        """Record the window's decision and why; return False when a recorded retraining was
        kept (a "none" never replaces it). The window must have been recorded first."""
        check_window_id(window_id)
        with self._connect(pipeline) as connection:
            row = connection.execute("SELECT decision FROM windows WHERE window_id = ?",
                                     (window_id,)).fetchone()
            if row is None:
                raise KeyError(f"window {window_id!r} of {pipeline!r} is not recorded")
            if row["decision"] == "retrain" and decision.action != "retrain":
                return False
            connection.execute(
                "UPDATE windows SET decision = ?, reason = ?, evidence = ?, dedup_key = ?, "
                "decided_at = COALESCE(CASE WHEN decision = 'retrain' THEN decided_at END, ?), "
                "triggered_run_id = COALESCE(?, triggered_run_id) WHERE window_id = ?",
                (decision.action, decision.reason, _json(decision.evidence), decision.dedup_key,
                 utc(decided_at, "decided_at").isoformat(), triggered_run_id, window_id),
            )
        return True

    def history(self, pipeline: str, n: int) -> list[WindowRecord]:
        """The last ``n`` windows by start time, oldest first (latest last)."""
        if n < 1:
            raise ValueError(f"n must be positive (got {n})")
        with self._connect(pipeline) as connection:
            rows = connection.execute(
                'SELECT * FROM windows ORDER BY "start" DESC, window_id DESC LIMIT ?', (n,)
            ).fetchall()
        return [_record(_decoded(row)) for row in reversed(rows)]

    def window(self, pipeline: str, window_id: str) -> dict[str, Any] | None:
        """One window's full row, JSON columns decoded (for the UI and tests)."""
        check_window_id(window_id)
        with self._connect(pipeline) as connection:
            row = connection.execute("SELECT * FROM windows WHERE window_id = ?",
                                     (window_id,)).fetchone()
        return None if row is None else _decoded(row)

    def count(self, pipeline: str) -> int:
        with self._connect(pipeline) as connection:
            return int(connection.execute("SELECT COUNT(*) FROM windows").fetchone()[0])

    def last_retraining(self, pipeline: str) -> Retraining | None:
        """The latest window that decided to retrain, or None."""
        with self._connect(pipeline) as connection:
            row = connection.execute(
                "SELECT window_id, decided_at, triggered_run_id, reason FROM windows "
                "WHERE decision = 'retrain' ORDER BY decided_at DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        return Retraining(window_id=row["window_id"], decided_at=_time(row["decided_at"]),
                          triggered_run_id=row["triggered_run_id"], reason=row["reason"])


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    """Add the :data:`ADDED_COLUMNS` a table made by an older release lacks."""
    present = {row[1] for row in connection.execute("PRAGMA table_info(windows)")}
    for name, kind in ADDED_COLUMNS.items():
        if name in present:
            continue
        try:
            connection.execute(f'ALTER TABLE windows ADD COLUMN "{name}" {kind}')
        except sqlite3.OperationalError as error:  # another writer added it first
            if "duplicate column" not in str(error):
                raise


def _decoded(row: sqlite3.Row) -> dict[str, Any]:
    """A window row as a dict, its JSON columns decoded."""
    data = dict(row)
    for name in JSON_COLUMNS:
        if data[name] is None:
            continue
        try:
            data[name] = json.loads(data[name])
        except ValueError:
            if name not in ADDED_COLUMNS:
                raise
            data[name] = None  # an optional later column that cannot be read is absent
    return data


def _record(row: dict[str, Any]) -> WindowRecord:
    """What the policy reads of a decoded window row: its recorded breaches and its numbers,
    which the policy judges again under the current config."""
    return WindowRecord(
        window_id=row["window_id"], start=_time(row["start"]), end=_time(row["end"]),
        breaches=tuple(row["breaches"]), label_count=row["label_count"],
        decision=row["decision"], reason=row["reason"],
        triggered_run_id=row["triggered_run_id"], decided_at=_time(row["decided_at"]),
        numbers=WindowNumbers.from_row(row),
    )
