"""Deploy, rollback, undeploy and status: the operations, each under the pipeline's lock."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.processes import free_port, marked_processes, process_alive, stop_process, terminate
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.container import ContainerResources
from airmlops.serving.deploy.errors import DeployError, DeployFailed, NotReady, RollbackFailed
from airmlops.serving.deploy.proxy_control import ProxyHandle, ensure_proxy_locked
from airmlops.serving.deploy.slots import (
    SmokeResult,
    Validator,
    slot_alive,
    slot_log_tail,
    smoke,
    start_slot,
    stop_slot,
    wait_ready,
)
from airmlops.serving.deploy.state import (
    DEPLOYMENT_MARKER,
    LABEL_DEPLOYMENT,
    SLOTS,
    SlotHandle,
    Target,
    deployment_dir,
    handle_from_record,
    handles_from_record,
    instances,
    iso,
    load_state,
    locked,
    other_slot,
    save_state,
    slot_record,
    upstreams,
    validate_artifact,
    validate_env,
    validate_path,
    validate_pipeline,
    validate_port,
    validate_target,
    validate_version,
)
from airmlops.serving.deploy.supervisor import (
    restart_supervisor,
    stop_supervisor,
    supervisor_alive,
)

if TYPE_CHECKING:
    from docker import DockerClient

logger = logging.getLogger("airmlops.serving.deploy")


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
    replicas: int = 1,
    spares: int = 0,
    alerts: Mapping[str, Any] | None = None,
    supervise: bool = True,
) -> DeployResult:
    """Blue/green deploy of ``version`` (a bento tag for ``process``, an image for ``docker``).

    Starts ``replicas`` model servers of it in the idle slot, plus ``spares`` hot spares (each
    on a free port), waits until every one is ready, smoke-tests each with ``golden`` and
    switches the stable address (``proxy_port``) to them: the replicas share the traffic, the
    spares take it when no replica is healthy. The previous version keeps running in the other
    slot (the rollback target, registered with the address as standby). Any failure raises
    :class:`DeployFailed`, with the new version stopped, the old one serving and the state file
    untouched. ``resources`` limits a ``docker`` version's containers (spec
    ``deploy.resources``). With ``supervise`` the deployment's supervisor is (re)started
    afterwards with ``env`` and the spec's ``alerts`` section, so what dies later is restarted
    and reported (:mod:`airmlops.serving.deploy.supervisor`).
    """
    validate_pipeline(pipeline)
    validate_version(version)
    validate_target(target)
    validate_artifact(target, artifact)
    validate_port(proxy_port)
    validate_path(path)
    validate_env(env)
    for name, value, low in (("replicas", replicas, 1), ("spares", spares, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 8:
            raise ValueError(f"invalid {name} {value!r}: expected an int in {low}..8")
    started_at = iso(now)
    root = Path(root)
    directory = deployment_dir(pipeline, root)
    timings = _Laps()

    with locked(pipeline, root):
        state = load_state(pipeline, root)
        original = json.loads(json.dumps(state))
        try:
            proxy = ensure_proxy_locked(pipeline, proxy_port, root, state, timeout=20.0)
        except (DeployError, proxy_mod.ProxyAdminError, OSError) as exc:
            raise DeployFailed("proxy", str(exc)) from None
        if state != original:  # a (re)started proxy is infrastructure, not the deploy
            save_state(pipeline, root, state)
            original = json.loads(json.dumps(state))
        timings.lap("proxy_s")

        active = state.get("active")
        active_record = state["slots"].get(active) if active else None
        slot = other_slot(active)
        handles: list[SlotHandle] = []
        switched = False
        try:
            for _ in range(replicas + spares):
                handles.append(_start(pipeline, slot, target, artifact, env, directory,
                                      bentoml_home, state["deployment_id"], docker_client,
                                      resources))
            timings.lap("start_s")
            for handle in handles:
                _ready(handle, ready_timeout, docker_client)
            timings.lap("ready_s")
            results = [smoke(handle.upstream, golden, path, latency_budget_ms, validate,
                             headers=headers) for handle in handles]
            failures = [failure for result in results for failure in result.failures]
            if failures:
                raise DeployFailed("smoke", "; ".join(failures[:5]))
            timings.lap("smoke_s")

            upstream_urls = [handle.upstream for handle in handles]
            try:
                proxy_mod.switch(proxy.port, proxy.token, upstream_urls, slot, version=version,
                                 spares=spares)
            except (proxy_mod.ProxyAdminError, ValueError) as exc:
                raise DeployFailed("switch", str(exc)) from None
            switched = True
            timings.lap("switch_s")

            replaced = state["slots"].get(slot)
            state["slots"][slot] = slot_record(handles, version, started_at, spares)
            state["active"] = slot
            state["switched_at"] = started_at
            try:
                save_state(pipeline, root, state)
            except OSError as exc:
                raise DeployFailed("record", f"state could not be written: {exc}") from None
        except BaseException:
            if switched:
                _switch_back(proxy, active, active_record)
            for handle in handles:
                with contextlib.suppress(Exception):
                    stop_slot(handle, timeout=stop_timeout, docker_client=docker_client)
            if state != original:
                with contextlib.suppress(OSError):
                    save_state(pipeline, root, original)
            raise

        if active and active_record:
            _register_standby(proxy, active, active_record)
        if replaced:  # the version before the previous one: no longer a rollback target
            _stop_record(replaced, slot, stop_timeout, docker_client)
        if supervise:
            _supervise(pipeline, root, state, env, alerts)
        timings.lap("cleanup_s")
        timings.total()

    logger.info("%s version %s serves from %s (%s) at %s", pipeline, version, slot,
                ", ".join(upstream_urls), proxy.url)
    return DeployResult(
        pipeline=pipeline,
        version=version,
        slot=slot,
        previous_slot=active if active_record else None,
        previous_version=active_record["model_version"] if active_record else None,
        target=target,
        artifact=artifact,
        upstream=upstream_urls[0],
        stable_url=proxy.url,
        started_at=started_at or "",
        timings=timings.timings,
        smoke=results[0],
    )


class _Laps:
    """Seconds each step of a deploy took (``timings``), and the total."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._started = self._last = time.monotonic()

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self.timings[name] = round(now - self._last, 3)
        self._last = now

    def total(self) -> None:
        self.timings["total_s"] = round(time.monotonic() - self._started, 3)


