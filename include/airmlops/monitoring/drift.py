"""One monitoring window's report: drift, data quality and performance, with Evidently 0.7.

Cost is bounded and decisions do not depend on traffic volume:

1. the window is reduced first to a fixed-size, time-stratified sample
   (:func:`stratified_sample`: ``sample_size`` rows, equal shares per time bucket, the same
   rows for the same window and seed);
2. Evidently's ``ValueDrift`` runs on that sample against the reference sample (fixed at deploy),
   with each column's method and threshold from the spec, never Evidently's size-dependent
   defaults; the prediction gets the same treatment;
3. data quality shares (missing, out of range, new categories) are exact counts over the whole
   window (:mod:`airmlops.monitoring.quality`: cheap, and an incident touching 0.5 % of rows
   must not hide in a sample); the HTML shows Evidently's matching metrics on the sample;

A window given as the path of its Parquet file is streamed batch by batch
(:mod:`airmlops.monitoring.window_scan`): the same counts and the same sample as the whole
frame, with memory bounded by a batch, the time column and the sample.
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
performance alone) return numbers only, a :class:`WindowMeasurement`; the breaches are
decided from them by :func:`airmlops.monitoring.judgement.judge`. :func:`compute_window_report`
does both and returns a :class:`WindowReport` (the measurement plus its breaches; both are
defined in :mod:`airmlops.monitoring.measurement`).
The policy's ``max_drift_share`` reaches the measurement only as the threshold line of
``DriftedColumnsCount`` in the HTML report; the numbers do not depend on it.

The sampling lives in :mod:`airmlops.monitoring.sampling`, the performance metrics in
:mod:`airmlops.monitoring.performance` and the Evidently plumbing shared by both measurements
in :mod:`airmlops.monitoring.snapshots`; their names used by callers are importable from here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.data.categories import BOOLEAN_VALUES
from airmlops.monitoring.config import validate_against_spec
from airmlops.monitoring.judgement import WindowNumbers, judge
from airmlops.monitoring.measurement import ColumnDriftResult, WindowMeasurement, WindowReport
from airmlops.monitoring.performance import measure_labels
from airmlops.monitoring.policy import check_window_id
from airmlops.monitoring.quality import quality_shares, valid_range
from airmlops.monitoring.reference import PREDICTION_COLUMN, ReferenceProfile, prepare_inputs
from airmlops.monitoring.sampling import stratified_sample, window_seed
from airmlops.monitoring.snapshots import data_definition, finite, merge_snapshots, save_html
from airmlops.monitoring.window_scan import WindowScan, scan_window

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.monitoring.config import DriftTest, MonitoringConfig
    from airmlops.spec import PipelineSpec

TIMESTAMP_COLUMN = "ts"
"""The prediction log's time column (airmlops.serving.prediction_log)."""
REQUEST_ID_COLUMN = "request_id"


def _verdicts(snapshot: Any) -> tuple[dict[str, float | None], dict[str, bool]]:
    """ValueDrift scores by column, and Evidently's own verdict from each one's drift test."""
    results = snapshot.dict()
    scores: dict[str, float | None] = {}
    metric_column: dict[str, str] = {}
    for metric in results["metrics"]:
        config = metric.get("config", {})
        if config.get("type") == "evidently:metric_v2:ValueDrift":
            scores[config["column"]] = finite(metric["value"])
            metric_column[metric["id"]] = config["column"]
    drifted: dict[str, bool] = {}
    for test in results["tests"]:
        column = metric_column.get(test.get("metric_config", {}).get("metric_id"))
        if column is not None and test.get("id") == "drift":
            drifted[column] = test["status"] == "FAIL"
    return scores, drifted


def _testable(reference: ReferenceProfile, sample: pd.DataFrame, config: MonitoringConfig,
              types: dict[str, str], notes: list[str]) -> tuple[list[str], bool]:
    """The inputs with values on both sides (a note for each other one), and whether the
    prediction's drift can be tested."""
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
    return testable, predicted


def _drift_metrics(testable: list[str], predicted: bool, tests: dict[str, DriftTest],
                   config: MonitoringConfig) -> list[Any]:
    """Evidently's ValueDrift of every testable input (and of the prediction), each with its
    own method and threshold, and the drifted-columns count for the HTML."""
    from evidently.metrics import DriftedColumnsCount, ValueDrift

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
    return metrics


