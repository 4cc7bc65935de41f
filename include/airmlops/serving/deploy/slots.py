"""Slots: one model server started, watched, smoke-tested and stopped.

A slot instance is a local ``bentoml serve`` process (through
:mod:`airmlops.serving.slot_server`) or a container of the model's image, on one loopback port.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import secrets
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.processes import (
    MODEL_SERVICE,
    child_env,
    file_tail,
    port_free,
    process_alive,
    spawn_detached,
    stop_process,
)
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.container import ContainerResources
from airmlops.serving.deploy.errors import DeployError, NotReady
from airmlops.serving.deploy.state import (
    DEPLOYMENT_MARKER,
    HOST,
    INSTANCE_MARKER,
    LABEL_DEPLOYMENT,
    LABEL_INSTANCE,
    LOG_TAIL_LINES,
    SlotHandle,
    Target,
    validate_artifact,
    validate_env,
    validate_path,
    validate_port,
    validate_target,
)

if TYPE_CHECKING:
    from docker import DockerClient


@dataclasses.dataclass(frozen=True)
class SmokeResult:
    """Golden requests against one version: each needs a 2xx, a valid body, within budget."""

    ok: bool
    checked: int
    failures: tuple[str, ...]
    latencies_ms: tuple[float, ...]

    @property
    def max_latency_ms(self) -> float | None:
        return max(self.latencies_ms) if self.latencies_ms else None

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "max_latency_ms": self.max_latency_ms}



def start_slot(
    target: Target,
    artifact: str,
    port: int,
    env: Mapping[str, str] | None = None,
    *,
    name: str,
    log_dir: Path,
    bentoml_home: Path | None = None,
    deployment_id: str | None = None,
    docker_client: DockerClient | None = None,
    resources: ContainerResources | None = None,
) -> SlotHandle:
    """Start one model server on ``127.0.0.1:port`` and return at once (see :func:`wait_ready`).

    * ``process``: ``bentoml serve <bento tag> --host 127.0.0.1 --port N`` through
      :mod:`airmlops.serving.slot_server` (circus's control endpoints on private unix sockets,
      so the HTTP port is its only TCP socket) in its own session, with the minimal environment
      of :data:`airmlops.processes.MODEL_SERVICE` (``env`` must fit it), ``BENTOML_HOME``
      (``bentoml_home``, else the caller's), output to ``<log_dir>/<name>.log``.
    * ``docker``: the image ``artifact`` as container ``airmlops-<name>`` on the host network;
      BentoML in the image binds ``BENTOML_HOST=127.0.0.1`` / ``BENTOML_PORT=N``. Only ``env``
      reaches the container (never this process's environment). It runs confined
      (:func:`airmlops.serving.container.hardened_run_options`: no capabilities, non-root,
      read-only root filesystem) within ``resources`` (default :class:`ContainerResources`).

    ``name`` (e.g. ``churn-blue-41234``) names the log file and the container.
    """
    validate_target(target)
    validate_artifact(target, artifact)
    validate_port(port)
    extra = validate_env(env)
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,100}", name):
        raise ValueError(f"invalid slot name {name!r}")
    instance = secrets.token_hex(8)
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    markers = {INSTANCE_MARKER: instance}
    if deployment_id:
        markers[DEPLOYMENT_MARKER] = deployment_id

    if target == "process":
        if not port_free(port):
            raise DeployError(f"port {port} is already in use")
        process_env = {**child_env(MODEL_SERVICE, extra), **markers}
        home = Path(bentoml_home) if bentoml_home else None
        if home is None and process_env.get("BENTOML_HOME"):
            home = Path(process_env["BENTOML_HOME"])
        if home is not None:
            process_env["BENTOML_HOME"] = str(home)
        argv = [
            sys.executable,
            "-m",
            "airmlops.serving.slot_server",
            "serve",
            artifact,
            "--host",
            HOST,
            "--port",
            str(port),
        ]
        log_path = log_dir / f"{name}.log"
        # cwd is the log folder: `bentoml serve` must never pick up a service from a cwd.
        proc = spawn_detached(argv, process_env, log_path, cwd=log_dir)
        return SlotHandle(
            target="process",
            artifact=artifact,
            port=port,
            instance=instance,
            pid=proc.pid,
            create_time=proc.create_time(),
            log_path=str(log_path),
            bentoml_home=str(home) if home else None,
        )

    return _start_container(
        artifact, port, extra, markers, name, docker_client, resources or ContainerResources()
    )


def _start_container(
    image: str,
    port: int,
    env: Mapping[str, str],
    markers: Mapping[str, str],
    name: str,
    client: DockerClient | None,
    resources: ContainerResources,
) -> SlotHandle:
    from airmlops.serving.container import hardened_run_options
    from airmlops.serving.docker_engine import (
        check_network_mode,
        docker_client,
        remove_container,
        validate_container_name,
    )

    container_name = validate_container_name(f"airmlops-{name}")
    client = client or docker_client()
    labels = {
        LABEL_INSTANCE: markers[INSTANCE_MARKER],
        **({LABEL_DEPLOYMENT: markers[DEPLOYMENT_MARKER]} if DEPLOYMENT_MARKER in markers else {}),
    }
    remove_container(client, container_name, timeout=5)  # a leftover of a crashed deploy
    if not port_free(port):
        raise DeployError(f"port {port} is already in use")
    environment = {
        **env,
        **markers,
        "BENTOML_HOST": HOST,
        "BENTOML_PORT": str(port),
        "BENTOML_DO_NOT_TRACK": "true",
    }
    # The data root is scratch space in a container (a SQLite fallback there dies with it).
    data_root = env.get("MLOPS_DATA_ROOT")
    confinement = hardened_run_options(resources, scratch_dirs=[data_root] if data_root else [])
    try:
        container = client.containers.run(
            image,
            detach=True,
            name=container_name,
            network_mode=check_network_mode("host"),
            environment=environment,
            labels=labels,
            # The engine restarts a server that dies (its own backoff: 0.1 s doubling); a
            # stop or removal by the platform is not a failure and stays stopped.
            restart_policy={"Name": "on-failure", "MaximumRetryCount": 0},
            **confinement,
        )
    except Exception:
        remove_container(client, container_name, timeout=5)  # created but not started
        raise
    return SlotHandle(
        target="docker",
        artifact=image,
        port=port,
        instance=markers[INSTANCE_MARKER],
        container_id=container.id,
        container_name=container_name,
        resources=resources.to_dict(),
    )


def slot_alive(handle: SlotHandle, docker_client: DockerClient | None = None) -> bool:
    """True while the slot's process (or container) runs."""
    if handle.target == "process":
        return process_alive(handle.pid, handle.create_time)
    return _container_status(handle, docker_client) == "running"


def _container_status(handle: SlotHandle, client: DockerClient | None) -> str:
    import docker.errors

    from airmlops.serving.docker_engine import docker_client

    try:
        client = client or docker_client(timeout=10)
        return str(client.containers.get(handle.container_id).status)
    except docker.errors.NotFound:
        return "absent"
    except docker.errors.DockerException:
        return "unknown"


def stop_slot(
    handle: SlotHandle, *, timeout: float = 10.0, docker_client: DockerClient | None = None
) -> bool:
    """Stop a slot (SIGTERM, then SIGKILL after ``timeout`` s; a container is removed).

    True if something was running. Idempotent.
    """
    if handle.target == "process":
        return stop_process(
            handle.pid, handle.create_time, (INSTANCE_MARKER, handle.instance), timeout
        )
    from airmlops.serving.docker_engine import docker_client as make_client
    from airmlops.serving.docker_engine import remove_container

    client = docker_client or make_client()
    return remove_container(client, handle.container_id or "", timeout=round(timeout))


def slot_log_tail(handle: SlotHandle, docker_client: DockerClient | None = None) -> str:
    """The end of a slot's output (log file or container logs), for error messages."""
    if handle.target == "process":
        return file_tail(handle.log_path)
    import docker.errors

    from airmlops.serving.docker_engine import container_logs_tail
    from airmlops.serving.docker_engine import docker_client as make_client

    try:
        client = docker_client or make_client(timeout=10)
        return container_logs_tail(client.containers.get(handle.container_id), lines=LOG_TAIL_LINES)
    except docker.errors.DockerException as exc:
        return f"<logs unavailable: {exc}>"


def wait_ready(
    url: str,
    timeout: float,
    *,
    alive: Callable[[], bool] | None = None,
    interval: float = 0.2,
) -> float:
    """Poll ``<url>/readyz`` until it answers 200; return the seconds it took.

    Raises :class:`NotReady` after ``timeout`` s, or as soon as ``alive()`` says the server
    died. Each poll has a short timeout of its own: a server that accepts connections but never
    answers (a worker that failed to start) must not stall the wait.
    """
    import httpx

    upstream = proxy_mod.validate_upstream(url)
    started = time.monotonic()
    deadline = started + timeout
    last = "no answer yet"
    with httpx.Client(trust_env=False) as client:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NotReady(f"{upstream} was not ready within {timeout:g} s ({last})")
            try:
                response = client.get(f"{upstream}/readyz", timeout=min(2.0, max(0.2, remaining)))
                if response.status_code == 200:
                    return time.monotonic() - started
                last = f"/readyz answered {response.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if alive is not None and not alive():
                raise NotReady(f"{upstream} exited before it was ready ({last})")
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


Validator = Callable[[Mapping[str, Any], Any], bool]


def smoke(
    url: str,
    golden_requests: Sequence[Mapping[str, Any]],
    path: str = "/predict",
    latency_budget_ms: float = 500.0,
    validate: Validator | None = None,
    *,
    warmup: int = 1,
    timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
) -> SmokeResult:
    """POST each golden request (a JSON body) to ``url + path`` and check the answers.

    Each must get a 2xx with a JSON body, pass ``validate(request, body)`` (False or an
    exception fails it; the default accepts any JSON object) and answer within
    ``latency_budget_ms``. Every request is marked synthetic (``smoke``), so the service does
    not log it as a prediction. ``warmup`` requests (the first golden one, repeated, not judged) go
    first, so lazy first-call costs do not count against the budget. No golden requests at
    all is a failure: a smoke test that checks nothing proves nothing.
    """
    import httpx

    from airmlops.serving.synthetic import synthetic_headers

    upstream = proxy_mod.validate_upstream(url)
    validate_path(path)
    if not golden_requests:
        return SmokeResult(False, 0, ("no golden requests: nothing was checked",), ())
    failures: list[str] = []
    latencies: list[float] = []
    with httpx.Client(base_url=upstream, timeout=timeout, trust_env=False,
                      headers={**synthetic_headers("smoke"), **(headers or {})}) as client:
        for _ in range(max(0, warmup)):
            with contextlib.suppress(httpx.HTTPError):
                client.post(path, json=dict(golden_requests[0]))
        for index, request in enumerate(golden_requests):
            started = time.perf_counter()
            try:
                response = client.post(path, json=dict(request))
            except httpx.HTTPError as exc:
                failures.append(f"request {index}: no answer ({type(exc).__name__})")
                continue
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            latencies.append(round(elapsed_ms, 3))
            if not 200 <= response.status_code < 300:
                failures.append(
                    f"request {index}: status {response.status_code}: {response.text[:200]}"
                )
                continue
            try:
                body = response.json()
            except ValueError:
                failures.append(f"request {index}: the answer is not JSON")
                continue
            try:
                valid = validate(request, body) if validate else isinstance(body, dict)
            except Exception as exc:  # the validator's verdict, whatever it raised
                valid = False
                failures.append(f"request {index}: invalid answer ({exc})")
            else:
                if not valid:
                    failures.append(f"request {index}: invalid answer {json.dumps(body)[:200]}")
            if elapsed_ms > latency_budget_ms:
                failures.append(
                    f"request {index}: {elapsed_ms:.1f} ms is over the {latency_budget_ms:g} ms "
                    "budget"
                )
    return SmokeResult(not failures, len(golden_requests), tuple(failures), tuple(latencies))

