"""The ``monitoring:`` section of a pipeline spec.

Every statistical choice is explicit. Evidently picks a column's drift test from the sample size
when none is given (p-value tests up to 1,000 rows, distances above), which would make the
decision depend on traffic volume; here each column gets a named method and threshold, from
``drift.default`` by type unless ``drift.columns`` overrides it.

Defaults, and why:

- numeric columns: ``wasserstein`` (the earth mover's distance divided by the reference
  standard deviation) with threshold ``0.1``, i.e. "the distribution moved by a tenth of a
  reference standard deviation". Evidently 0.7's ``psi`` bins numeric columns into equal-width
  Sturges bins over the combined range, so on skewed columns most of the mass falls into one or
  two bins: on the demo simulator a 40 % drop in sessions gave PSI 0.26 and the matching drop in
  minutes watched only 0.12, under the usual 0.2 threshold, while normed Wasserstein gave 0.42
  and 0.30 (stable data: 0.01-0.05 at 5,000 rows). ``psi`` remains available per column.
- categorical columns: ``jensenshannon`` distance with threshold ``0.1`` (stable data: 0.01-0.02
  at 5,000 rows).
- p-value methods (``ks``, ``chisquare``) are allowed per column, with the threshold read as a
  significance level (drift when the p-value is below it); on a fixed sample size they stay
  meaningful, but a distance says how much, not just whether.

A window is *breached* by any of: the share of drifted model inputs reaching
``policy.max_drift_share`` (``drift_share``), a drifted column marked ``critical``
(``feature:<name>``), prediction drift when ``drift.prediction.breach`` is on
(``prediction_drift``), the performance floor once at least ``performance.min_labels`` labels
have arrived (``performance``), the same floor on the label-free estimate of a binary
classifier's performance (``estimated_performance``), and the data quality limits
(``quality:<kind>:<column>``). Which of these may trigger a retraining is ``policy.triggers``;
quality breaches are recorded and alerted on but do not retrain by default, because retraining
on broken inputs makes the model worse, not better; ``estimated_performance`` is opt-in, because
the estimate cannot see concept drift and is only as good as the model's calibration. The
report only measures; these breaches are decided afterwards from its numbers by
:func:`airmlops.monitoring.judgement.judge`, so a recorded window can be judged again under a
changed config without measuring it again.

``policy.drift_share`` is the former name of ``policy.max_drift_share``: it is still accepted,
with a logged deprecation warning (the measured share of a window keeps the name
``drift_share``).

Labels arrive late: a label that arrives in a window is matched with its prediction from up to
``performance.label_lookback_windows`` window lengths back (default 48: two days of hourly
windows). Each window's files (the collected Parquet, the HTML reports) are kept for
``retention_windows`` window lengths (default 168: a week of hourly windows, never fewer than the
lookback, whose predictions late labels are matched against); the monitoring table and the MLflow
runs keep every window.

:func:`validate_against_spec` checks what needs the spec (column names, types, the task).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from airmlops.spec import PipelineSpec

DriftMethod = Literal["psi", "wasserstein", "ks", "chisquare", "jensenshannon"]
PerformanceMetric = Literal["roc_auc", "precision", "recall", "mae", "rmse"]
TriggerKind = Literal["drift_share", "feature", "prediction_drift", "performance", "quality",
                      "estimated_performance"]

PVALUE_METHODS = frozenset({"ks", "chisquare"})
"""Methods whose score is a p-value: drift when the score is below the threshold."""
NUMERIC_METHODS = frozenset({"psi", "wasserstein", "ks", "jensenshannon"})
CATEGORICAL_METHODS = frozenset({"psi", "chisquare", "jensenshannon"})
METHODS_BY_TYPE = {"numeric": NUMERIC_METHODS, "categorical": CATEGORICAL_METHODS}

HIGHER_IS_BETTER = {"roc_auc": True, "precision": True, "recall": True,
                    "mae": False, "rmse": False}
METRICS_BY_TASK = {
    "binary_classification": ("roc_auc", "precision", "recall"),
    "regression": ("mae", "rmse"),
}

MAX_LOOKBACK_MINUTES = 366 * 1440
"""Labels are matched with predictions of at most this long ago (a year)."""

log = logging.getLogger(__name__)

PRESET_MINUTES = {"@hourly": 60, "@daily": 1440, "@weekly": 10080}
"""Schedules whose interval is known without a cron parser: the window must match it."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_threshold(method: str, threshold: float) -> None:
    if threshold <= 0:
        raise ValueError(f"threshold must be positive (got {threshold})")
    if method in PVALUE_METHODS and threshold >= 1:
        raise ValueError(f"'{method}' returns a p-value: threshold is a significance level "
                         f"in (0, 1) (got {threshold})")
    if method == "jensenshannon" and threshold > 1:
        raise ValueError(f"the Jensen-Shannon distance is at most 1 (got threshold {threshold})")


