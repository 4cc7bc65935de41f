"""Scaling out on the compose stack: three Celery worker replicas share the work.

The session stack runs ``airflow-worker`` with 3 replicas (``up --scale airflow-worker=3``).

- Three pipelines (copies of the small spec named ``churn_a``, ``churn_b``, ``churn_c``) are
  triggered at once through the REST API (``skip_deploy``: ingest to registry, no image or
  container); all three training runs succeed, and their task
  instances ran on at least two distinct worker replicas. Which replica ran a task instance is
  read from each replica's own container log (a worker logs every workload it executes, with its
  ``run_id=.../task_id=.../`` log path); the task instances' ``hostname`` from the API is
  cross-checked against the replicas' container hostnames. (The workers run on the host's
  network, so every replica has the host's name: the hostname says "a worker of this stack",
  the container log says which one.)
- The per-pipeline deploy lock is one lock across the replicas: held in one worker container,
  it is refused to another, and granted once released (it lives on the shared data volume).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import time

import pytest
from stack_helpers import (
    ADMIN_USER,
    GIT_COMMIT,
    SCALE_PIPELINES,
    WORKER,
    WORKERS,
    AirflowApi,
    ComposeStack,
    report,
)

pytestmark = [pytest.mark.compose, pytest.mark.timeout(3600)]

RUN_TIMEOUT_S = 1800
TASK_LOG_PATH = re.compile(r"run_id=([A-Za-z0-9_.:+-]+)/task_id=([A-Za-z0-9_.]+)/")


def container_hostname(container: str) -> str:
    return subprocess.run(["docker", "exec", container, "hostname"], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()


def workloads_run_by(container: str) -> set[tuple[str, str]]:
    """``(run_id, task_id)`` of every workload the worker in ``container`` executed."""
    log = subprocess.run(["docker", "logs", container], capture_output=True, text=True,
                         timeout=120, check=True)
    lines = (log.stdout + log.stderr).splitlines()
    return {match.groups() for line in lines if "Executing workload" in line
            for match in TASK_LOG_PATH.finditer(line)}


def test_three_pipelines_train_at_once_on_several_workers(compose_stack: ComposeStack):
    stack = compose_stack
    replicas = stack.replica_ids(WORKER)
    assert len(replicas) == WORKERS, replicas
    nodes = {container: subprocess.run(
        ["docker", "exec", container, "sh", "-c", 'cat "$AIRFLOW_HOME/celery-node"'],
        capture_output=True, text=True, timeout=60, check=True).stdout.strip()
        for container in replicas}
    assert len(set(nodes.values())) == WORKERS, nodes  # each replica is its own Celery node
    report(f"worker replicas: {json.dumps(nodes)}")

    api = AirflowApi(stack.airflow_url, ADMIN_USER, stack.password)
    runs = {f"{name}_training": f"scale-{secrets.token_hex(4)}-{name}"
            for name in SCALE_PIPELINES}
    try:
        for dag_id in runs:
            api.wait_for_dag(dag_id, timeout=300)
        started = time.monotonic()
        for dag_id, run_id in runs.items():
            # Up to the registry: packaging and deploying in containers is the main stack
            # test's (and the lock test below shows deploys exclusive across replicas).
            api.trigger(dag_id, run_id, conf={"git_commit": GIT_COMMIT, "skip_deploy": True})
        report(f"triggered {len(runs)} training runs at once: {sorted(runs.values())}")
        states = {dag_id: api.follow(dag_id, run_id, timeout=RUN_TIMEOUT_S)
                  for dag_id, run_id in runs.items()}
        report(f"{len(runs)} runs done in {time.monotonic() - started:.0f} s: {states}")
        for dag_id, state in states.items():
            assert state == "success", api.failed_task_logs(dag_id, runs[dag_id])
        task_instances = [ti for dag_id, run_id in runs.items()
                          for ti in api.task_instances(dag_id, run_id)
                          if ti["state"] == "success"]
    finally:
        api.close()

    # Which replica executed each task instance, from the replicas' own logs.
    ran_by = {container: workloads_run_by(container) & {
        (ti["dag_run_id"], ti["task_id"]) for ti in task_instances} for container in replicas}
    executed = set().union(*ran_by.values())
    expected = {(ti["dag_run_id"], ti["task_id"]) for ti in task_instances}
    assert executed == expected, sorted(expected - executed)
    busy = {nodes[container]: len(pairs) for container, pairs in ran_by.items() if pairs}
    report(f"task instances per worker: {busy}")
    assert len(busy) >= 2, f"all {len(expected)} task instances ran on one worker: {busy}"

    # The hostname each task instance recorded is a worker replica's.
    worker_hostnames = {container_hostname(container) for container in replicas}
    recorded = {ti["hostname"] for ti in task_instances}
    assert recorded <= worker_hostnames, (recorded, worker_hostnames)


HOLD_LOCK = """
import sys
from pathlib import Path
from airmlops.serving.deploy.state import locked
from airmlops.settings import Settings
with locked(sys.argv[1], Path(Settings().data_root)):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin
print("released", flush=True)
"""

TRY_LOCK = """
import fcntl, sys
from pathlib import Path
from airmlops.serving.deploy.state import deployment_dir
from airmlops.settings import Settings
path = deployment_dir(sys.argv[1], Path(Settings().data_root)) / ".lock"
with open(path, "a+") as handle:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print("busy")
    else:
        print("acquired")
"""


def test_deploy_lock_holds_across_worker_containers(compose_stack: ComposeStack):
    """Two replicas never deploy one pipeline at once: the pipeline's lock, taken in one worker
    container, is refused in another until the first releases it."""
    first, second, *_ = compose_stack.replica_ids(WORKER)
    pipeline = f"lockprobe_{secrets.token_hex(3)}"

    def try_lock() -> str:
        return subprocess.run(["docker", "exec", second, "python", "-c", TRY_LOCK, pipeline],
                              capture_output=True, text=True, timeout=120,
                              check=True).stdout.strip()

    holder = subprocess.Popen(["docker", "exec", "-i", first, "python", "-c", HOLD_LOCK,
                               pipeline], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "held", holder.stderr.read() if (
            holder.poll() is not None and holder.stderr) else "holder did not take the lock"
        assert try_lock() == "busy"
        holder.stdin.close()
        assert holder.stdout.readline().strip() == "released"
        assert holder.wait(timeout=60) == 0
        assert try_lock() == "acquired"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=30)
