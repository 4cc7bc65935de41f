"""The production stack end to end: docker-compose up, the demo training DAG through it, a
prediction at the stable address, and down.

On the local engine (host network, see docker-compose.host.yaml), the stack runs PostgreSQL,
Redis, MLflow on PostgreSQL and Airflow with the CeleryExecutor. ``churn_training`` is triggered
through the REST API (a JWT from ``POST /auth/token``) and followed to its end; then:

- every task ran on the Celery worker (one Celery result per task instance in the result
  backend, and the worker's log names the workloads it ran);
- MLflow, on PostgreSQL, has the registered version with the ``champion`` alias, its image id
  and a docker deployment recorded on it;
- the stable address answers a prediction from that version, served by a model container the
  deploy stage started through the worker's Docker socket, with Redis as online store;

and the fixture takes it all down. The stack is started with generated secrets only (it has no
default password), and what an attacker tried against the old defaults is refused: MLflow
answers 401 without credentials, Redis answers NOAUTH to a PING without its password, and
Airflow's FAB auth manager refuses the old ``airflow``/``airflow`` login. Timings are printed
(``pytest -s`` shows them as they come).
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import time

import httpx
import pytest
from stack_helpers import (
    ADMIN_USER,
    DEPLOYMENT_LABEL,
    GIT_COMMIT,
    MLFLOW_ADMIN,
    PIPELINE,
    AirflowApi,
    ComposeStack,
    report,
)

pytestmark = [pytest.mark.compose, pytest.mark.timeout(3600)]

DAG_ID = f"{PIPELINE}_training"
RUN_TIMEOUT_S = 1200
STAGES = ("ingest", "validate_data", "preprocess", "train", "validate_model", "register",
          "containerize", "deploy", "monitor")


def psql(stack: ComposeStack, database: str, query: str) -> str:
    """One value from the stack's PostgreSQL (over its unix socket, inside the container)."""
    return stack.exec("postgres", "psql", "-U", "airflow", "-d", database, "-tAc", query).strip()


