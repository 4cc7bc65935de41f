"""The retraining decision: pure logic over the recorded windows, with every reason spelled out.

A retraining is triggered only when all of these hold:

1. the latest window is breached, and at least ``k`` of the last ``n`` windows are (windows not
   recorded count as not breached): one noisy window never retrains, a sustained change does,
   and a change that has already gone away does not;
2. no retraining was decided within ``cooldown_hours`` before ``now`` (the new champion needs
   time to be deployed and to see traffic before it is judged);
3. fewer than ``max_active_retrainings`` retraining runs are active.

Breaches are decided from numbers and the spec: a recorded window that carries its measured
numbers (every window read from the monitoring table does) is judged again under the current
config (:func:`airmlops.monitoring.judgement.judge`), so a changed threshold re-judges the
recorded windows; only a record without numbers counts the breaches it was recorded with.

Only breach kinds listed in ``policy.triggers`` count. A ``performance`` breach counts only for a
window with at least ``performance.min_labels`` labels: missing labels are never a breach, and
the windows still waiting for labels are listed in the evidence. A window that already decided
to retrain keeps that decision when its monitoring run is repeated, so the trigger (deduplicated
by :attr:`Decision.dedup_key`) is simply sent again and ignored as a duplicate.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from airmlops.monitoring.config import MonitoringConfig
from airmlops.monitoring.judgement import WindowNumbers, judge
from airmlops.times import utc

if TYPE_CHECKING:
    from airmlops.spec import PipelineSpec

WINDOW_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.~:+-]{0,199}$")
"""Window ids end up in Airflow run ids and file names: Airflow's allowed run-id characters."""
DEDUP_PREFIX = "retrain__"


@dataclass(frozen=True)
class WindowRecord:
    """What the policy needs to know about one recorded window.

    ``breaches`` are those recorded with the window; ``numbers``, its measured numbers, are
    what the policy judges again under the current config (None: only ``breaches`` is known).
    """

    window_id: str
    start: dt.datetime
    end: dt.datetime
    breaches: tuple[str, ...] = ()
    label_count: int = 0
    decision: str | None = None
    reason: str | None = None
    triggered_run_id: str | None = None
    decided_at: dt.datetime | None = None
    numbers: WindowNumbers | None = None


@dataclass(frozen=True)
class Decision:
    """The outcome for one window: the action, why, the numbers behind it, and its dedup key."""

    action: Literal["retrain", "none"]
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    dedup_key: str = ""


def check_window_id(window_id: str) -> str:
    """Return ``window_id`` if it is safe as part of a run id and a file name, else raise."""
    if not isinstance(window_id, str) or not WINDOW_ID_PATTERN.match(window_id):
        raise ValueError(f"window_id {window_id!r} must match {WINDOW_ID_PATTERN.pattern}")
    return window_id


def dedup_key(window_id: str) -> str:
    """The idempotency key of a window's retraining (used as the triggered run id)."""
    return DEDUP_PREFIX + check_window_id(window_id)


def breach_kind(breach: str) -> str:
    """``feature:sessions`` -> ``feature``, ``quality:missing:age`` -> ``quality``."""
    return breach.split(":", 1)[0]


def judged_breaches(record: WindowRecord, config: MonitoringConfig,
                    spec: PipelineSpec | None = None) -> tuple[str, ...]:
    """The breaches of ``record`` under ``config``: judged again from its numbers (with the
    spec's declared features, see :func:`~airmlops.monitoring.judgement.judge`) when it has
    them, else the breaches it was recorded with."""
    if record.numbers is None:
        return record.breaches
    return tuple(judge(record.numbers, config, spec).breaches)


def _counted(breaches: tuple[str, ...], label_count: int, config: MonitoringConfig) -> list[str]:
    """The ``breaches`` of a window with ``label_count`` labels that may trigger a retraining."""
    triggers = set(config.policy.triggers)
    counted = []
    for breach in breaches:
        if breach_kind(breach) not in triggers:
            continue
        if breach == "performance" and label_count < config.performance.min_labels:
            continue  # missing labels are never a performance breach
        counted.append(breach)
    return counted


def counted_breaches(record: WindowRecord, config: MonitoringConfig,
                     spec: PipelineSpec | None = None) -> list[str]:
    """The breaches of ``record`` that count towards a retraining under ``config`` (judged
    again from its numbers when it has them, see :func:`judged_breaches`)."""
    return _counted(judged_breaches(record, config, spec), record.label_count, config)


