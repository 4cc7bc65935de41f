"""A window read from its Parquet file in two streamed passes, never whole in memory.

A big window (ten million rows of twenty inputs) does not fit a monitoring worker as one pandas
frame, and its report needs only two things from all of its rows: exact data quality counts and
a fixed-size drift sample. So :func:`scan_window`

1. reads the time column alone and picks the sample's row positions
   (:func:`~airmlops.monitoring.sampling.stratified_positions`: the rows
   :func:`~airmlops.monitoring.sampling.stratified_sample` would take from the whole frame);
2. reads the model inputs and the prediction batch by batch (Arrow record batches of
   ``batch_rows`` rows), adds each batch's quality counts
   (:func:`~airmlops.monitoring.quality.count_arrow`) and keeps the batch's sampled rows.

Memory is bounded by the time column, one batch and the sample; the numbers are those of the
whole frame: the same counts, the same sample, so the same drift statistics.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.monitoring.quality import column_rules, count_arrow, shares_from_counts
from airmlops.monitoring.sampling import stratified_positions

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.monitoring.config import MonitoringConfig
    from airmlops.monitoring.reference import ReferenceProfile
    from airmlops.spec import PipelineSpec

BATCH_ROWS = 262_144
"""Rows per streamed batch: a few tens of MB of twenty inputs."""


@dataclass(frozen=True)
class WindowScan:
    """What a window's report needs of all of its rows: the row count, the first and last
    timestamp, the quality shares and the drift sample (None below ``min_rows``)."""

    rows: int
    first: dt.datetime | None
    last: dt.datetime | None
    quality: dict[str, dict[str, float]]
    sample: pd.DataFrame | None
    sample_seconds: float = 0.0
    """The time of the first pass (the time column and the sample's positions)."""


def _stamps(path: Path, ts_column: str) -> Any:
    """The time column as pandas reads it with the whole frame (UTC timestamps)."""
    import pandas as pd
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=[ts_column]).column(0).to_pandas()
    return pd.Series(pd.to_datetime(column, utc=True))


def _bound(stamps: Any, pick: str) -> dt.datetime | None:
    value = getattr(stamps, pick)()
    return None if value is None or value != value else value.to_pydatetime()


def scan_window(path: Path | str, reference: ReferenceProfile, spec: PipelineSpec,
                config: MonitoringConfig, *, seed: int, ts_column: str,
                prediction_column: str, batch_rows: int = BATCH_ROWS) -> WindowScan:
    """Stream the window's Parquet file once for its time column, once for its inputs."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    clock = time.perf_counter()
    path = Path(path)
    parquet = pq.ParquetFile(path)
    names = set(parquet.schema_arrow.names)
    if ts_column not in names:
        raise ValueError(f"the window frame lacks its timestamp column '{ts_column}'")
    rows = parquet.metadata.num_rows
    stamps = _stamps(path, ts_column)
    first, last = _bound(stamps, "min"), _bound(stamps, "max")
    positions = None
    if rows >= config.min_rows:
        positions = stratified_positions(pd.DatetimeIndex(stamps).asi8, config.sample_size,
                                         seed, strata=config.strata)
    del stamps
    sample_seconds = time.perf_counter() - clock
    rules = column_rules(reference, spec)
    counts = {rule.name: (0, 0) for rule in rules}
    read = [rule.name for rule in rules if rule.name in names]
    if prediction_column in names and prediction_column not in read:
        read.append(prediction_column)
    wanted = np.sort(positions) if positions is not None else np.empty(0, dtype=np.int64)
    taken: list[Any] = []
    offset = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=read):
        for rule in rules:
            if rule.name in names:
                present, flagged = count_arrow(batch.column(rule.name), rule)
                before = counts[rule.name]
                counts[rule.name] = (before[0] + present, before[1] + flagged)
        low, high = np.searchsorted(wanted, [offset, offset + batch.num_rows])
        if high > low:
            taken.append(batch.take(pa.array(wanted[low:high] - offset)))
        offset += batch.num_rows
    sample = None
    if positions is not None:
        table = (pa.Table.from_batches(taken) if taken
                 else parquet.schema_arrow.empty_table().select(read))
        in_file_order = table.to_pandas()
        sample = in_file_order.iloc[np.searchsorted(wanted, positions)].reset_index(drop=True)
    quality = shares_from_counts(rows, counts, rules, spec, config)
    return WindowScan(rows=rows, first=first, last=last, quality=quality, sample=sample,
                      sample_seconds=sample_seconds)
