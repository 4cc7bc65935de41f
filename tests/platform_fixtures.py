"""Real services for the integration suite, each on free loopback ports in its own run dir.

Nothing here touches a running `make run` instance: every fixture starts its own PostgreSQL,
MLflow or Airflow in its own run dir on free ports and stops it at the end of the session.

The run dirs live in a session directory of their own, not under pytest's ``tmp_path``: as root
the embedded PostgreSQL runs as the ``pgserver`` user, and every pytest session that starts
(another suite, another terminal) resets ``/tmp/pytest-of-<user>`` to mode 0700, which would
lock that user out of a data directory below it.

- ``embedded_pg``: an embedded PostgreSQL with the ``airflow`` and ``mlflow`` databases.
- ``mlflow_server``: the tracking URI of an MLflow server backed by ``embedded_pg``.
- ``airflow_platform``: Airflow's four components (plus the loopback task-log server) on the
  DAGs of ``platform_dags_folder`` (the repository's ``dags/`` unless a module overrides it),
  tracking into ``mlflow_server``.
- ``platform_factory``: starts further platforms (other DAG folders, DAGs paused at creation).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from airmlops.embedded_pg import PgHandle, start_postgres, stop_postgres
from airmlops.platform import (
    MLFLOW,
    Platform,
    PlatformConfig,
    free_port,
    start_mlflow,
    start_platform,
    stop_all,
    stop_components,
    wait_mlflow,
)
from airmlops.settings import PROJECT_ROOT

PlatformFactory = Callable[..., Platform]


def _report(message: str) -> None:
    print(f"[integration] {message}", flush=True)


@pytest.fixture(scope="session")
def run_dirs() -> Iterator[Callable[[str], Path]]:
    """``run_dirs(name)`` makes a fresh run dir; all are removed at the end of the session."""
    root = Path(tempfile.mkdtemp(prefix="airmlops-integration-"))

    def make(name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))

    yield make
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_pg(run_dirs: Callable[[str], Path]) -> Iterator[PgHandle]:
    """An embedded PostgreSQL in its own run dir; stopped at the end of the session."""
    run_dir = run_dirs("embedded-pg")
    started = time.monotonic()
    handle = start_postgres(run_dir)
    _report(f"embedded PostgreSQL up in {time.monotonic() - started:.1f} s")
    yield handle
    stop_postgres(run_dir)


@pytest.fixture(scope="session")
def mlflow_server(embedded_pg: PgHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Tracking URI of an MLflow server on a free port (PostgreSQL backend, local artifacts)."""
    run_dir = embedded_pg.pgdata.parent
    config = PlatformConfig(
        run_dir=run_dir,
        dags_folder=PROJECT_ROOT / "dags",
        plugins_folder=PROJECT_ROOT / "plugins",
        mlflow_artifacts_dir=tmp_path_factory.mktemp("mlflow-artifacts"),
        mlflow_port=free_port(),
    )
    started = time.monotonic()
    start_mlflow(config, embedded_pg)
    try:
        wait_mlflow(config, timeout=240.0, progress=_report)
        _report(f"MLflow up at {config.mlflow_url} in {time.monotonic() - started:.1f} s")
        yield config.mlflow_url
    finally:
        stop_components(run_dir, [MLFLOW])


@pytest.fixture(scope="session")
def platform_factory(
    run_dirs: Callable[[str], Path], mlflow_server: str
) -> Iterator[PlatformFactory]:
    """Start platforms (each with its own run dir and PostgreSQL); all stopped at session end.

    ``platform_factory(name, dags_folder, dags_paused_at_creation=False)`` returns a
    :class:`~airmlops.platform.Platform` that tracks into ``mlflow_server``.
    """
    started_dirs: list[Path] = []

    def start(name: str, dags_folder: Path, dags_paused_at_creation: bool = False) -> Platform:
        run_dir = run_dirs(f"platform-{name}")
        started_dirs.append(run_dir)
        config = PlatformConfig(
            run_dir=run_dir,
            dags_folder=Path(dags_folder),
            plugins_folder=PROJECT_ROOT / "plugins",
            mlflow_artifacts_dir=run_dir / "mlflow-artifacts",
            airflow_port=free_port(),
            log_server_port=free_port(),
            dags_paused_at_creation=dags_paused_at_creation,
            external_mlflow_uri=mlflow_server,
        )
        started = time.monotonic()
        platform = start_platform(config, timeout=300.0, progress=_report)
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in platform.timings.items())
        _report(f"platform {name} healthy in {time.monotonic() - started:.1f} s ({timings})")
        return platform

    yield start
    for run_dir in reversed(started_dirs):
        stop_all(run_dir)


@pytest.fixture(scope="session")
def platform_dags_folder() -> Path:
    """The DAGs ``airflow_platform`` serves; override in a module to serve others."""
    return PROJECT_ROOT / "dags"


@pytest.fixture(scope="session")
def airflow_platform(platform_factory: PlatformFactory, platform_dags_folder: Path) -> Platform:
    """Airflow (api-server, scheduler, dag-processor, triggerer) on free ports, DAGs unpaused.

    Has ``base_url``, ``username``, ``password``, ``env`` (the components' environment, for
    ``airflow`` CLI calls) and ``run_dir``. Torn down at the end of the session.
    """
    return platform_factory("main", platform_dags_folder)


@pytest.fixture(scope="session")
def dags_test_env(mlflow_server, tmp_path_factory) -> dict[str, str]:
    """An Airflow home on SQLite for in-process `dags test` runs, and its own data root."""
    home = tmp_path_factory.mktemp("airflow-dags-test")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "MLOPS_DATA_ROOT": str(home / "data"),
        "MLOPS_MLFLOW_TRACKING_URI": mlflow_server,
        "MLOPS_GIT_COMMIT": "0123456789abcdef0123456789abcdef01234567",
    }
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=env, check=True, capture_output=True,
                   timeout=300)
    return env


@pytest.fixture(scope="session")
def docker_engine_ready() -> None:
    """A Docker engine and the local base image, set up by the project's own scripts."""
    from airmlops.serving.docker_engine import engine_available

    for script in ("ensure-docker.sh", "ensure-base-image.sh"):
        result = subprocess.run(["bash", str(PROJECT_ROOT / "scripts" / script)],
                                capture_output=True, text=True, timeout=900, check=False)
        if result.returncode != 0:
            pytest.fail(f"scripts/{script} failed ({result.returncode}):\n"
                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    assert engine_available(), "ensure-docker.sh succeeded but the engine does not answer"


@pytest.fixture(scope="session")
def session_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private Redis server for the session (installed by scripts/ensure-redis.sh)."""
    from integration.redis_fixture import run_redis_server

    yield from run_redis_server(tmp_path_factory.mktemp("session-redis"))
