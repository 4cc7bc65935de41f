"""A test's client of a platform's Airflow 3 REST API: trigger runs, wait for them, read them.

Shared by the integration and e2e tests that drive a platform started by ``platform_fixtures``
(and imported like it: ``tests/`` is on ``sys.path`` through the root conftest). Every call
asserts its answer's status, so a refused call fails the test with Airflow's answer; a run that
ends ``failed`` fails the test with the log tails of its failed task instances, read from the
platform's log folder.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from airmlops.platform import Platform, api_token

TERMINAL_RUN_STATES = ("success", "failed")
FAILED_TASK_STATES = ("failed", "up_for_retry")


class AirflowClient:
    """``/api/v2`` of one Airflow API server with a bearer JWT, and where its task logs are.

    ``progress``, when given, receives a line about a run still going every ``progress_every``
    seconds of :meth:`wait`.
    """

    def __init__(self, base_url: str, token: str, logs_dir: Path,
                 progress: Callable[[str], None] | None = None) -> None:
        self.base_url, self.token, self.logs_dir = base_url, token, logs_dir
        self.progress = progress

    @classmethod
    def for_platform(cls, platform: Platform,
                     progress: Callable[[str], None] | None = None) -> AirflowClient:
        """A client of ``platform``'s API server, with a JWT from ``POST /auth/token``."""
        token = api_token(platform.base_url, platform.username, platform.password)
        return cls(platform.base_url, token, platform.run_dir / "airflow" / "logs", progress)

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """``method`` on ``/api/v2{path}``, authorized, with a 30 s timeout; not checked."""
        headers = {"Authorization": f"Bearer {self.token}", **kwargs.pop("headers", {})}
        return httpx.request(method, f"{self.base_url}/api/v2{path}",
                             headers=headers, timeout=30, **kwargs)

    def get_json(self, path: str, **kwargs: Any) -> Any:
        """The JSON body of ``GET /api/v2{path}``, asserting a 200."""
        response = self.api("GET", path, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def post_json(self, path: str, body: Any) -> Any:
        """The JSON body of ``POST /api/v2{path}`` with ``body``, asserting a 200."""
        response = self.api("POST", path, json=body)
        assert response.status_code == 200, response.text
        return response.json()

    def trigger(self, dag_id: str, run_id: str, start: dt.datetime, end: dt.datetime, *,
                logical_date: dt.datetime | None = None,
                conf: dict[str, Any] | None = None) -> dict[str, Any]:
        """Trigger run ``run_id`` of ``dag_id`` on the data interval ``[start, end)``; its
        logical date is ``end`` unless given. The scheduler runs it (if the DAG is unpaused)."""
        return self.post_json(f"/dags/{dag_id}/dagRuns", {
            "dag_run_id": run_id, "logical_date": (logical_date or end).isoformat(),
            "data_interval_start": start.isoformat(), "data_interval_end": end.isoformat(),
            "conf": dict(conf or {})})

    def run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.get_json(f"/dags/{dag_id}/dagRuns/{run_id}")

    def runs(self, dag_id: str, limit: int = 100) -> list[dict[str, Any]]:
        """The DAG's runs (the first ``limit``)."""
        return self.get_json(f"/dags/{dag_id}/dagRuns", params={"limit": limit})["dag_runs"]

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.get_json(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        return {ti["task_id"]: ti["state"] for ti in self.task_instances(dag_id, run_id)}

    def durations(self, dag_id: str, run_id: str) -> dict[str, float]:
        """Seconds each task instance of the run took (0 if it has not run), to 0.1 s."""
        return {ti["task_id"]: round(ti["duration"] or 0.0, 1)
                for ti in self.task_instances(dag_id, run_id)}

    def task_log(self, dag_id: str, run_id: str, task_id: str) -> str:
        """The task's log files (every attempt, the last 6000 characters of each), read where
        the platform writes them."""
        folder = (self.logs_dir / f"dag_id={dag_id}" / f"run_id={run_id}"
                  / f"task_id={task_id}")
        return "\n".join(path.read_text(errors="replace")[-6000:]
                         for path in sorted(folder.glob("attempt=*.log")))

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        """The value the task returned."""
        return self.get_json(f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/"
                             f"{task_id}/xcomEntries/return_value")["value"]

    def wait(self, dag_id: str, run_id: str, *, timeout: float,
             progress_every: float = 30.0) -> float:
        """Poll the run every second until it ends; return the seconds waited.

        Fails the test if it is still going after ``timeout`` seconds (with its task states), or
        if it ends ``failed`` (with its task states and the logs of its failed tasks).
        """
        started = time.monotonic()
        reported = started
        while True:
            state = self.run(dag_id, run_id)["state"]
            if state in TERMINAL_RUN_STATES:
                break
            assert time.monotonic() - started < timeout, (
                f"{dag_id} {run_id} still {state} after {timeout} s: "
                f"{self.task_states(dag_id, run_id)}")
            if self.progress is not None and time.monotonic() - reported >= progress_every:
                reported = time.monotonic()
                self.progress(f"{dag_id} {run_id} {state} after {reported - started:.0f} s: "
                              f"{self.task_states(dag_id, run_id)}")
            time.sleep(1.0)
        if state != "success":
            states = self.task_states(dag_id, run_id)
            failed = [t for t, s in states.items() if s in FAILED_TASK_STATES]
            logs = "\n".join(f"--- {t}\n{self.task_log(dag_id, run_id, t)}" for t in failed)
            pytest.fail(f"{dag_id} run {run_id} {state}: {states}\n{logs}")
        return time.monotonic() - started
