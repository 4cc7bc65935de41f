"""Window reports on simulator data: drift, quality, performance, sampling and volume independence.

The frames come from airmlops.data.simulator (the raw features are the model inputs here); a
fixed logistic function of the features stands in for the champion's predictions.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from airmlops.data.simulator import simulate_observations
from airmlops.monitoring.config import MonitoringConfig
from airmlops.monitoring.drift import (
    WindowReport,
    compute_window_report,
    stratified_sample,
)
from airmlops.monitoring.reference import (
    PROFILE_FILE,
    SAMPLE_FILE,
    ReferenceError,
    load_reference,
    summarize_reference,
)
from airmlops.spec import SimulatorSource, parse_spec

FEATURES = [
    {"name": "plan", "type": "categorical", "values": ["basic", "standard", "premium"]},
    {"name": "region", "type": "categorical", "values": ["north", "south", "east", "west"]},
    {"name": "age", "type": "numeric", "min": 18, "max": 100},
    {"name": "tenure_days", "type": "numeric", "min": 0, "max": 3650},
    {"name": "monthly_fee", "type": "numeric", "min": 0, "max": 500},
    {"name": "sessions", "type": "numeric", "min": 0, "max": 200},
    {"name": "minutes_watched", "type": "numeric", "min": 0, "max": 1440,
     "max_null_fraction": 0.05},
    {"name": "support_tickets", "type": "numeric", "min": 0, "max": 50},
    {"name": "payment_failures", "type": "numeric", "min": 0, "max": 20},
]
SPEC = parse_spec({
    "name": "churn", "task": "binary_classification", "source": {"kind": "simulator"},
    "entity_key": "customer_id", "timestamp": "event_timestamp", "label": "churned",
    "features": FEATURES,
    "estimator": {"class_path": "sklearn.linear_model.LogisticRegression"},
    "gates": {"primary_metric": "roc_auc"},
})
CONFIG = MonitoringConfig(performance={"metric": "roc_auc", "min": 0.7, "min_labels": 200})
SHIFTED = {"sessions", "minutes_watched", "payment_failures"}  # by the covariate_drift scenario


def frame(customers: int, seed: int, start: dt.date, days: int,
          scenario: str = "stable") -> pd.DataFrame:
    """Simulator observations as a prediction log: inputs, prediction, request id, timestamp."""
    source = SimulatorSource(kind="simulator", customers=customers, seed=seed)
    data = simulate_observations(source, start, start + dt.timedelta(days=days), scenario)
    logit = -0.5 - 0.3 * np.log1p(data["sessions"].clip(lower=0)) + 0.8 * data["payment_failures"]
    data["prediction"] = 1.0 / (1.0 + np.exp(-logit))
    data["request_id"] = [f"{seed}-{i}" for i in range(len(data))]
    data["ts"] = data["event_timestamp"]
    return data


def labels_of(window: pd.DataFrame) -> pd.DataFrame:
    return window[["request_id", "churned"]]


def drifted(report: WindowReport) -> dict[str, bool | None]:
    return {name: result.drifted for name, result in report.columns.items()}


@pytest.fixture(scope="module")
def reference_frame() -> pd.DataFrame:
    return frame(60_000, 7, dt.date(2026, 2, 1), 14)  # ~100k rows


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory: pytest.TempPathFactory,
                  reference_frame: pd.DataFrame) -> Path:
    directory = tmp_path_factory.mktemp("reference")
    summarize_reference(reference_frame, SPEC, CONFIG, directory)
    return directory


@pytest.fixture(scope="module")
def reference(reference_dir: Path):
    return load_reference(reference_dir)


@pytest.fixture(scope="module")
def windows() -> dict[str, pd.DataFrame]:
    april = dt.date(2026, 4, 1)
    return {
        "stable_200k": frame(100_000, 11, april, 16),
        "drift_200k": frame(100_000, 13, april, 16, "covariate_drift"),
        "stable_10k": frame(5_000, 17, april, 16),
        "drift_10k": frame(5_000, 19, april, 16, "covariate_drift"),
    }


@pytest.fixture(scope="module")
def html_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("html")


@pytest.fixture(scope="module")
def reports(reference, windows, html_dir: Path) -> dict[str, WindowReport]:
    stable_10k = windows["stable_10k"]
    few_labels = labels_of(stable_10k).iloc[:50]
    return {
        "stable_200k": compute_window_report(
            reference, windows["stable_200k"], labels_of(windows["stable_200k"]), SPEC, CONFIG,
            window_id="stable_200k", html_path=html_dir / "stable_200k.html"),
        "drift_200k": compute_window_report(
            reference, windows["drift_200k"], None, SPEC, CONFIG, window_id="drift_200k"),
        "stable_10k": compute_window_report(
            reference, stable_10k, few_labels, SPEC, CONFIG, window_id="stable_10k"),
        "drift_10k": compute_window_report(
            reference, windows["drift_10k"], None, SPEC, CONFIG, window_id="drift_10k"),
    }


def test_windows_have_the_sizes_the_tests_claim(windows) -> None:
    assert 190_000 <= len(windows["stable_200k"]) <= 210_000
    assert 9_500 <= len(windows["stable_10k"]) <= 10_500


# --- drift -----------------------------------------------------------------------------------

def test_stable_data_against_itself_shows_no_drift(reference, reference_frame) -> None:
    report = compute_window_report(reference, reference_frame, None, SPEC, CONFIG,
                                   window_id="itself")
    assert report.sampled == CONFIG.sample_size
    assert report.drift_share == 0.0
    assert not any(drifted(report).values())
    assert all(r.score is not None and r.score < 0.05 for r in report.columns.values())
    assert report.prediction_drift.drifted is False
    assert report.breaches == []


def test_stable_traffic_of_a_later_period_shows_no_drift(reports) -> None:
    report = reports["stable_200k"]
    assert report.drift_share == 0.0 and report.breaches == []
    assert {r.method for r in report.columns.values()} == {"wasserstein", "jensenshannon"}


def test_covariate_drift_is_detected_on_the_shifted_columns(reports) -> None:
    report = reports["drift_200k"]
    assert {name for name, flag in drifted(report).items() if flag} == SHIFTED
    assert report.columns["sessions"].score > 0.3
    assert report.drift_share == pytest.approx(len(SHIFTED) / len(FEATURES))
    assert report.prediction_drift.drifted is True
    assert "drift_share" in report.breaches
    assert report.to_dict()["columns"]["sessions"]["drifted"] is True


def test_decisions_do_not_depend_on_window_volume(reports) -> None:
    for kind in ("stable", "drift"):
        small, large = reports[f"{kind}_10k"], reports[f"{kind}_200k"]
        assert small.sampled == large.sampled == CONFIG.sample_size
        assert drifted(small) == drifted(large), kind
        assert small.drift_share == large.drift_share, kind
        assert [b for b in small.breaches if b != "performance"] == [
            b for b in large.breaches if b != "performance"], kind


def test_critical_columns_breach_on_their_own(reference, windows) -> None:
    config = MonitoringConfig(
        drift={"columns": {"sessions": {"critical": True},
                           "age": {"method": "psi", "threshold": 0.2, "critical": True}}},
        policy={"max_drift_share": 0.9},
    )
    report = compute_window_report(reference, windows["drift_10k"], None, SPEC, config,
                                   window_id="critical")
    assert report.breaches == ["feature:sessions"]
    assert report.columns["age"].method == "psi" and report.columns["age"].drifted is False


def test_matches_evidently_full_data_drift_preset_at_100k_rows(reference, reference_frame,
                                                               windows) -> None:
    """Same frames: our sampled report vs Evidently's DataDriftPreset on every row."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    window = windows["drift_200k"].iloc[:100_000]
    started = time.perf_counter()
    ours = compute_window_report(reference, window, None, SPEC, CONFIG, window_id="w100k")
    ours_seconds = time.perf_counter() - started

    numeric = [*SPEC.numeric_features, "prediction"]
    categorical = SPEC.categorical_features
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=categorical)
    columns = numeric + categorical
    started = time.perf_counter()
    snapshot = Report([DataDriftPreset(num_method="wasserstein", num_threshold=0.1,
                                       cat_method="jensenshannon", cat_threshold=0.1)]).run(
        Dataset.from_pandas(window[columns], data_definition=definition),
        Dataset.from_pandas(reference_frame[columns], data_definition=definition))
    full_seconds = time.perf_counter() - started
    full = {m["config"]["column"]: m["value"] for m in snapshot.dict()["metrics"]
            if m["config"]["type"] == "evidently:metric_v2:ValueDrift"}

    assert {name: score >= 0.1 for name, score in full.items() if name != "prediction"} == (
        drifted(ours))
    assert bool(full["prediction"] >= 0.1) is ours.prediction_drift.drifted
    for name, result in ours.columns.items():
        assert result.score == pytest.approx(full[name], abs=0.05), name
    print(f"100k rows: sampled report {ours_seconds:.2f} s ({ours.seconds}), "
          f"full DataDriftPreset {full_seconds:.2f} s")
    assert ours_seconds < full_seconds


