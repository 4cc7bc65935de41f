"""The ``<name>_monitoring`` DAG: one run per window of the prediction log.

**collect** → **report** → **decide** → **should_retrain** (short-circuit) → **act**
(``TriggerDagRunOperator`` of ``<name>_training``), and **retain** (after report: deletes the
files of windows older than the retention). Every task is a few lines calling
:mod:`airmlops.monitoring.tasks` (whose values stay plain dicts); only Airflow's SDK and the
standard provider's trigger operator are imported at parse time.

The window of a run is its data interval: the timetable is a cron trigger on
``monitoring.schedule`` whose data interval is the ``monitoring.window_minutes`` before each tick.
A manual run with a logical date covers the window ending then; a REST trigger may pass an
explicit ``data_interval_start``/``data_interval_end`` to report any past window again.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import DAG, Param, dag, get_current_context, task

from airmlops.dags.common import pipeline_dag_args, stage
from airmlops.settings import get_settings
from airmlops.spec import PipelineSpec, load_spec

if TYPE_CHECKING:
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

MONITORING_DOC = """
### {name}: monitoring

Watches the champion of `{name}` on its live traffic, one run per window of
{window} minutes (schedule `{schedule}`, UTC):

**collect** reads the window from the prediction log, plus the labels that arrived during it
(joined with their predictions from up to {lookback} windows back) →
**report** compares a time-stratified sample of {sample} rows with the champion's reference
data (Evidently: per-column drift with the spec's methods and thresholds, data quality,
performance on the delayed labels), saves the HTML report under
`reports/{name}/monitoring/<window_id>.html`, records the window in the monitoring table and
logs the numbers to MLflow experiment `{name}-monitoring` →
**decide** applies the policy (breached in at least {k} of the last {n} windows and in the
latest, cooldown {cooldown} h, at most {active} active retraining) and records the decision and
why, also when it is "none" → **act** triggers `{training}` with run id `retrain__<window_id>`
(a repeated run for the same window never triggers twice) and a conf with the reason,
`data_end` = the window's end (the retraining ingests data up to the window it reacts to) and,
for a simulator source, the world it was observed in (`scenario`, `scenario_start`).
**retain** (after report) deletes the Parquet and HTML files of windows that ended more than
{retention} window lengths ago; the table and the MLflow runs keep every window.

Params: `dry_run` records what would happen without triggering.
Spec: `{path}` (hash `{spec_hash}`).
"""


def monitoring_params() -> dict[str, Param]:
    """Typed params of a monitoring run."""
    return {
        "dry_run": Param(False, type="boolean",
                         description="Report and decide, but record a would-be retraining as "
                         "'none' (with the reason) and trigger nothing."),
    }


def current_window(window_minutes: int) -> tuple[dt.datetime, dt.datetime]:
    """The running task's window, from its data interval (see the module docstring)."""
    from airmlops.monitoring.tasks import window_bounds

    context = get_current_context()
    dag_run = context["dag_run"]
    end = context.get("data_interval_end") or dag_run.logical_date or dag_run.run_after
    return window_bounds(context.get("data_interval_start"), end, window_minutes)


def build_monitoring_dag(spec: PipelineSpec, spec_path: Path) -> DAG:
    """The ``<name>_monitoring`` DAG: collect → report → decide → act."""

    @dag(
        dag_id=spec.monitoring_dag_id,
        **_monitoring_dag_args(spec, spec_path),
        params=monitoring_params(),
        render_template_as_native_obj=True,
    )
    def monitoring() -> None:
        _monitoring_tasks(spec, spec_path)

    return monitoring()


def _monitoring_dag_args(spec: PipelineSpec, spec_path: Path) -> dict[str, Any]:
    """The timetable (a cron trigger whose data interval is the window), the pipeline's shared
    DAG arguments and the DAG's documentation."""
    from airflow.sdk import CronTriggerTimetable

    config = spec.monitoring
    policy = config.policy
    return {
        "schedule": CronTriggerTimetable(config.schedule, timezone="UTC",
                                         interval=dt.timedelta(minutes=config.window_minutes)),
        **pipeline_dag_args(spec, "monitoring"),
        "doc_md": MONITORING_DOC.format(
            name=spec.name, window=config.window_minutes, schedule=config.schedule,
            lookback=config.performance.label_lookback_windows,
            retention=config.retention_windows, sample=config.sample_size, k=policy.k,
            n=policy.n, cooldown=policy.cooldown_hours, active=policy.max_active_retrainings,
            training=spec.training_dag_id, path=spec_path.name, spec_hash=spec.spec_hash()[:12],
        ),
    }


def _monitoring_tasks(spec: PipelineSpec, spec_path: Path) -> None:
    """collect → report → decide → should_retrain → act, and retain after report, in the DAG
    being built. Every task reads the spec file again (:func:`load_spec`)."""
    from airmlops.monitoring import tasks

    def load() -> PipelineSpec:
        return load_spec(spec_path)

    @task
    @stage
    def collect() -> dict[str, Any]:
        """The window's predictions and the labels that arrived in it, as Parquet."""
        current = load()
        start, end = current_window(current.monitoring.window_minutes)
        return tasks.collect_window(current, start, end, get_settings())

    @task
    @stage
    def report(collected: dict[str, Any]) -> dict[str, Any]:
        """Drift, quality and performance vs the champion's reference: HTML, table, MLflow."""
        run_id = get_current_context()["dag_run"].run_id
        return tasks.compute_report(load(), collected, get_settings(), airflow_run_id=run_id)

    @task
    @stage
    def decide(window: dict[str, Any]) -> dict[str, Any]:
        """The policy's decision for this window, recorded with its reason (also "none")."""
        dry_run = bool(get_current_context()["params"].get("dry_run"))
        return tasks.decide_window(load(), window, get_settings(),
                                   now=dt.datetime.fromisoformat(window["end"]),
                                   dry_run=dry_run)

    @task
    @stage
    def retain(window: dict[str, Any]) -> dict[str, Any]:
        """Delete the files of windows older than the spec's retention."""
        return tasks.prune_window_artifacts(
            load(), dt.datetime.fromisoformat(window["start"]),
            dt.datetime.fromisoformat(window["end"]), get_settings())

    @task.short_circuit
    @stage
    def should_retrain(decided: dict[str, Any]) -> bool:
        """Only a "retrain" decision goes on to the trigger."""
        return decided["action"] == "retrain"

    act = _trigger_training(spec)
    reported = report(collect())
    should_retrain(decide(reported)) >> act
    retain(reported)


def _trigger_training(spec: PipelineSpec) -> TriggerDagRunOperator:
    """The ``act`` task: triggers ``<name>_training`` with the run id and conf ``decide``
    returned."""
    from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator

    decision = "ti.xcom_pull(task_ids='decide')"
    return TriggerDagRunOperator(
        task_id="act",
        trigger_dag_id=spec.training_dag_id,
        trigger_run_id=f"{{{{ {decision}['trigger_run_id'] }}}}",
        # The whole conf comes from decide (rendered as a dict: the DAG renders native
        # objects), so what a retraining is given is built, and tested, in the package.
        conf=f"{{{{ {decision}['trigger_conf'] }}}}",
        logical_date=None,
        skip_when_already_exists=True,
        doc_md="Triggers the retraining; the run id is the window's dedup key, so a "
        "repeated monitoring run finds the run already there and is skipped.",
    )
