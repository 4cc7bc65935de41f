"""A monitoring window's numbers in MLflow: one run per window, found again by its id.

Experiment ``<pipeline>-monitoring``; the run is tagged ``window_id`` and carries the numbers
as flat metrics (``drift.<column>``, ``performance.<metric>``, ``quality.<column>.<share>``,
``estimated_<metric>`` for the label-free estimate and ``estimated_rows``),
stamped with the window's end, and the whole report as ``window_report.json``. Logging the
same window again updates its run instead of adding one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from airmlops.monitoring.policy import check_window_id
from airmlops.times import epoch_us

if TYPE_CHECKING:
    from airmlops.monitoring.measurement import WindowReport
    from airmlops.spec import PipelineSpec


def _metrics_of(report: WindowReport) -> dict[str, float]:
    """The report's numbers as flat MLflow metrics (only finite values)."""
    values: dict[str, Any] = {
        "rows": report.rows, "sampled": report.sampled, "label_count": report.label_count,
        "drift_share": report.drift_share, "breaches": len(report.breaches),
        "drifted_columns": sum(1 for c in report.columns.values() if c.drifted),
    }
    for name, result in report.columns.items():
        values[f"drift.{name}"] = result.score
    if report.prediction_drift is not None:
        values["drift.prediction"] = report.prediction_drift.score
    for name, value in (report.performance or {}).items():
        values[f"performance.{name}"] = value
    for name, value in (report.estimated_performance or {}).items():
        values[f"estimated_{name}"] = value
    for name, entry in report.quality.items():
        for kind in ("missing_share", "out_of_range_share", "new_category_share"):
            if kind in entry:
                values[f"quality.{name}.{kind}"] = entry[kind]
    metrics = {}
    for key, value in values.items():
        if isinstance(value, bool) or value is None:
            continue
        number = float(value)
        if math.isfinite(number):
            metrics[key] = number
    return metrics


def log_report_to_mlflow(spec: PipelineSpec, report: WindowReport, tags: dict[str, str],
                         tracking_uri: str) -> str:
    """Log the window's numbers to its MLflow run (created once, found again by window id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, RunTag

    from airmlops.training.tracking import get_or_create_experiment

    window_id = check_window_id(report.window_id)
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment_id = get_or_create_experiment(client, f"{spec.name}-monitoring")
    # window_id matches WINDOW_ID_PATTERN (no quotes), so it is safe inside the filter.
    found = client.search_runs([experiment_id], f"tags.window_id = '{window_id}'",
                               max_results=1)
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(experiment_id, run_name=window_id,
                                   tags={"window_id": window_id}).info.run_id
    stamp = epoch_us(report.end) // 1000
    metrics = [Metric(key, value, stamp, 0) for key, value in _metrics_of(report).items()]
    all_tags = {"pipeline": spec.name, "window_id": window_id,
                "window_start": report.start.isoformat(), "window_end": report.end.isoformat(),
                "breaches": ", ".join(report.breaches) or "none", **tags}
    run_tags = [RunTag(key, str(value)[:5000]) for key, value in all_tags.items()]
    for offset in range(0, max(len(metrics), 1), 900):
        client.log_batch(run_id, metrics=metrics[offset:offset + 900],
                         tags=run_tags if offset == 0 else [])
    client.log_dict(run_id, report.to_dict(), "window_report.json")
    client.set_terminated(run_id, "FINISHED")
    return run_id