def _quality_metrics(reference: ReferenceProfile, spec: PipelineSpec) -> list[Any]:
    """Evidently's data quality metrics of every input, for the HTML (the numbers are
    :func:`~airmlops.monitoring.quality.quality_shares`'s exact
    shares over the whole window)."""
    from evidently.metrics import MissingValueCount, OutListValueCount, OutRangeValueCount

    declared = {f.name: f for f in spec.features}
    booleans = set(spec.boolean_features)
    metrics: list[Any] = []
    for name, kind in spec.input_types.items():
        metrics.append(MissingValueCount(column=name))
        feature, profile = declared.get(name), reference.columns[name]
        if kind == "numeric":
            low, high = valid_range(feature, profile)
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
    return metrics


def _run_report(metrics: list[Any], sample: pd.DataFrame, reference_sample: pd.DataFrame,
                types: dict[str, str], predicted: bool) -> Any:
    """Evidently's report of ``metrics`` (with their tests) on the sample vs the reference."""
    from evidently import Dataset, Report

    numeric = [n for n, k in types.items() if k == "numeric"]
    categorical = [n for n, k in types.items() if k == "categorical"]
    columns = list(types)
    if predicted:
        numeric.append(PREDICTION_COLUMN)
        columns.append(PREDICTION_COLUMN)
    definition = data_definition(numeric, categorical)
    return Report(metrics, include_tests=True).run(
        Dataset.from_pandas(sample[columns], data_definition=definition),
        Dataset.from_pandas(reference_sample[columns], data_definition=definition),
    )


def _drift(reference: ReferenceProfile, sample: pd.DataFrame, spec: PipelineSpec,
           config: MonitoringConfig, notes: list[str]) -> tuple[
               dict[str, ColumnDriftResult], ColumnDriftResult | None, Any]:
    """Evidently drift (plus quality metrics for the HTML) on the window sample vs reference."""
    types = spec.input_types
    tests = {name: config.drift.test_for(name, kind) for name, kind in types.items()}
    testable, predicted = _testable(reference, sample, config, types, notes)
    metrics = [*_drift_metrics(testable, predicted, tests, config),
               *_quality_metrics(reference, spec)]
    snapshot = _run_report(metrics, sample, reference.sample, types, predicted)
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


def _check_inputs(reference: ReferenceProfile | None, spec: PipelineSpec,
                  config: MonitoringConfig, window_id: str) -> None:
    """Refuse a bad window id, a config that does not fit the spec, or a stale reference."""
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


def _untested_columns(spec: PipelineSpec, config: MonitoringConfig
                      ) -> dict[str, ColumnDriftResult]:
    """Every model input's drift test, not run (no score, no verdict)."""
    columns = {}
    for name, kind in spec.input_types.items():
        test = config.drift.test_for(name, kind)
        columns[name] = ColumnDriftResult(method=test.method, threshold=test.threshold,
                                          score=None, drifted=None)
    return columns


def _share_drifted(columns: dict[str, ColumnDriftResult]) -> float | None:
    """The share of drifted inputs among those tested (None when none was)."""
    assessed = [r for r in columns.values() if r.drifted is not None]
    return sum(r.drifted for r in assessed) / len(assessed) if assessed else None


def _lap(seconds: dict[str, float], name: str, clock: float) -> None:
    seconds[name] = time.perf_counter() - clock - sum(seconds.values())


def _finish(seconds: dict[str, float], clock: float) -> dict[str, float]:
    seconds["total"] = time.perf_counter() - clock
    return {k: round(v, 4) for k, v in seconds.items()}


def _warm_evidently() -> None:
    """Import Evidently in a background thread while the window's file is streamed: its
    import costs seconds of Python, the stream mostly Arrow's decoding outside the GIL."""
    import sys
    import threading

    # The stream's own imports first, so the two threads never wait on each other's modules.
    import pyarrow.compute
    import pyarrow.parquet  # noqa: F401

    if "evidently.metrics" not in sys.modules:
        threading.Thread(target=_import_evidently, name="import-evidently", daemon=True).start()


def _import_evidently() -> None:
    with contextlib.suppress(Exception):  # the drift stage's own import reports a failure
        importlib.import_module("evidently.metrics")


def _scan_frame(window: pd.DataFrame, reference: ReferenceProfile, spec: PipelineSpec,
                config: MonitoringConfig, seed: int, ts_column: str,
                seconds: dict[str, float], clock: float) -> WindowScan:
    """What :func:`scan_window` reads from a file, from a frame in memory."""
    rows = len(window)
    sample = (stratified_sample(window, ts_column, config.sample_size, seed,
                                strata=config.strata) if rows >= config.min_rows else None)
    _lap(seconds, "sample", clock)
    quality = quality_shares(window, reference, spec, config)
    return WindowScan(rows=rows, first=None, last=None, quality=quality, sample=sample)


