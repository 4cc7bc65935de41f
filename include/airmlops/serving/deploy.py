"""Blue/green deployments of a pipeline's model service behind one stable address.

A deployment has a reverse proxy (:mod:`airmlops.serving.proxy`, the stable address users call)
and two slots, ``blue`` and ``green``. :func:`deploy` starts the new version beside the live one
(a local ``bentoml serve`` process, or a container of its image), waits for ``/readyz``, sends
the golden smoke requests, and only then switches the proxy; the previous version keeps running
in the other slot as the rollback target. ANY failure before the switch is complete stops the
new version and raises :class:`DeployFailed`: the live version keeps serving and the recorded
state is exactly what it was. The slot's previous occupant (two versions back) is stopped only
after a successful switch, so a failed deploy never costs the rollback target either.

State lives in ``<data_root>/deployments/<pipeline>/state.json`` (atomic writes); one deploy,
rollback or undeploy at a time per pipeline (a lock file). Every process and container a
deployment starts carries its ``deployment_id`` (environment marker, container label), so
:func:`undeploy` finds and stops them even if a record was lost. They start with an explicit
minimal environment (:func:`airmlops.processes.child_env`), never the deploying worker's.

Times are passed in (``now``), never read here. Pipeline names, versions, bento tags, image
references, ports and environment names are validated before they reach a process or the Docker
engine, and commands are argument lists (no shell).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import re
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from airmlops.paths import atomic_write_json, safe_join
from airmlops.processes import MODEL_SERVICE, PROXY, child_env, free_port, spawn_detached
from airmlops.processes import port_free as _port_free
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.container import ContainerResources

if TYPE_CHECKING:
    from docker import DockerClient

logger = logging.getLogger(__name__)

Target = Literal["process", "docker"]
TARGETS: tuple[str, ...] = ("process", "docker")
SLOTS: tuple[str, str] = ("blue", "green")
HOST = "127.0.0.1"
STATE_VERSION = 1
DEPLOYMENT_MARKER = "AIRMLOPS_DEPLOYMENT_ID"
"""Environment variable (and container label) tying every process to its deployment."""
INSTANCE_MARKER = "AIRMLOPS_SLOT_INSTANCE"
"""Environment variable (and container label) naming one started slot instance."""
LABEL_DEPLOYMENT = "ai.airmlops.deployment"
LABEL_INSTANCE = "ai.airmlops.slot-instance"

_PIPELINE_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")  # the spec's NAME_PATTERN
_VERSION_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.+-]{0,62}[A-Za-z0-9])?$")
_BENTO_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,62}[a-z0-9])?$")
_BENTO_VERSION_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_./-]{0,200}$")
_MIN_PORT = 1024
LOG_TAIL_LINES = 100
"""Lines of a failed version's output kept in the error (a traceback plus what follows it)."""


# --------------------------------------------------------------------------------------------
# Errors and results
# --------------------------------------------------------------------------------------------


class DeployError(RuntimeError):
    """A deployment operation could not be done; the message says what and why."""


class DeployFailed(DeployError):
    """A new version was not switched to. The old version still serves and the state is unchanged.

    ``stage`` is where it failed: ``proxy``, ``start``, ``readiness``, ``smoke``, ``switch`` or
    ``record``; ``reason`` says why; ``log_tail`` is the end of the new version's log, if any.
    """

    def __init__(self, stage: str, reason: str, log_tail: str = "") -> None:
        message = f"deploy failed at {stage}: {reason}"
        if log_tail:
            message += f"\n--- log tail of the new version ---\n{log_tail}"
        super().__init__(message)
        self.stage, self.reason, self.log_tail = stage, reason, log_tail


class NotReady(DeployError):
    """A slot did not answer ``/readyz`` with 200 in time, or died while starting."""


class RollbackFailed(DeployError):
    """There is no previous version to roll back to, or it could not be made to serve again."""


@dataclasses.dataclass(frozen=True)
class ProxyHandle:
    """The running proxy of a pipeline: the stable address and how to drive it."""

    pipeline: str
    port: int
    pid: int
    create_time: float
    state_dir: Path
    token: str = dataclasses.field(repr=False)

    @property
    def url(self) -> str:
        """The stable address users call."""
        return proxy_mod.proxy_url(self.port)


