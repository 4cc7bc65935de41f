"""The model loader's allow-list is derived from what the platform's pipelines produce, and
holds only classes; digests and recorded types round-trip through a saved model."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pandas as pd
import pytest

from airmlops.model_files import (
    ModelDigests,
    ModelLoadError,
    digest_model_dir,
    load_model_dir,
    safe_type_names,
    trusted_types_of,
)
from airmlops.spec import parse_spec
from airmlops.training.model import build_pipeline, feature_frame, label_array

# Params an estimator needs to fit the toy data; variants that make it store other internals.
FAMILIES = {
    "binary_classification": [
        ("sklearn.linear_model.LogisticRegression", {}),
        ("sklearn.tree.DecisionTreeClassifier", {}),
        ("sklearn.ensemble.RandomForestClassifier", {"n_estimators": 3}),
        ("sklearn.ensemble.GradientBoostingClassifier", {"n_estimators": 3,
                                                         "loss": "exponential"}),
        ("sklearn.ensemble.HistGradientBoostingClassifier", {"max_iter": 3}),
        ("sklearn.neighbors.KNeighborsClassifier", {"algorithm": "ball_tree",
                                                    "metric": "manhattan"}),
        ("sklearn.neighbors.KNeighborsClassifier", {"algorithm": "kd_tree"}),
        ("sklearn.neural_network.MLPClassifier", {"max_iter": 5, "solver": "sgd"}),
        ("sklearn.neural_network.MLPClassifier", {"max_iter": 5}),
        ("sklearn.calibration.CalibratedClassifierCV", {}),
        ("sklearn.gaussian_process.GaussianProcessClassifier", {}),
        ("sklearn.svm.SVC", {"probability": True}),
    ],
    "regression": [
        ("sklearn.linear_model.Ridge", {}),
        ("sklearn.linear_model.TweedieRegressor", {"power": 0}),
        ("sklearn.linear_model.TweedieRegressor", {"power": 1.5}),
        ("sklearn.ensemble.HistGradientBoostingRegressor", {"max_iter": 3,
                                                            "loss": "poisson"}),
        ("sklearn.ensemble.GradientBoostingRegressor", {"n_estimators": 3, "loss": "huber"}),
        ("sklearn.ensemble.ExtraTreesRegressor", {"n_estimators": 3}),
        ("sklearn.neighbors.KNeighborsRegressor", {"algorithm": "ball_tree",
                                                   "metric": "chebyshev"}),
        ("sklearn.gaussian_process.GaussianProcessRegressor", {}),
    ],
}
CASES = [(task, path, params) for task, cases in FAMILIES.items() for path, params in cases]


def _spec(task, class_path, params):
    return parse_spec({
        "name": "toy", "task": task,
        "source": {"kind": "file", "path": "toy.parquet"},
        "entity_key": "id", "timestamp": "ts", "label": "y",
        "features": [{"name": "x1", "type": "numeric"}, {"name": "x2", "type": "numeric"},
                     {"name": "city", "type": "categorical"}],
        "estimator": {"class_path": class_path, "params": params},
        "gates": {"primary_metric": "roc_auc" if task == "binary_classification" else "rmse"},
    })


def _frame(task, n=120):
    rng = np.random.default_rng(0)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    y = (x1 > 0).astype(int) if task == "binary_classification" else np.abs(x1) + 0.5
    return pd.DataFrame({"id": np.arange(n), "ts": pd.Timestamp("2026-01-01", tz="UTC"),
                         "x1": x1, "x2": x2, "city": rng.choice(["a", "b", "c"], n), "y": y})


def _fitted(task, class_path, params):
    from airmlops.spec import resolve_estimator

    spec = _spec(task, class_path, params)
    frame = _frame(task)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence warnings of tiny fits
        model = build_pipeline(spec, resolve_estimator(spec))
        model.fit(feature_frame(spec, frame), label_array(spec, frame))
    return spec, frame, model


@pytest.mark.parametrize("task, class_path, params", CASES,
                         ids=[f"{p.rsplit('.', 1)[1]}-{'-'.join(map(str, q.values())) or 'default'}"
                              for _, p, q in CASES])
def test_every_supported_family_needs_only_allowed_types(task, class_path, params):
    """The derivation of the allow-list: what skops reports for the platform's own models."""
    _, _, model = _fitted(task, class_path, params)
    assert set(trusted_types_of(model)) <= safe_type_names()


def test_the_allow_list_names_classes_only():
    """Nothing in it is a function: constructing one of its types calls no arbitrary code."""
    for name in sorted(safe_type_names()):
        module, _, attribute = name.rpartition(".")
        resolved = getattr(importlib.import_module(module), attribute)
        assert isinstance(resolved, type), name
    for dangerous in ("builtins.eval", "os.system", "functools.partial", "numpy.load",
                      "sklearn.utils._testing.assert_run_python_script_without_output",
                      "sklearn.metrics._dist_metrics.PyFuncDistance64"):
        assert dangerous not in safe_type_names()


def test_a_model_needing_an_unsafe_type_cannot_be_recorded():
    """A fitted model holding a function (here ``functools.partial``) is refused at training."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    x = np.c_[np.random.default_rng(0).integers(0, 3, 50), np.arange(50.0)]
    model = HistGradientBoostingRegressor(max_iter=2, categorical_features=[0]).fit(x, x[:, 1])
    with pytest.raises(ModelLoadError, match=r"the model references types outside .*"
                                             r"functools\.partial"):
        trusted_types_of(model)


def test_a_saved_model_loads_with_its_digests_and_predicts_the_same(tmp_path):
    import mlflow.sklearn

    spec, frame, model = _fitted("binary_classification",
                                 "sklearn.ensemble.HistGradientBoostingClassifier",
                                 {"max_iter": 3})
    mlflow.sklearn.save_model(model, str(tmp_path / "m"), serialization_format="skops",
                              skops_trusted_types=trusted_types_of(model),
                              pip_requirements=["scikit-learn"])
    loaded = load_model_dir(tmp_path / "m", digest_model_dir(tmp_path / "m"))
    X = feature_frame(spec, frame)
    np.testing.assert_array_equal(loaded.predict_proba(X), model.predict_proba(X))


@pytest.mark.parametrize("field, value", [("model_sha256", "abc"),
                                          ("mlmodel_sha256", "A" * 64)])
def test_digests_must_be_sha256_hex(field, value):
    good = {"model_sha256": "0" * 64, "mlmodel_sha256": "1" * 64}
    with pytest.raises(ModelLoadError, match=f"{field}: expected 64 lowercase hex digits"):
        ModelDigests(**{**good, field: value})
