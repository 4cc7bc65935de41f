"""The training DAG end to end, deployment included, run for real with `airflow dags test`.

A first run trains, packages and deploys version 1 behind the stable address; a second run
deploys version 2 while a bounded load runs against that address (no request may fail, and the
answering version changes); a deploy of a broken artifact fails and leaves version 2 serving and
`champion` untouched; the rollback DAG brings version 1 back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
PIPELINE = "churn_e2e"


@pytest.fixture(scope="module")
def e2e_env(dags_test_env, tmp_path_factory):
    pipelines, port = write_small_spec(PIPELINE, "process", tmp_path_factory)
    env = {**dags_test_env, "MLOPS_PIPELINES_DIR": str(pipelines)}
    yield env, port
    from airmlops.serving.deploy import undeploy

    undeploy(PIPELINE, Path(env["MLOPS_DATA_ROOT"]))


def write_small_spec(name: str, target: str, tmp_path_factory) -> tuple[Path, int]:
    """A smaller copy of the demo spec under another name, on a free stable port."""
    from airmlops.serving.deploy import free_port

    spec = yaml.safe_load((REPO_ROOT / "include/pipelines/churn.yaml").read_text())
    spec["name"] = name
    spec["source"]["customers"] = 1000
    spec["training"]["min_rows"] = 500
    spec["deploy"].update(port=free_port(), bake_seconds=3, target=target)
    # The second version must be blessed whatever its sampling noise: this test is about deploys.
    spec["gates"]["champion"]["max_regression"] = 1.0
    pipelines = tmp_path_factory.mktemp(f"pipelines-{name}")
    (pipelines / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    return pipelines, spec["deploy"]["port"]


def dags_test(env, dag_id: str, logical_date: str, conf: dict | None = None):
    command = [AIRFLOW, "dags", "test", dag_id, logical_date]
    if conf:
        command += ["--conf", json.dumps(conf)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    return result


def predict(port: int, client: httpx.Client | None = None) -> httpx.Response:
    body = {"instances": [{"customer_id": "C000010", "tenure_days": 200}]}
    return (client or httpx).post(f"http://127.0.0.1:{port}/predict", json=body, timeout=10)


def champion(env) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLOPS_MLFLOW_TRACKING_URI"])
    return client.get_model_version_by_alias(PIPELINE, "champion").version


class Load(threading.Thread):
    """A bounded load against the stable address: records every status and version."""

    def __init__(self, port: int, max_requests: int = 4000, max_seconds: float = 300):
        super().__init__(daemon=True)
        self.port, self.max_requests, self.max_seconds = port, max_requests, max_seconds
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.versions: list[str] = []

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with httpx.Client() as client:
            while (not self.stop.is_set() and len(self.versions) < self.max_requests
                   and time.monotonic() < deadline):
                try:
                    response = predict(self.port, client)
                except httpx.HTTPError as error:
                    self.failures.append(repr(error))
                    continue
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")
                else:
                    self.versions.append(str(response.json()["model_version"]))
                time.sleep(0.02)


def test_train_deploy_redeploy_under_load_broken_deploy_and_rollback(e2e_env):
    env, port = e2e_env

    dags_test(env, f"{PIPELINE}_training", "2026-06-01T00:00:00+00:00")
    first = predict(port)
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["model_version"] == "1" and body["request_id"]
    # The deploy's smoke requests and the bake's probes were synthetic: the client's request
    # is the only prediction in the log.
    assert logged_request_ids(env, wait_for=body["request_id"]) == {body["request_id"]}
    assert 0.0 <= body["predictions"][0]["probability"] <= 1.0
    assert champion(env) == "1"

    load = Load(port)
    load.start()
    dags_test(env, f"{PIPELINE}_training", "2026-06-20T00:00:00+00:00")
    time.sleep(1.0)
    load.stop.set()
    load.join(timeout=30)
    assert load.failures == [], load.failures[:5]
    assert load.versions[0] == "1" and load.versions[-1] == "2", set(load.versions)
    switch = load.versions.index("2")
    assert set(load.versions[switch:]) == {"2"}, "traffic went back to the old version"
    assert champion(env) == "2"

    # A broken artifact: the deploy fails, version 2 keeps serving, the champion is unchanged.
    from airmlops import stages
    from airmlops.contracts import Package, TrainedModel
    from airmlops.serving.deploy import DeployFailed
    from airmlops.settings import Settings
    from airmlops.spec import load_spec

    spec = load_spec(Path(env["MLOPS_PIPELINES_DIR"]) / f"{PIPELINE}.yaml")
    settings = Settings(data_root=Path(env["MLOPS_DATA_ROOT"]),
                        mlflow_tracking_uri=env["MLOPS_MLFLOW_TRACKING_URI"])
    test_path = next((Path(env["MLOPS_DATA_ROOT"]) / "training_sets" / PIPELINE)
                     .glob("*/test.parquet"))
    run = stages.RunContext(dag_id="test", run_id="broken", as_of=_aware("2026-06-21"),
                            git_commit="0" * 40, trigger_reason="broken deploy test")
    broken = Package(version="3", bento_tag=f"{PIPELINE}:v3-doesnotexist", bento_export="")
    trained = TrainedModel(run_id="", model_uri="", metrics={}, train_path="",
                           test_path=str(test_path), lineage={})  # deploy reads its test rows
    with pytest.raises(DeployFailed):
        stages.deploy(spec, broken, trained, run, settings)
    still = predict(port)
    assert still.status_code == 200 and still.json()["model_version"] == "2"
    assert champion(env) == "2"

    dags_test(env, f"{PIPELINE}_rollback", "2026-06-22T00:00:00+00:00")
    back = predict(port)
    assert back.status_code == 200 and back.json()["model_version"] == "1"
    assert champion(env) == "1"


def logged_request_ids(env, wait_for: str, timeout: float = 20.0) -> set[str]:
    """Request ids in the pipeline's prediction log (today), once ``wait_for`` is written."""
    import datetime as dt

    from airmlops.serving.prediction_log import read_predictions
    from airmlops.settings import Settings

    settings = Settings(data_root=Path(env["MLOPS_DATA_ROOT"]),
                        mlflow_tracking_uri=env["MLOPS_MLFLOW_TRACKING_URI"])
    now = dt.datetime.now(dt.UTC)
    deadline = time.monotonic() + timeout
    while True:
        ids = set(read_predictions(PIPELINE, now - dt.timedelta(days=1),
                                   now + dt.timedelta(days=1), settings=settings)["request_id"])
        if wait_for in ids or time.monotonic() > deadline:
            return ids
        time.sleep(0.2)


