"""The monitoring DAG's stages as plain functions: collect, report, decide.

Each takes the spec and small values and returns a small JSON-able dict for XCom; none of them
reads the clock (window bounds and the decision time come in). Each is safe to retry:

- :func:`collect_window` reads one window of the prediction log and writes it as Parquet under
  ``<data_root>/monitoring/<pipeline>/windows/<window_id>/`` (rewritten whole on a retry);
- :func:`compute_report` measures the window against the current champion's reference
  (:mod:`airmlops.monitoring.drift`), judges its breaches from the numbers
  (:mod:`airmlops.monitoring.judgement`), saves the HTML under
  ``<data_root>/reports/<pipeline>/monitoring/<window_id>.html``, upserts the window in the
  :class:`~airmlops.monitoring.store.MonitoringStore` and logs the numbers to one MLflow run per
  window (:mod:`airmlops.monitoring.mlflow_report`);
- :func:`decide_window` applies the retraining policy to the recorded history (each window
  judged again from its numbers under the current spec) and records the decision and why, "none"
  included; a window that already decided to retrain replays that decision, so the trigger is
  sent again with the same run id and Airflow ignores it.

Delayed labels: a window's performance is measured on the labels that *arrived* during the
window, joined with their predictions from up to
``monitoring.performance.label_lookback_windows`` window lengths back (SageMaker's ground-truth
merge). Each label counts once, in the window it arrived in, and a model's quality shows up as
soon as outcomes are known, not only for the latest predictions (which, with delayed labels,
never have any yet).

Retention: :func:`prune_window_artifacts` deletes the files of windows that ended more than
``monitoring.retention_windows`` window lengths before the current window's end (its Parquet
folder and its HTML reports with their snapshots); the monitoring table and the MLflow runs keep
every window. Windows after the current one are never touched, so re-reporting an old window
deletes nothing newer.

Active retrainings are counted through the Task SDK (``RuntimeTaskInstance.get_dr_count``, which
asks the API server's execution API): Airflow 3 tasks must not open the metadata database, and
this needs no REST credentials in the task's environment.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.monitoring.estimation import with_window_estimate
from airmlops.monitoring.measurement import WindowMeasurement, WindowReport
from airmlops.monitoring.mlflow_report import log_report_to_mlflow
from airmlops.monitoring.policy import Decision, check_window_id
from airmlops.paths import safe_join
from airmlops.times import utc

if TYPE_CHECKING:
    import pandas as pd

    from airmlops.monitoring.reference import ReferenceProfile
    from airmlops.settings import Settings
    from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"
LABELLED_FILE = "labelled.parquet"
READ_SLICES = 8
"""A SQLite-logged window is read in this many time slices, each flattened before the next is
read, so the JSON of only one slice is in memory at a time."""
ACTIVE_STATES = ("queued", "running")
TRIGGER_REASON_MAX = 500
"""The training DAG's ``trigger_reason`` param is at most this long."""
LOG_COLUMNS = ("ts", "request_id", "entity_id", "position", "model_version", "prediction")
LABELLED_COLUMNS = ("ts", "request_id", "entity_id", "model_version", "prediction", "label",
                    "label_ts")
WINDOW_ID = re.compile(r"^(\d{8}T\d{4}(?:\d{2})?)-(\d{8}T\d{4}(?:\d{2})?)$")


# --- windows ----------------------------------------------------------------------------------


def window_bounds(interval_start: dt.datetime | None, interval_end: dt.datetime,
                  window_minutes: int) -> tuple[dt.datetime, dt.datetime]:
    """The window a monitoring run covers: ``window_minutes`` ending at ``interval_end``.

    Scheduled runs (a cron trigger timetable) have an empty data interval at the tick, so their
    window is the ``window_minutes`` before it. A run given an explicit, non-empty data interval
    (the REST API accepts ``data_interval_start``/``data_interval_end``) covers exactly that
    interval, e.g. to report a past window again. Bounds are UTC, to the second.
    """
    end = utc(interval_end, "interval_end").replace(microsecond=0)
    if interval_start is not None:
        start = utc(interval_start, "interval_start").replace(microsecond=0)
        if start < end:
            return start, end
        if start > end:
            raise ValueError(f"data interval start {start} is after its end {end}")
    if window_minutes < 1:
        raise ValueError(f"window_minutes must be positive (got {window_minutes})")
    return end - dt.timedelta(minutes=window_minutes), end


