"""The scikit-learn Pipeline: preprocessing inside, seeded, robust to nulls and new categories."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.datasets import load_diabetes

from airmlops.spec import METRICS_BY_TASK, parse_spec, resolve_estimator
from airmlops.training.model import (
    build_pipeline,
    feature_frame,
    label_array,
    metric_from_scores,
    predict_scores,
    score,
)


def _classification_spec(class_path="sklearn.linear_model.LogisticRegression", params=None):
    return parse_spec(
        {
            "name": "toy",
            "task": "binary_classification",
            "source": {"kind": "file", "path": "toy.parquet"},
            "entity_key": "id",
            "timestamp": "ts",
            "label": "y",
            "features": [
                {"name": "x1", "type": "numeric"},
                {"name": "x2", "type": "numeric"},
                {"name": "plan", "type": "categorical"},
            ],
            "estimator": {"class_path": class_path, "params": params or {}, "seed": 7},
            "gates": {"primary_metric": "roc_auc"},
        }
    )


def _classification_frame(n=600, seed=0):
    rng = np.random.default_rng(seed)
    plan = rng.choice(["basic", "premium"], n)
    x1 = rng.normal(size=n)
    logit = 2.0 * x1 + np.where(plan == "premium", -1.0, 1.0)
    frame = pd.DataFrame(
        {
            "id": np.arange(n),
            "x1": x1,
            "x2": rng.integers(0, 10, n),  # an integer column, as real data often has
            "plan": plan,
            "y": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int),
        }
    )
    return frame


def _fitted(spec, frame):
    model = build_pipeline(spec, resolve_estimator(spec))
    return model.fit(feature_frame(spec, frame), label_array(spec, frame))


def test_pipeline_learns_and_scores_every_classification_metric():
    spec = _classification_spec()
    frame = _classification_frame()
    train, test = frame.iloc[:400], frame.iloc[400:]
    model = _fitted(spec, train)

    metrics = score(spec, model, test, test["y"])
    assert list(metrics) == list(METRICS_BY_TASK["binary_classification"])
    assert metrics["roc_auc"] > 0.75
    probabilities = model.predict_proba(feature_frame(spec, test))[:, 1]
    assert metrics["roc_auc"] == pytest.approx(skm.roc_auc_score(test["y"], probabilities))
    assert metrics["log_loss"] == pytest.approx(skm.log_loss(test["y"], probabilities))
    predicted = model.predict(feature_frame(spec, test))
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(test["y"], predicted))
    assert metrics["f1"] == pytest.approx(skm.f1_score(test["y"], predicted))
    assert metrics["precision"] == pytest.approx(skm.precision_score(test["y"], predicted))
    assert metrics["recall"] == pytest.approx(skm.recall_score(test["y"], predicted))


def test_pipeline_handles_nulls_and_unseen_categories():
    spec = _classification_spec()
    model = _fitted(spec, _classification_frame())
    odd = pd.DataFrame(
        {
            "x1": [np.nan, 0.5, 1.0],
            "x2": [3, None, 4],
            "plan": ["enterprise", None, "basic"],  # never seen in training, and missing
            "unrelated": ["ignored", "ignored", "ignored"],
        }
    )
    scores = predict_scores(spec, model, odd)
    assert scores.shape == (3,)
    assert np.all((scores >= 0) & (scores <= 1))


def test_pipeline_is_seeded_and_takes_spec_params():
    spec = _classification_spec(
        "sklearn.ensemble.RandomForestClassifier", {"n_estimators": 15, "max_depth": 4}
    )
    model = build_pipeline(spec, resolve_estimator(spec))
    estimator = model.named_steps["estimator"]
    assert (estimator.n_estimators, estimator.max_depth, estimator.random_state) == (15, 4, 7)

    frame = _classification_frame()
    first = predict_scores(spec, _fitted(spec, frame), frame)
    second = predict_scores(spec, _fitted(spec, frame), frame)
    np.testing.assert_array_equal(first, second)


def test_estimator_without_random_state_is_built_without_one():
    spec = _classification_spec("sklearn.neighbors.KNeighborsClassifier", {"n_neighbors": 5})
    model = build_pipeline(spec, resolve_estimator(spec))
    assert "random_state" not in model.named_steps["estimator"].get_params()


def test_explicit_random_state_in_params_wins():
    spec = _classification_spec(
        "sklearn.ensemble.RandomForestClassifier", {"n_estimators": 3, "random_state": 99}
    )
    assert build_pipeline(spec, resolve_estimator(spec)).named_steps["estimator"].random_state == 99


def test_feature_frame_selects_orders_and_types_columns():
    spec = _classification_spec()
    frame = _classification_frame().iloc[:3][["plan", "y", "x2", "x1"]]
    features = feature_frame(spec, frame)
    assert list(features.columns) == ["x1", "x2", "plan"]
    assert features["x2"].dtype == "float64"
    assert features["plan"].dtype == object
    with pytest.raises(ValueError, match=r"no feature column\(s\) \['x1'\]"):
        feature_frame(spec, frame.drop(columns="x1"))


def test_labels_must_be_binary_for_classification():
    spec = _classification_spec()
    assert label_array(spec, pd.DataFrame({"y": [True, False]})).tolist() == [1, 0]
    with pytest.raises(ValueError, match="0/1 or booleans"):
        label_array(spec, pd.DataFrame({"y": ["yes", "no"]}))
    with pytest.raises(ValueError, match="missing values"):
        label_array(spec, pd.DataFrame({"y": [1, None]}))


def test_auc_of_a_single_class_is_nan_not_an_error():
    assert np.isnan(metric_from_scores("roc_auc", np.array([1, 1, 1]), np.array([0.2, 0.5, 0.9])))


def test_regression_pipeline_on_diabetes():
    data = load_diabetes(as_frame=True).frame
    features = [c for c in data.columns if c != "target"]
    spec = parse_spec(
        {
            "name": "diabetes",
            "task": "regression",
            "source": {"kind": "file", "path": "diabetes.csv"},
            "entity_key": "id",
            "timestamp": "ts",
            "label": "target",
            "features": [{"name": c, "type": "numeric"} for c in features],
            "estimator": {"class_path": "sklearn.linear_model.Ridge", "params": {"alpha": 0.1}},
            "gates": {"primary_metric": "rmse"},
        }
    )
    train, test = data.iloc[:350], data.iloc[350:]
    model = _fitted(spec, train)
    metrics = score(spec, model, test, test["target"])

    assert list(metrics) == ["mae", "rmse", "r2"]
    predicted = model.predict(feature_frame(spec, test))
    rmse = np.sqrt(skm.mean_squared_error(test["target"], predicted))
    assert metrics["rmse"] == pytest.approx(rmse)
    assert metrics["mae"] == pytest.approx(skm.mean_absolute_error(test["target"], predicted))
    assert 0.3 < metrics["r2"] < 1.0
    np.testing.assert_allclose(predict_scores(spec, model, test), predicted)
