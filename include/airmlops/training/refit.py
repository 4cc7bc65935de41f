"""Refit: the model that is registered and deployed also learns from the newest labelled rows.

Why: the split holds out the most recent ``test_fraction`` of the batch so that the gates can
measure the challenger on rows it never saw. After drift those rows are exactly the new world,
and a model that never learned from them is deployed one step behind. So once the gates have
blessed the challenger on the held-out rows, the same estimator (class, params, seed and
preprocessing pipeline) is fitted again on every labelled row of the batch: train, embargoed and
held-out. That refit is what gets registered; the gates' numbers stay those of the held-out fit.

Where, and why there: the training DAG logs the trained model in ``train``, judges it in
``validate_model`` (a short circuit: not blessed skips the rest) and registers it in
``register``. The refit happens in ``register`` (:func:`airmlops.stages.register` calls
:func:`refit_run`), after the gates and into the same MLflow run:

- ``model``, the run's ``model_uri`` tag, its ``test_*`` metrics and ``gate_*`` numbers: the
  held-out fit, the one the gates measured. It stays the run's model, so a retried ``train``
  reuses this run and the gate numbers keep describing the model they were computed on.
- ``refit_model``, a second logged model of the run, saved the same way (skops, exact trusted
  types, digests: :func:`airmlops.training.tracking.log_fitted_model`), with ``refit_train_*``
  metrics (in-sample: no rows are left to test on) and the ``labelled`` dataset input. The
  registered version is made from it (its source, model id and digests), so packaging, serving
  and the ``champion`` alias get the refit.

Both the run and the version say so in tags: ``refit=true``, ``refit.reason``, ``refit.rows``
(every labelled row of the batch), ``heldout.fit_rows`` (the rows the gated model was fitted
on), ``refit.data_end`` (the last row's time), ``refit.model_uri`` and ``heldout.model_uri``.

When: ``training.refit`` true always, false never, unset (None) in retraining runs, those the
monitoring policy triggers (:func:`is_retraining_run`). A challenger the gates did not bless is
never refit. A retry reuses the refit already logged in the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.errors import NonRetryable

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from sklearn.pipeline import Pipeline

    from airmlops.model_files import ModelDigests
    from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)

REFIT_MODEL_NAME = "refit_model"
"""Name of the refit model within its run (the held-out fit is ``tracking.MODEL_NAME``)."""

REASON_RETRAINING = "retraining run"
REASON_SPEC = "spec says true"

_RESULT_TAGS = ("refit.reason", "refit.rows", "heldout.fit_rows", "refit.data_end",
                "heldout.model_uri")
"""Tags of the refit logged model that describe it; a retry rebuilds its result from them."""


class RefitError(NonRetryable, RuntimeError):
    """The refit cannot be made the same way as the gated fit (other inputs or estimator); a
    retry would meet the same inputs, so the task fails without retries."""


@dataclasses.dataclass(frozen=True)
class RefitResult:
    """The refit model of a run: what to register instead of the held-out fit, and its tags.

    ``reused`` is true when a retry found the refit already logged in the run.
    """

    model_uri: str
    model_id: str
    digests: ModelDigests
    rows: int
    heldout_fit_rows: int
    reason: str
    data_end: str
    heldout_model_uri: str
    reused: bool = False

    def tags(self) -> dict[str, str]:
        """The lineage tags the run and the registered version carry."""
        return {
            "refit": "true",
            "refit.reason": self.reason,
            "refit.rows": str(self.rows),
            "heldout.fit_rows": str(self.heldout_fit_rows),
            "refit.data_end": self.data_end,
            "refit.model_uri": self.model_uri,
            "heldout.model_uri": self.heldout_model_uri,
        }


def is_retraining_run(airflow_run_id: str | None) -> bool:
    """Whether an Airflow run of a training DAG is a retraining the monitoring policy triggered.

    The marker is the run id: the monitoring DAG's ``act`` task triggers the training DAG with
    run id ``retrain__<window_id>``, the policy's dedup key
    (:func:`airmlops.monitoring.policy.dedup_key`), and a repeated decision for the same window
    finds that run already there. Clearing and re-running the run keeps its id. The
    ``trigger_reason`` is not used: it is free text that any manual trigger or webhook may set.
    """
    from airmlops.monitoring.policy import DEDUP_PREFIX, WINDOW_ID_PATTERN

    if not airflow_run_id or not airflow_run_id.startswith(DEDUP_PREFIX):
        return False
    return bool(WINDOW_ID_PATTERN.match(airflow_run_id.removeprefix(DEDUP_PREFIX)))


def refit_reason(spec: PipelineSpec, airflow_run_id: str | None) -> str | None:
    """Why the run's blessed model is refit on every labelled row, or None when it is not.

    ``training.refit`` true: always; false: never; unset: in retraining runs only.
    """
    setting = spec.training.refit
    if setting is None:
        return REASON_RETRAINING if is_retraining_run(airflow_run_id) else None
    return REASON_SPEC if setting else None


def refit_run(spec: PipelineSpec, run_id: str, train_path: Path | str, *, reason: str,
              tracking_uri: str) -> RefitResult | None:
    """Refit the blessed model of MLflow run ``run_id`` on every labelled row of its batch.

    ``train_path`` is the ``train.parquet`` the run was trained on; the embargoed and held-out
    rows are read from beside it (:func:`airmlops.training.dataset.read_labelled_set`). Returns
    None, fitting nothing, when the run's gate decision is not "blessed". Raises
    :class:`RefitError` when the training set or the spec's estimator is not the one the run
    was fitted with. Idempotent: a refit already logged in the run is returned (``reused``).
    """
    from mlflow import MlflowClient

    from airmlops.training.dataset import read_labelled_set

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    if run.data.tags.get("gate_blessed") != "true":
        log.warning("refit %s: run %s is not blessed by the gates; nothing is refit",
                    spec.name, run_id)
        return None
    previous = _logged_refit(client, run)
    if previous is not None:
        log.info("refit %s: run %s already has its refit %s; reused", spec.name, run_id,
                 previous.model_uri)
        _tag_run(client, run_id, previous)
        return previous
    _check_same_fit(spec, run, Path(train_path))
    rows = read_labelled_set(train_path)
    pipeline = fit_on_rows(spec, rows)
    result = _log_refit(spec, client, run, pipeline, rows, Path(train_path), reason,
                        tracking_uri)
    _tag_run(client, run_id, result)
    log.info("refit %s: run %s refit on %d labelled rows (the gated model saw %d): %s",
             spec.name, run_id, result.rows, result.heldout_fit_rows, result.model_uri)
    return result


def fit_on_rows(spec: PipelineSpec, rows: pd.DataFrame) -> Pipeline:
    """The spec's pipeline (same builder, estimator, params and seed as training) fitted on
    ``rows``."""
    from airmlops.spec import resolve_estimator
    from airmlops.training.model import build_pipeline, feature_frame, label_array

    pipeline = build_pipeline(spec, resolve_estimator(spec))
    return pipeline.fit(feature_frame(spec, rows), label_array(spec, rows))


def _check_same_fit(spec: PipelineSpec, run: Run, train_path: Path) -> None:
    """Refuse to refit with other data or another estimator than the gated fit had."""
    from airmlops.training.tracking import dataset_digest, fit_params

    logged = {d.dataset.name: d.dataset.digest for d in run.inputs.dataset_inputs}
    for name, path in (("train", train_path), ("test", train_path.with_name("test.parquet"))):
        if logged.get(name) != dataset_digest(path):
            raise RefitError(
                f"run {run.info.run_id} was not trained on {path} (its '{name}' dataset digest "
                f"is {logged.get(name)}): a refit must read the batch the gates judged")
    params = run.data.params
    changed = sorted(key for key, value in fit_params(spec).items() if params.get(key) != value)
    if changed:
        raise RefitError(
            f"the spec's {', '.join(changed)} differ from what run {run.info.run_id} was "
            "trained with: the refit must be the same estimator as the model the gates blessed; "
            "train again, or set training.refit: false to register the gated model")


def _log_refit(spec: PipelineSpec, client: MlflowClient, run: Run, pipeline: Pipeline,
               rows: pd.DataFrame, train_path: Path, reason: str,
               tracking_uri: str) -> RefitResult:
    """Log the refit into the run (resumed, then finished again whatever happens)."""
    import mlflow

    from airmlops.training.dataset import read_split_info
    from airmlops.training.model import feature_frame, label_array, score
    from airmlops.training.tracking import (
        dataset_input,
        log_fitted_model,
        using_tracking_uri,
    )

    X, y = feature_frame(spec, rows), label_array(spec, rows)
    split = read_split_info(train_path)  # present: read_labelled_set checked it
    described = {
        "refit.reason": reason,
        "refit.rows": str(len(rows)),
        "heldout.fit_rows": str(split.train_rows),
        "refit.data_end": rows[spec.timestamp].max().isoformat(),
        "heldout.model_uri": run.data.tags.get("model_uri", "unknown"),
    }
    with using_tracking_uri(tracking_uri):
        mlflow.start_run(run_id=run.info.run_id)
        try:
            labelled = dataset_input(rows, train_path.parent, spec.label, "labelled",
                                     _labelled_digest(train_path))
            mlflow.log_input(labelled, context="refit")
            model_info, digests = log_fitted_model(
                pipeline, X, name=REFIT_MODEL_NAME, client=client, tracking_uri=tracking_uri,
                tags=described,
            )
            metrics = score(spec, pipeline, X, y)
            mlflow.log_metrics({f"refit_train_{k}": v for k, v in metrics.items()},
                               model_id=model_info.model_id, dataset=labelled)
        finally:
            # The run's own training finished; a failed refit must not mark it FAILED (a
            # retried train would then not find it and fit a new held-out model).
            mlflow.end_run()
    return _result(model_info.model_uri, model_info.model_id, digests, described)


def _logged_refit(client: MlflowClient, run: Run) -> RefitResult | None:
    """The complete refit already logged in ``run`` (digests recorded), if any."""
    from airmlops.model_files import DIGEST_TAGS, ModelDigests

    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run.info.run_id}' AND name = '{REFIT_MODEL_NAME}'",
    )
    complete = [m for m in found
                if all((m.tags or {}).get(k) for k in (*DIGEST_TAGS, *_RESULT_TAGS))]
    if not complete:
        return None
    model = min(complete, key=lambda m: m.creation_timestamp)
    digests = ModelDigests.from_tags(model.tags, f"logged model {model.model_id}")
    return _result(f"models:/{model.model_id}", model.model_id, digests, model.tags,
                   reused=True)


def _result(model_uri: str, model_id: str, digests: ModelDigests, tags: dict[str, Any],
            reused: bool = False) -> RefitResult:
    return RefitResult(
        model_uri=model_uri, model_id=model_id, digests=digests, rows=int(tags["refit.rows"]),
        heldout_fit_rows=int(tags["heldout.fit_rows"]),
        reason=str(tags["refit.reason"]), data_end=str(tags["refit.data_end"]),
        heldout_model_uri=str(tags["heldout.model_uri"]), reused=reused,
    )


def _tag_run(client: MlflowClient, run_id: str, result: RefitResult) -> None:
    for key, value in result.tags().items():
        client.set_tag(run_id, key, value)


def _labelled_digest(train_path: Path) -> str:
    """One digest of the set's train, embargoed and test files, in that order."""
    from airmlops.training.dataset import EMBARGOED_FILE

    digest = hashlib.sha256()
    for name in (train_path.name, EMBARGOED_FILE, "test.parquet"):
        path = train_path.with_name(name)
        if path.is_file():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