class DriftTest(_Strict):
    """A drift method and its threshold (a p-value level for ks/chisquare, else a distance)."""

    method: DriftMethod
    threshold: float

    @model_validator(mode="after")
    def _threshold_fits_method(self) -> DriftTest:
        _check_threshold(self.method, self.threshold)
        return self


class DriftDefaults(_Strict):
    """The drift test of every model input not listed in ``drift.columns``, by type."""

    numeric: DriftTest = DriftTest(method="wasserstein", threshold=0.1)
    categorical: DriftTest = DriftTest(method="jensenshannon", threshold=0.1)

    @model_validator(mode="after")
    def _methods_fit_types(self) -> DriftDefaults:
        for kind in ("numeric", "categorical"):
            method = getattr(self, kind).method
            if method not in METHODS_BY_TYPE[kind]:
                raise ValueError(f"{kind}: '{method}' does not apply to {kind} columns; expected "
                                 f"one of {sorted(METHODS_BY_TYPE[kind])}")
        return self


class ColumnDrift(_Strict):
    """A per-column override: its own method/threshold, and whether its drift alone breaches."""

    method: DriftMethod | None = Field(
        default=None, description="Default: the column type's default method.")
    threshold: float | None = Field(
        default=None, description="Required with a method; alone it keeps the default method.")
    critical: bool = Field(
        default=False, description="A drift of this column breaches the window by itself.")

    @model_validator(mode="after")
    def _method_has_threshold(self) -> ColumnDrift:
        if self.method is not None and self.threshold is None:
            raise ValueError(f"method '{self.method}' needs an explicit threshold (Evidently's "
                             "method defaults are not used)")
        if self.method is not None and self.threshold is not None:
            _check_threshold(self.method, self.threshold)
        elif self.threshold is not None and self.threshold <= 0:
            raise ValueError(f"threshold must be positive (got {self.threshold})")
        return self


class PredictionDrift(_Strict):
    """Drift of the model's output (the positive-class probability, or the regression value)."""

    enabled: bool = True
    method: DriftMethod = "wasserstein"
    threshold: float = 0.1
    breach: bool = Field(
        default=False, description="Whether prediction drift alone breaches the window.")

    @model_validator(mode="after")
    def _numeric_method(self) -> PredictionDrift:
        if self.method not in NUMERIC_METHODS:
            raise ValueError(f"method: predictions are numeric; '{self.method}' applies to "
                             f"categorical columns only; expected one of {sorted(NUMERIC_METHODS)}")
        _check_threshold(self.method, self.threshold)
        if self.breach and not self.enabled:
            raise ValueError("breach: prediction drift cannot breach while it is disabled")
        return self


