"""One monitoring window's report: drift, data quality and performance, with Evidently 0.7.

Cost is bounded and decisions do not depend on traffic volume:

1. the window is reduced first to a fixed-size, time-stratified sample
   (:func:`stratified_sample`: ``sample_size`` rows, equal shares per time bucket, the same
   rows for the same window and seed);
2. Evidently's ``ValueDrift`` runs on that sample against the reference sample (fixed at deploy),
   with each column's method and threshold from the spec, never Evidently's size-dependent
   defaults; the prediction gets the same treatment;
3. data quality shares (missing, out of range, new categories) are exact counts over the whole
   window with vectorised pandas (cheap, and an incident touching 0.5 % of rows must not hide in
   a sample); the HTML shows Evidently's matching metrics on the sample;
4. performance needs labels (joined on the request id): with at least ``min_labels`` labelled
   rows, a stratified sample of them goes through Evidently's classification or regression
   metrics; with fewer, performance is ``None`` and never a breach.

The Evidently calls used (0.7 API): ``Report([...], include_tests=True).run(current, reference)``
over ``Dataset.from_pandas(frame, data_definition=DataDefinition(numerical_columns=...,
categorical_columns=..., classification=[BinaryClassification(...)] | regression=[Regression(
...)]))`` with the metrics ``ValueDrift(column, method, threshold)``, ``DriftedColumnsCount(
columns, per_column_method, per_column_threshold, drift_share)``, ``MissingValueCount``,
``OutRangeValueCount``, ``OutListValueCount``, ``RocAuc``/``Precision``/``Recall`` and
``MAE``/``RMSE``; each column's verdict is the status of ValueDrift's own test, the HTML comes
from ``Snapshot.save_html`` and the machine-readable snapshot from ``Snapshot.dumps`` (loadable
with ``Snapshot.loads``).

Measuring is apart from judging: :func:`measure_window` (and :func:`measure_performance`, for
performance alone) return numbers only, a :class:`WindowMeasurement`; the breaches are decided
from them by :func:`airmlops.monitoring.judgement.judge`. :func:`compute_window_report` does
both and returns a :class:`WindowReport` (the numbers plus the breaches). The policy's
``max_drift_share`` reaches the measurement only as the threshold line of
``DriftedColumnsCount`` in the HTML report; the numbers do not depend on it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.data.categories import BOOLEAN_VALUES
from airmlops.monitoring.judgement import Judgement, WindowNumbers, judge, quality_limit
from airmlops.monitoring.policy import check_window_id
from airmlops.monitoring.reference import (
    PREDICTION_COLUMN,
    ReferenceProfile,
    _atomic_write,
    prepare_column,
    prepare_inputs,
)

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.monitoring.config import MonitoringConfig
    from airmlops.spec import PipelineSpec

TIMESTAMP_COLUMN = "ts"
"""The prediction log's time column (airmlops.serving.prediction_log)."""
REQUEST_ID_COLUMN = "request_id"


@dataclass(frozen=True)
class ColumnDriftResult:
    """One column's drift test: the explicit method and threshold, the score and the verdict.

    ``score``/``drifted`` are None when the column had no values to compare.
    """

    method: str
    threshold: float
    score: float | None
    drifted: bool | None


@dataclass(frozen=True)
class WindowMeasurement:
    """The numbers of one window, without any judgement of them.

    ``columns``: each model input's drift test (method, threshold, score, verdict);
    ``drift_share``: the measured share of drifted inputs (None when drift was not tested);
    ``quality``: per input the measured shares, with the limits and valid range they were
    measured against as metadata; ``performance``: metric -> value on ``label_count`` labelled
    rows (None below ``performance.min_labels``).
    """

    window_id: str
    start: dt.datetime
    end: dt.datetime
    rows: int
    sampled: int
    columns: dict[str, ColumnDriftResult]
    drift_share: float | None
    prediction_drift: ColumnDriftResult | None
    quality: dict[str, dict[str, float]]
    performance: dict[str, float] | None
    label_count: int
    notes: list[str] = field(default_factory=list)
    html_path: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def drift_assessed(self) -> bool:
        return self.drift_share is not None


