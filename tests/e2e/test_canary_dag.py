"""A canary deploy through the training DAG, run for real with `airflow dags test`.

The pipeline's spec says ``deploy.strategy: canary`` with short steps (50 then 100 %, a few
seconds each). The first run deploys version 1 at once (no live version to compare a canary
with: blue/green). While a load of /predict requests for many customers runs against the stable
address, the second run trains version 2 and walks it through the canary: it must end promoted
with every step passed, no request may fail, no customer may go back from version 2 to 1, and
the steps must be recorded in the deployment state (the MLOps view) and on the model version in
MLflow (tags and the ``deploy/canary-<version>.json`` artifact of its run).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
import yaml

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
PIPELINE = "churn_canary"
CUSTOMERS = 1000
STEPS = [50, 100]


@pytest.fixture(scope="module")
def canary_env(dags_test_env, tmp_path_factory):
    """The demo spec, smaller, with a short canary; the deployment removed at the end."""
    from airmlops.serving.deploy import free_port, undeploy

    spec = yaml.safe_load((REPO_ROOT / "include/pipelines/churn.yaml").read_text())
    spec["name"] = PIPELINE
    spec["source"]["customers"] = CUSTOMERS
    spec["training"]["min_rows"] = 500
    spec["deploy"].update(
        port=free_port(), bake_seconds=3, target="process", strategy="canary",
        canary_steps=STEPS, canary_step_seconds=3, canary_min_requests=10,
        # The judgement has its own tests; here a busy machine must not fail a good version
        # on latency.
        canary_max_latency_ratio=10.0)
    # The second version must be blessed whatever its sampling noise: this test is about deploys.
    spec["gates"]["champion"]["max_regression"] = 1.0
    pipelines = tmp_path_factory.mktemp(f"pipelines-{PIPELINE}")
    (pipelines / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(spec))
    env = {**dags_test_env, "MLOPS_PIPELINES_DIR": str(pipelines)}
    yield env, spec["deploy"]["port"]
    undeploy(PIPELINE, Path(env["MLOPS_DATA_ROOT"]))


def run_training(env: dict[str, str], logical_date: str) -> None:
    """One run of the pipeline's training DAG; it must succeed."""
    command = [AIRFLOW, "dags", "test", f"{PIPELINE}_training", logical_date]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]


class CustomerLoad:
    """Threads sending /predict for the customers in turn; records each answer's version per
    customer, and every failure."""

    def __init__(self, port: int, customers: list[str], threads: int = 2,
                 pace: float = 0.03) -> None:
        self.url, self.pace = f"http://127.0.0.1:{port}/predict", pace
        self.customers = customers
        self.versions: dict[str, list[str]] = defaultdict(list)
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> CustomerLoad:
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=30)

    def _run(self, index: int) -> None:
        turn = index * 389
        with httpx.Client(timeout=15.0, trust_env=False) as client:
            while not self._stop.is_set():
                customer = self.customers[turn % len(self.customers)]
                turn += 1
                body = {"instances": [{"customer_id": customer, "tenure_days": 200}]}
                try:
                    response = client.post(self.url, json=body)
                except httpx.HTTPError as error:
                    failure, version = repr(error), None
                else:
                    ok = response.status_code == 200
                    failure = None if ok else f"{response.status_code} {response.text[:200]}"
                    version = str(response.json()["model_version"]) if ok else None
                with self._lock:
                    if failure:
                        self.failures.append(failure)
                    else:
                        self.versions[customer].append(version)
                time.sleep(self.pace)


def known_customers(root: Path) -> list[str]:
    """The customers of the first run's held-out rows: the online store knows them all (the
    deploy's smoke requests are drawn from the same rows)."""
    import pandas as pd

    test_path = next((root / "training_sets" / PIPELINE).glob("*/test.parquet"))
    customers = sorted(set(pd.read_parquet(test_path, columns=["customer_id"])["customer_id"]))
    assert len(customers) >= 100, len(customers)
    return customers


def test_a_canary_deploy_through_the_dag_is_promoted_and_recorded(canary_env, tmp_path):
    from mlflow import MlflowClient

    from airmlops.serving.deploy import load_state

    env, port = canary_env
    root = Path(env["MLOPS_DATA_ROOT"])
    client = MlflowClient(tracking_uri=env["MLOPS_MLFLOW_TRACKING_URI"])

    run_training(env, "2026-06-01T00:00:00+00:00")
    assert client.get_model_version_by_alias(PIPELINE, "champion").version == "1"
    assert "canary" not in load_state(PIPELINE, root), "no live version: no canary to run"
    assert not any(key.startswith("canary.")
                   for key in client.get_model_version(PIPELINE, "1").tags)

    with CustomerLoad(port, known_customers(root)) as load:
        run_training(env, "2026-06-20T00:00:00+00:00")
        time.sleep(1.0)

    assert load.failures == [], load.failures[:5]
    assert client.get_model_version_by_alias(PIPELINE, "champion").version == "2"
    answer = httpx.post(f"http://127.0.0.1:{port}/predict", timeout=10, trust_env=False,
                        json={"instances": [{"customer_id": "C000010", "tenure_days": 200}]})
    assert answer.status_code == 200 and answer.json()["model_version"] == "2", answer.text
    # Sticky by customer: once on version 2, a customer never went back to version 1.
    went_back = [customer for customer, seen in load.versions.items()
                 if "2" in seen and "1" in seen[seen.index("2"):]]
    assert went_back == [], went_back[:5]
    assert any(seen[0] == "1" and seen[-1] == "2" for seen in load.versions.values())

    record = load_state(PIPELINE, root)["canary"]
    assert (record["version"], record["outcome"]) == ("2", "promoted")
    assert [step["percent"] for step in record["steps"]] == STEPS
    assert all(step["verdict"] == "pass" and step["requests"] > 0 for step in record["steps"])

    version = client.get_model_version(PIPELINE, "2")
    path = "deploy/canary-2.json"
    assert version.tags["canary.outcome"] == "promoted"
    assert version.tags["canary.steps"] == "50,100"
    assert "canary.failed_step" not in version.tags
    assert version.tags["canary.artifact"] == f"runs:/{version.run_id}/{path}"
    logged = json.loads(Path(client.download_artifacts(version.run_id, path, str(tmp_path)))
                        .read_text())
    assert logged["outcome"] == "promoted" and logged["steps"] == record["steps"]