def running_model_containers(image_tag: str) -> list[str]:
    """Running containers of ``image_tag`` that carry a deployment label."""
    out = subprocess.run(["docker", "ps", "-q", "--filter", f"ancestor={image_tag}",
                          "--filter", f"label={DEPLOYMENT_LABEL}"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return out.split()


def test_default_credentials_are_refused(compose_stack: ComposeStack):
    """The old defaults get nothing: no MLflow without a login, no Redis without its password,
    no Airflow token for airflow/airflow (and nothing is created by the attempts)."""
    import redis

    stack = compose_stack
    experiments = f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search"
    anonymous = httpx.get(experiments, params={"max_results": 10}, trust_env=False, timeout=60)
    assert anonymous.status_code == 401, anonymous.text
    created = httpx.post(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/create", trust_env=False,
                         timeout=60, json={"name": "attacker"})
    assert created.status_code == 401, created.text
    admin = (MLFLOW_ADMIN, stack.mlflow_password)
    for guess in (("admin", "password"), ("admin", "admin"), (MLFLOW_ADMIN, "mlflow")):
        assert httpx.get(experiments, params={"max_results": 10}, auth=guess, trust_env=False,
                         timeout=60).status_code == 401, guess
    listed = httpx.get(experiments, params={"max_results": 100}, auth=admin, trust_env=False,
                       timeout=60)
    assert listed.status_code == 200, listed.text
    assert "attacker" not in {e["name"] for e in listed.json().get("experiments", [])}

    # A bare client, as an attacker would type it: PING and SET without AUTH get NOAUTH.
    for command in (b"PING\r\n", b"SET attacker 1\r\n"):
        with socket.create_connection(("127.0.0.1", stack.ports["redis"]), timeout=30) as raw:
            raw.sendall(command)
            reply = raw.recv(256)
        assert reply.startswith(b"-NOAUTH"), (command, reply)
    guessed = redis.Redis(host="127.0.0.1", port=stack.ports["redis"], password="redis",
                          socket_timeout=30)
    try:
        with pytest.raises(redis.exceptions.AuthenticationError, match="invalid username-password"):
            guessed.ping()
    finally:
        guessed.close()
    owner = redis.Redis(host="127.0.0.1", port=stack.ports["redis"],
                        password=stack.redis_password, socket_timeout=30)
    try:
        assert owner.ping() is True
        assert owner.exists("attacker") == 0
    finally:
        owner.close()

    for username, password in (("airflow", "airflow"), (ADMIN_USER, "airflow"),
                               ("admin", "admin")):
        token = httpx.post(f"{stack.airflow_url}/auth/token", trust_env=False, timeout=120,
                           json={"username": username, "password": password})
        assert token.status_code in (401, 403), (username, token.status_code, token.text)
        assert "access_token" not in token.text
    api = httpx.get(f"{stack.airflow_url}/api/v2/dags", trust_env=False, timeout=120)
    assert api.status_code == 401, api.text


def test_training_dag_runs_on_celery_and_deploys_a_container(
        compose_stack: ComposeStack, monkeypatch: pytest.MonkeyPatch):
    stack = compose_stack
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.mlflow_password)
    api = AirflowApi(stack.airflow_url, ADMIN_USER, stack.password)
    try:
        api.wait_for_dag(DAG_ID, timeout=300)
        run_id = f"compose-test-{secrets.token_hex(4)}"
        api.trigger(DAG_ID, run_id, conf={"git_commit": GIT_COMMIT})
        report(f"triggered {DAG_ID} run {run_id}")
        started = time.monotonic()
        state = api.follow(DAG_ID, run_id, timeout=RUN_TIMEOUT_S)
        stack.timings["dag run"] = time.monotonic() - started
        report(f"run {run_id} {state} in {stack.timings['dag run']:.0f} s")
        assert state == "success", api.failed_task_logs(DAG_ID, run_id)
        task_instances = api.task_instances(DAG_ID, run_id)
        executor = api.request("GET", "/api/v2/config/sections/core/options/executor",
                               ok=(200, 403, 404), headers={"Accept": "text/plain"})
    finally:
        api.close()

    # Every stage ran, and through Celery: one result per task in the Celery result backend
    # (only the CeleryExecutor writes there), and the worker's log shows the workloads.
    succeeded = {ti["task_id"] for ti in task_instances if ti["state"] == "success"}
    assert set(STAGES) <= succeeded, sorted(succeeded)
    # The worker stores a workload's result after the task has reported its own state, so the
    # last task's result may land a moment after the run is marked done: poll, bounded.
    deadline = time.monotonic() + 60
    while True:
        celery_results = int(psql(stack, "airflow",
                                  "SELECT count(*) FROM celery_taskmeta WHERE status = 'SUCCESS'"))
        if celery_results >= len(succeeded) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert celery_results >= len(succeeded), (celery_results, sorted(succeeded))
    worker_log = stack.compose("logs", "--no-color", "airflow-worker").stdout
    for stage in STAGES:
        assert f"task_id={stage}/" in worker_log, f"the worker's log never mentions {stage}"
    assert "Task execute_workload[" in worker_log and "succeeded in" in worker_log
    if executor.status_code == 200:  # exposing the config is optional; Celery is proven above
        assert "CeleryExecutor" in executor.text, executor.text

    # MLflow on PostgreSQL: version 1 is the champion, with its image and its deployment.
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_url, registry_uri=stack.mlflow_url)
    champion = client.get_model_version_by_alias(PIPELINE, "champion")
    assert champion.version == "1"
    assert champion.tags["image_id"].startswith("sha256:"), champion.tags
    assert champion.tags["deployed_target"].startswith("docker"), champion.tags
    assert psql(stack, "mlflow",
                f"SELECT count(*) FROM registered_models WHERE name = '{PIPELINE}'") == "1"

    # The stable address answers, from a model container started through the Docker socket,
    # with the online features and the prediction log in Redis (db 1).
    response = httpx.post(f"{stack.stable_url}/predict", trust_env=False, timeout=60,
                          json={"instances": [{"customer_id": "C000010", "tenure_days": 200}]})
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "1", response.text
    assert running_model_containers(champion.tags["image_tag"]), (
        f"no running container of {champion.tags['image_tag']}")
    redis_keys = int(stack.exec("redis", "redis-cli", "-p", str(stack.ports["redis"]),
                                "-n", "1", "dbsize").strip())
    assert redis_keys > 0, "Redis db 1 (online store, prediction log) is empty"

    timings = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stack.timings.items())
    report(f"timings: {timings}")
