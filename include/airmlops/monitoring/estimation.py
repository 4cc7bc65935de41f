"""Quality before labels: a confidence-based performance estimate (CBPE) of a binary classifier.

CBPE (as NannyML defines it) reads only the model's predicted probabilities. If the model is
*calibrated* (of the rows it gives probability ``p``, a share ``p`` is positive), each row is
expected to be positive with probability ``p_i``, and the expected confusion matrix of a window
follows without any label: a row predicted positive adds ``p_i`` to the true positives and
``1 - p_i`` to the false positives, a row predicted negative ``p_i`` to the false negatives and
``1 - p_i`` to the true negatives. The expected ROC curve is built the same way over every
threshold: rows sorted by score (highest first), TPR is the cumulative ``p_i / sum(p)``, FPR
the cumulative ``(1 - p_i) / sum(1 - p)``; the estimated ROC AUC is its trapezoid area.

Calibration: the raw scores of most models are not calibrated, so a
:class:`Calibration` is fitted at training time on the held-out rows (isotonic regression,
scikit-learn) and stored as *data*: the fitted thresholds in ``calibration.json``, applied with
``np.interp``. Loading it parses numbers, never unpickles anything.

When to trust it: under covariate shift (the inputs move, ``P(y | x)`` does not) a calibrated
model stays calibrated, and the estimate follows the realized performance. Under concept drift
(``P(y | x)`` changes) the model's probabilities are wrong in a way no label-free method can see,
and the estimate keeps saying all is well: that is what the realized performance (on delayed
labels) is for.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

CALIBRATION_FILE = "calibration.json"
"""Artifact of a training run holding its calibration (see :meth:`Calibration.to_dict`)."""
CALIBRATION_KIND = "isotonic"
CALIBRATION_FORMAT = 1
ESTIMATED_METRICS = ("roc_auc", "accuracy", "precision", "recall")


class EstimationError(ValueError):
    """The scores, labels or stored calibration cannot give an estimate; says which field."""


def checked_probabilities(values: Any, field: str) -> np.ndarray:
    """``values`` as a 1-D float array of probabilities; :class:`EstimationError` naming
    ``field`` when it is empty, not 1-D, or holds NaN or values outside [0, 1]."""
    import numpy as np

    array = np.asarray(values, dtype="float64")
    if array.ndim != 1:
        raise EstimationError(f"{field}: expected a 1-D sequence, got shape {array.shape}")
    if array.size == 0:
        raise EstimationError(f"{field}: is empty; there is nothing to estimate from")
    nan = int(np.isnan(array).sum())
    if nan:
        raise EstimationError(f"{field}: {nan} value(s) are NaN")
    outside = int(((array < 0.0) | (array > 1.0)).sum())
    if outside:
        raise EstimationError(f"{field}: {outside} value(s) are outside [0, 1] (e.g. "
                              f"{array[(array < 0.0) | (array > 1.0)][0]!r})")
    return array


@dataclasses.dataclass(frozen=True)
class Calibration:
    """An isotonic map from a model's score to a calibrated probability, as plain numbers.

    ``x``: the fitted thresholds (strictly increasing scores), ``y``: the calibrated
    probability at each (non-decreasing, in [0, 1]); between thresholds the map is linear and
    outside them it is clipped to the end values, as scikit-learn's ``IsotonicRegression``
    (``out_of_bounds="clip"``) predicts. ``rows``/``positives``: what it was fitted on;
    ``fitted_on``: a sentence saying which rows of which model.
    """

    x: tuple[float, ...]
    y: tuple[float, ...]
    rows: int
    positives: int
    fitted_on: str = ""

    def __post_init__(self) -> None:
        _check_thresholds(self.x, self.y)

    def apply(self, scores: Any) -> np.ndarray:
        """The calibrated probability of each score (scores must be probabilities)."""
        import numpy as np

        values = checked_probabilities(scores, "scores")
        return np.interp(values, np.asarray(self.x), np.asarray(self.y))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form stored as ``calibration.json``."""
        return {"kind": CALIBRATION_KIND, "format": CALIBRATION_FORMAT,
                "x_thresholds": list(self.x), "y_thresholds": list(self.y),
                "rows": self.rows, "positives": self.positives, "fitted_on": self.fitted_on}

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """The calibration of a stored ``calibration.json`` (parsed JSON); checks every field."""
        if not isinstance(data, dict):
            raise EstimationError(f"calibration: expected a JSON object, got "
                                  f"{type(data).__name__}")
        if data.get("kind") != CALIBRATION_KIND or data.get("format") != CALIBRATION_FORMAT:
            raise EstimationError(
                f"calibration.kind/format: expected {CALIBRATION_KIND!r} format "
                f"{CALIBRATION_FORMAT}, got {data.get('kind')!r} format {data.get('format')!r}")
        for name in ("x_thresholds", "y_thresholds"):
            if not isinstance(data.get(name), list):
                raise EstimationError(f"calibration.{name}: expected a list of numbers")
        for name in ("rows", "positives"):
            if not isinstance(data.get(name), int) or isinstance(data.get(name), bool):
                raise EstimationError(f"calibration.{name}: expected an integer")
        return cls(x=tuple(_number(v, "x_thresholds") for v in data["x_thresholds"]),
                   y=tuple(_number(v, "y_thresholds") for v in data["y_thresholds"]),
                   rows=data["rows"], positives=data["positives"],
                   fitted_on=str(data.get("fitted_on", "")))

    def to_json(self) -> str:
        """:meth:`to_dict` as indented, key-sorted JSON text."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Calibration:
        """The calibration of ``calibration.json``'s text."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise EstimationError(f"calibration: not valid JSON ({error})") from error
        return cls.from_dict(data)


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise EstimationError(f"calibration.{field}: {value!r} is not a finite number")
    return float(value)


