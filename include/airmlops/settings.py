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


class ServingSettings(BaseSettings):
    """Settings of the model service (environment prefix ``MLOPS_SERVING_``)."""

    model_config = SettingsConfigDict(env_prefix="MLOPS_SERVING_", extra="ignore")

    token: SecretStr = Field(
        default=SecretStr(""),
        description="Bearer token required on every endpoint but the probes and /metrics; "
        "empty means no authentication (a gateway in front does it).")
    max_instances: int = Field(default=1000, ge=1, le=100_000,
                               description="Most rows in one /predict or /feedback request.")
    max_body_bytes: int = Field(default=1_048_576, ge=1024,
                                description="Largest request body accepted, in bytes.")
    workers: int = Field(default=1, ge=1, le=64, description="Server worker processes.")
    timeout_s: float = Field(default=10.0, gt=0, description="Per-request timeout (504).")
    max_concurrency: int = Field(
        default=512, ge=1,
        description="Requests in flight per service before new ones get 429 (load shedding).")
    batching: bool = Field(default=True,
                           description="Coalesce concurrent requests into one scoring call.")
    max_batch_rows: int = Field(default=2000, ge=1,
                                description="Most rows scored in one coalesced call.")
    fast_path: bool = Field(
        default=True, description="Score with the model compiled for rows (checked against "
        "the Pipeline at startup) instead of the Pipeline on a DataFrame.")
    direct: bool = Field(
        default=True, description="Answer /predict in the request gate, which has already "
        "parsed the body, instead of BentoML's API handler (same answers, less per request).")
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="Seconds a client has to send its request headers "
        "(then 408 and the connection is closed).")
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="Seconds a client has to send its body once the "
        "headers are in (then 408).")
    keep_alive_s: float = Field(
        default=5.0, ge=2.5, description="Seconds an idle client connection stays open; "
        "above the stable address's 2 s reuse of idle upstream connections.")
    max_header_bytes: int = Field(default=16_384, ge=1024,
                                  description="Largest request line plus headers (431 above).")
    max_header_count: int = Field(default=100, ge=8,
                                  description="Most request header lines (431 above).")
    max_connections: int = Field(
        default=512, ge=1, description="Open client connections per worker; a request on a "
        "connection beyond them gets 503 (the stable address keeps up to 256 open).")
    feedback_wait_s: float = Field(
        default=1.0, ge=0, le=30, description="How long /feedback waits for a request id it "
        "does not find yet (its prediction still buffered by another worker) before 404.")
    trace_predict: bool = Field(
        default=False, description="Let BentoML's OpenTelemetry middleware trace /predict. "
        "It records three spans per request even when no exporter is configured (a third of "
        "the service's CPU per prediction, measured); turn it on when traces are exported. "
        "Probes and /metrics are never traced.")


class PredictionLogSettings(BaseSettings):
    """Prediction log settings (environment prefix ``MLOPS_PREDICTION_LOG_``).

    The backend follows the platform's ``MLOPS_REDIS_URL`` (Redis Streams when set, SQLite
    otherwise) unless ``MLOPS_PREDICTION_LOG_REDIS_URL`` names another Redis for the log.
    """

    model_config = SettingsConfigDict(env_prefix="MLOPS_PREDICTION_LOG_", extra="ignore")

    redis_url: str | None = Field(
        default=None, description="Redis for the log only; unset means the platform's redis_url.")
    buffer_size: int = Field(
        default=100_000, ge=1, description="Entries held in memory while they wait to be "
        "written or spilled; beyond this, new entries are dropped and counted.")
    batch_size: int = Field(default=1000, ge=1, le=100_000,
                            description="Entries written (or spilled, or replayed) per call.")
    linger_ms: float = Field(
        default=20.0, ge=0, le=1000,
        description="How long the writer waits for more entries before a write that is not "
        "full: one write then carries many requests' rows, which keeps the writer's share of "
        "the service's CPU small; flush and close do not wait.")
    spill_max_bytes: int = Field(
        default=1 << 30, ge=0,
        description="Bound of the pipeline's spill directory "
        "(<data_root>/prediction-log/spill/<pipeline>/, all workers together), where entries "
        "go while the backend is down: each spilled batch (at most batch_size entries) is "
        "fsync'ed before it counts as spilled, and the spill is replayed in order once the "
        "backend answers. Beyond the bound entries are dropped and counted. 0 turns spilling "
        "off (entries then wait in memory only, and are dropped at shutdown).")
    stream_maxlen: int = Field(
        default=1_000_000, ge=1000,
        description="Approximate bound of each Redis stream (XADD MAXLEN ~).")
    label_window_days: float = Field(
        default=90.0, gt=0, le=365,
        description="With Redis, how long a prediction accepts labels: the record of which "
        "entities a request predicted expires after this, or sooner when more than "
        "stream_maxlen requests came after it (SQLite keeps it with the row). Keep it above "
        "the pipeline's label delay.")


