"""Incremental materialization: copy new offline rows to the online store.

:func:`materialize` reads, per view, the offline rows with ``event_timestamp`` newer than the
view's watermark (and not after ``end``, when given), keeps the newest row per entity (the
online store holds only that one), writes them, then advances the watermark to the newest event
time it read. Running it again for the same interval reads and writes nothing; a run after new
offline rows writes only those.

Watermarks live in ``<root>/features/<pipeline>/_watermarks.json``, one per (online store,
view): switching the store (SQLite -> Redis) starts that store from scratch instead of trusting
a watermark that describes another store. The file is rewritten atomically under a file lock.
``full=True`` ignores the watermark (e.g. after the Redis data was lost); monotonic writes make
that safe.

Offline rows rewritten later with an event time at or before the watermark (late corrections)
are not re-materialized; run with ``full=True`` to push them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.features.compute import datetime_to_epoch_us, epoch_us_to_datetime
from airmlops.features.definitions import FEATURE_TIMESTAMP, FeatureView
from airmlops.features.offline import partition_files, pipeline_dir, read_partition_file
from airmlops.paths import atomic_write_json, exclusive_lock

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.features.online import OnlineStore

log = logging.getLogger(__name__)

WATERMARKS_FILE = "_watermarks.json"
_WRITE_CHUNK_ROWS = 50_000


@dataclasses.dataclass(frozen=True)
class MaterializeResult:
    """What one view's materialization did."""

    view: str
    rows_read: int
    """Offline rows newer than the watermark (and not after ``end``)."""
    rows_written: int
    """Rows the online store accepted (the newest per entity that was newer than its row)."""
    watermark: str | None
    """The view's watermark after the run (ISO 8601, UTC), None if there never was data."""
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def store_location(store: OnlineStore) -> str:
    """The identity of an online store in the watermark file (no secrets in it)."""
    return store.location


def read_watermarks(root: Path, pipeline: str) -> dict[str, dict[str, int]]:
    """{store location: {view: watermark in epoch microseconds}}."""
    path = pipeline_dir(root, pipeline) / WATERMARKS_FILE
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return {
        store: {view: int(mark["event_ts_us"]) for view, mark in views.items()}
        for store, views in data.get("stores", {}).items()
    }


def _save_watermark(root: Path, pipeline: str, store: str, view: str, micros: int) -> None:
    folder = pipeline_dir(root, pipeline)
    with exclusive_lock(folder / "_watermarks.lock"):
        path = folder / WATERMARKS_FILE
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        stores = data.setdefault("stores", {})
        stores.setdefault(store, {})[view] = {
            "event_ts_us": micros,
            "event_timestamp": epoch_us_to_datetime(micros).isoformat(),
        }
        atomic_write_json(path, data)