def _stamp(moment: dt.datetime, seconds: bool) -> str:
    return moment.strftime("%Y%m%dT%H%M%S" if seconds else "%Y%m%dT%H%M")


def window_id_for(start: dt.datetime, end: dt.datetime) -> str:
    """``20260601T1000-20260601T1100`` (UTC; seconds only when a bound is not a whole minute)."""
    start, end = utc(start, "start"), utc(end, "end")
    if end <= start:
        raise ValueError(f"window end {end} must be after its start {start}")
    if start.microsecond or end.microsecond:
        raise ValueError("window bounds must be whole seconds")
    seconds = bool(start.second or end.second)
    return check_window_id(f"{_stamp(start, seconds)}-{_stamp(end, seconds)}")


def parse_window_id(window_id: str) -> tuple[dt.datetime, dt.datetime]:
    """The bounds a window id was made from (the inverse of :func:`window_id_for`)."""
    match = WINDOW_ID.match(check_window_id(window_id))
    if match is None:
        raise ValueError(f"window_id {window_id!r} is not <start>-<end> as YYYYMMDDTHHMM[SS]")
    bounds = []
    for text in match.groups():
        fmt = "%Y%m%dT%H%M%S" if len(text) == 15 else "%Y%m%dT%H%M"
        bounds.append(dt.datetime.strptime(text, fmt).replace(tzinfo=dt.UTC))
    return bounds[0], bounds[1]


def window_dir(settings: Settings, pipeline: str, window_id: str) -> Path:
    """``<data_root>/monitoring/<pipeline>/windows/<window_id>`` (both parts validated)."""
    from airmlops.monitoring.store import MonitoringStore

    MonitoringStore(settings.data_root).path(pipeline)  # validates the pipeline name
    return safe_join(settings.data_root, "monitoring", pipeline, "windows",
                     check_window_id(window_id))


def report_html_path(settings: Settings, pipeline: str, window_id: str,
                     suffix: str = ".html") -> Path:
    """``<data_root>/reports/<pipeline>/monitoring/<window_id><suffix>``."""
    return safe_join(settings.reports_dir, pipeline, "monitoring",
                     f"{check_window_id(window_id)}{suffix}")


# --- collect ------------------------------------------------------------------------------------


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    import io

    from airmlops.paths import atomic_write_bytes

    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def flatten_predictions(log_frame: pd.DataFrame, spec: PipelineSpec) -> pd.DataFrame:
    """Prediction-log rows as one row per prediction: the log's keys, the model output as
    ``prediction`` (the positive-class probability for classification) and one column per model
    input from the logged ``features`` (an input absent from a row is null)."""
    import pandas as pd

    clashes = sorted(set(spec.input_names) & set(LOG_COLUMNS))
    if clashes:
        raise ValueError(f"model input(s) {clashes} clash with prediction-log columns")
    output = "probability" if spec.task == "binary_classification" else "prediction"
    frame = pd.DataFrame({
        "ts": log_frame["ts"], "request_id": log_frame["request_id"].astype(str),
        "entity_id": log_frame["entity_id"].astype(str),
        "position": log_frame["position"].astype("int64"),
        "model_version": log_frame["model_version"].astype(str),
        "prediction": pd.to_numeric(log_frame[output], errors="coerce").astype("float64"),
    }).reset_index(drop=True)
    features = pd.DataFrame.from_records(
        [row if isinstance(row, dict) else {} for row in log_frame["features"]],
        columns=spec.input_names)
    for name, kind in spec.input_types.items():
        column = features[name]
        if kind == "numeric":
            frame[name] = pd.to_numeric(column, errors="coerce").astype("float64")
        else:
            frame[name] = column.astype(object).where(column.notna(), None).map(
                lambda value: None if value is None else str(value))
    return frame