@dataclass(frozen=True)
class WindowReport:
    """The numbers of one window, and which breach conditions they meet."""

    window_id: str
    start: dt.datetime
    end: dt.datetime
    rows: int
    sampled: int
    columns: dict[str, ColumnDriftResult]
    drift_share: float | None
    prediction_drift: ColumnDriftResult | None
    quality: dict[str, dict[str, float]]
    performance: dict[str, float] | None
    label_count: int
    breaches: list[str]
    notes: list[str] = field(default_factory=list)
    html_path: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @classmethod
    def judged(cls, measurement: WindowMeasurement, judgement: Judgement) -> WindowReport:
        """A measurement with the breaches its judgement decided."""
        values = {f.name: getattr(measurement, f.name)
                  for f in dataclasses.fields(WindowMeasurement)}
        return cls(**values, breaches=list(judgement.breaches))

    @property
    def drift_assessed(self) -> bool:
        return self.drift_share is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (times as ISO 8601)."""
        data = dataclasses.asdict(self)
        data["start"] = self.start.isoformat()
        data["end"] = self.end.isoformat()
        return data


def stratified_sample(window_df: pd.DataFrame, ts_column: str, size: int, seed: int, *,
                      strata: int = 12) -> pd.DataFrame:
    """At most ``size`` rows of ``window_df``, spread evenly over time, in time order.

    The span between the first and last timestamp is cut into ``strata`` equal buckets and each
    gets an equal share of ``size`` (a bucket with fewer rows gives all of them and its unused
    share goes to the others), so a burst of traffic cannot dominate the sample. Rows are drawn
    without replacement by an RNG seeded with ``(seed, bucket)``: the same window and seed give
    the same sample, whatever the order of the input rows (rows with identical timestamps keep
    their input order). Rows without a timestamp are left out; a window of at most ``size`` rows
    comes back whole.
    """
    import numpy as np
    import pandas as pd

    if size < 1 or strata < 1:
        raise ValueError(f"size and strata must be positive (got {size}, {strata})")
    stamps = pd.DatetimeIndex(pd.to_datetime(window_df[ts_column], utc=True)).asi8
    valid = np.flatnonzero(stamps != np.iinfo(np.int64).min)
    order = valid[np.argsort(stamps[valid], kind="stable")]
    if len(order) <= size:
        return window_df.iloc[order].reset_index(drop=True)
    ordered = stamps[order]
    first, span = int(ordered[0]), int(ordered[-1]) - int(ordered[0]) + 1
    edges = first + (np.arange(1, strata) * span) // strata
    bounds = np.concatenate(([0], np.searchsorted(ordered, edges, side="left"), [len(order)]))
    capacity = np.diff(bounds)
    quota = _equal_shares(capacity, size)
    picked = []
    for bucket in range(strata):
        if quota[bucket] == 0:
            continue
        rng = np.random.default_rng([seed, bucket])
        chosen = rng.choice(int(capacity[bucket]), size=int(quota[bucket]), replace=False)
        picked.append(bounds[bucket] + np.sort(chosen))
    positions = np.concatenate(picked)
    return window_df.iloc[order[positions]].reset_index(drop=True)


def _equal_shares(capacity: Any, size: int) -> Any:
    """Split ``size`` into equal integer shares over buckets, capped by each one's capacity."""
    import numpy as np

    quota = np.zeros(len(capacity), dtype=np.int64)
    remaining = min(int(size), int(capacity.sum()))
    while remaining > 0:
        open_buckets = np.flatnonzero(capacity > quota)
        share, extra = divmod(remaining, len(open_buckets))
        for i, bucket in enumerate(open_buckets):
            add = min(int(capacity[bucket] - quota[bucket]), share + (1 if i < extra else 0))
            quota[bucket] += add
            remaining -= add
    return quota


