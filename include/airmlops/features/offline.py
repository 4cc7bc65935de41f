"""The offline store: feature-view rows in Parquet, and point-in-time-correct retrieval.

Layout under the data root (one file per partition)::

    <root>/features/<pipeline>/<view>/date=YYYY-MM-DD/part-<digest>.parquet

A partition holds the rows whose ``event_timestamp`` falls on that UTC date, sorted by
(join key, ``event_timestamp``), one row per (entity, timestamp). ``<digest>`` is the start of
the SHA-256 of the file's bytes, so writing the same rows again produces the same file and
changes nothing (idempotent), and writing different rows for a day replaces that day: the new
file is written atomically, then the old one is removed; a reader that meets both in that
instant takes the newest (by modification time).

:func:`get_historical_features` joins feature values onto an "entity frame" (rows of entity key
+ event time, e.g. the labelled observations of a training set): for each row and each view, the
newest feature row of that entity with ``feature_ts <= event_time`` and
``feature_ts > event_time - ttl``. Never a value from the future; every input row comes back, in
its original order and with its original index, with nulls where no feature row qualifies
(Feast's file store drops those rows). Numeric features come back as ``float64`` (``NaN`` =
missing), others as ``object`` (``None`` = missing). Only the partitions between
``min(event_time) - ttl`` and ``max(event_time)`` are read.

The join itself lives in :mod:`airmlops.features.offline_join` (match on keys and times, then
gather only the chosen rows, each output column allocated once). Measured on the 2-core build
machine against 3 views (14 features, 3M stored rows each) plus 2 on-demand features:
10M entity rows in about 10-15 s of CPU time (32 s wall with a load average of 12 on
the 2 shared cores), peaking at 1.9 GB of process memory, of which 1.28 GB are the 16 result
columns (8 bytes a value) and about 0.64 GB the imports and the entity frame; 1M rows in
about 3.5 s of CPU time, 0.49 GB (Feast 0.67's DuckDB store: 24-58 s, 2.6 GB).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from airmlops.features.compute import (
    DAY_US,
    NAT_US,
    day_index,
    sorted_unique_order,
    to_epoch_us,
)
from airmlops.features.definitions import FEATURE_TIMESTAMP, NAME_PATTERN, FeatureView
from airmlops.features.offline_join import point_in_time_frame
from airmlops.paths import atomic_write_bytes, safe_join
from airmlops.times import EPOCH_DATE

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from airmlops.features.definitions import OnDemandFeature

log = logging.getLogger(__name__)



def _check_pipeline(pipeline: str) -> str:
    import re

    if not re.match(NAME_PATTERN, pipeline):
        raise ValueError(f"pipeline name {pipeline!r} does not match {NAME_PATTERN}")
    return pipeline


def pipeline_dir(root: Path, pipeline: str) -> Path:
    """``<root>/features/<pipeline>``: the offline store of one pipeline."""
    return safe_join(Path(root), "features", _check_pipeline(pipeline))


def view_dir(root: Path, pipeline: str, view: FeatureView | str) -> Path:
    """The folder of one view's partitions."""
    name = view if isinstance(view, str) else view.name
    if not isinstance(view, FeatureView):
        import re

        if not re.match(NAME_PATTERN, name):
            raise ValueError(f"view name {name!r} does not match {NAME_PATTERN}")
    return safe_join(pipeline_dir(root, pipeline), name)


def partition_dates(root: Path, pipeline: str, view: FeatureView | str) -> list[dt.date]:
    """The dates that have a partition, sorted."""
    folder = view_dir(root, pipeline, view)
    if not folder.is_dir():
        return []
    dates = []
    for child in folder.iterdir():
        if child.is_dir() and child.name.startswith("date="):
            try:
                dates.append(dt.date.fromisoformat(child.name.removeprefix("date=")))
            except ValueError:
                continue
    return sorted(dates)


def _partition_file(folder: Path) -> Path | None:
    parts = [p for p in folder.glob("part-*.parquet") if p.is_file()]
    if not parts:
        return None
    return max(parts, key=lambda p: (p.stat().st_mtime_ns, p.name))


def _normalise(frame: pd.DataFrame, view: FeatureView) -> pd.DataFrame:
    """The stored form: key, timestamp (us, UTC), features; sorted; one row per (key, time)."""
    import pandas as pd

    columns = [view.join_key, FEATURE_TIMESTAMP, *view.feature_names]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"view '{view.name}': rows have no column(s) {missing}")
    out = frame[columns]
    micros = to_epoch_us(out[FEATURE_TIMESTAMP])
    if (micros == NAT_US).any() or out[view.join_key].isna().any():
        raise ValueError(f"view '{view.name}': rows with a missing key or timestamp")
    order = sorted_unique_order(out[view.join_key].to_numpy(), micros)
    if order is not None:
        out, micros = out.take(order), micros[order]
    out = out.reset_index(drop=True)
    if out[FEATURE_TIMESTAMP].dtype != "datetime64[us, UTC]":
        out[FEATURE_TIMESTAMP] = pd.to_datetime(micros, unit="us", utc=True).as_unit("us")
    return out


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="snappy")  # reads ~30% faster than zstd here
    return buffer.getvalue()