# --- data quality ----------------------------------------------------------------------------

def test_quality_breaches_on_a_recording_incident(reference) -> None:
    source = SimulatorSource(kind="simulator", customers=20_000, seed=23)
    day = dt.date(2026, 4, 1)
    window = simulate_observations(source, day, day + dt.timedelta(days=2), "data_quality")
    window["ts"] = window["event_timestamp"]
    window["prediction"] = 0.2
    window.loc[window.index[:100], "plan"] = "platinum"  # ~2 % unknown plan
    report = compute_window_report(reference, window, None, SPEC, CONFIG, window_id="incident")
    assert "monthly_fee" not in window.columns  # renamed to monthly_charge by the incident
    assert report.quality["monthly_fee"]["missing_share"] == 1.0
    assert 0.25 < report.quality["minutes_watched"]["missing_share"] < 0.35
    assert 0.01 < report.quality["sessions"]["out_of_range_share"] < 0.05
    assert report.quality["plan"]["new_category_share"] == pytest.approx(100 / len(window))
    assert report.quality["region"]["new_category_share"] == 0.0
    assert {"quality:missing:monthly_fee", "quality:missing:minutes_watched",
            "quality:out_of_range:sessions", "quality:out_of_range:age",
            "quality:new_category:plan"} <= set(report.breaches)
    assert not any(b.startswith("quality:") and b.endswith(":region") for b in report.breaches)
    assert report.columns["monthly_fee"].drifted is None
    assert any("monthly_fee" in note for note in report.notes)