def window_seed(seed: int, window_id: str) -> int:
    """A per-window seed: windows get different samples, a repeated window the same one."""
    digest = hashlib.sha256(window_id.encode()).digest()
    return (seed * 1_000_003 + int.from_bytes(digest[:8], "big")) % (2**63)


def _valid_range(feature: Any, profile: Any) -> tuple[float | None, float | None]:
    """The range a numeric input's values should fall in (None = open on that side): the spec's
    bounds when it declares any, else the whole reference data's min and max."""
    if feature is not None and (feature.min is not None or feature.max is not None):
        return feature.min, feature.max
    if profile is not None:
        return profile.min, profile.max
    return None, None


def _quality(window: pd.DataFrame, reference: ReferenceProfile, spec: PipelineSpec,
             config: MonitoringConfig) -> dict[str, dict[str, float]]:
    """Exact data quality shares per model input over the whole window (one column at a time,
    so memory stays at one column's copy), each with the limit it is judged against and, for
    numeric inputs, the valid range it was measured against."""
    import numpy as np
    import pandas as pd

    declared = {f.name: f for f in spec.features}
    booleans = set(spec.boolean_features)
    quality: dict[str, dict[str, float]] = {}
    rows = len(window)
    for name, kind in spec.input_types.items():
        values = prepare_column(window, name, kind, boolean=name in booleans)
        present = ~pd.isna(values)
        count = int(present.sum())
        missing_share = 1.0 - count / rows if rows else 0.0
        feature = declared.get(name)
        entry = {"missing_share": missing_share,
                 "max_missing_share": quality_limit(config, spec, name, "missing")}
        profile = reference.columns.get(name)
        if kind == "numeric":
            low, high = _valid_range(feature, profile)
            array = values[present]
            outside = np.zeros(len(array), dtype=bool)
            if low is not None:
                outside |= array < low
            if high is not None:
                outside |= array > high
            share = float(outside.sum() / count) if count else 0.0
            limit = quality_limit(config, spec, name, "out_of_range")
            entry.update({"out_of_range_share": share, "max_out_of_range_share": limit,
                          "range_min": low, "range_max": high})
        else:
            known = set(profile.categories) if profile is not None else set()
            if feature is not None and feature.values:
                known |= set(feature.values)
            if name in booleans:  # "false" is no new category of a reference of all "true"
                known |= set(BOOLEAN_VALUES)
            new = (~pd.Series(values[present]).isin(known).to_numpy() if known
                   else np.zeros(count, dtype=bool))
            share = float(new.sum() / count) if count else 0.0
            limit = quality_limit(config, spec, name, "new_category")
            entry.update({"new_category_share": share, "max_new_category_share": limit})
        quality[name] = entry
    return quality


def _definition(numeric: list[str], categorical: list[str], **tasks: Any) -> Any:
    from evidently import DataDefinition

    return DataDefinition(numerical_columns=numeric, categorical_columns=categorical,
                          text_columns=[], datetime_columns=[], unknown_columns=[],
                          list_columns=[], **tasks)


