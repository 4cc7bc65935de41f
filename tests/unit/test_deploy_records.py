"""A canary's record on its model version: the JSON artifact on the version's run and the tags.

MLflow runs embedded on SQLite in a temporary folder (no server), as in
test_tracking_registry.py; an unreachable tracking server stands for MLflow being down.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from airmlops.serving.deploy.canary import CanaryPlan
from airmlops.serving.deploy_records import (
    artifact_path,
    canary_record,
    canary_tags,
    record_canary,
    shadow_tags,
)

PLAN = CanaryPlan((5, 25, 50, 100), 3.0, "customer_id", min_requests=10)


def _step(percent: int, verdict: str = "pass") -> dict:
    return {"percent": percent, "seconds": 3.0, "extended": False, "requests": 40, "errors": 0,
            "error_rate": 0.0, "p50_ms": 4.2,
            "live": {"requests": 120, "errors": 0, "error_rate": 0.0, "p50_ms": 4.0,
                     "window": "step"},
            "z": None, "verdict": verdict, "reason": "" if verdict == "pass" else "worse"}


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite tracking store with one registered model version produced by a run."""
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("mlflow-deploy-records")
    uri = f"sqlite:///{home}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("canary_toy",
                                          artifact_location=(home / "artifacts").as_uri())
    run = client.create_run(experiment)
    client.log_text(run.info.run_id, "a model", "model/MLmodel")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("canary_toy")
    version = client.create_model_version("canary_toy", f"{run.info.artifact_uri}/model",
                                          run_id=run.info.run_id)
    return {"uri": uri, "client": client, "run_id": run.info.run_id,
            "version": version.version}


def test_a_promoted_canary_is_tagged_and_its_record_logged_on_the_run(registry, tmp_path):
    client, version = registry["client"], registry["version"]
    steps = [_step(p) for p in PLAN.steps]
    record = canary_record("canary_toy", version, "promoted", steps, PLAN,
                           "2026-06-20T00:00:00+00:00")

    assert record_canary("canary_toy", version, record, registry["uri"]) is True

    tags = client.get_model_version("canary_toy", version).tags
    path = f"deploy/canary-{version}.json"
    assert tags["canary.outcome"] == "promoted"
    assert tags["canary.steps"] == "5,25,50,100"
    assert "canary.failed_step" not in tags
    assert tags["canary.artifact"] == f"runs:/{registry['run_id']}/{path}"
    local = client.download_artifacts(registry["run_id"], path, str(tmp_path))
    logged = json.loads(Path(local).read_text())
    assert logged["outcome"] == "promoted" and logged["version"] == str(version)
    assert [s["percent"] for s in logged["steps"]] == [5, 25, 50, 100]
    assert all(s["verdict"] == "pass" for s in logged["steps"])
    assert logged["plan"]["steps"] == [5, 25, 50, 100] and logged["failed_step"] is None


def test_a_rolled_back_canary_names_its_failed_step_and_a_later_promotion_clears_it(registry):
    client, version, uri = registry["client"], registry["version"], registry["uri"]
    failed = canary_record("canary_toy", version, "rolled_back",
                           [_step(5), _step(25, "fail")], PLAN, None)
    assert failed["failed_step"] == 25

    assert record_canary("canary_toy", version, failed, uri) is True
    tags = client.get_model_version("canary_toy", version).tags
    assert (tags["canary.outcome"], tags["canary.steps"], tags["canary.failed_step"]) == (
        "rolled_back", "5,25", "25")

    promoted = canary_record("canary_toy", version, "promoted",
                             [_step(p) for p in PLAN.steps], PLAN, None)
    assert record_canary("canary_toy", version, promoted, uri) is True
    tags = client.get_model_version("canary_toy", version).tags
    assert tags["canary.outcome"] == "promoted" and "canary.failed_step" not in tags


def test_mlflow_down_or_an_unknown_version_is_logged_and_never_raised(registry, monkeypatch,
                                                                       caplog):
    from airmlops.serving.deploy import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    record = canary_record("canary_toy", "1", "promoted", [_step(100)], PLAN, None)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    assert record_canary("canary_toy", "1", record, down) is False
    assert record_canary("canary_toy", "999", record, registry["uri"]) is False
    assert "could not record the canary" in caplog.text


def test_the_tags_and_path_of_a_record():
    record = canary_record("p", "7", "rolled_back", [_step(50, "fail")], None, None)
    assert canary_tags(record) == {"canary.outcome": "rolled_back", "canary.steps": "50",
                                   "canary.failed_step": "50"}
    assert artifact_path("7") == "deploy/canary-7.json"
    with pytest.raises(ValueError, match="model version"):
        artifact_path("../7")
    with pytest.raises(ValueError, match="outcome"):
        canary_record("p", "7", "maybe", [], None, None)


def test_the_tags_of_a_shadow_record_say_who_decided():
    judgement = {"comparison": {"pairs": 120, "agreement_rate": 0.9833, "score_ks": 0.04}}
    decided = {"outcome": "promoted", "judgement": judgement, "decided_by": "ada"}
    assert shadow_tags(decided) == {"shadow.outcome": "promoted", "shadow.decided_by": "ada",
                                    "shadow.pairs": "120", "shadow.agreement": "0.9833",
                                    "shadow.score_ks": "0.0400"}
    # The deploy stage's record keeps it in the judgement.
    kept = {"outcome": "rejected", "judgement": {**judgement, "decided_by": "rule"}}
    assert shadow_tags(kept)["shadow.decided_by"] == "rule"
    # A record from before decisions existed has no decided_by, and gets no such tag.
    assert "shadow.decided_by" not in shadow_tags({"outcome": "rejected", "judgement": {}})
