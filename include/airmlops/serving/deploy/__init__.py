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

With ``deploy.strategy: canary`` the switch comes only after the traffic has moved to the new
version in steps, each judged against the live version (:mod:`.canary`); with
``deploy.strategy: shadow``, only after it has answered a copy of live traffic and met the
spec's promotion rule (:mod:`.shadow`).

The package's rooms: :mod:`.state` (vocabulary, validation, the state file),
:mod:`.slots` (one model server started, checked, stopped), :mod:`.proxy_control` (the stable
address's process), :mod:`.orchestration` (deploy, rollback, undeploy, status),
:mod:`.canary` (the steps and their judgement), :mod:`.shadow` (the mirrored window and its
promotion rule) and :mod:`.supervisor` (restarts what died).
Process helpers are :mod:`airmlops.processes`'s, shared with the platform's own components.
"""

from __future__ import annotations

from airmlops.processes import free_port, marked_processes, process_alive
from airmlops.serving.deploy.canary import CanaryPlan
from airmlops.serving.deploy.errors import (
    CanaryAborted,
    CanaryFailed,
    DeployError,
    DeployFailed,
    NotReady,
    RollbackFailed,
    ShadowRejected,
)
from airmlops.serving.deploy.orchestration import (
    DeployResult,
    RollbackResult,
    deploy,
    rollback,
    status,
    undeploy,
)
from airmlops.serving.deploy.proxy_control import ProxyHandle, ensure_proxy
from airmlops.serving.deploy.shadow import ShadowPlan
from airmlops.serving.deploy.slots import (
    SmokeResult,
    slot_alive,
    slot_log_tail,
    smoke,
    start_slot,
    stop_slot,
    wait_ready,
)
from airmlops.serving.deploy.state import (
    DEPLOYMENT_MARKER,
    INSTANCE_MARKER,
    LABEL_DEPLOYMENT,
    LABEL_INSTANCE,
    SLOTS,
    TARGETS,
    SlotHandle,
    deployment_dir,
    load_state,
    state_path,
    validate_bento_tag,
    validate_env,
    validate_pipeline,
    validate_port,
    validate_version,
)

__all__ = [
    "DEPLOYMENT_MARKER", "INSTANCE_MARKER", "LABEL_DEPLOYMENT", "LABEL_INSTANCE", "SLOTS",
    "TARGETS", "CanaryAborted", "CanaryFailed", "CanaryPlan", "DeployError", "DeployFailed",
    "DeployResult", "NotReady", "ProxyHandle", "RollbackFailed", "RollbackResult", "ShadowPlan",
    "ShadowRejected", "SlotHandle", "SmokeResult", "deploy", "deployment_dir",
    "ensure_proxy", "free_port", "load_state", "marked_processes", "process_alive", "rollback",
    "slot_alive", "slot_log_tail", "smoke", "start_slot", "state_path", "status", "stop_slot",
    "undeploy", "validate_bento_tag", "validate_env", "validate_pipeline", "validate_port",
    "validate_version", "wait_ready",
]
