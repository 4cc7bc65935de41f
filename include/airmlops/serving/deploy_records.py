"""What a canary or shadow deploy leaves in the model registry, on the version it tried.

When a canary ends, promoted or rolled back, the deploy stage records it on the MLflow model
version: the whole record (outcome, plan, every step's numbers) as the JSON artifact
``deploy/canary-<version>.json`` of the run that produced the version, and compact version tags
to filter and read at a glance:

* ``canary.outcome``: ``promoted`` or ``rolled_back``;
* ``canary.steps``: the percents of the steps run, e.g. ``5,25,50,100`` (a rolled-back canary
  stops at its failed step);
* ``canary.failed_step``: the percent of the failed step (rolled back only; removed when a
  later canary of the same version is promoted);
* ``canary.artifact``: where the record is, ``runs:/<run id>/deploy/canary-<version>.json``.

A shadow deploy, promoted or rejected, leaves its judgement (the mirrored window's traffic on
both sides, the comparison of the two models' predictions and the rules broken) the same way:
the artifact ``deploy/shadow-<version>.json`` and the tags ``shadow.outcome`` (``promoted`` or
``rejected``), ``shadow.pairs``, ``shadow.agreement``, ``shadow.score_ks`` and
``shadow.artifact``.

The deployment state file keeps the same records for the MLOps view. Writing here is best effort:
the deploy has already been decided, so a failure is logged and never raised.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from airmlops.serving.deploy.canary import CanaryPlan

log = logging.getLogger("airmlops.stages")

OUTCOMES = ("promoted", "rolled_back")
"""How a canary ends: every step passed and the version switched to, or a step failed."""

ARTIFACT_DIR = "deploy"
"""The folder of the version's run holding the canary records."""


def canary_record(pipeline: str, version: str, outcome: str,
                  steps: Sequence[Mapping[str, Any]], plan: CanaryPlan | None,
                  started_at: str | None) -> dict[str, Any]:
    """The JSON-ready record of one canary: what the state file keeps, plus the plan."""
    if outcome not in OUTCOMES:
        raise ValueError(f"canary outcome must be one of {OUTCOMES}, got {outcome!r}")
    failed = [step for step in steps if step.get("verdict") != "pass"]
    return {"pipeline": pipeline, "version": str(version), "outcome": outcome,
            "started_at": started_at,
            "plan": _plan_dict(plan),
            "failed_step": failed[-1].get("percent") if failed else None,
            "steps": [dict(step) for step in steps]}


def canary_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """The compact version tags of a record (without ``canary.artifact``)."""
    tags = {"canary.outcome": str(record["outcome"]),
            "canary.steps": ",".join(str(step.get("percent")) for step in record["steps"])}
    if record.get("failed_step") is not None:
        tags["canary.failed_step"] = str(record["failed_step"])
    return tags


def shadow_tags(record: Mapping[str, Any]) -> dict[str, str]:
    """The compact version tags of a shadow record (``{"outcome", "judgement", "decided_by"}``
    as the state file keeps it; without ``shadow.artifact``)."""
    judgement = record.get("judgement") or {}
    comparison = judgement.get("comparison") or {}
    tags = {"shadow.outcome": str(record["outcome"])}
    decided_by = record.get("decided_by") or judgement.get("decided_by")
    if decided_by:  # a user of the MLOps view, the rule or a timeout
        tags["shadow.decided_by"] = str(decided_by)[:200]
    for key, field in (("shadow.pairs", "pairs"), ("shadow.agreement", "agreement_rate"),
                       ("shadow.score_ks", "score_ks")):
        value = comparison.get(field)
        if value is not None:
            tags[key] = f"{value:.4f}" if isinstance(value, float) else str(value)
    return tags


def artifact_path(version: str, kind: str = "canary") -> str:
    """The record's path in the version's run: ``deploy/<kind>-<version>.json``."""
    version = str(version)
    if not version.isdigit():
        raise ValueError(f"model version must be a number, got {version!r}")
    if kind not in ("canary", "shadow"):
        raise ValueError(f"record kind must be canary or shadow, got {kind!r}")
    return f"{ARTIFACT_DIR}/{kind}-{version}.json"


def record_canary(name: str, version: str, record: Mapping[str, Any],
                  tracking_uri: str) -> bool:
    """Write ``record`` on model version ``version`` of ``name``: the artifact on its run, then
    the tags. True when all of it was written; on any failure, logs why and returns False (the
    deploy stands or falls on its own, not on this record). Safe to repeat."""
    return _record("canary", name, version, record, canary_tags(record), tracking_uri)


def record_shadow(name: str, version: str, record: Mapping[str, Any],
                  tracking_uri: str) -> bool:
    """Write a shadow ``record`` on model version ``version`` of ``name``, as
    :func:`record_canary` does (best effort, safe to repeat)."""
    return _record("shadow", name, version, record, shadow_tags(record), tracking_uri)


def _record(kind: str, name: str, version: str, record: Mapping[str, Any],
            tags: dict[str, str], tracking_uri: str) -> bool:
    """The artifact of a ``kind`` record on the version's run, then ``tags``; False (logged)
    on any failure."""
    try:
        from mlflow import MlflowClient

        path = artifact_path(version, kind)
        client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        run_id = _run_of(client, name, str(version))
    except Exception as exc:  # any failure to reach MLflow is only logged
        log.error("deploy %s: could not record the %s of version %s in MLflow: %s",
                  name, kind, version, exc)
        return False
    written = True
    if run_id:
        try:
            client.log_dict(run_id, dict(record), path)
            tags[f"{kind}.artifact"] = f"runs:/{run_id}/{path}"
        except Exception as exc:
            log.error("deploy %s: could not log %s on run %s: %s", name, path, run_id, exc)
            written = False
    else:
        log.error("deploy %s: version %s has no run; its %s record stays in the state "
                  "file only", name, version, kind)
        written = False
    return _set_tags(client, name, str(version), tags) and written


def _run_of(client: MlflowClient, name: str, version: str) -> str | None:
    """The id of the run that produced the version (its ``run_id``, else its
    ``mlflow_run_id`` tag)."""
    found = client.get_model_version(name, version)
    return found.run_id or found.tags.get("mlflow_run_id") or None


def _set_tags(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> bool:
    """Set the tags; drop a stale ``canary.failed_step`` of an earlier canary. False on a
    failure (logged)."""
    try:
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        if "canary.outcome" in tags and "canary.failed_step" not in tags:
            stale = client.get_model_version(name, version).tags
            if "canary.failed_step" in stale:
                client.delete_model_version_tag(name, version, "canary.failed_step")
    except Exception as exc:
        log.error("deploy %s: could not tag version %s with its trial: %s", name, version, exc)
        return False
    return True


def _plan_dict(plan: CanaryPlan | None) -> dict[str, Any] | None:
    if plan is None:
        return None
    data = dataclasses.asdict(plan)
    data["steps"] = list(data["steps"])
    return data
