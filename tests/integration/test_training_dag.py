"""The demo training DAG run for real with `airflow dags test` against a real MLflow server.

One run ends with a registered `challenger` carrying every lineage tag; a run on the
data-quality-incident scenario ends in quarantine with its report and no new model version; a
clear-and-rerun of the same logical date writes no second snapshot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(sys.executable).with_name("airflow"))
LINEAGE_TAGS = {"git_commit", "data_digest", "spec_hash", "features_hash", "airflow_dag_id",
                "airflow_run_id", "trigger_reason"}


def dags_test(env: dict[str, str], logical_date: str, conf: dict | None = None):
    command = [AIRFLOW, "dags", "test", "churn_training", logical_date]
    if conf:
        command += ["--conf", json.dumps(conf)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)


def _client(env):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=env["MLOPS_MLFLOW_TRACKING_URI"])


def test_training_run_registers_a_challenger_with_lineage(dags_test_env):
    result = dags_test(dags_test_env, "2026-06-01T00:00:00+00:00",
                       {"trigger_reason": "integration test", "skip_deploy": True})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    client = _client(dags_test_env)
    challenger = client.get_model_version_by_alias("churn", "challenger")
    missing = LINEAGE_TAGS - set(challenger.tags)
    assert not missing, f"lineage tags missing on the version: {missing}"
    assert challenger.tags["git_commit"] == dags_test_env["MLOPS_GIT_COMMIT"]
    assert challenger.tags["trigger_reason"] == "integration test"
    assert challenger.tags["airflow_dag_id"] == "churn_training"

    run = client.get_run(challenger.run_id)
    assert run.data.metrics["test_roc_auc"] > 0.7
    assert set(run.data.tags) >= LINEAGE_TAGS
    assert run.data.tags["gate_blessed"] == "true"
    assert {d.dataset.name for d in run.inputs.dataset_inputs} >= {"train", "test"}

    data_root = Path(dags_test_env["MLOPS_DATA_ROOT"])
    snapshots = list((data_root / "snapshots" / "churn").glob("*.parquet"))
    assert [s.stem for s in snapshots] == [challenger.tags["data_digest"]]


def test_rerun_of_the_same_run_writes_no_duplicate_snapshot(dags_test_env):
    data_root = Path(dags_test_env["MLOPS_DATA_ROOT"])
    before = sorted(p.name for p in (data_root / "snapshots" / "churn").glob("*.parquet"))
    result = dags_test(dags_test_env, "2026-06-01T00:00:00+00:00", {"skip_deploy": True})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    after = sorted(p.name for p in (data_root / "snapshots" / "churn").glob("*.parquet"))
    assert after == before
    assert "snapshot already present, nothing written" in result.stdout + result.stderr


def test_data_quality_incident_is_quarantined_and_registers_nothing(dags_test_env):
    client = _client(dags_test_env)
    versions_before = {v.version for v in client.search_model_versions("name='churn'")}

    result = dags_test(dags_test_env, "2026-06-02T00:00:00+00:00", {"scenario": "data_quality"})
    assert result.returncode != 0, "a bad batch must fail the run"
    output = result.stdout + result.stderr
    assert "quarantined" in output and "monthly_fee" in output

    quarantine = Path(dags_test_env["MLOPS_DATA_ROOT"]) / "quarantine" / "churn"
    batches = [p for p in quarantine.iterdir() if p.is_dir()]
    assert len(batches) == 1
    report = json.loads((batches[0] / "report.json").read_text())
    assert report, "the validation report is kept beside the quarantined batch"
    assert (batches[0] / "data.parquet").exists()
    snapshots = Path(dags_test_env["MLOPS_DATA_ROOT"]) / "snapshots" / "churn"
    assert not (snapshots / f"{batches[0].name}.parquet").exists()

    versions_after = {v.version for v in client.search_model_versions("name='churn'")}
    assert versions_after == versions_before
    states = task_states(dags_test_env, "2026-06-02T00:00:00+00:00")
    assert states["ingest"] == "success" and states["validate_data"] == "failed"
    assert states["train"] != "success" and states["register"] != "success"


def task_states(env: dict[str, str], logical_date: str) -> dict[str, str]:
    """The state of each task of the `dags test` run at that logical date."""

    def cli_json(*args: str) -> list[dict]:
        out = subprocess.run([AIRFLOW, *args, "-o", "json"], env=env, capture_output=True,
                             text=True, timeout=120, check=True)
        for line in reversed(out.stdout.splitlines()):
            if line.startswith("[{") or line.strip() == "[]":
                return json.loads(line)
        raise AssertionError(f"no JSON rows in the output of {args}: {out.stdout[-2000:]}")

    runs = cli_json("dags", "list-runs", "churn_training")
    wanted = logical_date.replace("+00:00", "")
    run_id = next(run["run_id"] for run in runs if (run.get("logical_date") or "")[:19] == wanted)
    return {row["task_id"]: row["state"]
            for row in cli_json("tasks", "states-for-dag-run", "churn_training", run_id)}


def test_any_tabular_dataset_works_by_writing_a_spec(dags_test_env, tmp_path):
    """scikit-learn's diabetes data (regression), given an id and timestamps, through a file
    source and a spec: no code."""
    import pandas as pd
    import yaml
    from sklearn.datasets import load_diabetes

    frame = load_diabetes(as_frame=True).frame
    frame.insert(0, "patient_id", [f"P{i:04d}" for i in range(len(frame))])
    frame.insert(1, "visit_time", pd.date_range("2026-01-01", periods=len(frame), freq="6h",
                                                tz="UTC"))
    data_root = Path(dags_test_env["MLOPS_DATA_ROOT"])
    (data_root / "raw" / "diabetes").mkdir(parents=True, exist_ok=True)
    frame.to_csv(data_root / "raw" / "diabetes" / "visits.csv", index=False)

    spec = {
        "name": "diabetes", "task": "regression", "schedule": None,
        "source": {"kind": "file", "path": "raw/diabetes/*.csv"},
        "entity_key": "patient_id", "timestamp": "visit_time", "label": "target",
        "features": [{"name": c, "type": "numeric"} for c in frame.columns[2:-1]],
        "training": {"window_days": 365, "test_fraction": 0.25, "gap_days": 0, "min_rows": 100},
        "estimator": {"class_path": "sklearn.linear_model.Ridge", "params": {"alpha": 0.5}},
        "gates": {"primary_metric": "rmse", "thresholds": {"rmse": 70.0, "r2": 0.2}},
    }
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    (pipelines / "diabetes.yaml").write_text(yaml.safe_dump(spec))
    env = {**dags_test_env, "MLOPS_PIPELINES_DIR": str(pipelines)}

    command = [AIRFLOW, "dags", "test", "diabetes_training", "2026-06-01T00:00:00+00:00",
               "--conf", json.dumps({"full_history": True, "skip_deploy": True})]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    challenger = _client(env).get_model_version_by_alias("diabetes", "challenger")
    run = _client(env).get_run(challenger.run_id)
    assert run.data.metrics["test_rmse"] < 70.0
    assert set(challenger.tags) >= LINEAGE_TAGS