def _aware(day: str):
    import datetime as dt

    return dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC)


def test_docker_target_builds_an_image_and_serves_it_in_a_container(
    dags_test_env, docker_engine_ready, session_redis, tmp_path_factory
):
    """With an engine and Redis, `auto` builds a real image (its id recorded on the model
    version) and blue/green deploys containers; a redeploy under load fails no request."""
    from mlflow import MlflowClient

    from airmlops.serving.deploy import undeploy
    from airmlops.settings import PROJECT_ROOT

    name = "churn_docker"
    pipelines, port = write_small_spec(name, "auto", tmp_path_factory)
    env = {**dags_test_env, "MLOPS_PIPELINES_DIR": str(pipelines),
           "MLOPS_REDIS_URL": session_redis,
           # Reuse the wheel cache across sessions: a cold one downloads ~80 wheels.
           "MLOPS_WHEELHOUSE_DIR": str(PROJECT_ROOT / ".data" / "wheelhouse")}
    try:
        dags_test(env, f"{name}_training", "2026-06-01T00:00:00+00:00")
        client = MlflowClient(tracking_uri=env["MLOPS_MLFLOW_TRACKING_URI"])
        version = client.get_model_version_by_alias(name, "champion")
        assert version.tags["image_id"].startswith("sha256:")
        assert version.tags["deployed_target"].startswith("docker")
        first = predict(port)
        assert first.status_code == 200 and first.json()["model_version"] == "1", first.text

        load = Load(port)
        load.start()
        dags_test(env, f"{name}_training", "2026-06-20T00:00:00+00:00")
        time.sleep(1.0)
        load.stop.set()
        load.join(timeout=30)
        assert load.failures == [], load.failures[:5]
        assert load.versions[0] == "1" and load.versions[-1] == "2"
    finally:
        undeploy(name, Path(env["MLOPS_DATA_ROOT"]))
