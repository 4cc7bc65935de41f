"""DAG integrity and policy: every DAG file imports cleanly, cheaply and without I/O to services,
and every DAG states its contract (tags, retries, timezone-aware start, docs)."""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import socket
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO_ROOT / "dags"
PIPELINES_DIR = REPO_ROOT / "include" / "pipelines"


def _import_dag_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dags_of(module) -> dict:
    from airflow.sdk import DAG

    return {value.dag_id: value for value in vars(module).values() if isinstance(value, DAG)}


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR), safe_mode=False)


def test_every_dag_file_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert dagbag.dags, "no DAGs were found"


def test_every_spec_yields_a_training_dag(dagbag):
    from airmlops.spec import load_spec, spec_paths

    for path in spec_paths(PIPELINES_DIR):
        assert load_spec(path).training_dag_id in dagbag.dags


@pytest.mark.parametrize("policy", ["tags", "retries", "start_date", "doc", "catchup"])
def test_every_dag_states_its_contract(dagbag, policy):
    for dag_id, dag in dagbag.dags.items():
        if policy == "tags":
            assert dag.tags, f"{dag_id} has no tags"
        elif policy == "retries":
            for task in dag.tasks:
                assert task.retries >= 2, f"{dag_id}.{task.task_id} has retries={task.retries}"
        elif policy == "start_date":
            assert dag.start_date is not None and dag.start_date.tzinfo is not None, dag_id
        elif policy == "doc":
            assert dag.doc_md and len(dag.doc_md.strip()) > 40, f"{dag_id} has no doc_md"
        elif policy == "catchup":
            assert dag.catchup is False and dag.max_active_runs == 1, dag_id


def test_training_dag_runs_the_stages_in_order(dagbag):
    dag = dagbag.dags["churn_training"]
    order = ["ingest", "validate_data", "preprocess", "train", "validate_model", "register"]
    assert set(order) <= set(dag.task_dict)
    for upstream, downstream in itertools.pairwise(order):
        assert downstream in dag.task_dict[upstream].get_flat_relative_ids(upstream=False), (
            f"{downstream} does not run after {upstream}"
        )
    assert {"trigger_reason", "git_commit", "scenario"} <= set(dag.params.keys())


