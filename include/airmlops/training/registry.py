"""The model registry: versions and aliases, never stages.

A blessed model becomes a new version of the registered model named after the pipeline, with
alias ``challenger``; deploy moves ``champion`` to it once it serves healthily. Every version
carries the lineage tags of the run that produced it and the sha256 digests of its model files
(``model_sha256``, ``mlmodel_sha256``), which every load checks.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

    from airmlops.model_files import ModelDigests
    from airmlops.spec import PipelineSpec
    from airmlops.training.tracking import TrainResult

CHALLENGER = "challenger"
CHAMPION = "champion"

RUN_ID_TAG = "mlflow_run_id"
"""Version tag naming the run the version was registered from (the idempotency key)."""

COPIED_RUN_TAGS = ("trigger_reason", "gate_blessed", "pipeline", "model_sha256", "mlmodel_sha256")
"""Run tags copied to the version besides the lineage tags, when the run has them (the digests
are required: see :func:`register_challenger`)."""

RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
"""An MLflow run id."""
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$")
"""A registered model name this platform accepts."""


@dataclasses.dataclass(frozen=True)
class RegisteredVersion:
    """A registered model version; ``model_uri`` is ``models:/<name>/<version>``."""

    name: str
    version: str
    model_uri: str

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def register_challenger(
    spec: PipelineSpec,
    train_result: TrainResult,
    tracking_uri: str,
    tags: dict[str, Any],
    digests: ModelDigests | None = None,
) -> RegisteredVersion:
    """Register the run's model as a version of ``spec.registered_model_name``, alias challenger.

    The version gets the run's lineage tags, then ``tags`` (which win), then ``mlflow_run_id``.
    ``train_result.model_uri`` is the run's model, or another model logged in the same run (a
    refit, see :mod:`airmlops.training.refit`): then ``digests`` are that model's, recorded when
    it was logged, and the version gets them instead of the run's.
    Idempotent: if a version from this run already exists (an Airflow retry), it is reused and
    its tags and alias are set again; no second version is created. A version of this run made
    from another model than ``train_result.model_uri`` is refused (``ValueError``), since its
    digests would then describe files it does not hold.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from airmlops.model_files import ModelDigests
    from airmlops.training.tracking import LINEAGE_TAGS, using_tracking_uri

    name = _checked_name(spec.registered_model_name)
    run_id = train_result.run_id
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"not an MLflow run id: {run_id!r}")
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    try:
        client.create_registered_model(
            name, description=spec.description or None, tags={"pipeline": spec.name}
        )
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise

    run_tags = client.get_run(run_id).data.tags
    # A version nobody could load is refused; its digests are the run's (or those given for
    # another model of the run), whatever ``tags`` say.
    if digests is None:
        digests = ModelDigests.from_tags(run_tags, f"run {run_id}")
    version_tags = {k: run_tags[k] for k in (*LINEAGE_TAGS, *COPIED_RUN_TAGS) if k in run_tags}
    version_tags.update({str(k): str(v) for k, v in tags.items() if v is not None})
    version_tags.update(digests.to_tags())
    version_tags[RUN_ID_TAG] = run_id

    version = _version_of_run(client, name, run_id)
    model_id = _model_id(train_result.model_uri)
    existing = version and (version.model_id or _model_id(version.source or ""))
    if model_id and existing and existing != model_id:
        raise ValueError(
            f"version {version.version} of {name} was registered from model {existing} of run "
            f"{run_id}, not {model_id}: register that run's model again, or train anew"
        )
    if version is None:
        # MLflow resolves a ``models:/<model_id>`` source through the global tracking URI.
        with using_tracking_uri(tracking_uri):
            version = client.create_model_version(
                name,
                source=train_result.model_uri,
                run_id=run_id,
                tags=version_tags,
                model_id=model_id,
            )
    for key, value in version_tags.items():
        client.set_model_version_tag(name, version.version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    return RegisteredVersion(
        name=name, version=str(version.version), model_uri=f"models:/{name}/{version.version}"
    )


def get_alias_version(name: str, alias: str, tracking_uri: str) -> ModelVersion | None:
    """The version ``alias`` points to, or None when the model or the alias does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        model = client.get_registered_model(_checked_name(name))
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version = model.aliases.get(alias)
    if version is None:
        return None
    return client.get_model_version(name, str(version))


def set_alias(name: str, alias: str, version: str, tracking_uri: str) -> None:
    """Point ``alias`` of model ``name`` at ``version`` (moving it if it pointed elsewhere)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.set_registered_model_alias(_checked_name(name), alias, str(version))


def _version_of_run(client: MlflowClient, name: str, run_id: str) -> ModelVersion | None:
    # name and run_id are validated above, so they are safe inside the filter's quotes.
    found = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    found = [*found, *client.search_model_versions(
        f"name = '{name}' and tags.{RUN_ID_TAG} = '{run_id}'"
    )]
    if not found:
        return None
    return min(found, key=lambda v: int(v.version))


def _model_id(model_uri: str) -> str | None:
    prefix = "models:/"
    rest = model_uri.removeprefix(prefix)
    if model_uri.startswith(prefix) and "/" not in rest and rest.startswith("m-"):
        return rest
    return None


def _checked_name(name: str) -> str:
    if not MODEL_NAME_RE.match(name):
        raise ValueError(f"not a valid registered model name: {name!r}")
    return name
