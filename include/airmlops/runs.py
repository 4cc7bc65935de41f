"""What a stage knows of the Airflow run that calls it, and what every stage shares.

:class:`RunContext` is built by the DAG layer (:func:`airmlops.dags.common.run_context`) from
Airflow's context and the run's params; the stages (:mod:`airmlops.stages`,
:mod:`airmlops.serving_stages`) take it instead of reading the clock or Airflow themselves.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from airmlops.settings import PROJECT_ROOT, Settings

if TYPE_CHECKING:
    from airmlops.spec import PipelineSpec

log = logging.getLogger("airmlops.stages")  # the stages' logger, as before the split

COMMIT_PATTERN = r"^[0-9a-fA-F]{7,64}$"


@dataclass(frozen=True)
class RunContext:
    """What a stage needs to know about the Airflow run that calls it."""

    dag_id: str
    run_id: str
    as_of: dt.datetime
    git_commit: str
    trigger_reason: str
    scenario: str | None = None
    full_history: bool = False
    scenario_start: dt.date | None = None
    data_end: dt.datetime | None = None
    """Read data up to this time instead of ``as_of`` (a retraining reacts to a window)."""

    def lineage(self) -> dict[str, str]:
        tags = {
            "git_commit": self.git_commit,
            "airflow_dag_id": self.dag_id,
            "airflow_run_id": self.run_id,
            "trigger_reason": self.trigger_reason,
        }
        if self.data_end is not None:
            tags["data_end"] = self.data_end.isoformat()
        if self.scenario is not None or self.scenario_start is not None:
            tags["simulator_world"] = (f"{self.scenario or 'spec scenario'} from "
                                       f"{self.scenario_start or 'the spec scenario_start'}")
        return tags


def stage_alert(spec: PipelineSpec, event: str, message: str, details: dict[str, Any]) -> None:
    """Send an alert through the spec's channels; an alert never fails a stage."""
    from airmlops.alerts import notify

    outcome = notify(spec, event, message, details)
    if outcome.get("errors"):
        log.warning("alert %s of %s could not be sent: %s", event, spec.name, outcome["errors"])


def day_floor(moment: dt.datetime) -> dt.datetime:
    """Midnight UTC of the moment's day: a run's training data ends at the start of its day."""
    moment = moment.astimezone(dt.UTC)
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def resolve_git_commit(conf_commit: str | None, settings: Settings) -> str:
    """The commit for lineage: the run's conf (a webhook), the setting, or the checkout's HEAD."""
    for candidate in (conf_commit, settings.git_commit):
        if candidate:
            if not re.match(COMMIT_PATTERN, candidate):
                raise ValueError(f"git_commit: expected a hex commit id, got {candidate!r}")
            return candidate
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
            timeout=10, check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