def _read_window(spec: PipelineSpec, start: dt.datetime, end: dt.datetime,
                 settings: Settings) -> pd.DataFrame:
    """The window's predictions, flattened; read in time slices from SQLite (a Redis stream is
    read in one pass: each read scans the stream from its start to the end)."""
    import pandas as pd

    from airmlops.serving.prediction_log import log_redis_url, read_predictions

    slices = 1 if log_redis_url(settings) else READ_SLICES
    step = (end - start) / slices
    bounds = [start + i * step for i in range(slices)] + [end]
    parts = [flatten_predictions(read_predictions(spec.name, lower, upper, settings=settings),
                                 spec) for lower, upper in itertools.pairwise(bounds)]
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def _collected_predictions(settings: Settings, pipeline: str, lookback_start: dt.datetime,
                           start: dt.datetime, request_ids: list[str]) -> pd.DataFrame:
    """Predictions with the given request ids from the windows collected before ``start`` and
    ending after ``lookback_start`` (their ``predictions.parquet``: no log re-read)."""
    import pandas as pd
    import pyarrow.parquet as pq

    root = safe_join(settings.data_root, "monitoring", pipeline, "windows")
    frames = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            window_start, window_end = parse_window_id(folder.name)
        except ValueError:
            continue
        path = folder / PREDICTIONS_FILE
        if window_end <= lookback_start or window_start >= start or not path.is_file():
            continue
        if pq.ParquetFile(path).metadata.num_rows == 0:
            continue  # a window without traffic: its empty columns have no type to filter on
        frames.append(pd.read_parquet(path, columns=list(LOG_COLUMNS),
                                      filters=[("request_id", "in", request_ids)]))
    if not frames:
        return pd.DataFrame({name: pd.Series(dtype="object") for name in LOG_COLUMNS})
    return pd.concat(frames, ignore_index=True)


def collect_window(spec: PipelineSpec, window_start: dt.datetime, window_end: dt.datetime,
                   settings: Settings) -> dict[str, Any]:
    """Read the window's predictions and the labels that arrived during it, write both as Parquet.

    ``predictions.parquet``: the predictions with ``window_start <= ts < window_end``, flattened
    (:func:`flatten_predictions`). ``labelled.parquet``: every label received in the window
    joined with its prediction, made in this window or in an earlier collected window ending
    less than ``monitoring.performance.label_lookback_windows`` window lengths before this
    one's end (read from those windows' Parquet files, so the log is read once per window).
    Labels of older, uncollected or unknown predictions are counted as unmatched.
    """
    import pandas as pd

    from airmlops.serving.prediction_log import read_labels

    start, end = utc(window_start, "window_start"), utc(window_end, "window_end")
    window_id = window_id_for(start, end)
    directory = window_dir(settings, spec.name, window_id)
    current = _read_window(spec, start, end, settings)
    labels = read_labels(spec.name, start, end, settings=settings)
    lookback_start = end - spec.monitoring.performance.label_lookback_windows * (end - start)
    labelled = pd.DataFrame({name: pd.Series(dtype="object") for name in LABELLED_COLUMNS})
    earlier_rows = 0
    if len(labels):
        wanted = sorted(set(labels["request_id"].astype(str)))
        earlier = _collected_predictions(settings, spec.name, lookback_start, start, wanted)
        earlier_rows = len(earlier)
        candidates = pd.concat([earlier, current[list(LOG_COLUMNS)]], ignore_index=True)
        candidates = candidates.drop_duplicates(["request_id", "entity_id"], keep="last")
        arrived = labels.rename(columns={"ts": "label_ts"})[
            ["request_id", "entity_id", "label", "label_ts"]].astype(
            {"request_id": str, "entity_id": str})
        labelled = candidates.merge(arrived, on=["request_id", "entity_id"], how="inner")
        labelled = labelled[list(LABELLED_COLUMNS)].sort_values("ts", kind="stable")
    predictions_path = directory / PREDICTIONS_FILE
    labelled_path = directory / LABELLED_FILE
    _write_parquet(current, predictions_path)
    _write_parquet(labelled.reset_index(drop=True), labelled_path)
    versions = current["model_version"].value_counts().sort_index()
    result = {
        "pipeline": spec.name, "window_id": window_id,
        "start": start.isoformat(), "end": end.isoformat(),
        "predictions_path": str(predictions_path), "labelled_path": str(labelled_path),
        "rows": len(current), "labels_received": len(labels), "labelled_rows": len(labelled),
        "labels_unmatched": len(labels) - len(labelled),
        "label_lookback_start": lookback_start.isoformat(),
        "earlier_predictions_matched": earlier_rows,
        "model_versions": {str(k): int(v) for k, v in versions.items()},
    }
    log.info("collect %s window %s: %d predictions (versions %s), %d labels arrived, %d matched "
             "to predictions since %s; written to %s", spec.name, window_id, len(current),
             result["model_versions"], len(labels), len(labelled), lookback_start, directory)
    return result