def _check_decision_inputs(history: list[WindowRecord], window_id: str, now: dt.datetime,
                           last_retraining_at: dt.datetime | None,
                           active_retrainings: int) -> None:
    """Refuse a history not ending with ``window_id``, naive times and a negative count."""
    if not history or history[-1].window_id != window_id:
        last = history[-1].window_id if history else None
        raise ValueError(f"the latest window of the history must be {window_id!r} (got {last!r})")
    utc(now, "now")
    if last_retraining_at is not None:
        utc(last_retraining_at, "last_retraining_at")
    if active_retrainings < 0:
        raise ValueError(f"active_retrainings must not be negative (got {active_retrainings})")


def _window_evidence(record: WindowRecord, judged: tuple[str, ...],
                     counted: list[str]) -> dict[str, Any]:
    """One window's line of the evidence; its recorded breaches too when judging again under
    the current config changed them."""
    entry: dict[str, Any] = {"window_id": record.window_id, "breaches": list(judged),
                             "counted": counted, "label_count": record.label_count}
    if tuple(judged) != tuple(record.breaches):
        entry["recorded_breaches"] = list(record.breaches)
    return entry


def decide(history: list[WindowRecord], config: MonitoringConfig, *, now: dt.datetime,
           last_retraining_at: dt.datetime | None, active_retrainings: int,
           window_id: str, spec: PipelineSpec | None = None) -> Decision:
    """Decide whether the window ``window_id`` (the last of ``history``) triggers a retraining.

    ``history`` is the pipeline's recorded windows in time order, latest last; ``now`` is the
    decision time (the run's logical time, never the wall clock inside this logic);
    ``last_retraining_at`` is when the last retraining was decided (None if never) and
    ``active_retrainings`` how many training runs are queued or running. Each window's breaches
    are judged again from its numbers under ``config`` and ``spec`` (the pipeline's, for the
    declared features' null limits; see :func:`judged_breaches`).
    """
    key = dedup_key(window_id)
    _check_decision_inputs(history, window_id, now, last_retraining_at, active_retrainings)
    policy = config.policy
    latest = history[-1]
    recent = history[-policy.n:]
    judged = {record.window_id: judged_breaches(record, config, spec) for record in recent}
    counted = {record.window_id: _counted(judged[record.window_id], record.label_count, config)
               for record in recent}
    breached = [record.window_id for record in recent if counted[record.window_id]]
    evidence: dict[str, Any] = {
        "window_id": window_id,
        "k": policy.k,
        "n": policy.n,
        "windows": [_window_evidence(record, judged[record.window_id], counted[record.window_id])
                    for record in recent],
        "breached_windows": breached,
        "latest_breaches": counted[window_id],
        "labels_missing": [
            record.window_id for record in recent
            if record.label_count < config.performance.min_labels
        ],
        "triggers": list(policy.triggers),
        "active_retrainings": active_retrainings,
        "max_active_retrainings": policy.max_active_retrainings,
        "last_retraining_at": last_retraining_at.isoformat() if last_retraining_at else None,
        "now": now.isoformat(),
    }

    if latest.decision == "retrain":
        evidence["replayed"] = True
        return Decision("retrain", f"already decided for this window: {latest.reason}",
                        evidence, key)
    if not counted[window_id]:
        return Decision("none", f"latest window {window_id} not breached "
                        f"({len(breached)} of last {policy.n} windows breached)", evidence, key)
    if len(breached) < policy.k:
        return Decision("none", f"only {len(breached)} of last {policy.n} windows breached "
                        f"(need {policy.k})", evidence, key)

    rule = (f"{len(breached)} of last {policy.n} windows breached (need {policy.k}), latest by "
            f"{', '.join(counted[window_id])}")
    blocked = []
    if active_retrainings >= policy.max_active_retrainings:
        count = "one" if active_retrainings == 1 else str(active_retrainings)
        plural = "" if active_retrainings == 1 else "s"
        blocked.append(f"already {count} retraining{plural} active "
                       f"(at most {policy.max_active_retrainings})")
    if last_retraining_at is not None:
        until = last_retraining_at + dt.timedelta(hours=policy.cooldown_hours)
        evidence["cooldown_until"] = until.isoformat()
        if now < until:
            blocked.append(f"cooldown until {until.isoformat()}")
    if blocked:
        return Decision("none", f"{rule}; blocked: {'; '.join(blocked)}", evidence, key)
    return Decision("retrain", rule, evidence, key)
