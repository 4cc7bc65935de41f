"""The ``<name>_training`` DAG: ingest → validate_data → preprocess → train → validate_model →
register → containerize → deploy → monitor.

Each task is a few lines calling :mod:`airmlops.stages` with the spec the run pinned at ingest
(:func:`run_spec`): the spec file is read once per run, so editing it during a run changes
nothing in that run. Values between tasks are the contracts of :mod:`airmlops.contracts`,
converted to and from XCom by :func:`~airmlops.dags.common.stage`.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from airflow.sdk import DAG, Asset, XComArg, dag, get_current_context, task

from airmlops.contracts import (
    DataCheck,
    Deployment,
    MonitorResult,
    Package,
    RegisteredVersion,
    Snapshot,
    TrainedModel,
    TrainingSet,
)
from airmlops.dags.common import pipeline_dag_args, run_context, stage, training_params
from airmlops.settings import get_settings
from airmlops.spec import PipelineSpec

TRAINING_DOC = """
### {name}: training

{description}

The lifecycle, one task per stage:
**ingest** (immutable, content-addressed snapshot of the run's data interval; pins the spec for
the run) →
**validate_data** (Great Expectations suite from the spec; a failing batch is quarantined with its
report and nothing downstream runs) → **preprocess** (time-based split with an embargo of
{gap_days} days) → **train** (scikit-learn Pipeline `{estimator}`, tracked in MLflow with lineage)
→ **validate_model** (absolute gates on `{metric}` and a paired bootstrap against the champion;
not blessed ends the run here, successfully) → **register** (new version, alias `challenger`)
→ **containerize** (a BentoML bento of that version; a Docker image when an engine is reachable)
→ **deploy** (blue/green behind the stable address http://127.0.0.1:{port}; any failure leaves
the old version serving) → **monitor** (bake period on live traffic with automatic rollback;
then alias `champion` and the reference data for drift monitoring).

Spec: `{path}` (hash `{spec_hash}`; every task after ingest uses the copy ingest pinned).
Task: {task}. Schedule: `{schedule}`.
"""


def snapshot_asset(spec: PipelineSpec) -> Asset:
    """The asset a training run updates when it ingests a batch."""
    return Asset(name=f"{spec.name}_snapshots", uri=f"airmlops://{spec.name}/snapshots")


def run_spec():
    """The spec this run pinned at ingest (a :class:`~airmlops.spec_pin.PinnedSpec`), checked
    against the hash ingest recorded."""
    from airmlops.spec_pin import PinnedSpec, load_pinned

    snapshot = Snapshot.from_xcom(get_current_context()["ti"].xcom_pull(task_ids="ingest"))
    spec = load_pinned(snapshot.spec_path, snapshot.spec_hash)
    return PinnedSpec(spec, snapshot.spec_path, snapshot.spec_hash)


def build_training_dag(spec: PipelineSpec, spec_path: Path) -> DAG:
    """The ``<name>_training`` DAG: ingest → … → register → … → monitor."""

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
        _release_tasks(spec, _training_tasks(spec, spec_path))

    return training()


def _training_tasks(spec: PipelineSpec, spec_path: Path) -> XComArg:
    """ingest → validate_data → preprocess → train, in the DAG being built; the ``train``
    task's output."""
    from airmlops import stages

    @task(outlets=[snapshot_asset(spec)] if spec.feature_store else [])
    @stage
    def ingest() -> Snapshot:
        """Pin the spec file as it is now, then snapshot the run's data interval."""
        from airmlops.spec_pin import read_spec

        current, raw = read_spec(spec_path)
        return stages.ingest(current, run_context(), get_settings(), spec_bytes=raw)

    @task
    @stage
    def validate_data(snapshot: Snapshot) -> DataCheck:
        """Data contract; a failing batch is quarantined and the run fails without retries."""
        return stages.validate_data(run_spec().spec, snapshot, get_settings())

    @task
    @stage
    def preprocess(snapshot: Snapshot) -> TrainingSet:
        """Point-in-time training set with a time-based split."""
        return stages.preprocess(run_spec().spec, snapshot, get_settings())

    @task
    @stage
    def train(training_set: TrainingSet) -> TrainedModel:
        """Fit and track the model."""
        return stages.train(run_spec().spec, training_set, run_context(), get_settings())

    snapshot = ingest()
    checked = validate_data(snapshot)
    training_set = preprocess(snapshot)
    checked >> training_set
    return train(training_set)


def _release_tasks(spec: PipelineSpec, model: XComArg) -> None:
    """validate_model → register → should_deploy → containerize → deploy → monitor, after the
    ``train`` task whose output is ``model``, in the DAG being built."""
    from airmlops import stages

    @task.short_circuit
    @stage
    def validate_model(trained: TrainedModel) -> bool:
        """Gates; False skips everything downstream (the run still succeeds)."""
        return stages.validate_model(run_spec().spec, trained, get_settings()).blessed

    @task
    @stage
    def register(trained: TrainedModel) -> RegisteredVersion:
        """New model version with alias ``challenger``."""
        return stages.register(run_spec().spec, trained, get_settings())

    @task.short_circuit(ignore_downstream_trigger_rules=True)
    def should_deploy() -> bool:
        """The ``skip_deploy`` param stops here (the run still succeeds)."""
        return not get_current_context()["params"].get("skip_deploy")

    @task
    @stage
    def containerize(registered: RegisteredVersion) -> Package:
        """A bento of that exact version and the pinned spec, and an image when a Docker
        engine is reachable."""
        pinned = run_spec()
        return stages.containerize(pinned.spec, pinned.path, registered, get_settings())

    @task(execution_timeout=dt.timedelta(seconds=spec.deploy.deploy_task_timeout_seconds()))
    @stage
    def deploy(packaged: Package, trained: TrainedModel) -> Deployment:
        """Blue/green (or canary, or shadow) behind the stable address; any failure, the task's
        timeout included, leaves the old version."""
        return stages.deploy(run_spec().spec, packaged, trained, run_context(), get_settings())

    @task
    @stage
    def monitor(deployed: Deployment, trained: TrainedModel) -> MonitorResult:
        """Bake period with automatic rollback, then champion and reference data."""
        return stages.monitor(run_spec().spec, deployed, trained, run_context(),
                              get_settings())

    registered = register(model)
    validate_model(model) >> registered
    packaged = containerize(registered)
    registered >> should_deploy() >> packaged
    monitor(deploy(packaged, model), model)
