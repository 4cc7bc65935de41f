"""The training DAG's order that ``training.refit`` relies on: the model is logged in ``train``,
gated in ``validate_model`` (a short circuit: not blessed skips the rest), and refit and
registered in ``register``, which runs only after both."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = REPO_ROOT / "include" / "pipelines" / "churn.yaml"


def test_register_refits_only_after_the_gates_blessed_the_logged_model():
    from airflow.providers.standard.operators.python import ShortCircuitOperator

    from airmlops.dags.training import build_training_dag
    from airmlops.spec import load_spec

    dag = build_training_dag(load_spec(SPEC_PATH), SPEC_PATH)
    register, gates = dag.task_dict["register"], dag.task_dict["validate_model"]
    assert register.upstream_task_ids == {"train", "validate_model"}
    assert "train" in gates.upstream_task_ids
    # A short circuit that skips every downstream task, whatever its trigger rule: a refused
    # challenger never reaches register, so it is never refit.
    assert isinstance(gates, ShortCircuitOperator) and gates.ignore_downstream_trigger_rules
    assert register.trigger_rule == "all_success"
