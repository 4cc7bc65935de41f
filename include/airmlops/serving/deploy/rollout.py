"""Deploy: a blue/green rollout of one version under the pipeline's lock.

The new version's servers start in the idle slot, must be ready and pass the smoke test, then
the stable address switches to them; any failure stops them and leaves the old version serving
and the state file as it was. With a canary plan the switch waits until the traffic has moved to
them in steps, each judged against the old version (:mod:`.canary`); with a shadow plan, until
they have answered a copy of live traffic and passed the promotion rule (:mod:`.shadow`). The
last canary's steps and the last shadow's judgement are kept under ``canary`` and ``shadow`` in
the state file, whatever their outcome. :func:`register_standby` and
:func:`resupervise` are shared with rollback (:mod:`.orchestration`).
"""

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

from airmlops.processes import free_port
from airmlops.serving import proxy as proxy_mod
from airmlops.serving.container import ContainerResources
from airmlops.serving.deploy import decisions
from airmlops.serving.deploy.canary import CanaryPlan, TrialTarget, run_canary
from airmlops.serving.deploy.errors import (
    CanaryAborted,
    CanaryFailed,
    DeployError,
    DeployFailed,
    NotReady,
    ShadowRejected,
)
from airmlops.serving.deploy.proxy_control import ProxyHandle, ensure_proxy_locked
from airmlops.serving.deploy.shadow import ShadowPlan, idle_cpu_class, run_shadow
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
    SlotHandle,
    Target,
    deployment_dir,
    handles_from_record,
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
from airmlops.serving.deploy.supervisor import restart_supervisor

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
    canary: list[dict[str, Any]] | None = None
    shadow: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data."""
        data = dataclasses.asdict(self)
        data["smoke"] = self.smoke.to_dict()
        return data


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
    canary: CanaryPlan | None = None,
    shadow: ShadowPlan | None = None,
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
    and reported (:mod:`airmlops.serving.deploy.supervisor`). With a ``canary`` or ``shadow``
    plan (and a live version to judge it against) the new version is first tried beside the
    live one (:mod:`.canary`, :mod:`.shadow`): a failed trial raises :class:`CanaryFailed` or
    :class:`ShadowRejected`.
    """
    _validate_deploy(pipeline, version, target, artifact, proxy_port, path, env, replicas, spares)
    root = Path(root)
    request = _DeployRequest(
        pipeline=pipeline, version=version, artifact=artifact, target=target, golden=golden,
        root=root, directory=deployment_dir(pipeline, root), ready_timeout=ready_timeout,
        latency_budget_ms=latency_budget_ms, started_at=iso(now), validate=validate, path=path,
        env=env, bentoml_home=bentoml_home, docker_client=docker_client,
        stop_timeout=stop_timeout, headers=headers, resources=resources, replicas=replicas,
        spares=spares, canary=canary, shadow=shadow, alerts=alerts)
    timings = _Laps()
    with locked(pipeline, root):
        state = load_state(pipeline, root)
        proxy, original = _proxy_for_deploy(request, proxy_port, state)
        timings.lap("proxy_s")
        active, active_record, slot = _live_and_idle(state)
        handles: list[SlotHandle] = []
        switched = False
        try:
            results = _start_and_smoke(request, slot, state["deployment_id"], handles, timings)
            steps, judgement = _trials(request, proxy, slot, active, active_record, handles,
                                       timings, state)
            _switch(request, proxy, slot, handles)
            switched = True
            timings.lap("switch_s")
            replaced = _record_switch(request, state, slot, handles, steps, judgement)
        except BaseException as exc:
            if switched:
                _switch_back(proxy, active, active_record)
            _end_trial(request, proxy, slot, original)
            _abandon(request, handles, state, original)
            _record_failed_trial(request, slot, exc)
            raise
        _after_switch(request, proxy, state, active, active_record, slot, replaced,
                      supervise, alerts)
        timings.lap("cleanup_s", last=True)
    return _deploy_result(request, proxy, slot, active, active_record, handles, timings,
                          results[0], steps, judgement)