@dataclasses.dataclass(frozen=True)
class SlotHandle:
    """One started model server: a local process (pid) or a container (container_id)."""

    target: str
    artifact: str
    port: int
    instance: str
    pid: int | None = None
    create_time: float | None = None
    container_id: str | None = None
    container_name: str | None = None
    log_path: str | None = None
    bentoml_home: str | None = None
    resources: Mapping[str, Any] | None = None

    @property
    def upstream(self) -> str:
        return f"http://{HOST}:{self.port}"


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


@dataclasses.dataclass(frozen=True)
class DeployResult:
    """A successful deploy: which version serves from which slot, and how long each step took."""

    pipeline: str
    version: str
    slot: str
    previous_slot: str | None
    previous_version: str | None
    target: str
    artifact: str
    upstream: str
    stable_url: str
    started_at: str
    timings: dict[str, float]
    smoke: SmokeResult

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["smoke"] = self.smoke.to_dict()
        return data


@dataclasses.dataclass(frozen=True)
class RollbackResult:
    """The slot (and version) serving again after a rollback; ``restarted`` if it had to be."""

    pipeline: str
    slot: str
    version: str
    previous_slot: str
    upstream: str
    stable_url: str
    restarted: bool
    seconds: float


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def validate_pipeline(name: str) -> str:
    """Return ``name`` if it is a valid pipeline name (the spec's rule); else ValueError."""
    if not isinstance(name, str) or not _PIPELINE_RE.fullmatch(name):
        raise ValueError(f"invalid pipeline name {name!r}")
    return name


def validate_version(version: str) -> str:
    """Return ``version`` if it is a plain model version (``3``, ``1.2.0``); else ValueError."""
    if not isinstance(version, str) or not _VERSION_RE.fullmatch(version):
        raise ValueError(f"invalid model version {version!r}")
    return version


def validate_bento_tag(tag: str) -> str:
    """Return ``tag`` if it is an explicit ``name:version`` bento tag; else ValueError.

    The version must be explicit (a bare name could resolve to a different build later, or be
    read as a path by ``bentoml serve``).
    """
    if not isinstance(tag, str) or tag.count(":") != 1:
        raise ValueError(f"invalid bento tag {tag!r}: expected 'name:version'")
    name, version = tag.split(":")
    if not _BENTO_NAME_RE.fullmatch(name) or not _BENTO_VERSION_RE.fullmatch(version):
        raise ValueError(f"invalid bento tag {tag!r}: expected 'name:version'")
    if version == "latest":
        raise ValueError(f"bento tag {tag!r} must name an exact version, not 'latest'")
    return tag


def validate_port(port: int) -> int:
    """Return ``port`` if it is an unprivileged TCP port (1024..65535); else ValueError."""
    if isinstance(port, bool) or not isinstance(port, int) or not _MIN_PORT <= port < 65536:
        raise ValueError(f"invalid port {port!r}: expected an int in {_MIN_PORT}..65535")
    return port


def validate_env(env: Mapping[str, str] | None) -> dict[str, str]:
    """Return ``env`` as a dict if every name is a plain identifier, every value a string
    without NUL bytes, and every name one a model service may receive
    (:data:`airmlops.processes.MODEL_SERVICE`: no Airflow setting, no other process's secret);
    else ValueError (naming the variable, never printing its value)."""
    result: dict[str, str] = {}
    for name, value in (env or {}).items():
        if not isinstance(name, str) or not _ENV_NAME_RE.fullmatch(name):
            raise ValueError(f"invalid environment variable name {name!r}")
        if not isinstance(value, str) or "\x00" in value:
            raise ValueError(f"environment variable {name} must be a string without NUL bytes")
        result[name] = value
    child_env(MODEL_SERVICE, result, parent={})  # refuses a name the service may not get
    return result


def _validate_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"invalid deploy target {target!r}: expected one of {list(TARGETS)}")
    return target


def _validate_artifact(target: str, artifact: str) -> str:
    if target == "process":
        return validate_bento_tag(artifact)
    from airmlops.serving.docker_engine import validate_image_ref

    return validate_image_ref(artifact)


def _validate_path(path: str) -> str:
    if not isinstance(path, str) or not _PATH_RE.fullmatch(path) or ".." in path:
        raise ValueError(f"invalid request path {path!r}")
    return path


