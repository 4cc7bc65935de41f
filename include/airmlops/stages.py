"""The training stages as plain functions: what each Airflow task calls.

The serving stages (containerize, deploy, monitor, rollback, materialize_features) are in
:mod:`airmlops.serving_stages` and the run's context in :mod:`airmlops.runs`; both are
re-exported here, so ``airmlops.stages`` names every stage.

Every function takes the spec and the typed results of the stages before it
(:mod:`airmlops.contracts`) and returns its own; the DAG layer turns them into XCom values.
None of them reads the clock: the run's time comes in as ``as_of``. Each is safe to retry:
snapshots are content-addressed, training sets are keyed by the snapshot digest and the spec
hash, and registration reuses the version of an MLflow run.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING

from airmlops.contracts import (
    DataCheck,
    FeatureBuild,
    GateVerdict,
    RegisteredVersion,
    Snapshot,
    TrainedModel,
    TrainingSet,
    World,
)
from airmlops.errors import NonRetryable
from airmlops.runs import COMMIT_PATTERN, RunContext, day_floor, resolve_git_commit, stage_alert
from airmlops.serving_stages import (
    BakeFailed,
    containerize,
    deploy,
    golden_requests,
    materialize_features,
    monitor,
    record_reference,
    rollback,
)
from airmlops.settings import Settings
from airmlops.spec import PipelineSpec

if TYPE_CHECKING:
    from airmlops.training.refit import RefitResult

__all__ = [
    "COMMIT_PATTERN", "BakeFailed", "DataValidationFailed", "RunContext", "build_features",
    "containerize", "day_floor", "deploy", "golden_requests", "ingest", "materialize_features",
    "monitor", "preprocess", "record_reference", "refit_blessed", "register",
    "resolve_git_commit", "rollback", "train", "training_interval", "validate_data",
    "validate_model", "world_spec",
]

log = logging.getLogger(__name__)


class DataValidationFailed(NonRetryable, RuntimeError):
    """The batch failed its data contract; it is quarantined and nothing downstream runs."""


def training_interval(spec: PipelineSpec, run: RunContext) -> tuple[dt.datetime, dt.datetime]:
    """The data interval a training run reads: ``window_days`` up to the start of its day.

    The day is that of ``run.data_end`` when set (a retraining triggered by monitoring reads up
    to the window it reacts to, however late it runs), never later than ``run.as_of``.
    """
    if run.data_end is not None and run.data_end > run.as_of:
        raise ValueError(f"data_end {run.data_end.isoformat()} is after the run's time "
                         f"{run.as_of.isoformat()}: a run cannot read data from its future")
    end = day_floor(run.data_end if run.data_end is not None else run.as_of)
    if run.full_history:
        start = dt.datetime.combine(spec.start_date, dt.time(), tzinfo=dt.UTC)
    else:
        start = end - dt.timedelta(days=spec.training.window_days)
    return start, end


def world_spec(spec: PipelineSpec, scenario: str | None,
               scenario_start: dt.date | None) -> PipelineSpec:
    """``spec`` with its simulator world (``source.scenario`` from ``source.scenario_start``)
    replaced by a run's overrides; the spec itself when there are none."""
    if scenario is None and scenario_start is None:
        return spec
    if spec.source.kind != "simulator":
        raise ValueError(f"scenario/scenario_start apply to simulator sources only, not "
                         f"'{spec.source.kind}'")
    from airmlops.data.simulator import with_world

    return spec.model_copy(update={"source": with_world(spec.source, scenario, scenario_start)})


def ingest(spec: PipelineSpec, run: RunContext, settings: Settings, *,
           spec_bytes: bytes | None = None) -> Snapshot:
    """Pull the run's batch and write it as an immutable, content-addressed snapshot; pin the
    spec for the rest of the run.

    The spec is pinned (:mod:`airmlops.spec_pin`) as ``spec_bytes``, the bytes of the file it
    was read from, or as its canonical JSON when none are given; the snapshot records the
    pinned copy and the spec's hash, and every later task of the run uses that copy.

    A simulator source is read in the world of the spec (``source.scenario`` from
    ``source.scenario_start``) unless the run overrides it; the override is handed on to
    preprocess (``world``), which builds the batch's feature days in the same world.
    """
    from airmlops.data import snapshots, sources
    from airmlops.spec_pin import pin

    pinned = pin(spec, settings.data_root, spec_bytes, data_roots=settings.data_roots)
    start, end = training_interval(spec, run)
    world = world_spec(spec, run.scenario, run.scenario_start)
    described = spec.source.kind
    if world.source.kind == "simulator":
        described += (f" ({world.source.scenario} from "
                      f"{world.source.scenario_start or 'the start'})")
    log.info("ingest %s: reading %s source for [%s, %s)", spec.name, described, start, end)
    frame = sources.load_batch(world, start, end, data_root=settings.data_root)
    if frame.empty:
        raise ValueError(f"source: no rows for {spec.name} in [{start}, {end})")
    frame = snapshots.canonicalize(frame, spec)
    ref = snapshots.write_snapshot(frame, spec.name, settings.data_root, (start, end))
    log.info(
        "ingest %s: %d rows, digest %s (%s)", spec.name, ref.rows, ref.digest,
        "new snapshot" if ref.created else "snapshot already present, nothing written",
    )
    overridden = None
    if world is not spec:
        overridden = World(scenario=world.source.scenario,
                           scenario_start=world.source.scenario_start)
    return Snapshot.of(ref, pinned.spec_hash, pinned.path, overridden)