def _verdicts(snapshot: Any) -> tuple[dict[str, float | None], dict[str, bool]]:
    """ValueDrift scores by column, and Evidently's own verdict from each one's drift test."""
    results = snapshot.dict()
    scores: dict[str, float | None] = {}
    metric_column: dict[str, str] = {}
    for metric in results["metrics"]:
        config = metric.get("config", {})
        if config.get("type") == "evidently:metric_v2:ValueDrift":
            scores[config["column"]] = _finite(metric["value"])
            metric_column[metric["id"]] = config["column"]
    drifted: dict[str, bool] = {}
    for test in results["tests"]:
        column = metric_column.get(test.get("metric_config", {}).get("metric_id"))
        if column is not None and test.get("id") == "drift":
            drifted[column] = test["status"] == "FAIL"
    return scores, drifted


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _drift(reference: ReferenceProfile, sample: pd.DataFrame, spec: PipelineSpec,
           config: MonitoringConfig, notes: list[str]) -> tuple[
               dict[str, ColumnDriftResult], ColumnDriftResult | None, Any]:
    """Evidently drift (plus quality metrics for the HTML) on the window sample vs reference."""
    from evidently import Dataset, Report
    from evidently.metrics import (
        DriftedColumnsCount,
        MissingValueCount,
        OutListValueCount,
        OutRangeValueCount,
        ValueDrift,
    )

    types = spec.input_types
    tests = {name: config.drift.test_for(name, kind) for name, kind in types.items()}
    reference_sample = reference.sample
    testable = []
    for name in types:
        if sample[name].notna().any() and reference_sample[name].notna().any():
            testable.append(name)
        else:
            notes.append(f"drift of '{name}' not tested: no values in the "
                         f"{'window' if reference_sample[name].notna().any() else 'reference'}")
    predicted = (config.drift.prediction.enabled and reference.has_prediction
                 and PREDICTION_COLUMN in sample.columns and sample[PREDICTION_COLUMN].notna().any()
                 and reference_sample[PREDICTION_COLUMN].notna().any())
    if config.drift.prediction.enabled and not predicted:
        notes.append("prediction drift not tested: no predictions in the "
                     f"{'reference' if not reference.has_prediction else 'window'}")
    metrics: list[Any] = [ValueDrift(column=name, method=tests[name].method,
                                     threshold=tests[name].threshold) for name in testable]
    if testable:  # the policy's share is only the HTML's threshold line, not in the numbers
        metrics.append(DriftedColumnsCount(
            columns=testable, drift_share=config.policy.max_drift_share,
            per_column_method={n: tests[n].method for n in testable},
            per_column_threshold={n: tests[n].threshold for n in testable},
        ))
    if predicted:
        prediction = config.drift.prediction
        metrics.append(ValueDrift(column=PREDICTION_COLUMN, method=prediction.method,
                                  threshold=prediction.threshold))
    declared = {f.name: f for f in spec.features}
    booleans = set(spec.boolean_features)
    for name, kind in types.items():
        metrics.append(MissingValueCount(column=name))
        feature, profile = declared.get(name), reference.columns[name]
        if kind == "numeric":
            low, high = _valid_range(feature, profile)
            if low is not None or high is not None:
                metrics.append(OutRangeValueCount(
                    column=name, left=-math.inf if low is None else low,
                    right=math.inf if high is None else high))
        else:
            allowed = set(feature.values or []) if feature is not None else set()
            if name in booleans:
                allowed |= set(BOOLEAN_VALUES)
            known = sorted(set(profile.categories) | allowed)
            if known:
                metrics.append(OutListValueCount(column=name, values=known))

    numeric = [n for n, k in types.items() if k == "numeric"]
    categorical = [n for n, k in types.items() if k == "categorical"]
    columns = list(types)
    if predicted:
        numeric.append(PREDICTION_COLUMN)
        columns.append(PREDICTION_COLUMN)
    definition = _definition(numeric, categorical)
    snapshot = Report(metrics, include_tests=True).run(
        Dataset.from_pandas(sample[columns], data_definition=definition),
        Dataset.from_pandas(reference_sample[columns], data_definition=definition),
    )
    scores, drifted = _verdicts(snapshot)
    results = {
        name: ColumnDriftResult(
            method=tests[name].method, threshold=tests[name].threshold,
            score=scores.get(name) if name in testable else None,
            drifted=drifted.get(name) if name in testable else None,
        )
        for name in types
    }
    prediction_result = None
    if predicted:
        prediction_result = ColumnDriftResult(
            method=config.drift.prediction.method, threshold=config.drift.prediction.threshold,
            score=scores.get(PREDICTION_COLUMN), drifted=drifted.get(PREDICTION_COLUMN),
        )
    return results, prediction_result, snapshot


