"""Model gates: absolute thresholds and a paired bootstrap against the champion.

A gate fails closed: a metric that is missing or NaN, a comparison that could not be made, or a
confidence interval that is not a number all mean "not blessed". Every decision carries the
checks and numbers behind it and is recorded on the MLflow run (TFX's "blessing", in spirit).

The champion comparison is paired: both models score the same held-out rows, and each bootstrap
resample draws the same row indices for both, so the interval is on the difference itself and
row-to-row difficulty cancels out.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from airmlops.spec import PipelineSpec

_CHUNK_CELLS = 4_000_000
"""Resamples are evaluated in chunks of about this many (resample x row) cells, to bound memory."""

_EPS = 1e-15


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """A paired bootstrap of ``metric(a) - metric(b)``.

    ``delta`` is the difference on all rows; ``ci_low``/``ci_high`` the percentile interval at
    ``confidence`` over the ``n_effective`` resamples on which the metric was defined (of
    ``n_requested``). ``comparison`` says which model is ``a`` and which ``b``: results from
    :func:`evaluate_against_champion` are oriented so that a positive delta means the
    challenger is better, whatever the metric's direction.
    """

    metric: str
    delta: float
    ci_low: float
    ci_high: float
    n_effective: int
    n_requested: int
    confidence: float
    value_a: float
    value_b: float
    n_rows: int
    comparison: str = "a - b"

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(dataclasses.asdict(self))


@dataclasses.dataclass
class GateDecision:
    """Whether a challenger is blessed, why, and every check with its numbers."""

    blessed: bool
    reasons: list[str]
    checks: list[dict[str, Any]]
    primary_metric: str
    champion_version: str | None = None
    comparison: BootstrapResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON (NaN becomes null): for XCom, tags and ``gate_decision.json``."""
        return _json_safe(
            {
                "blessed": self.blessed,
                "reasons": list(self.reasons),
                "checks": [dict(check) for check in self.checks],
                "primary_metric": self.primary_metric,
                "champion_version": self.champion_version,
                "comparison": self.comparison.to_dict() if self.comparison else None,
            }
        )


def paired_bootstrap(
    y: Any,
    scores_a: Any,
    scores_b: Any,
    metric: str,
    n: int,
    confidence: float,
    seed: int,
) -> BootstrapResult:
    """Bootstrap ``metric(a) - metric(b)`` with the same resampled rows for both models.

    Resamples where the metric is undefined (a single class, for ``roc_auc``) are skipped and
    not counted in ``n_effective``; with none left, the interval is NaN. Vectorised: each chunk
    of resamples is a matrix of row counts, and every metric is computed from it at once.
    """
    import numpy as np

    from airmlops.training.model import metric_from_scores

    y = np.asarray(y)
    a = np.asarray(scores_a, dtype="float64")
    b = np.asarray(scores_b, dtype="float64")
    rows = len(y)
    if not (len(a) == len(b) == rows) or rows == 0:
        raise ValueError(f"need equal, non-empty lengths; got y={rows}, a={len(a)}, b={len(b)}")
    if n < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need n >= 1 and 0 < confidence < 1; got n={n}, {confidence=}")
    value_a = metric_from_scores(metric, y, a)
    value_b = metric_from_scores(metric, y, b)

    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_CELLS // rows)
    deltas = []
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        indices = rng.integers(0, rows, size=(size, rows))
        offsets = (np.arange(size) * rows)[:, None]
        counts = np.bincount((indices + offsets).ravel(), minlength=size * rows)
        counts = counts.reshape(size, rows).astype("float64")
        deltas.append(
            _weighted_metric(metric, y, a, counts) - _weighted_metric(metric, y, b, counts)
        )
    all_deltas = np.concatenate(deltas)
    valid = all_deltas[np.isfinite(all_deltas)]
    if len(valid):
        alpha = (1.0 - confidence) / 2.0
        ci_low, ci_high = (float(v) for v in np.quantile(valid, [alpha, 1.0 - alpha]))
    else:
        ci_low = ci_high = float("nan")
    return BootstrapResult(
        metric=metric,
        delta=value_a - value_b,
        ci_low=ci_low,
        ci_high=ci_high,
        n_effective=len(valid),
        n_requested=n,
        confidence=confidence,
        value_a=value_a,
        value_b=value_b,
        n_rows=rows,
    )


