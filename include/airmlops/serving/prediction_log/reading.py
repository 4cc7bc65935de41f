"""Choosing a backend from the settings, and reading a time window of the log.

:func:`read_predictions` and :func:`read_labels` return a window as a DataFrame, from either
backend (the monitoring DAG reads the log through them); :func:`read_shadow_pairs` joins a
window's live predictions with the shadow rows of the same requests. pandas is imported only
when a window is read, so the model service does not load it for the writer.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airmlops.serving.prediction_log.backend import LogBackend
from airmlops.serving.prediction_log.records import (
    LABEL_COLUMNS,
    PREDICTION_COLUMNS,
    SHADOW_PAIR_COLUMNS,
    Observer,
    check_pipeline,
)
from airmlops.serving.prediction_log.redis_backend import (
    RedisLogBackend,
    read_redis_rows,
    shadow_stream_key,
    stream_keys,
)
from airmlops.serving.prediction_log.shadow import SHADOW_BUFFER_MAX, ShadowBackend
from airmlops.serving.prediction_log.spill import spill_dir_path
from airmlops.serving.prediction_log.sqlite import (
    SqliteLogBackend,
    read_sqlite_predictions,
    read_sqlite_rows,
    sqlite_log_path,
)
from airmlops.serving.prediction_log.writer import PredictionLog
from airmlops.times import epoch_us, utc

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.settings import PredictionLogSettings, Settings

FEATURE_READ_COLUMNS = ("request_id", "position", "ts", "model_version", "entity_id", "features",
                        "prediction", "probability")
"""What :func:`read_prediction_features` reads of the SQLite log (never ``inputs``)."""
SHADOW_MARGIN_US = 300 * 1_000_000
"""How far a shadow row's ``ts`` (the challenger's clock, when the mirrored copy reached it)
may be from its live row's: :func:`read_shadow_pairs` reads shadow rows this much beyond
either end of the window, then keeps those whose live row is in the window."""

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
    return SqliteLogBackend(sqlite_log_path(settings.data_root, pipeline),
                            shadow_maxlen=log_settings.stream_maxlen)


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


def open_shadow_log(pipeline: str, settings: Settings, *,
                    log_settings: PredictionLogSettings | None = None,
                    observer: Observer | None = None) -> PredictionLog:
    """A :class:`PredictionLog` of shadow rows (:mod:`.shadow`) on a backend connection of its
    own: no spill directory, at most ``SHADOW_BUFFER_MAX`` entries in memory (best-effort)."""
    log_settings = log_settings or settings.prediction_log
    return PredictionLog(ShadowBackend(open_backend(pipeline, settings, log_settings)),
                         buffer_size=min(log_settings.buffer_size, SHADOW_BUFFER_MAX),
                         batch_size=log_settings.batch_size,
                         linger=log_settings.linger_ms / 1000.0, observer=observer,
                         spill_dir=None, spill_max_bytes=0)


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


def _read_rows(pipeline: str, table: str, columns: Sequence[str], start_us: int,
               end_us: int, settings: Settings | None,
               log_settings: PredictionLogSettings | None,
               parse_stream: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """The rows of ``table`` (``predictions``, ``labels`` or ``shadow_predictions``) with
    ``start_us <= ts < end_us``, from the backend the settings choose; ``parse_stream`` turns
    a Redis entry's text fields into values."""
    from airmlops.settings import get_settings

    settings = settings or get_settings()
    url = log_redis_url(settings, log_settings)
    if url:
        predictions_key, labels_key = stream_keys(pipeline)
        key = {"predictions": predictions_key, "labels": labels_key,
               "shadow_predictions": shadow_stream_key(pipeline)}[table]
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
    rows = _read_rows(pipeline, "predictions", PREDICTION_COLUMNS, *_window(pipeline, start, end),
                      settings, log_settings, _parse_stream_prediction)
    return _prediction_frame(rows)


@dataclass(frozen=True)
class PredictionFeatures:
    """A window of predictions as columns: ``keys`` has the log's columns but ``inputs`` and
    ``features`` (``ts`` a UTC timestamp, ``probability`` NaN for regression), ``features``
    one column per asked feature name, its logged value (None where a row has none)."""

    keys: pd.DataFrame
    features: pd.DataFrame


def _key_frame(columns: dict[str, list[Any]]) -> pd.DataFrame:
    """SQLite prediction columns as :func:`read_predictions` types them."""
    import pandas as pd

    keys = pd.DataFrame(columns)
    keys["ts"] = pd.to_datetime(keys["ts"].astype("int64"), unit="us", utc=True)
    keys["position"] = keys["position"].astype("int64")
    keys["prediction"] = keys["prediction"].astype("float64")
    keys["probability"] = pd.to_numeric(keys["probability"], errors="coerce")
    return keys


