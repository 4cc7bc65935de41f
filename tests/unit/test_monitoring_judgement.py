"""The judgement of a window from its numbers, apart from measuring it.

Each breach kind is decided from plain numbers; a recorded window is judged again under a
changed config without measuring it again; the former policy name ``drift_share`` still works;
performance alone is measured with an explicit function, not a sentinel ``min_rows``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from airmlops.monitoring.config import MonitoringConfig
from airmlops.monitoring.drift import (
    ColumnDriftResult,
    WindowMeasurement,
    WindowReport,
    measure_performance,
)
from airmlops.monitoring.judgement import (
    WindowNumbers,
    judge,
    quality_limit,
    rejudge_window,
)
from airmlops.monitoring.store import MonitoringStore
from airmlops.spec import parse_spec

SPEC = parse_spec({
    "name": "churn", "task": "binary_classification", "source": {"kind": "simulator"},
    "entity_key": "customer_id", "timestamp": "event_timestamp", "label": "churned",
    "features": [
        {"name": "plan", "type": "categorical", "values": ["basic", "premium"]},
        {"name": "sessions", "type": "numeric", "min": 0, "max": 200},
        {"name": "minutes", "type": "numeric", "max_null_fraction": 0.2},
    ],
    "estimator": {"class_path": "sklearn.linear_model.LogisticRegression"},
    "gates": {"primary_metric": "roc_auc"},
})
T0 = dt.datetime(2026, 6, 1, 10, tzinfo=dt.UTC)
CALM_QUALITY = {
    "plan": {"missing_share": 0.0, "new_category_share": 0.0},
    "sessions": {"missing_share": 0.0, "out_of_range_share": 0.0},
    "minutes": {"missing_share": 0.0, "out_of_range_share": 0.0},
}


def numbers(**changes: object) -> WindowNumbers:
    """A calm window's numbers (nothing drifted, clean data), with ``changes``."""
    calm = WindowNumbers(drift_share=0.0, drifted={"plan": False, "sessions": False,
                                                   "minutes": False},
                         prediction_drifted=False, performance={"roc_auc": 0.8},
                         label_count=500, quality=CALM_QUALITY)
    return dataclasses.replace(calm, **changes)


# --- each breach kind from numbers -------------------------------------------------------------

def test_a_calm_window_has_no_breach() -> None:
    config = MonitoringConfig(performance={"metric": "roc_auc", "min": 0.7})
    assert judge(numbers(), config, SPEC).breaches == []


def test_drift_share_breaches_at_the_policy_maximum() -> None:
    config = MonitoringConfig(policy={"max_drift_share": 0.3})
    assert judge(numbers(drift_share=0.29), config, SPEC).breaches == []
    judgement = judge(numbers(drift_share=0.3), config, SPEC)
    assert judgement.breaches == ["drift_share"]
    assert "policy.max_drift_share (0.3)" in judgement.reasons["drift_share"]
    assert judge(numbers(drift_share=None), config, SPEC).breaches == []  # not tested


def test_a_drifted_critical_column_breaches_alone() -> None:
    drifted = {"plan": False, "sessions": True, "minutes": True}
    config = MonitoringConfig(drift={"columns": {"sessions": {"critical": True}}},
                              policy={"max_drift_share": 0.9})
    judgement = judge(numbers(drift_share=2 / 3, drifted=drifted), config, SPEC)
    assert judgement.breaches == ["feature:sessions"]
    assert judgement.reasons["feature:sessions"] == "critical column 'sessions' drifted"


def test_prediction_drift_breaches_only_when_the_config_says_so() -> None:
    drifted = numbers(prediction_drifted=True)
    assert judge(drifted, MonitoringConfig(), SPEC).breaches == []
    config = MonitoringConfig(drift={"prediction": {"breach": True}})
    assert judge(drifted, config, SPEC).breaches == ["prediction_drift"]
    assert judge(numbers(prediction_drifted=None), config, SPEC).breaches == []


def test_performance_breaches_past_its_floor_with_enough_labels() -> None:
    config = MonitoringConfig(performance={"metric": "roc_auc", "min": 0.7, "min_labels": 200})
    poor = numbers(performance={"roc_auc": 0.6})
    judgement = judge(poor, config, SPEC)
    assert judgement.breaches == ["performance"]
    assert "below performance.min (0.7)" in judgement.reasons["performance"]
    assert judge(dataclasses.replace(poor, label_count=199), config, SPEC).breaches == []
    assert judge(numbers(performance=None), config, SPEC).breaches == []
    assert judge(poor, MonitoringConfig(), SPEC).breaches == []  # no metric: report only
    errors = MonitoringConfig(performance={"metric": "rmse", "max": 2.0})
    assert judge(numbers(performance={"rmse": 2.5}), errors, SPEC).breaches == ["performance"]


def test_quality_breaches_above_each_limit() -> None:
    quality = {
        "plan": {"missing_share": 0.0, "new_category_share": 0.02},
        "sessions": {"missing_share": 0.06, "out_of_range_share": 0.02},
        "minutes": {"missing_share": 0.15, "out_of_range_share": 0.0},  # spec allows 0.2
    }
    judgement = judge(numbers(quality=quality), MonitoringConfig(), SPEC)
    assert judgement.breaches == ["quality:missing:sessions", "quality:new_category:plan",
                                  "quality:out_of_range:sessions"]
    assert "above the limit 0.05" in judgement.reasons["quality:missing:sessions"]
    # without the spec, only the config's limits apply
    assert "quality:missing:minutes" in judge(numbers(quality=quality), MonitoringConfig()
                                              ).breaches
    own = MonitoringConfig(quality={"columns": {"minutes": {"max_missing_share": 0.1}}})
    assert quality_limit(own, SPEC, "minutes", "missing") == 0.1
    assert quality_limit(MonitoringConfig(), SPEC, "minutes", "missing") == 0.2


