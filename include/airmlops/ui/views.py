"""What the MLOps view shows: frozen view models, filled by :mod:`airmlops.ui.data`.

One :class:`Overview` per page, one :class:`PipelineView` per pipeline card with its registry
(champion and challenger), its deployment (slots behind the stable address) and its monitoring
windows. A missing piece is an empty value; a source that failed carries an ``error`` string.
"""

from __future__ import annotations

import dataclasses
from typing import Any

LINEAGE_KEYS = ("git_commit", "data_digest", "image_tag", "image_id", "bento_tag",
                "deployed_at", "deployed_target")
"""The lineage shown for every version, in this order (missing ones are shown as such)."""
DETAIL_KEYS = ("spec_hash", "features_hash", "airflow_dag_id", "airflow_run_id",
               "trigger_reason", "gate_blessed", "previous_champion")
"""Further tags shown when present."""

@dataclasses.dataclass(frozen=True)
class ModelVersionView:
    """One registered version behind an alias: its metrics, lineage and MLflow links."""

    alias: str
    version: str
    aliases: tuple[str, ...]
    status: str | None
    created_at: str | None
    run_id: str | None
    experiment_id: str | None
    metrics: dict[str, float]
    """The run's ``test_*`` metrics, unprefixed (``roc_auc``, ``log_loss``...)."""
    lineage: dict[str, str]
    """Every :data:`LINEAGE_KEYS` tag the version (or its run) carries."""
    details: dict[str, str]
    version_url: str | None
    run_url: str | None


@dataclasses.dataclass(frozen=True)
class RegistryView:
    """The pipeline's registered model: champion and challenger (None when not set)."""

    model_name: str
    champion: ModelVersionView | None = None
    challenger: ModelVersionView | None = None
    model_url: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class SlotView:
    """One slot of the blue/green deployment."""

    slot: str
    active: bool
    version: str | None
    target: str | None
    artifact: str | None
    upstream: str | None
    started_at: str | None
    alive: bool | None
    ready: bool | None


@dataclasses.dataclass(frozen=True)
class CanaryStepView:
    """One step of a canary rollout: the canary's numbers beside the live version's."""

    percent: int
    requests: int | None
    errors: int | None
    error_rate: float | None
    p50_ms: float | None
    live_requests: int | None
    live_error_rate: float | None
    live_p50_ms: float | None
    live_window: str | None
    """``step`` (the live side's own window) or ``canary`` (everything since the canary began)."""
    z: float | None
    verdict: str | None
    reason: str | None
    extended: bool
    seconds: float | None


@dataclasses.dataclass(frozen=True)
class CanaryView:
    """The last canary rollout recorded for the deployment, and how it ended."""

    version: str | None
    slot: str | None
    started_at: str | None
    outcome: str | None
    """``promoted`` or ``rolled_back`` (anything else recorded is shown as it is)."""
    steps: tuple[CanaryStepView, ...] = ()


@dataclasses.dataclass(frozen=True)
class ShadowView:
    """The last shadow rollout recorded for the deployment: the mirrored window's traffic on
    both sides, how the two models' predictions compared, and how it ended."""

    version: str | None
    slot: str | None
    started_at: str | None
    outcome: str | None
    """``promoted`` or ``rejected`` (anything else recorded is shown as it is)."""
    percent: int | None = None
    shadow_requests: int | None = None
    shadow_error_rate: float | None = None
    shadow_p50_ms: float | None = None
    live_requests: int | None = None
    live_error_rate: float | None = None
    live_p50_ms: float | None = None
    pairs: int | None = None
    agreement_rate: float | None = None
    score_ks: float | None = None
    mean_score_shift: float | None = None
    labelled: int | None = None
    metric: str | None = None
    live_metric: float | None = None
    shadow_metric: float | None = None
    reasons: tuple[str, ...] = ()
    status: str | None = None
    """``running`` or ``awaiting`` (a decision) while the deploy holds the shadow, else None."""
    promotion: str | None = None
    """``rule`` or ``manual``."""
    rule: tuple[tuple[str, float], ...] = ()
    """The promotion rule's thresholds (name, value) of a running shadow."""
    rule_verdict: str | None = None
    decided_by: str | None = None
    decided_at: str | None = None


@dataclasses.dataclass(frozen=True)
class DeploymentView:
    """The live deployment: its stable address and what serves behind it."""

    deployed: bool
    stable_url: str | None = None
    active_slot: str | None = None
    active_version: str | None = None
    switched_at: str | None = None
    proxy_alive: bool | None = None
    live_checked: bool = False
    """False when only the recorded state could be read (the live check failed or timed out)."""
    slots: tuple[SlotView, ...] = ()
    canary: CanaryView | None = None
    shadow: ShadowView | None = None
    """The last canary rollout (None when there was none or its record is unreadable)."""
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class WindowView:
    """One monitoring window: its numbers, breaches and the decision taken."""

    window_id: str
    start: str
    end: str
    rows: int | None
    label_count: int | None
    drift_share: float | None
    drifted_columns: tuple[str, ...]
    prediction_drift: float | None
    performance: dict[str, float]
    breaches: tuple[str, ...]
    decision: str | None
    reason: str | None
    triggered_run_id: str | None
    has_report: bool
    notes: tuple[str, ...] = ()
    estimated_performance: dict[str, float] = dataclasses.field(default_factory=dict)
    """The label-free estimate (CBPE) of the metrics, beside the realized ``performance``."""
    estimated_rows: int | None = None
    """How many predictions the estimate was made from."""


@dataclasses.dataclass(frozen=True)
class MonitoringView:
    """The recent windows (oldest first) and the thresholds they are judged by."""

    windows: tuple[WindowView, ...] = ()
    drift_threshold: float | None = None
    performance_metric: str | None = None
    performance_floor: float | None = None
    floor_is_minimum: bool = True
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class PipelineView:
    """Everything one pipeline card shows."""

    name: str
    description: str | None
    task: str
    owner: str | None
    dag_ids: dict[str, str]
    """Role (``training``, ``features``, ``monitoring``, ``rollback``) to DAG id."""
    primary_metric: str
    registry: RegistryView
    deployment: DeploymentView
    monitoring: MonitoringView


@dataclasses.dataclass(frozen=True)
class Overview:
    """The whole page: every pipeline the viewer may see, and specs that failed to load."""

    pipelines: tuple[PipelineView, ...]
    invalid_specs: tuple[str, ...]
    generated_at: str
    mlflow_ui_url: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the page's JSON API)."""
        return dataclasses.asdict(self)

