"""A pipeline's feature store, end to end: the glue between a spec and the store modules.

- :func:`build_offline` computes the feature views for a range of days from the pipeline's
  events and profiles and writes them to the offline store (idempotent per day).
- :func:`training_frame` joins a raw batch with its point-in-time features (training sets),
  by the engine the spec names (:func:`historical_features`).
- :func:`materialize_online` copies new offline rows to the online store (watermarked).
- :func:`online_rows` is the serving path: one online read for all entities of a request and
  the on-demand features by the same code as training, as plain rows (no pandas per request);
  :func:`online_inputs` turns them into the model's input frame.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from airmlops.features.compute import compute_view
from airmlops.features.definitions import FEATURE_TIMESTAMP
from airmlops.features.offline import get_historical_features, partition_dates, write_view_rows
from airmlops.features.on_demand import apply_on_demand
from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)


def _store(spec: PipelineSpec):
    if spec.feature_store is None:
        raise ValueError(f"pipeline {spec.name} has no feature_store in its spec")
    return spec.feature_store


def _read_table(spec: PipelineSpec, pattern: str, data_root: Path, field: str) -> pd.DataFrame:
    from airmlops.data.sources import read_files

    return read_files(pattern, data_root, field=field, entity_key=spec.entity_key)


def load_events(spec: PipelineSpec, start: dt.date, end: dt.date, data_root: Path,
                scenario: str | None = None) -> pd.DataFrame:
    """Activity events with ``event_timestamp`` in the days ``[start, end)``."""
    store = _store(spec)
    if spec.source.kind == "simulator":
        from airmlops.data.simulator import simulate_events

        return simulate_events(spec.source, start, end, scenario=scenario)
    frame = _read_table(spec, store.events_path, data_root, "feature_store.events_path")
    stamps = pd.to_datetime(frame[FEATURE_TIMESTAMP], utc=True)
    begin = pd.Timestamp(start, tz="UTC")
    stop = pd.Timestamp(end, tz="UTC")
    return frame[(stamps >= begin) & (stamps < stop)].reset_index(drop=True)


def load_profiles(spec: PipelineSpec, data_root: Path) -> pd.DataFrame:
    """Profile rows stamped with the time they became valid (``event_timestamp``)."""
    store = _store(spec)
    if spec.source.kind == "simulator":
        from airmlops.data.simulator import simulate_profiles

        profiles = simulate_profiles(spec.source)
        return profiles.rename(columns={"signup_date": FEATURE_TIMESTAMP})
    return _read_table(spec, store.profiles_path, data_root, "feature_store.profiles_path")


def build_offline(spec: PipelineSpec, start: dt.date, end: dt.date, data_root: Path,
                  *, scenario: str | None = None) -> dict[str, int]:
    """Compute every view for the days ``[start, end)`` and write their partitions.

    Event windows need history before ``start``: the events read start ``max_window`` days
    earlier. Rewriting a day gives identical partitions, so a re-run changes nothing.
    """
    store = _store(spec)
    last_day = end - dt.timedelta(days=1)
    days = [start + dt.timedelta(days=i) for i in range((end - start).days)]
    written: dict[str, int] = {}
    event_views = [v for v in store.views if v.source == "events"]
    if event_views:
        lookback = max(v.max_window_days for v in event_views)
        started = time.perf_counter()
        events = load_events(spec, start - dt.timedelta(days=lookback), end, data_root,
                             scenario=scenario)
        log.info("features %s: %d events read for %s..%s", spec.name, len(events), start, last_day)
        for view in event_views:
            rows = compute_view(events, view, timestamp_column=FEATURE_TIMESTAMP,
                                start=start, end=last_day)
            write_view_rows(rows, view, data_root, spec.name, days=days)
            written[view.name] = len(rows)
        elapsed = time.perf_counter() - started
        total = sum(written.values())
        log.info("features %s: %d event-view rows in %.1fs (%.0f rows/s)", spec.name, total,
                 elapsed, total / elapsed if elapsed else 0.0)
    for view in (v for v in store.views if v.source == "profiles"):
        profiles = load_profiles(spec, data_root)
        rows = compute_view(profiles, view, timestamp_column=FEATURE_TIMESTAMP)
        write_view_rows(rows, view, data_root, spec.name)
        written[view.name] = len(rows)
        log.info("features %s: %d rows of profile view %s", spec.name, len(rows), view.name)
    return written


def offline_days_present(spec: PipelineSpec, data_root: Path) -> set[dt.date]:
    """Days present in every events view of the offline store."""
    views = [v for v in _store(spec).views if v.source == "events"]
    if not views:
        return set()
    present = [set(partition_dates(data_root, spec.name, v)) for v in views]
    return set.intersection(*present)


def ensure_offline(spec: PipelineSpec, start: dt.date, end: dt.date, data_root: Path) -> int:
    """Build the offline days in ``[start, end)`` that are missing; return how many were."""
    wanted = {start + dt.timedelta(days=i) for i in range((end - start).days)}
    missing = sorted(wanted - offline_days_present(spec, data_root))
    if not missing and any(v.source == "profiles" for v in _store(spec).views):
        profile_views = [v for v in _store(spec).views if v.source == "profiles"]
        missing_profiles = any(not partition_dates(data_root, spec.name, v)
                               for v in profile_views)
        if missing_profiles:
            build_offline(spec, end - dt.timedelta(days=1), end, data_root)
    if missing:
        build_offline(spec, missing[0], missing[-1] + dt.timedelta(days=1), data_root)
    return len(missing)


def training_frame(spec: PipelineSpec, batch: pd.DataFrame, data_root: Path) -> pd.DataFrame:
    """The batch (entity, time, label, request fields) with its point-in-time features.

    Every row of the batch comes back, in order; a feature with no qualifying value is null.
    """
    store = _store(spec)
    keep = [spec.entity_key, spec.timestamp, spec.label,
            *[f for f in store.request_fields if f in batch.columns and f != spec.timestamp]]
    entity_df = batch[list(dict.fromkeys(keep))]
    return historical_features(spec, entity_df, data_root)


def historical_features(spec: PipelineSpec, entity_df: pd.DataFrame, data_root: Path, *,
                        available_mb: float | None = None) -> pd.DataFrame:
    """The point-in-time join by the spec's ``feature_store.offline_engine``.

    ``memory`` first checks that the join fits (``available_mb``, default: the machine's
    available memory) and refuses it, naming ``duckdb``, when it would not; ``duckdb`` joins
    within a memory limit and spills to disk under ``data_root``.
    """
    store = _store(spec)
    arguments = {"timestamp_column": spec.timestamp, "on_demand": store.on_demand}
    if store.offline_engine == "duckdb":
        from airmlops.features.offline_duckdb import get_historical_features_duckdb

        return get_historical_features_duckdb(entity_df, store.views, data_root, spec.name,
                                              **arguments)
    from airmlops.features.join_memory import (
        available_memory_mb,
        check_join_fits,
        estimate_join,
    )

    estimate = estimate_join(entity_df, store.views, data_root, spec.name, **arguments)
    available = available_memory_mb() if available_mb is None else available_mb
    if available is not None:  # unknown (no /proc/meminfo): the join runs unchecked
        check_join_fits(estimate, available)
    return get_historical_features(entity_df, store.views, data_root, spec.name, **arguments)


def materialize_online(spec: PipelineSpec, data_root: Path, online_store: Any,
                       *, end: dt.datetime | None = None, full: bool = False) -> dict[str, int]:
    """Copy offline rows newer than each view's watermark to the online store."""
    from airmlops.features.materialize import materialize

    results = materialize(_store(spec).views, data_root, spec.name, online_store, end=end,
                          full=full)
    return {name: result.rows_written for name, result in results.items()}


