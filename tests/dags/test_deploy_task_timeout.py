"""The deploy task's timeout follows the spec's deploy section: long enough for every server to
start, the strategy's trial held as long as it can be and a manual shadow's wait for a
decision, so a slow rollout is never killed midway, and a hung one is."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from airmlops.spec_deploy import DEPLOY_TASK_MARGIN_SECONDS

REPO_ROOT = Path(__file__).resolve().parents[2]
SPEC_PATH = REPO_ROOT / "include" / "pipelines" / "churn.yaml"


def deploy_timeout(**deploy: object) -> dt.timedelta:
    """The deploy task's timeout in the training DAG of the demo spec with ``deploy`` set."""
    from airmlops.dags.training import build_training_dag
    from airmlops.spec import load_spec

    spec = load_spec(SPEC_PATH)
    spec = spec.model_copy(update={"deploy": spec.deploy.model_validate(
        {**spec.deploy.model_dump(), **deploy})})
    return build_training_dag(spec, SPEC_PATH).task_dict["deploy"].execution_timeout


@pytest.mark.parametrize(("deploy", "trial"), [
    ({"strategy": "blue_green"}, 0.0),
    ({"strategy": "canary", "canary_steps": [10, 50, 100], "canary_step_seconds": 120.0},
     2 * 3 * 120.0),
    ({"strategy": "shadow", "shadow_seconds": 300.0}, 2 * 300.0),
    ({"strategy": "shadow", "shadow_seconds": 300.0, "shadow_promotion": "manual",
      "shadow_decision_timeout_seconds": 7200.0}, 2 * 300.0 + 7200.0),
])
def test_the_deploy_timeout_covers_the_strategys_longest_run(deploy: dict, trial: float) -> None:
    settings = {"ready_timeout_seconds": 90.0, "replicas": 2, "spares": 1, **deploy}
    servers = (2 + 1 + 1) * 90.0  # live servers, spares and one restart, one after another
    assert deploy_timeout(**settings) == dt.timedelta(
        seconds=servers + trial + DEPLOY_TASK_MARGIN_SECONDS)


def test_a_longer_decision_wait_lengthens_the_timeout_by_as_much() -> None:
    short = deploy_timeout(strategy="shadow", shadow_promotion="manual",
                           shadow_decision_timeout_seconds=600.0)
    long = deploy_timeout(strategy="shadow", shadow_promotion="manual",
                          shadow_decision_timeout_seconds=86400.0)
    assert long - short == dt.timedelta(seconds=86400.0 - 600.0)

