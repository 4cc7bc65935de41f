"""The judgement of one window: which breach conditions its measured numbers meet.

Measuring (:mod:`airmlops.monitoring.drift`) and judging are apart: the report holds numbers
only (each column's score and drift verdict under its own method and threshold, the measured
drift share, the prediction drift, the performance and the data quality shares), and
:func:`judge` decides the breaches from those numbers and the spec's ``monitoring:`` config:

- ``drift_share``: the measured share of drifted model inputs is at least
  ``policy.max_drift_share``;
- ``feature:<name>``: a column marked ``critical`` in ``drift.columns`` drifted;
- ``prediction_drift``: the prediction drifted and ``drift.prediction.breach`` is on;
- ``performance``: with at least ``performance.min_labels`` labels, the metric is past its floor;
- ``estimated_performance``: the label-free estimate of the same metric
  (:mod:`airmlops.monitoring.estimation`), on at least ``performance.min_labels`` predictions,
  is past the same floor (it counts towards a retraining only when listed in
  ``policy.triggers``: it is blind to concept drift, and wrong when the model is not calibrated);
- ``quality:<kind>:<column>``: a share of missing values, out-of-range values or new categories
  is above its limit (the missing limit of a declared feature is at least its spec
  ``max_null_fraction``).

:func:`judge` is pure: it reads no clock, file or store, so a recorded window can be judged again
under a changed config without measuring it again (:meth:`WindowNumbers.from_row` reads a
window row of :meth:`airmlops.monitoring.store.MonitoringStore.window`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from airmlops.monitoring.config import MonitoringConfig
    from airmlops.spec import PipelineSpec

QualityKind = Literal["missing", "out_of_range", "new_category"]
QUALITY_KINDS: tuple[QualityKind, ...] = ("missing", "out_of_range", "new_category")


@dataclass(frozen=True)
class WindowNumbers:
    """The measured numbers of one window that the judgement reads.

    ``drifted``: each model input's drift verdict under its own method and threshold (None when
    it was not tested); ``drift_share``: the measured share of drifted inputs (None when drift
    was not tested); ``prediction_drifted``: the prediction's verdict (None when not tested);
    ``performance``: metric name -> value (None when not computed); ``label_count``: the
    labelled rows it was computed on; ``quality``: column -> ``{"missing_share": ...,
    "out_of_range_share" | "new_category_share": ...}`` (other keys are ignored);
    ``estimated_performance``: metric name -> estimated value, and ``rows`` (None when there is
    no estimate).
    """

    drift_share: float | None = None
    drifted: Mapping[str, bool | None] = field(default_factory=dict)
    prediction_drifted: bool | None = None
    performance: Mapping[str, float | None] | None = None
    label_count: int = 0
    quality: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    estimated_performance: Mapping[str, float | int | None] | None = None

    @classmethod
    def from_report(cls, report: Any) -> WindowNumbers:
        """The numbers of a :class:`~airmlops.monitoring.measurement.WindowMeasurement` (or of
        a ``WindowReport``, whose breaches are ignored)."""
        prediction = report.prediction_drift
        return cls(
            drift_share=report.drift_share,
            drifted={name: result.drifted for name, result in report.columns.items()},
            prediction_drifted=prediction.drifted if prediction is not None else None,
            performance=report.performance, label_count=report.label_count,
            quality=report.quality,
            estimated_performance=getattr(report, "estimated_performance", None),
        )

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> WindowNumbers:
        """The numbers of a recorded window (a row of ``MonitoringStore.window``, its JSON
        columns decoded); its stored ``breaches`` are ignored."""
        missing = [name for name in ("columns", "label_count", "quality") if name not in row]
        if missing:
            raise ValueError(f"the window row lacks {missing}: expected a row of "
                             "MonitoringStore.window")
        prediction = row.get("prediction_drift")
        return cls(
            drift_share=row.get("drift_share"),
            drifted={name: (result or {}).get("drifted")
                     for name, result in (row["columns"] or {}).items()},
            prediction_drifted=prediction.get("drifted") if prediction else None,
            performance=row.get("performance"), label_count=int(row["label_count"] or 0),
            quality=row["quality"] or {},
            estimated_performance=row.get("estimated_performance"),
        )


@dataclass(frozen=True)
class Judgement:
    """The breaches of one window, sorted, and for each one why (breach -> plain sentence)."""

    breaches: list[str]
    reasons: dict[str, str]


def quality_limit(config: MonitoringConfig, spec: PipelineSpec | None, column: str,
                  kind: QualityKind) -> float:
    """The largest share of ``column``'s values of ``kind`` a window may have.

    From ``quality`` (the column's override, else the default); the missing limit of a feature
    the spec declares is at least its ``max_null_fraction`` unless the column sets its own
    ``max_missing_share`` (the spec already allows that many nulls).
    """
    limit = config.quality.limit(column, kind)
    if kind != "missing" or spec is None:
        return limit
    override = config.quality.columns.get(column)
    if override is not None and override.max_missing_share is not None:
        return limit
    feature = next((f for f in spec.features if f.name == column), None)
    return limit if feature is None else max(limit, feature.max_null_fraction)


def _drift_share(numbers: WindowNumbers, config: MonitoringConfig) -> dict[str, str]:
    share, limit = numbers.drift_share, config.policy.max_drift_share
    if share is None or share < limit:
        return {}
    return {"drift_share": f"{share:.3g} of the model inputs drifted, at least "
                           f"policy.max_drift_share ({limit})"}


def _critical(numbers: WindowNumbers, config: MonitoringConfig) -> dict[str, str]:
    return {f"feature:{name}": f"critical column '{name}' drifted"
            for name in config.drift.critical_columns if numbers.drifted.get(name)}


def _prediction(numbers: WindowNumbers, config: MonitoringConfig) -> dict[str, str]:
    if not (numbers.prediction_drifted and config.drift.prediction.breach):
        return {}
    return {"prediction_drift": "the prediction drifted and drift.prediction.breach is on"}


def _performance(numbers: WindowNumbers, config: MonitoringConfig) -> dict[str, str]:
    floor = config.performance
    if floor.metric is None or numbers.performance is None:
        return {}
    if numbers.label_count < floor.min_labels:
        return {}  # too few labels never count as a breach
    value = numbers.performance.get(floor.metric)
    if not floor.breached(value):
        return {}
    bound = (f"below performance.min ({floor.min})" if floor.min is not None
             else f"above performance.max ({floor.max})")
    return {"performance": f"{floor.metric} {value:.4g} on {numbers.label_count} labels, "
                           f"{bound}"}


def _estimated_performance(numbers: WindowNumbers, config: MonitoringConfig) -> dict[str, str]:
    floor, estimate = config.performance, numbers.estimated_performance
    if floor.metric is None or not estimate:
        return {}
    rows = int(estimate.get("rows") or 0)
    if rows < floor.min_labels:
        return {}  # as few predictions as too few labels: too noisy to judge
    value = estimate.get(floor.metric)
    if not floor.breached(value):
        return {}
    return {"estimated_performance": f"estimated {floor.metric} {value:.4g} on {rows} "
                                     f"predictions (no labels), below performance.min "
                                     f"({floor.min})"}


def _quality(numbers: WindowNumbers, config: MonitoringConfig,
             spec: PipelineSpec | None) -> dict[str, str]:
    reasons = {}
    for column, entry in numbers.quality.items():
        for kind in QUALITY_KINDS:
            share = entry.get(f"{kind}_share")
            if share is None:
                continue
            limit = quality_limit(config, spec, column, kind)
            if share > limit:
                reasons[f"quality:{kind}:{column}"] = (
                    f"{share:.3g} of '{column}' {kind.replace('_', ' ')}, above the limit "
                    f"{limit:.3g}")
    return reasons


def judge(numbers: WindowNumbers, config: MonitoringConfig,
          spec: PipelineSpec | None = None) -> Judgement:
    """Decide the breaches of a window from its measured ``numbers`` under ``config``.

    ``spec`` gives the declared features' ``max_null_fraction`` (a floor of their missing
    limit); pass the pipeline's spec, as the measurement does, for the same verdict.
    """
    reasons = {
        **_drift_share(numbers, config), **_critical(numbers, config),
        **_prediction(numbers, config), **_performance(numbers, config),
        **_estimated_performance(numbers, config), **_quality(numbers, config, spec),
    }
    return Judgement(breaches=sorted(reasons), reasons=reasons)


def rejudge_window(row: Mapping[str, Any], config: MonitoringConfig,
                   spec: PipelineSpec | None = None) -> Judgement:
    """The judgement of a recorded window row under ``config`` (possibly not the one it was
    recorded with), without measuring it again."""
    return judge(WindowNumbers.from_row(row), config, spec)