@dataclasses.dataclass(frozen=True)
class _DeployRequest:
    """One deploy's checked arguments, handed from step to step."""

    pipeline: str
    version: str
    artifact: str
    target: Target
    golden: Sequence[Mapping[str, Any]]
    root: Path
    directory: Path
    ready_timeout: float
    latency_budget_ms: float
    started_at: str
    validate: Validator | None
    path: str
    env: Mapping[str, str] | None
    bentoml_home: Path | None
    docker_client: DockerClient | None
    stop_timeout: float
    headers: Mapping[str, str] | None
    resources: ContainerResources | None
    replicas: int
    spares: int
    canary: CanaryPlan | None = None
    shadow: ShadowPlan | None = None
    alerts: Mapping[str, Any] | None = None


def _live_and_idle(state: Mapping[str, Any]
                   ) -> tuple[str | None, Mapping[str, Any] | None, str]:
    """The live slot and its record (None, None before the first deploy), and the idle slot
    the new version goes to."""
    active = state.get("active")
    return active, state["slots"].get(active) if active else None, other_slot(active)


def _validate_deploy(pipeline: str, version: str, target: Target, artifact: str,
                     proxy_port: int, path: str, env: Mapping[str, str] | None,
                     replicas: int, spares: int) -> None:
    """Refuse (ValueError) any deploy argument that is not well-formed."""
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


def _proxy_for_deploy(request: _DeployRequest, proxy_port: int,
                      state: dict[str, Any]) -> tuple[ProxyHandle, dict[str, Any]]:
    """The running stable address (started if need be) and a copy of ``state`` to restore on
    failure; a (re)started proxy is infrastructure, not the deploy, so it is saved at once."""
    original = json.loads(json.dumps(state))
    try:
        proxy = ensure_proxy_locked(request.pipeline, proxy_port, request.root, state,
                                    timeout=20.0)
    except (DeployError, proxy_mod.ProxyAdminError, OSError) as exc:
        raise DeployFailed("proxy", str(exc)) from None
    if state != original:
        save_state(request.pipeline, request.root, state)
        original = json.loads(json.dumps(state))
    return proxy, original


def _start_and_smoke(request: _DeployRequest, slot: str, deployment_id: str,
                     handles: list[SlotHandle], timings: _Laps) -> list[SmokeResult]:
    """Start the replicas and spares into ``handles`` (so a failure can stop those already
    started), wait until each is ready and smoke-test each; DeployFailed on any failure."""
    for _ in range(request.replicas + request.spares):
        handles.append(_start(request.pipeline, slot, request.target, request.artifact,
                              request.env, request.directory, request.bentoml_home,
                              deployment_id, request.docker_client, request.resources))
    timings.lap("start_s")
    for handle in handles:
        _ready(handle, request.ready_timeout, request.docker_client)
    timings.lap("ready_s")
    results = [smoke(handle.upstream, request.golden, request.path, request.latency_budget_ms,
                     request.validate, headers=request.headers) for handle in handles]
    failures = [failure for result in results for failure in result.failures]
    if failures:
        raise DeployFailed("smoke", "; ".join(failures[:5]))
    timings.lap("smoke_s")
    return results


def _switch(request: _DeployRequest, proxy: ProxyHandle, slot: str,
            handles: Sequence[SlotHandle]) -> None:
    """Point the stable address at the new slot's servers."""
    try:
        proxy_mod.switch(proxy.port, proxy.token, [handle.upstream for handle in handles], slot,
                         version=request.version, spares=request.spares)
    except (proxy_mod.ProxyAdminError, ValueError) as exc:
        raise DeployFailed("switch", str(exc)) from None