def _start(pipeline: str, slot: str, target: Target, artifact: str,
           env: Mapping[str, str] | None, directory: Path, bentoml_home: Path | None,
           deployment_id: str, docker_client: DockerClient | None,
           resources: ContainerResources | None) -> SlotHandle:
    port = free_port()
    try:
        return start_slot(
            target, artifact, port, env,
            name=f"{pipeline}-{slot}-{port}".replace("_", "-"),
            log_dir=directory / "logs", bentoml_home=bentoml_home,
            deployment_id=deployment_id, docker_client=docker_client, resources=resources,
        )
    except Exception as exc:
        raise DeployFailed("start", f"{type(exc).__name__}: {exc}") from None


def _ready(handle: SlotHandle, timeout: float, docker_client: DockerClient | None) -> None:
    try:
        wait_ready(handle.upstream, timeout, alive=lambda: slot_alive(handle, docker_client))
    except NotReady as exc:
        raise DeployFailed("readiness", str(exc), slot_log_tail(handle, docker_client)) from None


def _register_standby(proxy: ProxyHandle, slot: str, record: Mapping[str, Any]) -> None:
    """Tell the address the rollback target's servers and version (it may fail over to a slot
    of the live version, never to another version)."""
    try:
        proxy_mod.register(proxy.port, proxy.token, slot, upstreams(record),
                           record.get("model_version"), spares=record.get("spares", 0))
    except proxy_mod.ProxyAdminError as exc:
        logger.warning("could not register %s as standby with the proxy: %s", slot, exc)


def _stop_record(record: Mapping[str, Any], slot: str, timeout: float,
                 docker_client: DockerClient | None) -> None:
    for handle in handles_from_record(record):
        try:
            stop_slot(handle, timeout=timeout, docker_client=docker_client)
        except Exception as exc:  # the deploy stands; the leftover is reported, not fatal
            logger.warning("could not stop the replaced %s version: %s", slot, exc)


def _supervise(pipeline: str, root: Path, state: dict[str, Any],
               env: Mapping[str, str] | None, alerts: Mapping[str, Any] | None) -> None:
    try:
        restart_supervisor(pipeline, root, state, env, alerts)
        save_state(pipeline, root, state)
    except Exception as exc:  # serving works without it; what dies is then not restarted
        logger.error("the supervisor of %s could not be started: %s", pipeline, exc)


def _switch_back(
    proxy: ProxyHandle, active: str | None, active_record: Mapping[str, Any] | None
) -> None:
    """After a switch whose deploy then failed: point the proxy at the old version again."""
    if not active or not active_record:
        return
    try:
        proxy_mod.switch(proxy.port, proxy.token, upstreams(active_record), active,
                         version=active_record.get("model_version"), verify=False,
                         spares=active_record.get("spares", 0))
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

        restarted = False
        handles = []
        for one in instances(record):
            handle = handle_from_record(record, one)
            if not (slot_alive(handle, docker_client) and _ready_now(handle.upstream)):
                with contextlib.suppress(Exception):
                    stop_slot(handle, timeout=5.0, docker_client=docker_client)
                handle = _restart_slot(pipeline, slot, record, extra, directory,
                                       state["deployment_id"], ready_timeout, docker_client)
                restarted = True
            handles.append(handle)
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
        _register_standby(proxy, active, state["slots"][active])
        if not supervisor_alive(state):
            _supervise(pipeline, root, state, extra, None)
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
        "proxy": {**proxy_record, "alive": proxy_alive, "routing": proxy_state}
        if proxy_record
        else None,
        "supervisor": {**(state.get("supervisor") or {}), "alive": supervisor_alive(state)}
        if state.get("supervisor") else None,
        "slots": slots,
    }