def _other(slot: str | None) -> str:
    return SLOTS[1] if slot == SLOTS[0] else SLOTS[0]


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


def deployment_dir(pipeline: str, root: Path) -> Path:
    """``<root>/deployments/<pipeline>``: state, proxy token, logs of one pipeline."""
    return safe_join(Path(root), "deployments", validate_pipeline(pipeline))


def state_path(pipeline: str, root: Path) -> Path:
    return deployment_dir(pipeline, root) / "state.json"


def load_state(pipeline: str, root: Path) -> dict[str, Any]:
    """The recorded state of ``pipeline`` (an empty deployment if there is none yet)."""
    path = state_path(pipeline, root)
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return _empty_state(pipeline)
    except ValueError as exc:
        raise DeployError(f"deployment state {path} is not valid JSON: {exc}") from None
    if not isinstance(state, dict) or state.get("pipeline") != pipeline:
        raise DeployError(f"deployment state {path} does not belong to pipeline {pipeline!r}")
    state.setdefault("slots", {})
    for slot in SLOTS:
        state["slots"].setdefault(slot, None)
    return state


def _empty_state(pipeline: str) -> dict[str, Any]:
    return {
        "state_version": STATE_VERSION,
        "pipeline": pipeline,
        "deployment_id": secrets.token_hex(8),
        "proxy": None,
        "active": None,
        "switched_at": None,
        "slots": dict.fromkeys(SLOTS),
    }


def _save_state(pipeline: str, root: Path, state: Mapping[str, Any]) -> None:
    atomic_write_json(state_path(pipeline, root), dict(state))


@contextlib.contextmanager
def _locked(pipeline: str, root: Path) -> Iterator[None]:
    """One deploy, rollback or undeploy at a time per pipeline (blocking)."""
    directory = deployment_dir(pipeline, root)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _iso(now: dt.datetime | None) -> str | None:
    if now is None:
        return None
    if now.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return now.isoformat()


def _slot_record(handle: SlotHandle, version: str, started_at: str | None) -> dict[str, Any]:
    return {
        "model_version": version,
        "target": handle.target,
        "artifact": handle.artifact,
        "upstream": handle.upstream,
        "port": handle.port,
        "pid": handle.pid,
        "create_time": handle.create_time,
        "container_id": handle.container_id,
        "container_name": handle.container_name,
        "instance": handle.instance,
        "log_path": handle.log_path,
        "bentoml_home": handle.bentoml_home,
        "resources": dict(handle.resources) if handle.resources else None,
        "started_at": started_at,
    }


def _handle_from_record(record: Mapping[str, Any]) -> SlotHandle:
    return SlotHandle(
        target=record["target"],
        artifact=record["artifact"],
        port=int(record["port"]),
        instance=record["instance"],
        pid=record.get("pid"),
        create_time=record.get("create_time"),
        container_id=record.get("container_id"),
        container_name=record.get("container_name"),
        log_path=record.get("log_path"),
        bentoml_home=record.get("bentoml_home"),
        resources=record.get("resources"),
    )


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def _process_alive(pid: int | None, create_time: float | None) -> bool:
    """True if ``pid`` still runs and is the process we started (same start time, no zombie)."""
    import psutil

    if pid is None or create_time is None:
        return False
    try:
        proc = psutil.Process(pid)
        if abs(proc.create_time() - create_time) > 0.01:
            return False
        if proc.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            return False
    except psutil.NoSuchProcess:
        return False
    return True


def _marked_processes(name: str, value: str) -> list[Any]:
    """Live processes whose environment has ``name=value`` (a deployment or instance marker).

    BentoML's arbiter starts each worker in a session of its own, so a process group does not
    hold a slot's processes; the inherited environment marker does.
    """
    import psutil

    needle = f"{name}={value}"
    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            environ = proc.environ()
        except (psutil.Error, OSError):
            continue
        if f"{name}={environ.get(name)}" == needle:
            found.append(proc)
    return found


