"""What a bento knows about its model, and loading it: ``serving.json``
(:class:`ServingConfig`, written at build time by :mod:`airmlops.serving.bento`), the model
(:func:`load_model`) and the spec copy (:func:`load_bento_spec`) beside it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from airmlops.model_files import ModelDigests, load_model_dir, model_dir_under
from airmlops.names import NAME_PATTERN
from airmlops.paths import safe_join

if TYPE_CHECKING:
    from airmlops.spec import PipelineSpec

CONFIG_FILE = "serving.json"


class ServingConfig(BaseModel):
    """What a bento knows about its model (``serving.json``, written at build time)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    pipeline: str = Field(pattern=NAME_PATTERN)
    model_name: str
    model_version: str = Field(pattern=r"^[0-9]{1,9}$")
    run_id: str | None = None
    model_uri: str
    model_dir: str = "model"
    spec_file: str = "spec.yaml"
    spec_hash: str
    features_hash: str
    model_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """sha256 of the model file recorded at logging; the service refuses a model without it."""
    mlmodel_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """sha256 of the model's MLmodel file recorded at logging."""

    @classmethod
    def read(cls, path: Path) -> ServingConfig:
        """The config in the file at ``path`` (pydantic's ValidationError if it is invalid)."""
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))


def load_model(root: Path, config: ServingConfig) -> Any:
    """The bento's model, through the one loader (:mod:`airmlops.model_files`): ``model_dir``
    confined to the bento, the digests of ``serving.json`` checked before anything is parsed,
    skops only, exactly the trusted types recorded at training. :class:`ModelLoadError` if not.
    """
    expected = ModelDigests.from_tags(config.model_dump(), CONFIG_FILE)
    return load_model_dir(model_dir_under(root, config.model_dir), expected)


def load_bento_spec(root: Path, config: ServingConfig) -> PipelineSpec:
    """The spec a bento was built with, checked against the hash recorded in ``serving.json``.

    Its file paths are not confined to this process's data roots: the service reads no source
    file, and a build sandbox or a container has other roots than the worker that validated
    the spec (the hash proves it is that spec).
    """
    from airmlops.spec import load_spec

    spec = load_spec(safe_join(root, config.spec_file), data_roots=(Path("/"),))
    if spec.name != config.pipeline or spec.spec_hash() != config.spec_hash:
        raise ValueError(f"{config.spec_file} is not the spec this bento was built with")
    return spec