class DriftConfig(_Strict):
    default: DriftDefaults = Field(default_factory=DriftDefaults)
    columns: dict[str, ColumnDrift] = Field(default_factory=dict)
    prediction: PredictionDrift = Field(default_factory=PredictionDrift)

    def test_for(self, column: str, kind: str) -> DriftTest:
        """The method and threshold of one model input of type ``kind`` (numeric/categorical)."""
        default: DriftTest = getattr(self.default, kind)
        override = self.columns.get(column)
        if override is None:
            return default
        if override.method is not None:
            return DriftTest(method=override.method, threshold=override.threshold)
        if override.threshold is not None:
            return DriftTest(method=default.method, threshold=override.threshold)
        return default

    @property
    def critical_columns(self) -> list[str]:
        return sorted(name for name, column in self.columns.items() if column.critical)


class ColumnQuality(_Strict):
    max_missing_share: float | None = Field(default=None, ge=0.0, le=1.0)
    max_out_of_range_share: float | None = Field(default=None, ge=0.0, le=1.0)
    max_new_category_share: float | None = Field(default=None, ge=0.0, le=1.0)


class QualityConfig(_Strict):
    """Limits on the share of a window's rows, per model input.

    Missing: null (or not a number in a numeric column); the limit of a declared feature is at
    least its spec ``max_null_fraction``. Out of range: outside the spec's ``min``/``max`` when
    declared, else outside the reference data's range. New category: a value neither in the
    spec's ``values`` nor seen in the reference data.
    """

    max_missing_share: float = Field(default=0.05, ge=0.0, le=1.0)
    max_out_of_range_share: float = Field(default=0.01, ge=0.0, le=1.0)
    max_new_category_share: float = Field(default=0.01, ge=0.0, le=1.0)
    columns: dict[str, ColumnQuality] = Field(default_factory=dict)

    def limit(self, column: str, kind: Literal["missing", "out_of_range", "new_category"]
              ) -> float:
        field = f"max_{kind}_share"
        override = self.columns.get(column)
        value = getattr(override, field) if override is not None else None
        return getattr(self, field) if value is None else value


class PerformanceConfig(_Strict):
    """Performance on delayed labels, and its floor (a minimum or, for errors, a maximum)."""

    metric: PerformanceMetric | None = Field(
        default=None, description="The metric the floor applies to; none = report only.")
    min: float | None = Field(default=None, description="For roc_auc, precision, recall.")
    max: float | None = Field(default=None, description="For mae, rmse.")
    min_labels: int = Field(
        default=200, ge=1, description="Labelled rows a window needs before its performance is "
        "computed; fewer never counts as a breach.")
    probability_threshold: float = Field(
        default=0.5, gt=0.0, lt=1.0, description="Positive-class cut-off for precision/recall.")
    label_lookback_windows: int = Field(
        default=48, ge=1, le=100_000, description="How many window lengths back a label that "
        "arrives in a window looks for its prediction; a label of an older prediction is "
        "counted as unmatched. Cover the label delay: 48 hourly windows = labels up to 2 days "
        "late.")

    @model_validator(mode="after")
    def _bound_fits_metric(self) -> PerformanceConfig:
        if self.metric is None:
            if self.min is not None or self.max is not None:
                raise ValueError("min/max need a metric")
            return self
        higher = HIGHER_IS_BETTER[self.metric]
        wanted, unwanted = ("min", "max") if higher else ("max", "min")
        if getattr(self, unwanted) is not None:
            raise ValueError(f"'{self.metric}' is {'higher' if higher else 'lower'}-is-better: "
                             f"set {wanted}, not {unwanted}")
        if getattr(self, wanted) is None:
            raise ValueError(f"metric '{self.metric}' needs {wanted}")
        if self.metric in ("roc_auc", "precision", "recall") and not 0.0 <= self.min <= 1.0:
            raise ValueError(f"min of '{self.metric}' must be within [0, 1] (got {self.min})")
        if self.max is not None and self.max <= 0:
            raise ValueError(f"max of '{self.metric}' must be positive (got {self.max})")
        return self

    def breached(self, value: float | None) -> bool:
        """Whether a computed metric value is past the floor (None is never a breach)."""
        if self.metric is None or value is None:
            return False
        return value < self.min if self.min is not None else value > self.max


