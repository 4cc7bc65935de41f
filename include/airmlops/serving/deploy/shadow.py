"""Shadow rollout: the new version answers a copy of live traffic before it takes any.

The new version is registered with the stable address beside the live one and made its shadow
(:func:`airmlops.serving.proxy.set_shadow`): after each live ``/predict`` answer the address
sends a copy of the request to it, from a bounded queue that drops copies first when it is
full, so the live answer and its latency never wait for the shadow. The shadow's answers go
nowhere but into the shadow log, beside the live predictions of the same request.

The shadow is held ``seconds`` (once more when it answered fewer than ``min_requests``), then
judged by the promotion rule of the spec on that window:

* it answered at least one mirrored request, and its error rate is not significantly above
  the live one's plus ``max_error_rate_increase`` (the canary's one-sided z-test,
  :func:`~airmlops.serving.deploy.canary.error_rate_z`);
* its median latency is at most ``max_latency_ratio`` times the live version's;
* its predictions agree with the live ones on at least ``min_agreement`` of the compared rows
  (classifiers: the same class; regressors: within a tolerance) and the two score
  distributions differ by a Kolmogorov-Smirnov statistic of at most ``max_score_ks``
  (:func:`airmlops.monitoring.shadow.compare_shadow`).

Passing promotes it (the caller switches the address to it); failing raises
:class:`ShadowRejected`, and the caller clears the shadow and stops the new version. Either
way the judgement's numbers are kept.

A person may decide instead, from the MLOps view (:mod:`.decisions`): the window is polled for
a decision about every :data:`DECISION_POLL_SECONDS`; ``promote`` ends it early and promotes
whatever the rule says, ``reject`` ends it and rejects. With ``promotion: manual`` the rule's
verdict is only advice: after the window the deploy waits up to ``decision_timeout`` seconds
for a decision (``on_waiting`` is told once, when it starts to wait) and rejects without one.
The judgement keeps the rule's verdict (``rule_verdict``, ``reasons``) beside the final
``verdict`` and who decided (``decided_by``: a user, or ``rule``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from airmlops.serving import proxy as proxy_mod
from airmlops.serving.cpu_class import reclaim_cpu, yield_cpu
from airmlops.serving.deploy.canary import (
    Z_CRITICAL,
    TrialTarget,
    check_number,
    error_rate_z,
    snapshots,
)
from airmlops.serving.deploy.decisions import DecisionChannel, ShadowDecision
from airmlops.serving.deploy.errors import DeployFailed, ShadowRejected

if TYPE_CHECKING:
    from docker import DockerClient

    from airmlops.serving.deploy.state import SlotHandle

logger = logging.getLogger("airmlops.serving.deploy")

Comparer = Callable[[dt.datetime, dt.datetime], Mapping[str, Any]]
"""``compare(start, end)``: the shadow comparison of the logged pairs in that window
(:meth:`airmlops.monitoring.shadow.ShadowComparison.to_dict`)."""

DECISION_POLL_SECONDS = 0.5
"""How often a held shadow looks for a decision from the MLOps view."""


@dataclasses.dataclass(frozen=True)
class ShadowPlan:
    """How a shadow rollout goes: how long and how much traffic is mirrored, and the promotion
    rule. ``compare`` reads the logged pairs of a window (the deploy stage supplies it)."""

    seconds: float
    compare: Comparer = dataclasses.field(compare=False, repr=False)
    percent: int = 100
    min_requests: int = 50
    min_agreement: float = 0.9
    max_score_ks: float = 0.2
    max_error_rate_increase: float = 0.01
    max_latency_ratio: float = 1.5
    promotion: Literal["rule", "manual"] = "rule"
    decision_timeout: float = 3600.0

    def __post_init__(self) -> None:
        """Refuse (ValueError naming the field) a plan the spec would refuse."""
        check_number("shadow_seconds", self.seconds, 0.0, 86400.0, open_low=True)
        if (isinstance(self.percent, bool) or not isinstance(self.percent, int)
                or not 1 <= self.percent <= 100):
            raise ValueError(f"shadow_percent: an int in 1..100 expected, got {self.percent!r}")
        if (isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int)
                or self.min_requests < 1):
            raise ValueError(f"shadow_min_requests: a positive int expected, got "
                             f"{self.min_requests!r}")
        check_number("shadow_min_agreement", self.min_agreement, 0.0, 1.0)
        check_number("shadow_max_score_ks", self.max_score_ks, 0.0, 1.0)
        check_number("shadow_max_error_rate_increase", self.max_error_rate_increase, 0.0, 1.0)
        check_number("shadow_max_latency_ratio", self.max_latency_ratio, 1.0, 100.0)
        if self.promotion not in ("rule", "manual"):
            raise ValueError(f"shadow_promotion: rule or manual expected, got "
                             f"{self.promotion!r}")
        check_number("shadow_decision_timeout_seconds", self.decision_timeout, 0.0, 604800.0,
                     open_low=True)
        if not callable(self.compare):
            raise ValueError("compare: a callable reading the shadow pairs expected")

    @classmethod
    def from_spec(cls, deploy: Any, compare: Comparer) -> ShadowPlan:
        """The plan of a spec's ``deploy`` section (a ``DeployConfig``)."""
        return cls(deploy.shadow_seconds, compare, deploy.shadow_percent,
                   deploy.shadow_min_requests, deploy.shadow_min_agreement,
                   deploy.shadow_max_score_ks, deploy.shadow_max_error_rate_increase,
                   deploy.shadow_max_latency_ratio, deploy.shadow_promotion,
                   deploy.shadow_decision_timeout_seconds)


