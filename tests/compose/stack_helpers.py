"""Helpers of the compose stack test: the stack's handle, health waiting, the spec it serves.

Used by conftest.py (the fixtures) and test_compose_stack.py.
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("docker-compose.yaml", "docker-compose.host.yaml")
PIPELINE = "churn"
ADMIN_USER = "airflow"
MLFLOW_ADMIN = "mlops-admin"
GIT_COMMIT = "0123456789abcdef0123456789abcdef01234567"
SERVICES = (
    "postgres", "redis", "mlflow", "airflow-apiserver", "airflow-scheduler",
    "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
)
"""The long-running services; each has a health check that must pass."""
HEALTH_TIMEOUT_S = 600
ENSURE_TIMEOUT_S = 3600
DEPLOYMENT_LABEL = "ai.airmlops.deployment"


def report(message: str) -> None:
    print(f"[compose] {message}", flush=True)


def free_port() -> int:
    from airmlops.platform import free_port as platform_free_port

    return platform_free_port()


@dataclass
class ComposeStack:
    """A running stack: how to reach it and how to drive docker-compose for it."""

    project: str
    env_file: Path
    workdir: Path
    ports: dict[str, int]
    password: str = field(repr=False)
    redis_password: str = field(repr=False, default="")
    mlflow_password: str = field(repr=False, default="")
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def airflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['airflow']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def stable_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['stable']}"

    def compose_args(self) -> list[str]:
        files = [arg for name in COMPOSE_FILES for arg in ("-f", str(REPO_ROOT / name))]
        return ["docker-compose", "--env-file", str(self.env_file), "-p", self.project, *files]

    def compose(self, *args: str, timeout: float = 300, check: bool = True
                ) -> subprocess.CompletedProcess[str]:
        """Run ``docker-compose <args>`` for this stack; raise with its output if it fails."""
        result = subprocess.run([*self.compose_args(), *args], cwd=REPO_ROOT, text=True,
                                capture_output=True, timeout=timeout, check=False)
        if check and result.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} failed ({result.returncode}):\n"
                               f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result

    def exec(self, service: str, *argv: str, timeout: float = 120) -> str:
        """Output of ``argv`` run in ``service`` (raises if it fails)."""
        return self.compose("exec", "-T", service, *argv, timeout=timeout).stdout

    def container_ids(self) -> dict[str, str]:
        """``{service: container id}`` of the stack's containers (first replica)."""
        ids: dict[str, str] = {}
        for service in (*SERVICES, "airflow-init"):
            out = self.compose("ps", "-q", service, check=False).stdout.split()
            if out:
                ids[service] = out[0]
        return ids


