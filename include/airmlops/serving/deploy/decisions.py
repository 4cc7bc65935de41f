"""A human decision on a running shadow: promote it or reject it, from the MLOps view.

The view writes the decision, ``{version, action, by, at}``, atomically to
``<data_root>/deployments/<pipeline>/shadow-decision.json``, beside the deploy state file. The
deploy holding the shadow polls it (:class:`DecisionChannel`): a file that does not parse into
a :class:`ShadowDecision` is ignored with a warning and removed (it never fails the deploy), a
decision for another version than the one shadowed is stale and removed, and the one it applies
is removed once it is recorded in the state file (``state["shadow"]["decision"]``).

The state file also tells the view that a shadow is running: :func:`running_record` is what
the deploy keeps under ``shadow`` while it holds one (``status`` ``running``, then ``awaiting``
a decision in manual mode), before the final record replaces it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from airmlops.paths import atomic_write_bytes, safe_join
from airmlops.serving.deploy.state import deployment_dir, validate_version

logger = logging.getLogger("airmlops.serving.deploy")

DECISION_FILE = "shadow-decision.json"
ACTIONS: tuple[str, str] = ("promote", "reject")
RUNNING_STATUSES: tuple[str, str] = ("running", "awaiting")
"""``status`` of a shadow record while the deploy holds the shadow (no outcome yet)."""
MAX_DECISION_BYTES = 4096
_USER = re.compile(r"^[^\x00-\x1f\x7f]{1,200}$")
_FIELDS = ("version", "action", "by", "at")

Action = Literal["promote", "reject"]


@dataclasses.dataclass(frozen=True)
class ShadowDecision:
    """Who decided what about which shadowed version, and when (timezone-aware ISO time)."""

    version: str
    action: Action
    by: str
    at: str

    def __post_init__(self) -> None:
        """Refuse (ValueError naming the field) a decision that is not well-formed."""
        validate_version(self.version)
        if self.action not in ACTIONS:
            raise ValueError(f"action: one of {list(ACTIONS)} expected, got {self.action!r}")
        if not isinstance(self.by, str) or not _USER.fullmatch(self.by):
            raise ValueError("by: a user name of 1..200 printable characters expected")
        if not isinstance(self.at, str) or len(self.at) > 64:
            raise ValueError(f"at: an ISO time expected, got {self.at!r}")
        try:
            moment = dt.datetime.fromisoformat(self.at)
        except ValueError:
            raise ValueError(f"at: an ISO time expected, got {self.at!r}") from None
        if moment.tzinfo is None:
            raise ValueError(f"at: a timezone-aware time expected, got {self.at!r}")

    @classmethod
    def from_dict(cls, raw: Any) -> ShadowDecision:
        """The decision of a parsed file; ValueError naming what is wrong."""
        if not isinstance(raw, Mapping):
            raise ValueError("a JSON object expected")
        extra = sorted(set(raw) - set(_FIELDS))
        missing = [name for name in _FIELDS if name not in raw]
        if extra or missing:
            raise ValueError(f"fields {list(_FIELDS)} expected; missing {missing}, "
                             f"unexpected {extra}")
        if not isinstance(raw["version"], str):
            raise ValueError("version: a string expected")
        return cls(raw["version"], raw["action"], raw["by"], raw["at"])

    def to_dict(self) -> dict[str, str]:
        return dataclasses.asdict(self)


def decision_path(pipeline: str, root: Path) -> Path:
    """Where ``pipeline``'s pending shadow decision is kept."""
    return safe_join(deployment_dir(pipeline, root), DECISION_FILE)


def write_decision(pipeline: str, root: Path, decision: ShadowDecision) -> Path:
    """Leave ``decision`` for the deploy holding ``pipeline``'s shadow (replaces any other)."""
    return atomic_write_bytes(decision_path(pipeline, root),
                              json.dumps(decision.to_dict(), sort_keys=True).encode())


