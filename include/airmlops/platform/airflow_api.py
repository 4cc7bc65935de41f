"""A small client of Airflow's REST API (v2): a token, DAGs, triggering and following runs.

Every call goes straight to the loopback address (never through a proxy from the
environment) and raises :class:`~airmlops.platform.config.PlatformError` on an error answer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from airmlops.platform.config import PlatformError, Progress, say

DAG_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")
_RUN_ID = re.compile(r"^[A-Za-z0-9_.:+~-]{1,250}$")
_TERMINAL_RUN_STATES = ("success", "failed")


def http_client(timeout: float = 10.0):  # -> httpx.Client
    """An HTTP client for the platform's loopback servers."""
    import httpx

    # trust_env=False: never route loopback calls through a proxy from the environment.
    return httpx.Client(timeout=timeout, trust_env=False)


def _check_dag_id(dag_id: str) -> str:
    if not DAG_ID_PATTERN.fullmatch(dag_id):
        raise ValueError(f"invalid dag_id {dag_id!r}")
    return quote(dag_id, safe="")


def _raise_for(response: Any, what: str) -> None:
    if response.status_code >= 400:
        raise PlatformError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def api_token(base_url: str, username: str, password: str) -> str:
    """A JWT for the REST API from ``POST /auth/token`` (simple auth manager)."""
    with http_client() as client:
        response = client.post(
            f"{base_url}/auth/token", json={"username": username, "password": password}
        )
    _raise_for(response, "POST /auth/token")
    return response.json()["access_token"]


def get_dag(base_url: str, token: str, dag_id: str) -> dict[str, Any] | None:
    """The DAG's REST representation, or None while it is not parsed yet."""
    with http_client() as client:
        response = client.get(
            f"{base_url}/api/v2/dags/{_check_dag_id(dag_id)}", headers=_headers(token)
        )
    if response.status_code == 404:
        return None
    _raise_for(response, f"GET dag {dag_id}")
    return response.json()


def import_errors(base_url: str, token: str) -> list[dict[str, Any]]:
    """DAG files that failed to import, as the DAG processor reported them."""
    with http_client() as client:
        response = client.get(f"{base_url}/api/v2/importErrors", headers=_headers(token))
    _raise_for(response, "GET importErrors")
    return response.json().get("import_errors", [])


def wait_for_dag(
    base_url: str, token: str, dag_id: str, timeout: float = 180.0, progress: Progress = say
) -> dict[str, Any]:
    """Wait until the DAG processor has parsed ``dag_id``; shows import errors while waiting."""
    start = time.monotonic()
    last_report = start
    reported: set[str] = set()
    while True:
        dag = get_dag(base_url, token, dag_id)
        if dag is not None:
            return dag
        for error in import_errors(base_url, token):
            key = f"{error.get('filename')}:{error.get('timestamp')}"
            if key not in reported:
                reported.add(key)
                progress(f"import error in {error.get('filename')}:\n{error.get('stack_trace')}")
        elapsed = time.monotonic() - start
        if elapsed > timeout:
            raise PlatformError(
                f"DAG {dag_id!r} not found after {timeout:.0f} s; is it in the dags folder, "
                "and does its file import? (see the import errors above, if any)"
            )
        if time.monotonic() - last_report >= 10:
            progress(f"waiting for DAG {dag_id} to be parsed ({elapsed:.0f} s)")
            last_report = time.monotonic()
        time.sleep(1.0)


def set_dag_paused(base_url: str, token: str, dag_id: str, paused: bool) -> dict[str, Any]:
    """Pause or unpause a DAG."""
    with http_client() as client:
        response = client.patch(
            f"{base_url}/api/v2/dags/{_check_dag_id(dag_id)}",
            headers=_headers(token),
            json={"is_paused": paused},
        )
    _raise_for(response, f"PATCH dag {dag_id}")
    return response.json()


def trigger_dag(
    base_url: str,
    token: str,
    dag_id: str,
    conf: Mapping[str, Any] | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """Trigger a run (``logical_date`` null: a manual run not tied to a data interval).

    Raises :class:`PlatformError` on any non-2xx answer (409: that run id exists).
    """
    body: dict[str, Any] = {"logical_date": None, "conf": dict(conf or {})}
    if run_id is not None:
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"invalid run id {run_id!r}")
        body["dag_run_id"] = run_id
    with http_client(30.0) as client:
        response = client.post(
            f"{base_url}/api/v2/dags/{_check_dag_id(dag_id)}/dagRuns",
            headers=_headers(token),
            json=body,
        )
    _raise_for(response, f"trigger {dag_id}")
    return response.json()


def run_url(base_url: str, dag_id: str, run_id: str) -> str:
    """The UI page of a DAG run."""
    return f"{base_url}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe=':+')}"


def follow_dag_run(
    base_url: str,
    token: str,
    dag_id: str,
    run_id: str,
    *,
    poll: float = 2.0,
    timeout: float | None = None,
    progress: Progress = say,
) -> str:
    """Follow a run to its end, reporting each task state change. Returns the final run state."""
    dag_path = f"{base_url}/api/v2/dags/{_check_dag_id(dag_id)}/dagRuns/{quote(run_id, safe='')}"
    seen: dict[tuple[str, int], str] = {}
    start = time.monotonic()
    with http_client() as client:
        while True:
            run = client.get(dag_path, headers=_headers(token))
            _raise_for(run, f"GET run {run_id}")
            tasks = client.get(
                f"{dag_path}/taskInstances", headers=_headers(token), params={"limit": 1000}
            )
            _raise_for(tasks, f"GET task instances of {run_id}")
            _report_task_changes(tasks.json().get("task_instances", []), seen, progress)
            state = run.json().get("state")
            if state in _TERMINAL_RUN_STATES:
                return state
            if timeout is not None and time.monotonic() - start > timeout:
                raise PlatformError(f"run {run_id} still {state} after {timeout:.0f} s")
            time.sleep(poll)


def _report_task_changes(
    task_instances: list[dict[str, Any]], seen: dict[tuple[str, int], str], progress: Progress
) -> None:
    """Report each task instance whose state changed since ``seen`` (updated in place)."""
    for ti in task_instances:
        key = (ti["task_id"], ti.get("map_index", -1))
        state = ti.get("state") or "none"
        if seen.get(key) != state:
            seen[key] = state
            label = ti["task_id"] if key[1] < 0 else f"{ti['task_id']}[{key[1]}]"
            if state != "none":
                progress(f"  {label}: {state}")
