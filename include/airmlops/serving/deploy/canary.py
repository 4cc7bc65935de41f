"""Canary rollout: move the traffic to a new version in steps, judging it at each one.

The new version is registered with the stable address beside the live one and made its canary
(:func:`airmlops.serving.proxy.set_canary`): it takes the /predict requests of the entities
whose hash falls below the step's percent, so one customer sees one version. Each step is held
``step_seconds``; then the two slots' statistics as the stable address saw them over that same
window (:func:`airmlops.serving.proxy.step_window` of before/after snapshots) are compared:

* error rate: a one-sided two-proportion z-test (unpooled standard error) of
  H1 "canary error rate > live error rate + margin" at alpha 0.05, i.e. the step fails when
  ``z = (p_canary - p_live - margin) / sqrt(p_c(1-p_c)/n_c + p_l(1-p_l)/n_l) > 1.645``
  (with a zero standard error: when ``p_canary - p_live > margin``);
* latency: the step fails when the canary's median (interpolated from the histogram) is above
  ``max_latency_ratio`` times the live version's.

The live side of a step is its own window, or, when that holds fewer than ``min_requests``
(the 100 % step sends it nothing), everything it served since the canary began. With fewer
than ``min_requests`` on either side a step is held once more (its window doubles), then judged
on what it has; a step in which the canary served nothing at all fails (it measured nothing,
as a bake window with no request does). A failed step raises :class:`CanaryFailed` with every
step's numbers; the caller clears the canary and stops the new version.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from airmlops.serving import proxy as proxy_mod
from airmlops.serving.deploy.errors import CanaryFailed

logger = logging.getLogger("airmlops.serving.deploy")

Z_CRITICAL = 1.6448536269514722
"""The one-sided critical value of the standard normal at alpha 0.05."""


@dataclasses.dataclass(frozen=True)
class CanaryPlan:
    """How a canary rollout goes: the percent of entities at each step (the last 100), how
    long each is held, the request field holding the entity id, and the judgement's margins."""

    steps: tuple[int, ...]
    step_seconds: float
    entity_key: str
    max_error_rate_increase: float = 0.01
    max_latency_ratio: float = 1.5
    min_requests: int = 50

    def __post_init__(self) -> None:
        """Refuse (ValueError naming the field) a plan the spec would refuse."""
        steps = self.steps
        if (not isinstance(steps, tuple) or not steps
                or any(isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= 100
                       for s in steps)
                or any(b <= a for a, b in itertools.pairwise(steps))
                or steps[-1] != 100):
            raise ValueError(f"canary_steps: strictly increasing percents in 1..100 ending "
                             f"with 100 expected, got {steps!r}")
        check_number("canary_step_seconds", self.step_seconds, 0.0, 86400.0, open_low=True)
        check_number("canary_max_error_rate_increase", self.max_error_rate_increase, 0.0, 1.0)
        check_number("canary_max_latency_ratio", self.max_latency_ratio, 1.0, 100.0)
        if (isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int)
                or self.min_requests < 1):
            raise ValueError(f"canary_min_requests: a positive int expected, got "
                             f"{self.min_requests!r}")
        proxy_mod.validate_entity_key(self.entity_key)

    @classmethod
    def from_spec(cls, deploy: Any, entity_key: str) -> CanaryPlan:
        """The plan of a spec's ``deploy`` section (a ``DeployConfig``) and entity key."""
        return cls(tuple(deploy.canary_steps), deploy.canary_step_seconds, entity_key,
                   deploy.canary_max_error_rate_increase, deploy.canary_max_latency_ratio,
                   deploy.canary_min_requests)


def check_number(name: str, value: Any, low: float, high: float, *,
                  open_low: bool = False) -> None:
    """Refuse (ValueError naming ``name``) a ``value`` that is not a finite number in range."""
    ok = (not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
          and (value > low if open_low else value >= low) and value <= high)
    if not ok:
        raise ValueError(f"{name}: a number in {'(' if open_low else '['}{low:g}, {high:g}] "
                         f"expected, got {value!r}")


def error_rate_z(canary_errors: int, canary_requests: int, live_errors: int,
                 live_requests: int, margin: float) -> float:
    """The z statistic of the one-sided two-proportion test of H1 "canary error rate > live
    error rate + ``margin``" (unpooled standard error; ±inf when it is zero and the difference
    is beyond the margin or not). Needs ``canary_requests`` > 0; a live side of no request
    counts as an error rate of 0 with no variance."""
    p_c = canary_errors / canary_requests
    p_l = live_errors / live_requests if live_requests else 0.0
    variance = p_c * (1 - p_c) / canary_requests
    if live_requests:
        variance += p_l * (1 - p_l) / live_requests
    excess = p_c - p_l - margin
    if variance <= 0.0:
        return math.inf if excess > 0 else -math.inf
    return excess / math.sqrt(variance)


