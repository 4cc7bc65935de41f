"""Gates: paired bootstrap, fail-closed decisions, champion comparison and the recorded evidence."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from airmlops.spec import parse_spec, resolve_estimator
from airmlops.training.gates import (
    BootstrapResult,
    _weighted_metric,
    decide,
    evaluate_against_champion,
    log_decision,
    paired_bootstrap,
)
from airmlops.training.model import build_pipeline, feature_frame, label_array, metric_from_scores


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _spec(thresholds=None, primary="roc_auc", max_regression=0.01, recent_days=None, **estimator):
    return parse_spec(
        {
            "name": "toy",
            "task": "binary_classification",
            "source": {"kind": "file", "path": "toy.parquet"},
            "entity_key": "id",
            "timestamp": "ts",
            "label": "y",
            "features": [{"name": "x1", "type": "numeric"}, {"name": "x2", "type": "numeric"}],
            "estimator": {"class_path": "sklearn.linear_model.LogisticRegression", **estimator},
            "gates": {
                "primary_metric": primary,
                "thresholds": thresholds or {},
                "champion": {
                    "max_regression": max_regression,
                    "n_bootstrap": 500,
                    "confidence": 0.95,
                    "recent_days": recent_days,
                },
            },
        }
    )


def _labels_and_signal(n=2000, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return rng, y, y + rng.normal(scale=1.0, size=n)


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# --- paired bootstrap -------------------------------------------------------------------------


def test_identical_models_give_a_zero_interval():
    _, y, signal = _labels_and_signal()
    scores = _sigmoid(signal)
    result = paired_bootstrap(y, scores, scores, "roc_auc", n=300, confidence=0.95, seed=1)
    assert result.delta == 0.0
    assert result.ci_low == 0.0 == result.ci_high
    assert result.n_effective == 300


def test_equally_good_models_give_an_interval_around_zero():
    rng, y, _ = _labels_and_signal()
    a = _sigmoid(y + rng.normal(scale=1.0, size=len(y)))
    b = _sigmoid(y + rng.normal(scale=1.0, size=len(y)))
    result = paired_bootstrap(y, a, b, "roc_auc", n=1000, confidence=0.95, seed=1)
    assert result.ci_low < 0 < result.ci_high
    assert result.ci_high - result.ci_low < 0.06


def test_a_clearly_better_model_has_a_positive_lower_bound():
    rng, y, _ = _labels_and_signal()
    better = _sigmoid(2.0 * y + rng.normal(scale=1.0, size=len(y)))
    worse = _sigmoid(0.5 * y + rng.normal(scale=1.0, size=len(y)))
    result = paired_bootstrap(y, better, worse, "roc_auc", n=500, confidence=0.95, seed=1)
    assert result.delta > 0.1
    assert result.ci_low > 0
    assert result.ci_low <= result.delta <= result.ci_high
    assert result.value_a == pytest.approx(metric_from_scores("roc_auc", y, better))


def test_bootstrap_is_deterministic_for_a_seed():
    rng, y, signal = _labels_and_signal(n=500)
    a, b = _sigmoid(signal), _sigmoid(signal + rng.normal(size=500))
    first = paired_bootstrap(y, a, b, "log_loss", n=200, confidence=0.9, seed=3)
    assert paired_bootstrap(y, a, b, "log_loss", n=200, confidence=0.9, seed=3) == first
    assert paired_bootstrap(y, a, b, "log_loss", n=200, confidence=0.9, seed=4) != first


def test_single_class_resamples_are_skipped_for_auc():
    y = np.array([1] + [0] * 19)  # most resamples miss the only positive
    scores = np.linspace(0, 1, 20)
    result = paired_bootstrap(y, scores, scores[::-1], "roc_auc", n=400, confidence=0.95, seed=0)
    assert 0 < result.n_effective < 400
    assert result.n_requested == 400


def test_no_defined_resample_gives_nan_interval():
    y = np.ones(30, dtype=int)
    result = paired_bootstrap(y, np.full(30, 0.6), np.full(30, 0.4), "roc_auc", 100, 0.95, 0)
    assert result.n_effective == 0
    assert math.isnan(result.ci_low) and math.isnan(result.ci_high)


@pytest.mark.parametrize(
    "metric", ["roc_auc", "log_loss", "accuracy", "f1", "precision", "recall", "mae", "rmse", "r2"]
)
def test_vectorised_metric_equals_sklearn_on_each_resample(metric):
    rng = np.random.default_rng(5)
    n = 150
    if metric in ("mae", "rmse", "r2"):
        y = rng.normal(size=n)
        scores = y + rng.normal(size=n)
    else:
        y = rng.integers(0, 2, n)
        scores = np.round(rng.random(n), 1)  # many ties, which AUC must count as half
    indices = rng.integers(0, n, size=(6, n))
    counts = np.stack([np.bincount(row, minlength=n) for row in indices]).astype(float)
    expected = [metric_from_scores(metric, y[row], scores[row]) for row in indices]
    np.testing.assert_allclose(_weighted_metric(metric, y, scores, counts), expected)


# --- decisions --------------------------------------------------------------------------------


def _comparison(ci_low, metric="roc_auc"):
    return BootstrapResult(
        metric=metric, delta=ci_low + 0.01, ci_low=ci_low, ci_high=ci_low + 0.02,
        n_effective=1000, n_requested=1000, confidence=0.95, value_a=0.8, value_b=0.79,
        n_rows=500, comparison="challenger - champion",
    )


def test_thresholds_are_minimums_or_maximums_by_direction():
    spec = _spec({"roc_auc": 0.7, "log_loss": 0.6})
    good = decide(spec, {"roc_auc": 0.75, "log_loss": 0.5}, None, None)
    assert good.blessed
    assert {(c["check"], c["metric"], c["passed"]) for c in good.checks} >= {
        ("min", "roc_auc", True), ("max", "log_loss", True)
    }
    assert "no champion" in good.reasons[0]

    low_auc = decide(spec, {"roc_auc": 0.65, "log_loss": 0.5}, None, None)
    assert not low_auc.blessed
    assert any("roc_auc" in reason for reason in low_auc.reasons)

    high_loss = decide(spec, {"roc_auc": 0.75, "log_loss": 0.61}, None, None)
    assert not high_loss.blessed
    assert [c["metric"] for c in high_loss.checks if not c["passed"]] == ["log_loss"]


@pytest.mark.parametrize("bad", [float("nan"), None, "n/a"])
def test_a_missing_or_nan_metric_is_not_blessed(bad):
    spec = _spec({"roc_auc": 0.7, "log_loss": 0.6})
    decision = decide(spec, {"roc_auc": 0.8, "log_loss": bad}, None, None)
    assert not decision.blessed
    assert "log_loss is missing or not a number" in decision.reasons


def test_a_missing_primary_metric_without_thresholds_is_not_blessed():
    decision = decide(_spec(), {}, None, None)
    assert not decision.blessed
    assert decision.checks[0]["check"] == "primary_metric_present"


def test_champion_regression_beyond_the_allowance_is_not_blessed():
    spec = _spec(max_regression=0.01)
    assert decide(spec, {"roc_auc": 0.8}, _comparison(-0.005), "3").blessed
    assert decide(spec, {"roc_auc": 0.8}, _comparison(-0.01), "3").blessed
    regressed = decide(spec, {"roc_auc": 0.8}, _comparison(-0.02), "3")
    assert not regressed.blessed
    assert "champion version 3" in regressed.reasons[0]
    check = regressed.checks[-1]
    assert (check["check"], check["value"], check["bound"]) == ("champion_ci_low", -0.02, -0.01)


def test_a_champion_without_a_usable_comparison_is_not_blessed():
    spec = _spec()
    assert not decide(spec, {"roc_auc": 0.9}, None, "3").blessed
    assert not decide(spec, {"roc_auc": 0.9}, _comparison(float("nan")), "3").blessed
    assert not decide(spec, {"roc_auc": 0.9}, _comparison(0.05, metric="f1"), "3").blessed


def test_why_the_champion_could_not_be_compared_is_in_the_reasons():
    """A champion the loader refuses (say, registered before digests were recorded) fails the
    gate closed, and the decision says why, so the operator knows what to fix."""
    decision = decide(_spec(), {"roc_auc": 0.9}, None, "3",
                      "models:/churn/3 has no recorded model_sha256")
    assert not decision.blessed
    assert any("champion version 3 was made: models:/churn/3 has no recorded model_sha256"
               in reason for reason in decision.reasons), decision.reasons


def test_decision_is_strict_json():
    decision = decide(_spec({"roc_auc": 0.7}), {"roc_auc": float("nan")}, _comparison(0.01), "2")
    text = json.dumps(decision.to_dict(), allow_nan=False)
    data = json.loads(text)
    assert data["blessed"] is False
    assert data["checks"][0]["value"] is None
    assert data["comparison"]["ci_low"] == 0.01


# --- champion comparison on real models, and the record on the run ----------------------------


def _frame(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    y = (rng.random(n) < _sigmoid(2 * x1 + 0.1 * x2)).astype(int)
    ts = pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(n) // 20, unit="D")
    return pd.DataFrame({"id": np.arange(n), "ts": ts, "x1": x1, "x2": x2, "y": y})


def _tracking_uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def _saved_model(spec, frame, features, path):
    """Log a model as training does (skops, trusted types, digests); its ``models:/`` URI."""
    import mlflow
    import mlflow.sklearn
    from mlflow import MlflowClient

    from airmlops.training.tracking import (
        pinned_requirements,
        record_digests,
        skops_trusted_types,
        using_tracking_uri,
    )

    model = build_pipeline(spec, resolve_estimator(spec))
    X = feature_frame(spec, frame)
    X[[c for c in X.columns if c not in features]] = 0.0  # a model blind to those columns
    model.fit(X, label_array(spec, frame))
    uri = _tracking_uri(path.parent)
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("toy")
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(
        "toy", artifact_location=(path.parent / "artifacts").as_uri())
    with using_tracking_uri(uri), mlflow.start_run(experiment_id=experiment_id):
        info = mlflow.sklearn.log_model(
            model, name=path.name, serialization_format="skops",
            skops_trusted_types=skops_trusted_types(model),
            pip_requirements=pinned_requirements(),  # inferring them takes seconds per model
        )
        record_digests(client, info.model_uri, info.model_id, uri)
    return info.model_uri


@pytest.mark.parametrize("primary", ["roc_auc", "log_loss"])
def test_better_challenger_wins_in_either_metric_direction(tmp_path, primary):
    spec = _spec(primary=primary)
    frame = _frame()
    train, test = frame.iloc[:800], frame.iloc[800:]
    strong = _saved_model(spec, train, ["x1", "x2"], tmp_path / "strong")
    weak = _saved_model(spec, train, ["x2"], tmp_path / "weak")

    result = evaluate_against_champion(spec, test, challenger_uri=strong, champion_uri=weak,
                                       tracking_uri=_tracking_uri(tmp_path))
    assert result.metric == primary
    assert result.n_rows == len(test)
    assert result.delta > 0 and result.ci_low > 0  # positive = challenger better, always
    expected = "challenger - champion" if primary == "roc_auc" else "champion - challenger"
    assert result.comparison == expected
    assert decide(spec, {primary: 0.5}, result, "1").blessed

    reverse = evaluate_against_champion(spec, test, challenger_uri=weak, champion_uri=strong,
                                        tracking_uri=_tracking_uri(tmp_path))
    assert reverse.ci_high < 0
    assert not decide(spec, {primary: 0.5}, reverse, "1").blessed


def test_comparison_can_be_limited_to_recent_days(tmp_path):
    spec = _spec(recent_days=5)
    frame = _frame()
    train, test = frame.iloc[:800], frame.iloc[800:]
    model = _saved_model(spec, train, ["x1", "x2"], tmp_path / "m")
    result = evaluate_against_champion(spec, test, challenger_uri=model, champion_uri=model,
                                       tracking_uri=_tracking_uri(tmp_path))
    newest = test["ts"].max()
    assert result.n_rows == int((test["ts"] >= newest - pd.Timedelta(days=5)).sum()) == 120
    assert result.ci_low == result.ci_high == 0.0


def test_log_decision_records_tags_metrics_and_the_json(tmp_path):
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("toy", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(experiment_id).info.run_id
    decision = decide(_spec({"roc_auc": 0.7}), {"roc_auc": 0.8}, _comparison(0.02), "4")

    log_decision(decision, run_id, uri)
    log_decision(decision, run_id, uri)  # a retry is harmless

    run = client.get_run(run_id)
    assert run.data.tags["gate_blessed"] == "true"
    assert run.data.tags["gate_champion_version"] == "4"
    assert run.data.metrics["gate_delta_ci_low"] == pytest.approx(0.02)
    assert run.data.metrics["gate_n_effective"] == 1000
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="gate_decision.json", tracking_uri=uri,
        dst_path=str(tmp_path / "dl"),
    )
    with open(local) as handle:
        assert json.load(handle) == decision.to_dict()
