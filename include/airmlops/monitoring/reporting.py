"""The monitoring DAG's report stage: one window measured and judged.

:func:`measure_and_judge` measures the collected window against the current champion's reference
(:mod:`airmlops.monitoring.drift`, streaming the window's Parquet file, so a window of ten
million rows never sits in memory whole), judges its breaches from the numbers
(:mod:`airmlops.monitoring.judgement`) and saves the HTML under
``<data_root>/reports/<pipeline>/monitoring/<window_id>.html``;
:func:`airmlops.monitoring.tasks.compute_report` records the result.

Delayed labels: a window's performance is measured on the labels that *arrived* during the
window, joined with their predictions from up to
``monitoring.performance.label_lookback_windows`` window lengths back (the collect stage writes
them as ``labelled.parquet``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import TYPE_CHECKING, Any

from airmlops.monitoring.estimation import with_window_estimate
from airmlops.monitoring.measurement import WindowMeasurement, WindowReport
from airmlops.monitoring.windows import parse_window_id, report_html_path
from airmlops.paths import safe_join

if TYPE_CHECKING:
    from airmlops.monitoring.reference import ReferenceProfile
    from airmlops.settings import Settings
    from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)


def empty_report(window_id: str, start: dt.datetime, end: dt.datetime, rows: int,
                  why: str) -> WindowReport:
    """A window recorded without numbers, with the note why."""
    return WindowReport(window_id=window_id, start=start, end=end, rows=rows, sampled=0,
                        columns={}, drift_share=None, prediction_drift=None, quality={},
                        performance=None, label_count=0, breaches=[], notes=[why])


def with_delayed_performance(measurement: WindowMeasurement, performance: WindowMeasurement,
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


def champion_reference(spec: PipelineSpec, settings: Settings
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


def measure_and_judge(spec: PipelineSpec, collected: dict[str, Any], settings: Settings,
                       reference: ReferenceProfile, champion: Any
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
    predictions = collected["predictions_path"]
    measured = measure_window(reference, predictions, None, spec, config, window_id=window_id,
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
        measured = with_delayed_performance(measured, performance,
                                             collected.get("label_lookback_start", "?"))
    if spec.task == "binary_classification":  # the label-free estimate, beside the realized
        outputs = pd.read_parquet(predictions, columns=["model_version", "prediction"])
        measured = with_window_estimate(measured, outputs, champion,
                                        settings.mlflow_tracking_uri,
                                        config.performance.probability_threshold)
    judgement = judge(WindowNumbers.from_report(measured), config, spec)
    for breach, reason in judgement.reasons.items():
        log.info("report %s window %s: breach %s: %s", spec.name, window_id, breach, reason)
    return WindowReport.judged(measured, judgement), performance_html


def report_summary(spec: PipelineSpec, report: WindowReport, *, champion: Any,
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
