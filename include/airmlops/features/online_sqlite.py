"""The embedded online store backend: one SQLite file in WAL mode (see
:mod:`airmlops.features.online` for the semantics shared with Redis)."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.features.definitions import FeatureView
from airmlops.features.online_base import (
    OnlineResult,
    assemble,
    check_namespace,
    rows_columns,
    unique_entities,
)

if TYPE_CHECKING:
    import pandas as pd

_SQLITE_MAX_VARIABLES = 30_000


class SqliteOnlineStore:
    """The embedded online store: one SQLite file in WAL mode, safe across threads.

    ``clock`` (seconds since the epoch) decides key expiry, like the Redis server's clock does
    for :class:`RedisOnlineStore`; tests may pass their own.
    """

    def __init__(
        self,
        path: Path | str,
        namespace: str = "default",
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.namespace = check_namespace(namespace)
        self.round_trips = 0
        self._clock = clock
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=30.0, check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS online_features ("
            " namespace TEXT NOT NULL, view TEXT NOT NULL, entity TEXT NOT NULL,"
            " event_ts INTEGER NOT NULL, expires_at REAL NOT NULL, payload TEXT NOT NULL,"
            " PRIMARY KEY (namespace, view, entity)) WITHOUT ROWID"
        )

    def write(
        self,
        view: FeatureView,
        rows: pd.DataFrame | Sequence[Mapping[str, Any]],
        *,
        ttl_seconds: int | None = None,
    ) -> int:
        """Upsert ``rows``, each only if newer than the stored row; return rows stored."""
        entities, stamps, columns = rows_columns(view, rows)
        names = view.feature_names
        now = self._clock()
        expires_at = now + (ttl_seconds if ttl_seconds is not None else view.ttl_seconds)
        params = [
            (
                self.namespace, view.name, entity, stamp, expires_at,
                json.dumps(dict(zip(names, values, strict=True)), allow_nan=False),
                now,
            )
            for entity, stamp, *values in zip(entities, stamps, *columns, strict=True)
        ]
        with self._lock:
            cursor = self._db.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                cursor.executemany(
                    "INSERT INTO online_features"
                    " (namespace, view, entity, event_ts, expires_at, payload)"
                    " VALUES (?1, ?2, ?3, ?4, ?5, ?6)"
                    " ON CONFLICT (namespace, view, entity) DO UPDATE SET"
                    " event_ts = excluded.event_ts, expires_at = excluded.expires_at,"
                    " payload = excluded.payload"
                    " WHERE excluded.event_ts > online_features.event_ts"
                    " OR online_features.expires_at <= ?7",
                    params,
                )
                written = cursor.rowcount
                cursor.execute("COMMIT")
            except BaseException:
                cursor.execute("ROLLBACK")
                raise
            self.round_trips += 1
        return max(int(written), 0)

    def read(
        self,
        views: Sequence[FeatureView],
        entity_ids: Iterable[Any],
        *,
        as_of: dt.datetime | None = None,
    ) -> OnlineResult:
        """The newest unexpired row of each (view, entity): one query (per 30k entities)."""
        entity_ids = unique_entities(entity_ids)
        keys = [str(e) for e in entity_ids]
        view_names = [v.name for v in views]
        names_of = {v.name: v.feature_names for v in views}
        found: dict[tuple[str, str], tuple[int, list[Any]]] = {}
        if keys and views:
            chunk = max(1, _SQLITE_MAX_VARIABLES - len(view_names) - 2)
            with self._lock:
                now = self._clock()
                for offset in range(0, len(keys), chunk):
                    part = keys[offset : offset + chunk]
                    # Only placeholders are formatted in; every value is a bound parameter.
                    query = (
                        "SELECT view, entity, event_ts, payload FROM online_features"  # noqa: S608
                        " WHERE namespace = ? AND expires_at > ?"
                        f" AND view IN ({','.join('?' * len(view_names))})"
                        f" AND entity IN ({','.join('?' * len(part))})"
                    )
                    rows = self._db.execute(
                        query, [self.namespace, now, *view_names, *part]
                    ).fetchall()
                    self.round_trips += 1
                    for view_name, entity, stamp, payload in rows:
                        stored = json.loads(payload)
                        found[(view_name, entity)] = (
                            stamp, [stored.get(n) for n in names_of[view_name]]
                        )
        return assemble(views, entity_ids, found, as_of)

    @property
    def location(self) -> str:
        """``sqlite:<absolute path of the file>``."""
        return f"sqlite:{self.path.resolve()}"

    def purge_expired(self) -> int:
        """Delete expired rows (reads already ignore them); return how many."""
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM online_features WHERE expires_at <= ?", (self._clock(),)
            )
            self.round_trips += 1
            return cursor.rowcount

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteOnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
