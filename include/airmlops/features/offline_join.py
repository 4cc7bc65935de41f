"""The point-in-time join behind :func:`airmlops.features.offline.get_historical_features`.

The contract (rows, order, index, dtypes, ttl) is stated on that function; this module is how.
It never touches the store's layout: the caller hands it two functions, one listing a view's
partition files between two dates and one reading columns of a file.

Per join key, the entity rows that can be joined (known key, known time) are coded and sorted
once by a packed (entity, time) integer key. Per view:

1. match: read only the key and time columns of the partitions in reach and find each entity
   row's stored row with one ``searchsorted`` (partitions are stored sorted by key, so ordering
   the stored rows is a cheap merge of sorted runs);
2. gather: read the feature columns partition by partition and keep only the stored rows some
   entity row chose (at most one per entity row, usually far fewer);
3. assemble: each output column is allocated once, by one ``take`` from those rows through a
   ``pick`` index (entity row -> chosen row, or a trailing missing-value slot). Strings go
   through a dictionary, so each distinct text is one Python object however many rows use it.

The result frame is built column by column without copying (no block consolidation): the
entity frame's columns are shared, as a shallow copy would.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.features.compute import DAY_US, NAT_US, to_epoch_us
from airmlops.features.definitions import FEATURE_TIMESTAMP, FeatureView
from airmlops.times import EPOCH_DATE

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

    from airmlops.features.definitions import OnDemandFeature

log = logging.getLogger(__name__)

ListFiles = Callable[[FeatureView, dt.date, dt.date], list[Path]]
"""The current partition files of a view dated in ``[start, end]``, in date order."""
ReadColumns = Callable[[Path, Sequence[str]], "pa.Table"]
"""Columns of one partition file; a column the file lacks comes back as nulls."""


def point_in_time_frame(
    entity_df: pd.DataFrame,
    views: Sequence[FeatureView],
    *,
    timestamp_column: str,
    on_demand: Sequence[OnDemandFeature],
    list_files: ListFiles,
    read_columns: ReadColumns,
) -> pd.DataFrame:
    """``entity_df`` plus the point-in-time feature columns of ``views`` and ``on_demand``."""
    by_key = _views_by_key(entity_df, views, timestamp_column, on_demand)
    n_rows = len(entity_df)
    left_us = to_epoch_us(entity_df[timestamp_column])
    features: dict[str, np.ndarray] = {}
    for join_key, key_views in by_key.items():
        features.update(_key_columns(entity_df[join_key], left_us, key_views, list_files,
                                     read_columns, n_rows))
    del left_us
    return result_frame(entity_df, views, features, on_demand)


def result_frame(entity_df: pd.DataFrame, views: Sequence[FeatureView],
                 features: dict[str, np.ndarray],
                 on_demand: Sequence[OnDemandFeature]) -> pd.DataFrame:
    """The join's answer, whichever engine joined: the entity frame's columns, then each
    view's ``features`` (taken out of the dict) in view order, then the on-demand features
    computed over them; none of them copied."""
    columns = {n: features.pop(n) for v in views for n in v.feature_names}
    if on_demand:
        columns.update(_on_demand_columns(entity_df, columns, on_demand))
    return _assemble(entity_df, columns)


def _views_by_key(entity_df: pd.DataFrame, views: Sequence[FeatureView], timestamp_column: str,
                  on_demand: Sequence[OnDemandFeature]) -> dict[str, list[FeatureView]]:
    """The views grouped by join key, after checking the entity frame has what they need."""
    if timestamp_column not in entity_df.columns:
        raise ValueError(f"entity frame has no timestamp column '{timestamp_column}'")
    clashes = [
        n for v in views for n in v.feature_names if n in entity_df.columns
    ] + [f.name for f in on_demand if f.name in entity_df.columns]
    if clashes:
        raise ValueError(f"entity frame already has feature column(s) {clashes}")
    by_key: dict[str, list[FeatureView]] = {}
    for view in views:
        if view.join_key not in entity_df.columns:
            raise ValueError(
                f"entity frame has no join key '{view.join_key}' of view '{view.name}'"
            )
        by_key.setdefault(view.join_key, []).append(view)
    return by_key


def _on_demand_columns(entity_df: pd.DataFrame, columns: dict[str, np.ndarray],
                       on_demand: Sequence[OnDemandFeature]) -> dict[str, Any]:
    """The on-demand features over the joined columns (computed here so the result is
    assembled once)."""
    import pandas as pd

    from airmlops.features.on_demand import on_demand_columns

    def lookup(name: str) -> Any:
        if name in columns:
            return pd.Series(columns[name], index=entity_df.index, copy=False)
        return entity_df[name] if name in entity_df.columns else None

    return on_demand_columns(lookup, len(entity_df), entity_df.index, on_demand)


def _assemble(entity_df: pd.DataFrame, columns: dict[str, np.ndarray]) -> pd.DataFrame:
    """The entity frame's columns and then ``columns``, none of them copied."""
    import warnings

    import pandas as pd

    if not entity_df.columns.is_unique:  # a dict cannot hold twice the same name
        result = entity_df.copy(deep=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
            for name, values in columns.items():
                result[name] = values
        return result
    data: dict[Any, Any] = {name: entity_df.iloc[:, i]
                            for i, name in enumerate(entity_df.columns)}
    data.update(columns)
    # copy=False also skips consolidating same-typed columns into one block (a full copy).
    result = pd.DataFrame(data, index=entity_df.index, copy=False)
    result.columns.name = entity_df.columns.name
    result.attrs = dict(entity_df.attrs)
    return result


class _EntityCodes:
    """Integer codes of the entity frame's keys, and the same coding for feature rows.

    Integer keys in a compact range are coded by subtraction (no hashing); other keys by a
    hash lookup against the entity frame's distinct keys. A feature row whose key is not in the
    entity frame gets -1 (it can never be joined). ``left`` holds the entity rows' codes until
    :meth:`detach_left` hands them over.
    """

    def __init__(self, keys: pd.Series) -> None:
        import numpy as np
        import pandas as pd

        self._numeric = pd.api.types.is_integer_dtype(keys.dtype) and not keys.isna().any()
        values = keys.to_numpy()
        if self._numeric and len(values):
            low, high = int(values.min()), int(values.max())
            if high - low < 4 * len(values) + 1_000_000:
                self._low, self.count = low, high - low + 1
                self.left: np.ndarray | None = (values - low).astype(np.int64)
                return
        self._numeric = False
        codes, uniques = pd.factorize(keys, sort=True)  # codes follow the stored key order
        self._index = pd.Index(uniques)
        self.count = len(uniques)
        self.left = codes.astype(np.int64)

    def detach_left(self) -> np.ndarray:
        """The entity rows' codes, no longer kept here."""
        left, self.left = self.left, None
        assert left is not None
        return left

    def right(self, keys: np.ndarray) -> np.ndarray:
        import numpy as np

        if self._numeric:
            if not np.issubdtype(keys.dtype, np.integer):
                keys = self._as_int(keys)
            codes = keys.astype(np.int64) - self._low
            codes[(codes < 0) | (codes >= self.count)] = -1
            return codes
        index = self._index
        if np.issubdtype(keys.dtype, np.number) != _is_numeric_index(index):
            # a key stored as text but given as a number (or the reverse): compare as text
            return index.astype(str).get_indexer(keys.astype(str)).astype(np.int64)
        return index.get_indexer(keys).astype(np.int64)

    @staticmethod
    def _as_int(keys: np.ndarray) -> np.ndarray:
        import numpy as np
        import pandas as pd

        numbers = pd.to_numeric(pd.Series(keys), errors="coerce").to_numpy(dtype="float64")
        whole = np.isfinite(numbers) & (numbers == np.round(numbers))
        return np.where(whole, numbers, np.iinfo(np.int64).min // 2).astype(np.int64)


def _is_numeric_index(index: Any) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(index.dtype))


def _key_columns(keys: pd.Series, left_us: np.ndarray, views: Sequence[FeatureView],
                 list_files: ListFiles, read_columns: ReadColumns,
                 n_rows: int) -> dict[str, np.ndarray]:
    """The point-in-time feature columns of ``views`` (which share one join key)."""
    codes = _EntityCodes(keys)
    left_codes = codes.detach_left()
    usable = (left_codes >= 0) & (left_us != NAT_US)
    if not usable.any():
        return {n: _missing(n_rows) for v in views for n in v.feature_names}
    needles = _Needles(left_codes, left_us, usable, codes.count, max(v.ttl_days for v in views))
    del left_codes, usable
    features: dict[str, np.ndarray] = {}
    for view in views:
        features.update(_view_columns(view, needles, codes, list_files, read_columns, n_rows))
    return features


def _missing(n_rows: int) -> np.ndarray:
    import numpy as np

    return np.full(n_rows, np.nan)


class _Needles:
    """The entity rows that can be joined, shared by the views of one key.

    When (code, time) packs into one int64 (``compact``), only the packed keys sorted once
    (``keys``) and their entity rows (``rows``) are kept; otherwise the rows with their codes
    and times, for the exact (slower) path. Also the time range in reach.
    """

    def __init__(self, left_codes: np.ndarray, left_us: np.ndarray, usable: np.ndarray,
                 code_count: int, max_ttl_days: int) -> None:
        import numpy as np

        every = bool(usable.all())  # the common case: no row selection to copy
        rows = np.arange(len(usable)) if every else np.flatnonzero(usable)
        times = left_us.copy() if every else left_us[rows]
        self.t_min, self.t_max = int(times.min()), int(times.max())
        self.base = self.t_min - max_ttl_days * DAY_US
        self.span = self.t_max - self.base + 1
        self.compact = code_count * self.span < 2**62
        if self.compact:
            times -= self.base
            combined = (left_codes if every else left_codes[rows]) * self.span
            combined += times
            del times
            order = np.argsort(combined)
            self.keys = combined[order]
            del combined
            self.rows = rows[order].astype(np.int32 if len(left_us) < 2**31 else np.int64)
        else:
            self.rows, self.codes, self.times = rows, left_codes[rows], times


def _view_columns(view: FeatureView, needles: _Needles, codes: _EntityCodes,
                  list_files: ListFiles, read_columns: ReadColumns,
                  n_rows: int) -> dict[str, np.ndarray]:
    """The point-in-time feature columns of one view, from the partitions in reach."""
    first = EPOCH_DATE + dt.timedelta(days=(needles.t_min - view.ttl_days * DAY_US) // DAY_US)
    last = EPOCH_DATE + dt.timedelta(days=needles.t_max // DAY_US)
    files = list_files(view, first, last)
    target = source = None
    if files:
        offsets, target, source = _chosen_rows(view, files, needles, codes, read_columns)
    if target is None or not len(target):
        log.info("point-in-time join: view %s, 0 of %d rows found", view.name, n_rows)
        return {name: _missing(n_rows) for name in view.feature_names}
    log.info("point-in-time join: view %s, %d of %d rows found", view.name, len(target), n_rows)
    pick, used = _pick(target, source, int(offsets[-1]), n_rows)
    del target, source
    parts = _used_rows(view, files, offsets, used, read_columns)
    return {name: _gather(view, name, parts, pick) for name in view.feature_names}


def _chosen_rows(view: FeatureView, files: Sequence[Path], needles: _Needles,
                 codes: _EntityCodes,
                 read_columns: ReadColumns) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Match, keys and times only: which stored row each entity row gets.

    Returns the files' row offsets (``len(files) + 1`` of them), the entity rows that get a
    value (``target``) and, for each, the stored row's index over all files (``source``).
    """
    import numpy as np
    import pyarrow as pa

    us_parts, code_parts = [], []
    for path in files:
        part = read_columns(path, [view.join_key, FEATURE_TIMESTAMP])
        stamps = part.column(FEATURE_TIMESTAMP).cast(pa.timestamp("us", tz="UTC"))
        us_parts.append(stamps.cast(pa.int64()).to_numpy())
        code_parts.append(codes.right(part.column(view.join_key).to_numpy()))
    offsets = np.cumsum([0, *(len(u) for u in us_parts)])
    right_us, right_codes = np.concatenate(us_parts), np.concatenate(code_parts)
    del us_parts, code_parts
    keep = np.flatnonzero((right_codes >= 0) & (right_us > needles.base)
                          & (right_us <= needles.t_max))
    if len(keep) < len(right_us):
        right_codes, right_us = right_codes[keep], right_us[keep]
    match = _match_compact if needles.compact else _match_exact
    target, source = match(needles, right_us, right_codes, view.ttl_days * DAY_US)
    if len(keep) < offsets[-1]:
        source = keep[source]
    return offsets, target, source


def _match_compact(needles: _Needles, right_us: np.ndarray, right_codes: np.ndarray,
                   ttl_us: int) -> tuple[np.ndarray, np.ndarray]:
    """For each entity row, the newest stored row of its key at or before its time and within
    ``ttl_us``: the entity rows that have one and the index of that row in ``right_*``.

    Stored rows lie in ``(base, t_max]`` and ``base`` is at least the longest ttl before every
    entity time, so a packed stored key in ``(key - ttl_us, key]`` has the same entity: one
    comparison checks the entity and the ttl together.
    """
    import numpy as np

    combined = right_codes * needles.span
    combined += right_us
    combined -= needles.base
    # Partitions are stored sorted by (key, time) and codes follow the key order, so
    # this is a merge of a few sorted runs (timsort), not a full sort.
    order = np.argsort(combined, kind="stable")
    right_sorted = combined[order]
    del combined
    position = np.searchsorted(right_sorted, needles.keys, side="right")
    position -= 1
    found = position >= 0
    np.maximum(position, 0, out=position)
    found &= right_sorted[position] > needles.keys - ttl_us
    return needles.rows[found], order[position[found]]


def _match_exact(needles: _Needles, right_us: np.ndarray, right_codes: np.ndarray,
                 ttl_us: int) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_match_compact`, combining codes with the rank of the time instead."""
    import numpy as np

    times = np.unique(np.concatenate([right_us, needles.times]))
    right_combined = right_codes * len(times) + np.searchsorted(times, right_us)
    order = np.argsort(right_combined, kind="stable")
    right_sorted = right_combined[order]
    needles_all = needles.codes * len(times) + np.searchsorted(times, needles.times)
    needle_order = np.argsort(needles_all)
    position = np.searchsorted(right_sorted, needles_all[needle_order], side="right") - 1
    candidate = order[np.maximum(position, 0)]
    good = (
        (position >= 0)
        & (right_codes[candidate] == needles.codes[needle_order])
        & (right_us[candidate] > needles.times[needle_order] - ttl_us)
    )
    return needles.rows[needle_order][good], candidate[good]


def _pick(target: np.ndarray, source: np.ndarray, n_stored: int,
          n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored rows chosen at least once (``used``, ascending) and, per entity row, the
    position of its row among them (``pick``; ``len(used)`` where none: the missing slot)."""
    import numpy as np

    chosen = np.zeros(n_stored, dtype=bool)
    chosen[source] = True
    used = np.flatnonzero(chosen)
    position = np.cumsum(chosen, dtype=np.intp)
    del chosen
    pick = np.full(n_rows, len(used), dtype=np.intp)
    pick[target] = position[source] - 1
    return pick, used


def _used_rows(view: FeatureView, files: Sequence[Path], offsets: np.ndarray, used: np.ndarray,
               read_columns: ReadColumns) -> list[tuple[Path, pa.Table]]:
    """The feature columns of the ``used`` stored rows, per file in order (files with none
    are left out)."""
    import numpy as np
    import pyarrow as pa

    bounds = np.searchsorted(used, offsets)
    parts = []
    for index, path in enumerate(files):
        local = used[bounds[index] : bounds[index + 1]] - offsets[index]
        if len(local):
            table = read_columns(path, view.feature_names)
            parts.append((path, table.take(pa.array(local))))
    return parts


def _gather(view: FeatureView, name: str, parts: Sequence[tuple[Path, pa.Table]],
            pick: np.ndarray) -> np.ndarray:
    """One output column: ``float64`` for numbers, ``object`` otherwise (a feature with no
    value anywhere is all ``NaN``), taken through ``pick``."""
    import numpy as np
    import pyarrow as pa

    pieces = [(path, table.column(name)) for path, table in parts]
    typed = [(path, column) for path, column in pieces if not pa.types.is_null(column.type)]
    if not typed:
        return _missing(len(pick))
    numeric = [_is_numeric_type(column.type) for _, column in typed]
    if numeric[0]:
        if not all(numeric):
            path, column = typed[numeric.index(False)]
            raise ValueError(
                f"view '{view.name}': feature '{name}' is numeric in some partitions "
                f"and {column.type} in {path.parent.name}"
            )
        values = np.full(sum(len(c) for _, c in pieces) + 1, np.nan)
        for start, column in _placed(pieces):
            if not pa.types.is_null(column.type):
                values[start : start + len(column)] = column.cast(pa.float64()).to_numpy(
                    zero_copy_only=False)
        return values.take(pick)
    if all(_is_text_type(column.type) for _, column in typed):
        return _text_values([column for _, column in pieces]).take(pick)
    values = np.full(sum(len(c) for _, c in pieces) + 1, None, dtype=object)
    for start, column in _placed(pieces):
        if not pa.types.is_null(column.type):
            values[start : start + len(column)] = column.to_numpy(zero_copy_only=False)
    return values.take(pick)


def _placed(pieces: Sequence[tuple[Path, pa.ChunkedArray]]) -> list[tuple[int, Any]]:
    """Each piece's column with its first position in the concatenation."""
    start, placed = 0, []
    for _, column in pieces:
        placed.append((start, column))
        start += len(column)
    return placed


def _text_values(columns: Sequence[pa.ChunkedArray]) -> np.ndarray:
    """Text columns concatenated as an ``object`` array plus a trailing ``None``, each
    distinct text one shared ``str`` (through a dictionary)."""
    import numpy as np
    import pyarrow as pa

    chunks = [chunk for column in columns
              for chunk in column.cast(pa.large_string()).chunks]
    encoded = pa.chunked_array(chunks, type=pa.large_string()).combine_chunks()
    encoded = encoded.dictionary_encode()
    labels = encoded.dictionary.to_numpy(zero_copy_only=False)
    lookup = np.append(labels, None).astype(object)
    codes = encoded.indices.fill_null(len(labels)).to_numpy(zero_copy_only=False)
    return lookup.take(np.append(codes, len(labels)))


def _is_numeric_type(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind)
                or pa.types.is_boolean(kind))


def _is_text_type(kind: pa.DataType) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind))
