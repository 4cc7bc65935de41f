"""The embedded prediction log backend: one SQLite file per pipeline.

``<data_root>/predictions/<pipeline>.sqlite`` in WAL mode with two tables. ``predictions`` has
one row per predicted entity: ``(request_id, position, ts, model_version, entity_id, inputs,
features, prediction, probability)``, keyed ``(request_id, position)`` (``position`` is the
entity's index in its request) and written with ``INSERT OR IGNORE``, so a batch written twice
(a retry after a failed commit, a replayed spill file) is stored once. ``labels`` has
``(request_id, entity_id, label, ts)`` keyed ``(request_id, entity_id)``; a label replaces the
stored one only if it is not older, so a replayed label never undoes a later one.

A ``/feedback`` claim is one ``BEGIN IMMEDIATE`` transaction: SQLite's write lock makes the
check and the insert one step for every process writing the file.

``shadow_predictions`` (same columns and key as ``predictions``) holds what a challenger
answered to mirrored requests (:mod:`airmlops.serving.prediction_log.shadow`), under the live
request id. It is apart from ``predictions`` so no reader of the live log ever sees it, and no
label is ever claimed against it. Each write trims it to its newest ``shadow_maxlen`` rows,
the bound the Redis streams have.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airmlops.paths import safe_join
from airmlops.serving.prediction_log.backend import LabelClaim
from airmlops.serving.prediction_log.records import (
    LabelRecord,
    PredictionRecord,
    check_pipeline,
    clean_row,
    to_json,
)

_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS predictions ("
    " request_id TEXT NOT NULL, position INTEGER NOT NULL, ts INTEGER NOT NULL,"
    " model_version TEXT NOT NULL, entity_id TEXT NOT NULL, inputs TEXT NOT NULL,"
    " features TEXT NOT NULL, prediction REAL, probability REAL,"
    " PRIMARY KEY (request_id, position))",
    "CREATE INDEX IF NOT EXISTS predictions_ts ON predictions (ts)",
    "CREATE TABLE IF NOT EXISTS labels ("
    " request_id TEXT NOT NULL, entity_id TEXT NOT NULL, label REAL NOT NULL,"
    " ts INTEGER NOT NULL, PRIMARY KEY (request_id, entity_id))",
    "CREATE INDEX IF NOT EXISTS labels_ts ON labels (ts)",
    "CREATE TABLE IF NOT EXISTS shadow_predictions ("
    " request_id TEXT NOT NULL, position INTEGER NOT NULL, ts INTEGER NOT NULL,"
    " model_version TEXT NOT NULL, entity_id TEXT NOT NULL, inputs TEXT NOT NULL,"
    " features TEXT NOT NULL, prediction REAL, probability REAL,"
    " PRIMARY KEY (request_id, position))",
    "CREATE INDEX IF NOT EXISTS shadow_predictions_ts ON shadow_predictions (ts)",
)
_INSERT_PREDICTIONS = (
    "INSERT OR IGNORE INTO predictions (request_id, position, ts, model_version,"
    " entity_id, inputs, features, prediction, probability)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_INSERT_SHADOW = _INSERT_PREDICTIONS.replace("INTO predictions", "INTO shadow_predictions")
_TRIM_SHADOW = (
    "DELETE FROM shadow_predictions"
    " WHERE rowid <= (SELECT MAX(rowid) FROM shadow_predictions) - ?"
)
_UPSERT_LABELS = (
    "INSERT INTO labels (request_id, entity_id, label, ts) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (request_id, entity_id) DO UPDATE"
    " SET label = excluded.label, ts = excluded.ts WHERE excluded.ts >= labels.ts"
)


def sqlite_log_path(data_root: Path, pipeline: str) -> Path:
    """``<data_root>/predictions/<pipeline>.sqlite``."""
    return safe_join(Path(data_root), "predictions", f"{check_pipeline(pipeline)}.sqlite")


class SqliteLogBackend:
    """The log in one SQLite file (WAL): safe for several writer processes (busy timeout).

    The connection is opened on first use, in the thread that writes (the log's writer thread).
    """

    def __init__(self, path: Path | str, *, shadow_maxlen: int = 1_000_000) -> None:
        self.path = Path(path)
        self.shadow_maxlen = int(shadow_maxlen)
        self._db: sqlite3.Connection | None = None

    @property
    def location(self) -> str:
        """``sqlite:<path>``."""
        return f"sqlite:{self.path}"

    def _connection(self) -> sqlite3.Connection:
        """The open connection, opened (and the schema created) on first use."""
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                 check_same_thread=False)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                for statement in _SQLITE_SCHEMA:
                    db.execute(statement)
            except sqlite3.Error:
                db.close()
                raise
            self._db = db
        return self._db

    def _rollback(self, db: sqlite3.Connection) -> None:
        """Roll back after a failure; a broken connection is closed (the next call reopens)."""
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            self.close()

    def write(self, predictions: Sequence[PredictionRecord],
              labels: Sequence[LabelRecord]) -> None:
        """Insert a batch in one transaction: a prediction already present is left as it is,
        a label replaces the stored one unless that one is newer."""
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            if predictions:
                db.executemany(_INSERT_PREDICTIONS, _prediction_rows(predictions))
            if labels:
                db.executemany(_UPSERT_LABELS, [
                    (r.request_id, r.entity_id, r.label, r.ts_us) for r in labels])
            db.execute("COMMIT")
        except BaseException:
            self._rollback(db)
            raise

    def write_shadow(self, predictions: Sequence[PredictionRecord]) -> None:
        """Insert shadow rows into ``shadow_predictions`` in one transaction (a row already
        present is left as it is), then keep only the newest ``shadow_maxlen`` rows."""
        if not predictions:
            return
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany(_INSERT_SHADOW, _prediction_rows(predictions))
            db.execute(_TRIM_SHADOW, (self.shadow_maxlen,))
            db.execute("COMMIT")
        except BaseException:
            self._rollback(db)
            raise

    def claim_labels(self, request_id: str, labels: Sequence[LabelRecord], *,
                     overwrite: bool = False) -> LabelClaim:
        """One ``BEGIN IMMEDIATE`` transaction: SQLite's write lock makes the check and the
        insert one step for every process writing this file."""
        db = self._connection()
        try:
            db.execute("BEGIN IMMEDIATE")
            claim = self._check_claim(db, request_id, labels, overwrite=overwrite)
            if claim.stored:
                db.executemany(
                    "INSERT OR REPLACE INTO labels (request_id, entity_id, label, ts)"
                    " VALUES (?, ?, ?, ?)",
                    [(request_id, r.entity_id, r.label, r.ts_us) for r in labels])
                db.execute("COMMIT")
            else:
                db.execute("ROLLBACK")
            return claim
        except BaseException:
            self._rollback(db)
            raise

    @staticmethod
    def _check_claim(db: sqlite3.Connection, request_id: str, labels: Sequence[LabelRecord],
                     *, overwrite: bool) -> LabelClaim:
        """What a claim finds (inside its transaction): the request's entities, then (unless
        ``overwrite``) the entities that have a label already."""
        issued = {row[0] for row in db.execute(
            "SELECT entity_id FROM predictions WHERE request_id = ?", (request_id,))}
        claim = LabelClaim(issued=bool(issued), unknown_entities=tuple(
            r.entity_id for r in labels if issued and r.entity_id not in issued))
        if claim.stored and not overwrite:
            labelled = {row[0] for row in db.execute(
                "SELECT entity_id FROM labels WHERE request_id = ?", (request_id,))}
            claim = LabelClaim(issued=True, conflicts=tuple(
                r.entity_id for r in labels if r.entity_id in labelled))
        return claim

    def ping(self) -> None:
        """An empty write transaction on the connection (opened if need be): raises when the
        file cannot be opened or its write lock not taken within the busy timeout (a lock
        held that long is the backend being unavailable, not an entry being refused)."""
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("SELECT 1").fetchone()
        finally:
            self._rollback(db)

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        if self._db is not None:
            self._db.close()
            self._db = None


def _prediction_rows(predictions: Sequence[PredictionRecord]) -> list[tuple[Any, ...]]:
    """The parameters of :data:`_INSERT_PREDICTIONS` for each record."""
    return [(r.request_id, r.position, r.ts_us, r.model_version, r.entity_id,
             to_json(clean_row(r.inputs)), to_json(clean_row(r.features)), r.prediction,
             r.probability) for r in predictions]


def read_sqlite_rows(path: Path, table: str, columns: Sequence[str], start_us: int,
                     end_us: int) -> list[dict[str, Any]]:
    """The rows of ``table`` with ``start_us <= ts < end_us`` in time order, read-only (a log
    file or table that does not exist yet has none)."""
    if not path.exists():
        return []
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        # table and columns are module constants; the bounds are parameters.
        query = (f"SELECT {', '.join(columns)} FROM {table}"  # noqa: S608
                 " WHERE ts >= ? AND ts < ? ORDER BY ts")
        try:
            cursor = db.execute(query, (start_us, end_us))
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return []
            raise
        return [dict(zip(columns, row, strict=True)) for row in cursor]
    finally:
        db.close()


def read_sqlite_predictions(path: Path, columns: Sequence[str], start_us: int,
                            end_us: int) -> dict[str, list[Any]]:
    """``columns`` of the predictions with ``start_us <= ts < end_us``, each as one list (no
    dict per row), ordered by ``(ts, request_id, position)``; read-only, and a log file or
    table that does not exist yet has none."""
    empty: dict[str, list[Any]] = {name: [] for name in columns}
    if not path.exists():
        return empty
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
    try:
        # columns are module constants of the caller; the bounds are parameters.
        query = (f"SELECT {', '.join(columns)} FROM predictions"  # noqa: S608
                 " WHERE ts >= ? AND ts < ? ORDER BY ts, request_id, position")
        try:
            rows = db.execute(query, (start_us, end_us)).fetchall()
        except sqlite3.OperationalError as error:
            if "no such table" in str(error):
                return empty
            raise
    finally:
        db.close()
    if not rows:
        return empty
    return {name: list(values) for name, values in zip(columns, zip(*rows, strict=True),
                                                       strict=True)}
