"""The CBPE estimate (:mod:`airmlops.monitoring.estimation`): the stored isotonic calibration
gives scikit-learn's numbers, the estimate agrees with the realized metrics when the scores are
calibrated, and bad input is refused with the field named."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression
from sklearn.metrics import accuracy_score, precision_score, recall_score, roc_auc_score

from airmlops.monitoring.estimation import (
    Calibration,
    EstimationError,
    estimate_performance,
    fit_calibration,
)


def _miscalibrated(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores whose true positive rate is score**2 (over-confident), and Bernoulli labels."""
    rng = np.random.default_rng(seed)
    scores = rng.beta(2.0, 3.0, n)
    return scores, (rng.random(n) < scores**2).astype(int)


def test_stored_calibration_predicts_as_sklearn_isotonic():
    scores, labels = _miscalibrated(5000, 1)
    calibration = fit_calibration(scores, labels, fitted_on="test rows")
    reloaded = Calibration.from_json(json.dumps(json.loads(calibration.to_json())))
    isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, labels)
    probe = np.r_[np.linspace(0.0, 1.0, 2001), scores[:500]]
    np.testing.assert_allclose(reloaded.apply(probe), isotonic.predict(probe), atol=1e-12)
    assert reloaded == calibration
    assert reloaded.rows == 5000 and reloaded.positives == int(labels.sum())


def test_estimate_matches_realized_metrics_on_calibrated_scores():
    rng = np.random.default_rng(7)
    n = 200_000
    scores = rng.beta(1.5, 4.0, n)
    labels = (rng.random(n) < scores).astype(int)
    identity = Calibration(x=(0.0, 1.0), y=(0.0, 1.0), rows=0, positives=0)
    estimate = estimate_performance(scores, identity, threshold=0.5)
    predicted = (scores >= 0.5).astype(int)
    realized = {"roc_auc": roc_auc_score(labels, scores),
                "accuracy": accuracy_score(labels, predicted),
                "precision": precision_score(labels, predicted),
                "recall": recall_score(labels, predicted)}
    for metric, value in realized.items():
        assert abs(getattr(estimate, metric) - value) <= 0.01, (metric, estimate, value)
    assert estimate.rows == n


def test_isotonic_calibration_repairs_overconfident_scores():
    scores, labels = _miscalibrated(100_000, 3)
    calibration = fit_calibration(scores[:50_000], labels[:50_000])
    estimate = estimate_performance(scores[50_000:], calibration)
    realized_auc = roc_auc_score(labels[50_000:], scores[50_000:])
    assert abs(estimate.roc_auc - realized_auc) <= 0.01
    uncalibrated = estimate_performance(
        scores[50_000:], Calibration(x=(0.0, 1.0), y=(0.0, 1.0), rows=0, positives=0))
    assert abs(uncalibrated.roc_auc - realized_auc) > 0.02  # why the calibration is needed


@pytest.mark.parametrize(("scores", "message"), [
    ([], "is empty"),
    ([0.2, float("nan")], "NaN"),
    ([0.2, 1.5], "outside \\[0, 1\\]"),
    ([-0.1, 0.4], "outside \\[0, 1\\]"),
])
def test_bad_scores_are_refused(scores, message):
    identity = Calibration(x=(0.0, 1.0), y=(0.0, 1.0), rows=0, positives=0)
    with pytest.raises(EstimationError, match=f"scores: .*{message}"):
        estimate_performance(scores, identity)


def test_bad_threshold_and_labels_are_refused():
    identity = Calibration(x=(0.0, 1.0), y=(0.0, 1.0), rows=0, positives=0)
    with pytest.raises(EstimationError, match="threshold"):
        estimate_performance([0.3], identity, threshold=1.0)
    with pytest.raises(EstimationError, match="both classes"):
        fit_calibration([0.1, 0.9], [1, 1])
    with pytest.raises(EstimationError, match="labels: must be 0/1"):
        fit_calibration([0.1, 0.9], [0, 2])


def test_single_class_window_has_no_auc():
    always = Calibration(x=(0.0, 1.0), y=(1.0, 1.0), rows=0, positives=0)
    estimate = estimate_performance([0.2, 0.7], always)
    assert estimate.roc_auc is None and estimate.accuracy == pytest.approx(0.5)
    assert estimate.recall == pytest.approx(0.5) and estimate.precision == pytest.approx(1.0)


def _window(estimated):
    import datetime as dt

    from airmlops.monitoring.measurement import WindowReport

    start = dt.datetime(2026, 6, 1, 10, tzinfo=dt.UTC)
    return WindowReport(
        window_id="20260601T1000-20260601T1100", start=start, end=start + dt.timedelta(hours=1),
        rows=500, sampled=500, columns={}, drift_share=0.0, prediction_drift=None, quality={},
        performance={"roc_auc": 0.71, "rows": 300}, label_count=300, breaches=[],
        estimated_performance=estimated)


def test_the_estimate_is_stored_and_logged_beside_the_realized_metric(tmp_path):
    from airmlops.monitoring.mlflow_report import _metrics_of
    from airmlops.monitoring.store import MonitoringStore

    estimated = {"roc_auc": 0.78, "accuracy": 0.8, "precision": 0.6, "recall": None,
                 "rows": 500}
    store = MonitoringStore(tmp_path)
    store.record_window("churn", _window(estimated), created=_window(None).end)
    row = store.window("churn", "20260601T1000-20260601T1100")
    assert row["estimated_performance"] == estimated
    assert row["performance"] == {"roc_auc": 0.71, "rows": 300}
    metrics = _metrics_of(_window(estimated))
    assert metrics["estimated_roc_auc"] == 0.78 and metrics["estimated_rows"] == 500
    assert "estimated_recall" not in metrics  # undefined, so not a number to log
    assert metrics["performance.roc_auc"] == 0.71
    absent = _metrics_of(_window(None))
    assert not any(key.startswith("estimated_") for key in absent)


def test_a_table_made_before_estimates_gains_the_column(tmp_path):
    import sqlite3

    from airmlops.monitoring.store import SCHEMA, MonitoringStore

    store = MonitoringStore(tmp_path)
    path = store.path("churn")
    path.parent.mkdir(parents=True)
    old_schema = SCHEMA.replace("    estimated_performance JSON,\n", "")
    assert old_schema != SCHEMA
    with sqlite3.connect(path) as connection:
        connection.executescript(old_schema)
    store.record_window("churn", _window(None), created=_window(None).end)
    assert store.window("churn", "20260601T1000-20260601T1100")["estimated_performance"] is None
    assert len(store.history("churn", 5)) == 1