class PlatformSettings(BaseSettings):
    """Settings of the embedded platform (``airmlops platform up``); each unset one falls back to
    what the last ``up`` recorded in the run dir, then to its default (see
    :mod:`airmlops.platform.config`)."""

    model_config = SettingsConfigDict(extra="ignore", env_ignore_empty=True)

    run_dir: Path | None = Field(
        default=None, validation_alias="MLOPS_RUN_DIR",
        description="Where the platform keeps its state; unset means <repo>/.run.")
    airflow_port: int | None = Field(
        default=None, ge=1, le=65535, validation_alias="MLOPS_AIRFLOW_PORT",
        description="Loopback port of Airflow's API server and UI (default 8080).")
    mlflow_port: int | None = Field(
        default=None, ge=1, le=65535, validation_alias="MLOPS_MLFLOW_PORT",
        description="Loopback port of the MLflow server (default 5000).")
    log_server_port: int | None = Field(
        default=None, ge=1, le=65535, validation_alias="MLOPS_AIRFLOW_LOG_SERVER_PORT",
        description="Loopback port of Airflow's task-log server (default 8793).")
    dags_folder: Path | None = Field(
        default=None, validation_alias="MLOPS_AIRFLOW_DAGS_FOLDER",
        description="Airflow's DAG folder (default <repo>/dags).")
    plugins_folder: Path | None = Field(
        default=None, validation_alias="MLOPS_AIRFLOW_PLUGINS_FOLDER",
        description="Airflow's plugins folder (default <repo>/plugins).")
    mlflow_artifacts_dir: Path | None = Field(
        default=None, validation_alias="MLOPS_MLFLOW_ARTIFACTS_DIR",
        description="Where the MLflow server stores artifacts (default "
        "<data_root>/mlflow-artifacts).")
    dags_paused_at_creation: bool | None = Field(
        default=None, validation_alias="MLOPS_AIRFLOW_DAGS_PAUSED_AT_CREATION",
        description="Whether new DAGs start paused (default false).")
    parallelism: int | None = Field(
        default=None, ge=1, le=256, validation_alias="MLOPS_AIRFLOW_PARALLELISM",
        description="Task slots of the LocalExecutor (default 8).")
    external_mlflow_uri: str | None = Field(
        default=None, validation_alias="MLOPS_EXTERNAL_MLFLOW_URI",
        description="Use this MLflow server instead of starting one.")


class MlflowClientSettings(BaseSettings):
    """Credentials of the MLflow REST client, from MLflow's own variables."""

    model_config = SettingsConfigDict(extra="ignore", env_ignore_empty=True)

    tracking_token: SecretStr | None = Field(
        default=None, validation_alias="MLFLOW_TRACKING_TOKEN",
        description="Bearer token for the tracking server.")
    tracking_username: str | None = Field(
        default=None, validation_alias="MLFLOW_TRACKING_USERNAME",
        description="Basic-auth user (when no token is set).")
    tracking_password: SecretStr = Field(
        default=SecretStr(""), validation_alias="MLFLOW_TRACKING_PASSWORD",
        description="Basic-auth password.")
    insecure_tls: bool = Field(
        default=False, validation_alias="MLFLOW_TRACKING_INSECURE_TLS",
        description="Skip TLS verification of an https tracking server.")
    server_cert_path: str | None = Field(
        default=None, validation_alias="MLFLOW_TRACKING_SERVER_CERT_PATH",
        description="CA bundle to verify an https tracking server with.")


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

    serving: ServingSettings = Field(
        default_factory=ServingSettings, description="The model service (MLOPS_SERVING_*).")
    prediction_log: PredictionLogSettings = Field(
        default_factory=PredictionLogSettings,
        description="The prediction log (MLOPS_PREDICTION_LOG_*).")
    platform: PlatformSettings = Field(
        default_factory=PlatformSettings, description="The embedded platform (MLOPS_AIRFLOW_*).")
    mlflow_client: MlflowClientSettings = Field(
        default_factory=MlflowClientSettings,
        description="The MLflow REST client's credentials (MLFLOW_TRACKING_*).")

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


def process_environment() -> dict[str, str]:
    """A copy of this process's whole environment: what a child's environment is built from
    (:func:`airmlops.processes.child_env` keeps only what the child may see)."""
    return dict(os.environ)


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once on first use."""
    return Settings()


SECTIONS = ("serving", "prediction_log", "platform", "mlflow_client")
"""The fields of :class:`Settings` that are sections with environment variables of their own."""


def environment_variables() -> dict[str, str]:
    """Every environment variable the settings read, with its description: the ``MLOPS_*``
    fields of :class:`Settings`, then each section's (by its prefix or its own name)."""
    names = {f"MLOPS_{name.upper()}": field.description or ""
             for name, field in Settings.model_fields.items() if name not in SECTIONS}
    for section in SECTIONS:
        model = Settings.model_fields[section].annotation
        prefix = model.model_config.get("env_prefix", "")
        for name, field in model.model_fields.items():
            alias = field.validation_alias
            names[alias if isinstance(alias, str) else f"{prefix}{name}".upper()] = \
                field.description or ""
    return names