RENAMED_POLICY_FIELDS = {"drift_share": "max_drift_share"}
"""Former names of policy fields, still accepted with a deprecation warning: old -> new."""


class PolicyConfig(_Strict):
    """When breaches become a retraining."""

    max_drift_share: float = Field(
        default=0.3, gt=0.0, le=1.0,
        description="Share of drifted model inputs at which a window is breached (formerly "
        "`drift_share`, still accepted).")
    k: int = Field(default=2, ge=1, description="Breached windows needed among the last n.")
    n: int = Field(default=3, ge=1, le=1000)
    cooldown_hours: float = Field(default=24.0, ge=0.0, le=24 * 365)
    max_active_retrainings: int = Field(default=1, ge=1, le=10)
    triggers: list[TriggerKind] = Field(
        default_factory=lambda: ["drift_share", "feature", "prediction_drift", "performance"],
        min_length=1, description="Breach kinds that count towards a retraining.",
    )
    _deprecations: tuple[str, ...] = PrivateAttr(default=())

    @model_validator(mode="wrap")
    @classmethod
    def _former_names(cls, data: Any, handler: Any) -> PolicyConfig:
        """Accept a former field name (see RENAMED_POLICY_FIELDS): move its value to the new
        name, log a warning and keep the note in :attr:`deprecations`; both names is an error."""
        notes = []
        if isinstance(data, dict):
            data = dict(data)
            for old, new in RENAMED_POLICY_FIELDS.items():
                if old not in data:
                    continue
                if new in data:
                    raise ValueError(f"policy: set either {new} or its deprecated former name "
                                     f"{old}, not both (got {old}={data[old]!r}, "
                                     f"{new}={data[new]!r})")
                data[new] = data.pop(old)
                notes.append(f"policy.{old} is deprecated: rename it to policy.{new} (the "
                             f"value {data[new]!r} was used as policy.{new})")
        model = handler(data)
        if notes:  # only then: a validated instance passed in again keeps its own notes
            model._deprecations = tuple(notes)
            for note in notes:
                log.warning("monitoring config: %s", note)
        return model

    @property
    def deprecations(self) -> tuple[str, ...]:
        """Notes on deprecated field names this policy was given (empty when none)."""
        return self._deprecations

    @property
    def drift_share(self) -> float:
        """Deprecated former name of :attr:`max_drift_share`, kept readable for old callers."""
        log.warning("monitoring config: policy.drift_share is deprecated: read "
                    "policy.max_drift_share")
        return self.max_drift_share

    @model_validator(mode="after")
    def _k_within_n(self) -> PolicyConfig:
        if self.k > self.n:
            raise ValueError(f"k ({self.k}) must not exceed n ({self.n}): k of the last n windows")
        if len(set(self.triggers)) != len(self.triggers):
            raise ValueError(f"triggers: duplicated entries in {self.triggers}")
        return self