# --- report -------------------------------------------------------------------------------------


def _empty_report(window_id: str, start: dt.datetime, end: dt.datetime, rows: int,
                  why: str) -> WindowReport:
    """A window recorded without numbers, with the note why."""
    return WindowReport(window_id=window_id, start=start, end=end, rows=rows, sampled=0,
                        columns={}, drift_share=None, prediction_drift=None, quality={},
                        performance=None, label_count=0, breaches=[], notes=[why])


def _with_delayed_performance(measurement: WindowMeasurement, performance: WindowMeasurement,
                              lookback_start: str) -> WindowMeasurement:
    """The window's numbers with the performance measured on the labels that arrived in it."""
    notes = [n for n in measurement.notes if not n.startswith("performance not computed")]
    notes += performance.notes
    notes.append(f"performance on the {performance.label_count} labels that arrived in this "
                 f"window, for predictions since {lookback_start}")
    seconds = dict(measurement.seconds)
    seconds["performance"] = performance.seconds.get("total", 0.0)
    return dataclasses.replace(measurement, performance=performance.performance,
                               label_count=performance.label_count, notes=notes,
                               seconds=seconds)


def _champion_reference(spec: PipelineSpec, settings: Settings
                        ) -> tuple[Any, ReferenceProfile | None, str | None]:
    """The current champion, its reference profile, and why there is none (None if there is)."""
    from airmlops.monitoring.reference import ReferenceError, load_reference
    from airmlops.training import registry

    champion = registry.get_alias_version(spec.registered_model_name, "champion",
                                          settings.mlflow_tracking_uri)
    if champion is None:
        return None, None, (f"no champion: model {spec.registered_model_name} has no "
                            "'champion' alias yet")
    where = safe_join(settings.data_root, "monitoring", spec.name, "reference",
                      str(champion.version))
    try:
        return champion, load_reference(where), None
    except ReferenceError as error:
        return champion, None, f"no reference data for champion version {champion.version}: {error}"


def _measure_and_judge(spec: PipelineSpec, collected: dict[str, Any], settings: Settings,
                       reference: ReferenceProfile, frame: pd.DataFrame, champion: Any
                       ) -> tuple[WindowReport, str | None]:
    """The window measured against ``reference`` (performance on the labels that arrived in
    it, and estimated from the champion's probabilities without them) and judged; with the
    performance HTML's path when there is one."""
    import pandas as pd

    from airmlops.monitoring.drift import measure_performance, measure_window
    from airmlops.monitoring.judgement import WindowNumbers, judge

    window_id = collected["window_id"]
    start, end = parse_window_id(window_id)
    config = spec.monitoring
    measured = measure_window(reference, frame, None, spec, config, window_id=window_id,
                              html_path=report_html_path(settings, spec.name, window_id),
                              start=start, end=end)
    labelled = pd.read_parquet(collected["labelled_path"])
    performance_html = None
    if len(labelled):
        # Performance only: this frame holds the predictions that labels arrived for, not
        # a window of model inputs, so neither drift nor data quality is measured on it.
        target = report_html_path(settings, spec.name, window_id, ".performance.html")
        performance = measure_performance(
            labelled, labelled, spec, config, window_id=window_id, html_path=target,
            start=start, end=end, label_keys=("request_id", "entity_id"),
            label_column="label")
        performance_html = performance.html_path
        measured = _with_delayed_performance(measured, performance,
                                             collected.get("label_lookback_start", "?"))
    if spec.task == "binary_classification":  # the label-free estimate, beside the realized
        measured = with_window_estimate(measured, frame, champion, settings.mlflow_tracking_uri,
                                        config.performance.probability_threshold)
    judgement = judge(WindowNumbers.from_report(measured), config, spec)
    for breach, reason in judgement.reasons.items():
        log.info("report %s window %s: breach %s: %s", spec.name, window_id, breach, reason)
    return WindowReport.judged(measured, judgement), performance_html


