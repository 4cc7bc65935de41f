"""Helpers of the compose stack test: the stack's handle, starting it, health waiting, the specs
it serves, and taking it down.

Used by conftest.py (the fixtures), the compose tests and benchmarks/bench_scale_workers.py.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILES = ("docker-compose.yaml", "docker-compose.host.yaml")
PIPELINE = "churn"
SCALE_PIPELINES = ("churn_a", "churn_b", "churn_c")
"""Copies of the small spec under other names, trained at once by the scale-out test."""
ADMIN_USER = "airflow"
MLFLOW_ADMIN = "mlops-admin"
GIT_COMMIT = "0123456789abcdef0123456789abcdef01234567"
SERVICES = (
    "postgres", "redis", "mlflow", "airflow-apiserver", "airflow-scheduler",
    "airflow-dag-processor", "airflow-triggerer", "airflow-worker",
)
"""The long-running services; each has a health check that must pass."""
WORKER = "airflow-worker"
WORKERS = 3
"""Celery worker replicas of the test stack (``up --scale airflow-worker=3``)."""
WORKER_CONCURRENCY = 2
"""Task slots per worker: 3 x 2 training tasks fit in memory beside the other services."""
HEALTH_TIMEOUT_S = 600
UP_ATTEMPTS = 3
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
            out = self.replica_ids(service)
            if out:
                ids[service] = out[0]
        return ids

    def replica_ids(self, service: str) -> list[str]:
        """Ids of every running or stopped replica of ``service``, in replica order."""
        return self.compose("ps", "-q", service, check=False).stdout.split()

    def scale_workers(self, workers: int, timeout: float = HEALTH_TIMEOUT_S) -> float:
        """Run ``workers`` Celery worker replicas (the others untouched); wait until each is
        healthy; returns the seconds it took."""
        started = time.monotonic()
        self.compose("up", "-d", "--no-recreate", "--scale", f"{WORKER}={workers}", WORKER,
                     timeout=timeout)
        wait_healthy(self, timeout=timeout)
        return time.monotonic() - started


def _inspect(container_id: str) -> dict:
    out = subprocess.run(["docker", "inspect", container_id], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    return json.loads(out)[0]


def wait_healthy(stack: ComposeStack, timeout: float = HEALTH_TIMEOUT_S) -> float:
    """Wait until airflow-init exited 0 and every service (each worker replica) reports
    healthy; returns seconds."""
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
            replicas = stack.replica_ids(service) if service == WORKER else (
                [ids[service]] if service in ids else [])
            if not replicas:
                states[service] = "not created"
                continue
            for index, container in enumerate(replicas, start=1):
                name = service if len(replicas) == 1 else f"{service}_{index}"
                state = _inspect(container)["State"]
                states[name] = (state.get("Health") or {}).get("Status") or state["Status"]
                if state["Status"] in ("exited", "dead") or (states[name] == "unhealthy" and (
                        time.monotonic() - started > 120)):
                    logs = stack.compose("logs", "--tail", "60", service, check=False).stdout
                    health = json.dumps((state.get("Health") or {}).get("Log", [])[-2:], indent=1)
                    raise RuntimeError(f"{name} is {states[name]}:\n{health}\n{logs}")
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


def ensure_images() -> dict[str, str]:
    """Run scripts/ensure-compose.sh; ``{NAME: tag}`` of the images it printed, plus
    ``_seconds`` (how long it took). Raises with the script's output if it fails."""
    started = time.monotonic()
    result = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "ensure-compose.sh")],
                            capture_output=True, text=True, timeout=ENSURE_TIMEOUT_S, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"scripts/ensure-compose.sh failed ({result.returncode}):\n"
                           f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    images = dict(line.removeprefix("image ").split("=", 1)
                  for line in result.stdout.splitlines() if line.startswith("image "))
    for line in result.stdout.splitlines():
        if line.startswith("ensure-compose:"):
            report(line)
    report(f"ensure-compose.sh took {time.monotonic() - started:.0f} s")
    wanted = {"AIRMLOPS_IMAGE", "POSTGRES_IMAGE", "REDIS_IMAGE", "BASE_IMAGE", "MODEL_BASE_IMAGE"}
    if not wanted <= set(images):
        raise RuntimeError(f"scripts/ensure-compose.sh printed no tag for {wanted - set(images)}")
    images["_seconds"] = f"{time.monotonic() - started:.1f}"
    return images