def _record_switch(request: _DeployRequest, state: dict[str, Any], slot: str,
                   handles: Sequence[SlotHandle], steps: list[dict[str, Any]] | None,
                   judgement: dict[str, Any] | None) -> Mapping[str, Any] | None:
    """Record the new slot as active in the state file (and the canary's steps or the
    shadow's judgement, if it had one); returns the record it replaced."""
    replaced = state["slots"].get(slot)
    state["slots"][slot] = slot_record(handles, request.version, request.started_at,
                                       request.spares)
    state["active"] = slot
    state["switched_at"] = request.started_at
    if steps is not None:
        state["canary"] = _canary_record(request, slot, "promoted", steps)
    if judgement is not None:
        state["shadow"] = _shadow_record(request, slot, "promoted", judgement)
    try:
        save_state(request.pipeline, request.root, state)
    except OSError as exc:
        raise DeployFailed("record", f"state could not be written: {exc}") from None
    if judgement is not None:
        decisions.discard_decision(request.pipeline, request.root)
    return replaced


def _trials(request: _DeployRequest, proxy: ProxyHandle, slot: str, active: str | None,
            active_record: Mapping[str, Any] | None, handles: Sequence[SlotHandle],
            timings: _Laps, state: dict[str, Any]
            ) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    """The canary's steps and the shadow's judgement (each None without its plan)."""
    return (_canary(request, proxy, slot, active, active_record, handles, timings),
            _shadow(request, proxy, slot, active, active_record, handles, timings, state))


def _canary(request: _DeployRequest, proxy: ProxyHandle, slot: str, active: str | None,
            active_record: Mapping[str, Any] | None, handles: Sequence[SlotHandle],
            timings: _Laps) -> list[dict[str, Any]] | None:
    """Walk the canary's steps with the new slot beside the live one; its steps' numbers,
    None without a canary plan or a live version to compare with. CanaryFailed when a step
    judges it worse, DeployFailed when the address cannot be driven."""
    if request.canary is None:
        return None
    if not _beside_live(request, proxy, slot, active, active_record, handles, "canary"):
        return None
    steps: list[dict[str, Any]] = []
    try:
        run_canary(TrialTarget(proxy.port, proxy.token, slot, active), request.canary,
                   steps=steps)
    except (proxy_mod.ProxyAdminError, ValueError) as exc:
        raise CanaryAborted(str(exc), steps) from None
    timings.lap("canary_s")
    return steps


def _shadow(request: _DeployRequest, proxy: ProxyHandle, slot: str, active: str | None,
            active_record: Mapping[str, Any] | None, handles: Sequence[SlotHandle],
            timings: _Laps, state: dict[str, Any]) -> dict[str, Any] | None:
    """Mirror live traffic to the new slot and judge it; the judgement, None without a shadow
    plan or a live version to mirror. ShadowRejected when the rule is not met (or a person
    rejected it), DeployFailed when the address cannot be driven. While it runs, the state
    file says so (the failure path puts the state back)."""
    if request.shadow is None:
        return None
    if not _beside_live(request, proxy, slot, active, active_record, handles, "shadow"):
        return None
    channel = decisions.DecisionChannel(request.pipeline, request.root, request.version)
    decisions.discard_decision(request.pipeline, request.root)  # none predates the shadow
    try:
        with idle_cpu_class(handles, f"{request.pipeline}-{slot}", request.docker_client) as how:
            state["shadow"] = decisions.running_record(request.version, slot,
                                                       request.started_at, request.shadow)
            save_state(request.pipeline, request.root, state)
            judgement = run_shadow(TrialTarget(proxy.port, proxy.token, slot, active),
                                   request.shadow, decisions=channel,
                                   on_waiting=lambda advice: _awaiting(request, state, advice))
        judgement["cpu_class"] = how
    except (proxy_mod.ProxyAdminError, ValueError) as exc:
        raise DeployFailed("shadow", str(exc)) from None
    timings.lap("shadow_s")
    return judgement


def _beside_live(request: _DeployRequest, proxy: ProxyHandle, slot: str, active: str | None,
                 active_record: Mapping[str, Any] | None, handles: Sequence[SlotHandle],
                 trial: str) -> bool:
    """Register the new slot with the address beside the live one, for a ``trial`` (canary
    or shadow); False when there is no live version to judge it against."""
    if not active or not active_record:
        logger.info("%s: no live version to compare a %s with; switching at once",
                    request.pipeline, trial)
        return False
    try:
        proxy_mod.register(proxy.port, proxy.token, slot, [h.upstream for h in handles],
                           request.version, spares=request.spares)
    except (proxy_mod.ProxyAdminError, ValueError) as exc:
        raise DeployFailed(trial, str(exc)) from None
    return True


