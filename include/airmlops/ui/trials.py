"""The last canary and shadow rollouts of a deployment as HTML sections of the MLOps view.

Every value is escaped (:func:`~airmlops.ui.html_text.e`); the views come from
:mod:`airmlops.ui.canary`, which reads the state file tolerantly.
"""

from __future__ import annotations

import datetime as dt

from airmlops.ui.html_text import count_text, e, ms_text, rate_text, time_html
from airmlops.ui.views import CanaryView, ShadowView

OUTCOMES = {"promoted": ("ok", "promoted"), "rolled_back": ("bad", "rolled back")}
"""A canary's recorded outcome: its chip's class and words."""


def canary_section(canary: CanaryView | None, now: dt.datetime) -> str:
    """The last canary rollout: its outcome and each step, canary beside live."""
    if canary is None:
        return ""
    css, words = OUTCOMES.get(canary.outcome or "", ("warn", canary.outcome or "outcome unknown"))
    head = (f'<h4>Last canary: version {e(canary.version or "-")} '
            f'<span class="chip {css}">{e(words)}</span></h4>'
            f'<div class="muted">slot {e(canary.slot or "-")} · started '
            f"{time_html(canary.started_at, now)}</div>")
    rows = []
    for step in canary.steps:
        verdict = e(step.verdict or "-")
        if step.verdict in ("pass", "fail"):
            verdict = f'<span class="verdict-{step.verdict}">{verdict}</span>'
        if step.reason:
            verdict += f'<div class="muted">{e(step.reason)}</div>'
        held = ' <span class="muted">(held twice)</span>' if step.extended else ""
        rows.append(
            f'<tr class="canary-step" data-percent="{e(step.percent)}">'
            f'<td class="num">{e(step.percent)} %{held}</td>'
            f'<td class="num">{count_text(step.requests)} '
            f'<span class="muted">/ {count_text(step.live_requests)}</span></td>'
            f'<td class="num">{rate_text(step.error_rate)} '
            f'<span class="muted">/ {rate_text(step.live_error_rate)}</span></td>'
            f'<td class="num">{ms_text(step.p50_ms)} '
            f'<span class="muted">/ {ms_text(step.live_p50_ms)}</span></td><td>{verdict}</td></tr>'
        )
    if not rows:
        return f'<div class="canary">{head}<p class="empty">no step recorded</p></div>'
    return (
        f'<div class="canary">{head}<table class="canary-steps"><thead><tr><th>step</th>'
        '<th class="num">requests canary / live</th><th class="num">error rate canary / live</th>'
        '<th class="num">p50 canary / live</th><th>verdict</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


SHADOW_OUTCOMES = {"promoted": ("ok", "promoted"), "rejected": ("bad", "rejected")}
"""A shadow's recorded outcome: its chip's class and words."""


def shadow_section(shadow: ShadowView | None, now: dt.datetime) -> str:
    """The last shadow rollout: both sides' traffic, how their predictions compared, both
    models' metric once labels arrived, and the rules it broke."""
    if shadow is None:
        return ""
    css, words = SHADOW_OUTCOMES.get(shadow.outcome or "",
                                     ("warn", shadow.outcome or "outcome unknown"))
    percent = f" · {e(shadow.percent)} % mirrored" if shadow.percent is not None else ""
    head = (f'<h4>Last shadow: version {e(shadow.version or "-")} '
            f'<span class="chip {css}">{e(words)}</span></h4>'
            f'<div class="muted">slot {e(shadow.slot or "-")} · started '
            f"{time_html(shadow.started_at, now)}{percent}</div>")
    traffic = (
        '<table class="shadow-traffic"><thead><tr><th></th><th class="num">requests</th>'
        '<th class="num">error rate</th><th class="num">p50</th></tr></thead><tbody>'
        f'<tr><td>shadow</td><td class="num">{count_text(shadow.shadow_requests)}</td>'
        f'<td class="num">{rate_text(shadow.shadow_error_rate)}</td>'
        f'<td class="num">{ms_text(shadow.shadow_p50_ms)}</td></tr>'
        f'<tr><td>live</td><td class="num">{count_text(shadow.live_requests)}</td>'
        f'<td class="num">{rate_text(shadow.live_error_rate)}</td>'
        f'<td class="num">{ms_text(shadow.live_p50_ms)}</td></tr></tbody></table>')
    metric = e(shadow.metric or "metric")
    labelled = (f"{_number(shadow.shadow_metric)} "
                f'<span class="muted">/ live {_number(shadow.live_metric)} on '
                f"{count_text(shadow.labelled)} labelled</span>"
                if shadow.labelled else '<span class="muted">no label yet</span>')
    compared = (
        f'<dl class="shadow-comparison"><dt>compared</dt><dd>{count_text(shadow.pairs)} '
        "predictions</dd>"
        f"<dt>agreement</dt><dd>{rate_text(shadow.agreement_rate)}</dd>"
        f"<dt>score KS</dt><dd>{_number(shadow.score_ks)}</dd>"
        f"<dt>mean score shift</dt><dd>{_number(shadow.mean_score_shift, signed=True)}</dd>"
        f"<dt>{metric} shadow</dt><dd>{labelled}</dd></dl>")
    reasons = "".join(f'<li class="verdict-fail">{e(reason)}</li>' for reason in shadow.reasons)
    reasons = f'<ul class="shadow-reasons">{reasons}</ul>' if reasons else ""
    return f'<div class="shadow canary">{head}{traffic}{compared}{reasons}</div>'


def _number(value: float | None, *, signed: bool = False) -> str:
    """A number with four decimals (with its sign when ``signed``), or ``-``."""
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