def read_prediction_features(pipeline: str, start: dt.datetime, end: dt.datetime,
                             names: Sequence[str], *, settings: Settings | None = None,
                             log_settings: PredictionLogSettings | None = None
                             ) -> PredictionFeatures:
    """Predictions with ``start <= ts < end`` (time order, each (request_id, position) once)
    with the logged features ``names``, column by column.

    The rows are those of :func:`read_predictions`; from SQLite only the needed columns are
    read, the ``features`` JSON of the whole window is parsed in one call and the inputs JSON
    not at all.
    """
    import pandas as pd

    from airmlops.settings import get_settings

    settings = settings or get_settings()
    if log_redis_url(settings, log_settings):
        frame = read_predictions(pipeline, start, end, settings=settings,
                                 log_settings=log_settings)
        rows = list(frame["features"])
        keys = frame.drop(columns=["inputs", "features"])
    else:
        columns = read_sqlite_predictions(sqlite_log_path(settings.data_root, pipeline),
                                          FEATURE_READ_COLUMNS, *_window(pipeline, start, end))
        texts = columns.pop("features")
        rows = json.loads(f"[{','.join(texts)}]") if texts else []
        del texts
        keys = _key_frame(columns) if rows else _empty_frame(list(columns))
    if not all(type(row) is dict for row in rows):
        rows = [row if isinstance(row, dict) else {} for row in rows]
    features = pd.DataFrame(
        {name: pd.Series([row.get(name) for row in rows], dtype=None if rows else object)
         for name in names}, index=pd.RangeIndex(len(rows)))
    return PredictionFeatures(keys=keys.reset_index(drop=True), features=features)


def read_labels(pipeline: str, start: dt.datetime, end: dt.datetime, *,
                settings: Settings | None = None,
                log_settings: PredictionLogSettings | None = None) -> pd.DataFrame:
    """Labels received with ``start <= ts < end`` (columns ``LABEL_COLUMNS``), the latest per
    (request_id, entity_id)."""
    rows = _read_rows(pipeline, "labels", LABEL_COLUMNS, *_window(pipeline, start, end),
                      settings, log_settings, _parse_stream_label)
    return _label_frame(rows)


def read_shadow_pairs(pipeline: str, start: dt.datetime, end: dt.datetime, *,
                      labels_end: dt.datetime | None = None, settings: Settings | None = None,
                      log_settings: PredictionLogSettings | None = None) -> pd.DataFrame:
    """Live predictions with ``start <= ts < end`` beside the shadow rows of the same
    ``(request_id, position)`` (columns ``SHADOW_PAIR_COLUMNS``), one row per pair.

    ``ts`` is the live row's; a shadow row whose entity differs from the live row's is no pair
    of it. ``label`` is the latest label of ``(request_id, entity_id)`` received in
    ``[start, labels_end)`` (``labels_end`` defaults to ``end``), NaN when none arrived.
    """
    start_us, end_us = _window(pipeline, start, end)
    labels_end_us = end_us if labels_end is None else _window(pipeline, start, labels_end)[1]
    live = _prediction_frame(_read_rows(
        pipeline, "predictions", PREDICTION_COLUMNS, start_us, end_us, settings, log_settings,
        _parse_stream_prediction))
    shadow = _prediction_frame(_read_rows(
        pipeline, "shadow_predictions", PREDICTION_COLUMNS, start_us - SHADOW_MARGIN_US,
        end_us + SHADOW_MARGIN_US, settings, log_settings, _parse_stream_prediction))
    labels = _label_frame(_read_rows(
        pipeline, "labels", LABEL_COLUMNS, start_us, labels_end_us, settings, log_settings,
        _parse_stream_label))
    return _pair_frame(live, shadow, labels)


def _pair_frame(live: pd.DataFrame, shadow: pd.DataFrame, labels: pd.DataFrame
                ) -> pd.DataFrame:
    """Live and shadow prediction frames joined on (request_id, position, entity_id), with the
    label of (request_id, entity_id) where there is one; in the live rows' time order."""
    keys = ["request_id", "position", "entity_id"]
    sides = []
    for frame, side in ((live, "live"), (shadow, "shadow")):
        part = frame[[*keys, "ts", "model_version", "prediction", "probability"]].rename(
            columns={"model_version": f"{side}_version", "prediction": f"{side}_prediction",
                     "probability": f"{side}_probability"})
        sides.append(part.astype({"request_id": str, "entity_id": str, "position": "int64"}))
    pairs = sides[0].merge(sides[1].drop(columns="ts"), on=keys, how="inner")
    known = labels[["request_id", "entity_id", "label"]].astype(
        {"request_id": str, "entity_id": str, "label": "float64"})
    pairs = pairs.merge(known, on=["request_id", "entity_id"], how="left")
    pairs = pairs.astype({"live_prediction": "float64", "live_probability": "float64",
                          "shadow_prediction": "float64", "shadow_probability": "float64",
                          "label": "float64"})
    pairs = pairs.sort_values(["ts", "request_id", "position"], kind="stable")
    return pairs[list(SHADOW_PAIR_COLUMNS)].reset_index(drop=True)