def _newest_rows(
    view: FeatureView, files: list[Path], after_us: int | None, end_us: int | None
) -> tuple[int, int | None, pd.DataFrame | None]:
    """(rows read, newest time, the newest row per entity) among rows in (after, end]."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    # Pass 1: keys and times only.
    keys_parts, us_parts, local_parts = [], [], []
    for path in files:
        part = read_partition_file(path, [view.join_key, FEATURE_TIMESTAMP])
        stamps = part.column(FEATURE_TIMESTAMP).cast(pa.timestamp("us", tz="UTC"))
        micros = stamps.cast(pa.int64()).to_numpy()
        wanted = np.ones(len(micros), dtype=bool)
        if after_us is not None:
            wanted &= micros > after_us
        if end_us is not None:
            wanted &= micros <= end_us
        local = np.flatnonzero(wanted)
        keys_parts.append(part.column(view.join_key).to_numpy()[local])
        us_parts.append(micros[local])
        local_parts.append(local)
    rows_read = sum(len(u) for u in us_parts)
    if not rows_read:
        return 0, None, None
    micros = np.concatenate(us_parts)
    codes, _ = pd.factorize(np.concatenate(keys_parts))
    file_of = np.repeat(np.arange(len(files)), [len(u) for u in us_parts])
    local = np.concatenate(local_parts)
    # The newest time per entity, then the last row (in file order) having it.
    newest_us = np.full(codes.max() + 1, np.iinfo(np.int64).min)
    np.maximum.at(newest_us, codes, micros)
    is_newest = np.flatnonzero(micros == newest_us[codes])
    chosen = np.full(len(newest_us), -1)
    np.maximum.at(chosen, codes[is_newest], is_newest)
    # Pass 2: read the chosen rows of each file.
    frames = []
    for index, path in enumerate(files):
        picked = chosen[file_of[chosen] == index]
        if len(picked):
            columns = [view.join_key, FEATURE_TIMESTAMP, *view.feature_names]
            table = read_partition_file(path, columns)
            frames.append(table.take(pa.array(local[picked])).to_pandas())
    return rows_read, int(micros.max()), pd.concat(frames, ignore_index=True)


def materialize_view(
    view: FeatureView,
    root: Path,
    pipeline: str,
    store: OnlineStore,
    *,
    end: dt.datetime | None = None,
    full: bool = False,
    ttl_seconds: int | None = None,
) -> MaterializeResult:
    """Materialize one view; see the module docstring."""
    started = time.perf_counter()
    location = store_location(store)
    stored = read_watermarks(root, pipeline).get(location, {}).get(view.name)
    previous = None if full else stored
    end_us = datetime_to_epoch_us(end) if end is not None else None
    first_day = epoch_us_to_datetime(previous).date() if previous is not None else None
    last_day = epoch_us_to_datetime(end_us).date() if end_us is not None else None
    files = partition_files(view, root, pipeline, start=first_day, end=last_day)
    rows_read, max_seen, newest = _newest_rows(view, files, previous, end_us)

    rows_written = 0
    if newest is not None:
        for offset in range(0, len(newest), _WRITE_CHUNK_ROWS):
            chunk = newest.iloc[offset : offset + _WRITE_CHUNK_ROWS]
            rows_written += store.write(view, chunk, ttl_seconds=ttl_seconds)
            elapsed = time.perf_counter() - started
            log.info(
                "materialize %s/%s: %d of %d rows written (%.0f rows/s)",
                pipeline, view.name, offset + len(chunk), len(newest),
                (offset + len(chunk)) / elapsed if elapsed > 0 else float("inf"),
            )
    if max_seen is not None and stored is not None:
        max_seen = max(max_seen, stored)  # a full or bounded re-run never moves it back
    elif max_seen is None:
        max_seen = stored
    if max_seen is not None and max_seen != stored:
        _save_watermark(root, pipeline, location, view.name, int(max_seen))
    seconds = time.perf_counter() - started
    watermark = epoch_us_to_datetime(max_seen).isoformat() if max_seen is not None else None
    log.info(
        "materialize %s/%s: read %d new offline rows, wrote %d in %.2f s (%.0f rows/s); "
        "watermark %s",
        pipeline, view.name, rows_read, rows_written, seconds,
        rows_written / seconds if seconds > 0 else 0.0, watermark,
    )
    return MaterializeResult(
        view=view.name,
        rows_read=rows_read,
        rows_written=rows_written,
        watermark=watermark,
        seconds=round(seconds, 6),
    )


def materialize(
    views: Sequence[FeatureView],
    root: Path,
    pipeline: str,
    store: OnlineStore,
    *,
    end: dt.datetime | None = None,
    full: bool = False,
    ttl_seconds: int | None = None,
) -> dict[str, MaterializeResult]:
    """Materialize every view in ``views``; return the result per view name.

    ``end`` bounds the event times copied (the run's data interval end); ``ttl_seconds``
    overrides the views' TTL in the online store (tests).
    """
    return {
        view.name: materialize_view(
            view, root, pipeline, store, end=end, full=full, ttl_seconds=ttl_seconds
        )
        for view in views
    }
