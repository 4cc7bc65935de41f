"""The training stages as plain functions: what each Airflow task calls.

Every function takes the spec and small values (paths, digests, ids) and returns a small
JSON-serialisable dict for XCom. None of them reads the clock: the run's time comes in as
``as_of``. Each is safe to retry: snapshots are content-addressed, training sets are keyed by
the snapshot digest and the spec hash, and registration reuses the version of an MLflow run.
"""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
from dataclasses import dataclass
from typing import Any

from airmlops.settings import PROJECT_ROOT, Settings
from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)

COMMIT_PATTERN = r"^[0-9a-fA-F]{7,64}$"


class DataValidationFailed(RuntimeError):
    """The batch failed its data contract; it is quarantined and nothing downstream runs."""


@dataclass(frozen=True)
class RunContext:
    """What a stage needs to know about the Airflow run that calls it."""

    dag_id: str
    run_id: str
    as_of: dt.datetime
    git_commit: str
    trigger_reason: str
    scenario: str | None = None
    full_history: bool = False

    def lineage(self) -> dict[str, str]:
        return {
            "git_commit": self.git_commit,
            "airflow_dag_id": self.dag_id,
            "airflow_run_id": self.run_id,
            "trigger_reason": self.trigger_reason,
        }


def day_floor(moment: dt.datetime) -> dt.datetime:
    """Midnight UTC of the moment's day: a run's training data ends at the start of its day."""
    moment = moment.astimezone(dt.UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def resolve_git_commit(conf_commit: str | None, settings: Settings) -> str:
    """The commit for lineage: the run's conf (a webhook), the setting, or the checkout's HEAD."""
    import re

    for candidate in (conf_commit, settings.git_commit):
        if candidate:
            if not re.match(COMMIT_PATTERN, candidate):
                raise ValueError(f"git_commit: expected a hex commit id, got {candidate!r}")
            return candidate
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
            timeout=10, check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def training_interval(spec: PipelineSpec, run: RunContext) -> tuple[dt.datetime, dt.datetime]:
    """The data interval a training run reads: ``window_days`` up to the start of its day."""
    end = day_floor(run.as_of)
    if run.full_history:
        start = dt.datetime.combine(spec.start_date, dt.time(), tzinfo=dt.UTC)
    else:
        start = end - dt.timedelta(days=spec.training.window_days)
    return start, end


def ingest(spec: PipelineSpec, run: RunContext, settings: Settings) -> dict[str, Any]:
    """Pull the run's batch and write it as an immutable, content-addressed snapshot."""
    from airmlops.data import snapshots, sources

    start, end = training_interval(spec, run)
    log.info("ingest %s: reading %s source for [%s, %s)", spec.name, spec.source.kind, start, end)
    frame = sources.load_batch(spec, start, end, scenario=run.scenario)
    if frame.empty:
        raise ValueError(f"source: no rows for {spec.name} in [{start}, {end})")
    frame = snapshots.canonicalize(frame, spec)
    ref = snapshots.write_snapshot(frame, spec.name, settings.data_root, (start, end))
    log.info(
        "ingest %s: %d rows, digest %s (%s)", spec.name, ref.rows, ref.digest,
        "new snapshot" if ref.created else "snapshot already present, nothing written",
    )
    return ref.to_dict()


def validate_data(spec: PipelineSpec, snapshot: dict[str, Any], settings: Settings) -> dict:
    """Check the snapshot against the spec's data contract; quarantine it when it fails."""
    from airmlops.data import snapshots, validation

    ref = snapshots.SnapshotRef.from_dict(snapshot)
    frame = snapshots.read_snapshot(ref)
    reference_ref = snapshots.latest_validated(spec.name, settings.data_root)
    reference = None
    if reference_ref is not None and reference_ref.digest != ref.digest:
        reference = snapshots.read_snapshot(reference_ref)
    docs_dir = settings.reports_dir / spec.name / "validation" / ref.digest
    outcome = validation.validate_frame(spec, frame, reference, docs_dir=docs_dir)
    summary = {
        "success": outcome.success,
        "digest": ref.digest,
        "statistics": outcome.statistics,
        "reference_digest": reference_ref.digest if reference_ref else None,
    }
    if not outcome.success:
        reason = validation.summarize_failures(outcome)
        where = snapshots.quarantine_snapshot(
            ref, outcome.report, settings.data_root, html=outcome.html
        )
        log.error("validate_data %s: batch %s FAILED and is quarantined at %s:\n%s",
                  spec.name, ref.digest, where, reason)
        raise DataValidationFailed(
            f"data batch {ref.digest} failed validation and was quarantined at {where}: {reason}"
        )
    snapshots.mark_validated(ref, settings.data_root)
    log.info("validate_data %s: batch %s passed %s expectations", spec.name, ref.digest,
             outcome.statistics.get("evaluated_expectations"))
    return summary


def preprocess(spec: PipelineSpec, snapshot: dict[str, Any], settings: Settings) -> dict:
    """Time-based split with an embargo, written as the training set of this snapshot."""
    from airmlops.data import snapshots
    from airmlops.training import dataset

    ref = snapshots.SnapshotRef.from_dict(snapshot)
    frame = snapshots.read_snapshot(ref)
    if spec.feature_store is not None:
        frame = _with_store_features(spec, frame, ref, settings)
    train, test, split = dataset.time_split(frame, spec)
    key = f"{spec.name}/{ref.digest[:16]}-{spec.spec_hash()[:12]}"
    paths = dataset.write_training_set(train, test, settings.training_sets_dir, key, split=split)
    split_info = split.to_dict()
    log.info("preprocess %s: %s", spec.name, split_info)
    return {"train_path": paths["train"], "test_path": paths["test"], "split": split_info,
            "data_digest": ref.digest}


def _with_store_features(spec: PipelineSpec, frame, ref, settings: Settings):
    """The batch joined with its point-in-time features from the offline store, building the
    offline days the batch needs when the features DAG has not yet."""
    from airmlops.features import pipeline as features

    first, last = ref.interval_start.date(), ref.interval_end.date()
    built = features.ensure_offline(spec, first, last, settings.data_root)
    if built:
        log.info("preprocess %s: built %d missing offline feature days", spec.name, built)
    joined = features.training_frame(spec, frame, settings.data_root)
    coverage = joined[spec.input_names].notna().all(axis=1).mean()
    log.info("preprocess %s: %d rows joined point-in-time with %d store features; %.1f%% "
             "of rows have every feature", spec.name, len(joined),
             len(spec.feature_store.feature_names), 100 * coverage)
    return joined


def build_features(spec: PipelineSpec, run: RunContext, settings: Settings) -> dict[str, Any]:
    """The features DAG's offline step: compute the run's days (backfill an empty store)."""
    from airmlops.features import pipeline as features

    end = day_floor(run.as_of).date() + dt.timedelta(days=1)
    present = features.offline_days_present(spec, settings.data_root)
    span = spec.feature_store.backfill_days if not present else 2
    start = end - dt.timedelta(days=span)
    written = features.build_offline(spec, start, end, settings.data_root, scenario=run.scenario)
    return {"start": start.isoformat(), "end": end.isoformat(), "rows": written}


def materialize_features(spec: PipelineSpec, run: RunContext, settings: Settings) -> dict:
    """The features DAG's online step: new offline rows up to the run's time, watermarked."""
    from airmlops.features import pipeline as features
    from airmlops.features.online import make_online_store

    store = make_online_store(settings, spec.name)
    try:
        written = features.materialize_online(spec, settings.data_root, store, end=run.as_of)
    finally:
        store.close()
    log.info("materialize %s: %s rows written to %s", spec.name, written, store.location)
    return {"rows": written, "store": store.location}


def train(spec: PipelineSpec, training_set: dict[str, Any], run: RunContext,
          settings: Settings) -> dict[str, Any]:
    """Fit the spec's scikit-learn Pipeline and track it in MLflow with its lineage."""
    from airmlops.training import tracking

    lineage = {**run.lineage(), "data_digest": training_set["data_digest"],
               "spec_hash": spec.spec_hash(), "features_hash": spec.features_hash()}
    result = tracking.train_and_log(
        spec, training_set["train_path"], training_set["test_path"],
        lineage=lineage, tracking_uri=settings.mlflow_tracking_uri,
        data_digest=training_set["data_digest"],
    )
    log.info("train %s: run %s, metrics %s", spec.name, result.run_id, result.metrics)
    return {"run_id": result.run_id, "model_uri": result.model_uri, "metrics": result.metrics,
            "test_path": training_set["test_path"], "lineage": lineage}


def validate_model(spec: PipelineSpec, trained: dict[str, Any], settings: Settings) -> dict:
    """Absolute gates, then challenger vs champion on the same held-out rows. Fails closed."""
    import pandas as pd

    from airmlops.training import gates, registry

    uri = settings.mlflow_tracking_uri
    champion = registry.get_alias_version(spec.registered_model_name, "champion", uri)
    comparison = None
    if champion is not None:
        test = pd.read_parquet(trained["test_path"])
        champion_uri = f"models:/{spec.registered_model_name}/{champion.version}"
        try:
            comparison = gates.evaluate_against_champion(
                spec, test, trained["model_uri"], champion_uri, tracking_uri=uri
            )
        except Exception:  # the champion cannot score these rows: fail closed, not crash
            log.exception("validate_model %s: champion version %s could not be compared",
                          spec.name, champion.version)
    decision = gates.decide(spec, trained["metrics"], comparison,
                            champion.version if champion else None)
    gates.log_decision(decision, trained["run_id"], uri)
    verdict = "BLESSED" if decision.blessed else "NOT BLESSED"
    log.info("validate_model %s: %s\n  %s", spec.name, verdict, "\n  ".join(decision.reasons))
    return decision.to_dict()


def register(spec: PipelineSpec, trained: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Register the blessed model as a new version with alias ``challenger``."""
    from airmlops.training import registry, tracking

    result = tracking.TrainResult(run_id=trained["run_id"], model_uri=trained["model_uri"],
                                  metrics=trained["metrics"], experiment_id="")
    tags = {**trained["lineage"], "mlflow_run_id": trained["run_id"]}
    version = registry.register_challenger(spec, result, settings.mlflow_tracking_uri, tags)
    log.info("register %s: version %s is now 'challenger'", spec.name, version.version)
    return {"name": version.name, "version": str(version.version),
            "model_uri": version.model_uri}