def _labelled(window: pd.DataFrame, labels: pd.DataFrame, label_column: str,
              prediction_column: str, keys: list[str], ts_column: str) -> pd.DataFrame:
    """The window's rows that have a label (the last label per key wins)."""
    for frame, what, needed in ((window, "window", (*keys, prediction_column)),
                                (labels, "labels", (*keys, label_column))):
        absent = [c for c in needed if c not in frame.columns]
        if absent:
            raise ValueError(f"the {what} frame lacks column(s) {absent}")
    known = labels[[*keys, label_column]].dropna()
    known = known.drop_duplicates(keys, keep="last")
    keep = [*keys, prediction_column]
    if ts_column in window.columns and ts_column not in keys:
        keep.append(ts_column)
    # Keys are unique on the right after drop_duplicates (pandas' validate= would re-check
    # that at 4x the cost of the merge itself on a million rows).
    merged = window[keep].merge(known, on=keys, how="inner")
    return merged.dropna(subset=[prediction_column])


def _performance(labelled: pd.DataFrame, spec: PipelineSpec, config: MonitoringConfig,
                 label_column: str, prediction_column: str, notes: list[str]
                 ) -> tuple[dict[str, float], Any | None]:
    """Evidently classification (ROC AUC, precision, recall) or regression (MAE, RMSE) metrics."""
    from evidently import BinaryClassification, Dataset, Regression, Report
    from evidently.metrics import MAE, RMSE, Precision, Recall, RocAuc

    frame = labelled[[label_column, prediction_column]].rename(
        columns={label_column: "target", prediction_column: "prediction"})
    frame["prediction"] = frame["prediction"].astype("float64")
    if spec.task == "binary_classification":
        frame["target"] = frame["target"].astype("int64")
        definition = _definition(["prediction"], ["target"], classification=[
            BinaryClassification(target="target", prediction_probas="prediction", pos_label=1)])
        threshold = config.performance.probability_threshold
        metrics = {"precision": Precision(probas_threshold=threshold),
                   "recall": Recall(probas_threshold=threshold)}
        if frame["target"].nunique() > 1:
            metrics = {"roc_auc": RocAuc(), **metrics}
        else:
            notes.append("roc_auc not computed: the labelled rows have a single class")
    else:
        frame["target"] = frame["target"].astype("float64")
        definition = _definition(["target", "prediction"], [], regression=[
            Regression(target="target", prediction="prediction")])
        metrics = {"mae": MAE(), "rmse": RMSE()}
    try:
        snapshot = Report(list(metrics.values())).run(
            Dataset.from_pandas(frame, data_definition=definition), None)
    except ValueError as error:  # its plots fail on degenerate data, e.g. a constant error
        notes.append(f"Evidently could not compute performance ({error}); computed with "
                     "scikit-learn, no HTML section")
        return _sklearn_performance(frame, list(metrics), config), None
    names = {f"evidently:metric_v2:{type(metric).__name__}": name
             for name, metric in metrics.items()}
    values: dict[str, float] = {}
    for result in snapshot.dict()["metrics"]:
        name = names.get(result.get("config", {}).get("type"))
        if name is None:
            continue
        value = result["value"]
        if isinstance(value, dict):  # MAE reports {"mean": ..., "std": ...}
            value = value.get("mean")
        values[name] = _finite(value)
    values["rows"] = len(frame)
    return values, snapshot