def judge(canary: Mapping[str, Any], live: Mapping[str, Any], plan: CanaryPlan
          ) -> tuple[str, str, float | None]:
    """``(verdict, reason, z)`` for one step's windows (:func:`~airmlops.serving.proxy.
    step_window`): ``fail`` when the canary measured nothing, its error rate is significantly
    above the live one's plus the margin, or its median latency exceeds the ratio; else
    ``pass``."""
    if not canary["requests"]:
        return "fail", "the canary served no request in the step", None
    z = error_rate_z(canary["errors"], canary["requests"], live["errors"], live["requests"],
                     plan.max_error_rate_increase)
    if z > Z_CRITICAL:
        return ("fail", f"error rate {canary['error_rate']:.4f} vs live {live['error_rate']:.4f}"
                f" + margin {plan.max_error_rate_increase:g}: z = {z:.2f} > {Z_CRITICAL:.3f}", z)
    limit = (plan.max_latency_ratio * live["p50_ms"]) if live.get("p50_ms") else None
    if limit is not None and canary["p50_ms"] is not None and canary["p50_ms"] > limit:
        return ("fail", f"median latency {canary['p50_ms']:.2f} ms above {plan.max_latency_ratio:g}"
                f" x live {live['p50_ms']:.2f} ms", z)
    return "pass", "", z


@dataclasses.dataclass(frozen=True)
class TrialTarget:
    """Where a canary or a shadow runs: the stable address (``port``, admin ``token``), the new
    version's slot and the live one's."""

    port: int
    token: str
    slot: str
    live_slot: str


def run_canary(target: TrialTarget, plan: CanaryPlan,
               sleep: Callable[[float], None] = time.sleep,
               steps: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Walk ``plan``'s steps on ``target`` (the new slot registered, not active); the steps'
    numbers when every one passed (the canary is then at 100 %, for the caller to switch).
    Raises :class:`CanaryFailed` at the first failed step (the canary is left set: the
    caller clears it), ProxyAdminError or ValueError if the address cannot be driven. Each
    step is appended to ``steps`` (a new list if None) as soon as it is judged, so a caller
    whose canary was cut short still has the steps it took."""
    steps = [] if steps is None else steps
    origin = proxy_mod.slot_stats(target.port, target.live_slot)
    for percent in plan.steps:
        proxy_mod.set_canary(target.port, target.token, target.slot, percent, plan.entity_key)
        step = _hold_step(target, plan, percent, origin, sleep)
        steps.append(step)
        logger.info("canary %s at %d %%: %s", target.slot, percent, step)
        if step["verdict"] != "pass":
            raise CanaryFailed(f"step {percent} %: {step['reason']}; steps: {steps}", steps)
    return steps


def _hold_step(target: TrialTarget, plan: CanaryPlan, percent: int,
               origin: Mapping[str, Any], sleep: Callable[[float], None]) -> dict[str, Any]:
    """Hold one step (once more if either side is short of requests) and judge it."""
    started = time.monotonic()
    before = snapshots(target)
    sleep(plan.step_seconds)
    canary, live = _windows(target, before, origin, plan)
    extended = min(canary["requests"], live["requests"]) < plan.min_requests
    if extended:
        sleep(plan.step_seconds)
        canary, live = _windows(target, before, origin, plan)
    verdict, reason, z = judge(canary, live, plan)
    return {"percent": percent, "seconds": round(time.monotonic() - started, 3),
            "extended": extended, "requests": canary["requests"], "errors": canary["errors"],
            "error_rate": round(canary["error_rate"], 6), "p50_ms": canary["p50_ms"],
            "live": {k: live[k] for k in ("requests", "errors", "error_rate", "p50_ms",
                                          "window")},
            "z": None if z is None or not math.isfinite(z) else round(z, 3),
            "verdict": verdict, "reason": reason}


def snapshots(target: TrialTarget) -> tuple[dict[str, Any], dict[str, Any]]:
    """The new slot's and the live slot's cumulative statistics now."""
    return (proxy_mod.slot_stats(target.port, target.slot),
            proxy_mod.slot_stats(target.port, target.live_slot))


def _windows(target: TrialTarget, before: Sequence[Mapping[str, Any]],
             origin: Mapping[str, Any], plan: CanaryPlan
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The canary's window since ``before`` and the live side's: its own window, or since the
    canary began (``origin``) when its own holds fewer than ``min_requests``."""
    canary_now, live_now = snapshots(target)
    canary = proxy_mod.step_window(before[0], canary_now)
    live = {**proxy_mod.step_window(before[1], live_now), "window": "step"}
    if live["requests"] < plan.min_requests:
        live = {**proxy_mod.step_window(origin, live_now), "window": "canary"}
    return canary, live
