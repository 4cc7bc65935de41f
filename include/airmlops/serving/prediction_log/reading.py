"""Choosing a backend from the settings, and reading a time window of the log.

:func:`read_predictions` and :func:`read_labels` return a window as a DataFrame, from either
backend (the monitoring DAG reads the log through them). pandas is imported only when a window
is read, so the model service does not load it for the writer.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from airmlops.serving.prediction_log.backend import LogBackend
from airmlops.serving.prediction_log.records import (
    LABEL_COLUMNS,
    PREDICTION_COLUMNS,
    Observer,
    check_pipeline,
)
from airmlops.serving.prediction_log.redis_backend import (
    RedisLogBackend,
    read_redis_rows,
    stream_keys,
)
from airmlops.serving.prediction_log.spill import spill_dir_path
from airmlops.serving.prediction_log.sqlite import (
    SqliteLogBackend,
    read_sqlite_rows,
    sqlite_log_path,
)
from airmlops.serving.prediction_log.writer import PredictionLog
from airmlops.times import epoch_us, utc

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.settings import PredictionLogSettings, Settings


def log_redis_url(settings: Settings, log_settings: PredictionLogSettings | None = None
                  ) -> str | None:
    """The Redis URL of the log (its own setting, else the platform's), or None for SQLite."""
    log_settings = log_settings or settings.prediction_log
    return log_settings.redis_url or settings.redis_url


def open_backend(pipeline: str, settings: Settings,
                 log_settings: PredictionLogSettings | None = None) -> LogBackend:
    """The backend the settings choose for ``pipeline``: Redis Streams or the SQLite file."""
    log_settings = log_settings or settings.prediction_log
    url = log_redis_url(settings, log_settings)
    if url:
        return RedisLogBackend(url, pipeline, maxlen=log_settings.stream_maxlen,
                               label_window_s=log_settings.label_window_days * 86_400)
    return SqliteLogBackend(sqlite_log_path(settings.data_root, pipeline))


def open_log(pipeline: str, settings: Settings, *,
             log_settings: PredictionLogSettings | None = None,
             observer: Observer | None = None) -> PredictionLog:
    """A :class:`PredictionLog` writing to the backend the settings choose, spilling to
    ``<data_root>/prediction-log/spill/<pipeline>/`` while it is down (unless
    ``spill_max_bytes`` is 0)."""
    log_settings = log_settings or settings.prediction_log
    spill_dir = spill_dir_path(settings.data_root, pipeline) \
        if log_settings.spill_max_bytes else None
    return PredictionLog(open_backend(pipeline, settings, log_settings),
                         buffer_size=log_settings.buffer_size,
                         batch_size=log_settings.batch_size,
                         linger=log_settings.linger_ms / 1000.0, observer=observer,
                         spill_dir=spill_dir, spill_max_bytes=log_settings.spill_max_bytes)


def _window(pipeline: str, start: dt.datetime, end: dt.datetime) -> tuple[int, int]:
    """The half-open window ``[start, end)`` in epoch microseconds; naive bounds and an end
    before the start are refused."""
    check_pipeline(pipeline)
    start_us = epoch_us(utc(start, "the window start"))
    end_us = epoch_us(utc(end, "the window end"))
    if end_us < start_us:
        raise ValueError(f"window end {end} is before its start {start}")
    return start_us, end_us


def _parse_stream_prediction(row: dict[str, Any]) -> None:
    """Turn the text fields of a Redis prediction entry into numbers (in place)."""
    row["position"] = int(row["position"])
    row["prediction"] = float(row["prediction"])
    row["probability"] = float(row["probability"]) if row["probability"] else None


def _parse_stream_label(row: dict[str, Any]) -> None:
    """Turn the label of a Redis label entry into a number (in place)."""
    row["label"] = float(row["label"])


def _read_rows(pipeline: str, table: str, columns: Sequence[str], start: dt.datetime,
               end: dt.datetime, settings: Settings | None,
               log_settings: PredictionLogSettings | None,
               parse_stream: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """The rows of ``table`` (``predictions`` or ``labels``) in the window, from the backend
    the settings choose; ``parse_stream`` turns a Redis entry's text fields into values."""
    from airmlops.settings import get_settings

    settings = settings or get_settings()
    start_us, end_us = _window(pipeline, start, end)
    url = log_redis_url(settings, log_settings)
    if url:
        predictions_key, labels_key = stream_keys(pipeline)
        key = predictions_key if table == "predictions" else labels_key
        rows = read_redis_rows(url, key, columns, start_us, end_us)
        for row in rows:
            parse_stream(row)
        return rows
    return read_sqlite_rows(sqlite_log_path(settings.data_root, pipeline), table, columns,
                            start_us, end_us)


def _empty_frame(columns: Sequence[str]) -> pd.DataFrame:
    """A frame with ``columns`` and no rows (``ts`` a UTC timestamp column)."""
    import pandas as pd

    frame = pd.DataFrame({c: pd.Series(dtype="object") for c in columns})
    frame["ts"] = pd.Series(dtype="datetime64[us, UTC]")
    return frame


def _prediction_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Prediction rows as a frame: each (request_id, position) once, in time order."""
    import pandas as pd

    if not rows:
        return _empty_frame(PREDICTION_COLUMNS)
    frame = pd.DataFrame.from_records(rows, columns=list(PREDICTION_COLUMNS))
    frame = frame.drop_duplicates(["request_id", "position"], keep="first")
    frame = frame.sort_values(["ts", "request_id", "position"], kind="stable")
    frame["inputs"] = frame["inputs"].map(json.loads)
    frame["features"] = frame["features"].map(json.loads)
    frame["ts"] = pd.to_datetime(frame["ts"].astype("int64"), unit="us", utc=True)
    frame["position"] = frame["position"].astype("int64")
    frame["prediction"] = frame["prediction"].astype("float64")
    frame["probability"] = pd.to_numeric(frame["probability"], errors="coerce")
    return frame.reset_index(drop=True)


def _label_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Label rows as a frame: the latest per (request_id, entity_id), in time order."""
    import pandas as pd

    if not rows:
        return _empty_frame(LABEL_COLUMNS)
    frame = pd.DataFrame.from_records(rows, columns=list(LABEL_COLUMNS))
    frame = frame.sort_values("ts", kind="stable")
    frame = frame.drop_duplicates(["request_id", "entity_id"], keep="last")
    frame["label"] = frame["label"].astype("float64")
    frame["ts"] = pd.to_datetime(frame["ts"].astype("int64"), unit="us", utc=True)
    return frame.reset_index(drop=True)


def read_predictions(pipeline: str, start: dt.datetime, end: dt.datetime, *,
                     settings: Settings | None = None,
                     log_settings: PredictionLogSettings | None = None) -> pd.DataFrame:
    """Predictions with ``start <= ts < end`` as a DataFrame (columns ``PREDICTION_COLUMNS``).

    ``ts`` is a UTC timestamp; ``inputs`` and ``features`` are dicts; ``probability`` is NaN
    for regression. Rows are in time order, each (request_id, position) once.
    """
    rows = _read_rows(pipeline, "predictions", PREDICTION_COLUMNS, start, end, settings,
                      log_settings, _parse_stream_prediction)
    return _prediction_frame(rows)


def read_labels(pipeline: str, start: dt.datetime, end: dt.datetime, *,
                settings: Settings | None = None,
                log_settings: PredictionLogSettings | None = None) -> pd.DataFrame:
    """Labels received with ``start <= ts < end`` (columns ``LABEL_COLUMNS``), the latest per
    (request_id, entity_id)."""
    rows = _read_rows(pipeline, "labels", LABEL_COLUMNS, start, end, settings, log_settings,
                      _parse_stream_label)
    return _label_frame(rows)
