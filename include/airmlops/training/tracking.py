"""Fit the model and record it in MLflow: params, metrics, signature, input example, dataset
inputs, lineage tags and the model itself (skops format, so loading it runs no pickle), with
the exact types it needs trusted and the sha256 digests of its files (see
:mod:`airmlops.model_files`, the one loader that checks them).

The run is the unit of lineage: its tags say which commit, data, spec, feature definitions and
Airflow run produced the model, and the model version registered from it copies them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.model_files import (
    DIGEST_TAGS,
    ModelDigests,
    check_model_dir,
    digest_model_dir,
    trusted_types_of,
    using_tracking_uri,
)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

    from airmlops.spec import PipelineSpec

__all__ = ["LINEAGE_TAGS", "MODEL_NAME", "TrainResult", "dataset_digest", "dataset_input",
           "fit_params", "get_or_create_experiment", "lineage_tags", "log_fitted_model",
           "pinned_requirements", "record_digests", "skops_trusted_types", "train_and_log",
           "using_tracking_uri"]

LINEAGE_TAGS = (
    "git_commit",
    "data_digest",
    "spec_hash",
    "features_hash",
    "airflow_dag_id",
    "airflow_run_id",
)
"""Tags every training run carries; the caller gives git and Airflow ones in ``lineage``."""

UNKNOWN = "unknown"
"""Value of a lineage tag the caller did not give (a run outside Airflow, say)."""

MODEL_NAME = "model"
"""Name of the logged model within its run."""

RUNTIME_PACKAGES = ("scikit-learn", "skops", "numpy", "scipy", "pandas")
"""Pinned in the model's requirements (MLflow adds its own pin)."""

_MAX_PARAM_LENGTH = 6000
_INPUT_EXAMPLE_ROWS = 5


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a training run produced; small enough for XCom (see :meth:`to_dict`).

    ``model_uri`` is ``models:/<model_id>``; ``metrics`` are the test metrics, unprefixed.
    ``reused`` is true when an identical finished run was found and returned instead.
    """

    run_id: str
    model_uri: str
    metrics: dict[str, float]
    experiment_id: str
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def get_or_create_experiment(
    client: MlflowClient, name: str, artifact_location: str | None = None
) -> str:
    """The id of the experiment called ``name``, created if missing (safe against a race)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)  # another worker created it
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise ValueError(
            f"MLflow experiment '{name}' is deleted; restore it or delete it permanently"
        )
    return experiment.experiment_id


def train_and_log(
    spec: PipelineSpec,
    train_path: Path | str,
    test_path: Path | str,
    *,
    lineage: dict[str, str],
    tracking_uri: str,
    data_digest: str,
    extra_params: dict[str, Any] | None = None,
    artifact_location: str | None = None,
) -> TrainResult:
    """Fit ``spec``'s pipeline on the training set, score it on the test set, log it all.

    The run goes to the experiment named ``spec.name`` (created with ``artifact_location``
    if missing). ``lineage`` gives ``git_commit``, ``airflow_dag_id``, ``airflow_run_id`` and
    anything else to tag (``trigger_reason``, ...); ``data_digest``, ``spec_hash`` and
    ``features_hash`` are filled in here. Missing lineage tags are set to ``unknown``.

    A retry is idempotent: when a finished run with the same inputs (training set bytes, spec,
    lineage and params) exists in the experiment, it is returned (``reused=True``) and nothing
    is trained or logged again.
    """
    from mlflow import MlflowClient

    from airmlops.training.dataset import read_split_info

    train = _RunData(Path(train_path), "train", "training")
    test = _RunData(Path(test_path), "test", "testing")
    tags = lineage_tags(spec, lineage, data_digest)
    params = _params(spec, extra_params)
    split = read_split_info(train.path)
    if split is not None:
        params.update({f"split.{k}": v for k, v in split.to_dict().items()})
    training_key = _training_key(train, test, tags, params)

    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, spec.name, artifact_location)
    previous = _finished_run(client, experiment_id, training_key)
    if previous is not None:
        return previous
    run_tags = {**tags, "training_key": training_key, "pipeline": spec.name}
    return _train_in_new_run(spec, train, test, params, client=client, tracking_uri=tracking_uri,
                             experiment_id=experiment_id,
                             run_name=f"{spec.name}-{data_digest[:12]}", tags=run_tags)


@dataclasses.dataclass
class _RunData:
    """One side (train or test) of a run's data: its file and digest, then what is read."""

    path: Path
    name: str
    context: str
    digest: str = dataclasses.field(init=False)
    frame: pd.DataFrame | None = dataclasses.field(init=False, default=None)
    X: pd.DataFrame | None = dataclasses.field(init=False, default=None)
    y: Any = dataclasses.field(init=False, default=None)
    dataset: Any = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        self.digest = _file_digest(self.path)

    def read(self, spec: PipelineSpec) -> None:
        """Read the Parquet file: the frame, its features and labels, its MLflow dataset."""
        import pandas as pd

        from airmlops.training.model import feature_frame, label_array

        self.frame = pd.read_parquet(self.path)
        self.X, self.y = feature_frame(spec, self.frame), label_array(spec, self.frame)
        self.dataset = dataset_input(self.frame, self.path, spec.label, self.name, self.digest)