def _terminate(procs: Sequence[Any], timeout: float) -> list[Any]:
    """SIGTERM ``procs``, wait up to ``timeout`` s, SIGKILL the rest; return those still alive."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGTERM)
    _gone, alive = psutil.wait_procs(list(procs), timeout=timeout)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGKILL)
    _gone, alive = psutil.wait_procs(alive, timeout=5.0)
    return alive


def _stop_process(
    pid: int | None, create_time: float | None, marker: tuple[str, str] | None, timeout: float
) -> bool:
    """Stop a started process and everything carrying its marker. True if anything ran."""
    import psutil

    procs = []
    if _process_alive(pid, create_time):
        with contextlib.suppress(psutil.Error):
            leader = psutil.Process(pid)
            procs.append(leader)
            procs.extend(leader.children(recursive=True))
    if marker is not None:
        known = {p.pid for p in procs}
        procs.extend(p for p in _marked_processes(*marker) if p.pid not in known)
    if not procs:
        return False
    # The leader first (BentoML's arbiter stops its workers itself), then anything left.
    leaders = procs[:1] if pid is not None and procs[0].pid == pid else []
    survivors = _terminate(leaders, timeout) if leaders else []
    rest = [p for p in procs[len(leaders) :] if p.is_running()] + survivors
    if rest:
        still = _terminate(rest, timeout)
        if still:
            raise DeployError(f"could not stop processes {[p.pid for p in still]}")
    if pid is not None:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return True


def _log_tail(path: str | Path | None, lines: int = LOG_TAIL_LINES) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 65536))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# The proxy
# --------------------------------------------------------------------------------------------


def ensure_proxy(pipeline: str, port: int, root: Path, *, timeout: float = 20.0) -> ProxyHandle:
    """The pipeline's proxy on ``port``: reused when alive, started otherwise.

    A (re)started proxy is pointed at the recorded active slot. Raises :class:`DeployError`
    when the pipeline's proxy runs on another port or ``port`` is taken by something else.
    """
    validate_pipeline(pipeline)
    validate_port(port)
    root = Path(root)
    with _locked(pipeline, root):
        state = load_state(pipeline, root)
        handle = _ensure_proxy(pipeline, port, root, state, timeout)
        _save_state(pipeline, root, state)
        return handle


def _ensure_proxy(
    pipeline: str, port: int, root: Path, state: dict[str, Any], timeout: float
) -> ProxyHandle:
    """Reuse or start the proxy; updates ``state["proxy"]`` in memory (the caller saves)."""
    directory = deployment_dir(pipeline, root)
    proxy_dir = directory / "proxy"
    token = proxy_mod.ensure_admin_token(proxy_dir)
    recorded = state.get("proxy") or {}
    active = state.get("active")
    active_record = state["slots"].get(active) if active else None

    if _process_alive(recorded.get("pid"), recorded.get("create_time")):
        if recorded.get("port") != port:
            raise DeployError(
                f"the stable address of {pipeline} is port {recorded.get('port')}, not {port}: "
                "undeploy first to move it"
            )
        if _wait_proxy(port, recorded["pid"], recorded["create_time"], timeout):
            handle = ProxyHandle(
                pipeline, port, recorded["pid"], recorded["create_time"], proxy_dir, token
            )
            _reconcile_proxy(handle, active, active_record)
            return handle
        _stop_process(recorded["pid"], recorded["create_time"], None, timeout=5.0)

    if not _port_free(port):
        raise DeployError(f"port {port} is taken by another program; cannot serve {pipeline} there")
    argv = [
        sys.executable,
        "-m",
        "airmlops.serving.proxy",
        "--port",
        str(port),
        "--state-dir",
        str(proxy_dir),
    ]
    if active_record:
        argv += ["--upstream", active_record["upstream"], "--slot", active]
    env = {**child_env(PROXY), DEPLOYMENT_MARKER: state["deployment_id"]}
    proc = spawn_detached(argv, env, directory / "logs" / "proxy.log", cwd=directory)
    create_time = proc.create_time()
    if not _wait_proxy(port, proc.pid, create_time, timeout):
        _stop_process(proc.pid, create_time, None, timeout=5.0)
        raise DeployError(
            f"the proxy of {pipeline} did not start on port {port} within {timeout:g} s:\n"
            + _log_tail(directory / "logs" / "proxy.log")
        )
    state["proxy"] = {
        "port": port,
        "pid": proc.pid,
        "create_time": create_time,
        "url": proxy_mod.proxy_url(port),
    }
    logger.info("proxy of %s started on %s (pid %s)", pipeline, proxy_mod.proxy_url(port), proc.pid)
    return ProxyHandle(pipeline, port, proc.pid, create_time, proxy_dir, token)


def _wait_proxy(port: int, pid: int, create_time: float, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proxy_mod.healthz(port, timeout=1.0):
            return True
        if not _process_alive(pid, create_time):
            return False
        time.sleep(0.1)
    return False


def _reconcile_proxy(
    handle: ProxyHandle, active: str | None, active_record: Mapping[str, Any] | None
) -> None:
    """Point the proxy at the recorded active slot if it points elsewhere (e.g. after a crash)."""
    if not active or not active_record:
        return
    current = proxy_mod.get_state(handle.port)
    if current.get("upstream") == active_record["upstream"] and current.get("slot") == active:
        return
    try:
        proxy_mod.switch(handle.port, handle.token, active_record["upstream"], active)
    except proxy_mod.ProxyAdminError as exc:
        logger.warning(
            "proxy of %s could not be pointed back at %s: %s", handle.pipeline, active, exc
        )


# --------------------------------------------------------------------------------------------
# Slots
# --------------------------------------------------------------------------------------------


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
    _validate_target(target)
    _validate_artifact(target, artifact)
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
        if not _port_free(port):
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
    if not _port_free(port):
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
        return _process_alive(handle.pid, handle.create_time)
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
        return _stop_process(
            handle.pid, handle.create_time, (INSTANCE_MARKER, handle.instance), timeout
        )
    from airmlops.serving.docker_engine import docker_client as make_client
    from airmlops.serving.docker_engine import remove_container

    client = docker_client or make_client()
    return remove_container(client, handle.container_id or "", timeout=round(timeout))


def slot_log_tail(handle: SlotHandle, docker_client: DockerClient | None = None) -> str:
    """The end of a slot's output (log file or container logs), for error messages."""
    if handle.target == "process":
        return _log_tail(handle.log_path)
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
    ``latency_budget_ms``. ``warmup`` requests (the first golden one, repeated, not judged) go
    first, so lazy first-call costs do not count against the budget. No golden requests at
    all is a failure: a smoke test that checks nothing proves nothing.
    """
    import httpx

    upstream = proxy_mod.validate_upstream(url)
    _validate_path(path)
    if not golden_requests:
        return SmokeResult(False, 0, ("no golden requests: nothing was checked",), ())
    failures: list[str] = []
    latencies: list[float] = []
    with httpx.Client(base_url=upstream, timeout=timeout, trust_env=False,
                      headers=dict(headers or {})) as client:
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


# --------------------------------------------------------------------------------------------
# Deploy, rollback, undeploy, status
# --------------------------------------------------------------------------------------------


def deploy(
    pipeline: str,
    version: str,
    artifact: str,
    target: Target,
    golden: Sequence[Mapping[str, Any]],
    *,
    root: Path,
    proxy_port: int,
    ready_timeout: float,
    latency_budget_ms: float,
    now: dt.datetime,
    validate: Validator | None = None,
    path: str = "/predict",
    env: Mapping[str, str] | None = None,
    bentoml_home: Path | None = None,
    docker_client: DockerClient | None = None,
    stop_timeout: float = 10.0,
    headers: Mapping[str, str] | None = None,
    resources: ContainerResources | None = None,
) -> DeployResult:
    """Blue/green deploy of ``version`` (a bento tag for ``process``, an image for ``docker``).

    Starts it in the idle slot on a free port, waits for readiness, smoke-tests it with
    ``golden`` and switches the stable address (``proxy_port``) to it. The previous version
    keeps running in the other slot (the rollback target). Any failure raises
    :class:`DeployFailed`, with the new version stopped, the old one serving and the state file
    untouched. ``resources`` limits a ``docker`` version's container (spec ``deploy.resources``).
    """
    validate_pipeline(pipeline)
    validate_version(version)
    _validate_target(target)
    _validate_artifact(target, artifact)
    validate_port(proxy_port)
    _validate_path(path)
    validate_env(env)
    started_at = _iso(now)
    root = Path(root)
    directory = deployment_dir(pipeline, root)
    clock = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.monotonic() - since, 3)
        return time.monotonic()

    with _locked(pipeline, root):
        state = load_state(pipeline, root)
        original = json.loads(json.dumps(state))
        try:
            proxy = _ensure_proxy(pipeline, proxy_port, root, state, timeout=20.0)
        except (DeployError, proxy_mod.ProxyAdminError, OSError) as exc:
            raise DeployFailed("proxy", str(exc)) from None
        if state != original:  # a (re)started proxy is infrastructure, not the deploy
            _save_state(pipeline, root, state)
            original = json.loads(json.dumps(state))
        step = lap("proxy_s", clock)

        active = state.get("active")
        active_record = state["slots"].get(active) if active else None
        slot = _other(active)
        port = free_port()
        try:
            handle = start_slot(
                target,
                artifact,
                port,
                env,
                name=f"{pipeline}-{slot}-{port}".replace("_", "-"),
                log_dir=directory / "logs",
                bentoml_home=bentoml_home,
                deployment_id=state["deployment_id"],
                docker_client=docker_client,
                resources=resources,
            )
        except Exception as exc:
            raise DeployFailed("start", f"{type(exc).__name__}: {exc}") from None
        step = lap("start_s", step)

        switched = False
        try:
            try:
                wait_ready(
                    handle.upstream,
                    ready_timeout,
                    alive=lambda: slot_alive(handle, docker_client),
                )
            except NotReady as exc:
                raise DeployFailed(
                    "readiness", str(exc), slot_log_tail(handle, docker_client)
                ) from None
            step = lap("ready_s", step)

            result = smoke(handle.upstream, golden, path, latency_budget_ms, validate,
                           headers=headers)
            if not result.ok:
                raise DeployFailed("smoke", "; ".join(result.failures[:5]))
            step = lap("smoke_s", step)

            try:
                proxy_mod.switch(proxy.port, proxy.token, handle.upstream, slot)
            except (proxy_mod.ProxyAdminError, ValueError) as exc:
                raise DeployFailed("switch", str(exc)) from None
            switched = True
            step = lap("switch_s", step)

            replaced = state["slots"].get(slot)
            state["slots"][slot] = _slot_record(handle, version, started_at)
            state["active"] = slot
            state["switched_at"] = started_at
            try:
                _save_state(pipeline, root, state)
            except OSError as exc:
                raise DeployFailed("record", f"state could not be written: {exc}") from None
        except BaseException:
            if switched:
                _switch_back(proxy, active, active_record)
            with contextlib.suppress(Exception):
                stop_slot(handle, timeout=stop_timeout, docker_client=docker_client)
            if state != original:
                with contextlib.suppress(OSError):
                    _save_state(pipeline, root, original)
            raise

        if replaced:  # the version before the previous one: no longer a rollback target
            try:
                stop_slot(
                    _handle_from_record(replaced), timeout=stop_timeout, docker_client=docker_client
                )
            except Exception as exc:  # the deploy stands; the leftover is reported, not fatal
                logger.warning("could not stop the replaced %s version: %s", slot, exc)
        lap("cleanup_s", step)
        timings["total_s"] = round(time.monotonic() - clock, 3)

    logger.info(
        "%s version %s serves from %s (%s) at %s",
        pipeline,
        version,
        slot,
        handle.upstream,
        proxy.url,
    )
    return DeployResult(
        pipeline=pipeline,
        version=version,
        slot=slot,
        previous_slot=active if active_record else None,
        previous_version=active_record["model_version"] if active_record else None,
        target=target,
        artifact=artifact,
        upstream=handle.upstream,
        stable_url=proxy.url,
        started_at=started_at or "",
        timings=timings,
        smoke=result,
    )


def _switch_back(
    proxy: ProxyHandle, active: str | None, active_record: Mapping[str, Any] | None
) -> None:
    """After a switch whose deploy then failed: point the proxy at the old version again."""
    if not active or not active_record:
        return
    try:
        proxy_mod.switch(proxy.port, proxy.token, active_record["upstream"], active, verify=False)
    except proxy_mod.ProxyAdminError as exc:
        logger.error("could not switch %s back to %s: %s", proxy.pipeline, active, exc)


def rollback(
    pipeline: str,
    root: Path,
    *,
    ready_timeout: float = 120.0,
    now: dt.datetime | None = None,
    env: Mapping[str, str] | None = None,
    docker_client: DockerClient | None = None,
) -> RollbackResult:
    """Switch the stable address back to the other slot (the previous version).

    If that version no longer runs, it is started again from its recorded artifact (with
    ``env``; the recorded ``BENTOML_HOME`` for a process) and must become ready first. The
    slot rolled back from keeps running, so a second rollback rolls forward again. Raises
    :class:`RollbackFailed` (the active version unchanged) when there is nothing to roll back
    to or it cannot serve.
    """
    validate_pipeline(pipeline)
    extra = validate_env(env)
    restarted_at = _iso(now)
    root = Path(root)
    directory = deployment_dir(pipeline, root)
    clock = time.monotonic()
    with _locked(pipeline, root):
        state = load_state(pipeline, root)
        active = state.get("active")
        slot = _other(active)
        record = state["slots"].get(slot)
        if not active or not record:
            raise RollbackFailed(f"{pipeline} has no previous version to roll back to")
        proxy_record = state.get("proxy") or {}
        if not proxy_record.get("port"):
            raise RollbackFailed(f"{pipeline} has no stable address (proxy) recorded")
        try:
            proxy = _ensure_proxy(pipeline, proxy_record["port"], root, state, timeout=20.0)
        except (DeployError, proxy_mod.ProxyAdminError, OSError) as exc:
            raise RollbackFailed(f"the proxy of {pipeline} is not available: {exc}") from None
        _save_state(pipeline, root, state)  # a restarted proxy is recorded whatever follows

        handle = _handle_from_record(record)
        restarted = False
        if not (slot_alive(handle, docker_client) and _ready_now(handle.upstream)):
            with contextlib.suppress(Exception):
                stop_slot(handle, timeout=5.0, docker_client=docker_client)
            handle = _restart_slot(
                pipeline,
                slot,
                record,
                extra,
                directory,
                state["deployment_id"],
                ready_timeout,
                docker_client,
            )
            restarted = True
            record = _slot_record(
                handle, record["model_version"], restarted_at or record.get("started_at")
            )
        try:
            proxy_mod.switch(proxy.port, proxy.token, handle.upstream, slot)
        except (proxy_mod.ProxyAdminError, ValueError) as exc:
            if restarted:
                with contextlib.suppress(Exception):
                    stop_slot(handle, timeout=5.0, docker_client=docker_client)
            raise RollbackFailed(f"the proxy refused the switch back: {exc}") from None
        state["slots"][slot] = record
        state["active"] = slot
        state["switched_at"] = restarted_at or state.get("switched_at")
        _save_state(pipeline, root, state)
    return RollbackResult(
        pipeline=pipeline,
        slot=slot,
        version=record["model_version"],
        previous_slot=active,
        upstream=handle.upstream,
        stable_url=proxy.url,
        restarted=restarted,
        seconds=round(time.monotonic() - clock, 3),
    )


def _restart_slot(
    pipeline: str,
    slot: str,
    record: Mapping[str, Any],
    env: Mapping[str, str],
    directory: Path,
    deployment_id: str,
    ready_timeout: float,
    docker_client: DockerClient | None,
) -> SlotHandle:
    """Start a recorded version again on a free port and wait until it is ready."""
    port = free_port()
    home = record.get("bentoml_home")
    try:
        handle = start_slot(
            record["target"],
            record["artifact"],
            port,
            env,
            name=f"{pipeline}-{slot}-{port}".replace("_", "-"),
            log_dir=directory / "logs",
            bentoml_home=Path(home) if home else None,
            deployment_id=deployment_id,
            docker_client=docker_client,
            resources=ContainerResources(**record["resources"]) if record.get("resources")
            else None,
        )
    except Exception as exc:
        raise RollbackFailed(
            f"version {record['model_version']} could not be started again: {exc}"
        ) from None
    try:
        wait_ready(handle.upstream, ready_timeout, alive=lambda: slot_alive(handle, docker_client))
    except NotReady as exc:
        tail = slot_log_tail(handle, docker_client)
        with contextlib.suppress(Exception):
            stop_slot(handle, timeout=5.0, docker_client=docker_client)
        raise RollbackFailed(
            f"version {record['model_version']} did not become ready again: {exc}\n{tail}"
        ) from None
    return handle


def _ready_now(upstream: str) -> bool:
    try:
        wait_ready(upstream, timeout=3.0)
    except NotReady:
        return False
    return True


def undeploy(
    pipeline: str,
    root: Path,
    *,
    timeout: float = 10.0,
    docker_client: DockerClient | None = None,
) -> list[str]:
    """Stop the proxy and both slots of ``pipeline`` (plus any leftover process or container
    carrying its deployment id). Returns what was stopped. Idempotent."""
    validate_pipeline(pipeline)
    root = Path(root)
    stopped: list[str] = []
    with _locked(pipeline, root):
        state = load_state(pipeline, root)
        proxy_record = state.get("proxy") or {}
        if _stop_process(proxy_record.get("pid"), proxy_record.get("create_time"), None, timeout):
            stopped.append("proxy")
        for slot in SLOTS:
            record = state["slots"].get(slot)
            if not record:
                continue
            try:
                if stop_slot(
                    _handle_from_record(record), timeout=timeout, docker_client=docker_client
                ):
                    stopped.append(slot)
            except Exception as exc:
                raise DeployError(f"could not stop slot {slot} of {pipeline}: {exc}") from None
        deployment_id = state["deployment_id"]
        stopped += _remove_labelled_containers(
            deployment_id, docker_client, any_docker=_uses_docker(state)
        )
        leftovers = _marked_processes(DEPLOYMENT_MARKER, deployment_id)
        if leftovers:
            still = _terminate(leftovers, timeout)
            if still:
                raise DeployError(f"could not stop processes {[p.pid for p in still]}")
            stopped.append(f"{len(leftovers)} leftover process(es)")
        state.update(proxy=None, active=None, switched_at=None, slots=dict.fromkeys(SLOTS))
        _save_state(pipeline, root, state)
    return stopped


def _uses_docker(state: Mapping[str, Any]) -> bool:
    return any((record or {}).get("target") == "docker" for record in state["slots"].values())


def _remove_labelled_containers(
    deployment_id: str, client: DockerClient | None, *, any_docker: bool
) -> list[str]:
    """Remove containers labelled with ``deployment_id`` (only asks the engine if one is
    expected or reachable: the embedded default has no engine)."""
    from airmlops.serving.docker_engine import docker_client as make_client
    from airmlops.serving.docker_engine import engine_available, remove_container

    if client is None:
        if not any_docker and not engine_available(timeout=1.0):
            return []
        try:
            client = make_client(timeout=30)
        except Exception:
            return []
    removed = []
    for container in client.containers.list(
        all=True, filters={"label": f"{LABEL_DEPLOYMENT}={deployment_id}"}
    ):
        if remove_container(client, container.id, timeout=10):
            removed.append(f"container {container.name}")
    return removed


def status(
    pipeline: str, root: Path, *, docker_client: DockerClient | None = None
) -> dict[str, Any]:
    """The recorded deployment of ``pipeline`` plus what is actually alive and ready now."""
    validate_pipeline(pipeline)
    root = Path(root)
    state = load_state(pipeline, root)
    proxy_record = state.get("proxy") or {}
    proxy_alive = _process_alive(proxy_record.get("pid"), proxy_record.get("create_time"))
    proxy_state: dict[str, Any] | None = None
    if proxy_alive:
        with contextlib.suppress(proxy_mod.ProxyAdminError):
            proxy_state = proxy_mod.get_state(proxy_record["port"], timeout=2.0)
    slots: dict[str, Any] = {}
    for slot in SLOTS:
        record = state["slots"].get(slot)
        if not record:
            slots[slot] = None
            continue
        handle = _handle_from_record(record)
        alive = slot_alive(handle, docker_client)
        ready = False
        if alive:
            with contextlib.suppress(NotReady):
                wait_ready(handle.upstream, timeout=2.0)
                ready = True
        slots[slot] = {**record, "alive": alive, "ready": ready}
    active = state.get("active")
    return {
        "pipeline": pipeline,
        "stable_url": proxy_record.get("url"),
        "active": active,
        "active_version": (state["slots"].get(active) or {}).get("model_version")
        if active
        else None,
        "switched_at": state.get("switched_at"),
        "proxy": {**proxy_record, "alive": proxy_alive, "routing": proxy_state}
        if proxy_record
        else None,
        "slots": slots,
    }