def decide(
    spec: PipelineSpec,
    challenger_metrics: dict[str, float],
    comparison: BootstrapResult | None,
    champion_version: str | None,
    comparison_error: str | None = None,
) -> GateDecision:
    """Bless the challenger only if every check passes; any missing number fails closed.

    Checks: the primary metric is a number; each ``gates.thresholds`` bound holds (a minimum
    for higher-is-better metrics, a maximum otherwise); and, when there is a champion, the
    lower confidence bound of the primary metric's improvement over it is at least
    ``-max_regression``. ``comparison`` must be oriented so that positive means the challenger
    is better (as :func:`evaluate_against_champion` returns it).
    """
    gates = spec.gates
    primary = gates.primary_metric
    primary_value = _number(challenger_metrics.get(primary))
    results = [
        _check("primary_metric_present", primary, primary_value, None,
               primary_value is not None, f"{primary} is missing or not a number"),
        *_threshold_checks(gates.thresholds, challenger_metrics),
    ]
    if champion_version is not None:
        results.append(_champion_check(primary, -gates.champion.max_regression, comparison,
                                       champion_version, comparison_error))
    checks = [check for check, _ in results]
    reasons = [why for check, why in results if not check["passed"]]
    blessed = all(check["passed"] for check in checks)
    if blessed:
        against = (
            f"no regression against champion version {champion_version}"
            if champion_version is not None
            else "no champion to compare against"
        )
        reasons.append(f"all {len(checks)} checks passed; {against}")
    return GateDecision(
        blessed=blessed,
        reasons=reasons,
        checks=checks,
        primary_metric=primary,
        champion_version=champion_version,
        comparison=comparison,
    )


def _check(check: str, metric: str, value: Any, bound: Any, passed: bool,
           why: str) -> tuple[dict[str, Any], str]:
    """One gate check as the decision records it, with the reason it gives when it fails."""
    return {"check": check, "metric": metric, "value": value, "bound": bound,
            "passed": passed}, why


def _threshold_checks(thresholds: dict[str, float],
                      metrics: dict[str, float]) -> list[tuple[dict[str, Any], str]]:
    """A ``min`` (higher-is-better metric) or ``max`` check per ``gates.thresholds`` entry, in
    name order; a metric that is missing or not a number fails its check."""
    from airmlops.spec import HIGHER_IS_BETTER

    results = []
    for metric, bound in sorted(thresholds.items()):
        value = _number(metrics.get(metric))
        higher = HIGHER_IS_BETTER[metric]
        kind = "min" if higher else "max"
        if value is None:
            results.append(_check(kind, metric, None, bound, False,
                                  f"{metric} is missing or not a number"))
            continue
        passed = value >= bound if higher else value <= bound
        sign = ">=" if higher else "<="
        results.append(_check(kind, metric, value, bound, passed,
                              f"{metric} = {value:.4f} does not meet {sign} {bound}"))
    return results


def _champion_check(primary: str, bound: float, comparison: BootstrapResult | None,
                    champion_version: str, comparison_error: str | None,
                    ) -> tuple[dict[str, Any], str]:
    """The ``champion_ci_low`` check: the lower confidence bound of the primary metric's
    improvement over the champion is a number and at least ``bound``; it fails closed when no
    comparison was made (``comparison_error`` says why) or it is on another metric."""
    ci_low = _number(comparison.ci_low) if comparison is not None else None
    if comparison is None:
        why = f"no comparison with champion version {champion_version} was made"
        if comparison_error:
            why += f": {comparison_error}"
    elif comparison.metric != primary:
        why = f"the comparison is on {comparison.metric}, not the primary metric {primary}"
        ci_low = None
    elif ci_low is None:
        why = (
            f"the {primary} confidence interval against champion version "
            f"{champion_version} is not a number ({comparison.n_effective} usable resamples)"
        )
    else:
        why = (
            f"{primary} may regress against champion version {champion_version}: lower "
            f"{comparison.confidence:.0%} bound of the improvement is {ci_low:.4f} < {bound}"
        )
    return _check("champion_ci_low", primary, ci_low, bound,
                  ci_low is not None and ci_low >= bound, why)