def _sklearn_performance(frame: pd.DataFrame, names: list[str],
                         config: MonitoringConfig) -> dict[str, float]:
    """The same metrics as :func:`_performance`, straight from scikit-learn."""
    from sklearn import metrics as sk

    target, prediction = frame["target"], frame["prediction"]
    predicted = (prediction >= config.performance.probability_threshold).astype("int64")
    compute = {
        "roc_auc": lambda: sk.roc_auc_score(target, prediction),
        "precision": lambda: sk.precision_score(target, predicted, zero_division=0),
        "recall": lambda: sk.recall_score(target, predicted, zero_division=0),
        "mae": lambda: sk.mean_absolute_error(target, prediction),
        "rmse": lambda: sk.root_mean_squared_error(target, prediction),
    }
    values: dict[str, float] = {name: _finite(compute[name]()) for name in names}
    values["rows"] = len(frame)
    return values


def _merge_snapshots(snapshots: list[Any]) -> Any:
    """One snapshot holding the widgets and results of several (for one HTML file)."""
    from evidently.core.report import Snapshot

    merged = snapshots[0].dump_dict()
    for other in snapshots[1:]:
        data = other.dump_dict()
        merged["metric_results"].update(data["metric_results"])
        merged["top_level_metrics"] = merged["top_level_metrics"] + data["top_level_metrics"]
        merged["widgets"] = merged["widgets"] + data["widgets"]
        merged["tests_widgets"] = merged["tests_widgets"] + data["tests_widgets"]
    return Snapshot.load_dict(merged)


def _save_html(snapshot: Any, html_path: Path) -> None:
    """The HTML report and, beside it, the snapshot (``Snapshot.loads`` reads it back)."""
    html_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(html_path, lambda temp: snapshot.save_html(str(temp)))
    text = snapshot.dumps()
    _atomic_write(html_path.with_suffix(".snapshot.json"),
                  lambda temp: temp.write_text(text, encoding="utf-8"))


def _check_inputs(reference: ReferenceProfile | None, spec: PipelineSpec,
                  config: MonitoringConfig, window_id: str) -> None:
    """Refuse a bad window id, a config that does not fit the spec, or a stale reference."""
    from airmlops.monitoring.config import validate_against_spec

    check_window_id(window_id)
    validate_against_spec(config, spec)
    if reference is not None and reference.input_types != spec.input_types:
        raise ValueError(f"the reference was summarized for inputs {reference.input_types}, the "
                         f"spec now has {spec.input_types}: summarize the reference again")


def _window_bounds(window: pd.DataFrame, ts_column: str, start: dt.datetime | None,
                   end: dt.datetime | None) -> tuple[dt.datetime, dt.datetime]:
    """``start``/``end``, each defaulting to the window's first/last timestamp."""
    import pandas as pd

    if ts_column not in window.columns:
        raise ValueError(f"the window frame lacks its timestamp column '{ts_column}'")
    if start is not None and end is not None:
        return start, end
    stamps = pd.to_datetime(window[ts_column], utc=True)
    if not stamps.notna().any():
        raise ValueError("start/end are required for a window without timestamps")
    return start or stamps.min().to_pydatetime(), end or stamps.max().to_pydatetime()


def _measure_labels(window: pd.DataFrame, labels: pd.DataFrame | None, spec: PipelineSpec,
                    config: MonitoringConfig, seed: int, notes: list[str], *, ts_column: str,
                    prediction_column: str, label_keys: tuple[str, ...], label_column: str
                    ) -> tuple[dict[str, float] | None, int, Any | None]:
    """Performance on the window's labelled rows, their count and the Evidently snapshot;
    performance is None (with a note) without labels or with fewer than ``min_labels``."""
    if labels is None:
        notes.append("performance not computed: no labels yet")
        return None, 0, None
    labelled = _labelled(window, labels, label_column, prediction_column, list(label_keys),
                         ts_column)
    label_count = len(labelled)
    if label_count < config.performance.min_labels:
        notes.append(f"performance not computed: {label_count} labelled rows, fewer than "
                     f"min_labels ({config.performance.min_labels})")
        return None, label_count, None
    if label_count > config.sample_size and ts_column in labelled.columns:
        labelled = stratified_sample(labelled, ts_column, config.sample_size, seed,
                                     strata=config.strata)
    performance, snapshot = _performance(labelled, spec, config, label_column,
                                         prediction_column, notes)
    return performance, label_count, snapshot