def judge_shadow(shadow: Mapping[str, Any], live: Mapping[str, Any],
                 comparison: Mapping[str, Any], plan: ShadowPlan) -> tuple[str, list[str]]:
    """``(verdict, reasons)`` of a shadow window: ``promote`` with no reason, or ``reject``
    with every rule it broke. ``shadow`` and ``live`` are the two slots' windows as the stable
    address saw them (:func:`~airmlops.serving.proxy.step_window`), ``comparison`` the logged
    pairs' (:meth:`~airmlops.monitoring.shadow.ShadowComparison.to_dict`)."""
    if not shadow["requests"]:
        return "reject", ["the shadow answered no mirrored request"]
    reasons = []
    z = error_rate_z(shadow["errors"], shadow["requests"], live["errors"], live["requests"],
                     plan.max_error_rate_increase)
    if z > Z_CRITICAL:
        reasons.append(f"error rate {shadow['error_rate']:.4f} vs live {live['error_rate']:.4f}"
                       f" + margin {plan.max_error_rate_increase:g}: z = {z:.2f} > "
                       f"{Z_CRITICAL:.3f}")
    if (live.get("p50_ms") and shadow.get("p50_ms") is not None
            and shadow["p50_ms"] > plan.max_latency_ratio * live["p50_ms"]):
        reasons.append(f"median latency {shadow['p50_ms']:.2f} ms above "
                       f"{plan.max_latency_ratio:g} x live {live['p50_ms']:.2f} ms")
    if not comparison.get("pairs"):
        reasons.append("no shadow prediction was logged beside a live one")
        return "reject", reasons
    agreement = comparison["agreement_rate"]
    if agreement < plan.min_agreement:
        reasons.append(f"agreement {agreement:.4f} below {plan.min_agreement:g}")
    ks = comparison["score_ks"]
    if ks is not None and ks > plan.max_score_ks:
        reasons.append(f"score distribution KS {ks:.4f} above {plan.max_score_ks:g}")
    return ("reject" if reasons else "promote"), reasons


@contextlib.contextmanager
def idle_cpu_class(handles: Sequence[SlotHandle], prefix: str,
                   docker_client: DockerClient | None = None) -> Iterator[list[str]]:
    """The shadow's servers ``handles`` in the idle CPU class (:mod:`airmlops.serving.cpu_class`)
    for the block, so mirrored copies take only CPU the live servers leave idle; how, per
    server. Out of it again after the block, whatever its outcome: DeployFailed when one could
    not be taken out, since it must not take live traffic in that class."""
    records = [(handle, yield_cpu(handle, f"{prefix}-{handle.port}", docker_client))
               for handle in handles]
    hows = [record["how"] for _, record in records]
    logger.info("shadow %s: CPU class %s", prefix, hows)
    try:
        yield hows
    except BaseException:
        for handle, record in records:
            with contextlib.suppress(Exception):  # it is stopped next anyway
                reclaim_cpu(handle, record, docker_client)
        raise
    for handle, record in records:
        try:
            reclaim_cpu(handle, record, docker_client)
        except Exception as exc:
            raise DeployFailed("shadow", f"the shadow's server {handle.upstream} could not "
                                         f"leave the idle CPU class: {exc}") from None


