"""The serving stages as plain functions: package, deploy and bake a registered version, or
roll back; and the online features a deployment reads.

Like the training stages (:mod:`airmlops.stages`, which re-exports these), each takes the spec
and the typed results of the stages before it (:mod:`airmlops.contracts`) and returns its own;
the DAG layer turns them into XCom values. Any failure of a deploy leaves the old version
serving and the ``champion`` alias untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from airmlops.contracts import (
    Deployment,
    Materialized,
    MonitorResult,
    Package,
    RegisteredVersion,
    RolledBack,
    TrainedModel,
)
from airmlops.errors import BakeFailed
from airmlops.runs import RunContext, stage_alert
from airmlops.settings import Settings
from airmlops.spec import PipelineSpec

log = logging.getLogger("airmlops.stages")  # the stages' logger, as before the split


__all__ = ["BakeFailed", "containerize", "deploy", "golden_requests", "materialize_features",
           "monitor", "record_reference", "rollback"]


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
    canary = (deployer.CanaryPlan.from_spec(spec.deploy, spec.entity_key)
              if spec.deploy.strategy == "canary" else None)
    shadow = (deployer.ShadowPlan.from_spec(spec.deploy, _shadow_comparer(spec, settings))
              if spec.deploy.strategy == "shadow" else None)
    try:
        result = deployer.deploy(
            spec.name, version, artifact, target, golden, root=settings.data_root,
            proxy_port=spec.deploy.port, ready_timeout=spec.deploy.ready_timeout_seconds,
            latency_budget_ms=spec.deploy.latency_budget_ms, now=run.as_of, validate=valid,
            env=_service_env(settings, spec), bentoml_home=settings.bentoml_store,
            headers=_auth_headers(settings),
            resources=ContainerResources(**spec.deploy.resources.model_dump()),
            replicas=spec.deploy.replicas, spares=spec.deploy.spares,
            alerts=spec.alerts.model_dump(by_alias=True, mode="json") if spec.alerts else {},
            canary=canary, shadow=shadow,
        )
    except deployer.CanaryFailed as exc:  # a BakeFailed: the old version serves, alert
        log.error("deploy %s: version %s failed its canary; rolled back: %s", spec.name,
                  version, exc.reason)
        _record_canary(spec, version, "rolled_back", exc.steps, canary, run, settings)
        stage_alert(spec, "rollback", f"version {version} rolled back during its canary",
                    {"canary": exc.steps})
        raise
    except deployer.ShadowRejected as exc:  # a BakeFailed: the old version serves, alert
        log.error("deploy %s: version %s was not promoted from its shadow: %s", spec.name,
                  version, exc.reason)
        _record_shadow(spec, version, "rejected", exc.judgement, run, settings)
        stage_alert(spec, "rollback", f"version {version} rejected after its shadow",
                    {"shadow": exc.judgement})
        raise
    if result.canary is not None:
        _record_canary(spec, version, "promoted", result.canary, canary, run, settings)
    if result.shadow is not None:
        _record_shadow(spec, version, "promoted", result.shadow, run, settings)
    log.info("deploy %s: version %s serves at %s from slot %s (%s); previous %s kept for "
             "rollback; timings %s", spec.name, version, result.stable_url, result.slot,
             target, result.previous_version, result.timings)
    return Deployment(version=version, target=target, slot=str(result.slot),
                      stable_url=result.stable_url,
                      previous_version=(str(result.previous_version)
                                        if result.previous_version is not None else None),
                      previous_champion=str(previous.version) if previous else None)


def _shadow_comparer(spec: PipelineSpec, settings: Settings):
    """``compare(start, end)`` for a shadow of ``spec``: its logged pairs compared."""
    from airmlops.monitoring.shadow import window_comparison

    return lambda start, end: window_comparison(spec.name, spec.task, start, end, settings)


def _record_canary(spec: PipelineSpec, version: str, outcome: str,
                   steps: list[dict[str, Any]], plan: Any, run: RunContext,
                   settings: Settings) -> None:
    """The canary's steps on the model version in MLflow (best effort: never raises)."""
    from airmlops.serving import deploy_records

    record = deploy_records.canary_record(spec.name, version, outcome, steps, plan,
                                          run.as_of.isoformat())
    deploy_records.record_canary(spec.registered_model_name, version, record,
                                 settings.mlflow_tracking_uri)


def _record_shadow(spec: PipelineSpec, version: str, outcome: str, judgement: dict[str, Any],
                   run: RunContext, settings: Settings) -> None:
    """The shadow's judgement on the model version in MLflow (best effort: never raises)."""
    from airmlops.serving import deploy_records

    record = {"pipeline": spec.name, "version": version, "outcome": outcome,
              "started_at": run.as_of.isoformat(), "judgement": judgement}
    deploy_records.record_shadow(spec.registered_model_name, version, record,
                                 settings.mlflow_tracking_uri)


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
        stage_alert(spec, "rollback", f"version {version} rolled back after its bake period",
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
    stage_alert(spec, "rollback", f"rolled back to version {result.version}",
           {"slot": result.slot, "reason": run.trigger_reason})
    log.info("rollback %s: version %s serves again at %s (slot %s%s)", spec.name,
             result.version, result.stable_url, result.slot,
             ", restarted" if result.restarted else "")
    return RolledBack(version=str(result.version), slot=str(result.slot),
                      stable_url=result.stable_url)