def test_parsing_opens_no_connection_and_imports_nothing_heavy(monkeypatch):
    import airflow.sdk  # noqa: F401  (the DAG processor has Airflow imported already)
    import sqlalchemy.engine

    def refuse(*args, **kwargs):
        raise AssertionError(f"DAG parsing tried to open a connection: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(sqlalchemy.engine.Engine, "connect", refuse)
    heavy = ("sklearn", "mlflow", "great_expectations", "evidently", "bentoml", "pandas")
    before = {name for name in sys.modules if name.split(".")[0] in heavy}
    for path in sorted(DAGS_DIR.glob("*.py")):
        module = _import_dag_file(path, f"_integrity_{path.stem}")
        assert _dags_of(module) or path.name.startswith("_")
    after = {name for name in sys.modules if name.split(".")[0] in heavy}
    assert after - before == set(), f"DAG parsing imported heavy modules: {sorted(after - before)}"


def test_the_dags_folder_parses_in_a_fresh_interpreter_without_heavy_imports():
    """As the DAG processor parses it: a fresh interpreter that has only Airflow imported.

    Parse time is measured by benchmarks/bench_dag_parse.py (1 to 200 specs, medians, load
    average), not asserted here: a timed assertion fails whenever the machine is busy."""
    import json
    import subprocess

    probe = (
        "import json, runpy, pathlib, sys\n"
        "import airflow.sdk\n"
        "from airflow.sdk import DAG\n"
        "ids = []\n"
        f"for path in sorted(pathlib.Path({str(DAGS_DIR)!r}).glob('*.py')):\n"
        "    ids += [v.dag_id for v in runpy.run_path(str(path)).values() if isinstance(v, DAG)]\n"
        "heavy = ('sklearn', 'mlflow', 'great_expectations', 'evidently', 'bentoml', 'pandas')\n"
        "print(json.dumps({'dag_ids': sorted(set(ids)), 'heavy': sorted(\n"
        "    {m.split('.')[0] for m in sys.modules} & set(heavy))}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=300)
    parsed = json.loads(out.stdout.strip().splitlines()[-1])
    assert parsed["heavy"] == [], f"parsing the dags folder imported {parsed['heavy']}"
    assert "churn_training" in parsed["dag_ids"]
    assert not [i for i in parsed["dag_ids"] if i.endswith("_invalid_spec")], parsed["dag_ids"]


def test_a_bad_spec_breaks_only_its_own_pipeline(tmp_path, caplog):
    from airmlops.dags import build_all

    shutil.copy(PIPELINES_DIR / "churn.yaml", tmp_path / "churn.yaml")
    (tmp_path / "broken.yaml").write_text(
        (PIPELINES_DIR / "churn.yaml").read_text().replace("name: churn", "name: broken")
        .replace("label: churned\n", "")
    )
    dags = build_all(tmp_path)
    assert "churn_training" in dags
    assert "broken_training" not in dags
    placeholder = dags["broken_invalid_spec"]
    assert "broken.yaml" in placeholder.doc_md and "label: is required" in placeholder.doc_md
    assert "invalid-spec" in placeholder.tags
    assert any("label: is required" in record.getMessage() for record in caplog.records)


def test_any_error_while_building_a_spec_breaks_only_that_spec(tmp_path, monkeypatch):
    """Not only validation errors: a failure half-way through building one spec's DAGs gives
    that spec its placeholder, and the half-built DAGs do not reach the DagBag."""
    from airflow.sdk.definitions._internal.contextmanager import DagContext

    from airmlops import dags as dag_layer

    shutil.copy(PIPELINES_DIR / "churn.yaml", tmp_path / "churn.yaml")
    (tmp_path / "other.yaml").write_text(
        (PIPELINES_DIR / "churn.yaml").read_text().replace("name: churn", "name: other"))
    real = dag_layer.build_rollback_dag

    def fail_for_other(spec, path):
        if spec.name == "other":
            raise RuntimeError("rollback DAG could not be built")
        return real(spec, path)

    monkeypatch.setattr(dag_layer, "build_rollback_dag", fail_for_other)
    monkeypatch.setattr(DagContext, "current_autoregister_module_name", __name__)
    DagContext.autoregistered_dags.clear()
    try:
        dags = dag_layer.build_all(tmp_path)
        registered = {dag.dag_id for dag, _ in DagContext.autoregistered_dags}
    finally:
        DagContext.autoregistered_dags.clear()
    assert {"churn_training", "churn_rollback", "churn_monitoring"} <= set(dags)
    assert "other_training" not in dags and "other_training" not in registered
    placeholder = dags["other_invalid_spec"]
    assert "RuntimeError: rollback DAG could not be built" in placeholder.doc_md
    assert registered == set(dags)


def test_two_specs_with_one_name_keep_the_first(tmp_path):
    from airmlops.dags import build_all

    shutil.copy(PIPELINES_DIR / "churn.yaml", tmp_path / "a_churn.yaml")
    shutil.copy(PIPELINES_DIR / "churn.yaml", tmp_path / "b_copy.yaml")
    dags = build_all(tmp_path)
    assert "churn_training" in dags
    assert "already defines" in dags["b_copy_invalid_spec"].doc_md


def _build_with_alerts(tmp_path: Path, alerts: dict | None) -> dict:
    import yaml

    from airmlops.dags import build_all

    data = yaml.safe_load((PIPELINES_DIR / "churn.yaml").read_text())
    if alerts is not None:
        data["alerts"] = alerts
    (tmp_path / "churn.yaml").write_text(yaml.safe_dump(data))
    return build_all(tmp_path)


def test_every_task_of_a_spec_with_alerts_alerts_its_failure(tmp_path):
    from airflow.serialization.serialized_objects import DagSerialization

    from airmlops.alerts import AlertsConfig
    from airmlops.dags.callbacks import PipelineFailureNotifier

    alerts = {"webhook": {"url": "http://127.0.0.1:9/hooks"}}
    dags = _build_with_alerts(tmp_path, alerts)
    assert {"churn_training", "churn_features", "churn_rollback", "churn_monitoring"} <= set(dags)
    for dag_id, dag in dags.items():
        assert dag.tasks, dag_id
        for task in dag.tasks:
            [notifier] = task.on_failure_callback
            assert isinstance(notifier, PipelineFailureNotifier), f"{dag_id}.{task.task_id}"
            assert notifier.pipeline == "churn"
            assert notifier.config == AlertsConfig.model_validate(alerts)
        # What the scheduler and the DAG processor see: the task has a failure callback.
        serialized = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
        assert all(task.has_on_failure_callback for task in serialized.tasks), dag_id


def test_no_task_has_a_failure_callback_without_alerts_that_take_it(dagbag, tmp_path):
    assert all(not task.on_failure_callback for dag in dagbag.dags.values()
               for task in dag.tasks), "the demo spec has no alerts"
    no_failures = _build_with_alerts(tmp_path, {"events": ["rollback", "quarantine"],
                                                "webhook": {"url": "http://127.0.0.1:9/x"}})
    assert all(not task.on_failure_callback for dag in no_failures.values()
               for task in dag.tasks)