def _training_key(train: _RunData, test: _RunData, tags: dict[str, str],
                  params: dict[str, Any]) -> str:
    """What makes two training runs the same: the data's bytes, the tags and the params."""
    inputs = {"train": train.digest, "test": test.digest, "tags": tags, "params": params}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _train_in_new_run(
    spec: PipelineSpec, train: _RunData, test: _RunData, params: dict[str, Any], *,
    client: MlflowClient, tracking_uri: str, experiment_id: str, run_name: str,
    tags: dict[str, str],
) -> TrainResult:
    """Read the data, then in a new MLflow run: log params and inputs, fit, log the model, its
    metrics on both sides and its digests."""
    import mlflow

    from airmlops.spec import resolve_estimator
    from airmlops.training.model import build_pipeline

    train.read(spec)
    test.read(spec)
    params.update({"data.train_rows": len(train.frame), "data.test_rows": len(test.frame)})
    with using_tracking_uri(tracking_uri), mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags=tags,
    ) as run:
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        for side in (train, test):
            mlflow.log_input(side.dataset, context=side.context)
        pipeline = build_pipeline(spec, resolve_estimator(spec))
        pipeline.fit(train.X, train.y)
        model_info, digests = log_fitted_model(
            pipeline, train.X, name=MODEL_NAME, client=client, tracking_uri=tracking_uri
        )
        test_metrics = _log_scores(spec, pipeline, test, model_info.model_id)
        _log_scores(spec, pipeline, train, model_info.model_id)
        _log_calibration(spec, pipeline, test, model_info.model_uri)
        mlflow.set_tags({"model_uri": model_info.model_uri, "model_id": model_info.model_id,
                         **digests.to_tags()})
    return TrainResult(run_id=run.info.run_id, model_uri=model_info.model_uri,
                       metrics=test_metrics, experiment_id=experiment_id)


def _log_scores(spec: PipelineSpec, pipeline: Any, side: _RunData,
                model_id: str) -> dict[str, float]:
    """Score the fitted pipeline on one side's rows and log the metrics, prefixed with the
    side's name, against the model and that side's dataset; return them unprefixed."""
    import mlflow

    from airmlops.training.model import score

    metrics = score(spec, pipeline, side.X, side.y)
    mlflow.log_metrics({f"{side.name}_{k}": v for k, v in metrics.items()},
                       model_id=model_id, dataset=side.dataset)
    return metrics


def _log_calibration(spec: PipelineSpec, pipeline: Any, test: _RunData, model_uri: str) -> None:
    """Fit the model's probability calibration on the held-out rows and log it as the run's
    ``calibration.json`` (binary classification only; JSON data, never a pickle).

    Monitoring reads it to estimate a window's performance before its labels arrive
    (:mod:`airmlops.monitoring.estimation`). A refit registered from this run (see
    :mod:`airmlops.training.refit`) has no held-out rows left to calibrate on, so this one,
    fitted on rows the held-out fit never saw, is the calibration that applies to it too.
    """
    import mlflow

    from airmlops.monitoring.estimation import CALIBRATION_FILE, fit_calibration
    from airmlops.training.model import predict_scores

    if spec.task != "binary_classification":
        return
    scores = predict_scores(spec, pipeline, test.X)
    calibration = fit_calibration(
        scores, test.y, fitted_on=f"the {len(scores)} held-out (test) rows, scored by {model_uri}")
    mlflow.log_dict(calibration.to_dict(), CALIBRATION_FILE)
    mlflow.set_tag("calibration", CALIBRATION_FILE)


def log_fitted_model(
    pipeline: Any, X: pd.DataFrame, *, name: str, client: MlflowClient, tracking_uri: str,
    tags: dict[str, str] | None = None,
) -> tuple[Any, ModelDigests]:
    """Log a fitted pipeline into the active run as ``name``; (its ModelInfo, its digests).

    The platform's one way of saving a model, for the trained model and its refit alike: skops
    (loading runs no pickle) with the exact trusted types it needs, a signature and input
    example from ``X``, pinned requirements, then the sha256 digests of the files as stored,
    tagged on the logged model (with ``tags``) so every later load can check them.
    """
    import mlflow
    import mlflow.sklearn
    from mlflow.models import infer_signature

    example = X.head(_INPUT_EXAMPLE_ROWS)
    model_info = mlflow.sklearn.log_model(
        pipeline,
        name=name,
        signature=infer_signature(X, pipeline.predict(example)),
        input_example=example,
        serialization_format=mlflow.sklearn.SERIALIZATION_FORMAT_SKOPS,
        skops_trusted_types=skops_trusted_types(pipeline),
        pip_requirements=pinned_requirements(),
        tags=tags,
    )
    digests = record_digests(client, model_info.model_uri, model_info.model_id, tracking_uri)
    return model_info, digests