MIN_UNSEEN_ROWS = 100
"""Fewest held-out rows after a refit champion's data end for it to be compared on them."""


def unseen_by_champion(spec: PipelineSpec, test_df: pd.DataFrame, champion_uri: str,
                       champion_tags: Mapping[str, str]) -> tuple[str, pd.DataFrame, str | None]:
    """The model and held-out rows the champion comparison uses, so that the champion is never
    judged on rows it was fitted on; (model URI, rows, a note or None).

    A champion refit on every labelled row of its batch (``training.refit``, tags
    ``refit.data_end`` and ``heldout.model_uri``) has seen the challenger's held-out rows up
    to its data end. It is compared on the rows after that when there are at least
    :data:`MIN_UNSEEN_ROWS`; otherwise its held-out fit stands in for it: the same estimator
    on the same batch, fitted before that batch's own held-out rows, hence before any of these
    rows. A champion that was not refit is compared as it is, on every held-out row.
    """
    import pandas as pd

    seen_until = champion_tags.get("refit.data_end")
    if not seen_until:
        return champion_uri, test_df, None
    timestamps = pd.to_datetime(test_df[spec.timestamp], utc=True)
    unseen = test_df.loc[timestamps > pd.Timestamp(seen_until)]
    if len(unseen) >= MIN_UNSEEN_ROWS:
        return champion_uri, unseen, (
            f"the champion was refit on rows up to {seen_until}: compared on the "
            f"{len(unseen)} held-out rows after that")
    stand_in = champion_tags.get("heldout.model_uri", "")
    if stand_in.startswith("models:/"):
        return stand_in, test_df, (
            f"the champion was refit on rows up to {seen_until}, which include all but "
            f"{len(unseen)} held-out rows: its held-out fit {stand_in} stands in for it")
    return champion_uri, test_df, (
        f"the champion was refit on rows up to {seen_until} and has no held-out fit on record: "
        "compared on rows it has seen (its score is optimistic)")


def evaluate_against_champion(
    spec: PipelineSpec,
    test_df: pd.DataFrame,
    challenger_uri: str,
    champion_uri: str,
    *,
    tracking_uri: str | None = None,
) -> BootstrapResult:
    """Paired bootstrap of challenger vs champion on the same held-out rows, primary metric.

    Only the last ``gates.champion.recent_days`` of ``test_df`` are used when that is set.
    The result is oriented so that a positive delta means the challenger is better:
    ``challenger - champion`` for higher-is-better metrics, ``champion - challenger`` otherwise.
    Both models are loaded by :func:`airmlops.model_files.load_registered_model` (skops, exact
    trusted types, digests recorded at logging), so a tampered artifact raises
    :class:`~airmlops.model_files.ModelLoadError` before it is parsed.
    """
    import pandas as pd

    from airmlops.model_files import load_registered_model
    from airmlops.spec import HIGHER_IS_BETTER
    from airmlops.training.model import label_array, predict_scores

    rows = test_df
    recent_days = spec.gates.champion.recent_days
    if recent_days is not None:
        timestamps = pd.to_datetime(test_df[spec.timestamp])
        rows = test_df.loc[timestamps >= timestamps.max() - pd.Timedelta(days=recent_days)]
    y = label_array(spec, rows)

    challenger = load_registered_model(challenger_uri, tracking_uri)
    champion = load_registered_model(champion_uri, tracking_uri)
    challenger_scores = predict_scores(spec, challenger, rows)
    champion_scores = predict_scores(spec, champion, rows)

    metric = spec.gates.primary_metric
    settings = spec.gates.champion
    if HIGHER_IS_BETTER[metric]:
        a, b, comparison = challenger_scores, champion_scores, "challenger - champion"
    else:
        a, b, comparison = champion_scores, challenger_scores, "champion - challenger"
    result = paired_bootstrap(
        y, a, b, metric,
        n=settings.n_bootstrap, confidence=settings.confidence, seed=spec.estimator.seed,
    )
    return dataclasses.replace(result, comparison=comparison)