def _check_thresholds(x: tuple[float, ...], y: tuple[float, ...]) -> None:
    """Refuse thresholds that are not a usable isotonic map (naming the field)."""
    if not x or len(x) != len(y):
        raise EstimationError(f"calibration.x_thresholds/y_thresholds: need the same, non-zero "
                              f"number of values (got {len(x)} and {len(y)})")
    if any(b <= a for a, b in itertools.pairwise(x)):
        raise EstimationError("calibration.x_thresholds: must be strictly increasing")
    if any(b < a for a, b in itertools.pairwise(y)):
        raise EstimationError("calibration.y_thresholds: must be non-decreasing")
    if y[0] < 0.0 or y[-1] > 1.0:
        raise EstimationError("calibration.y_thresholds: must lie in [0, 1]")


def fit_calibration(scores: Any, labels: Any, fitted_on: str = "") -> Calibration:
    """Isotonic regression of ``labels`` (0/1) on ``scores``, fitted with scikit-learn, kept
    as its thresholds. Both classes must be present."""
    import numpy as np
    from sklearn.isotonic import IsotonicRegression

    values = checked_probabilities(scores, "scores")
    targets = np.asarray(labels)
    if targets.shape != values.shape:
        raise EstimationError(f"labels: {targets.shape[0] if targets.ndim else 0} labels for "
                              f"{values.size} scores")
    if not np.isin(targets, (0, 1)).all():
        raise EstimationError("labels: must be 0/1")
    positives = int(targets.sum())
    if positives in (0, values.size):
        raise EstimationError("labels: a calibration needs both classes")
    isotonic = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
    isotonic.fit(values, targets.astype("float64"))
    return Calibration(x=tuple(float(v) for v in isotonic.X_thresholds_),
                       y=tuple(float(v) for v in isotonic.y_thresholds_),
                       rows=int(values.size), positives=positives, fitted_on=fitted_on)


@dataclasses.dataclass(frozen=True)
class PerformanceEstimate:
    """The estimated metrics of one window (None when undefined, e.g. no expected positive)."""

    roc_auc: float | None
    accuracy: float
    precision: float | None
    recall: float | None
    rows: int
    threshold: float

    def to_dict(self) -> dict[str, float | int | None]:
        """Metric -> value, plus ``rows`` (the threshold is a setting, not a number measured)."""
        return {"roc_auc": self.roc_auc, "accuracy": self.accuracy,
                "precision": self.precision, "recall": self.recall, "rows": self.rows}


def estimate_performance(scores: Any, calibration: Calibration,
                         threshold: float = 0.5) -> PerformanceEstimate:
    """CBPE of one window from the model's probabilities ``scores`` (see the module docstring).

    ``threshold``: the model's decision threshold (a score at or above it is a positive
    prediction, as :func:`airmlops.training.model.metric_from_scores` decides). Precision is 0
    when nothing is predicted positive (as scikit-learn's ``zero_division=0``).
    """
    if not 0.0 < threshold < 1.0:
        raise EstimationError(f"threshold: must be in (0, 1), got {threshold!r}")
    raw = checked_probabilities(scores, "scores")
    p = calibration.apply(raw)
    predicted = raw >= threshold
    tp, fp = float(p[predicted].sum()), float((1.0 - p[predicted]).sum())
    fn, tn = float(p[~predicted].sum()), float((1.0 - p[~predicted]).sum())
    return PerformanceEstimate(
        roc_auc=estimated_roc_auc(raw, p), accuracy=(tp + tn) / raw.size,
        precision=tp / (tp + fp) if tp + fp > 0 else 0.0,
        recall=tp / (tp + fn) if tp + fn > 0 else None,
        rows=int(raw.size), threshold=float(threshold))