def _end_trial(request: _DeployRequest, proxy: ProxyHandle, slot: str,
               original: Mapping[str, Any]) -> None:
    """After a failed canary or shadow deploy: all traffic back on the live version only,
    and the new slot's registration back to what it was (its previous occupant, the rollback
    target, or none)."""
    if request.canary is None and request.shadow is None:
        return
    try:
        if request.canary is not None:
            proxy_mod.clear_canary(proxy.port, proxy.token)
        if request.shadow is not None:
            proxy_mod.clear_shadow(proxy.port, proxy.token)
        previous = original["slots"].get(slot)
        if previous:
            register_standby(proxy, slot, previous)
        elif slot != original.get("active"):
            proxy_mod.register(proxy.port, proxy.token, slot, [], None)
    except proxy_mod.ProxyAdminError as exc:
        logger.error("could not end the trial of %s: %s", request.pipeline, exc)


def _canary_record(request: _DeployRequest, slot: str, outcome: str,
                   steps: list[dict[str, Any]]) -> dict[str, Any]:
    """What the state file keeps of the last canary: its version, slot, outcome and steps."""
    return {"version": request.version, "slot": slot, "started_at": request.started_at,
            "outcome": outcome, "steps": steps}


def _shadow_record(request: _DeployRequest, slot: str, outcome: str,
                   judgement: dict[str, Any]) -> dict[str, Any]:
    """What the state file keeps of the last shadow: its version, slot, outcome and
    judgement (the window, both sides' traffic, the comparison and the rules broken)."""
    return {"version": request.version, "slot": slot, "started_at": request.started_at,
            "outcome": outcome, "judgement": judgement,
            "promotion": judgement.get("promotion"), "decided_by": judgement.get("decided_by"),
            "decision": judgement.get("decision")}


def _awaiting(request: _DeployRequest, state: dict[str, Any], advice: dict[str, Any]) -> None:
    """A manual shadow's window ended: record that it awaits a decision, with the rule's
    advice, and send the alert saying so."""
    state["shadow"] = {**state["shadow"], "status": "awaiting", "judgement": advice}
    save_state(request.pipeline, request.root, state)
    decisions.announce_awaiting(request.pipeline, request.alerts, request.version, advice,
                                state["shadow"]["decision_timeout_seconds"])


def _record_failed_trial(request: _DeployRequest, slot: str, exc: BaseException) -> None:
    """Keep a failed canary's steps or a rejected shadow's judgement in the state file
    (nothing else changes there)."""
    if isinstance(exc, CanaryFailed | CanaryAborted):
        outcome = "rolled_back" if isinstance(exc, CanaryFailed) else "aborted"
        key, record = "canary", _canary_record(request, slot, outcome, exc.steps)
    elif isinstance(exc, ShadowRejected):
        key, record = "shadow", _shadow_record(request, slot, "rejected", exc.judgement)
    else:
        return
    try:
        state = load_state(request.pipeline, request.root)
        state[key] = record
        save_state(request.pipeline, request.root, state)
        if key == "shadow":
            decisions.discard_decision(request.pipeline, request.root)
    except (OSError, DeployError) as error:
        logger.error("could not record the failed %s of %s: %s", key, request.pipeline, error)


def _abandon(request: _DeployRequest, handles: Sequence[SlotHandle], state: dict[str, Any],
             original: dict[str, Any]) -> None:
    """After a failed deploy: stop what it started and put the state file back."""
    for handle in handles:
        with contextlib.suppress(Exception):
            stop_slot(handle, timeout=request.stop_timeout, docker_client=request.docker_client)
    if state != original:
        with contextlib.suppress(OSError):
            save_state(request.pipeline, request.root, original)