def test_the_judgement_of_a_report_ignores_its_recorded_breaches() -> None:
    report = window_report(drift_share=0.5, breaches=[])
    config = MonitoringConfig(policy={"max_drift_share": 0.3})
    assert judge(WindowNumbers.from_report(report), config, SPEC).breaches == ["drift_share"]


# --- re-judging a recorded window --------------------------------------------------------------

def window_report(*, drift_share: float, breaches: list[str]) -> WindowReport:
    drifted = {"plan": False, "sessions": True, "minutes": drift_share > 0.4}
    columns = {name: ColumnDriftResult("wasserstein", 0.1, 0.3 if flag else 0.01, flag)
               for name, flag in drifted.items()}
    return WindowReport(
        window_id="20260601T1000-20260601T1100", start=T0, end=T0 + dt.timedelta(hours=1),
        rows=5000, sampled=5000, columns=columns, drift_share=drift_share,
        prediction_drift=ColumnDriftResult("wasserstein", 0.1, 0.02, False),
        quality=CALM_QUALITY, performance=None, label_count=0, breaches=breaches)


def test_a_changed_threshold_rejudges_a_recorded_window_without_measuring(tmp_path) -> None:
    recorded_under = MonitoringConfig(policy={"max_drift_share": 0.3})
    report = window_report(drift_share=1 / 3, breaches=["drift_share"])
    assert judge(WindowNumbers.from_report(report), recorded_under, SPEC).breaches == (
        report.breaches)
    store = MonitoringStore(tmp_path)
    store.record_window("churn", report, created=T0)
    row = store.window("churn", report.window_id)
    assert row["breaches"] == ["drift_share"]

    assert rejudge_window(row, recorded_under, SPEC).breaches == ["drift_share"]
    laxer = MonitoringConfig(policy={"max_drift_share": 0.5})
    assert rejudge_window(row, laxer, SPEC).breaches == []
    critical = MonitoringConfig(policy={"max_drift_share": 0.5},
                                drift={"columns": {"sessions": {"critical": True}}})
    assert rejudge_window(row, critical, SPEC).breaches == ["feature:sessions"]
    assert store.window("churn", report.window_id)["breaches"] == ["drift_share"]  # unchanged


def test_a_row_without_numbers_is_refused() -> None:
    with pytest.raises(ValueError, match=r"lacks \['columns', 'label_count', 'quality'\]"):
        WindowNumbers.from_row({"drift_share": 0.5})


# --- the former name policy.drift_share ---------------------------------------------------------

def test_the_former_drift_share_name_is_moved_with_a_deprecation_note(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="airmlops.monitoring.config"):
        config = MonitoringConfig(policy={"drift_share": 0.4, "k": 1})
    assert config.policy.max_drift_share == 0.4
    assert "drift_share" not in config.policy.model_dump()
    (note,) = config.policy.deprecations
    assert "policy.drift_share is deprecated: rename it to policy.max_drift_share" in note
    assert note in caplog.text
    assert MonitoringConfig(policy={"max_drift_share": 0.4}).policy.deprecations == ()
    spec = parse_spec({**SPEC.model_dump(exclude={"monitoring"}),
                       "monitoring": {"policy": {"drift_share": 0.25}}})
    assert spec.monitoring.policy.max_drift_share == 0.25
    with pytest.raises(ValidationError, match="greater than 0"):
        MonitoringConfig(policy={"drift_share": 0})


def test_both_names_are_an_error_naming_both() -> None:
    with pytest.raises(ValidationError, match="set either max_drift_share or its deprecated "
                       "former name drift_share, not both"):
        MonitoringConfig(policy={"drift_share": 0.4, "max_drift_share": 0.5})


# --- performance alone, without a sentinel -----------------------------------------------------

def labelled_frame(rows: int, seed: int = 3) -> pd.DataFrame:
    """Predictions that labels arrived for: no model inputs, only keys, times and outcomes."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, rows)
    return pd.DataFrame({
        "ts": pd.date_range(T0, periods=rows, freq="1s", tz="UTC"),
        "request_id": [f"r{i}" for i in range(rows)],
        "entity_id": [f"c{i}" for i in range(rows)],
        "prediction": np.clip(0.3 * label + rng.uniform(0, 0.7, rows), 0, 1),
        "label": label,
    })


def test_performance_alone_is_measured_without_drift_or_quality(tmp_path) -> None:
    frame = labelled_frame(400)
    config = MonitoringConfig(performance={"metric": "roc_auc", "min": 0.99, "min_labels": 200})
    target = tmp_path / "w.performance.html"
    measured = measure_performance(
        frame, frame, SPEC, config, window_id="w", html_path=target,
        label_keys=("request_id", "entity_id"), label_column="label")
    assert isinstance(measured, WindowMeasurement)
    assert (measured.columns, measured.quality, measured.drift_share, measured.sampled) == (
        {}, {}, None, 0)
    assert measured.label_count == 400 and measured.rows == 400
    assert set(measured.performance) == {"roc_auc", "precision", "recall", "rows"}
    assert measured.html_path == str(target) and target.exists()
    assert not any("drift" in note for note in measured.notes)
    assert judge(WindowNumbers.from_report(measured), config, SPEC).breaches == ["performance"]

    few = measure_performance(frame.iloc[:50], frame.iloc[:50], SPEC, config, window_id="w",
                              label_keys=("request_id", "entity_id"), label_column="label")
    assert few.performance is None and few.label_count == 50 and few.html_path is None
    assert any("fewer than min_labels (200)" in note for note in few.notes)