class MonitoringConfig(_Strict):
    """How one pipeline's deployed model is watched, and when it is retrained."""

    schedule: str = Field(default="@hourly", min_length=1,
                          description="Cron or preset of the monitoring DAG: one run per window.")
    window_minutes: int = Field(default=60, ge=5, le=60 * 24 * 31)
    sample_size: int = Field(
        default=5000, ge=200, le=1_000_000,
        description="Rows of the time-stratified sample of each window that the tests run on.")
    reference_sample_size: int = Field(
        default=5000, ge=200, le=1_000_000,
        description="Rows of the fixed sample of the champion's reference data.")
    strata: int = Field(default=12, ge=1, le=1000,
                        description="Equal time buckets of a window, each given an equal share.")
    min_rows: int = Field(
        default=500, ge=1, description="A window with fewer rows is recorded but not tested.")
    seed: int = Field(default=0, ge=0)
    retention_windows: int = Field(
        default=168, ge=1, le=1_000_000,
        description="Window artifacts (the collected Parquet files, the HTML reports and their "
        "snapshots) are kept for this many window lengths before the latest window's end; the "
        "monitoring run deletes older ones. The monitoring table and the MLflow runs keep "
        "every window. At least performance.label_lookback_windows (late labels are matched "
        "against the kept windows' predictions).")
    drift: DriftConfig = Field(default_factory=DriftConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        from airmlops.schedules import check_schedule

        if value.strip().startswith("@") and value.strip() not in PRESET_MINUTES:
            raise ValueError(f"'{value}' does not define windows; expected a cron expression "
                             f"or one of {sorted(PRESET_MINUTES)}")
        return check_schedule(value, presets=tuple(PRESET_MINUTES))

    @model_validator(mode="after")
    def _consistent(self) -> MonitoringConfig:
        schedule = self.schedule.strip()
        if schedule.startswith("@") and schedule not in PRESET_MINUTES:
            raise ValueError(f"schedule: '{self.schedule}' does not define windows; expected a "
                             f"cron expression or one of {sorted(PRESET_MINUTES)}")
        minutes = PRESET_MINUTES.get(schedule)
        if minutes is not None and minutes != self.window_minutes:
            raise ValueError(f"window_minutes ({self.window_minutes}) must equal the interval of "
                             f"schedule '{self.schedule}' ({minutes}): one run per window")
        if self.strata > self.sample_size:
            raise ValueError(f"strata ({self.strata}) must not exceed sample_size "
                             f"({self.sample_size})")
        lookback = self.performance.label_lookback_windows
        if lookback * self.window_minutes > MAX_LOOKBACK_MINUTES:
            raise ValueError(
                f"performance.label_lookback_windows: {lookback} windows of {self.window_minutes} "
                f"minutes reach back {lookback * self.window_minutes / 1440:.0f} days, more than "
                f"{MAX_LOOKBACK_MINUTES // 1440} days")
        if self.retention_windows < lookback:
            raise ValueError(
                f"retention_windows ({self.retention_windows}) must be at least "
                f"performance.label_lookback_windows ({lookback}): late labels are matched "
                "against the predictions of the windows kept")
        return self



def validate_against_spec(config: MonitoringConfig, spec: PipelineSpec) -> None:
    """Check the parts of ``config`` that depend on the spec; raise ValueError listing them all.

    Column names must be model inputs, each column's method must apply to its type and the
    performance metric must fit the task.
    """
    types = spec.input_types
    problems: list[str] = []
    if "prediction" in types:
        problems.append("model input 'prediction': the name is reserved for the model's output "
                        "in the prediction log; rename the feature")
    for name in config.drift.columns:
        if name not in types:
            problems.append(f"monitoring.drift.columns.{name}: not a model input; expected one "
                            f"of {list(types)}")
            continue
        method = config.drift.test_for(name, types[name]).method
        if method not in METHODS_BY_TYPE[types[name]]:
            problems.append(f"monitoring.drift.columns.{name}: '{method}' does not apply to "
                            f"{types[name]} columns; expected one of "
                            f"{sorted(METHODS_BY_TYPE[types[name]])}")
    for name in config.quality.columns:
        if name not in types:
            problems.append(f"monitoring.quality.columns.{name}: not a model input; expected one "
                            f"of {list(types)}")
    metric = config.performance.metric
    if metric is not None and metric not in METRICS_BY_TASK[spec.task]:
        problems.append(f"monitoring.performance.metric: '{metric}' is not a {spec.task} metric; "
                        f"expected one of {list(METRICS_BY_TASK[spec.task])}")
    if "estimated_performance" in config.policy.triggers and (
            spec.task != "binary_classification" or metric is None):
        problems.append("monitoring.policy.triggers: 'estimated_performance' needs a "
                        "binary_classification pipeline and a floor to judge the estimate "
                        "against (monitoring.performance.metric: roc_auc, precision or recall, "
                        "with min)")
    if problems:
        raise ValueError("; ".join(problems))
