"""The ``<name>_rollback`` DAG: serve the previous version again, triggered by hand."""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import DAG, dag, task

from airmlops.contracts import RolledBack
from airmlops.dags.common import pipeline_dag_args, run_context, stage, training_params
from airmlops.settings import get_settings
from airmlops.spec import PipelineSpec, load_spec


def build_rollback_dag(spec: PipelineSpec, spec_path: Path) -> DAG:
    """``<name>_rollback``: serve the previous version again and move ``champion`` back."""
    from airmlops import stages

    @dag(
        dag_id=spec.rollback_dag_id,
        schedule=None,
        **pipeline_dag_args(spec, "deploy"),
        doc_md=f"### {spec.name}: rollback\n\nSwitches the stable address "
        f"http://127.0.0.1:{spec.deploy.port} back to the previous version (restarting it if "
        "needed) and moves the `champion` alias back to it. Trigger it by hand.",
        params={"trigger_reason": training_params()["trigger_reason"]},
    )
    def rollback_dag() -> None:
        @task
        @stage
        def rollback() -> RolledBack:
            """Switch back to the previous slot."""
            return stages.rollback(load_spec(spec_path), run_context(), get_settings())

        rollback()

    return rollback_dag()