def _untested_columns(spec: PipelineSpec, config: MonitoringConfig
                      ) -> dict[str, ColumnDriftResult]:
    """Every model input's drift test, not run (no score, no verdict)."""
    columns = {}
    for name, kind in spec.input_types.items():
        test = config.drift.test_for(name, kind)
        columns[name] = ColumnDriftResult(method=test.method, threshold=test.threshold,
                                          score=None, drifted=None)
    return columns


def _drift_share(columns: dict[str, ColumnDriftResult]) -> float | None:
    """The share of drifted inputs among those tested (None when none was)."""
    assessed = [r for r in columns.values() if r.drifted is not None]
    return sum(r.drifted for r in assessed) / len(assessed) if assessed else None


def _lap(seconds: dict[str, float], name: str, clock: float) -> None:
    seconds[name] = time.perf_counter() - clock - sum(seconds.values())


def _finish(seconds: dict[str, float], clock: float) -> dict[str, float]:
    seconds["total"] = time.perf_counter() - clock
    return {k: round(v, 4) for k, v in seconds.items()}


def measure_window(reference: ReferenceProfile, window: pd.DataFrame,
                   labels: pd.DataFrame | None, spec: PipelineSpec, config: MonitoringConfig,
                   *, window_id: str, html_path: Path | None = None,
                   start: dt.datetime | None = None, end: dt.datetime | None = None,
                   ts_column: str = TIMESTAMP_COLUMN,
                   prediction_column: str = PREDICTION_COLUMN,
                   label_keys: tuple[str, ...] = (REQUEST_ID_COLUMN,),
                   label_column: str | None = None) -> WindowMeasurement:
    """Drift, data quality and (with enough labels) performance of one window: numbers only.

    ``window`` has one row per prediction: the model inputs as columns, the model output
    (``prediction_column``: the positive-class probability for classification, the value for
    regression) and the time (``ts_column``). ``labels`` has ``label_keys`` and
    ``label_column`` (default: the spec's label) and is joined on ``label_keys`` (for the
    prediction log: ``("request_id", "entity_id")``, ``label_column="label"``).
    ``start``/``end`` default to the first and last timestamp. With ``html_path`` the Evidently
    HTML report is written there atomically, and its snapshot beside it as
    ``<name>.snapshot.json``; a window with too few rows to test and no labelled rows has no
    Evidently report, so no HTML (``html_path`` is None in the result, the notes say why).
    Drift is tested only on windows of at least ``min_rows`` rows.
    """
    _check_inputs(reference, spec, config, window_id)
    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    start, end = _window_bounds(window, ts_column, start, end)
    rows = len(window)
    seed = window_seed(config.seed, window_id)
    sample_rows = (stratified_sample(window, ts_column, config.sample_size, seed,
                                     strata=config.strata) if rows >= config.min_rows else None)
    _lap(seconds, "sample", clock)

    quality = _quality(window, reference, spec, config)
    _lap(seconds, "quality", clock)

    snapshots = []
    prediction_result = None
    if sample_rows is None:
        notes.append(f"drift not tested: {rows} rows, fewer than min_rows ({config.min_rows})")
        columns = _untested_columns(spec, config)
    else:
        if prediction_column != PREDICTION_COLUMN:
            sample_rows = sample_rows.rename(columns={prediction_column: PREDICTION_COLUMN})
        sample = prepare_inputs(sample_rows, spec.input_types, (PREDICTION_COLUMN,),
                                boolean=spec.boolean_features)
        columns, prediction_result, snapshot = _drift(reference, sample, spec, config, notes)
        snapshots.append(snapshot)
    _lap(seconds, "drift", clock)

    performance, label_count, snapshot = _measure_labels(
        window, labels, spec, config, seed, notes, ts_column=ts_column,
        prediction_column=prediction_column, label_keys=label_keys,
        label_column=label_column or spec.label)
    if snapshot is not None:
        snapshots.append(snapshot)
    _lap(seconds, "performance", clock)

    if html_path is not None and snapshots:
        _save_html(_merge_snapshots(snapshots), Path(html_path))
    _lap(seconds, "html", clock)
    return WindowMeasurement(
        window_id=window_id, start=start, end=end, rows=rows,
        sampled=0 if sample_rows is None else len(sample_rows), columns=columns,
        drift_share=_drift_share(columns), prediction_drift=prediction_result, quality=quality,
        performance=performance, label_count=label_count, notes=notes,
        html_path=str(html_path) if html_path is not None and snapshots else None,
        seconds=_finish(seconds, clock),
    )