def run_shadow(target: TrialTarget, plan: ShadowPlan,
               sleep: Callable[[float], None] = time.sleep,
               decisions: DecisionChannel | None = None,
               on_waiting: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Mirror live traffic to ``target``'s new slot (registered, not active) for the plan's
    window and judge it; the judgement when it is promoted (the shadow is then cleared, for
    the caller to switch). Raises :class:`ShadowRejected` with the judgement when it is not
    (the shadow is left set: the caller clears it), ProxyAdminError or ValueError if the
    address cannot be driven. ``decisions`` brings a person's decision (required with manual
    promotion); ``on_waiting`` gets the rule's judgement when a manual shadow starts waiting."""
    if plan.promotion == "manual" and decisions is None:
        raise ValueError("shadow_promotion manual: a decision channel is required")
    started, began = time.monotonic(), dt.datetime.now(dt.UTC)
    before = snapshots(target)
    proxy_mod.set_shadow(target.port, target.token, target.slot, plan.percent)
    decision = _hold(plan.seconds, decisions, sleep)
    shadow, live = _windows(target, before)
    extended = decision is None and shadow["requests"] < plan.min_requests
    if extended:
        decision = _hold(plan.seconds, decisions, sleep)
        shadow, live = _windows(target, before)
    proxy_mod.clear_shadow(target.port, target.token)
    ended = dt.datetime.now(dt.UTC)
    try:
        comparison = dict(plan.compare(began, ended))
    except Exception as exc:  # the rule cannot be applied: reject, never promote blind
        logger.error("shadow comparison of %s failed: %s", target.slot, exc)
        comparison = {"pairs": 0, "error": f"{type(exc).__name__}: {exc}"}
    verdict, reasons = judge_shadow(shadow, live, comparison, plan)
    judgement = {
        "seconds": round(time.monotonic() - started, 3), "extended": extended,
        "window": {"start": began.isoformat(), "end": ended.isoformat()},
        "percent": plan.percent,
        "shadow": _traffic(shadow), "live": _traffic(live),
        "comparison": _finite(comparison), "verdict": verdict, "reasons": reasons,
        "rule_verdict": verdict, "promotion": plan.promotion, "decided_by": "rule",
        "decision": None,
    }
    if decision is None and plan.promotion == "manual":
        decision = _await_decision(judgement, plan, decisions, sleep, on_waiting)
    return _conclude(target, judgement, decision, plan)


def _hold(seconds: float, decisions: DecisionChannel | None,
          sleep: Callable[[float], None]) -> ShadowDecision | None:
    """Wait ``seconds``, or until a decision arrives (then returned)."""
    if decisions is None:
        sleep(seconds)
        return None
    deadline = time.monotonic() + seconds
    while True:
        decision = decisions.poll()
        if decision is not None:
            return decision
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        sleep(min(DECISION_POLL_SECONDS, left))


def _await_decision(judgement: dict[str, Any], plan: ShadowPlan,
                    decisions: DecisionChannel | None,
                    sleep: Callable[[float], None],
                    on_waiting: Callable[[dict[str, Any]], None] | None
                    ) -> ShadowDecision | None:
    """Manual promotion: wait for a person's decision after the window (None on timeout)."""
    if on_waiting is not None:
        try:
            on_waiting(judgement)
        except Exception as exc:  # telling about the wait must not end it
            logger.error("shadow awaiting a decision could not be reported: %s", exc)
    return _hold(plan.decision_timeout, decisions, sleep)


def _conclude(target: TrialTarget, judgement: dict[str, Any],
              decision: ShadowDecision | None, plan: ShadowPlan) -> dict[str, Any]:
    """Apply ``decision`` (a person's) or the rule's verdict to ``judgement``: return it when
    the shadow is promoted, raise :class:`ShadowRejected` when it is not."""
    if decision is not None:
        judgement.update(verdict=decision.action, decided_by=decision.by,
                         decision=decision.to_dict())
        reason = f"rejected from the MLOps view by {decision.by}"
    elif plan.promotion == "manual":
        judgement.update(verdict="reject", decided_by="timeout")
        reason = f"no decision within {plan.decision_timeout:g} s"
    else:
        reason = "; ".join(judgement["reasons"])
    logger.info("shadow %s: %s", target.slot, judgement)
    if judgement["verdict"] != "promote":
        raise ShadowRejected(reason, judgement)
    return judgement


def _windows(target: TrialTarget, before: tuple[Mapping[str, Any], Mapping[str, Any]]
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shadow's and the live slot's windows since ``before``."""
    shadow_now, live_now = snapshots(target)
    return (proxy_mod.step_window(before[0], shadow_now),
            proxy_mod.step_window(before[1], live_now))


def _traffic(window: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers of a traffic window the record keeps."""
    return {key: window.get(key) for key in ("requests", "errors", "error_rate", "p50_ms")}


def _finite(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with non-finite floats as None (the record is JSON)."""
    return {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
            for key, value in values.items()}