def lineage_tags(spec: PipelineSpec, lineage: dict[str, str], data_digest: str) -> dict[str, str]:
    """The run's lineage tags: every :data:`LINEAGE_TAGS` key, plus the caller's extra keys."""
    tags = {key: UNKNOWN for key in LINEAGE_TAGS}
    tags.update({str(k): str(v) for k, v in lineage.items() if v is not None and str(v)})
    tags.update(
        {"data_digest": data_digest, "spec_hash": spec.spec_hash(),
         "features_hash": spec.features_hash()}
    )
    return tags


def skops_trusted_types(model: Any) -> list[str]:
    """The exact types the skops loader must trust for ``model`` (tree structures, say).

    Each must be in the platform's allow-list (:func:`airmlops.model_files.safe_type_names`):
    anything else raises :class:`~airmlops.model_files.ModelLoadError` rather than widening
    what loading a model may construct.
    """
    return trusted_types_of(model)


def record_digests(
    client: MlflowClient, model_uri: str, model_id: str, tracking_uri: str
) -> ModelDigests:
    """Hash the model files as stored in the artifact store and tag the logged model with them.

    The run gets them too (the caller sets them) and the registry copies them to the version,
    so every later load can refuse an artifact swapped after this point.
    """
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory(prefix="airmlops-logged-") as scratch:
        local = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=model_uri, dst_path=scratch, tracking_uri=tracking_uri))
        digests = digest_model_dir(local)
        check_model_dir(local, digests)  # the stored file needs only the recorded, safe types
    client.set_logged_model_tags(model_id, digests.to_tags())
    return digests


def pinned_requirements() -> list[str]:
    """Exact versions of the packages the model needs, so serving installs what trained it.

    Given explicitly because MLflow's inference of requirements loads the model in a
    subprocess, which takes ~13 s per model here.
    """
    from importlib.metadata import version

    return [f"{package}=={version(package)}" for package in RUNTIME_PACKAGES]


def fit_params(spec: PipelineSpec) -> dict[str, str]:
    """The run params that define what is fitted, as logged: the estimator's class, params and
    seed, the task and the feature lists (hence the preprocessing). A refit checks that its run
    was logged with the same ones before fitting the spec's estimator again."""
    return {
        key: _param_value(value)
        for key, value in _params(spec, None).items()
        if key == "task" or key.startswith(("estimator.", "features."))
    }


def dataset_digest(path: Path | str) -> str:
    """The digest a run's dataset input records for the Parquet file at ``path``."""
    return _file_digest(Path(path))[:32]


def _params(spec: PipelineSpec, extra_params: dict[str, Any] | None) -> dict[str, Any]:
    params: dict[str, Any] = {
        "estimator.class_path": spec.estimator.class_path,
        "estimator.seed": spec.estimator.seed,
        "task": spec.task,
        "features.numeric": ",".join(spec.numeric_features),
        "features.categorical": ",".join(spec.categorical_features),
    }
    params.update({f"estimator.{k}": v for k, v in spec.estimator.params.items()})
    params.update({f"training.{k}": v for k, v in spec.training.model_dump().items()})
    params.update(extra_params or {})
    return params


def dataset_input(frame: pd.DataFrame, path: Path, label: str, name: str, digest: str) -> Any:
    """An MLflow dataset of ``frame`` (read from ``path``) for ``mlflow.log_input``; its
    digest is the first 32 hex digits of ``digest``."""
    import mlflow.data

    with warnings.catch_warnings():
        # MLflow registers two local-file source classes ("" and "file" schemes) and warns
        # that a local path matches both; either is right.
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        return mlflow.data.from_pandas(
            frame, source=str(path), targets=label, name=name, digest=digest[:32]
        )


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return text[:_MAX_PARAM_LENGTH]


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _finished_run(
    client: MlflowClient, experiment_id: str, training_key: str
) -> TrainResult | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.training_key = '{training_key}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs or not all(key in runs[0].data.tags for key in ("model_uri", *DIGEST_TAGS)):
        return None  # a run logged before digests were recorded is trained again
    run = runs[0]
    metrics = {
        key.removeprefix("test_"): value
        for key, value in run.data.metrics.items()
        if key.startswith("test_")
    }
    return TrainResult(
        run_id=run.info.run_id,
        model_uri=run.data.tags["model_uri"],
        metrics=metrics,
        experiment_id=experiment_id,
        reused=True,
    )
