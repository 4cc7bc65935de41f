"""One typed settings object, read from the environment (prefix ``MLOPS_``) and ``.env``.

Every field is documented in ``.env.example``. Nothing is created or contacted at import time:
call :func:`get_settings` where a setting is needed.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parents[2]
"""The repository root when the package is installed editable (the supported layout)."""


class Settings(BaseSettings):
    """Platform settings. Secrets come only from here or from Airflow connections."""

    model_config = SettingsConfigDict(
        env_prefix="MLOPS_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    data_root: Path = Field(
        default=PROJECT_ROOT / ".data",
        description="Root of all platform data: snapshots, quarantine, features, reports.",
    )
    allowed_data_roots: list[Path] = Field(
        default=[],
        description="Folders besides the data root that spec file paths may read from (JSON "
        "list in the environment); empty means the data root only.",
    )
    pipelines_dir: Path = Field(
        default=PROJECT_ROOT / "include" / "pipelines",
        description="Folder of pipeline specs (one YAML file per model).",
    )
    mlflow_tracking_uri: str = Field(
        default="http://127.0.0.1:5000",
        description="MLflow tracking server (tracking and model registry).",
    )
    mlflow_ui_url: str | None = Field(
        default=None,
        description="Address of the MLflow UI that people open in a browser, for links in the "
        "MLOps view; unset means the tracking URI when it is http(s).",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis URL for the online store and prediction log; unset means SQLite.",
    )
    git_commit: str | None = Field(
        default=None,
        description="Commit recorded in lineage when a run's conf carries none; "
        "unset means `git rev-parse HEAD` of the project checkout.",
    )
    github_webhook_secret: SecretStr = Field(
        default=SecretStr(""),
        description="Shared secret of GitHub webhooks; empty refuses every GitHub delivery.",
    )
    gitlab_webhook_token: SecretStr = Field(
        default=SecretStr(""),
        description="Secret token of GitLab webhooks; empty refuses every GitLab delivery.",
    )
    webhook_branches: list[str] = Field(
        default=["main"],
        description="Branches whose pushes trigger training (JSON list in the environment).",
    )
    webhook_max_body_bytes: int = Field(
        default=1_048_576,
        description="Largest webhook body accepted, in bytes; larger gets 413.",
    )

    base_image: str = Field(
        default="airmlops/python:3.11-bookworm",
        description="Base image of model images; users pull a normal Python 3.11 image, the "
        "test setup builds this tag locally (scripts/ensure-base-image.sh).",
    )
    wheelhouse_dir: Path | None = Field(
        default=None, description="Wheel cache for image builds; default <data_root>/wheelhouse.")
    bentoml_home: Path | None = Field(
        default=None, description="BentoML store of built bentos; default <data_root>/bentoml.")
    serving_token: SecretStr = Field(
        default=SecretStr(""),
        description="Bearer token required by /predict and /feedback; empty means open.",
    )

    @property
    def wheelhouse(self) -> Path:
        return self.wheelhouse_dir or self.data_root / "wheelhouse"

    @property
    def bentoml_store(self) -> Path:
        return self.bentoml_home or self.data_root / "bentoml"

    @property
    def data_roots(self) -> tuple[Path, ...]:
        """Where spec file paths may point: the data root first, then the allowed roots."""
        return (self.data_root, *self.allowed_data_roots)

    @property
    def snapshots_dir(self) -> Path:
        return self.data_root / "snapshots"

    @property
    def quarantine_dir(self) -> Path:
        return self.data_root / "quarantine"

    @property
    def training_sets_dir(self) -> Path:
        return self.data_root / "training_sets"

    @property
    def reports_dir(self) -> Path:
        return self.data_root / "reports"


ALERT_ENV_PREFIX = "MLOPS_ALERT_"
"""The only environment variables a spec may name for alert credentials (no Settings field
starts with ``alert_``, so none of the platform's own settings has this prefix)."""
ALERT_ENV_PATTERN = re.compile(r"^MLOPS_ALERT_[A-Z0-9_]{1,100}$")


def alert_secret(name: str) -> str | None:
    """The value of the alert credential ``name`` (``MLOPS_ALERT_*``), None when it is unset.

    Specs name these variables; any other name is refused here too, so no spec can read the
    platform's own secrets (the JWT secret, the Fernet key, the database URL).
    """
    if not isinstance(name, str) or not ALERT_ENV_PATTERN.match(name):
        raise ValueError(f"{name!r} is not an alert credential: expected an environment "
                         f"variable named {ALERT_ENV_PREFIX}<NAME>")
    return os.environ.get(name)


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once on first use."""
    return Settings()