def _report_summary(spec: PipelineSpec, report: WindowReport, *, champion: Any,
                    performance_html: str | None, mlflow_run_id: str,
                    skipped: str | None) -> dict[str, Any]:
    """The report task's XCom summary of ``report``, also logged line by line."""
    drifted = sorted(name for name, c in report.columns.items() if c.drifted)
    summary = {
        "pipeline": spec.name, "window_id": report.window_id,
        "start": report.start.isoformat(), "end": report.end.isoformat(), "rows": report.rows,
        "sampled": report.sampled, "drift_share": report.drift_share, "drifted": drifted,
        "prediction_drift": (report.prediction_drift.score
                             if report.prediction_drift is not None else None),
        "breaches": list(report.breaches), "performance": report.performance,
        "estimated_performance": report.estimated_performance,
        "label_count": report.label_count, "html_path": report.html_path,
        "performance_html": performance_html,
        "champion_version": str(champion.version) if champion else None,
        "mlflow_run_id": mlflow_run_id, "notes": list(report.notes),
        "seconds": report.seconds, "skipped": skipped,
    }
    log.info("report %s window %s: %d rows (%d sampled), drift share %s, drifted %s, "
             "breaches %s, performance %s on %d labels; HTML report: %s%s; MLflow run %s",
             spec.name, report.window_id, report.rows, report.sampled, report.drift_share,
             drifted, report.breaches or "none", report.performance, report.label_count,
             report.html_path or "none (nothing to report)",
             f" (performance: {performance_html})" if performance_html else "", mlflow_run_id)
    for note in report.notes:
        log.info("report %s window %s: note: %s", spec.name, report.window_id, note)
    return summary


def compute_report(spec: PipelineSpec, collected: dict[str, Any], settings: Settings, *,
                   now: dt.datetime | None = None,
                   airflow_run_id: str | None = None) -> dict[str, Any]:
    """The window's report against the current champion's reference, saved and recorded.

    Without a champion, or without its reference data (written when it was promoted), the
    window is recorded with a note and no numbers, so the decision says why nothing happens.
    ``now`` is the time recorded as the row's update (default: the window end).
    """
    import pandas as pd

    from airmlops.monitoring.store import MonitoringStore

    window_id = check_window_id(collected["window_id"])
    start, end = parse_window_id(window_id)
    frame = pd.read_parquet(collected["predictions_path"])
    champion, reference, why = _champion_reference(spec, settings)
    performance_html = None
    if reference is None:
        log.warning("report %s window %s: %s; the window is recorded without numbers",
                    spec.name, window_id, why)
        report = _empty_report(window_id, start, end, len(frame), why)
    else:
        report, performance_html = _measure_and_judge(spec, collected, settings, reference,
                                                      frame, champion)
    MonitoringStore(settings.data_root).record_window(spec.name, report, created=now or end)
    tags = {"champion_version": str(champion.version) if champion else "none",
            "report_html": report.html_path or "none",
            "performance_html": performance_html or "none"}
    if airflow_run_id:
        tags["airflow_run_id"] = airflow_run_id
    mlflow_run_id = log_report_to_mlflow(spec, report, tags, settings.mlflow_tracking_uri)
    return _report_summary(spec, report, champion=champion, performance_html=performance_html,
                           mlflow_run_id=mlflow_run_id, skipped=why)


