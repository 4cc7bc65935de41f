"""What each component runs: its command line and its whole environment.

Airflow is configured only through the environment of its processes (:func:`airflow_env`),
never through a global file or the caller's environment, and everything listens on 127.0.0.1.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from airmlops.embedded_pg import PgHandle
from airmlops.platform.config import (
    ADMIN_USER,
    API_SERVER,
    DAG_PROCESSOR,
    HOST,
    LOG_SERVER,
    MLFLOW,
    SCHEDULER,
    TRIGGERER,
    PlatformConfig,
    PlatformError,
)
from airmlops.platform.secrets import PlatformSecrets
from airmlops.settings import process_environment

HOSTNAME_CALLABLE = "airmlops.platform.loopback_hostname"
"""Where Airflow finds :func:`loopback_hostname` (re-exported by the package)."""


def loopback_hostname() -> str:
    """Airflow's ``hostname_callable`` here: every component and task runs on this machine.

    The API server fetches logs of running tasks from ``http://<hostname>:<log port>``; a
    loopback name keeps that traffic on 127.0.0.1 whatever the machine's name resolves to.
    """
    return HOST


def common_env(parent: Mapping[str, str] | None) -> dict[str, str]:
    """``parent`` (default: this process's environment) with loopback exempt from any proxy,
    telemetry off and unbuffered Python output: the start of every component's environment."""
    env = dict(process_environment() if parent is None else parent)
    no_proxy = [h for h in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if h]
    for host in (HOST, "localhost", "::1"):
        if host not in no_proxy:
            no_proxy.append(host)
    # Loopback traffic must never go through a proxy configured for the registries.
    env["NO_PROXY"] = env["no_proxy"] = ",".join(no_proxy)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["DO_NOT_TRACK"] = "true"
    env["BENTOML_DO_NOT_TRACK"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def airflow_env(
    config: PlatformConfig,
    pg: PgHandle,
    platform_secrets: PlatformSecrets,
    base_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of every Airflow process (and so of every task): the whole config."""
    env = common_env(base_env)
    env.update(
        {
            "AIRFLOW_HOME": str(config.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(config.dags_folder),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(config.plugins_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(config.parallelism),
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": str(config.dags_paused_at_creation),
            "AIRFLOW__CORE__FERNET_KEY": platform_secrets.fernet_key,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{config.airflow_url}/execution/",
            "AIRFLOW__CORE__AUTH_MANAGER": (
                "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager"
            ),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(config.passwords_file),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": pg.uri("airflow"),
            # A burst of API calls (webhooks, the UI, 20 concurrent triggers in the tests) must
            # not queue on the API server's connection pool: with Airflow's 5 + 10 connections
            # the 16th concurrent request waits, and on a busy 2-core machine 20 triggers once
            # took 31 s with one 500, the mark of SQLAlchemy's 30 s pool timeout. 5 + 25 per
            # process stays well below the embedded PostgreSQL's 100 connections.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_MAX_OVERFLOW": "25",
            "AIRFLOW__API__HOST": HOST,
            "AIRFLOW__API__PORT": str(config.airflow_port),
            "AIRFLOW__API__BASE_URL": config.airflow_url,
            "AIRFLOW__API__SECRET_KEY": platform_secrets.api_secret_key,
            "AIRFLOW__API_AUTH__JWT_SECRET": platform_secrets.jwt_secret,
            # Airflow's own log servers bind every interface; they are skipped and one log
            # server bound to 127.0.0.1 serves both worker and triggerer logs instead.
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(config.log_server_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(config.log_server_port),
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            # Pick up a new DAG file within 30 s instead of 5 minutes.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "30",
            "MLOPS_MLFLOW_TRACKING_URI": config.mlflow_url,
            "MLFLOW_TRACKING_URI": config.mlflow_url,
        }
    )
    return env


def mlflow_env(base_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the MLflow server: one process, no job runner (~0.6 GB, not ~4 GB)."""
    env = common_env(base_env)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


def script(name: str) -> str:
    """A console script of the running environment (the venv's ``airflow``, ``mlflow``)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise PlatformError(f"`{name}` is not installed in this Python environment")
    return found


def component_argv(name: str, config: PlatformConfig, pg: PgHandle | None = None) -> list[str]:
    """The command line of component ``name``."""
    if name == MLFLOW:
        return _mlflow_argv(config, pg)
    airflow = script("airflow")
    commands = {
        API_SERVER: [airflow, "api-server", "--host", HOST, "--port", str(config.airflow_port)],
        SCHEDULER: [airflow, "scheduler", "--skip-serve-logs"],
        DAG_PROCESSOR: [airflow, "dag-processor"],
        TRIGGERER: [airflow, "triggerer", "--skip-serve-logs"],
        LOG_SERVER: [
            sys.executable,
            "-m",
            "uvicorn",
            "airflow.utils.serve_logs.log_server:get_app",
            "--factory",
            "--host",
            HOST,
            "--port",
            str(config.log_server_port),
            "--no-access-log",
        ],
    }
    if name not in commands:
        raise ValueError(f"unknown component {name!r}")
    return commands[name]


def _mlflow_argv(config: PlatformConfig, pg: PgHandle | None) -> list[str]:
    """The MLflow tracking server's command line: metadata in the embedded PostgreSQL."""
    if pg is None:
        raise ValueError("the MLflow server needs the embedded PostgreSQL handle")
    return [
        script("mlflow"),
        "server",
        "--host",
        HOST,
        "--port",
        str(config.mlflow_port),
        "--workers",
        "1",
        "--backend-store-uri",
        pg.uri("mlflow"),
        # Clients log artifacts through the server (mlflow-artifacts:/), which stores them here.
        "--artifacts-destination",
        str(config.mlflow_artifacts_dir),
    ]
