"""Deploy, rollback, undeploy and status: the operations, each under the pipeline's lock.

:func:`deploy` (the blue/green rollout) lives in :mod:`.rollout` and is re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.processes import free_port, marked_processes, process_alive, stop_process, terminate
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.container import ContainerResources
from airmlops.serving.deploy.errors import DeployError, NotReady, RollbackFailed
from airmlops.serving.deploy.proxy_control import ensure_proxy_locked
from airmlops.serving.deploy.rollout import (
    DeployResult,
    deploy,
    register_standby,
    resupervise,
)
from airmlops.serving.deploy.slots import (
    slot_alive,
    slot_log_tail,
    start_slot,
    stop_slot,
    wait_ready,
)
from airmlops.serving.deploy.state import (
    DEPLOYMENT_MARKER,
    LABEL_DEPLOYMENT,
    SLOTS,
    SlotHandle,
    deployment_dir,
    handle_from_record,
    instances,
    iso,
    load_state,
    locked,
    other_slot,
    save_state,
    slot_record,
    upstreams,
    validate_env,
    validate_pipeline,
)
from airmlops.serving.deploy.supervisor import stop_supervisor, supervisor_alive

if TYPE_CHECKING:
    from docker import DockerClient

__all__ = ["DeployResult", "RollbackResult", "deploy", "rollback", "status", "undeploy"]

logger = logging.getLogger("airmlops.serving.deploy")


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
    restarted_at = iso(now)
    root = Path(root)
    directory = deployment_dir(pipeline, root)
    clock = time.monotonic()
    with locked(pipeline, root):
        state = load_state(pipeline, root)
        active = state.get("active")
        slot = other_slot(active)
        record = state["slots"].get(slot)
        if not active or not record:
            raise RollbackFailed(f"{pipeline} has no previous version to roll back to")
        proxy_record = state.get("proxy") or {}
        if not proxy_record.get("port"):
            raise RollbackFailed(f"{pipeline} has no stable address (proxy) recorded")
        try:
            proxy = ensure_proxy_locked(pipeline, proxy_record["port"], root, state, timeout=20.0)
        except (DeployError, proxy_mod.ProxyAdminError, OSError) as exc:
            raise RollbackFailed(f"the proxy of {pipeline} is not available: {exc}") from None
        save_state(pipeline, root, state)  # a restarted proxy is recorded whatever follows

        handles, restarted = _revive(pipeline, slot, record, extra, directory,
                                     state["deployment_id"], ready_timeout, docker_client)
        if restarted:
            record = slot_record(handles, record["model_version"],
                                 restarted_at or record.get("started_at"),
                                 record.get("spares", 0))
        try:
            proxy_mod.switch(proxy.port, proxy.token, upstreams(record), slot,
                             version=record["model_version"], spares=record.get("spares", 0))
        except (proxy_mod.ProxyAdminError, ValueError) as exc:
            if restarted:
                for handle in handles:
                    with contextlib.suppress(Exception):
                        stop_slot(handle, timeout=5.0, docker_client=docker_client)
            raise RollbackFailed(f"the proxy refused the switch back: {exc}") from None
        state["slots"][slot] = record
        state["active"] = slot
        state["switched_at"] = restarted_at or state.get("switched_at")
        save_state(pipeline, root, state)
        register_standby(proxy, active, state["slots"][active])
        if not supervisor_alive(state):
            resupervise(pipeline, root, state, extra, None)
    return RollbackResult(
        pipeline=pipeline,
        slot=slot,
        version=record["model_version"],
        previous_slot=active,
        upstream=handles[0].upstream,
        stable_url=proxy.url,
        restarted=restarted,
        seconds=round(time.monotonic() - clock, 3),
    )


def _revive(
    pipeline: str,
    slot: str,
    record: Mapping[str, Any],
    env: Mapping[str, str],
    directory: Path,
    deployment_id: str,
    ready_timeout: float,
    docker_client: DockerClient | None,
) -> tuple[list[SlotHandle], bool]:
    """The handles of the recorded slot's servers, each dead or unready one stopped and started
    again; and whether any was."""
    restarted = False
    handles = []
    for one in instances(record):
        handle = handle_from_record(record, one)
        if not (slot_alive(handle, docker_client) and _ready_now(handle.upstream)):
            with contextlib.suppress(Exception):
                stop_slot(handle, timeout=5.0, docker_client=docker_client)
            handle = _restart_slot(pipeline, slot, record, env, directory, deployment_id,
                                   ready_timeout, docker_client)
            restarted = True
        handles.append(handle)
    return handles, restarted


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
    """Whether the server at ``upstream`` answers ready within 3 s."""
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
    with locked(pipeline, root):
        state = load_state(pipeline, root)
        if stop_supervisor(state, timeout):  # first: it would restart what is stopped next
            stopped.append("supervisor")
        proxy_record = state.get("proxy") or {}
        if stop_process(proxy_record.get("pid"), proxy_record.get("create_time"), None, timeout):
            stopped.append("proxy")
        for slot in SLOTS:
            record = state["slots"].get(slot)
            if not record:
                continue
            try:
                if stop_slot(
                    handle_from_record(record), timeout=timeout, docker_client=docker_client
                ):
                    stopped.append(slot)
            except Exception as exc:
                raise DeployError(f"could not stop slot {slot} of {pipeline}: {exc}") from None
        deployment_id = state["deployment_id"]
        stopped += _remove_labelled_containers(
            deployment_id, docker_client, any_docker=_uses_docker(state)
        )
        leftovers = marked_processes(DEPLOYMENT_MARKER, deployment_id)
        if leftovers:
            still = terminate(leftovers, timeout)
            if still:
                raise DeployError(f"could not stop processes {[p.pid for p in still]}")
            stopped.append(f"{len(leftovers)} leftover process(es)")
        state.update(proxy=None, supervisor=None, active=None, switched_at=None,
                     slots=dict.fromkeys(SLOTS))
        save_state(pipeline, root, state)
    return stopped


def _uses_docker(state: Mapping[str, Any]) -> bool:
    """Whether either slot runs a ``docker`` version."""
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
    proxy_alive = process_alive(proxy_record.get("pid"), proxy_record.get("create_time"))
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
        handle = handle_from_record(record)
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
        "canary": state.get("canary"),
        "shadow": state.get("shadow"),
        "proxy": {**proxy_record, "alive": proxy_alive, "routing": proxy_state}
        if proxy_record
        else None,
        "supervisor": {**(state.get("supervisor") or {}), "alive": supervisor_alive(state)}
        if state.get("supervisor") else None,
        "slots": slots,
    }
