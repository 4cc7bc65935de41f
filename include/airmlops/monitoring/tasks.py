"""The monitoring DAG's stages as plain functions: collect, report, retain, decide.

Each takes the spec and small values and returns a small JSON-able dict for XCom; none of them
reads the clock (window bounds and the decision time come in). Each is safe to retry:

- :func:`collect_window` (:mod:`airmlops.monitoring.collect`) reads one window of the
  prediction log and writes it as Parquet under
  ``<data_root>/monitoring/<pipeline>/windows/<window_id>/`` (rewritten whole on a retry);
- :func:`compute_report` (with :mod:`airmlops.monitoring.reporting`) measures the window
  against the current champion's reference (streaming its Parquet file), judges its breaches,
  saves the HTML, records the window and logs its numbers to MLflow;
- :func:`prune_window_artifacts` deletes the files of windows that ended more than
  ``monitoring.retention_windows`` window lengths before the current window's end (its Parquet
  folder and its HTML reports with their snapshots); the monitoring table and the MLflow runs
  keep every window. Windows after the current one are never touched, so re-reporting an old
  window deletes nothing newer;
- :func:`decide_window` applies the retraining policy to the recorded history (each window
  judged again from its numbers under the current spec) and records the decision and why, "none"
  included; a window that already decided to retrain replays that decision, so the trigger is
  sent again with the same run id and Airflow ignores it.

Window bounds and ids are :mod:`airmlops.monitoring.windows`; their names, and those of the
collect and report stages, are importable from here.

Active retrainings are counted through the Task SDK (``RuntimeTaskInstance.get_dr_count``, which
asks the API server's execution API): Airflow 3 tasks must not open the metadata database, and
this needs no REST credentials in the task's environment.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from airmlops.monitoring.collect import (
    LABELLED_COLUMNS,
    LABELLED_FILE,
    LOG_COLUMNS,
    PREDICTIONS_FILE,
    READ_SLICES,
    collect_window,
    flatten_predictions,
)
from airmlops.monitoring.mlflow_report import log_report_to_mlflow
from airmlops.monitoring.policy import Decision, check_window_id
from airmlops.monitoring.reporting import (
    champion_reference,
    empty_report,
    measure_and_judge,
    report_summary,
)
from airmlops.monitoring.windows import (
    WINDOW_ID,
    parse_window_id,
    report_html_path,
    window_bounds,
    window_dir,
    window_id_for,
)
from airmlops.paths import safe_join
from airmlops.times import utc

if TYPE_CHECKING:
    from airmlops.settings import Settings
    from airmlops.spec import PipelineSpec

__all__ = [
    "ACTIVE_STATES", "LABELLED_COLUMNS", "LABELLED_FILE", "LOG_COLUMNS", "PREDICTIONS_FILE",
    "READ_SLICES", "TRIGGER_REASON_MAX", "WINDOW_ID", "collect_window", "compute_report",
    "count_active_runs", "decide_window", "flatten_predictions", "parse_window_id",
    "prune_window_artifacts", "report_html_path", "trigger_conf", "trigger_reason",
    "window_bounds", "window_dir", "window_id_for",
]

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running")
TRIGGER_REASON_MAX = 500
"""The training DAG's ``trigger_reason`` param is at most this long."""


# --- report -------------------------------------------------------------------------------------


def compute_report(spec: PipelineSpec, collected: dict[str, Any], settings: Settings, *,
                   now: dt.datetime | None = None,
                   airflow_run_id: str | None = None) -> dict[str, Any]:
    """The window's report against the current champion's reference, saved and recorded.

    Without a champion, or without its reference data (written when it was promoted), the
    window is recorded with a note and no numbers, so the decision says why nothing happens.
    ``now`` is the time recorded as the row's update (default: the window end).
    """
    import pyarrow.parquet as pq

    from airmlops.monitoring.store import MonitoringStore

    window_id = check_window_id(collected["window_id"])
    start, end = parse_window_id(window_id)
    rows = pq.ParquetFile(collected["predictions_path"]).metadata.num_rows
    champion, reference, why = champion_reference(spec, settings)
    performance_html = None
    if reference is None:
        log.warning("report %s window %s: %s; the window is recorded without numbers",
                    spec.name, window_id, why)
        report = empty_report(window_id, start, end, rows, why)
    else:
        report, performance_html = measure_and_judge(spec, collected, settings, reference,
                                                      champion)
    MonitoringStore(settings.data_root).record_window(spec.name, report, created=now or end)
    tags = {"champion_version": str(champion.version) if champion else "none",
            "report_html": report.html_path or "none",
            "performance_html": performance_html or "none"}
    if airflow_run_id:
        tags["airflow_run_id"] = airflow_run_id
    mlflow_run_id = log_report_to_mlflow(spec, report, tags, settings.mlflow_tracking_uri)
    return report_summary(spec, report, champion=champion, performance_html=performance_html,
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