def measure_performance(window: pd.DataFrame, labels: pd.DataFrame, spec: PipelineSpec,
                        config: MonitoringConfig, *, window_id: str,
                        html_path: Path | None = None, start: dt.datetime | None = None,
                        end: dt.datetime | None = None, ts_column: str = TIMESTAMP_COLUMN,
                        prediction_column: str = PREDICTION_COLUMN,
                        label_keys: tuple[str, ...] = (REQUEST_ID_COLUMN,),
                        label_column: str | None = None) -> WindowMeasurement:
    """Performance alone: the window's labelled rows through the performance metrics.

    For frames that are not a window of model inputs (the predictions that labels arrived for
    during a window): no drift and no data quality are measured, so ``columns`` and ``quality``
    are empty, ``drift_share`` is None and ``sampled`` is 0. The arguments are those of
    :func:`measure_window`; the HTML holds the performance section only.
    """
    _check_inputs(None, spec, config, window_id)
    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    start, end = _window_bounds(window, ts_column, start, end)
    performance, label_count, snapshot = _measure_labels(
        window, labels, spec, config, window_seed(config.seed, window_id), notes,
        ts_column=ts_column, prediction_column=prediction_column, label_keys=label_keys,
        label_column=label_column or spec.label)
    _lap(seconds, "performance", clock)
    if html_path is not None and snapshot is not None:
        _save_html(_merge_snapshots([snapshot]), Path(html_path))
    _lap(seconds, "html", clock)
    return WindowMeasurement(
        window_id=window_id, start=start, end=end, rows=len(window), sampled=0, columns={},
        drift_share=None, prediction_drift=None, quality={}, performance=performance,
        label_count=label_count, notes=notes,
        html_path=str(html_path) if html_path is not None and snapshot is not None else None,
        seconds=_finish(seconds, clock),
    )


def compute_window_report(reference: ReferenceProfile, window: pd.DataFrame,
                          labels: pd.DataFrame | None, spec: PipelineSpec,
                          config: MonitoringConfig, *, window_id: str,
                          html_path: Path | None = None, start: dt.datetime | None = None,
                          end: dt.datetime | None = None, ts_column: str = TIMESTAMP_COLUMN,
                          prediction_column: str = PREDICTION_COLUMN,
                          label_keys: tuple[str, ...] = (REQUEST_ID_COLUMN,),
                          label_column: str | None = None) -> WindowReport:
    """:func:`measure_window`, then the breaches its numbers meet under ``config``
    (:func:`airmlops.monitoring.judgement.judge`); the arguments are those of
    :func:`measure_window`."""
    measurement = measure_window(
        reference, window, labels, spec, config, window_id=window_id, html_path=html_path,
        start=start, end=end, ts_column=ts_column, prediction_column=prediction_column,
        label_keys=label_keys, label_column=label_column)
    return WindowReport.judged(measurement, judge(WindowNumbers.from_report(measurement),
                                                  config, spec))


def report_json(report: WindowReport) -> str:
    """The report as compact, sorted JSON (for logs and XCom-sized summaries)."""
    return json.dumps(report.to_dict(), sort_keys=True, default=str)