def test_the_spec_null_fraction_raises_the_missing_limit(reference, windows) -> None:
    window = windows["stable_10k"].copy()
    window.loc[window.index[::25], "minutes_watched"] = np.nan  # 4 %: above 1 %, below 5 %
    config = MonitoringConfig(quality={"max_missing_share": 0.01}, min_rows=10**6)
    report = compute_window_report(reference, window, None, SPEC, config, window_id="nulls")
    assert report.quality["minutes_watched"]["max_missing_share"] == 0.05
    assert "quality:missing:minutes_watched" not in report.breaches
    strict = MonitoringConfig(quality={"columns": {"minutes_watched": {
        "max_missing_share": 0.01}}}, min_rows=10**6)
    report = compute_window_report(reference, window, None, SPEC, strict, window_id="nulls")
    assert "quality:missing:minutes_watched" in report.breaches


def test_an_empty_window_is_recorded_without_tests(reference) -> None:
    empty = pd.DataFrame({"ts": pd.Series([], dtype="datetime64[ns, UTC]"),
                          "prediction": pd.Series([], dtype=float)})
    start = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
    report = compute_window_report(reference, empty, None, SPEC, CONFIG, window_id="quiet",
                                    start=start, end=start + dt.timedelta(hours=1))
    assert (report.rows, report.sampled, report.drift_share, report.breaches) == (0, 0, None, [])
    assert report.html_path is None and report.start == start
    with pytest.raises(ValueError, match="start/end are required"):
        compute_window_report(reference, empty, None, SPEC, CONFIG, window_id="quiet")
    with pytest.raises(ValueError, match="window_id"):
        compute_window_report(reference, empty, None, SPEC, CONFIG, window_id="../x",
                              start=start, end=start)


def test_without_spec_bounds_the_reference_range_applies(reference, windows) -> None:
    unbounded = SPEC.model_copy(update={"features": [
        f.model_copy(update={"min": None, "max": None}) if f.name == "age" else f
        for f in SPEC.features]})
    window = windows["stable_10k"].copy()
    oldest = reference.columns["age"].max
    window.loc[window.index[:300], "age"] = oldest + 1  # 3 %: inside the spec's 18-100
    config = MonitoringConfig(min_rows=10**6)
    bounded = compute_window_report(reference, window, None, SPEC, config, window_id="a")
    assert bounded.quality["age"]["out_of_range_share"] == 0.0
    report = compute_window_report(reference, window, None, unbounded, config, window_id="a")
    assert report.quality["age"]["range_max"] == oldest
    assert report.quality["age"]["out_of_range_share"] == pytest.approx(300 / len(window))
    assert "quality:out_of_range:age" in report.breaches


# --- performance -----------------------------------------------------------------------------

def test_performance_is_computed_once_labels_have_arrived(reports, windows) -> None:
    report = reports["stable_200k"]
    assert report.label_count == len(windows["stable_200k"])
    performance = report.performance
    assert set(performance) == {"roc_auc", "precision", "recall", "rows"}
    assert performance["rows"] == CONFIG.sample_size  # labelled rows are sampled too
    assert 0.7 < performance["roc_auc"] < 0.85
    assert 0.0 < performance["precision"] <= 1.0 and 0.0 <= performance["recall"] <= 1.0
    assert "performance" not in report.breaches


