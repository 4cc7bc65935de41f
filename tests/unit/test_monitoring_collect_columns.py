"""Collecting a window from the SQLite log column by column gives the rows of the row path.

The log holds features of every shape a request can carry (integers, floats, booleans, text,
nulls, absent keys, an input logged as text in one row and as a number in another, a column
that is null in one time slice), in the order the writer does not sort; the column path
(``read_prediction_features``, written slice by slice as row groups) must give the frame of
``flatten_predictions(read_predictions(...))`` row for row, and the collected Parquet file
must hold the same.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd

from airmlops.monitoring.collect import (
    flatten_prediction_columns,
    flatten_predictions,
    write_window_predictions,
)
from airmlops.serving.prediction_log import read_prediction_features, read_predictions
from airmlops.serving.prediction_log.records import PredictionRecord
from airmlops.serving.prediction_log.sqlite import SqliteLogBackend, sqlite_log_path
from airmlops.settings import Settings
from airmlops.spec import parse_spec

SPEC = parse_spec({
    "name": "collect", "task": "binary_classification", "source": {"kind": "simulator"},
    "entity_key": "customer_id", "timestamp": "event_timestamp", "label": "churned",
    "features": [
        {"name": "plan", "type": "categorical"}, {"name": "code", "type": "categorical"},
        {"name": "active", "type": "boolean"}, {"name": "age", "type": "numeric"},
        {"name": "spend", "type": "numeric"}, {"name": "late", "type": "categorical"},
    ],
    "estimator": {"class_path": "sklearn.linear_model.LogisticRegression"},
    "gates": {"primary_metric": "roc_auc"},
})
START = dt.datetime(2026, 6, 1, 10, tzinfo=dt.UTC)
END = START + dt.timedelta(hours=1)


def features_of(i: int, rng: np.random.Generator) -> dict:
    pick = rng.integers(0, 6)
    row = {
        "plan": ["basic", "gold", None, 3, 2.5, True][pick],
        "code": [1, 2, 7, None, "1", 1.0][rng.integers(0, 6)],
        "active": [True, False, 1, 0, "true", None][rng.integers(0, 6)],
        "age": [30, 41.5, None, "52", "n/a", True][rng.integers(0, 6)],
        "spend": float(rng.normal(10, 3)),
        "late": None if i < 400 else f"v{i % 3}",  # null in the first slices only
    }
    if rng.random() < 0.1:
        del row["spend"]
    return row


def write_log(data_root: Path, rows: int) -> None:
    rng = np.random.default_rng(5)
    stamps = rng.integers(int(START.timestamp() * 1e6), int(END.timestamp() * 1e6), rows)
    stamps[:40] = stamps[40]  # identical timestamps: order by request id, then position
    records = []
    for i in range(rows):
        features = features_of(int(stamps[i] - stamps.min()) // 4_000_000, rng)
        records.append(PredictionRecord(
            request_id=f"r{rng.integers(0, 10**6):06d}-{i}", position=int(i % 3),
            ts_us=int(stamps[i]), model_version=str(1 + i % 2), entity_id=f"e{i}",
            inputs={"raw": i}, features=features, prediction=float(i % 2),
            probability=None if i % 17 == 0 else float(rng.random())))
    backend = SqliteLogBackend(sqlite_log_path(data_root, SPEC.name))
    try:
        backend.write(records, [])
    finally:
        backend.close()


def test_column_read_gives_the_row_read_frame(tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path, redis_url=None)
    write_log(tmp_path, 1_000)
    rows = flatten_predictions(read_predictions(SPEC.name, START, END, settings=settings), SPEC)
    read = read_prediction_features(SPEC.name, START, END, SPEC.input_names, settings=settings)
    columns = flatten_prediction_columns(read.keys, read.features, SPEC)
    pd.testing.assert_frame_equal(columns, rows)
    assert rows["plan"].isna().any() and (rows["code"] == "1").any()


def test_collected_parquet_holds_the_row_read_frame(tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path, redis_url=None)
    write_log(tmp_path, 1_000)
    expected = flatten_predictions(read_predictions(SPEC.name, START, END, settings=settings),
                                   SPEC)
    path = tmp_path / "window" / "predictions.parquet"
    keys = write_window_predictions(SPEC, START, END, settings, path)
    written = pd.read_parquet(path)
    assert len(written) == 1_000
    pd.testing.assert_frame_equal(written, expected, check_dtype=False)
    pd.testing.assert_frame_equal(keys, expected[list(keys.columns)])


def test_empty_window_is_written_with_its_schema(tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path, redis_url=None)
    path = tmp_path / "window" / "predictions.parquet"
    keys = write_window_predictions(SPEC, START, END, settings, path)
    written = pd.read_parquet(path)
    assert len(keys) == 0 and len(written) == 0
    assert list(written.columns) == ["ts", "request_id", "entity_id", "position",
                                     "model_version", "prediction", *SPEC.input_names]
