"""Bringing the platform up: PostgreSQL, MLflow, Airflow's components and the watchdog.

:func:`start_platform` is idempotent: components found alive in the run dir (pidfile + process
start time) are reused, the others started, and it returns once everything is ready.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from airmlops.embedded_pg import PgHandle, running_postgres, start_postgres
from airmlops.platform.config import (
    ADMIN_USER,
    AIRFLOW_COMPONENTS,
    API_SERVER,
    HOST,
    LOG_SERVER,
    MLFLOW,
    WATCHDOG,
    PlatformConfig,
    PlatformError,
    Progress,
    load_recorded_config,
    record_config,
    say,
)
from airmlops.platform.environment import airflow_env, component_argv, mlflow_env, script
from airmlops.platform.health import wait_airflow_healthy, wait_mlflow
from airmlops.platform.secrets import ensure_secrets
from airmlops.platform.supervise import (
    ProcessRecord,
    is_alive,
    log_tail,
    platform_lock,
    read_record,
    spawn,
    start_watchdog,
)
from airmlops.processes import port_free


@dataclass(frozen=True)
class Platform:
    """A running platform: what a test or a caller needs to talk to it."""

    config: PlatformConfig
    pg: PgHandle
    username: str
    password: str = field(repr=False)
    env: dict[str, str] = field(repr=False)
    started: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return self.config.airflow_url

    @property
    def mlflow_url(self) -> str:
        return self.config.mlflow_url

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


def start_mlflow(
    config: PlatformConfig, pg: PgHandle, base_env: Mapping[str, str] | None = None
) -> ProcessRecord:
    """Start the MLflow tracking server of ``config`` (does not wait; see :func:`wait_mlflow`)."""
    if not port_free(config.mlflow_port):
        raise PlatformError(
            f"port {config.mlflow_port} on {HOST} is taken by another program; "
            "choose another with MLOPS_MLFLOW_PORT or --mlflow-port"
        )
    config.mlflow_artifacts_dir.mkdir(parents=True, exist_ok=True)
    return spawn(config.run_dir, MLFLOW, component_argv(MLFLOW, config, pg), mlflow_env(base_env))


def migrate_airflow_db(
    config: PlatformConfig, env: Mapping[str, str], timeout: float = 300.0
) -> float:
    """``airflow db migrate`` (idempotent). Returns the seconds it took."""
    log_path = config.logs_dir / "airflow-db-migrate.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "ab") as log:
        result = subprocess.run(
            [script("airflow"), "db", "migrate"],
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
            check=False,
        )
    if result.returncode != 0:
        raise PlatformError(
            f"`airflow db migrate` failed (exit {result.returncode})\n"
            f"{log_tail(config.run_dir, 'airflow-db-migrate')}"
        )
    return time.monotonic() - start


def start_airflow(
    config: PlatformConfig, env: Mapping[str, str], names: Sequence[str] = AIRFLOW_COMPONENTS
) -> list[ProcessRecord]:
    """Start the given Airflow components (does not wait; see :func:`wait_airflow_healthy`)."""
    ports = {API_SERVER: config.airflow_port, LOG_SERVER: config.log_server_port}
    for name in names:
        if name in ports and not port_free(ports[name]):
            raise PlatformError(
                f"port {ports[name]} on {HOST} ({name}) is taken by another program; choose "
                "another with MLOPS_AIRFLOW_PORT / MLOPS_AIRFLOW_LOG_SERVER_PORT or the flags"
            )
    config.airflow_home.mkdir(parents=True, exist_ok=True)
    return [spawn(config.run_dir, name, component_argv(name, config), env) for name in names]


def start_platform(
    config: PlatformConfig,
    *,
    timeout: float = 300.0,
    progress: Progress = say,
    base_env: Mapping[str, str] | None = None,
) -> Platform:
    """Bring the platform of ``config`` up, reusing whatever already runs, and wait until healthy.

    Idempotent: components alive in the run dir are kept (a second call starts nothing).
    """
    t0 = time.monotonic()
    run_dir = config.run_dir
    with platform_lock(run_dir, progress):
        alive = {n for n in (MLFLOW, *AIRFLOW_COMPONENTS) if is_alive(read_record(run_dir, n))}
        config = _settle_config(config, alive, progress)
        config.logs_dir.mkdir(parents=True, exist_ok=True)
        record_config(run_dir, config)

        timings: dict[str, float] = {}
        pg = _start_postgres(run_dir, timings, progress)
        platform_secrets = ensure_secrets(config)
        env = airflow_env(config, pg, platform_secrets, base_env)
        started = _start_mlflow_unless_alive(config, pg, alive, base_env, progress)
        started += _start_missing_airflow(config, env, alive, timings, progress)

        remaining = max(30.0, timeout - (time.monotonic() - t0))
        wait_mlflow(config, remaining, progress)
        timings["mlflow ready"] = time.monotonic() - t0
        remaining = max(30.0, timeout - (time.monotonic() - t0))
        wait_airflow_healthy(config, remaining, progress)
        timings["airflow healthy"] = time.monotonic() - t0
        started += _ensure_watchdog(run_dir, base_env, progress)
    return Platform(
        config=config,
        pg=pg,
        username=ADMIN_USER,
        password=platform_secrets.admin_password,
        env=env,
        started=tuple(started),
        timings=timings,
    )


def _settle_config(config: PlatformConfig, alive: set[str], progress: Progress) -> PlatformConfig:
    """``config``, or the recorded one when components already run with other settings (they
    keep running as they are; ``down`` first to change them)."""
    recorded = load_recorded_config(config.run_dir)
    if alive and recorded is not None and recorded != config:
        progress(
            f"{', '.join(sorted(alive))} already running with the recorded settings of "
            f"{config.run_dir}; keeping those (run `down` first to change them)"
        )
        return recorded
    return config


def _start_postgres(run_dir: Path, timings: dict[str, float], progress: Progress) -> PgHandle:
    """The embedded PostgreSQL of ``run_dir``, started unless it runs."""
    t = time.monotonic()
    was_running = running_postgres(run_dir) is not None
    pg = start_postgres(run_dir)
    timings["postgres"] = time.monotonic() - t
    progress(
        f"postgres: {'already running' if was_running else 'started'} "
        f"(pid {pg.pid}, socket {pg.socket_dir})"
    )
    return pg


def _start_mlflow_unless_alive(
    config: PlatformConfig,
    pg: PgHandle,
    alive: set[str],
    base_env: Mapping[str, str] | None,
    progress: Progress,
) -> list[str]:
    """Start the platform's own MLflow unless it runs or an external one is used; returns
    what was started."""
    if config.external_mlflow_uri:
        return []
    if MLFLOW in alive:
        progress(f"mlflow: already running (pid {read_record(config.run_dir, MLFLOW).pid})")
        return []
    record = start_mlflow(config, pg, base_env)
    progress(f"mlflow: starting (pid {record.pid})")
    return [MLFLOW]


def _start_missing_airflow(
    config: PlatformConfig,
    env: Mapping[str, str],
    alive: set[str],
    timings: dict[str, float],
    progress: Progress,
) -> list[str]:
    """Migrate the metadata database and start the Airflow components not alive; returns
    what was started."""
    missing = [n for n in AIRFLOW_COMPONENTS if n not in alive]
    if missing:
        progress("airflow: migrating the metadata database")
        timings["airflow db migrate"] = migrate_airflow_db(config, env)
        for record in start_airflow(config, env, missing):
            progress(f"airflow {record.name}: starting (pid {record.pid})")
    for name in AIRFLOW_COMPONENTS:
        if name in alive:
            pid = read_record(config.run_dir, name).pid
            progress(f"airflow {name}: already running (pid {pid})")
    return missing


def _ensure_watchdog(
    run_dir: Path, base_env: Mapping[str, str] | None, progress: Progress
) -> list[str]:
    """Start the watchdog unless it runs; returns what was started."""
    watchdog_alive = is_alive(read_record(run_dir, WATCHDOG))
    record = start_watchdog(run_dir, base_env)
    progress(f"watchdog: {'already running' if watchdog_alive else 'started'} "
             f"(pid {record.pid}; restarts what dies)")
    return [] if watchdog_alive else [WATCHDOG]