def read_decision(pipeline: str, root: Path) -> ShadowDecision | None:
    """The pending decision; None when there is none, or it is malformed (then removed, with a
    warning naming what is wrong)."""
    path = decision_path(pipeline, root)
    try:
        raw = path.read_bytes()[:MAX_DECISION_BYTES + 1]
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("shadow decision %s cannot be read: %s", path, exc)
        return None
    try:
        if len(raw) > MAX_DECISION_BYTES:
            raise ValueError(f"larger than {MAX_DECISION_BYTES} bytes")
        return ShadowDecision.from_dict(json.loads(raw))
    except ValueError as exc:
        logger.warning("shadow decision %s ignored: %s", path, exc)
        discard_decision(pipeline, root)
        return None


def discard_decision(pipeline: str, root: Path) -> None:
    """Remove the pending decision, if any."""
    decision_path(pipeline, root).unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class DecisionChannel:
    """The decisions on the shadow of ``version`` of ``pipeline`` (the deploy's side)."""

    pipeline: str
    root: Path
    version: str

    def poll(self) -> ShadowDecision | None:
        """The pending decision on this version; a decision on another one is stale (removed,
        None)."""
        decision = read_decision(self.pipeline, self.root)
        if decision is not None and decision.version != self.version:
            logger.warning("stale shadow decision of %s ignored: version %s is shadowed, not %s",
                           self.pipeline, self.version, decision.version)
            discard_decision(self.pipeline, self.root)
            return None
        return decision

    def consume(self) -> None:
        """The decision is applied and recorded: remove it."""
        discard_decision(self.pipeline, self.root)


def running_record(version: str, slot: str, started: str | None, plan: Any) -> dict[str, Any]:
    """The ``shadow`` record while the shadow of ``version`` runs under ``plan`` (a
    :class:`~airmlops.serving.deploy.shadow.ShadowPlan`): what the view shows and what a
    decision is checked against."""
    return {
        "status": "running", "version": version, "slot": slot, "started_at": started,
        "started": dt.datetime.now(dt.UTC).isoformat(), "promotion": plan.promotion,
        "seconds": plan.seconds, "percent": plan.percent,
        "decision_timeout_seconds": plan.decision_timeout,
        "rule": {"min_requests": plan.min_requests, "min_agreement": plan.min_agreement,
                 "max_score_ks": plan.max_score_ks,
                 "max_error_rate_increase": plan.max_error_rate_increase,
                 "max_latency_ratio": plan.max_latency_ratio},
    }


def running_version(record: Any) -> str | None:
    """The version a ``shadow`` record says is being shadowed now; None when none is."""
    if (isinstance(record, Mapping) and record.get("status") in RUNNING_STATUSES
            and isinstance(record.get("version"), str)):
        return record["version"]
    return None


def announce_awaiting(pipeline: str, alerts: Mapping[str, Any] | None, version: str,
                      advice: Mapping[str, Any], timeout: float) -> dict[str, Any]:
    """Send the ``shadow_awaiting_decision`` alert (``alerts``: the spec's section as JSON) for
    the shadow of ``version`` whose window ended with the rule's ``advice``; never raises."""
    from airmlops.alerts import AlertsConfig, notify_config

    try:
        config = AlertsConfig.model_validate(alerts) if alerts else None
    except ValueError as exc:
        logger.error("alerts of %s are not valid: %s", pipeline, exc)
        return {"event": "shadow_awaiting_decision", "sent": [], "errors": {}, "skipped": str(exc)}
    return notify_config(
        pipeline, config, "shadow_awaiting_decision",
        f"the shadow of version {version} awaits a promote or reject decision in the MLOps "
        f"view (the rule advises: {advice.get('rule_verdict')}); without one within "
        f"{timeout:g} s it is rejected",
        {"version": version, "rule_verdict": advice.get("rule_verdict"),
         "reasons": list(advice.get("reasons") or []), "decision_timeout_seconds": timeout})
