"""Turns each pipeline spec into its Airflow DAGs.

Parse-time cost matters (the DAG processor parses often), so this module imports only Airflow's
SDK, pydantic and YAML; every task imports what it needs when it runs. A spec that fails
validation, or any other error while one spec's DAGs are built, yields one placeholder DAG that
explains the error (in its docs and in the failure of its only task), so the problem shows in
the UI while every other pipeline keeps loading and the DAG file never fails to import.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from pathlib import Path
from typing import Any, get_args

from airflow.sdk import DAG, Asset, Param, dag, get_current_context, task

from airmlops.notifiers import PipelineFailureNotifier
from airmlops.settings import get_settings
from airmlops.spec import (
    NAME_PATTERN,
    PipelineSpec,
    SimulatorSource,
    SpecError,
    load_spec,
    spec_paths,
)

log = logging.getLogger(__name__)

DEFAULT_ARGS = {
    "owner": "mlops",
    "retries": 2,
    "retry_delay": dt.timedelta(seconds=30),
    "retry_exponential_backoff": True,
}
SCENARIOS = list(get_args(SimulatorSource.model_fields["scenario"].annotation))
DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
DATETIME_PATTERN = (r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?"
                    r"(Z|[+-]\d{2}:\d{2})$")

TRAINING_DOC = """
### {name}: training

{description}