def log_decision(decision: GateDecision, run_id: str, tracking_uri: str) -> None:
    """Record a decision on its run: tags, ``gate_*`` metrics and ``gate_decision.json``.

    Safe to repeat: tags and the artifact are overwritten with the same content.
    """
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    client.set_tag(run_id, "gate_blessed", str(decision.blessed).lower())
    client.set_tag(run_id, "gate_reasons", "; ".join(decision.reasons)[:5000])
    if decision.champion_version is not None:
        client.set_tag(run_id, "gate_champion_version", decision.champion_version)
    comparison = decision.comparison
    if comparison is not None:
        metrics = {
            "gate_delta": comparison.delta,
            "gate_delta_ci_low": comparison.ci_low,
            "gate_delta_ci_high": comparison.ci_high,
            "gate_n_effective": float(comparison.n_effective),
        }
        for key, value in metrics.items():
            if math.isfinite(value):
                client.log_metric(run_id, key, value)
    client.log_text(run_id, json.dumps(decision.to_dict(), indent=2), "gate_decision.json")


def _weighted_metric(metric: str, y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``metric`` for each row of the count matrix ``w`` (resamples x rows); NaN if undefined."""
    import numpy as np

    from airmlops.training.model import DECISION_THRESHOLD

    total = w.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        if metric == "mae":
            return w @ np.abs(y - scores) / total
        if metric == "rmse":
            return np.sqrt(w @ (y - scores) ** 2 / total)
        if metric == "r2":
            y = y.astype("float64")
            residual = w @ (y - scores) ** 2
            spread = w @ y**2 - (w @ y) ** 2 / total
            return np.where(spread > 0, 1.0 - residual / spread, np.nan)
        if metric == "log_loss":
            p = np.clip(scores, _EPS, 1 - _EPS)
            return w @ -(y * np.log(p) + (1 - y) * np.log(1 - p)) / total
        if metric == "roc_auc":
            return _weighted_auc(y, scores, w)
        predicted = (scores >= DECISION_THRESHOLD).astype("float64")
        positive = (y == 1).astype("float64")
        true_pos = w @ (predicted * positive)
        if metric == "accuracy":
            return w @ (predicted == positive).astype("float64") / total
        if metric == "precision":
            return np.nan_to_num(true_pos / (w @ predicted), nan=0.0)
        if metric == "recall":
            return np.nan_to_num(true_pos / (w @ positive), nan=0.0)
        if metric == "f1":
            return np.nan_to_num(2 * true_pos / (w @ predicted + w @ positive), nan=0.0)
    raise ValueError(f"unknown metric '{metric}'")


def _weighted_auc(y: np.ndarray, scores: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC per resample (Mann-Whitney, ties counted half), from row counts ``w``."""
    import numpy as np

    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    positive = (y[order] == 1).astype("float64")
    pos = w[:, order] * positive
    neg = w[:, order] * (1.0 - positive)
    # Tie groups of equal scores: each row's group spans [first, last] in sorted order.
    new_group = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    group = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    first = starts[group]
    last = (np.r_[starts[1:], len(scores)] - 1)[group]
    cum_neg = np.cumsum(neg, axis=1)
    padded = np.concatenate([np.zeros((w.shape[0], 1)), cum_neg], axis=1)
    below = padded[:, first]
    tied = padded[:, last + 1] - below
    pos_total, neg_total = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (pos * (below + 0.5 * tied)).sum(axis=1) / (pos_total * neg_total)
    return np.where((pos_total > 0) & (neg_total > 0), auc, np.nan)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        return _json_safe(value.item())
    return value
