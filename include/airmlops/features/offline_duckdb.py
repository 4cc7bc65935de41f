"""The out-of-core point-in-time join: the offline store's join done by DuckDB.

Same arguments and same result as :func:`airmlops.features.offline.get_historical_features`
(``feature_store.offline_engine: duckdb`` selects it): for each entity row and view, the newest
stored row of that entity with ``feature_ts <= event_time`` and ``feature_ts > event_time -
ttl``; every input row back in its order with its index; numeric features ``float64`` (``NaN``
missing), others ``object`` (``None`` missing); on-demand features computed after the join.

How: the entity frame's rows (position, keys, time in microseconds) are handed to DuckDB as an
Arrow table; per view one ``ASOF JOIN`` against the view's partition files in reach, then the
TTL as a filter (the ASOF match is the newest row at or before the time, so when it is too old
no other row qualifies). DuckDB sorts and joins within ``memory_limit`` and spills the rest to
a temporary folder under the data root; the matched rows stream back in batches and are copied
into the result's columns.

Confinement: DuckDB reads only the partition files the offline store lists (an explicit list,
passed as a bound parameter, also set as its ``allowed_paths``), writes only its temporary
folder (``allowed_directories``); external access, extension installing and loading and
Python-variable scans are off and the configuration is locked before the first query.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.features.compute import DAY_US, NAT_US, to_epoch_us
from airmlops.features.definitions import FEATURE_TIMESTAMP, FeatureView
from airmlops.features.join_memory import available_memory_mb
from airmlops.features.offline import partition_files
from airmlops.features.offline_join import result_frame
from airmlops.paths import safe_join
from airmlops.times import EPOCH_DATE

if TYPE_CHECKING:
    import duckdb
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from airmlops.features.definitions import OnDemandFeature

log = logging.getLogger(__name__)

TEMP_PARTS = ("tmp", "offline-duckdb")
"""Where, under the data root, each join gets its own temporary (spill) folder."""
MEMORY_SHARE = 0.4
"""Default ``memory_limit``: this share of the available memory (the result's columns, which
DuckDB does not count, need the rest)."""
MIN_MEMORY_MB = 64
UNKNOWN_MEMORY_LIMIT_MB = 1024
"""The limit when the available memory is unknown (no ``/proc/meminfo``)."""
THREAD_MEMORY_MB = 256
"""One DuckDB thread per this much of ``memory_limit`` (each thread holds its own buffers)."""
BATCH_ROWS = 262_144


def default_memory_limit_mb(available_mb: float | None = None) -> int:
    """DuckDB's ``memory_limit`` when none is given: a share of the available memory."""
    available = available_memory_mb() if available_mb is None else available_mb
    if available is None:
        return UNKNOWN_MEMORY_LIMIT_MB
    return max(MIN_MEMORY_MB, int(available * MEMORY_SHARE))


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _is_numeric_type(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind))


