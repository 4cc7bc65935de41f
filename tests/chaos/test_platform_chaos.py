"""Faults injected into the platform itself while a training run is under way.

A platform of its own (own MLflow server, so the watchdog is in charge of it) runs a small copy
of the demo pipeline's training DAG through the real scheduler. While ``train`` runs, the
MLflow server is killed (-9); later, while ``containerize`` runs, the scheduler is. Nobody
restarts anything by hand: the watchdog (:mod:`airmlops.platform.watchdog`) does, and the run
must end in success with exactly one model version registered.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from airflow_api import AirflowClient
from chaos_kit import FaultResult, wait_for

from airmlops.platform import (
    MLFLOW,
    SCHEDULER,
    PlatformConfig,
    free_port,
    is_alive,
    read_record,
    set_dag_paused,
    start_platform,
    stop_all,
    wait_for_dag,
)
from airmlops.settings import PROJECT_ROOT

pytestmark = pytest.mark.integration

PIPELINE = "churn_chaos"
TRAINING = f"{PIPELINE}_training"


@pytest.fixture(scope="module")
def chaos_platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    from airmlops.serving.deploy import undeploy

    root = tmp_path_factory.mktemp("platform-chaos")
    pipelines, data_root, run_dir = root / "pipelines", root / "data", root / "run"
    pipelines.mkdir()
    spec = yaml.safe_load((PROJECT_ROOT / "include/pipelines/churn.yaml").read_text())
    spec["name"] = PIPELINE
    spec["schedule"] = None
    spec["source"]["customers"] = 1000
    spec["training"]["min_rows"] = 500
    spec["deploy"].update(port=free_port(), bake_seconds=2, target="process")
    (pipelines / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(spec))
    config = PlatformConfig(
        run_dir=run_dir, dags_folder=PROJECT_ROOT / "dags",
        plugins_folder=PROJECT_ROOT / "plugins", mlflow_artifacts_dir=run_dir / "artifacts",
        airflow_port=free_port(), mlflow_port=free_port(), log_server_port=free_port(),
        dags_paused_at_creation=True,
    )
    with pytest.MonkeyPatch.context() as env:
        # The platform's processes (hence every task) inherit these.
        env.setenv("MLOPS_DATA_ROOT", str(data_root))
        env.setenv("MLOPS_PIPELINES_DIR", str(pipelines))
        env.setenv("MLOPS_GIT_COMMIT", "0" * 40)
        env.delenv("MLOPS_REDIS_URL", raising=False)
        env.delenv("MLOPS_MLFLOW_TRACKING_URI", raising=False)
        platform = start_platform(config, timeout=300.0)
    try:
        yield platform, config, data_root
    finally:
        stop_all(run_dir)
        undeploy(PIPELINE, data_root)


def _kill_when_running(airflow: AirflowClient, run_id: str, task_id: str, run_dir: Path,
                       component: str, timeout: float = 600) -> tuple[int, float]:
    """SIGKILL ``component``'s process group once ``task_id`` of the run is running; return the
    killed pid and when."""
    wait_for(lambda: airflow.task_states(TRAINING, run_id).get(task_id) == "running", timeout,
             f"{task_id} to run", interval=0.5)
    record = read_record(run_dir, component)
    assert record is not None and is_alive(record)
    os.killpg(record.pid, signal.SIGKILL) if component == MLFLOW else os.kill(record.pid,
                                                                                signal.SIGKILL)
    return record.pid, time.monotonic()


def test_mlflow_and_scheduler_killed_mid_run_the_run_completes_with_one_version(
        chaos_platform, chaos_results) -> None:
    from mlflow import MlflowClient

    platform, config, _data_root = chaos_platform
    airflow = AirflowClient.for_platform(platform)
    wait_for_dag(platform.base_url, airflow.token, TRAINING, timeout=240)
    set_dag_paused(platform.base_url, airflow.token, TRAINING, paused=False)
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    run_id = "chaos-run"
    airflow.trigger(TRAINING, run_id, now - dt.timedelta(days=1), now)

    mlflow_pid, mlflow_at = _kill_when_running(airflow, run_id, "train", config.run_dir, MLFLOW)
    wait_for(lambda: (r := read_record(config.run_dir, MLFLOW)) and r.pid != mlflow_pid
             and is_alive(r), 120, "the watchdog to restart MLflow")
    mlflow_back = time.monotonic() - mlflow_at

    scheduler_pid, scheduler_at = _kill_when_running(airflow, run_id, "containerize",
                                                     config.run_dir, SCHEDULER)
    wait_for(lambda: (r := read_record(config.run_dir, SCHEDULER)) and r.pid != scheduler_pid
             and is_alive(r), 120, "the watchdog to restart the scheduler")
    scheduler_back = time.monotonic() - scheduler_at

    airflow.wait(TRAINING, run_id, timeout=900)
    versions = MlflowClient(tracking_uri=config.mlflow_url).search_model_versions(
        f"name = '{PIPELINE}'")
    chaos_results.append(FaultResult(
        "MLflow killed during train (watchdog restarts it)", 1, 0, 0.0, mlflow_back,
        f"{len(versions)} version(s) registered", "task_failed only if the run fails",
        "run succeeds, one version"))
    chaos_results.append(FaultResult(
        "scheduler killed during containerize (watchdog restarts it)", 1, 0, 0.0,
        scheduler_back, f"{len(versions)} version(s) registered",
        "task_failed only if the run fails", "run succeeds, one version"))
    assert [v.version for v in versions] == ["1"]
