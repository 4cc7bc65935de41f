"""The compiled scorer gives the Pipeline's scores on row dicts, without pandas.

Each model is fitted by the training code (``build_pipeline`` on ``feature_frame``) on data with
missing values, then the compiled scorer and the Pipeline on a DataFrame (``predict_scores``)
score the same rows: many rows with missing values, unseen categories and extreme numbers, in
one batch and one by one.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from airmlops.serving.fast_predict import FastScorer, NotCompilable, compile_scorer
from airmlops.spec import parse_spec, resolve_estimator
from airmlops.training.model import build_pipeline, feature_frame, predict_scores

PLANS = ["basic", "standard", "premium"]
REGIONS = ["north", "south", "east", "west"]


def _spec(task: str = "binary_classification",
          class_path: str = "sklearn.linear_model.LogisticRegression", params=None):
    return parse_spec({
        "name": "toy",
        "task": task,
        "source": {"kind": "file", "path": "toy.parquet"},
        "entity_key": "id",
        "timestamp": "ts",
        "label": "y",
        "features": [
            {"name": "age", "type": "numeric", "max_null_fraction": 0.2},
            {"name": "fee", "type": "numeric", "max_null_fraction": 0.2},
            {"name": "sessions", "type": "numeric", "max_null_fraction": 0.2},
            {"name": "plan", "type": "categorical", "max_null_fraction": 0.2},
            {"name": "region", "type": "categorical", "max_null_fraction": 0.2},
        ],
        "estimator": {"class_path": class_path, "params": params or {}, "seed": 3},
        "gates": {"primary_metric": "roc_auc" if task == "binary_classification" else "rmse"},
    })


def _rows(n: int, seed: int, *, unseen: bool = False) -> list[dict]:
    """Feature rows as the service has them: Python values, None where missing."""
    rng = np.random.default_rng(seed)
    plans = [*PLANS, "gold"] if unseen else PLANS
    rows = []
    for _ in range(n):
        row = {
            "age": float(rng.integers(18, 90)),
            "fee": float(rng.normal(40, 15)),
            "sessions": int(rng.integers(0, 60)),  # ints, as the online store may return
            "plan": str(rng.choice(plans)),
            "region": str(rng.choice(REGIONS)),
        }
        for name in row:
            if rng.random() < 0.1:
                row[name] = None
        rows.append(row)
    return rows


def _labels(rows: list[dict], task: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    signal = np.array([(r["fee"] or 40) / 20 - (r["sessions"] or 10) / 15
                       + (r["plan"] == "premium") for r in rows])
    if task == "regression":
        return signal + rng.normal(0, 0.1, len(rows))
    return (rng.random(len(rows)) < 1 / (1 + np.exp(-signal))).astype(int)


def _frame(spec, rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame.from_records(rows, columns=spec.input_names)


def _fitted(spec, seed: int = 0):
    rows = _rows(1500, seed)
    model = build_pipeline(spec, resolve_estimator(spec))
    model.fit(feature_frame(spec, _frame(spec, rows)), _labels(rows, spec.task, seed))
    return model


def _compiled(spec, model) -> FastScorer:
    positive = 1 if spec.task == "binary_classification" else None
    return compile_scorer(model, spec.numeric_features, spec.categorical_features,
                          positive=positive)


CASES = [
    ("binary_classification", "sklearn.linear_model.LogisticRegression", {"C": 0.5}, "logistic"),
    ("regression", "sklearn.linear_model.Ridge", {"alpha": 2.0}, "linear"),
    ("regression", "sklearn.linear_model.LinearRegression", {}, "linear"),
    ("binary_classification", "sklearn.ensemble.HistGradientBoostingClassifier",
     {"max_iter": 30}, "estimator"),
    ("regression", "sklearn.ensemble.RandomForestRegressor", {"n_estimators": 10}, "estimator"),
]


@pytest.mark.parametrize("task, class_path, params, kind", CASES,
                         ids=[c[1].rsplit(".", 1)[1] for c in CASES])
def test_compiled_scores_equal_the_pipeline_on_many_rows(task, class_path, params, kind):
    spec = _spec(task, class_path, params)
    model = _fitted(spec)
    scorer = _compiled(spec, model)
    assert scorer.kind == kind

    rows = _rows(3000, seed=11, unseen=True)
    expected = predict_scores(spec, model, _frame(spec, rows))
    together = scorer.scores(rows)
    assert together.dtype == np.float64 and together.shape == (3000,)
    np.testing.assert_allclose(together, expected, rtol=0, atol=1e-12)
    one_by_one = np.concatenate([scorer.scores([row]) for row in rows[:300]])
    np.testing.assert_allclose(one_by_one, expected[:300], rtol=0, atol=1e-12)
    if task == "binary_classification":  # the decisions the service answers are the same
        assert ((together >= 0.5) == (expected >= 0.5)).all()


def test_missing_unseen_and_extreme_inputs_score_like_the_pipeline():
    spec = _spec()
    model = _fitted(spec)
    scorer = _compiled(spec, model)
    rows = [
        dict.fromkeys(spec.input_names),  # everything missing: all imputed
        {"age": 30.0, "fee": 1e12, "sessions": -5, "plan": "gold", "region": None},
        {"age": 30.0, "fee": float("nan"), "sessions": 3, "plan": "basic", "region": "west"},
        {"age": True, "fee": 10, "sessions": 2.5, "plan": 7, "region": "east"},
    ]
    expected = predict_scores(spec, model, _frame(spec, rows))
    np.testing.assert_allclose(scorer.scores(rows), expected, rtol=0, atol=1e-12)


def test_bad_values_fail_like_the_pipeline():
    spec = _spec()
    model = _fitted(spec)
    scorer = _compiled(spec, model)
    for bad in ({"fee": "not a number"}, {"fee": float("inf")}):
        row = {**_rows(1, seed=5)[0], **bad}
        with pytest.raises(ValueError):
            predict_scores(spec, model, _frame(spec, [row]))
        with pytest.raises(ValueError):
            scorer.scores([row])


def test_the_check_against_the_pipeline_passes_and_catches_a_wrong_scorer():
    spec = _spec()
    model = _fitted(spec)
    scorer = _compiled(spec, model)

    def reference(rows):
        return predict_scores(spec, model, _frame(spec, rows))

    agrees, gap = scorer.agrees_with(reference)
    assert agrees and gap <= 1e-12
    probes = scorer.probe_rows(200)
    assert any(row["plan"] is None for row in probes)
    assert {row["plan"] for row in probes} >= {*PLANS, "__airmlops_unseen__"}
    assert any(v is not None and abs(v) > 1000 for row in probes for v in
               (row["fee"], row["age"]))

    scorer._intercept = scorer._intercept + 1e-6  # a compilation that is slightly off
    agrees, gap = scorer.agrees_with(reference)
    assert not agrees and gap > 1e-9


def _pipeline(columns, estimator):
    from sklearn.pipeline import Pipeline

    return Pipeline([("preprocess", columns), ("estimator", estimator)])


def test_what_it_cannot_reproduce_is_refused_with_the_reason():
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import MinMaxScaler, OneHotEncoder, StandardScaler

    spec = _spec()
    rows = _rows(300, seed=2)
    X = feature_frame(spec, _frame(spec, rows)).fillna({"age": 0, "fee": 0, "sessions": 0,
                                                        "plan": "basic", "region": "north"})
    y = _labels(rows, spec.task, 2)
    numeric, categorical = spec.numeric_features, spec.categorical_features
    refused = {
        "transformer MinMaxScaler": ColumnTransformer([("n", MinMaxScaler(), numeric)]),
        "remainder": ColumnTransformer([("n", StandardScaler(), numeric[:2])],
                                       remainder="passthrough"),
        "drop": ColumnTransformer([("c", OneHotEncoder(drop="first", sparse_output=False,
                                                       handle_unknown="ignore"), categorical)]),
        "sparse": ColumnTransformer([("c", OneHotEncoder(handle_unknown="ignore"),
                                     categorical)]),
        "by position": ColumnTransformer([("n", StandardScaler(), [0, 1, 2])]),
    }
    for words, columns in refused.items():
        data = X[numeric] if words == "remainder" else X
        model = _pipeline(columns, LogisticRegression()).fit(data, y)
        with pytest.raises(NotCompilable, match=words):
            compile_scorer(model, numeric, categorical, positive=1)
    with pytest.raises(NotCompilable, match="two-step Pipeline"):
        compile_scorer(LogisticRegression().fit(X[numeric], y), numeric, categorical,
                       positive=1)


def test_the_positive_class_can_be_the_first_one():
    spec = _spec()
    rows = _rows(800, seed=4)
    model = build_pipeline(spec, resolve_estimator(spec))
    labels = _labels(rows, spec.task, 4)
    model.fit(feature_frame(spec, _frame(spec, rows)), np.where(labels == 1, 1, 5))
    assert list(model.classes_) == [1, 5]
    scorer = compile_scorer(model, spec.numeric_features, spec.categorical_features, positive=1)
    expected = model.predict_proba(feature_frame(spec, _frame(spec, rows)))[:, 0]
    np.testing.assert_allclose(scorer.scores(rows), expected, rtol=0, atol=1e-12)
    assert not math.isnan(float(scorer.scores(rows[:1])[0]))
