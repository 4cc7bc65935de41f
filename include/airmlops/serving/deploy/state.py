"""A deployment's vocabulary and its recorded state.

Constants (slots, markers, labels), the validation of everything that reaches a process or the
Docker engine, and ``<data_root>/deployments/<pipeline>/state.json`` (atomic writes, one
operation at a time per pipeline through a lock file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from airmlops.names import is_name
from airmlops.paths import atomic_write_json, exclusive_lock, safe_join
from airmlops.processes import MODEL_SERVICE, child_env
from airmlops.serving.deploy.errors import DeployError

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

_VERSION_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.+-]{0,62}[A-Za-z0-9])?$")
_BENTO_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,62}[a-z0-9])?$")
_BENTO_VERSION_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,126}[A-Za-z0-9])?$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_./-]{0,200}$")
_MIN_PORT = 1024
LOG_TAIL_LINES = 100
"""Lines of a failed version's output kept in the error (a traceback plus what follows it)."""


def validate_pipeline(name: str) -> str:
    """Return ``name`` if it is a valid pipeline name (the spec's rule); else ValueError."""
    if not is_name(name):
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


def validate_target(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"invalid deploy target {target!r}: expected one of {list(TARGETS)}")
    return target


def validate_artifact(target: str, artifact: str) -> str:
    if target == "process":
        return validate_bento_tag(artifact)
    from airmlops.serving.docker_engine import validate_image_ref

    return validate_image_ref(artifact)


def validate_path(path: str) -> str:
    if not isinstance(path, str) or not _PATH_RE.fullmatch(path) or ".." in path:
        raise ValueError(f"invalid request path {path!r}")
    return path


def other_slot(slot: str | None) -> str:
    return SLOTS[1] if slot == SLOTS[0] else SLOTS[0]


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
        "supervisor": None,
        "active": None,
        "switched_at": None,
        "slots": dict.fromkeys(SLOTS),
    }


def save_state(pipeline: str, root: Path, state: Mapping[str, Any]) -> None:
    atomic_write_json(state_path(pipeline, root), dict(state))


@contextlib.contextmanager
def locked(pipeline: str, root: Path) -> Iterator[None]:
    """One deploy, rollback or undeploy at a time per pipeline (blocking)."""
    with exclusive_lock(deployment_dir(pipeline, root) / ".lock"):
        yield


def iso(now: dt.datetime | None) -> str | None:
    if now is None:
        return None
    if now.tzinfo is None:
        raise ValueError("times must be timezone-aware")
    return now.isoformat()


INSTANCE_KEYS = ("upstream", "port", "pid", "create_time", "container_id", "container_name",
                 "instance", "log_path")
"""What a slot record holds per started model server (the primary at the top level, the others
under ``replicas``)."""


def instance_record(handle: SlotHandle) -> dict[str, Any]:
    return {
        "upstream": handle.upstream,
        "port": handle.port,
        "pid": handle.pid,
        "create_time": handle.create_time,
        "container_id": handle.container_id,
        "container_name": handle.container_name,
        "instance": handle.instance,
        "log_path": handle.log_path,
    }


def slot_record(
    handles: SlotHandle | Sequence[SlotHandle], version: str, started_at: str | None,
    spares: int = 0,
) -> dict[str, Any]:
    """The record of a slot serving ``version`` from ``handles`` (the first is the primary; the
    last ``spares`` are hot spares)."""
    handles = [handles] if isinstance(handles, SlotHandle) else list(handles)
    primary = handles[0]
    return {
        "model_version": version,
        "target": primary.target,
        "artifact": primary.artifact,
        **instance_record(primary),
        "bentoml_home": primary.bentoml_home,
        "resources": dict(primary.resources) if primary.resources else None,
        "started_at": started_at,
        "replicas": [instance_record(handle) for handle in handles[1:]],
        "spares": spares,
    }


def handle_from_record(record: Mapping[str, Any], instance: Mapping[str, Any] | None = None
                       ) -> SlotHandle:
    """The handle of one model server of a slot record (``instance``: one of its
    :func:`instances`; default the primary)."""
    one = record if instance is None else instance
    return SlotHandle(
        target=record["target"],
        artifact=record["artifact"],
        port=int(one["port"]),
        instance=one["instance"],
        pid=one.get("pid"),
        create_time=one.get("create_time"),
        container_id=one.get("container_id"),
        container_name=one.get("container_name"),
        log_path=one.get("log_path"),
        bentoml_home=record.get("bentoml_home"),
        resources=record.get("resources"),
    )


def instances(record: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The model servers of a slot record: the primary (the record itself), then its replicas."""
    return [record, *record.get("replicas", ())]


def handles_from_record(record: Mapping[str, Any]) -> list[SlotHandle]:
    return [handle_from_record(record, one) for one in instances(record)]


def upstreams(record: Mapping[str, Any]) -> list[str]:
    """Every model server's URL of a slot record, the primary first."""
    return [one["upstream"] for one in instances(record)]
