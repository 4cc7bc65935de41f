"""The ``deploy`` section of a pipeline spec: where and how a blessed model is served, and
the limits of its containers (re-exported by :mod:`airmlops.spec`)."""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

DEPLOY_TASK_MARGIN_SECONDS = 600.0
"""What the deploy task's timeout allows beyond waiting and trials: smoke tests, the switch,
stopping the old version, recording."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ResourceLimits(_Strict):
    """What one model container may use (docker target; a process slot is not limited)."""

    memory_mb: int = Field(default=1024, ge=128, le=262144,
                           description="Memory limit in MiB (no swap beyond it).")
    cpus: float = Field(default=1.0, ge=0.1, le=64, description="CPU share (1.0 = one core).")
    pids: int = Field(default=512, ge=32, le=32768,
                      description="Most processes and threads the container may run.")


class DeployConfig(_Strict):
    """Where and how a blessed model is served (containerize, deploy and monitor stages)."""

    target: Literal["auto", "docker", "process"] = Field(
        default="auto", description="auto: docker when an engine is reachable, else process.")
    port: int = Field(default=8600, ge=1024, le=65535,
                      description="The stable address http://127.0.0.1:<port> clients call.")
    ready_timeout_seconds: float = Field(default=120.0, gt=0, le=1800)
    replicas: int = Field(
        default=1, ge=1, le=8,
        description="Model servers of the live version sharing its traffic behind the stable "
        "address (more than one pays on machines with cores to spare).")
    spares: int = Field(
        default=1, ge=0, le=4,
        description="Hot spares of the live version: started, health-checked and idle, they "
        "take the traffic the moment no serving server is healthy, so a server dying costs "
        "no request (the address retries on a spare) while it is restarted.")
    workers: int = Field(
        default=2, ge=1, le=16,
        description="Worker processes of each model server; a worker that dies is restarted "
        "while the others answer.")
    smoke_requests: int = Field(default=5, ge=1, le=100)
    latency_budget_ms: float = Field(default=500.0, gt=0)
    bake_seconds: float = Field(default=30.0, ge=0, le=86400,
                                description="Watch the new version this long before trusting it.")
    bake_probe_interval_seconds: float = Field(default=1.0, gt=0)
    max_error_rate: float = Field(default=0.01, ge=0, le=1)
    max_p99_ms: float = Field(default=1000.0, gt=0)
    resources: ResourceLimits = Field(default_factory=ResourceLimits,
                                      description="Limits of each model container.")
    strategy: Literal["blue_green", "canary", "shadow"] = Field(
        default="blue_green", description="blue_green: switch all traffic at once after the "
        "smoke test; canary: move it in steps, judged against the live version at each; "
        "shadow: mirror a copy of live traffic to it first, and switch only if it meets the "
        "shadow promotion rule.")
    canary_steps: list[StrictInt] = Field(
        default_factory=lambda: [5, 25, 50, 100], min_length=1, max_length=20,
        description="Percent of the entities sent to the new version at each canary step: "
        "strictly increasing, each 1..100, the last 100.")
    canary_step_seconds: float = Field(default=60.0, gt=0, le=86400,
                                       description="How long each canary step is held.")
    canary_min_requests: int = Field(
        default=50, ge=1, le=1_000_000,
        description="Fewer requests than this on either side extends a step once.")
    canary_max_error_rate_increase: float = Field(
        default=0.01, ge=0, le=1,
        description="Margin: the canary fails when its error rate is significantly above "
        "the live version's plus this (one-sided z-test, alpha 0.05).")
    canary_max_latency_ratio: float = Field(
        default=1.5, ge=1, le=100,
        description="The canary fails when its median latency exceeds this times the live "
        "version's.")

    shadow_seconds: float = Field(default=300.0, gt=0, le=86400,
                                  description="How long live traffic is mirrored to the shadow.")
    shadow_percent: int = Field(default=100, ge=1, le=100,
                                description="Percent of live /predict requests mirrored.")
    shadow_min_requests: int = Field(
        default=50, ge=1, le=1_000_000,
        description="Fewer mirrored answers than this extends the window once.")
    shadow_min_agreement: float = Field(
        default=0.9, ge=0, le=1,
        description="Promotion rule: the share of predictions the shadow must agree on with "
        "the live version (classifiers: the same class; regressors: within a tolerance).")
    shadow_max_score_ks: float = Field(
        default=0.2, ge=0, le=1,
        description="Promotion rule: the largest Kolmogorov-Smirnov statistic allowed between "
        "the shadow's and the live version's scores.")
    shadow_max_error_rate_increase: float = Field(
        default=0.01, ge=0, le=1,
        description="Promotion rule: margin over the live error rate (one-sided z-test).")
    shadow_max_latency_ratio: float = Field(
        default=1.5, ge=1, le=100,
        description="Promotion rule: the shadow's median latency at most this times the live "
        "version's.")
    shadow_promotion: Literal["rule", "manual"] = Field(
        default="rule", description="rule: the promotion rule decides when the window ends "
        "(a decision from the MLOps view may end it earlier); manual: the rule's verdict is "
        "only advice and the deploy waits for a promote or reject decision from the view.")
    shadow_decision_timeout_seconds: float = Field(
        default=3600.0, ge=60, le=604800,
        description="Manual promotion: how long to wait for a decision after the window; "
        "none by then rejects the shadow (the live version keeps serving).")

    def deploy_task_timeout_seconds(self) -> float:
        """The deploy task's timeout: the longest this section lets a deploy take, plus
        :data:`DEPLOY_TASK_MARGIN_SECONDS`. Every server of the new version started and waited
        for in turn (live ones, spares, one restart), then the strategy's trial held as long as
        it can be: a canary's steps or a shadow's window each held once more (too few
        requests), and a manual shadow's wait for a decision."""
        trial = 0.0
        if self.strategy == "canary":
            trial = 2 * self.canary_step_seconds * len(self.canary_steps)
        elif self.strategy == "shadow":
            trial = 2 * self.shadow_seconds
            if self.shadow_promotion == "manual":
                trial += self.shadow_decision_timeout_seconds
        servers = self.replicas + self.spares + 1
        return servers * self.ready_timeout_seconds + trial + DEPLOY_TASK_MARGIN_SECONDS

    @field_validator("canary_steps")
    @classmethod
    def _canary_steps(cls, steps: list[int]) -> list[int]:
        """Steps strictly increasing, each 1..100, the last 100."""
        if any(not 1 <= step <= 100 for step in steps):
            raise ValueError(f"canary_steps: each step must be a percent in 1..100, got {steps}")
        if any(b <= a for a, b in itertools.pairwise(steps)):
            raise ValueError(f"canary_steps: must be strictly increasing, got {steps}")
        if steps[-1] != 100:
            raise ValueError(f"canary_steps: the last step must be 100, got {steps}")
        return steps
