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
import time
from pathlib import Path

import httpx
import pytest
from deploy_dag_kit import CustomerLoad, known_customers, run_training, small_spec, write_spec

pytestmark = pytest.mark.e2e

PIPELINE = "churn_canary"
STEPS = [50, 100]


@pytest.fixture(scope="module")
def canary_env(dags_test_env, tmp_path_factory):
    """The demo spec, smaller, with a short canary; the deployment removed at the end."""
    from airmlops.serving.deploy import free_port, undeploy

    # The judgement has its own tests; here a busy machine must not fail a good version on
    # latency.
    spec = small_spec(PIPELINE, free_port(), strategy="canary", canary_steps=STEPS,
                      canary_step_seconds=3, canary_min_requests=10, canary_max_latency_ratio=10.0)
    pipelines = tmp_path_factory.mktemp(f"pipelines-{PIPELINE}")
    write_spec(pipelines, spec)
    env = {**dags_test_env, "MLOPS_PIPELINES_DIR": str(pipelines)}
    yield env, spec["deploy"]["port"]
    undeploy(PIPELINE, Path(env["MLOPS_DATA_ROOT"]))


def test_a_canary_deploy_through_the_dag_is_promoted_and_recorded(canary_env, tmp_path):
    from mlflow import MlflowClient

    from airmlops.serving.deploy import load_state

    env, port = canary_env
    root = Path(env["MLOPS_DATA_ROOT"])
    client = MlflowClient(tracking_uri=env["MLOPS_MLFLOW_TRACKING_URI"])

    run_training(env, PIPELINE, "2026-06-01T00:00:00+00:00")
    assert client.get_model_version_by_alias(PIPELINE, "champion").version == "1"
    assert "canary" not in load_state(PIPELINE, root), "no live version: no canary to run"
    assert not any(key.startswith("canary.")
                   for key in client.get_model_version(PIPELINE, "1").tags)

    with CustomerLoad(port, known_customers(root, PIPELINE)) as load:
        run_training(env, PIPELINE, "2026-06-20T00:00:00+00:00")
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