def _labelled_window(window: pd.DataFrame | Path | str, labels: pd.DataFrame | None,
                     ts_column: str, prediction_column: str,
                     label_keys: tuple[str, ...]) -> pd.DataFrame | None:
    """The window's columns the label join reads (from its file only when there are labels)."""
    import pandas as pd
    import pyarrow.parquet as pq

    if not isinstance(window, (str, Path)):
        return window
    if labels is None:
        return None
    names = pq.ParquetFile(window).schema_arrow.names
    wanted = [c for c in (*label_keys, ts_column, prediction_column) if c in names]
    return pd.read_parquet(window, columns=list(dict.fromkeys(wanted)))


def measure_window(reference: ReferenceProfile, window: pd.DataFrame | Path | str,
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
    regression) and the time (``ts_column``); it is a frame, or the path of its Parquet file,
    which is then streamed (:func:`~airmlops.monitoring.window_scan.scan_window`: memory
    bounded by a batch and the sample, the same numbers as the whole frame). ``labels`` has
    ``label_keys`` and ``label_column`` (default: the spec's label) and is joined on
    ``label_keys`` (for the prediction log: ``("request_id", "entity_id")``,
    ``label_column="label"``).
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
    seed = window_seed(config.seed, window_id)
    if isinstance(window, (str, Path)):
        _warm_evidently()
        scan = scan_window(window, reference, spec, config, seed=seed, ts_column=ts_column,
                           prediction_column=prediction_column)
        if start is None or end is None:
            if scan.first is None:
                raise ValueError("start/end are required for a window without timestamps")
            start, end = start or scan.first, end or scan.last
        seconds["sample"] = scan.sample_seconds
    else:
        start, end = _window_bounds(window, ts_column, start, end)
        scan = _scan_frame(window, reference, spec, config, seed, ts_column, seconds, clock)
    _lap(seconds, "quality", clock)

    snapshots = []
    prediction_result = None
    sample_rows = scan.sample
    if sample_rows is None:
        notes.append(f"drift not tested: {scan.rows} rows, fewer than min_rows "
                     f"({config.min_rows})")
        columns = _untested_columns(spec, config)
    else:
        if prediction_column != PREDICTION_COLUMN:
            sample_rows = sample_rows.rename(columns={prediction_column: PREDICTION_COLUMN})
        sample = prepare_inputs(sample_rows, spec.input_types, (PREDICTION_COLUMN,),
                                boolean=spec.boolean_features)
        columns, prediction_result, snapshot = _drift(reference, sample, spec, config, notes)
        snapshots.append(snapshot)
    _lap(seconds, "drift", clock)

    performance, label_count, snapshot = measure_labels(
        _labelled_window(window, labels, ts_column, prediction_column, label_keys), labels,
        spec, config, seed, notes, ts_column=ts_column, prediction_column=prediction_column,
        label_keys=label_keys, label_column=label_column or spec.label)
    if snapshot is not None:
        snapshots.append(snapshot)
    _lap(seconds, "performance", clock)

    if html_path is not None and snapshots:
        save_html(merge_snapshots(snapshots), Path(html_path))
    _lap(seconds, "html", clock)
    return WindowMeasurement(
        window_id=window_id, start=start, end=end, rows=scan.rows,
        sampled=0 if sample_rows is None else len(sample_rows), columns=columns,
        drift_share=_share_drifted(columns), prediction_drift=prediction_result,
        quality=scan.quality, performance=performance, label_count=label_count, notes=notes,
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
    performance, label_count, snapshot = measure_labels(
        window, labels, spec, config, window_seed(config.seed, window_id), notes,
        ts_column=ts_column, prediction_column=prediction_column, label_keys=label_keys,
        label_column=label_column or spec.label)
    _lap(seconds, "performance", clock)
    if html_path is not None and snapshot is not None:
        save_html(merge_snapshots([snapshot]), Path(html_path))
    _lap(seconds, "html", clock)
    return WindowMeasurement(
        window_id=window_id, start=start, end=end, rows=len(window), sampled=0, columns={},
        drift_share=None, prediction_drift=None, quality={}, performance=performance,
        label_count=label_count, notes=notes,
        html_path=str(html_path) if html_path is not None and snapshot is not None else None,
        seconds=_finish(seconds, clock),
    )


def compute_window_report(reference: ReferenceProfile, window: pd.DataFrame | Path | str,
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

