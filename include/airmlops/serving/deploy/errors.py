"""What a deployment operation raises: one base error and what each failure means."""

from __future__ import annotations

from typing import Any

from airmlops.errors import BakeFailed, NonRetryable


class DeployError(RuntimeError):
    """A deployment operation could not be done; the message says what and why."""


class DeployFailed(DeployError, NonRetryable):
    """A new version was not switched to. The old version still serves and the state is unchanged.
    Deterministic (a retry would fail the same way), so the task fails without retries.

    ``stage`` is where it failed: ``proxy``, ``start``, ``readiness``, ``smoke``, ``canary``,
    ``shadow``, ``switch`` or ``record``; ``reason`` says why; ``log_tail`` is the end of the new
    version's log, if any.
    """

    def __init__(self, stage: str, reason: str, log_tail: str = "") -> None:
        message = f"deploy failed at {stage}: {reason}"
        if log_tail:
            message += f"\n--- log tail of the new version ---\n{log_tail}"
        super().__init__(message)
        self.stage, self.reason, self.log_tail = stage, reason, log_tail


class CanaryFailed(DeployFailed, BakeFailed):
    """A canary step judged the new version worse than the live one: the canary was cleared
    (all traffic back on the live version) and the new version stopped. Both a
    :class:`DeployFailed` (stage ``canary``) and the :class:`~airmlops.errors.BakeFailed` a
    failed bake raises. ``steps`` are the numbers of every step run, the failed one last."""

    def __init__(self, reason: str, steps: list[dict[str, Any]]) -> None:
        super().__init__("canary", reason)
        self.steps = steps


class CanaryAborted(DeployFailed):
    """A canary could not be carried on (the stable address could not be driven mid-way, e.g.
    it died): the new version was stopped, the live one serves. Not a judgement of the new
    version, so not a :class:`~airmlops.errors.BakeFailed`. ``steps`` are the steps judged
    before it stopped."""

    def __init__(self, reason: str, steps: list[dict[str, Any]]) -> None:
        super().__init__("canary", reason)
        self.steps = steps


class ShadowRejected(DeployFailed, BakeFailed):
    """A shadow window judged the new version not fit to promote (its promotion rule in the
    spec): the shadow was cleared and the new version stopped; live traffic never reached it.
    Both a :class:`DeployFailed` (stage ``shadow``) and a :class:`~airmlops.errors.BakeFailed`.
    ``judgement`` holds the window's numbers and the rules it broke."""

    def __init__(self, reason: str, judgement: dict[str, Any]) -> None:
        super().__init__("shadow", reason)
        self.judgement = judgement


class NotReady(DeployError):
    """A slot did not answer ``/readyz`` with 200 in time, or died while starting."""


class RollbackFailed(DeployError):
    """There is no previous version to roll back to, or it could not be made to serve again."""


