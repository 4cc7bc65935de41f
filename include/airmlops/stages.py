"""The training stages as plain functions: what each Airflow task calls.

Every function takes the spec and the typed results of the stages before it
(:mod:`airmlops.contracts`) and returns its own; the DAG layer turns them into XCom values.
None of them reads the clock: the run's time comes in as ``as_of``. Each is safe to retry:
snapshots are content-addressed, training sets are keyed by the snapshot digest and the spec
hash, and registration reuses the version of an MLflow run.
"""

from __future__ import annotations

import datetime as dt
import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.contracts import (
    DataCheck,
    Deployment,
    FeatureBuild,
    GateVerdict,
    Materialized,
    MonitorResult,
    Package,
    RegisteredVersion,
    RolledBack,
    Snapshot,
    TrainedModel,
    TrainingSet,
    World,
)
from airmlops.errors import NonRetryable
from airmlops.settings import PROJECT_ROOT, Settings
from airmlops.spec import PipelineSpec

if TYPE_CHECKING:
    from airmlops.training.refit import RefitResult

log = logging.getLogger(__name__)

COMMIT_PATTERN = r"^[0-9a-fA-F]{7,64}$"


class DataValidationFailed(NonRetryable, RuntimeError):
    """The batch failed its data contract; it is quarantined and nothing downstream runs."""


class BakeFailed(NonRetryable, RuntimeError):
    """The new version breached its bake limits and was rolled back."""


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
    scenario_start: dt.date | None = None
    data_end: dt.datetime | None = None
    """Read data up to this time instead of ``as_of`` (a retraining reacts to a window)."""

    def lineage(self) -> dict[str, str]:
        tags = {
            "git_commit": self.git_commit,
            "airflow_dag_id": self.dag_id,
            "airflow_run_id": self.run_id,
            "trigger_reason": self.trigger_reason,
        }
        if self.data_end is not None:
            tags["data_end"] = self.data_end.isoformat()
        if self.scenario is not None or self.scenario_start is not None:
            tags["simulator_world"] = (f"{self.scenario or 'spec scenario'} from "
                                       f"{self.scenario_start or 'the spec scenario_start'}")
        return tags