# --- retain -------------------------------------------------------------------------------------


def _window_of_artifact(name: str) -> tuple[str, dt.datetime, dt.datetime] | None:
    """The window an artifact's name belongs to (``<window_id>`` or ``<window_id>.<suffix>``)."""
    window_id = name.split(".", 1)[0]
    try:
        start, end = parse_window_id(window_id)
    except ValueError:
        return None
    return window_id, start, end


def prune_window_artifacts(spec: PipelineSpec, window_start: dt.datetime,
                           window_end: dt.datetime, settings: Settings) -> dict[str, Any]:
    """Delete the files of windows that ended more than ``monitoring.retention_windows`` window
    lengths before ``window_end``: each one's Parquet folder and its HTML reports (with their
    snapshots). Files whose names are not window ids are left alone, and so is everything of
    the current window and of later windows. Safe to repeat (a deleted file is gone already).
    """
    import shutil

    start, end = utc(window_start, "window_start"), utc(window_end, "window_end")
    if end <= start:
        raise ValueError(f"window end {end} must be after its start {start}")
    horizon = end - spec.monitoring.retention_windows * (end - start)
    folders_root = window_dir(settings, spec.name, window_id_for(start, end)).parent
    reports_root = safe_join(settings.reports_dir, spec.name, "monitoring")
    removed: set[str] = set()
    folders = files = 0
    for root, is_folder in ((folders_root, True), (reports_root, False)):
        if not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            window = _window_of_artifact(path.name)
            kind_matches = (path.is_dir() and not path.is_symlink()) == is_folder
            if window is None or window[2] > horizon or not kind_matches:
                continue
            if is_folder:
                shutil.rmtree(path, ignore_errors=True)
                folders += 1
            else:
                path.unlink(missing_ok=True)
                files += 1
            removed.add(window[0])
    result = {"pipeline": spec.name, "horizon": horizon.isoformat(),
              "retention_windows": spec.monitoring.retention_windows,
              "windows_pruned": sorted(removed), "folders_deleted": folders,
              "files_deleted": files}
    log.info("retain %s: windows ending at or before %s pruned: %d (%d folders, %d report "
             "files); kept %d window lengths", spec.name, horizon, len(removed), folders, files,
             spec.monitoring.retention_windows)
    return result


# --- decide -------------------------------------------------------------------------------------


def count_active_runs(dag_id: str) -> int:
    """Runs of ``dag_id`` that are queued or running, asked through the Task SDK.

    Only callable inside a running Airflow task (it uses the task's supervisor channel).
    """
    from airflow.sdk import get_current_context

    ti = get_current_context()["ti"]
    return int(ti.get_dr_count(dag_id=dag_id, states=list(ACTIVE_STATES)))


def trigger_reason(spec: PipelineSpec, window_id: str, reason: str) -> str:
    """The ``trigger_reason`` the training run records in MLflow (at most 500 characters)."""
    text = " ".join(f"monitoring of {spec.name}, window {window_id}: {reason}".split())
    return text if len(text) <= TRIGGER_REASON_MAX else text[:TRIGGER_REASON_MAX - 3] + "..."


def trigger_conf(spec: PipelineSpec, window_id: str, reason: str) -> dict[str, Any]:
    """The conf of the training run a retraining decision triggers (the training DAG's params).

    ``data_end``: the window's end, so the run ingests data up to the window it reacts to (not
    up to whenever it happens to run). For a simulator source, also the world the window was
    observed in (the spec's ``scenario`` from ``scenario_start``): the run's params show what it
    trains on, a spec edited after the decision does not change it, and the run rebuilds its
    batch's feature days in that world (see :func:`airmlops.stages.ingest`).
    """
    window_end = parse_window_id(check_window_id(window_id))[1]
    conf: dict[str, Any] = {"trigger_reason": trigger_reason(spec, window_id, reason),
                            "triggered_by": "monitoring", "monitoring_window": window_id,
                            "data_end": window_end.isoformat()}
    if spec.source.kind == "simulator":
        begins = spec.source.scenario_start
        conf.update(scenario=spec.source.scenario,
                    scenario_start=begins.isoformat() if begins else None)
    return conf