def validate_data(spec: PipelineSpec, snapshot: Snapshot, settings: Settings) -> DataCheck:
    """Check the snapshot against the spec's data contract; quarantine it when it fails."""
    from airmlops.data import snapshots, validation

    ref = snapshot.ref
    frame = snapshots.read_snapshot(ref)
    reference_ref = snapshots.latest_validated(spec.name, settings.data_root)
    reference = None
    if reference_ref is not None and reference_ref.digest != ref.digest:
        reference = snapshots.read_snapshot(reference_ref)
    docs_dir = settings.reports_dir / spec.name / "validation" / ref.digest
    outcome = validation.validate_frame(spec, frame, reference, docs_dir=docs_dir)
    summary = DataCheck(success=bool(outcome.success), digest=ref.digest,
                        statistics=dict(outcome.statistics),
                        reference_digest=reference_ref.digest if reference_ref else None)
    if not outcome.success:
        reason = validation.summarize_failures(outcome)
        where = snapshots.quarantine_snapshot(
            ref, outcome.report, settings.data_root, html=outcome.html
        )
        log.error("validate_data %s: batch %s FAILED and is quarantined at %s:\n%s",
                  spec.name, ref.digest, where, reason)
        stage_alert(spec, "quarantine", f"batch {ref.digest[:12]} quarantined: {reason}",
               {"digest": ref.digest, "quarantine": str(where)})
        raise DataValidationFailed(
            f"data batch {ref.digest} failed validation and was quarantined at {where}: {reason}"
        )
    snapshots.mark_validated(ref, settings.data_root)
    log.info("validate_data %s: batch %s passed %s expectations", spec.name, ref.digest,
             outcome.statistics.get("evaluated_expectations"))
    return summary


def preprocess(spec: PipelineSpec, snapshot: Snapshot, settings: Settings) -> TrainingSet:
    """Time-based split with an embargo, written as the training set of this snapshot."""
    from airmlops.data import snapshots
    from airmlops.training import dataset

    ref = snapshot.ref
    frame = snapshots.read_snapshot(ref)
    if spec.feature_store is not None:
        frame = _with_store_features(spec, frame, ref, settings, snapshot.world)
    train, embargoed, test, split = dataset.time_partition(frame, spec)
    key = f"{spec.name}/{ref.digest[:16]}-{spec.spec_hash()[:12]}"
    paths = dataset.write_training_set(train, test, settings.training_sets_dir, key, split=split,
                                       embargoed=embargoed)  # kept for a refit (register)
    split_info = split.to_dict()
    log.info("preprocess %s: %s", spec.name, split_info)
    return TrainingSet(train_path=str(paths["train"]), test_path=str(paths["test"]),
                       split=split_info, data_digest=ref.digest)


def _with_store_features(spec: PipelineSpec, frame, ref, settings: Settings,
                         world: World | None = None):
    """The batch joined with its point-in-time features from the offline store, building the
    offline days the batch needs when the features DAG has not yet.

    A batch ingested in a run's own simulator ``world`` (a scenario override) gets its feature
    days rebuilt in that world first: the offline store holds one world, and a batch joined
    with features of another would pair drifted labels with stable features.
    """
    from airmlops.features import pipeline as features

    first, last = ref.interval_start.date(), ref.interval_end.date()
    if world:
        rebuilt = features.build_offline(world_spec(spec, world.scenario, world.scenario_start),
                                         first, last, settings.data_root)
        log.info("preprocess %s: offline feature days %s..%s rebuilt in the run's world %s: %s",
                 spec.name, first, last, world, rebuilt)
    built = features.ensure_offline(spec, first, last, settings.data_root)
    if built:
        log.info("preprocess %s: built %d missing offline feature days", spec.name, built)
    joined = features.training_frame(spec, frame, settings.data_root)
    coverage = joined[spec.input_names].notna().all(axis=1).mean()
    log.info("preprocess %s: %d rows joined point-in-time with %d store features; %.1f%% "
             "of rows have every feature", spec.name, len(joined),
             len(spec.feature_store.feature_names), 100 * coverage)
    return joined


def build_features(spec: PipelineSpec, run: RunContext, settings: Settings) -> FeatureBuild:
    """The features DAG's offline step: compute the run's days (backfill an empty store)."""
    from airmlops.features import pipeline as features

    end = day_floor(run.as_of).date() + dt.timedelta(days=1)
    present = features.offline_days_present(spec, settings.data_root)
    span = spec.feature_store.backfill_days if not present else 2
    start = end - dt.timedelta(days=span)
    written = features.build_offline(spec, start, end, settings.data_root, scenario=run.scenario)
    return FeatureBuild(start=start, end=end, rows=dict(written))