def _after_switch(request: _DeployRequest, proxy: ProxyHandle, state: dict[str, Any],
                  active: str | None, active_record: Mapping[str, Any] | None, slot: str,
                  replaced: Mapping[str, Any] | None, supervise: bool,
                  alerts: Mapping[str, Any] | None) -> None:
    """The deploy stands: register the previous version as standby, stop the one before it
    and (re)start the supervisor. Nothing here undoes the deploy."""
    if active and active_record:
        register_standby(proxy, active, active_record)
    if replaced:  # the version before the previous one: no longer a rollback target
        _stop_record(replaced, slot, request.stop_timeout, request.docker_client)
    if supervise:
        resupervise(request.pipeline, request.root, state, request.env, alerts)


def _deploy_result(request: _DeployRequest, proxy: ProxyHandle, slot: str, active: str | None,
                   active_record: Mapping[str, Any] | None, handles: Sequence[SlotHandle],
                   timings: _Laps, smoke_result: SmokeResult,
                   steps: list[dict[str, Any]] | None = None,
                   judgement: dict[str, Any] | None = None) -> DeployResult:
    """Log the deploy and describe it."""
    upstream_urls = [handle.upstream for handle in handles]
    logger.info("%s version %s serves from %s (%s) at %s", request.pipeline, request.version,
                slot, ", ".join(upstream_urls), proxy.url)
    return DeployResult(
        pipeline=request.pipeline,
        version=request.version,
        slot=slot,
        previous_slot=active if active_record else None,
        previous_version=active_record["model_version"] if active_record else None,
        target=request.target,
        artifact=request.artifact,
        upstream=upstream_urls[0],
        stable_url=proxy.url,
        started_at=request.started_at or "",
        timings=timings.timings,
        smoke=smoke_result,
        canary=steps,
        shadow=judgement,
    )


class _Laps:
    """Seconds each step of a deploy took (``timings``), and the total."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._started = self._last = time.monotonic()

    def lap(self, name: str, *, last: bool = False) -> None:
        """Record the seconds since the previous lap as ``name`` (and, for the ``last`` one,
        the total)."""
        now = time.monotonic()
        self.timings[name] = round(now - self._last, 3)
        self._last = now
        if last:
            self.total()

    def total(self) -> None:
        """Record the seconds since the start as ``total_s``."""
        self.timings["total_s"] = round(time.monotonic() - self._started, 3)


def _start(pipeline: str, slot: str, target: Target, artifact: str,
           env: Mapping[str, str] | None, directory: Path, bentoml_home: Path | None,
           deployment_id: str, docker_client: DockerClient | None,
           resources: ContainerResources | None) -> SlotHandle:
    """Start one server of the new version on a free port; DeployFailed if it cannot."""
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
    """Wait until ``handle`` is ready; DeployFailed (with its log's tail) if it is not."""
    try:
        wait_ready(handle.upstream, timeout, alive=lambda: slot_alive(handle, docker_client))
    except NotReady as exc:
        raise DeployFailed("readiness", str(exc), slot_log_tail(handle, docker_client)) from None


def register_standby(proxy: ProxyHandle, slot: str, record: Mapping[str, Any]) -> None:
    """Tell the address the rollback target's servers and version (it may fail over to a slot
    of the live version, never to another version)."""
    try:
        proxy_mod.register(proxy.port, proxy.token, slot, upstreams(record),
                           record.get("model_version"), spares=record.get("spares", 0))
    except proxy_mod.ProxyAdminError as exc:
        logger.warning("could not register %s as standby with the proxy: %s", slot, exc)


def _stop_record(record: Mapping[str, Any], slot: str, timeout: float,
                 docker_client: DockerClient | None) -> None:
    """Stop the servers of a replaced slot ``record``; a failure is logged, not raised."""
    for handle in handles_from_record(record):
        try:
            stop_slot(handle, timeout=timeout, docker_client=docker_client)
        except Exception as exc:  # the deploy stands; the leftover is reported, not fatal
            logger.warning("could not stop the replaced %s version: %s", slot, exc)


def resupervise(pipeline: str, root: Path, state: dict[str, Any],
                env: Mapping[str, str] | None, alerts: Mapping[str, Any] | None) -> None:
    """(Re)start the deployment's supervisor and record it; a failure is logged, not raised."""
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
