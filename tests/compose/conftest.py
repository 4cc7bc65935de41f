"""The compose stack (docker-compose.yaml + docker-compose.host.yaml) brought up for real.

``compose_images`` runs scripts/ensure-compose.sh (docker-compose, the engine, the local base,
Postgres and Redis images, the wheelhouse and the airmlops image; each built only when missing
or changed) and fails loudly if it cannot. ``compose_stack`` starts a stack under a project name
of its own, on free loopback ports, with a small copy of the demo spec (named ``churn``, so the
DAG is ``churn_training``) on a free stable port, waits (bounded) until every service is healthy
and, whatever happens, stops the deployed model services, takes the stack down with its volumes
and removes any model container it started (unless AIRMLOPS_COMPOSE_KEEP=1: then the stack
is left running for inspection and its project name and .env are printed).
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack_helpers import (
    ADMIN_USER,
    ENSURE_TIMEOUT_S,
    GIT_COMMIT,
    HEALTH_TIMEOUT_S,
    MLFLOW_ADMIN,
    REPO_ROOT,
    ComposeStack,
    free_port,
    images_of,
    model_containers,
    report,
    teardown,
    wait_healthy,
    write_spec,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "compose: brings the docker-compose stack up on the local Docker engine"
    )


@pytest.fixture(scope="session")
def compose_images() -> dict[str, str]:
    """scripts/ensure-compose.sh: everything the stack needs, built when missing or changed."""
    started = time.monotonic()
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "ensure-compose.sh")],
                            capture_output=True, text=True, timeout=ENSURE_TIMEOUT_S, check=False)
    if result.returncode != 0:
        pytest.fail(f"scripts/ensure-compose.sh failed ({result.returncode}):\n"
                    f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    images = dict(line.removeprefix("image ").split("=", 1)
                  for line in result.stdout.splitlines() if line.startswith("image "))
    for line in result.stdout.splitlines():
        if line.startswith("ensure-compose:"):
            report(line)
    report(f"ensure-compose.sh took {time.monotonic() - started:.0f} s")
    wanted = {"AIRMLOPS_IMAGE", "POSTGRES_IMAGE", "REDIS_IMAGE", "BASE_IMAGE", "MODEL_BASE_IMAGE"}
    assert wanted <= set(images), images
    images["_seconds"] = f"{time.monotonic() - started:.1f}"
    return images


@pytest.fixture(scope="module")
def compose_stack(compose_images: dict[str, str]) -> Iterator[ComposeStack]:
    """The stack on free ports, healthy; taken down with its volumes and model containers."""
    # Not under pytest's tmp_path: the airflow user (uid 50000) in the containers must read the
    # pipelines folder, and /tmp/pytest-of-root is private to root.
    workdir = Path(tempfile.mkdtemp(prefix="airmlops-compose-"))
    workdir.chmod(0o755)
    pipelines = workdir / "pipelines"
    pipelines.mkdir(mode=0o755)
    ports = {name: free_port() for name in ("airflow", "mlflow", "postgres", "redis", "stable")}
    write_spec(pipelines, ports["stable"])
    password = secrets.token_urlsafe(16)
    # Hex: these go into connection URLs.
    redis_password, mlflow_password = secrets.token_hex(16), secrets.token_hex(16)
    env_file = workdir / ".env"
    settings = {
        "AIRMLOPS_ENV_FILE": env_file,
        "AIRMLOPS_IMAGE": compose_images["AIRMLOPS_IMAGE"],
        "POSTGRES_IMAGE": compose_images["POSTGRES_IMAGE"],
        "REDIS_IMAGE": compose_images["REDIS_IMAGE"],
        "BASE_IMAGE": compose_images["BASE_IMAGE"],
        "PIP_SOURCE": "wheelhouse",
        "MODEL_BASE_IMAGE": compose_images["MODEL_BASE_IMAGE"],
        "DOCKER_GID": os.stat("/var/run/docker.sock").st_gid,
        "AIRFLOW_FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        "AIRFLOW_API_SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW_JWT_SECRET": secrets.token_urlsafe(32),
        "_AIRFLOW_WWW_USER_USERNAME": ADMIN_USER,
        "_AIRFLOW_WWW_USER_PASSWORD": password,
        "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "MLFLOW_DB_PASSWORD": secrets.token_urlsafe(16),
        "REDIS_PASSWORD": redis_password,
        "MLFLOW_ADMIN_USERNAME": MLFLOW_ADMIN,
        "MLFLOW_ADMIN_PASSWORD": mlflow_password,
        "MLFLOW_SECRET_KEY": secrets.token_hex(32),
        "AIRFLOW_API_PORT": ports["airflow"],
        "MLFLOW_PORT": ports["mlflow"],
        "POSTGRES_PORT": ports["postgres"],
        "REDIS_PORT": ports["redis"],
        "AIRMLOPS_PIPELINES_DIR": pipelines,
        "AIRFLOW_WORKER_CONCURRENCY": 2,
        "MLOPS_GIT_COMMIT": GIT_COMMIT,
    }
    env_file.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    env_file.chmod(0o644)  # read by compose only; the containers get it through env_file
    stack = ComposeStack(project=f"airmlops-compose-{secrets.token_hex(4)}", env_file=env_file,
                         workdir=workdir, ports=ports, password=password,
                         redis_password=redis_password, mlflow_password=mlflow_password)
    stack.timings["ensure"] = float(compose_images["_seconds"])
    report(f"project {stack.project}: Airflow {stack.airflow_url}, MLflow {stack.mlflow_url}, "
           f"stable address {stack.stable_url}")
    started_containers: set[str] = set()
    try:
        started = time.monotonic()
        stack.compose("up", "-d", timeout=HEALTH_TIMEOUT_S + 300)
        stack.timings["up"] = time.monotonic() - started
        report(f"`up -d` returned after {stack.timings['up']:.0f} s")
        stack.timings["healthy"] = stack.timings["up"] + wait_healthy(stack)
        report(f"every service healthy {stack.timings['healthy']:.0f} s after `up`")
        yield stack
    finally:
        if os.environ.get("AIRMLOPS_COMPOSE_KEEP") == "1":
            report(f"AIRMLOPS_COMPOSE_KEEP=1: left running; take it down with\n  "
                   f"{' '.join(stack.compose_args())} down -v")
        else:
            started_containers |= model_containers(stack)
            teardown(stack, started_containers, images_of(started_containers))
            shutil.rmtree(workdir, ignore_errors=True)
