"""The compose stack (docker-compose.yaml + docker-compose.host.yaml) brought up for real.

``compose_images`` runs scripts/ensure-compose.sh (docker-compose, the engine, the local base,
Postgres and Redis images, the wheelhouse and the airmlops image; each built only when missing
or changed) and fails loudly if it cannot. ``compose_stack`` (once per session) starts a stack
under a project name of its own, on free loopback ports, with 3 Celery worker replicas and small
copies of the demo spec (``churn``, so the DAG is ``churn_training``, and three more for the
scale-out test), each on a free stable port, waits (bounded) until every service, each worker
replica included, is healthy and, whatever happens, stops the deployed model services, takes the
stack down with its volumes and removes any model container it started (unless
AIRMLOPS_COMPOSE_KEEP=1: then the stack is left running for inspection and its project name and
.env are printed).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from stack_helpers import (
    PIPELINE,
    SCALE_PIPELINES,
    WORKERS,
    ComposeStack,
    ensure_images,
    report,
    start_stack,
    stop_stack,
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "compose: brings the docker-compose stack up on the local Docker engine"
    )


@pytest.fixture(scope="session")
def compose_images() -> dict[str, str]:
    """scripts/ensure-compose.sh: everything the stack needs, built when missing or changed."""
    try:
        return ensure_images()
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def compose_stack(compose_images: dict[str, str]) -> Iterator[ComposeStack]:
    """The stack on free ports with 3 Celery workers, healthy; taken down with its volumes and
    model containers."""
    stack = start_stack(compose_images, pipelines=(PIPELINE, *SCALE_PIPELINES), workers=WORKERS)
    stack.timings["ensure"] = float(compose_images["_seconds"])
    try:
        yield stack
    finally:
        if os.environ.get("AIRMLOPS_COMPOSE_KEEP") == "1":
            report(f"AIRMLOPS_COMPOSE_KEEP=1: left running; take it down with\n  "
                   f"{' '.join(stack.compose_args())} down -v")
        else:
            stop_stack(stack)