def _alert(spec: PipelineSpec, event: str, message: str, details: dict[str, Any]) -> None:
    """Send an alert through the spec's notifiers; an alert never fails a stage."""
    from airmlops.alerts import notify

    outcome = notify(spec, event, message, details)
    if outcome.get("errors"):
        log.warning("alert %s of %s could not be sent: %s", event, spec.name, outcome["errors"])


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
        _alert(spec, "quarantine", f"batch {ref.digest[:12]} quarantined: {reason}",
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


def materialize_features(spec: PipelineSpec, run: RunContext,
                         settings: Settings) -> Materialized:
    """The features DAG's online step: new offline rows up to the run's time, watermarked."""
    from airmlops.features import pipeline as features
    from airmlops.features.online import make_online_store

    store = make_online_store(settings, spec.name)
    try:
        written = features.materialize_online(spec, settings.data_root, store, end=run.as_of)
    finally:
        store.close()
    log.info("materialize %s: %s rows written to %s", spec.name, written, store.location)
    return Materialized(rows=dict(written), store=str(store.location))


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
        _alert(spec, "not_blessed", "; ".join(decision.reasons),
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


# --- serving: containerize, deploy, monitor --------------------------------------------------


def containerize(spec: PipelineSpec, spec_path: str | Path, registered: RegisteredVersion,
                 settings: Settings) -> Package:
    """A bento from the registered version, then an image when a Docker engine is reachable.

    ``spec_path`` is the file copied into the bento: in a training run, the spec pinned at
    ingest. The bento build refuses a spec whose hash is not the one recorded on the version.
    """
    from airmlops.serving import bento, container, docker_engine

    version = registered.version
    ref = bento.build_bento(spec, version, settings.mlflow_tracking_uri, settings.bentoml_store,
                            spec_path=Path(spec_path))
    log.info("containerize %s: bento %s built from version %s", spec.name, ref.tag, version)
    image_id = image_tag = None
    # Containers reach the online store and prediction log over the network: SQLite files
    # under the host's data root are for local processes, so docker needs Redis.
    wants_docker = spec.deploy.target == "docker" or (
        spec.deploy.target == "auto" and settings.redis_url is not None
    )
    if wants_docker and spec.deploy.target == "docker" and settings.redis_url is None:
        raise RuntimeError("deploy.target docker needs MLOPS_REDIS_URL: containers cannot share "
                           "the host's SQLite online store and prediction log")
    if wants_docker and docker_engine.engine_available():
        tag = f"airmlops/{spec.name.replace('_', '-')}:v{version}"
        image = container.build_image(
            ref.export_path, tag, settings.base_image, settings.wheelhouse,
            labels={"airmlops.model": spec.registered_model_name,
                    "airmlops.version": str(version)},
            progress=lambda line: log.info("containerize %s: %s", spec.name, line),
        )
        image_id, image_tag = image.id, image.tag
        log.info("containerize %s: image %s (%s, %.0f MB)", spec.name, image.tag, image.id,
                 image.size / 1e6)
    elif spec.deploy.target == "docker":
        raise RuntimeError("deploy.target is docker but no Docker engine is reachable")
    else:
        why = "no Docker engine reachable" if wants_docker else "no Redis configured"
        log.info("containerize %s: %s: no image built; the bento will be served as a local "
                 "process", spec.name, why)
    bento.record_on_version(spec.registered_model_name, version, settings.mlflow_tracking_uri,
                            bento_tag=ref.tag, image_id=image_id or "none",
                            image_tag=image_tag or "none (no Docker engine)")
    return Package(version=version, bento_tag=ref.tag, bento_export=str(ref.export_path),
                   image_id=image_id, image_tag=image_tag)


def _service_env(settings: Settings, spec: PipelineSpec | None = None) -> dict[str, str]:
    # What the model service needs, nothing more: it never talks to MLflow.
    env = {"MLOPS_DATA_ROOT": str(settings.data_root)}
    if spec is not None:
        env["MLOPS_SERVING_WORKERS"] = str(spec.deploy.workers)
    if settings.redis_url:
        env["MLOPS_REDIS_URL"] = settings.redis_url
    if settings.serving_token.get_secret_value():
        env["MLOPS_SERVING_TOKEN"] = settings.serving_token.get_secret_value()
    return env


def _auth_headers(settings: Settings) -> dict[str, str]:
    token = settings.serving_token.get_secret_value()
    return {"Authorization": f"Bearer {token}"} if token else {}


def golden_requests(spec: PipelineSpec, test_path: str, count: int) -> list[dict[str, Any]]:
    """Smoke requests: the most recent held-out rows, as clients would send them."""
    import pandas as pd

    columns = [spec.entity_key, *spec.request_fields]
    rows = pd.read_parquet(test_path, columns=list(dict.fromkeys(columns)))
    rows = rows.drop_duplicates(spec.entity_key).tail(count)
    return [{"instances": [{k: _plain(v) for k, v in row.items()}]}
            for row in rows.to_dict(orient="records")]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def deploy(spec: PipelineSpec, packaged: Package, trained: TrainedModel,
           run: RunContext, settings: Settings) -> Deployment:
    """Blue/green: the new version beside the old, ready, smoke-tested, then the switch.

    Online features are materialized first so the service finds its entities. Any failure
    leaves the old version serving and the champion alias untouched.
    """
    from airmlops.serving import deploy as deployer
    from airmlops.serving.container import ContainerResources
    from airmlops.training import registry

    materialize_features(spec, run, settings) if spec.feature_store else None
    version = str(packaged.version)
    target = "docker" if packaged.image_id else "process"
    artifact = packaged.image_tag if target == "docker" else packaged.bento_tag
    golden = golden_requests(spec, trained.test_path, spec.deploy.smoke_requests)

    def valid(request: dict[str, Any], body: Any) -> bool:
        predictions = body.get("predictions") if isinstance(body, dict) else None
        return (isinstance(predictions, list) and len(predictions) == len(request["instances"])
                and str(body.get("model_version")) == version)

    uri = settings.mlflow_tracking_uri
    previous = registry.get_alias_version(spec.registered_model_name, "champion", uri)
    result = deployer.deploy(
        spec.name, version, artifact, target, golden, root=settings.data_root,
        proxy_port=spec.deploy.port, ready_timeout=spec.deploy.ready_timeout_seconds,
        latency_budget_ms=spec.deploy.latency_budget_ms, now=run.as_of, validate=valid,
        env=_service_env(settings, spec), bentoml_home=settings.bentoml_store,
        headers=_auth_headers(settings),
        resources=ContainerResources(**spec.deploy.resources.model_dump()),
        replicas=spec.deploy.replicas, spares=spec.deploy.spares,
        alerts=spec.alerts.model_dump(by_alias=True, mode="json") if spec.alerts else {},
    )
    log.info("deploy %s: version %s serves at %s from slot %s (%s); previous %s kept for "
             "rollback; timings %s", spec.name, version, result.stable_url, result.slot,
             target, result.previous_version, result.timings)
    return Deployment(version=version, target=target, slot=str(result.slot),
                      stable_url=result.stable_url,
                      previous_version=(str(result.previous_version)
                                        if result.previous_version is not None else None),
                      previous_champion=str(previous.version) if previous else None)


def _probe(url: str, golden: list[dict[str, Any]], seconds: float, interval: float,
           token: str) -> tuple[int, int]:
    """POST the golden requests to the stable address for ``seconds``; (server errors, sent).

    Probes are marked synthetic: the service answers them but keeps them out of the
    prediction log (monitoring windows, performance, label matching)."""
    import itertools
    import time

    import httpx

    from airmlops.serving.synthetic import synthetic_headers

    headers = {**synthetic_headers("probe"),
               **({"Authorization": f"Bearer {token}"} if token else {})}
    errors = total = 0
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=10.0, headers=headers, trust_env=False) as client:
        for request in itertools.cycle(golden):
            if time.monotonic() >= deadline:
                break
            try:
                ok = client.post(f"{url}/predict", json=request).status_code < 500
            except httpx.HTTPError:
                ok = False
            total += 1
            errors += 0 if ok else 1
            time.sleep(interval)
    return errors, total


def monitor(spec: PipelineSpec, deployed: Deployment, trained: TrainedModel,
            run: RunContext, settings: Settings) -> MonitorResult:
    """Bake the new version on live traffic plus probes; a breach rolls back. Then promote it
    to ``champion`` and record its reference data for drift monitoring.

    The judgement uses what the stable address saw of the new slot during the bake window:
    every request clients sent it and the probes, their server errors and latency."""
    from airmlops.serving import deploy as deployer
    from airmlops.serving import proxy
    from airmlops.training import registry

    version = deployed.version
    golden = golden_requests(spec, trained.test_path, spec.deploy.smoke_requests)
    before = proxy.slot_stats(spec.deploy.port, deployed.slot)
    probe_errors, probes = _probe(
        deployed.stable_url, golden, spec.deploy.bake_seconds,
        spec.deploy.bake_probe_interval_seconds, settings.serving_token.get_secret_value())
    after = proxy.slot_stats(spec.deploy.port, deployed.slot)
    bake = {**proxy.bake_window(before, after), "probes": probes, "probe_errors": probe_errors}
    breached = (bake["requests"] == 0 or bake["error_rate"] > spec.deploy.max_error_rate
                or bake["p99_ms"] > spec.deploy.max_p99_ms)
    uri = settings.mlflow_tracking_uri
    if breached:
        log.error("monitor %s: version %s breached its bake limits %s; rolling back", spec.name,
                  version, bake)
        deployer.rollback(spec.name, settings.data_root, now=run.as_of,
                          env=_service_env(settings, spec))
        _alert(spec, "rollback", f"version {version} rolled back after its bake period",
               {"bake": bake})
        raise BakeFailed(f"version {version} was rolled back after its bake period: {bake}")
    registry.set_alias(spec.registered_model_name, "champion", version, uri)
    from airmlops.serving import bento

    bento.record_on_version(
        spec.registered_model_name, version, uri, deployed_at=run.as_of.isoformat(),
        deployed_target=f"{deployed.target} {deployed.stable_url}",
        previous_champion=str(deployed.previous_champion or "none"),
    )
    reference = record_reference(spec, version, trained, settings)
    log.info("monitor %s: version %s baked %s and is now 'champion' (previous: %s); "
             "reference data at %s", spec.name, version, bake,
             deployed.previous_champion, reference)
    return MonitorResult(version=version, bake=bake, reference=reference)


def record_reference(spec: PipelineSpec, version: str, trained: TrainedModel,
                     settings: Settings) -> str:
    """Summarize the champion's held-out data once, for drift monitoring of its windows."""
    import pandas as pd

    from airmlops.model_files import load_registered_model
    from airmlops.monitoring.config import MonitoringConfig
    from airmlops.monitoring.reference import summarize_reference
    from airmlops.paths import safe_join
    from airmlops.training.model import feature_frame, predict_scores

    frame = pd.read_parquet(trained.test_path)
    model = load_registered_model(f"models:/{spec.registered_model_name}/{version}",
                                  settings.mlflow_tracking_uri)
    frame["prediction"] = predict_scores(spec, model, feature_frame(spec, frame))
    config = getattr(spec, "monitoring", None) or MonitoringConfig()
    where = safe_join(settings.data_root, "monitoring", spec.name, "reference", str(version))
    summarize_reference(frame, spec, config, where)
    return str(where)


def rollback(spec: PipelineSpec, run: RunContext, settings: Settings) -> RolledBack:
    """Serve the previous version again and move ``champion`` back to it."""
    from airmlops.serving import deploy as deployer
    from airmlops.training import registry

    result = deployer.rollback(spec.name, settings.data_root, now=run.as_of,
                               env=_service_env(settings, spec))
    registry.set_alias(spec.registered_model_name, "champion", result.version,
                       settings.mlflow_tracking_uri)
    _alert(spec, "rollback", f"rolled back to version {result.version}",
           {"slot": result.slot, "reason": run.trigger_reason})
    log.info("rollback %s: version %s serves again at %s (slot %s%s)", spec.name,
             result.version, result.stable_url, result.slot,
             ", restarted" if result.restarted else "")
    return RolledBack(version=str(result.version), slot=str(result.slot),
                      stable_url=result.stable_url)
