"""The last canary and shadow rollouts of a deployment as HTML sections of the MLOps view.

Every value is escaped (:func:`~airmlops.ui.html_text.e`); the views come from
:mod:`airmlops.ui.canary`, which reads the state file tolerantly. A running shadow gets Promote
and Reject buttons for users who may decide; :data:`DECISION_SCRIPT` (run under the page's
nonce) posts their decision to :mod:`airmlops.ui.decision` and shows the answer.
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
SHADOW_STATUSES = {"running": "running", "awaiting": "awaiting a decision"}

DECISION_SCRIPT = """
(function () {
  document.addEventListener("click", function (event) {
    var button = event.target && event.target.closest ?
      event.target.closest("button[data-shadow-action]") : null;
    if (!button) { return; }
    var box = button.closest("[data-decision-url]");
    var out = box.querySelector(".decision-outcome");
    var buttons = box.querySelectorAll("button[data-shadow-action]");
    var enable = function (on) { buttons.forEach(function (b) { b.disabled = !on; }); };
    enable(false);
    out.textContent = "sending...";
    fetch(box.getAttribute("data-decision-url"), {
      method: "POST", mode: "same-origin", credentials: "same-origin",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({version: Number(box.getAttribute("data-version")),
                            action: button.getAttribute("data-shadow-action")})
    }).then(function (response) {
      return response.json().then(function (body) {
        if (response.status === 202) {
          out.textContent = body.action + " of version " + body.version + " sent by " +
            body.by + ": the deploy applies it within a second; refresh to follow it.";
        } else {
          out.textContent = "refused (" + response.status + "): " + (body.detail || "");
          enable(true);
        }
      });
    }).catch(function (error) { out.textContent = "not sent: " + error; enable(true); });
  });
})();
"""


def running_shadow_section(shadow: ShadowView, now: dt.datetime, decide_url: str | None) -> str:
    """A shadow the deploy holds now: since when, its promotion mode and rule, and (for a user
    who may decide, ``decide_url`` set) the Promote and Reject buttons."""
    status = SHADOW_STATUSES.get(shadow.status or "", "running")
    rule = "".join(f"<dt>{e(name.replace('_', ' '))}</dt><dd>{e(f'{value:g}')}</dd>"
                   for name, value in shadow.rule)
    advice = (f' · the rule advises: <span class="verdict-'
              f'{"pass" if shadow.rule_verdict == "promote" else "fail"}">'
              f"{e(shadow.rule_verdict)}</span>" if shadow.rule_verdict else "")
    head = (f'<h4>Shadow running: version {e(shadow.version or "-")} '
            f'<span class="chip warn">{e(status)}</span></h4>'
            f'<div class="muted">slot {e(shadow.slot or "-")} · since '
            f"{time_html(shadow.started_at, now)} · promotion "
            f'{e(shadow.promotion or "rule")}{advice}</div>'
            f'<dl class="shadow-rule">{rule}</dl>')
    actions = ""
    if decide_url and shadow.version and shadow.version.isdigit():
        actions = (f'<div class="shadow-decision" data-decision-url="{e(decide_url)}" '
                   f'data-version="{e(shadow.version)}">'
                   '<button type="button" data-shadow-action="promote">Promote</button> '
                   '<button type="button" data-shadow-action="reject">Reject</button> '
                   '<span class="decision-outcome muted" role="status"></span></div>')
    return head + actions


def shadow_section(shadow: ShadowView | None, now: dt.datetime,
                   decide_url: str | None = None) -> str:
    """The last shadow rollout: both sides' traffic, how their predictions compared, both
    models' metric once labels arrived, and the rules it broke."""
    if shadow is None:
        return ""
    if shadow.status is not None:
        running = running_shadow_section(shadow, now, decide_url)
        if shadow.status != "awaiting":
            return f'<div class="shadow canary shadow-running">{running}</div>'
        return (f'<div class="shadow canary shadow-running">{running}'
                f"{_judgement_html(shadow)}</div>")
    css, words = SHADOW_OUTCOMES.get(shadow.outcome or "",
                                     ("warn", shadow.outcome or "outcome unknown"))
    percent = f" · {e(shadow.percent)} % mirrored" if shadow.percent is not None else ""
    decided = (f' · decided by {e(shadow.decided_by)}'
               + (f" {time_html(shadow.decided_at, now)}" if shadow.decided_at else "")
               if shadow.decided_by else "")
    head = (f'<h4>Last shadow: version {e(shadow.version or "-")} '
            f'<span class="chip {css}">{e(words)}</span></h4>'
            f'<div class="muted">slot {e(shadow.slot or "-")} · started '
            f"{time_html(shadow.started_at, now)}{percent}{decided}</div>")
    return f'<div class="shadow canary">{head}{_judgement_html(shadow)}</div>'


def _judgement_html(shadow: ShadowView) -> str:
    """A shadow window's numbers: both sides' traffic, the comparison, the rules broken."""
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
    return f"{traffic}{compared}{reasons}"


def _number(value: float | None, *, signed: bool = False) -> str:
    """A number with four decimals (with its sign when ``signed``), or ``-``."""
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}"
