"""The ``<name>_features`` DAG: build the offline store, then materialize the online one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from airflow.sdk import DAG, dag, task

from airmlops.contracts import FeatureBuild, Materialized
from airmlops.dags.common import pipeline_dag_args, run_context, stage, training_params
from airmlops.dags.training import snapshot_asset
from airmlops.settings import get_settings
from airmlops.spec import PipelineSpec, load_spec

FEATURES_DOC = """
### {name}: features

Keeps the feature store of `{name}` fresh: **build_offline** computes the feature views
({views}) for the run's days from the pipeline's events and profiles and writes them to the
offline store (Parquet, partitioned by date; a first run backfills {backfill} days), then
**materialize** copies the rows newer than each view's watermark to the online store (SQLite, or
Redis when `MLOPS_REDIS_URL` is set). Both steps are idempotent: a re-run writes nothing new.

Runs on `{schedule}` and whenever `{training}` ingests a new snapshot (asset `{asset}`).
"""


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
            training=spec.training_dag_id,
        ),
        params={"scenario": training_params()["scenario"]},
    )
    def features() -> None:
        @task
        @stage
        def build_offline() -> FeatureBuild:
            """Compute the feature views for the run's days into the offline store."""
            return stages.build_features(load_spec(spec_path), run_context(), get_settings())

        @task
        @stage
        def materialize() -> Materialized:
            """Copy new offline rows to the online store (watermark per view)."""
            return stages.materialize_features(load_spec(spec_path), run_context(),
                                               get_settings())

        build_offline() >> materialize()

    return features()