@dataclass(frozen=True)
class OnlineRows:
    """A request's rows with their online and on-demand features (plain dicts, no pandas),
    and the entities the store does not know."""

    rows: list[dict[str, Any]]
    unknown: list[Any]


@dataclass(frozen=True)
class OnlineInputs:
    """The model's inputs for a request, and the entities the store does not know."""

    frame: pd.DataFrame
    unknown: list[Any]
    features: list[dict[str, Any]]


def online_rows(spec: PipelineSpec, online_store: Any, requests: Sequence[Mapping[str, Any]],
                *, as_of: dt.datetime | None = None) -> OnlineRows:
    """Request rows completed with their features: one online read for every entity and view
    of the batch, then the on-demand features (same functions as in training). Without a
    feature store the request rows are the inputs. The serving path: no DataFrame is built."""
    rows = [dict(row) for row in requests]
    store = spec.feature_store
    unknown: list[Any] = []
    if store is not None and store.views:
        key = spec.entity_key
        result = online_store.read(store.views, [row[key] for row in rows], as_of=as_of)
        unknown = list(result.missing)
        values = result.values
        for row in rows:
            row.update(values.get(row[key], {}))
    if store is not None and store.on_demand:
        rows = apply_on_demand(rows, store.on_demand)
    return OnlineRows(rows=rows, unknown=unknown)


def online_inputs(spec: PipelineSpec, online_store: Any, requests: Sequence[Mapping[str, Any]],
                  *, as_of: dt.datetime | None = None) -> OnlineInputs:
    """:func:`online_rows` as the model's input frame, in ``spec.input_names`` order."""
    from airmlops.training.model import feature_frame

    found = online_rows(spec, online_store, requests, as_of=as_of)
    rows = found.rows
    frame = feature_frame(spec, pd.DataFrame.from_records(rows, columns=_columns(spec, rows)))
    return OnlineInputs(frame=frame, unknown=found.unknown, features=rows)


def _columns(spec: PipelineSpec, rows: list[dict[str, Any]]) -> list[str]:
    names = list(dict.fromkeys([*spec.input_names, *(k for r in rows for k in r)]))
    return names