def _inspect(container_id: str) -> dict:
    out = subprocess.run(["docker", "inspect", container_id], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return json.loads(out)[0]


def wait_healthy(stack: ComposeStack, timeout: float = HEALTH_TIMEOUT_S) -> float:
    """Wait until airflow-init exited 0 and every service reports healthy; returns seconds."""
    started = time.monotonic()
    last_report = 0.0
    while True:
        ids = stack.container_ids()
        states: dict[str, str] = {}
        init = ids.get("airflow-init")
        if init:
            state = _inspect(init)["State"]
            if state["Status"] == "exited" and state["ExitCode"] != 0:
                raise RuntimeError("airflow-init failed:\n"
                                   + stack.compose("logs", "--tail", "60", "airflow-init").stdout)
        for service in SERVICES:
            if service not in ids:
                states[service] = "not created"
                continue
            state = _inspect(ids[service])["State"]
            states[service] = (state.get("Health") or {}).get("Status") or state["Status"]
            if state["Status"] in ("exited", "dead") or (states[service] == "unhealthy" and (
                    time.monotonic() - started > 120)):
                logs = stack.compose("logs", "--tail", "60", service, check=False).stdout
                health = json.dumps((state.get("Health") or {}).get("Log", [])[-2:], indent=1)
                raise RuntimeError(f"{service} is {states[service]}:\n{health}\n{logs}")
        elapsed = time.monotonic() - started
        pending = {k: v for k, v in states.items() if v != "healthy"}
        if not pending:
            return elapsed
        if elapsed > timeout:
            raise RuntimeError(f"not healthy after {timeout:.0f} s: {pending}")
        if elapsed - last_report >= 15:
            report(f"waiting for health ({elapsed:.0f} s): {pending}")
            last_report = elapsed
        time.sleep(3)


def write_spec(pipelines: Path, stable_port: int) -> None:
    """A smaller copy of the demo spec: same name, free stable port, short bake, no schedule
    (so unpausing the DAG starts no scheduled run beside the one the test triggers)."""
    spec = yaml.safe_load((REPO_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    spec["schedule"] = None
    spec["source"]["customers"] = 1000
    spec["training"]["min_rows"] = 500
    spec["deploy"].update(port=stable_port, bake_seconds=3)
    (pipelines / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def model_containers(stack: ComposeStack) -> set[str]:
    """Ids of the containers of the stack's deployments (from their recorded deployment id)."""
    try:
        state = json.loads(stack.exec(
            "airflow-worker", "cat", f"/opt/airmlops/data/deployments/{PIPELINE}/state.json"))
    except (RuntimeError, ValueError, subprocess.TimeoutExpired):
        return set()
    deployment = state.get("deployment_id")
    if not deployment:
        return set()
    label = f"label={DEPLOYMENT_LABEL}={deployment}"
    out = subprocess.run(["docker", "ps", "-aq", "--filter", label],
                         capture_output=True, text=True, timeout=30, check=False).stdout
    return set(out.split())


def images_of(containers: set[str]) -> set[str]:
    """Image ids of ``containers`` (the model images the stack built and ran)."""
    if not containers:
        return set()
    out = subprocess.run(["docker", "inspect", "--format", "{{.Image}}", *containers],
                         capture_output=True, text=True, timeout=30, check=False).stdout
    return set(out.split())


def teardown(stack: ComposeStack, model_containers: set[str], model_images: set[str]) -> None:
    """Stop the deployments, `down -v`, then remove what is left of the model containers and
    the model images the stack built (a later run builds them again in about a minute)."""
    started = time.monotonic()
    try:  # stop the proxies and model containers the deploy stage started, as `make stop` does
        stack.exec("airflow-worker", "python", "-c",
                   "from airmlops.platform import stop_deployments; print(stop_deployments())",
                   timeout=120)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        report(f"stopping the deployments in the worker failed ({exc}); removing containers")
    down = stack.compose("down", "-v", "--remove-orphans", "--timeout", "20", timeout=300,
                         check=False)
    if down.returncode != 0:
        report(f"`down -v` failed:\n{down.stdout[-2000:]}\n{down.stderr[-2000:]}")
    left = [cid for cid in model_containers
            if subprocess.run(["docker", "inspect", cid], capture_output=True,
                              timeout=30, check=False).returncode == 0]
    if left:
        subprocess.run(["docker", "rm", "-f", *left], capture_output=True, timeout=120, check=False)
    removed = [image for image in model_images
               if subprocess.run(["docker", "image", "rm", image], capture_output=True,
                                 timeout=120, check=False).returncode == 0]
    report(f"torn down in {time.monotonic() - started:.0f} s "
           f"({len(model_containers)} model container(s), {len(left)} removed after `down`; "
           f"{len(removed)} model image(s) removed)")


class AirflowApi:
    """The stack's Airflow REST API with a JWT from ``POST /auth/token``.

    On a busy machine the API server can take longer than a usual client timeout, so each call
    gets a generous timeout and transport errors (timeouts, refused connections) are retried a
    few times; every call made here is idempotent (the run id of a trigger is chosen by the
    caller, and a retried trigger that already went through answers 409).
    """

    def __init__(self, base_url: str, username: str, password: str,
                 timeout: float = 60.0, attempts: int = 5) -> None:
        import httpx

        self.base_url, self.timeout, self.attempts = base_url, timeout, attempts
        self._client = httpx.Client(base_url=base_url, timeout=timeout, trust_env=False)
        response = self.request("POST", "/auth/token",
                                json={"username": username, "password": password}, ok=(200, 201))
        self._client.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, *, ok: tuple[int, ...] = (200,),
                **kwargs):  # -> httpx.Response
        import httpx

        for attempt in range(1, self.attempts + 1):
            try:
                response = self._client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt == self.attempts:
                    raise
                report(f"{method} {path}: {type(exc).__name__}, retrying ({attempt})")
                time.sleep(2 * attempt)
                continue
            if response.status_code not in ok:
                raise RuntimeError(f"{method} {path}: HTTP {response.status_code}: "
                                   f"{response.text[:1000]}")
            return response
        raise AssertionError("unreachable")

    def wait_for_dag(self, dag_id: str, timeout: float) -> None:
        """Wait until the DAG processor has parsed ``dag_id`` (import errors are reported)."""
        started = time.monotonic()
        while True:
            if self.request("GET", f"/api/v2/dags/{dag_id}", ok=(200, 404)).status_code == 200:
                return
            if time.monotonic() - started > timeout:
                errors = self.request("GET", "/api/v2/importErrors").json()
                raise RuntimeError(f"DAG {dag_id} not parsed after {timeout:.0f} s: {errors}")
            time.sleep(3)

    def trigger(self, dag_id: str, run_id: str, conf: dict) -> None:
        """Unpause ``dag_id`` and trigger run ``run_id`` (a manual run, no logical date)."""
        self.request("PATCH", f"/api/v2/dags/{dag_id}", json={"is_paused": False})
        self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", ok=(200, 409),
                     json={"dag_run_id": run_id, "logical_date": None, "conf": conf})

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        path = f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
        return self.request("GET", path, params={"limit": 1000}).json()["task_instances"]

    def follow(self, dag_id: str, run_id: str, timeout: float, poll: float = 5.0) -> str:
        """Follow a run to its end, reporting each task state change; return the run state."""
        started = time.monotonic()
        seen: dict[str, str] = {}
        while True:
            state = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}").json()["state"]
            for ti in self.task_instances(dag_id, run_id):
                ti_state = ti.get("state") or "none"
                if ti_state != "none" and seen.get(ti["task_id"]) != ti_state:
                    seen[ti["task_id"]] = ti_state
                    report(f"  {time.monotonic() - started:5.0f} s  {ti['task_id']}: {ti_state}")
            if state in ("success", "failed"):
                return state
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"run {run_id} still {state} after {timeout:.0f} s")
            time.sleep(poll)

    def failed_task_logs(self, dag_id: str, run_id: str) -> str:
        """The log tails of the run's failed tasks (for an assertion message)."""
        parts = []
        for ti in self.task_instances(dag_id, run_id):
            if ti.get("state") != "failed":
                continue
            path = (f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti['task_id']}"
                    f"/logs/{max(ti.get('try_number') or 1, 1)}")
            response = self.request("GET", path, ok=(200, 404), params={"full_content": "true"})
            content = response.json().get("content") if response.status_code == 200 else None
            if isinstance(content, list):
                text = "\n".join(_log_line(item) for item in content)
            else:
                text = str(content or response.text)
            parts.append(f"--- {ti['task_id']} (try {ti.get('try_number')}) ---\n{text[-4000:]}")
        return "\n".join(parts)


def _log_line(item: object) -> str:
    """One structured task-log record as text: its message, and its exception if any."""
    if not isinstance(item, dict):
        return str(item)
    line = str(item.get("event", ""))
    for error in item.get("error_detail") or []:
        if isinstance(error, dict):
            line += f"\n{error.get('exc_type')}: {error.get('exc_value')}"
    return line