def train(spec: PipelineSpec, training_set: TrainingSet, run: RunContext,
          settings: Settings) -> TrainedModel:
    """Fit the spec's scikit-learn Pipeline and track it in MLflow with its lineage."""
    from airmlops.training import tracking

    lineage = {**run.lineage(), "data_digest": training_set.data_digest,
               "spec_hash": spec.spec_hash(), "features_hash": spec.features_hash()}
    result = tracking.train_and_log(
        spec, training_set.train_path, training_set.test_path,
        lineage=lineage, tracking_uri=settings.mlflow_tracking_uri,
        data_digest=training_set.data_digest,
    )
    log.info("train %s: run %s, metrics %s", spec.name, result.run_id, result.metrics)
    return TrainedModel(run_id=result.run_id, model_uri=result.model_uri,
                        metrics={k: float(v) for k, v in result.metrics.items()},
                        train_path=training_set.train_path, test_path=training_set.test_path,
                        lineage=lineage)


def validate_model(spec: PipelineSpec, trained: TrainedModel, settings: Settings) -> GateVerdict:
    """Absolute gates, then challenger vs champion on the same held-out rows. Fails closed."""
    import pandas as pd

    from airmlops.training import gates, registry

    uri = settings.mlflow_tracking_uri
    champion = registry.get_alias_version(spec.registered_model_name, "champion", uri)
    comparison, comparison_error = None, None
    if champion is not None:
        from airmlops.model_files import ModelLoadError

        champion_uri, test, basis = gates.unseen_by_champion(
            spec, pd.read_parquet(trained.test_path),
            f"models:/{spec.registered_model_name}/{champion.version}", champion.tags or {})
        if basis:
            log.info("validate_model %s: %s", spec.name, basis)
        try:
            comparison = gates.evaluate_against_champion(
                spec, test, trained.model_uri, champion_uri, tracking_uri=uri
            )
        except ModelLoadError as error:  # e.g. a version registered before digests: say so
            comparison_error = str(error)
            log.error("validate_model %s: %s", spec.name, error)
        except Exception:  # the champion cannot score these rows: fail closed, not crash
            log.exception("validate_model %s: champion version %s could not be compared",
                          spec.name, champion.version)
    decision = gates.decide(spec, trained.metrics, comparison,
                            str(champion.version) if champion else None, comparison_error)
    gates.log_decision(decision, trained.run_id, uri)
    verdict = "BLESSED" if decision.blessed else "NOT BLESSED"
    if not decision.blessed:
        stage_alert(spec, "not_blessed", "; ".join(decision.reasons),
               {"mlflow_run_id": trained.run_id, "metrics": trained.metrics})
    log.info("validate_model %s: %s\n  %s", spec.name, verdict, "\n  ".join(decision.reasons))
    return GateVerdict.from_xcom(decision.to_dict())


def register(spec: PipelineSpec, trained: TrainedModel,
             settings: Settings) -> RegisteredVersion:
    """Register the blessed model as a new version with alias ``challenger``.

    When ``training.refit`` applies (:func:`refit_blessed`), the version is the blessed model
    refit on every labelled row of its batch, not the held-out fit the gates measured; the
    run's metrics and gate numbers stay those of the held-out fit, and tags say which is which.
    """
    from airmlops.training import registry, tracking

    refit = refit_blessed(spec, trained, settings)
    result = tracking.TrainResult(run_id=trained.run_id,
                                  model_uri=refit.model_uri if refit else trained.model_uri,
                                  metrics=trained.metrics, experiment_id="")
    tags = {**trained.lineage, "mlflow_run_id": trained.run_id,
            **(refit.tags() if refit else {})}
    version = registry.register_challenger(spec, result, settings.mlflow_tracking_uri, tags,
                                           digests=refit.digests if refit else None)
    log.info("register %s: version %s is now 'challenger'%s", spec.name, version.version,
             f" (refit on {refit.rows} labelled rows: {refit.reason})" if refit else "")
    return RegisteredVersion(name=version.name, version=str(version.version),
                             model_uri=version.model_uri, refit=bool(refit))


def refit_blessed(spec: PipelineSpec, trained: TrainedModel,
                  settings: Settings) -> RefitResult | None:
    """The run's blessed model refit on every labelled row of its batch, or None when refit
    does not apply (``training.refit`` false, or unset and not a retraining run) or the gates
    did not bless it.

    It runs in ``register`` because the training DAG logs the model in ``train`` and gates it
    in ``validate_model`` before that: see :mod:`airmlops.training.refit` for what is logged
    where. A retry reuses the refit already logged in the run.
    """
    from airmlops.training import refit

    reason = refit.refit_reason(spec, trained.lineage.get("airflow_run_id"))
    if reason is None:
        return None
    return refit.refit_run(spec, trained.run_id, trained.train_path, reason=reason,
                           tracking_uri=settings.mlflow_tracking_uri)