The lifecycle, one task per stage:
**ingest** (immutable, content-addressed snapshot of the run's data interval) →
**validate_data** (Great Expectations suite from the spec; a failing batch is quarantined with its
report and nothing downstream runs) → **preprocess** (time-based split with an embargo of
{gap_days} days) → **train** (scikit-learn Pipeline `{estimator}`, tracked in MLflow with lineage)
→ **validate_model** (absolute gates on `{metric}` and a paired bootstrap against the champion;
not blessed ends the run here, successfully) → **register** (new version, alias `challenger`)
→ **containerize** (a BentoML bento of that version; a Docker image when an engine is reachable)
→ **deploy** (blue/green behind the stable address http://127.0.0.1:{port}; any failure leaves
the old version serving) → **monitor** (bake period on live traffic with automatic rollback;
then alias `champion` and the reference data for drift monitoring).

Spec: `{path}` (hash `{spec_hash}`). Task: {task}. Schedule: `{schedule}`.
"""


def pipeline_dag_args(spec: PipelineSpec, kind: str) -> dict[str, Any]:
    """What every DAG of a pipeline shares: start, no catchup, one run at a time, retries,
    owner, tags and, in every task, the failure alert (:func:`failure_callbacks`)."""
    return {
        "start_date": dt.datetime.combine(spec.start_date, dt.time(), tzinfo=dt.UTC),
        "catchup": False,
        "max_active_runs": 1,
        "default_args": {**DEFAULT_ARGS, "owner": spec.owner, **failure_callbacks(spec)},
        "tags": ["mlops", kind, spec.name, *spec.tags],
    }


def failure_callbacks(spec: PipelineSpec) -> dict[str, Any]:
    """``on_failure_callback``: a ``task_failed`` alert when a task fails for good, if the spec's
    alerts have a channel and take that event; else nothing (no callback at all)."""
    if spec.alerts is None or not spec.alerts.sends("task_failed"):
        return {}
    return {"on_failure_callback": PipelineFailureNotifier(spec.name, spec.alerts)}


def _run_context(spec: PipelineSpec):
    """The current task's RunContext, from Airflow's context and the run's params."""
    from airmlops.stages import RunContext, resolve_git_commit

    context = get_current_context()
    dag_run = context["dag_run"]
    params = context["params"]
    as_of = context.get("data_interval_end") or dag_run.logical_date or dag_run.run_after
    reason = params.get("trigger_reason") or (
        "scheduled" if dag_run.run_type == "scheduled" else f"{dag_run.run_type} run"
    )
    return RunContext(
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
        as_of=as_of,
        git_commit=resolve_git_commit(params.get("git_commit"), get_settings()),
        trigger_reason=str(reason),
        scenario=params.get("scenario"),
        scenario_start=parse_scenario_start(params.get("scenario_start")),
        full_history=bool(params.get("full_history")),
        data_end=parse_data_end(params.get("data_end")),
    )


def parse_scenario_start(value: Any) -> dt.date | None:
    """The ``scenario_start`` param (``YYYY-MM-DD`` or empty) as a date."""
    if value in (None, "", "None"):
        return None
    if not isinstance(value, str) or not re.fullmatch(DATE_PATTERN, value):
        raise ValueError(f"scenario_start: expected a date YYYY-MM-DD, got {value!r}")
    return dt.date.fromisoformat(value)


def parse_data_end(value: Any) -> dt.datetime | None:
    """The ``data_end`` param (an ISO 8601 time with its offset, or empty) as an aware datetime.

    A templated conf renders a missing value as the text ``None``, which means "not set".
    """
    if value in (None, "", "None"):
        return None
    if not isinstance(value, str) or not re.fullmatch(DATETIME_PATTERN, value):
        raise ValueError(f"data_end: expected an ISO 8601 time with a UTC offset, got {value!r}")
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def training_params() -> dict[str, Param]:
    """Typed params for manual runs (and the conf a webhook or the monitoring DAG sends)."""
    return {
        "trigger_reason": Param(None, type=["null", "string"], maxLength=500,
                                description="Why this run happens; recorded in MLflow."),
        "git_commit": Param(None, type=["null", "string"], pattern="^[0-9a-fA-F]{7,64}$",
                            description="Commit to record in lineage (webhooks set it)."),
        "git_ref": Param(None, type=["null", "string"], maxLength=255),
        "git_repository": Param(None, type=["null", "string"], maxLength=255),
        "scenario": Param(None, type=["null", "string"], enum=[None, *SCENARIOS],
                          description="Simulator only: override the spec's scenario "
                          "(source.scenario) for this run."),
        "scenario_start": Param(None, type=["null", "string"], pattern=DATE_PATTERN,
                                format="date",
                                description="Simulator only: the first day of the scenario "
                                "(YYYY-MM-DD; stable before); overrides source.scenario_start."),
        "data_end": Param(None, type=["null", "string"], pattern=DATETIME_PATTERN,
                          description="Ingest data up to this time (ISO 8601 with offset) "
                          "instead of the run's own time; the monitoring DAG sets it to the "
                          "end of the window that triggered the retraining."),
        "full_history": Param(False, type="boolean",
                              description="Read the source from the spec's start_date."),
        "skip_deploy": Param(False, type="boolean",
                             description="Register the challenger but do not package or "
                             "deploy it."),
    }


def build_training_dag(spec: PipelineSpec, spec_path: Path) -> DAG:
    """The ``<name>_training`` DAG: ingest → … → register."""
    from airmlops import stages

    def load() -> PipelineSpec:
        # Tasks read the spec file as it is when they run, validated again.
        return load_spec(spec_path)

    @dag(
        dag_id=spec.training_dag_id,
        schedule=spec.schedule,
        **pipeline_dag_args(spec, "training"),
        doc_md=TRAINING_DOC.format(
            name=spec.name, description=spec.description.strip(), gap_days=spec.training.gap_days,
            estimator=spec.estimator.class_path, metric=spec.gates.primary_metric,
            path=spec_path.name, spec_hash=spec.spec_hash()[:12], task=spec.task,
            schedule=spec.schedule, port=spec.deploy.port,
        ),
        params=training_params(),
    )
    def training() -> None:
        @task(outlets=[snapshot_asset(spec)] if spec.feature_store else [])
        def ingest() -> dict[str, Any]:
            """Snapshot the run's data interval (content-addressed, written once)."""
            current = load()
            return stages.ingest(current, _run_context(current), get_settings())

        @task
        def validate_data(snapshot: dict[str, Any]) -> dict[str, Any]:
            """Data contract; a failing batch is quarantined and the run fails without retries."""
            from airflow.sdk.exceptions import AirflowFailException

            try:
                return stages.validate_data(load(), snapshot, get_settings())
            except stages.DataValidationFailed as failure:
                raise AirflowFailException(str(failure)) from failure

        @task
        def preprocess(snapshot: dict[str, Any]) -> dict[str, Any]:
            """Point-in-time training set with a time-based split."""
            return stages.preprocess(load(), snapshot, get_settings())

        @task
        def train(training_set: dict[str, Any]) -> dict[str, Any]:
            """Fit and track the model."""
            current = load()
            return stages.train(current, training_set, _run_context(current), get_settings())

        @task.short_circuit
        def validate_model(trained: dict[str, Any]) -> bool:
            """Gates; False skips everything downstream (the run still succeeds)."""
            decision = stages.validate_model(load(), trained, get_settings())
            return bool(decision["blessed"])

        @task
        def register(trained: dict[str, Any]) -> dict[str, Any]:
            """New model version with alias ``challenger``."""
            return stages.register(load(), trained, get_settings())

        @task.short_circuit(ignore_downstream_trigger_rules=True)
        def should_deploy() -> bool:
            """The ``skip_deploy`` param stops here (the run still succeeds)."""
            return not get_current_context()["params"].get("skip_deploy")

        @task
        def containerize(registered: dict[str, Any]) -> dict[str, Any]:
            """A bento of that exact version, and an image when a Docker engine is reachable."""
            return stages.containerize(load(), str(spec_path), registered, get_settings())

        @task
        def deploy(packaged: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
            """Blue/green behind the stable address; any failure leaves the old version."""
            from airflow.sdk.exceptions import AirflowFailException

            from airmlops.serving.deploy import DeployFailed

            current = load()
            try:
                return stages.deploy(current, packaged, trained, _run_context(current),
                                     get_settings())
            except DeployFailed as failure:  # deterministic: a retry would fail the same way
                raise AirflowFailException(f"deploy failed, old version still serving: "
                                           f"{failure}") from failure

        @task
        def monitor(deployed: dict[str, Any], trained: dict[str, Any]) -> dict[str, Any]:
            """Bake period with automatic rollback, then champion and reference data."""
            from airflow.sdk.exceptions import AirflowFailException

            current = load()
            try:
                return stages.monitor(current, deployed, trained, _run_context(current),
                                      get_settings())
            except stages.BakeFailed as failure:  # rolled back already: never retry
                raise AirflowFailException(str(failure)) from failure

        snapshot = ingest()
        checked = validate_data(snapshot)
        training_set = preprocess(snapshot)
        checked >> training_set
        trained = train(training_set)
        registered = register(trained)
        validate_model(trained) >> registered
        packaged = containerize(registered)
        registered >> should_deploy() >> packaged
        monitor(deploy(packaged, trained), trained)

    return training()


FEATURES_DOC = """
### {name}: features

Keeps the feature store of `{name}` fresh: **build_offline** computes the feature views
({views}) for the run's days from the pipeline's events and profiles and writes them to the
offline store (Parquet, partitioned by date; a first run backfills {backfill} days), then
**materialize** copies the rows newer than each view's watermark to the online store (SQLite, or
Redis when `MLOPS_REDIS_URL` is set). Both steps are idempotent: a re-run writes nothing new.

Runs on `{schedule}` and whenever `{name}_training` ingests a new snapshot (asset `{asset}`).
"""


def snapshot_asset(spec: PipelineSpec) -> Asset:
    """The asset a training run updates when it ingests a batch."""
    return Asset(name=f"{spec.name}_snapshots", uri=f"airmlops://{spec.name}/snapshots")


def build_features_dag(spec: PipelineSpec, spec_path: Path) -> DAG:
    """The ``<name>_features`` DAG: build the offline store, then materialize online."""
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    from airmlops import stages

    store = spec.feature_store
    asset = snapshot_asset(spec)
    schedule: Any = [asset]
    if store.schedule:
        schedule = AssetOrTimeSchedule(
            timetable=CronTriggerTimetable(store.schedule, timezone="UTC"), assets=[asset]
        )

    @dag(
        dag_id=spec.features_dag_id,
        schedule=schedule,
        **pipeline_dag_args(spec, "features"),
        doc_md=FEATURES_DOC.format(
            name=spec.name, views=", ".join(v.name for v in store.views),
            backfill=store.backfill_days, schedule=store.schedule, asset=asset.uri,
        ),
        params={"scenario": training_params()["scenario"]},
    )
    def features() -> None:
        @task
        def build_offline() -> dict[str, Any]:
            """Compute the feature views for the run's days into the offline store."""
            current = load_spec(spec_path)
            return stages.build_features(current, _run_context(current), get_settings())

        @task
        def materialize() -> dict[str, Any]:
            """Copy new offline rows to the online store (watermark per view)."""
            current = load_spec(spec_path)
            return stages.materialize_features(current, _run_context(current), get_settings())

        build_offline() >> materialize()

    return features()


def build_rollback_dag(spec: PipelineSpec, spec_path: Path) -> DAG:
    """``<name>_rollback``: serve the previous version again and move ``champion`` back."""
    from airmlops import stages

    @dag(
        dag_id=f"{spec.name}_rollback",
        schedule=None,
        **pipeline_dag_args(spec, "deploy"),
        doc_md=f"### {spec.name}: rollback\n\nSwitches the stable address "
        f"http://127.0.0.1:{spec.deploy.port} back to the previous version (restarting it if "
        "needed) and moves the `champion` alias back to it. Trigger it by hand.",
        params={"trigger_reason": training_params()["trigger_reason"]},
    )
    def rollback_dag() -> None:
        @task
        def rollback() -> dict[str, Any]:
            """Switch back to the previous slot."""
            current = load_spec(spec_path)
            return stages.rollback(current, _run_context(current), get_settings())

        rollback()

    return rollback_dag()


def _placeholder_name(path: Path) -> str:
    stem = re.sub(r"[^a-z0-9_]", "_", path.stem.lower())
    return stem if re.match(NAME_PATTERN, stem) else f"pipeline_{stem}"[:60]


def build_invalid_spec_dag(path: Path, error: Exception) -> DAG:
    """A DAG that shows a spec's validation error in the UI and fails if triggered."""
    message = str(error) if isinstance(error, SpecError) else (
        f"invalid pipeline spec {path}:\n  (build): {type(error).__name__}: "
        f"{' '.join(str(error).split())[:500]}")

    @dag(
        dag_id=f"{_placeholder_name(path)}_invalid_spec",
        schedule=None,
        start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        catchup=False,
        default_args=DEFAULT_ARGS,
        tags=["mlops", "invalid-spec"],
        doc_md=f"### Invalid pipeline spec\n\n```\n{message}\n```\n\nFix the file; this DAG "
        "disappears and the pipeline's DAGs load on the next parse.",
    )
    def invalid_spec() -> None:
        @task
        def explain() -> None:
            from airflow.sdk.exceptions import AirflowFailException

            raise AirflowFailException(message)

        explain()

    return invalid_spec()


def _build_pipeline(spec: PipelineSpec, path: Path) -> list[DAG]:
    from airmlops.monitoring.dag import build_monitoring_dag

    built = [build_training_dag(spec, path), build_rollback_dag(spec, path),
             build_monitoring_dag(spec, path)]
    if spec.feature_store is not None:
        built.append(build_features_dag(spec, path))
    return built


def _autoregistered() -> set:
    """DAGs Airflow's DagBag picks up from the DAG context even when they are not returned."""
    from airflow.sdk.definitions._internal.contextmanager import DagContext

    return DagContext.autoregistered_dags


def _forget(dags: list[DAG]) -> None:
    """Keep DAGs this factory discarded (half-built, duplicated ids) out of the DagBag."""
    registered = _autoregistered()
    for item in [item for item in registered if any(item[0] is gone for gone in dags)]:
        registered.discard(item)


def build_all(pipelines_dir: Path | None = None) -> dict[str, DAG]:
    """Every DAG of every spec in the folder, keyed by dag_id.

    Whatever goes wrong with one spec (a validation error or any other exception while its
    DAGs are built) gives that spec a ``<file>_invalid_spec`` DAG instead; the other specs'
    DAGs are unaffected.
    """
    folder = pipelines_dir or get_settings().pipelines_dir
    dags: dict[str, DAG] = {}
    owners: dict[str, Path] = {}
    for path in spec_paths(folder):
        before = set(_autoregistered())
        try:
            spec = load_spec(path)
            built = _build_pipeline(spec, path)
            taken = sorted({dag.dag_id for dag in built} & set(dags))
            if taken:
                raise SpecError(path, [("name", f"'{spec.name}' gives DAG ids {taken} that "
                                        f"{owners[taken[0]].name} already defines")])
        except Exception as error:  # one bad spec must never break the DAG file
            _forget([item[0] for item in set(_autoregistered()) - before])
            log.error("%s", error if isinstance(error, SpecError) else
                      f"pipeline spec {path}: {type(error).__name__}: {error}")
            built = [build_invalid_spec_dag(path, error)]
        for item in built:
            if item.dag_id in dags:
                log.error("%s: dag_id %s is already defined by another spec; skipped",
                          path, item.dag_id)
                _forget([item])
                continue
            dags[item.dag_id] = item
            owners[item.dag_id] = path
    return dags