def _history_until(store: Any, pipeline: str, window_id: str, n: int) -> list[Any]:
    """The last ``n`` recorded windows up to and including ``window_id`` (oldest first)."""
    records = store.history(pipeline, 1000)
    for index, record in enumerate(records):
        if record.window_id == window_id:
            return records[max(0, index + 1 - n):index + 1]
    raise KeyError(f"window {window_id!r} of {pipeline!r} is not recorded (or older than the "
                   "last 1000 windows)")


def decide_window(spec: PipelineSpec, report: dict[str, Any], settings: Settings, *,
                  now: dt.datetime, active_retrainings: int | None = None,
                  dry_run: bool = False) -> dict[str, Any]:
    """Apply the retraining policy to the window's history, record the decision, alert on it.

    ``active_retrainings`` is the number of queued or running ``<name>_training`` runs; when
    None it is asked from Airflow (:func:`count_active_runs`, inside a task only). A ``dry_run``
    records a would-be retraining as "none" with the reason, and triggers nothing. Returns the
    decision with what the trigger task sends: ``trigger_run_id`` and ``trigger_conf``
    (:func:`trigger_conf`: the reason, the window's end and, for a simulator, its world).
    """
    from airmlops import alerts
    from airmlops.monitoring.policy import decide
    from airmlops.monitoring.store import MonitoringStore

    window_id = check_window_id(report["window_id"])
    now = utc(now, "now")
    store = MonitoringStore(settings.data_root)
    config = spec.monitoring
    if report.get("skipped"):
        decision = Decision("none", f"not assessed: {report['skipped']}",
                            {"window_id": window_id}, "")
        store.record_decision(spec.name, window_id, decision, decided_at=now)
        log.info("decide %s window %s: none (%s)", spec.name, window_id, decision.reason)
        return {"window_id": window_id, "action": "none", "reason": decision.reason,
                "dedup_key": None, "trigger_run_id": None, "trigger_reason": None,
                "trigger_conf": None, "replayed": False, "active_retrainings": None,
                "alert": None}
    history = _history_until(store, spec.name, window_id, config.policy.n)
    last = store.last_retraining(spec.name)
    if active_retrainings is None:
        active_retrainings = count_active_runs(spec.training_dag_id)
    decision = decide(history, config, now=now,
                      last_retraining_at=last.decided_at if last else None,
                      active_retrainings=active_retrainings, window_id=window_id, spec=spec)
    replayed = bool(decision.evidence.get("replayed"))
    if dry_run and decision.action == "retrain" and not replayed:
        decision = Decision("none", f"dry run, would retrain: {decision.reason}",
                            decision.evidence, decision.dedup_key)
    retrain = decision.action == "retrain"
    store.record_decision(spec.name, window_id, decision, decided_at=now,
                          triggered_run_id=decision.dedup_key if retrain else None)
    conf = trigger_conf(spec, window_id, decision.reason) if retrain else None
    alert = None
    if retrain and not replayed:
        alert = alerts.notify(spec, "retraining_decision",
                              f"Retraining {spec.training_dag_id}: {decision.reason}",
                              {"window_id": window_id, "trigger_run_id": decision.dedup_key,
                               "report_html": report.get("html_path"),
                               "breaches": report.get("breaches"),
                               "drift_share": report.get("drift_share"),
                               "performance": report.get("performance")})
    log.info("decide %s window %s: %s%s, because %s (active retrainings: %d)", spec.name,
             window_id, decision.action.upper(), " (replayed)" if replayed else "",
             decision.reason, active_retrainings)
    return {
        "window_id": window_id, "action": decision.action, "reason": decision.reason,
        "dedup_key": decision.dedup_key, "trigger_run_id": decision.dedup_key if retrain else None,
        "trigger_reason": conf["trigger_reason"] if conf else None, "trigger_conf": conf,
        "replayed": replayed, "active_retrainings": active_retrainings,
        "breached_windows": decision.evidence.get("breached_windows", []),
        "alert": alert,
    }