def write_partition(
    frame: pd.DataFrame, view: FeatureView, root: Path, pipeline: str, day: dt.date
) -> Path | None:
    """Replace the partition of ``day`` with ``frame`` (all of whose rows must fall on ``day``).

    An empty frame removes the partition (returns None). Writing identical rows again leaves
    the same file in place.
    """
    rows = _normalise(frame, view)
    days = to_epoch_us(rows[FEATURE_TIMESTAMP]) // DAY_US
    if len(rows) and not (days == day_index(day)).all():
        raise ValueError(f"view '{view.name}': rows outside {day} given for its partition")
    return _replace_partition(rows, view, root, pipeline, day)


def _replace_partition(
    rows: pd.DataFrame, view: FeatureView, root: Path, pipeline: str, day: dt.date
) -> Path | None:
    folder = safe_join(view_dir(root, pipeline, view), f"date={day.isoformat()}")
    old_parts = list(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if rows.empty:
        for old in old_parts:
            old.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        return None
    data = _parquet_bytes(rows)
    path = folder / f"part-{hashlib.sha256(data).hexdigest()[:20]}.parquet"
    if not (path.is_file() and path.read_bytes() == data):
        atomic_write_bytes(path, data)
    for old in old_parts:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def write_view_rows(
    frame: pd.DataFrame,
    view: FeatureView,
    root: Path,
    pipeline: str,
    *,
    days: Iterable[dt.date] | None = None,
) -> list[Path]:
    """Write ``frame`` (rows of ``view``, e.g. from ``compute_view``) into daily partitions.

    Each date that has rows is replaced. ``days``, when given, lists dates to replace even if
    ``frame`` has no row on them (their partitions are removed): pass the computed range so a
    recomputation that yields fewer days leaves nothing stale. Returns the written files.
    """
    import numpy as np

    rows = _normalise(frame, view)
    row_days = to_epoch_us(rows[FEATURE_TIMESTAMP]) // DAY_US
    wanted = {int(d) for d in np.unique(row_days)}
    if days is not None:
        wanted |= {day_index(d) for d in days}
    written = []
    for index in sorted(wanted):
        day = EPOCH_DATE + dt.timedelta(days=index)
        part = rows[row_days == index].reset_index(drop=True)
        path = _replace_partition(part, view, root, pipeline, day)
        if path is not None:
            written.append(path)
    log.info("offline store: %s/%s: %d rows in %d partition(s)", pipeline, view.name,
             len(rows), len(written))
    return written


def partition_files(
    view: FeatureView,
    root: Path,
    pipeline: str,
    *,
    start: dt.date | None = None,
    end: dt.date | None = None,
) -> list[Path]:
    """The current file of each partition dated in ``[start, end]``, in date order."""
    folder = view_dir(root, pipeline, view)
    files = []
    for day in partition_dates(root, pipeline, view):
        if (start is not None and day < start) or (end is not None and day > end):
            continue
        path = _partition_file(folder / f"date={day.isoformat()}")
        if path is not None:
            files.append(path)
    return files


def read_partition_file(path: Path, columns: Sequence[str]) -> pa.Table:
    """``columns`` of one partition file; a column the file lacks comes back as nulls."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    table = pq.read_table(path, columns=[c for c in columns if c in names])
    for name in columns:
        if name not in names:
            table = table.append_column(name, pa.nulls(len(table)))
    return table.select(list(columns))


def read_view_table(
    view: FeatureView,
    root: Path,
    pipeline: str,
    *,
    start: dt.date | None = None,
    end: dt.date | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """The stored rows of ``view`` with dates in ``[start, end]`` as one Arrow table.

    Columns missing from older partitions (a feature added later) come back as nulls. The
    result always has the key, the timestamp and the requested (default: all) features.
    """
    import pyarrow as pa

    wanted = [view.join_key, FEATURE_TIMESTAMP, *(columns or view.feature_names)]
    tables = [
        read_partition_file(path, wanted)
        for path in partition_files(view, root, pipeline, start=start, end=end)
    ]
    if not tables:
        return pa.table({c: pa.array([], type=pa.float64()) for c in wanted})
    return pa.concat_tables(tables, promote_options="default")


def read_view_rows(
    view: FeatureView,
    root: Path,
    pipeline: str,
    *,
    start: dt.date | None = None,
    end: dt.date | None = None,
) -> pd.DataFrame:
    """Like :func:`read_view_table`, as a pandas DataFrame."""
    return read_view_table(view, root, pipeline, start=start, end=end).to_pandas()


def get_historical_features(
    entity_df: pd.DataFrame,
    views: Sequence[FeatureView],
    root: Path,
    pipeline: str,
    *,
    timestamp_column: str = FEATURE_TIMESTAMP,
    on_demand: Sequence[OnDemandFeature] = (),
) -> pd.DataFrame:
    """``entity_df`` with the point-in-time feature values of ``views`` (and on-demand features).

    ``entity_df`` needs each view's join key and ``timestamp_column``; its other columns pass
    through untouched (they may be on-demand inputs). The result has the same rows, order and
    index, plus one column per feature.
    """

    def list_files(view: FeatureView, start: dt.date, end: dt.date) -> list[Path]:
        return partition_files(view, root, pipeline, start=start, end=end)

    def read_columns(path: Path, columns: Sequence[str]) -> pa.Table:
        return read_partition_file(path, columns)

    return point_in_time_frame(entity_df, views, timestamp_column=timestamp_column,
                               on_demand=on_demand, list_files=list_files,
                               read_columns=read_columns)