def test_performance_is_absent_without_enough_labels(reports) -> None:
    without = reports["drift_200k"]
    assert without.performance is None and without.label_count == 0
    assert "performance not computed: no labels yet" in without.notes
    few = reports["stable_10k"]
    assert few.performance is None and few.label_count == 50
    assert "performance" not in few.breaches
    assert any("fewer than min_labels (200)" in note for note in few.notes)


def test_a_performance_floor_breach(reference, windows) -> None:
    window = windows["stable_10k"]
    inverted = labels_of(window).assign(churned=lambda f: 1 - f["churned"])
    config = MonitoringConfig(performance={"metric": "roc_auc", "min": 0.7}, min_rows=10**6)
    report = compute_window_report(reference, window, inverted, SPEC, config, window_id="bad")
    assert report.performance["roc_auc"] < 0.3
    assert report.breaches == ["performance"]
    assert report.sampled == 0 and report.drift_share is None  # below min_rows: not tested
    assert any("fewer than min_rows" in note for note in report.notes)


def test_labels_join_on_the_prediction_logs_keys(reference, windows) -> None:
    """Batch requests: several entities share a request id; labels are keyed by both."""
    from sklearn.metrics import roc_auc_score

    window = windows["stable_10k"].rename(columns={"prediction": "probability"})
    window["request_id"] = [f"r{i // 2}" for i in range(len(window))]  # two entities each
    window["entity_id"] = window["customer_id"]
    labels = window[["request_id", "entity_id", "churned"]].rename(columns={"churned": "label"})
    labels = labels.iloc[: 3000].astype({"label": float})
    labels = pd.concat([labels.assign(label=1.0 - labels["label"]), labels])  # later one wins
    config = MonitoringConfig(min_rows=10**6, performance={"min_labels": 100})
    report = compute_window_report(
        reference, window, labels, SPEC, config, window_id="batch",
        prediction_column="probability", label_keys=("request_id", "entity_id"),
        label_column="label")
    assert report.label_count == 3000
    expected = roc_auc_score(window["churned"].iloc[:3000], window["probability"].iloc[:3000])
    assert report.performance["roc_auc"] == pytest.approx(expected)


def test_regression_performance(tmp_path: Path) -> None:
    spec = SPEC.model_copy(update={"task": "regression", "label": "churned",
                                   "gates": SPEC.gates.model_copy(
                                       update={"primary_metric": "rmse"})})
    config = MonitoringConfig(performance={"metric": "rmse", "max": 0.1}, min_rows=10**6)
    data = frame(5_000, 29, dt.date(2026, 4, 1), 3)
    reference = summarize_reference(data, spec, config)
    error = np.random.default_rng(0).choice([0.3, 0.7], len(data))
    labels = data[["request_id"]].assign(churned=data["prediction"] + error)
    report = compute_window_report(reference, data, labels, spec, config, window_id="reg")
    assert report.performance["mae"] == pytest.approx(0.5, abs=0.02)
    assert report.performance["rmse"] == pytest.approx(np.sqrt((0.09 + 0.49) / 2), abs=0.02)
    assert report.breaches == ["performance"]
    # A constant error breaks Evidently's error plots: scikit-learn computes the numbers.
    constant = data[["request_id"]].assign(churned=data["prediction"] + 0.5)
    report = compute_window_report(reference, data, constant, spec, config, window_id="reg")
    assert report.performance["mae"] == pytest.approx(0.5)
    assert report.performance["rmse"] == pytest.approx(0.5)
    assert any("computed with scikit-learn" in note for note in report.notes)


# --- HTML and snapshot -----------------------------------------------------------------------

def test_html_report_and_snapshot_are_written(reports, html_dir: Path) -> None:
    from evidently.core.report import Snapshot

    report = reports["stable_200k"]
    html = html_dir / "stable_200k.html"
    assert report.html_path == str(html)
    text = html.read_text(encoding="utf-8")
    assert text.lstrip().lower().startswith("<html") or "<html" in text[:500].lower()
    assert "ROC Curve" in text  # the performance section is merged into the same file
    snapshot = Snapshot.loads((html_dir / "stable_200k.snapshot.json").read_text())
    types = {m["config"]["type"].rsplit(":", 1)[1] for m in snapshot.dict()["metrics"]}
    assert {"ValueDrift", "DriftedColumnsCount", "MissingValueCount", "RocAuc"} <= types
    assert not list(html_dir.glob(".*.tmp"))
    assert reports["drift_200k"].html_path is None
    json.dumps(report.to_dict())  # JSON-ready