def estimated_roc_auc(scores: np.ndarray, calibrated: np.ndarray) -> float | None:
    """The area under the expected ROC curve: rows by ``scores`` (highest first), TPR the
    cumulative ``calibrated / sum(calibrated)``, FPR the cumulative ``(1 - calibrated) /
    sum(1 - calibrated)``; rows with equal scores form one step (as scikit-learn's curve).
    None when either expected class is empty."""
    import numpy as np

    order = np.argsort(-scores, kind="mergesort")
    ranked, p = scores[order], calibrated[order]
    positives, negatives = float(p.sum()), float((1.0 - p).sum())
    if positives <= 0.0 or negatives <= 0.0:
        return None
    last_of_tie = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    tpr = np.r_[0.0, np.cumsum(p)[last_of_tie] / positives]
    fpr = np.r_[0.0, np.cumsum(1.0 - p)[last_of_tie] / negatives]
    return float(np.trapezoid(tpr, fpr))


def load_run_calibration(run_id: str, tracking_uri: str) -> Calibration | None:
    """The calibration logged in MLflow run ``run_id`` (its ``calibration.json``), or None
    when the run has none (trained before calibrations were logged, or a regression)."""
    import tempfile
    from pathlib import Path

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    names = {item.path for item in client.list_artifacts(run_id)}
    if CALIBRATION_FILE not in names:
        return None
    with tempfile.TemporaryDirectory(prefix="airmlops-calibration-") as scratch:
        local = client.download_artifacts(run_id, CALIBRATION_FILE, scratch)
        return Calibration.from_json(Path(local).read_text(encoding="utf-8"))


def estimate_window(frame: Any, champion: Any, tracking_uri: str,
                    threshold: float) -> tuple[dict[str, float | int | None] | None, str]:
    """The CBPE estimate of a window's predictions by ``champion`` (a registry model version)
    and a note saying what it was computed on, or None and why not.

    ``frame``: the window's flattened predictions (``model_version``, ``prediction``: the
    logged positive-class probability). Only the champion's own rows count (a canary's are
    another model's scores); rows without a probability are left out. A champion whose run
    logged no ``calibration.json`` (trained before calibrations were logged) gets no estimate:
    None, never an error.
    """
    tags = getattr(champion, "tags", None) or {}
    run_id = getattr(champion, "run_id", None) or tags.get("mlflow_run_id")
    calibration = load_run_calibration(run_id, tracking_uri) if run_id else None
    if calibration is None:
        return None, (f"performance not estimated: champion version {champion.version} has no "
                      f"{CALIBRATION_FILE} in its run (trained before calibrations were "
                      "logged)")
    own = frame.loc[frame["model_version"].astype(str) == str(champion.version), "prediction"]
    scores = own.dropna().to_numpy(dtype="float64")
    if scores.size == 0:
        return None, (f"performance not estimated: no probability logged by champion version "
                      f"{champion.version} in this window")
    estimate = estimate_performance(scores, calibration, threshold)
    skipped = len(frame) - scores.size
    return estimate.to_dict(), (
        f"performance estimated (CBPE) from {scores.size} predictions of champion version "
        f"{champion.version} with its calibration" + (f"; {skipped} other rows left out"
                                                     if skipped else ""))


def with_window_estimate(report: Any, frame: Any, champion: Any, tracking_uri: str,
                         threshold: float) -> Any:
    """``report`` (a window measurement or report) with its ``estimated_performance`` and a
    note; a failed estimate (bad probabilities, a stored calibration that does not parse, the
    champion's run gone) is noted too and never fails the window."""
    from mlflow.exceptions import MlflowException

    try:
        estimated, note = estimate_window(frame, champion, tracking_uri, threshold)
    except (EstimationError, OSError, MlflowException) as error:
        estimated, note = None, f"performance not estimated: {error}"
    return dataclasses.replace(report, estimated_performance=estimated,
                               notes=[*report.notes, note])
