"""A container killed in the middle of a deploy (docker target), under steady load.

Version 1 of the tiny versioned service serves from a container behind the stable address;
version 2 is deployed while clients call; as soon as version 2's container runs, the engine
kills it. The deploy must fail at readiness, naming the container's exit, with version 1
answering every request throughout and the recorded state unchanged. In a pipeline run that
failure fails the deploy task, whose failure callback sends ``task_failed``
(tests/unit/test_notifiers.py runs that callback in a real ``airflow dags test``).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest
from chaos_kit import FaultResult, LoadGenerator, failure_streak, wait_for
from versioned_service_fixtures import V1, V2

from airmlops.serving.deploy import (
    LABEL_DEPLOYMENT,
    DeployFailed,
    deploy,
    free_port,
    load_state,
    undeploy,
)

pytestmark = pytest.mark.integration

PIPELINE = "container_chaos"
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
GOLDEN = [{"x": 1.0}]


def test_a_container_killed_mid_deploy_leaves_the_old_version_serving(
        tmp_path: Path, versioned_images: dict[str, str], chaos_results) -> None:
    from airmlops.serving.docker_engine import docker_client

    client = docker_client(timeout=120)
    port = free_port()
    common = dict(root=tmp_path, proxy_port=port, latency_budget_ms=2000, docker_client=client,
                  supervise=False)
    try:
        deploy(PIPELINE, "1", versioned_images[V1], "docker", GOLDEN, ready_timeout=120,
               now=NOW, **common)
        before = load_state(PIPELINE, tmp_path)
        serving = {c.id for c in client.containers.list(
            filters={"label": f"{LABEL_DEPLOYMENT}={before['deployment_id']}"})}
        outcome: dict[str, BaseException | None] = {}

        def deploy_v2() -> None:
            try:
                deploy(PIPELINE, "2", versioned_images[V2], "docker", GOLDEN, ready_timeout=120,
                       now=NOW, **common)
                outcome["error"] = None
            except BaseException as exc:
                outcome["error"] = exc

        with LoadGenerator(f"http://127.0.0.1:{port}", [], body={"x": 2.0}) as load:
            time.sleep(1.0)
            fault_at = time.monotonic()
            thread = threading.Thread(target=deploy_v2, daemon=True)
            thread.start()
            new = wait_for(lambda: [c for c in client.containers.list(
                filters={"label": f"{LABEL_DEPLOYMENT}={before['deployment_id']}"})
                if c.id not in serving], 120, "version 2's container to run", interval=0.05)
            new[0].kill()
            thread.join(timeout=180)
            time.sleep(1.0)
        answers = load.since(fault_at)
        assert len(answers) > 20, "the load generator sent too little to judge"
        failed, streak, _first, _recovered = failure_streak(answers)
        error = outcome.get("error")
        chaos_results.append(FaultResult(
            "a model container killed mid-deploy (docker)", len(answers), failed, streak, 0.0,
            "none (state unchanged)" if load_state(PIPELINE, tmp_path) == before else "STATE",
            "task_failed (the deploy task's failure callback)",
            "old version keeps serving, deploy fails clearly"))
        assert isinstance(error, DeployFailed), error
        assert error.stage == "readiness" and "exited before it was ready" in str(error)
        assert failed == 0, [a for a in answers if not a.ok][:5]
        assert load_state(PIPELINE, tmp_path) == before
        assert not [c for c in client.containers.list(all=True, filters={
            "label": f"{LABEL_DEPLOYMENT}={before['deployment_id']}"}) if c.id not in serving]
    finally:
        undeploy(PIPELINE, tmp_path, docker_client=client)
