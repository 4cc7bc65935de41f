"""How a shadow (challenger) model answered the live traffic it was mirrored, beside the live
model's answers to the same requests (:func:`compare_shadow`).

The input is :func:`airmlops.serving.prediction_log.read_shadow_pairs`: one row per live
prediction that has a shadow row. This module measures and returns numbers; whether they are
good enough to promote the challenger is judged elsewhere.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.settings import Settings

REGRESSION_AGREEMENT_TOLERANCE = 0.1
"""For regressors, a pair agrees when ``|shadow - live| <= REGRESSION_AGREEMENT_TOLERANCE *
std(live predictions)`` (population standard deviation, ``ddof=0``, over the compared pairs):
the tolerance follows the spread of what the live model predicts, so it is unit-free. When the
live predictions do not vary, only equal predictions agree."""

_METRIC_BY_TASK = {"binary_classification": "roc_auc", "regression": "rmse"}
_NEEDED = ("live_prediction", "shadow_prediction", "live_probability", "shadow_probability",
           "label")


@dataclasses.dataclass(frozen=True)
class ShadowComparison:
    """The shadow model against the live one on the same requests.

    ``pairs``: rows compared; ``agreement_rate``: share of pairs with the same predicted class
    (classifiers) or within ``agreement_tolerance`` of each other (regressors, see
    :data:`REGRESSION_AGREEMENT_TOLERANCE`; None for classifiers); ``score_ks``: the two-sample
    Kolmogorov-Smirnov statistic between the live and the shadow scores (probabilities for
    classifiers, predictions for regressors); ``mean_score_shift``: shadow mean score minus live
    mean score; ``labelled``: pairs with a label; ``live_metric`` and ``shadow_metric``: each
    model's ``metric`` (``roc_auc`` for classifiers, None until both classes have a label;
    ``rmse`` for regressors, None until there is a label) on the labelled pairs.
    """

    task_type: str
    pairs: int
    agreement_rate: float | None
    agreement_tolerance: float | None
    score_ks: float | None
    mean_score_shift: float | None
    labelled: int
    metric: str
    live_metric: float | None
    shadow_metric: float | None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


def compare_shadow(pairs: pd.DataFrame, task_type: str) -> ShadowComparison:
    """Compare the shadow and live answers of ``pairs`` (the columns of
    :func:`~airmlops.serving.prediction_log.read_shadow_pairs`) for ``task_type``
    (``binary_classification`` or ``regression``, as in the pipeline spec's ``task``).

    An empty frame gives ``pairs`` 0 and None for every measured number.
    """
    import numpy as np
    from scipy.stats import ks_2samp

    if task_type not in _METRIC_BY_TASK:
        raise ValueError(f"task_type: {task_type!r} is not a task; expected one of "
                         f"{list(_METRIC_BY_TASK)}")
    absent = [c for c in _NEEDED if c not in pairs.columns]
    if absent:
        raise ValueError(f"the pairs frame lacks column(s) {absent}")
    classifier = task_type == "binary_classification"
    live = pairs["live_prediction"].to_numpy(dtype="float64")
    shadow = pairs["shadow_prediction"].to_numpy(dtype="float64")
    score_side = "probability" if classifier else "prediction"
    live_scores = _finite(pairs[f"live_{score_side}"])
    shadow_scores = _finite(pairs[f"shadow_{score_side}"])
    tolerance = None
    if not len(pairs):
        agreement = None
    elif classifier:
        agreement = float(np.mean(live == shadow))
    else:
        tolerance = REGRESSION_AGREEMENT_TOLERANCE * float(np.std(live))
        agreement = float(np.mean(np.abs(shadow - live) <= tolerance))
    both = len(live_scores) > 0 and len(shadow_scores) > 0
    live_metric, shadow_metric, labelled = _labelled_metrics(pairs, classifier)
    return ShadowComparison(
        task_type=task_type,
        pairs=len(pairs),
        agreement_rate=agreement,
        agreement_tolerance=tolerance,
        score_ks=float(ks_2samp(live_scores, shadow_scores).statistic) if both else None,
        mean_score_shift=float(np.mean(shadow_scores) - np.mean(live_scores)) if both else None,
        labelled=labelled,
        metric=_METRIC_BY_TASK[task_type],
        live_metric=live_metric,
        shadow_metric=shadow_metric,
    )


def _finite(column: pd.Series) -> Any:
    """The finite values of a score column as a float array (a missing score is left out)."""
    import numpy as np

    values = column.to_numpy(dtype="float64")
    return values[np.isfinite(values)]


def _labelled_metrics(pairs: pd.DataFrame, classifier: bool
                      ) -> tuple[float | None, float | None, int]:
    """(live metric, shadow metric, labelled pairs): ROC AUC of the probabilities when both
    classes have a label (else None), or RMSE of the predictions when any pair has one."""
    import numpy as np

    labelled = pairs[np.isfinite(pairs["label"].to_numpy(dtype="float64"))]
    if not len(labelled):
        return None, None, 0
    labels = labelled["label"].to_numpy(dtype="float64")
    if classifier:
        if len(np.unique(labels)) < 2:
            return None, None, len(labelled)
        from sklearn.metrics import roc_auc_score

        scores = [labelled[f"{side}_probability"].to_numpy(dtype="float64")
                  for side in ("live", "shadow")]
        metrics = [_or_none(roc_auc_score(labels, s)) if np.isfinite(s).all() else None
                   for s in scores]
    else:
        metrics = [_or_none(math.sqrt(float(np.mean(
            (labelled[f"{side}_prediction"].to_numpy(dtype="float64") - labels) ** 2))))
            for side in ("live", "shadow")]
    return metrics[0], metrics[1], len(labelled)


def _or_none(value: float) -> float | None:
    """``value`` as a plain float, or None when it is not finite."""
    value = float(value)
    return value if math.isfinite(value) else None


def window_comparison(pipeline: str, task_type: str, start: dt.datetime, end: dt.datetime,
                      settings: Settings, labels_end: dt.datetime | None = None
                      ) -> dict[str, Any]:
    """The comparison of the pairs logged in ``[start, end)`` for ``pipeline`` (labels received
    until ``labels_end``, default ``end``), as a JSON-ready dict."""
    from airmlops.serving.prediction_log import read_shadow_pairs

    pairs = read_shadow_pairs(pipeline, start, end, labels_end=labels_end, settings=settings)
    return compare_shadow(pairs, task_type).to_dict()