class _ViewPlan:
    """One view's part of the join: its files in reach and its stored columns' kinds."""

    def __init__(self, view: FeatureView, files: list[Path]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.view, self.files = view, files
        kinds: dict[str, set[bool]] = {}
        key_types: set[bool] = set()
        for path in files:
            schema = pq.read_schema(path)
            for field in schema:
                if field.name == view.join_key:
                    key_types.add(_is_numeric_type(field.type))
                elif field.name in view.feature_names and not pa.types.is_null(field.type):
                    kinds.setdefault(field.name, set()).add(_is_numeric_type(field.type))
        for name, numeric in kinds.items():
            if len(numeric) > 1:
                raise ValueError(f"view '{view.name}': feature '{name}' is numeric in some "
                                 "partitions and not in others")
        self.present = [n for n in view.feature_names if n in kinds]
        self.numeric = {n: kinds[n] == {True} for n in self.present}
        self.key_numeric = key_types == {True}


def _files_in_reach(view: FeatureView, root: Path, pipeline: str,
                    times: np.ndarray) -> list[Path]:
    """The view's partition files between ``min(time) - ttl`` and ``max(time)``."""
    if not len(times):
        return []
    first = EPOCH_DATE + dt.timedelta(days=(int(times.min()) - view.ttl_days * DAY_US) // DAY_US)
    last = EPOCH_DATE + dt.timedelta(days=int(times.max()) // DAY_US)
    return partition_files(view, root, pipeline, start=first, end=last)


def _entity_table(entity_df: pd.DataFrame, keys: Sequence[str],
                  left_us: np.ndarray) -> tuple[pa.Table, dict[str, bool]]:
    """The entity rows as DuckDB sees them (``entity_row``, ``entity_us``, ``key_<i>``) and,
    per key, whether its values are numbers."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    columns: dict[str, Any] = {
        "entity_row": pa.array(np.arange(len(entity_df), dtype=np.int64)),
        "entity_us": pa.array(left_us, mask=left_us == NAT_US),
    }
    numeric = {}
    for index, key in enumerate(keys):
        values = entity_df[key]
        numeric[key] = bool(pd.api.types.is_numeric_dtype(values.dtype))
        try:
            array = pa.array(values.to_numpy(), from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # mixed objects: compare as text
            array = pa.array(values.astype(str).where(values.notna(), None).to_numpy())
            numeric[key] = False
        columns[f"key_{index}"] = array
    return pa.table(columns), numeric


@contextmanager
def confined_connection(root: Path, files: Sequence[Path], memory_limit_mb: int,
                threads: int) -> Iterator[tuple[duckdb.DuckDBPyConnection, Path]]:
    """A locked-down DuckDB connection that may read ``files`` and spill to a fresh folder
    under ``root`` (removed afterwards)."""
    import duckdb

    parent = safe_join(Path(root), *TEMP_PARTS)
    parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="join-", dir=parent))
    con = duckdb.connect(config={"autoinstall_known_extensions": False,
                                 "autoload_known_extensions": False,
                                 "python_enable_replacements": False})
    try:
        con.execute("SET allowed_paths = ?", [[str(p) for p in files]])
        con.execute("SET allowed_directories = ?", [[f"{temp}/"]])
        con.execute("SET temp_directory = ?", [str(temp)])
        con.execute("SET memory_limit = ?", [f"{memory_limit_mb}MB"])
        con.execute("SET threads = ?", [threads])
        con.execute("SET preserve_insertion_order = false")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        yield con, temp
    finally:
        con.close()
        shutil.rmtree(temp, ignore_errors=True)


def _join_sql(plan: _ViewPlan, key_index: int, compare_as_text: bool) -> str:
    """The ASOF join of one view; parameters: files, lowest time, highest time, ttl (us)."""
    stamp = f"epoch_us({_quote(FEATURE_TIMESTAMP)})"
    key = _quote(plan.view.join_key)
    if compare_as_text:
        key = f"CAST({key} AS VARCHAR)"
    entity_key = f"e.key_{key_index}"
    if compare_as_text:
        entity_key = f"CAST({entity_key} AS VARCHAR)"
    features = "".join(f", {_quote(n)}" for n in plan.present)
    chosen = "".join(f", f.{_quote(n)}" for n in plan.present)
    # Identifiers are validated names (NAME_PATTERN, COLUMN_PATTERN), quoted; values are bound.
    return (
        f"SELECT e.entity_row{chosen} FROM entities AS e "  # noqa: S608
        f"ASOF JOIN (SELECT {key} AS view_key, {stamp} AS view_us{features} "
        "FROM read_parquet(?, union_by_name = true) "
        f"WHERE {stamp} > ? AND {stamp} <= ?) AS f "
        f"ON {entity_key} = f.view_key AND e.entity_us >= f.view_us "
        "WHERE f.view_us > e.entity_us - ?"
    )


def _join_view(con: duckdb.DuckDBPyConnection, plan: _ViewPlan, key_index: int,
               key_numeric: bool, times: np.ndarray, n_rows: int) -> dict[str, np.ndarray]:
    """The point-in-time columns of one view (features with no value anywhere: all NaN)."""
    import numpy as np

    outputs = {n: np.full(n_rows, np.nan) for n in plan.view.feature_names}
    if not plan.files or not plan.present:
        return outputs
    ttl_us = plan.view.ttl_days * DAY_US
    sql = _join_sql(plan, key_index, compare_as_text=key_numeric != plan.key_numeric)
    params = [[str(p) for p in plan.files], int(times.min()) - ttl_us, int(times.max()), ttl_us]
    found = 0
    reader = con.sql(sql, params=params).to_arrow_reader(BATCH_ROWS)
    for batch in reader:
        rows = batch.column(0).to_numpy()
        found += len(rows)
        for index, name in enumerate(plan.present, start=1):
            _copy(outputs, name, plan.numeric[name], batch.column(index), rows)
    log.info("point-in-time join (duckdb): view %s, %d of %d rows found", plan.view.name,
             found, n_rows)
    return outputs


def _copy(outputs: dict[str, np.ndarray], name: str, numeric: bool, values: pa.Array,
          rows: np.ndarray) -> None:
    import numpy as np
    import pyarrow as pa

    if numeric:
        outputs[name][rows] = values.cast(pa.float64()).to_numpy(zero_copy_only=False)
        return
    if outputs[name].dtype != object:
        outputs[name] = np.full(len(outputs[name]), None, object)
    if pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        # One Python string per distinct value of the batch, not one per row.
        encoded = values.dictionary_encode()
        uniques = np.append(encoded.dictionary.to_numpy(zero_copy_only=False),
                            np.array([None], dtype=object))
        missing = len(uniques) - 1
        outputs[name][rows] = uniques[encoded.indices.fill_null(missing).to_numpy()]
        return
    outputs[name][rows] = values.to_numpy(zero_copy_only=False)


def _join_keys(entity_df: pd.DataFrame, views: Sequence[FeatureView],
                  timestamp_column: str, on_demand: Sequence[OnDemandFeature]) -> list[str]:
    """The join keys in first-use order, after the memory engine's checks of the frame."""
    if timestamp_column not in entity_df.columns:
        raise ValueError(f"entity frame has no timestamp column '{timestamp_column}'")
    clashes = [n for v in views for n in v.feature_names if n in entity_df.columns] + [
        f.name for f in on_demand if f.name in entity_df.columns]
    if clashes:
        raise ValueError(f"entity frame already has feature column(s) {clashes}")
    for view in views:
        if view.join_key not in entity_df.columns:
            raise ValueError(
                f"entity frame has no join key '{view.join_key}' of view '{view.name}'")
    return list(dict.fromkeys(v.join_key for v in views))


def get_historical_features_duckdb(
    entity_df: pd.DataFrame,
    views: Sequence[FeatureView],
    root: Path,
    pipeline: str,
    *,
    timestamp_column: str = FEATURE_TIMESTAMP,
    on_demand: Sequence[OnDemandFeature] = (),
    memory_limit_mb: int | None = None,
    threads: int | None = None,
) -> pd.DataFrame:
    """``entity_df`` with the point-in-time feature values of ``views`` (and on-demand
    features), joined by DuckDB within ``memory_limit_mb`` (default: a share of the available
    memory), spilling the rest to disk under ``root``."""
    import os

    keys = _join_keys(entity_df, views, timestamp_column, on_demand)
    left_us = to_epoch_us(entity_df[timestamp_column])
    table, key_numeric = _entity_table(entity_df, keys, left_us)
    reach: dict[str, np.ndarray] = {}
    for key in keys:
        usable = (left_us != NAT_US) & entity_df[key].notna().to_numpy()
        reach[key] = left_us[usable]
    plans = [_ViewPlan(v, _files_in_reach(v, root, pipeline, reach[v.join_key])) for v in views]
    limit = memory_limit_mb or default_memory_limit_mb()
    if threads is None:
        threads = max(1, min(os.cpu_count() or 1, limit // THREAD_MEMORY_MB))
    features: dict[str, np.ndarray] = {}
    with confined_connection(root, [p for plan in plans for p in plan.files], limit, threads) as (
            con, temp):
        con.register("entities", table)
        for plan in plans:
            key = plan.view.join_key
            features.update(_join_view(con, plan, keys.index(key), key_numeric[key],
                                       reach[key], len(entity_df)))
        spilled = sorted(p.name for p in temp.iterdir())
    del table
    log.info("point-in-time join (duckdb): memory_limit %d MB, %d thread(s), %d file(s) in "
             "the temporary folder %s", limit, threads, len(spilled), temp)
    return result_frame(entity_df, views, features, on_demand)
