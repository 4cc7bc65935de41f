"""The platform's settings: where it keeps its state and which loopback ports it serves on.

A setting comes from, in this order: the caller's argument (a command-line flag), the
``MLOPS_*`` environment, what the last ``up`` recorded in the run dir (``platform.json``), and
the default. Recording the settings lets ``status``, ``down`` and a second ``up`` find the
platform again without the flags that started it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from airmlops.paths import atomic_write_text
from airmlops.settings import PROJECT_ROOT, PlatformSettings, get_settings

HOST = "127.0.0.1"
DEFAULT_AIRFLOW_PORT = 8080
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_LOG_SERVER_PORT = 8793
DEFAULT_PARALLELISM = 8
"""Task slots of the LocalExecutor; it forks that many workers up front (Airflow default: 32)."""
ADMIN_USER = "admin"

API_SERVER, SCHEDULER, DAG_PROCESSOR, TRIGGERER = (
    "api-server",
    "scheduler",
    "dag-processor",
    "triggerer",
)
LOG_SERVER, MLFLOW, POSTGRES = "log-server", "mlflow", "postgres"
WATCHDOG = "watchdog"
"""The process restarting the others when they die (:mod:`airmlops.platform.watchdog`)."""
AIRFLOW_COMPONENTS = (API_SERVER, SCHEDULER, DAG_PROCESSOR, TRIGGERER, LOG_SERVER)
HEALTH_KEYS = ("metadatabase", "scheduler", "triggerer", "dag_processor")
"""Components that ``/api/v2/monitor/health`` must report healthy."""

RECORDED_CONFIG = "platform.json"
"""The file in the run dir holding the settings of the last ``up``."""

Progress = Callable[[str], None]


class PlatformError(RuntimeError):
    """The platform could not be started, reached or driven; the message says what to look at."""


def say(message: str) -> None:
    """The default progress report: one ``[platform]`` line on stdout."""
    print(f"[platform] {message}", flush=True)


@dataclass(frozen=True)
class PlatformConfig:
    """Where the platform keeps its state and which loopback ports it serves on."""

    run_dir: Path
    dags_folder: Path
    plugins_folder: Path
    mlflow_artifacts_dir: Path
    airflow_port: int = DEFAULT_AIRFLOW_PORT
    mlflow_port: int = DEFAULT_MLFLOW_PORT
    log_server_port: int = DEFAULT_LOG_SERVER_PORT
    dags_paused_at_creation: bool = False
    parallelism: int = DEFAULT_PARALLELISM
    external_mlflow_uri: str | None = None
    """Use this MLflow server instead of starting one (tests share one across platforms)."""

    @property
    def airflow_url(self) -> str:
        return f"http://{HOST}:{self.airflow_port}"

    @property
    def mlflow_url(self) -> str:
        return self.external_mlflow_uri or f"http://{HOST}:{self.mlflow_port}"

    @property
    def airflow_home(self) -> Path:
        return self.run_dir / "airflow"

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def passwords_file(self) -> Path:
        return self.airflow_home / "passwords.json"

    def components(self) -> tuple[str, ...]:
        """The process components of this platform, in start order."""
        own_mlflow = () if self.external_mlflow_uri else (MLFLOW,)
        return (*own_mlflow, *AIRFLOW_COMPONENTS)

    def to_json(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlatformConfig:
        paths = ("run_dir", "dags_folder", "plugins_folder", "mlflow_artifacts_dir")
        known = set(cls.__dataclass_fields__)
        values = {k: (Path(v) if k in paths else v) for k, v in data.items() if k in known}
        return cls(**values)


def default_run_dir(platform: PlatformSettings | None = None) -> Path:
    """``MLOPS_RUN_DIR`` or ``<repo>/.run``."""
    platform = platform or read_platform_settings()
    return Path(platform.run_dir or PROJECT_ROOT / ".run").resolve()


def read_platform_settings() -> PlatformSettings:
    """The platform section of the settings, as the environment gives it now; a value that
    does not parse is an error naming its variable, not ignored."""
    try:
        return PlatformSettings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise PlatformError(f"invalid platform setting: {problems}") from None


SETTINGS = (
    "airflow_port",
    "mlflow_port",
    "log_server_port",
    "dags_folder",
    "plugins_folder",
    "mlflow_artifacts_dir",
    "dags_paused_at_creation",
    "parallelism",
    "external_mlflow_uri",
)
"""Each setting of :class:`PlatformConfig` but the run dir (see :class:`PlatformSettings`)."""
PATH_SETTINGS = frozenset({"dags_folder", "plugins_folder", "mlflow_artifacts_dir"})


def _defaults() -> dict[str, Any]:
    """The value of each setting when nothing else gives one."""
    return {
        "airflow_port": DEFAULT_AIRFLOW_PORT,
        "mlflow_port": DEFAULT_MLFLOW_PORT,
        "log_server_port": DEFAULT_LOG_SERVER_PORT,
        "dags_folder": PROJECT_ROOT / "dags",
        "plugins_folder": PROJECT_ROOT / "plugins",
        "mlflow_artifacts_dir": get_settings().data_root / "mlflow-artifacts",
        "dags_paused_at_creation": False,
        "parallelism": DEFAULT_PARALLELISM,
        "external_mlflow_uri": None,
    }


def _pick(name: str, given: Any, environment: PlatformSettings,
          recorded: PlatformConfig | None, default: Any) -> Any:
    """One setting: the argument, else its environment variable, else the recorded value, else
    the default."""
    if given is not None:
        return given
    from_env = getattr(environment, name)
    if from_env is not None:
        return Path(from_env).expanduser().resolve() if name in PATH_SETTINGS else from_env
    if recorded is not None:
        return getattr(recorded, name)
    return default


def resolve_config(
    run_dir: Path | None = None,
    *,
    airflow_port: int | None = None,
    mlflow_port: int | None = None,
    log_server_port: int | None = None,
    dags_folder: Path | None = None,
    plugins_folder: Path | None = None,
    mlflow_artifacts_dir: Path | None = None,
    dags_paused_at_creation: bool | None = None,
    external_mlflow_uri: str | None = None,
) -> PlatformConfig:
    """The platform config: arguments, then ``MLOPS_*`` environment, then what the last ``up``
    recorded in the run dir, then defaults."""
    environment = read_platform_settings()
    run_dir = Path(run_dir).resolve() if run_dir else default_run_dir(environment)
    recorded = load_recorded_config(run_dir)
    given = {
        "airflow_port": airflow_port,
        "mlflow_port": mlflow_port,
        "log_server_port": log_server_port,
        "dags_folder": dags_folder,
        "plugins_folder": plugins_folder,
        "mlflow_artifacts_dir": mlflow_artifacts_dir,
        "dags_paused_at_creation": dags_paused_at_creation,
        "parallelism": None,  # environment or recorded only: no flag sets it
        "external_mlflow_uri": external_mlflow_uri,
    }
    defaults = _defaults()
    values = {
        name: _pick(name, given[name], environment, recorded, defaults[name])
        for name in SETTINGS
    }
    config = PlatformConfig(run_dir=run_dir, **values)
    for port in (config.airflow_port, config.mlflow_port, config.log_server_port):
        if not 0 < port < 65536:
            raise PlatformError(f"invalid port {port}")
    return config


def load_recorded_config(run_dir: Path) -> PlatformConfig | None:
    """The config the last ``up`` in ``run_dir`` used, if any."""
    path = Path(run_dir) / RECORDED_CONFIG
    try:
        return PlatformConfig.from_json(json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def record_config(run_dir: Path, config: PlatformConfig) -> None:
    """Keep ``config`` in ``run_dir`` for :func:`load_recorded_config`."""
    text = json.dumps(config.to_json(), indent=2) + "\n"
    atomic_write_text(Path(run_dir) / RECORDED_CONFIG, text)