# --- sampling --------------------------------------------------------------------------------

def _log(rows: int, seed: int = 0) -> pd.DataFrame:
    """``rows`` requests at distinct microseconds of one hour (a log's usual resolution)."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2026-04-01", tz="UTC")
    offsets = rng.choice(3_600_000_000, size=rows, replace=False)
    return pd.DataFrame({"timestamp": start + pd.to_timedelta(offsets, unit="us"),
                         "x": np.arange(rows)})


def test_sampling_is_deterministic_and_independent_of_row_order() -> None:
    window = _log(50_000)
    first = stratified_sample(window, "timestamp", 1000, seed=3)
    again = stratified_sample(window, "timestamp", 1000, seed=3)
    shuffled = stratified_sample(window.sample(frac=1.0, random_state=1), "timestamp", 1000,
                                 seed=3)
    other = stratified_sample(window, "timestamp", 1000, seed=4)
    assert len(first) == 1000 and first["x"].is_unique
    assert first["x"].tolist() == again["x"].tolist()
    assert sorted(first["x"]) == sorted(shuffled["x"])
    assert first["x"].tolist() != other["x"].tolist()
    assert first["timestamp"].is_monotonic_increasing


def test_sampling_gives_each_time_bucket_an_equal_share() -> None:
    hour = pd.Timestamp("2026-04-01", tz="UTC")
    rng = np.random.default_rng(0)
    seconds = np.concatenate([
        rng.integers(0, 55 * 60, 30_000),  # steady traffic for 55 minutes
        rng.integers(0, 60, 20_000),  # a burst in the first minute
        [3599, 3599, 3599],  # the last five minutes: three requests
    ])
    window = pd.DataFrame({"timestamp": hour + pd.to_timedelta(seconds, unit="s"),
                           "x": np.arange(len(seconds))})
    sample = stratified_sample(window, "timestamp", 1200, seed=0, strata=12)
    bucket = (sample["timestamp"] - hour) // pd.Timedelta(minutes=5)
    counts = np.bincount(bucket.to_numpy(dtype=int), minlength=12)
    assert counts.sum() == 1200
    assert counts[-1] == 3  # all it had; its unused share went to the others
    assert set(counts[:-1]) <= {108, 109}  # the burst does not get more than its share
    assert (sample["x"] >= 30_000).sum() < counts[0]  # burst rows only within bucket 0


def test_small_windows_come_back_whole_in_time_order_without_missing_times() -> None:
    window = _log(300)
    window.loc[[5, 7], "timestamp"] = pd.NaT
    sample = stratified_sample(window, "timestamp", 1000, seed=0)
    assert len(sample) == 298 and sample["timestamp"].is_monotonic_increasing
    with pytest.raises(ValueError):
        stratified_sample(window, "timestamp", 0, seed=0)


# --- reference -------------------------------------------------------------------------------

def test_reference_is_summarized_once_and_read_back(reference, reference_dir: Path,
                                                    reference_frame: pd.DataFrame) -> None:
    assert {p.name for p in reference_dir.iterdir()} == {PROFILE_FILE, SAMPLE_FILE}
    assert reference.rows == len(reference_frame)
    assert len(reference.sample) == CONFIG.reference_sample_size
    assert list(reference.sample.columns) == [*SPEC.input_names, "prediction"]
    age = reference.columns["age"]
    assert (age.min, age.max) == (reference_frame["age"].min(), reference_frame["age"].max())
    assert age.quantiles["0.5"] == pytest.approx(reference_frame["age"].median())
    assert set(reference.columns["plan"].categories) == {"basic", "standard", "premium"}
    assert sum(reference.columns["plan"].categories.values()) == pytest.approx(1.0)
    again = summarize_reference(reference_frame, SPEC, CONFIG)
    pd.testing.assert_frame_equal(again.sample, reference.sample)
    assert again.columns == reference.columns


def test_a_reference_that_does_not_match_its_sample_is_refused(
        reference_frame: pd.DataFrame, tmp_path: Path) -> None:
    small = reference_frame.iloc[:2000]
    summarize_reference(small, SPEC, CONFIG, tmp_path)
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / SAMPLE_FILE)
    with pytest.raises(ReferenceError, match="does not match the digest"):
        load_reference(tmp_path)
    with pytest.raises(ReferenceError, match="no reference profile"):
        load_reference(tmp_path / "absent")
    with pytest.raises(ReferenceError, match="lacks model inputs"):
        summarize_reference(small.drop(columns="age"), SPEC, CONFIG)