def write_spec(pipelines: Path, stable_port: int, name: str = PIPELINE) -> None:
    """A smaller copy of the demo spec: named ``name``, free stable port, short bake, no
    schedule (so unpausing the DAG starts no scheduled run beside the one triggered)."""
    spec = yaml.safe_load((REPO_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    spec["name"] = name
    spec["schedule"] = None
    spec["source"]["customers"] = 1000
    spec["training"]["min_rows"] = 500
    spec["deploy"].update(port=stable_port, bake_seconds=3)
    (pipelines / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def start_stack(images: dict[str, str], *, pipelines: Iterable[str] = (PIPELINE,),
                workers: int = WORKERS, concurrency: int = WORKER_CONCURRENCY) -> ComposeStack:
    """Bring a stack up under a project name of its own, on free loopback ports, with generated
    secrets, ``workers`` Celery worker replicas and a small spec per name of ``pipelines`` (each
    on a free stable port, ``stack.ports["stable:<name>"]``); wait until it is healthy.

    ``images`` is what scripts/ensure-compose.sh printed. On failure the stack is taken down.
    """
    # Not under pytest's tmp_path: the airflow user (uid 50000) in the containers must read the
    # pipelines folder, and /tmp/pytest-of-root is private to root.
    workdir = Path(tempfile.mkdtemp(prefix="airmlops-compose-"))
    workdir.chmod(0o755)
    folder = workdir / "pipelines"
    folder.mkdir(mode=0o755)
    ports = {name: free_port() for name in ("airflow", "mlflow", "postgres", "redis")}
    for name in pipelines:
        ports[f"stable:{name}"] = free_port()
        write_spec(folder, ports[f"stable:{name}"], name)
    ports["stable"] = ports.get(f"stable:{PIPELINE}", 0)
    password = secrets.token_urlsafe(16)
    # Hex: these go into connection URLs.
    redis_password, mlflow_password = secrets.token_hex(16), secrets.token_hex(16)
    env_file = workdir / ".env"
    settings = {
        "AIRMLOPS_ENV_FILE": env_file,
        "AIRMLOPS_IMAGE": images["AIRMLOPS_IMAGE"],
        "POSTGRES_IMAGE": images["POSTGRES_IMAGE"],
        "REDIS_IMAGE": images["REDIS_IMAGE"],
        "BASE_IMAGE": images["BASE_IMAGE"],
        "PIP_SOURCE": "wheelhouse",
        "MODEL_BASE_IMAGE": images["MODEL_BASE_IMAGE"],
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
        "AIRMLOPS_PIPELINES_DIR": folder,
        "AIRFLOW_WORKER_CONCURRENCY": concurrency,
        "MLOPS_GIT_COMMIT": GIT_COMMIT,
    }
    env_file.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
    env_file.chmod(0o644)  # read by compose only; the containers get it through env_file
    stack = ComposeStack(project=f"airmlops-compose-{secrets.token_hex(4)}", env_file=env_file,
                         workdir=workdir, ports=ports, password=password,
                         redis_password=redis_password, mlflow_password=mlflow_password)
    report(f"project {stack.project}: Airflow {stack.airflow_url}, MLflow {stack.mlflow_url}, "
           f"{workers} worker(s) x {concurrency} slots")
    try:
        started = time.monotonic()
        for attempt in range(1, UP_ATTEMPTS + 1):
            up = stack.compose("up", "-d", "--scale", f"{WORKER}={workers}",
                               timeout=HEALTH_TIMEOUT_S + 300, check=False)
            if up.returncode == 0:
                break
            # docker-compose v1 gives up on a dependency whose health check ran out of retries
            # while it was still starting (an API server on a loaded machine); its health turns
            # healthy at its next passing check, so `up` is run again (the created containers
            # are kept). Anything else, or the last attempt, fails loudly.
            if "is unhealthy" not in up.stderr + up.stdout or attempt == UP_ATTEMPTS:
                raise RuntimeError(f"docker-compose up failed ({up.returncode}):\n"
                                   f"{up.stdout[-4000:]}\n{up.stderr[-4000:]}")
            report(f"`up -d` found a dependency unhealthy (attempt {attempt}); again in 30 s")
            time.sleep(30)
        stack.timings["up"] = time.monotonic() - started
        report(f"`up -d` returned after {stack.timings['up']:.0f} s")
        stack.timings["healthy"] = stack.timings["up"] + wait_healthy(stack)
        report(f"every service healthy {stack.timings['healthy']:.0f} s after `up`")
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def stop_stack(stack: ComposeStack) -> None:
    """Take ``stack`` down with its volumes, deployments, model containers and images."""
    import shutil

    containers = model_containers(stack)
    teardown(stack, containers, images_of(containers))
    shutil.rmtree(stack.workdir, ignore_errors=True)


def model_containers(stack: ComposeStack) -> set[str]:
    """Ids of the containers of the stack's deployments, every pipeline's (from their recorded
    deployment ids in the shared data root)."""
    try:
        states = stack.exec(WORKER, "sh", "-c",
                            "cat /opt/airmlops/data/deployments/*/state.json 2>/dev/null; true")
    except (RuntimeError, subprocess.TimeoutExpired):
        return set()
    found: set[str] = set()
    decoder = json.JSONDecoder()
    text, position = states.strip(), 0
    while position < len(text):
        try:
            state, end = decoder.raw_decode(text, position)
        except ValueError:
            break
        position = end
        while position < len(text) and text[position].isspace():
            position += 1
        deployment = state.get("deployment_id") if isinstance(state, dict) else None
        if not deployment:
            continue
        label = f"label={DEPLOYMENT_LABEL}={deployment}"
        out = subprocess.run(["docker", "ps", "-aq", "--filter", label],
                             capture_output=True, text=True, timeout=30, check=False).stdout
        found |= set(out.split())
    return found


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
