"""The model: a scikit-learn Pipeline with the preprocessing inside, and how it is scored.

Keeping imputation, scaling and encoding inside the Pipeline means the served model is given
the same raw feature columns as training, and nothing about preprocessing can drift between the
two. Scores are the positive-class probability for classification and the prediction for
regression; metrics come from scores, so the gates can recompute them on resamples.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    from sklearn.pipeline import Pipeline

    from airmlops.spec import PipelineSpec

DECISION_THRESHOLD = 0.5
"""Probability at or above which a binary classifier's score counts as the positive class."""

_PROBABILITY_EPS = 1e-15


def build_pipeline(spec: PipelineSpec, estimator_class: type) -> Pipeline:
    """An unfitted Pipeline: per-type preprocessing of ``spec``'s features, then the estimator.

    Numeric: median imputation and standard scaling. Categorical: most-frequent imputation and
    one-hot encoding that ignores categories never seen in training. The estimator gets
    ``spec.estimator.params`` and ``random_state=spec.estimator.seed`` when it accepts one and
    the params do not set it already.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    transformers = []
    if spec.numeric_features:
        numeric = Pipeline(
            [("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler())]
        )
        transformers.append(("numeric", numeric, spec.numeric_features))
    if spec.categorical_features:
        categorical = Pipeline(
            [
                ("impute", SimpleImputer(strategy="most_frequent")),
                ("encode", OneHotEncoder(handle_unknown="ignore", sparse_output=False)),
            ]
        )
        transformers.append(("categorical", categorical, spec.categorical_features))

    params = dict(spec.estimator.params)
    if "random_state" not in params and _accepts(estimator_class, "random_state"):
        params["random_state"] = spec.estimator.seed
    return Pipeline(
        [
            ("preprocess", ColumnTransformer(transformers, remainder="drop")),
            ("estimator", estimator_class(**params)),
        ]
    )


def feature_frame(spec: PipelineSpec, df: pd.DataFrame) -> pd.DataFrame:
    """The spec's feature columns of ``df`` with canonical dtypes; ``ValueError`` if any is missing.

    Numeric features become float64 (so a missing value is NaN and the signature says
    ``double``), categorical features object strings in their canonical text with NaN for
    missing (:func:`airmlops.data.categories.category_series`: booleans are "true"/"false",
    ``1.0`` is "1"; a boolean feature's 1/0 are "true"/"false" too). The same frame goes to
    fitting, the signature and scoring.
    """
    import pandas as pd

    from airmlops.data.categories import category_series

    missing = [name for name in spec.input_names if name not in df.columns]
    if missing:
        raise ValueError(f"data has no feature column(s) {missing}")
    columns: dict[str, pd.Series] = {}
    for name in spec.numeric_features:
        columns[name] = pd.to_numeric(df[name], errors="raise").astype("float64")
    booleans = set(spec.boolean_features)
    for name in spec.categorical_features:
        columns[name] = category_series(df[name], boolean=name in booleans)
    return pd.DataFrame(columns, index=df.index)[spec.input_names]


def label_array(spec: PipelineSpec, df: pd.DataFrame) -> np.ndarray:
    """The label column as a numpy array: 0/1 integers for classification, floats otherwise."""
    import numpy as np

    if spec.label not in df.columns:
        raise ValueError(f"data has no label column '{spec.label}'")
    labels = df[spec.label]
    if labels.isna().any():
        raise ValueError(f"label column '{spec.label}' has missing values")
    if spec.task == "regression":
        return labels.to_numpy(dtype="float64")
    values = set(labels.unique().tolist())
    if not values <= {0, 1}:  # True == 1 and False == 0, so booleans pass
        raise ValueError(
            f"label column '{spec.label}' must hold 0/1 or booleans for binary classification; "
            f"found {sorted(map(str, values))[:5]}"
        )
    return labels.astype(int).to_numpy(dtype=np.int64)


def predict_scores(spec: PipelineSpec, model: Any, X: pd.DataFrame) -> np.ndarray:
    """Positive-class probability (classification) or the prediction (regression) per row."""
    import numpy as np

    features = feature_frame(spec, X)
    if spec.task == "regression":
        return np.asarray(model.predict(features), dtype="float64")
    probabilities = np.asarray(model.predict_proba(features), dtype="float64")
    positive = list(model.classes_).index(1)
    return probabilities[:, positive]


def metric_from_scores(metric: str, y: np.ndarray, scores: np.ndarray) -> float:
    """One metric from labels and scores; NaN when it is undefined (e.g. AUC of one class)."""
    import numpy as np
    from sklearn import metrics as skm

    y = np.asarray(y)
    scores = np.asarray(scores, dtype="float64")
    if metric in ("mae", "rmse", "r2"):
        if metric == "mae":
            return float(skm.mean_absolute_error(y, scores))
        if metric == "rmse":
            return float(np.sqrt(skm.mean_squared_error(y, scores)))
        return float(skm.r2_score(y, scores)) if len(y) > 1 else float("nan")
    if metric == "roc_auc":
        return float(skm.roc_auc_score(y, scores)) if len(np.unique(y)) == 2 else float("nan")
    if metric == "log_loss":
        clipped = np.clip(scores, _PROBABILITY_EPS, 1 - _PROBABILITY_EPS)
        return float(skm.log_loss(y, clipped, labels=[0, 1]))
    predicted = (scores >= DECISION_THRESHOLD).astype(int)
    if metric == "accuracy":
        return float(skm.accuracy_score(y, predicted))
    if metric == "f1":
        return float(skm.f1_score(y, predicted, zero_division=0))
    if metric == "precision":
        return float(skm.precision_score(y, predicted, zero_division=0))
    if metric == "recall":
        return float(skm.recall_score(y, predicted, zero_division=0))
    raise ValueError(f"unknown metric '{metric}'")


def score(spec: PipelineSpec, model: Any, X: pd.DataFrame, y: Any) -> dict[str, float]:
    """Every metric of the spec's task (``spec.METRICS_BY_TASK``) for ``model`` on (X, y)."""
    import numpy as np

    from airmlops.spec import METRICS_BY_TASK

    scores = predict_scores(spec, model, X)
    labels = np.asarray(y)
    return {
        metric: metric_from_scores(metric, labels, scores)
        for metric in METRICS_BY_TASK[spec.task]
    }


def _accepts(estimator_class: type, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(estimator_class).parameters
    except (TypeError, ValueError):
        return False
