"""The memory the in-memory point-in-time join needs, estimated and checked before it starts.

The memory engine (:func:`airmlops.features.offline.get_historical_features`) holds the entity
frame's keys and times, every result column and, per view, the key and time of the stored rows
in reach plus one partition's features at a time. Its peak is estimated from the 8-byte cells
of both sides: ``1.15 x entity cells + 0.73 x stored cells``, where entity cells are rows x
(features + keys + time) and stored cells are rows in reach x (features + key + time). The
factors are fitted to ``benchmarks/results/scale_offline.md`` (3 views of 3M stored rows,
14 + 2 on-demand features; peaks 492, 824 and 1,916 MB at 1M, 3M and 10M entity rows; the
estimate gives 492, 808 and 1,913 MB). A join whose estimate exceeds
:data:`MEMORY_SHARE` of the available memory is refused before it starts, with the way out:
``feature_store.offline_engine: duckdb``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from airmlops.errors import NonRetryable
from airmlops.features.compute import DAY_US, NAT_US, to_epoch_us
from airmlops.features.definitions import FeatureView
from airmlops.features.offline import partition_files
from airmlops.times import EPOCH_DATE

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.features.definitions import OnDemandFeature

ENTITY_FACTOR = 1.15
"""Peak bytes per 8-byte cell of the entity side (keys, times, result columns)."""
STORED_FACTOR = 0.73
"""Peak bytes per 8-byte cell of the stored rows in reach (keys, times, features)."""
MEMORY_SHARE = 0.6
"""The share of the available memory one join may take."""
CELL_BYTES = 8
MB = 1024 * 1024


class JoinTooLarge(MemoryError, NonRetryable):
    """The in-memory join would not fit; the message names the engine that spills."""


def available_memory_mb(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """``MemAvailable`` of the machine in MB (None when unknown, e.g. no ``/proc``)."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return None


@dataclass(frozen=True)
class JoinEstimate:
    """The cells of both sides of a join and its estimated peak."""

    entity_rows: int
    entity_cells: int
    stored_rows: int
    stored_cells: int

    @property
    def peak_mb(self) -> float:
        return (ENTITY_FACTOR * self.entity_cells + STORED_FACTOR * self.stored_cells) \
            * CELL_BYTES / MB


def _stored_rows(files: Sequence[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(path).metadata.num_rows for path in files)


def estimate_join(entity_df: pd.DataFrame, views: Sequence[FeatureView], root: Path,
                  pipeline: str, *, timestamp_column: str,
                  on_demand: Sequence[OnDemandFeature] = ()) -> JoinEstimate:
    """The size of the join of ``entity_df`` with ``views`` (row counts from Parquet footers)."""
    times = to_epoch_us(entity_df[timestamp_column])
    times = times[times != NAT_US]
    keys = {v.join_key for v in views}
    features = sum(len(v.feature_names) for v in views) + len(on_demand)
    stored_rows = stored_cells = 0
    if len(times):
        last = EPOCH_DATE + dt.timedelta(days=int(times.max()) // DAY_US)
        for view in views:
            first = EPOCH_DATE + dt.timedelta(
                days=(int(times.min()) - view.ttl_days * DAY_US) // DAY_US)
            rows = _stored_rows(partition_files(view, root, pipeline, start=first, end=last))
            stored_rows += rows
            stored_cells += rows * (2 + len(view.feature_names))
    rows = len(entity_df)
    return JoinEstimate(entity_rows=rows, entity_cells=rows * (features + len(keys) + 1),
                        stored_rows=stored_rows, stored_cells=stored_cells)


def check_join_fits(estimate: JoinEstimate, available_mb: float,
                    share: float = MEMORY_SHARE) -> None:
    """Refuse (:class:`JoinTooLarge`) a join whose estimated peak exceeds ``share`` of
    ``available_mb``; the message says what to use instead."""
    budget = available_mb * share
    if estimate.peak_mb <= budget:
        return
    raise JoinTooLarge(
        f"the in-memory point-in-time join of {estimate.entity_rows:,} entity rows with "
        f"{estimate.stored_rows:,} stored rows needs about {estimate.peak_mb:,.0f} MB, more "
        f"than {share:.0%} of the {available_mb:,.0f} MB available. Set "
        "'feature_store.offline_engine: duckdb' in the spec (it spills to disk under the data "
        "root); for more than one machine, run the join with Spark through Airflow's Apache "
        "Spark provider (see docs/features.md, 'Engines')."
    )
