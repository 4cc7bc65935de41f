"""A window streamed from its Parquet file gives the numbers of the whole frame.

Random windows with nulls, out-of-range values, unknown categories, cells that are no number
and a boolean input written as 1/0, in many small row groups and read in batches that cut
across them: the streamed quality counts equal the whole-frame ones exactly, and so does the
whole report (same sample, same drift statistics).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airmlops.monitoring.config import MonitoringConfig
from airmlops.monitoring.drift import compute_window_report
from airmlops.monitoring.quality import quality_shares
from airmlops.monitoring.reference import summarize_reference
from airmlops.monitoring.sampling import window_seed
from airmlops.monitoring.window_scan import scan_window
from airmlops.spec import parse_spec

SPEC = parse_spec({
    "name": "stream", "task": "binary_classification", "source": {"kind": "simulator"},
    "entity_key": "customer_id", "timestamp": "event_timestamp", "label": "churned",
    "features": [
        {"name": "plan", "type": "categorical", "values": ["basic", "premium"]},
        {"name": "city", "type": "categorical"},
        {"name": "age", "type": "numeric", "min": 18, "max": 100},
        {"name": "spend", "type": "numeric"},
        {"name": "count", "type": "numeric", "min": 0},
        {"name": "text_number", "type": "numeric", "min": 0, "max": 10},
        {"name": "active", "type": "boolean"},
    ],
    "estimator": {"class_path": "sklearn.linear_model.LogisticRegression"},
    "gates": {"primary_metric": "roc_auc"},
})
CONFIG = MonitoringConfig(sample_size=400, reference_sample_size=400, min_rows=50)


def random_window(rows: int, seed: int, *, drift: float = 0.0) -> pd.DataFrame:
    """Model inputs with every kind of defect, a prediction and a timestamp."""
    rng = np.random.default_rng(seed)

    def with_nulls(values: np.ndarray, share: float) -> np.ndarray:
        values = values.astype(object)
        values[rng.random(rows) < share] = None
        return values

    plans = np.array(["basic", "premium", "gold"], dtype=object)  # "gold": new with drift
    cities = np.array([f"city{i}" for i in range(30)], dtype=object)
    age = rng.normal(50 + drift * 20, 20, rows)
    age[rng.random(rows) < 0.05] = np.nan
    spend = rng.lognormal(3 + drift, 1, rows)
    spend[rng.random(rows) < 0.1] = np.nan
    text = np.array([str(v) for v in rng.integers(-3, 14, rows)], dtype=object)
    text[rng.random(rows) < 0.03] = "n/a"  # no number: counted as missing
    text[rng.random(rows) < 0.03] = None
    start = pd.Timestamp("2026-05-01", tz="UTC")
    stamps = start + pd.to_timedelta(np.sort(rng.integers(0, 86_400, rows)), unit="s")
    return pd.DataFrame({
        "plan": with_nulls(plans[rng.integers(0, 3 if drift else 2, rows)], 0.02),
        "city": with_nulls(cities[rng.integers(0, 25 + int(drift * 5), rows)], 0.04),
        "age": age,
        "spend": spend,
        "count": pd.array(with_nulls(np.where(rng.random(rows) < 0.05, -1,
                                              rng.poisson(3, rows)), 0.02), dtype="Int64"),
        "text_number": text,
        "active": pd.array(np.where(rng.random(rows) < 0.05, None, rng.integers(0, 2, rows)),
                           dtype="Int64"),
        "prediction": rng.random(rows),
        "ts": stamps,
    })


@pytest.fixture(scope="module")
def reference():
    return summarize_reference(random_window(5_000, 1).rename(columns={"ts": "event_timestamp"}),
                               SPEC, CONFIG)


def write_row_groups(frame: pd.DataFrame, path: Path, row_group_rows: int) -> Path:
    frame.to_parquet(path, index=False, row_group_size=row_group_rows)
    return path


@pytest.mark.parametrize(("rows", "batch_rows"), [(9_973, 1_000), (3_000, 4_096), (600, 7)])
def test_streamed_quality_counts_equal_the_whole_frame(tmp_path: Path, reference, rows: int,
                                                       batch_rows: int) -> None:
    window = random_window(rows, 2 + rows, drift=0.5)
    path = write_row_groups(window, tmp_path / "window.parquet", rows // 6)
    whole = quality_shares(pd.read_parquet(path), reference, SPEC, CONFIG)
    scan = scan_window(path, reference, SPEC, CONFIG, seed=3, ts_column="ts",
                       prediction_column="prediction", batch_rows=batch_rows)
    assert scan.quality == whole
    assert scan.rows == rows
    flagged = {name: entry.get("out_of_range_share", entry.get("new_category_share"))
               for name, entry in whole.items()}
    assert all(entry["missing_share"] > 0 for entry in whole.values())
    assert flagged["plan"] > 0 and flagged["age"] > 0 and flagged["count"] > 0
    assert flagged["text_number"] > 0 and flagged["active"] == 0.0


def test_streamed_report_equals_the_whole_frame_report(tmp_path: Path, reference) -> None:
    window = random_window(12_345, 5, drift=1.0)
    path = write_row_groups(window, tmp_path / "window.parquet", 2_000)
    whole = compute_window_report(reference, pd.read_parquet(path), None, SPEC, CONFIG,
                                  window_id="w1")
    streamed = compute_window_report(reference, path, None, SPEC, CONFIG, window_id="w1")
    assert streamed.quality == whole.quality
    assert streamed.columns == whole.columns
    assert streamed.prediction_drift == whole.prediction_drift
    assert (streamed.rows, streamed.sampled, streamed.start, streamed.end) == (
        whole.rows, whole.sampled, whole.start, whole.end)
    assert streamed.breaches == whole.breaches
    assert streamed.drift_share == whole.drift_share and whole.drift_share > 0


def test_streamed_sample_is_the_whole_frame_sample(tmp_path: Path, reference) -> None:
    from airmlops.monitoring.sampling import stratified_sample

    window = random_window(6_000, 8)
    shuffled = window.sample(frac=1.0, random_state=4).reset_index(drop=True)
    path = write_row_groups(shuffled, tmp_path / "window.parquet", 777)
    seed = window_seed(CONFIG.seed, "w2")
    scan = scan_window(path, reference, SPEC, CONFIG, seed=seed, ts_column="ts",
                       prediction_column="prediction", batch_rows=1_000)
    expected = stratified_sample(pd.read_parquet(path), "ts", CONFIG.sample_size, seed,
                                 strata=CONFIG.strata)
    pd.testing.assert_frame_equal(scan.sample, expected[scan.sample.columns])
    assert scan.first == window["ts"].min().to_pydatetime()
    assert scan.last == window["ts"].max().to_pydatetime()


def test_streamed_window_below_min_rows_has_no_sample(tmp_path: Path, reference) -> None:
    path = write_row_groups(random_window(30, 9), tmp_path / "small.parquet", 10)
    scan = scan_window(path, reference, SPEC, CONFIG, seed=1, ts_column="ts",
                       prediction_column="prediction")
    assert scan.sample is None and scan.rows == 30
    assert scan.first is not None and scan.first.tzinfo == dt.UTC
