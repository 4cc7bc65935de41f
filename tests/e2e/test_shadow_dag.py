"""Shadow deploys through the training DAG, run for real with `airflow dags test`.

The pipeline's spec says ``deploy.strategy: shadow`` with a 4 s window. The first run deploys
version 1 at once (nothing live to mirror). While a load of /predict requests for many
customers runs against the stable address, the second run trains version 2 and shadows it:
clients keep getting version 1's answers, the model services log version 2's answers to the
shadow log beside them (never into the live log), and with a promotion rule version 2 meets,
it is switched to. Then the rule is made one no retrained model can meet (the two models'
score distributions identical): the third run's version is rejected, the run fails, version 2
keeps serving, and no client request fails. Each judgement is in the deployment state (the
MLOps view) and on the model version in MLflow.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import httpx
import pytest
from deploy_dag_kit import CustomerLoad, known_customers, run_training, small_spec, write_spec

pytestmark = pytest.mark.e2e

PIPELINE = "churn_shadow"
RULE = {"shadow_min_agreement": 0.8, "shadow_max_score_ks": 0.3}


@pytest.fixture(scope="module")
def shadow_env(dags_test_env, tmp_path_factory):
    """The demo spec, smaller, with a short shadow window; the deployment removed at the end.
    Yields the environment, the stable port, the pipelines folder and the spec."""
    from airmlops.serving.deploy import free_port, undeploy

    # The latency rule has its own tests; a busy machine must not reject on it here.
    spec = small_spec(PIPELINE, free_port(), strategy="shadow", shadow_seconds=4,
                      shadow_min_requests=10, shadow_max_latency_ratio=10.0, **RULE)
    pipelines = tmp_path_factory.mktemp(f"pipelines-{PIPELINE}")
    write_spec(pipelines, spec)
    env = {**dags_test_env, "MLOPS_PIPELINES_DIR": str(pipelines)}
    yield env, spec["deploy"]["port"], pipelines, spec
    undeploy(PIPELINE, Path(env["MLOPS_DATA_ROOT"]))


def serving_version(port: int) -> str:
    answer = httpx.post(f"http://127.0.0.1:{port}/predict", timeout=10, trust_env=False,
                        json={"instances": [{"customer_id": "C000010", "tenure_days": 200}]})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["model_version"])


def logged_window(root: Path, judgement: dict):
    """The shadow pairs and the live predictions logged in a judgement's window."""
    from airmlops.serving.prediction_log import read_predictions, read_shadow_pairs
    from airmlops.settings import Settings

    settings = Settings(data_root=root)
    start = dt.datetime.fromisoformat(judgement["window"]["start"])
    end = dt.datetime.fromisoformat(judgement["window"]["end"])
    return (read_shadow_pairs(PIPELINE, start, end, settings=settings),
            read_predictions(PIPELINE, start, end, settings=settings))


def test_a_shadow_is_promoted_by_its_rule_and_a_failing_one_rejected(shadow_env, tmp_path):
    from mlflow import MlflowClient

    from airmlops.serving.deploy import load_state

    env, port, pipelines, spec = shadow_env
    root = Path(env["MLOPS_DATA_ROOT"])
    client = MlflowClient(tracking_uri=env["MLOPS_MLFLOW_TRACKING_URI"])

    run_training(env, PIPELINE, "2026-06-01T00:00:00+00:00")
    assert "shadow" not in load_state(PIPELINE, root), "nothing live: no shadow to run"
    customers = known_customers(root, PIPELINE)

    with CustomerLoad(port, customers) as load:
        run_training(env, PIPELINE, "2026-06-20T00:00:00+00:00")
    assert load.failures == [], load.failures[:5]
    assert client.get_model_version_by_alias(PIPELINE, "champion").version == "2"
    assert serving_version(port) == "2"

    record = load_state(PIPELINE, root)["shadow"]
    judgement = record["judgement"]
    assert (record["version"], record["outcome"], judgement["verdict"]) == (
        "2", "promoted", "promote"), judgement
    assert judgement["shadow"]["requests"] > 0 and judgement["reasons"] == []
    comparison = judgement["comparison"]
    assert comparison["pairs"] > 0 and comparison["agreement_rate"] >= RULE[
        "shadow_min_agreement"]
    assert comparison["score_ks"] <= RULE["shadow_max_score_ks"]

    # The shadow answered copies of live requests; clients only ever saw the live answers.
    pairs, live = logged_window(root, judgement)
    answered = {request_id: version for _, _, version, request_id in load.answers}
    assert len(pairs) > 0
    assert set(pairs["live_version"]) == {"1"} and set(pairs["shadow_version"]) == {"2"}
    assert {answered.get(request_id) for request_id in pairs["request_id"]} <= {"1", None}
    assert any(answered.get(request_id) == "1" for request_id in pairs["request_id"])
    assert set(live["model_version"]) == {"1"}, "a shadow row reached the live log"

    version = client.get_model_version(PIPELINE, "2")
    assert version.tags["shadow.outcome"] == "promoted"
    assert version.tags["shadow.decided_by"] == "rule"
    assert version.tags["shadow.artifact"] == f"runs:/{version.run_id}/deploy/shadow-2.json"
    logged = json.loads(Path(client.download_artifacts(
        version.run_id, "deploy/shadow-2.json", str(tmp_path))).read_text())
    assert logged["judgement"] == judgement

    # A rule no other model can meet: identical score distributions.
    spec["deploy"]["shadow_max_score_ks"] = 0.0
    write_spec(pipelines, spec)
    with CustomerLoad(port, customers) as load:
        run_training(env, PIPELINE, "2026-07-10T00:00:00+00:00", succeed=False)
    assert load.failures == [], load.failures[:5]
    assert client.get_model_version_by_alias(PIPELINE, "champion").version == "2"
    assert serving_version(port) == "2"
    assert {version for _, _, version, _ in load.answers} == {"2"}
    record = load_state(PIPELINE, root)["shadow"]
    assert (record["version"], record["outcome"]) == ("3", "rejected")
    assert any("KS" in reason for reason in record["judgement"]["reasons"]), record
    rejected = client.get_model_version(PIPELINE, "3").tags
    assert (rejected["shadow.outcome"], rejected["shadow.decided_by"]) == ("rejected", "rule")
