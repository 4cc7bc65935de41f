"""Readiness of the platform: MLflow answering ``/health``, every Airflow component healthy.

The waits fail early, with the component's log tail, when a watched process dies instead of
running into their timeout.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from airmlops.platform.airflow_api import http_client
from airmlops.platform.config import (
    AIRFLOW_COMPONENTS,
    HEALTH_KEYS,
    MLFLOW,
    PlatformConfig,
    PlatformError,
    Progress,
    say,
)
from airmlops.platform.supervise import is_alive, log_tail, read_record


def airflow_health(base_url: str) -> dict[str, str] | None:
    """``{component: status}`` from ``/api/v2/monitor/health``; None if it does not answer."""
    import httpx

    try:
        with http_client(5.0) as client:
            response = client.get(f"{base_url}/api/v2/monitor/health")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    body = response.json()
    return {key: str((body.get(key) or {}).get("status")) for key in HEALTH_KEYS}


def mlflow_ready(tracking_uri: str) -> bool:
    """True if the MLflow server answers ``/health``."""
    import httpx

    try:
        with http_client(5.0) as client:
            return client.get(f"{tracking_uri.rstrip('/')}/health").status_code == 200
    except httpx.HTTPError:
        return False


def _wait(
    what: str,
    check: Callable[[], tuple[bool, str]],
    *,
    timeout: float,
    run_dir: Path,
    watched: Sequence[str],
    progress: Progress,
    every: float = 5.0,
) -> float:
    """Poll ``check`` until it passes; fail early if a watched process dies. Returns seconds."""
    start = time.monotonic()
    last_report = start
    detail = ""
    while True:
        ok, detail = check()
        elapsed = time.monotonic() - start
        if ok:
            return elapsed
        for name in watched:
            if not is_alive(read_record(run_dir, name)):
                raise PlatformError(
                    f"{name} exited while waiting for {what}\n{log_tail(run_dir, name)}"
                )
        if elapsed > timeout:
            tails = "\n".join(log_tail(run_dir, n, 15) for n in watched)
            raise PlatformError(f"{what} not ready after {timeout:.0f} s ({detail})\n{tails}")
        if time.monotonic() - last_report >= every:
            progress(f"waiting for {what} ({elapsed:.0f} s): {detail}")
            last_report = time.monotonic()
        time.sleep(0.5)


def wait_mlflow(config: PlatformConfig, timeout: float = 120.0, progress: Progress = say) -> float:
    """Wait until the platform's MLflow answers ``/health``. Returns the seconds waited."""
    watched = () if config.external_mlflow_uri else (MLFLOW,)
    return _wait(
        f"MLflow at {config.mlflow_url}",
        lambda: (mlflow_ready(config.mlflow_url), "not answering yet"),
        timeout=timeout,
        run_dir=config.run_dir,
        watched=watched,
        progress=progress,
    )


def wait_airflow_healthy(
    config: PlatformConfig, timeout: float = 240.0, progress: Progress = say
) -> float:
    """Wait until every Airflow component reports healthy. Returns the seconds waited."""

    def check() -> tuple[bool, str]:
        health = airflow_health(config.airflow_url)
        if health is None:
            return False, "api-server not answering yet"
        unhealthy = {k: v for k, v in health.items() if v != "healthy"}
        return not unhealthy, ", ".join(f"{k}={v}" for k, v in unhealthy.items())

    return _wait(
        f"Airflow at {config.airflow_url}",
        check,
        timeout=timeout,
        run_dir=config.run_dir,
        watched=AIRFLOW_COMPONENTS,
        progress=progress,
    )
