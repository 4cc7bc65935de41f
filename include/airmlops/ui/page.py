"""The MLOps page: self-contained HTML (inline CSS, inline SVG chart, one tiny inline script).

Nothing is loaded from anywhere else, so the page works offline and under a strict
Content-Security-Policy (the style and script blocks carry the response's nonce). Every value
that comes from a spec, MLflow, a deployment record or the monitoring table is escaped with
:func:`html.escape`; links are built here from validated parts, and only ``http(s)`` URLs or
paths of this server become an ``href``.

The page is shown inside the Airflow UI in a sandboxed iframe that may not open popups or
navigate the Airflow window. Links that must leave the frame (the MLflow UI, Airflow's own DAG
pages, a report in a new tab) are marked ``data-leave-frame``: the script lets the parent
document (the same origin) follow them. Outside a frame they are ordinary links.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from urllib.parse import quote, urlencode

from airmlops.ui.chart import metrics_chart
from airmlops.ui.html_text import e
from airmlops.ui.html_text import time_html as _time
from airmlops.ui.trials import DECISION_SCRIPT, canary_section, shadow_section
from airmlops.ui.views import (
    LINEAGE_KEYS,
    DeploymentView,
    ModelVersionView,
    MonitoringView,
    Overview,
    PipelineView,
    RegistryView,
    WindowView,
)

LINEAGE_LABELS = {
    "git_commit": "commit",
    "data_digest": "data digest",
    "image_tag": "image",
    "image_id": "image id",
    "bento_tag": "bento",
    "deployed_at": "deployed at",
    "deployed_target": "deployed to",
}
DETAIL_LABELS = {
    "spec_hash": "spec hash",
    "features_hash": "features hash",
    "airflow_dag_id": "trained by DAG",
    "airflow_run_id": "trained in run",
    "trigger_reason": "trigger",
    "gate_blessed": "gate blessed",
    "previous_champion": "previous champion",
}
DIGEST_KEYS = {"git_commit": 10, "data_digest": 19, "image_id": 19, "spec_hash": 12,
               "features_hash": 12}
"""Long identifiers shown shortened (the full value is in the tooltip)."""

STYLE = """
:root { color-scheme: light dark; --bg: #f7f8fa; --card: #fff; --fg: #1b1f24; --muted: #5b6370;
  --line: #d9dde3; --accent: #0b6bcb; --ok: #1a7f37; --warn: #9a6700; --bad: #cf222e;
  --chip: #eef1f4; --drift: #8250df; --perf: #0b6bcb; }
@media (prefers-color-scheme: dark) {
  :root { --bg: #0f1115; --card: #171a21; --fg: #e6e8eb; --muted: #9aa3ae; --line: #2c313a;
    --accent: #58a6ff; --ok: #3fb950; --warn: #d29922; --bad: #f85149; --chip: #222731;
    --drift: #b392f0; --perf: #58a6ff; }
}
* { box-sizing: border-box; }
body { margin: 0; padding: 16px 20px 32px; background: var(--bg); color: var(--fg);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Liberation Sans", sans-serif; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
h1 { font-size: 22px; margin: 0 0 2px; }
h2 { font-size: 18px; margin: 0; }
h3 { font-size: 13px; margin: 0 0 8px; text-transform: uppercase; letter-spacing: .04em;
  color: var(--muted); }
code, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, "Liberation Mono", monospace;
  font-size: 12.5px; }
.muted { color: var(--muted); }
.top { display: flex; justify-content: space-between; align-items: baseline; gap: 16px;
  flex-wrap: wrap; margin-bottom: 14px; }
.banner { border: 1px solid var(--warn); color: var(--warn); border-radius: 8px;
  padding: 8px 12px; margin: 0 0 14px; background: var(--card); }
.pipeline { background: var(--card); border: 1px solid var(--line); border-radius: 10px;
  padding: 16px; margin: 0 0 18px; }
.pipeline-head { display: flex; gap: 12px; align-items: baseline; flex-wrap: wrap; }
.chip { display: inline-block; padding: 1px 8px; border-radius: 999px; background: var(--chip);
  font-size: 12px; color: var(--muted); }
.chip.ok { color: var(--ok); } .chip.bad { color: var(--bad); } .chip.warn { color: var(--warn); }
.dags { margin: 6px 0 14px; display: flex; gap: 14px; flex-wrap: wrap; font-size: 13px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 12px; }
.panel { border: 1px solid var(--line); border-radius: 8px; padding: 12px; min-width: 0; }
.empty { color: var(--muted); font-style: italic; margin: 4px 0; }
.error { color: var(--bad); margin: 4px 0; }
.version { font-size: 20px; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px; margin: 8px 0 0; }
dt { color: var(--muted); } dd { margin: 0; overflow-wrap: anywhere; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--muted); font-weight: 600; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.metrics td.num { width: 1%; white-space: nowrap; }
tr.primary td { font-weight: 600; }
.monitoring { margin-top: 14px; }
.chart-row { display: flex; gap: 20px; flex-wrap: wrap; align-items: flex-start;
  margin: 4px 0 10px; }
.chart-wrap { flex: 1 1 420px; max-width: 720px; }
.latest { flex: 0 1 320px; }
h4 { font-size: 13px; margin: 4px 0 4px; }
details { margin-top: 6px; } summary { cursor: pointer; font-size: 12px; }
.table-wrap { overflow-x: auto; }
svg.mlops-chart { width: 100%; height: auto; display: block; }
svg .plot { fill: none; stroke: var(--line); }
svg .axis, svg .threshold-label, svg .no-data { fill: var(--muted); font-size: 10px; }
svg .panel-title { fill: var(--fg); font-size: 11px; font-weight: 600; }
svg .threshold { stroke: var(--warn); stroke-dasharray: 4 3; }
svg .line { fill: none; stroke-width: 2; }
svg .line.drift { stroke: var(--drift); } svg .line.perf { stroke: var(--perf); }
svg .point { stroke: var(--card); stroke-width: 1.5; }
svg .point.drift { fill: var(--drift); } svg .point.perf { fill: var(--perf); }
svg .point.breach { fill: var(--bad); }
.decision-retrain { color: var(--bad); font-weight: 600; }
.decision-none { color: var(--muted); }
.canary { margin-top: 10px; }
.verdict-pass { color: var(--ok); } .verdict-fail { color: var(--bad); font-weight: 600; }
"""

SCRIPT = """
(function () {
  if (window.parent === window) { return; }
  document.addEventListener("click", function (event) {
    var link = event.target && event.target.closest ? event.target.closest("a[data-leave-frame]")
      : null;
    if (!link || event.defaultPrevented || event.button !== 0 || event.metaKey ||
        event.ctrlKey || event.shiftKey || event.altKey) { return; }
    try {
      var outer = window.parent.document;
      var proxy = outer.createElement("a");
      proxy.href = link.href;
      if (link.target === "_blank") { proxy.target = "_blank"; proxy.rel = "noopener noreferrer"; }
      outer.body.appendChild(proxy);
      proxy.click();
      outer.body.removeChild(proxy);
      event.preventDefault();
    } catch (error) {
      /* The parent is not reachable: leave the link to the browser. */
    }
  });
})();
"""


def _external(url: str | None) -> str | None:
    return url if url and url.startswith(("http://", "https://")) else None


def _link(url: str | None, text: str, *, new_tab: bool = False, leave_frame: bool = False,
          title: str | None = None, css: str = "") -> str:
    """An ``<a>`` to ``url`` (an ``http(s)`` URL or a path of this server), else plain text."""
    if not url or not (url.startswith(("http://", "https://")) or url.startswith("/")):
        return e(text)
    attrs = [f'href="{e(url)}"']
    if new_tab:
        attrs.append('target="_blank" rel="noopener noreferrer"')
    elif leave_frame:
        attrs.append('target="_top"')
    if new_tab or leave_frame:
        attrs.append("data-leave-frame")
    if title:
        attrs.append(f'title="{e(title)}"')
    if css:
        attrs.append(f'class="{e(css)}"')
    return f"<a {' '.join(attrs)}>{e(text)}</a>"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _estimate(window: WindowView, metric: str | None) -> str:
    """`` (est. 0.800)`` beside a realized metric, when the window has an estimate of it."""
    value = window.estimated_performance.get(metric) if metric else None
    if value is None:
        return ""
    source = (f" from {window.estimated_rows} predictions" if window.estimated_rows is not None
              else "")
    title = f"estimated without labels (CBPE){source}; the number before it is realized"
    return f' <span class="muted estimate" title="{e(title)}">(est. {_num(value)})</span>'


def _short(key: str, value: str) -> str:
    keep = DIGEST_KEYS.get(key)
    if keep and len(value) > keep + 1:
        return f'<span class="mono" title="{e(value)}">{e(value[:keep])}…</span>'
    return f'<span class="mono">{e(value)}</span>'


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


def _version_panel(title: str, view: ModelVersionView | None, registry: RegistryView,
                   primary_metric: str, now: dt.datetime, empty: str,
                   same_as: ModelVersionView | None = None) -> str:
    """A champion or challenger panel; ``same_as`` is the champion when this is the
    challenger (the same version is then named, not repeated)."""
    css = e(title.lower())
    head = f"<h3>{e(title)}</h3>"
    if view is None:
        if registry.error and title == "Challenger":
            # The champion panel beside it already says why MLflow could not be read.
            return (f'<div class="panel {css}">{head}<p class="empty">Unknown while MLflow '
                    "cannot be read.</p></div>")
        if registry.error:
            return f'<div class="panel {css}">{head}<p class="error">{e(registry.error)}</p></div>'
        return f'<div class="panel {css}">{head}<p class="empty">{e(empty)}</p></div>'
    version = _link(view.version_url, f"version {view.version}", new_tab=True,
                    title="Open this model version in MLflow")
    if same_as is not None and same_as.version == view.version:
        return (f'<div class="panel {css}" data-version="{e(view.version)}">{head}'
                f'<div class="version">{version}</div><p class="empty">The champion itself: no '
                "newer blessed candidate is waiting.</p></div>")
    ordered = sorted(view.metrics.items(), key=lambda item: (item[0] != primary_metric, item[0]))
    rows = []
    for name, value in ordered:
        primary = ' class="primary"' if name == primary_metric else ""
        rows.append(f"<tr{primary}><td>{e(name)}</td><td class=\"num\">{_num(value, 4)}</td></tr>")
    metrics = (f'<table class="metrics"><tbody>{"".join(rows)}</tbody></table>' if rows
               else '<p class="empty">no test metrics on the run</p>')
    lineage = []
    for key in LINEAGE_KEYS:
        value = view.lineage.get(key)
        shown = _short(key, value) if value else '<span class="muted">-</span>'
        if key == "deployed_at" and value:
            shown = _time(value, now)
        lineage.append(f"<dt>{e(LINEAGE_LABELS[key])}</dt><dd>{shown}</dd>")
    details = "".join(f"<dt>{e(DETAIL_LABELS.get(key, key))}</dt><dd>{_short(key, value)}</dd>"
                      for key, value in view.details.items())
    if details:
        details = (f'<details><summary class="muted">more lineage</summary>'
                   f"<dl>{details}</dl></details>")
    run = (f"<p>{_link(view.run_url, 'training run in MLflow', new_tab=True)}</p>"
           if view.run_url else "")
    status = f" · {e(view.status)}" if view.status else ""
    return (
        f'<div class="panel {css}" data-version="{e(view.version)}">{head}'
        f'<div class="version">{version}</div>'
        f'<div class="muted">registered {_time(view.created_at, now)}{status}</div>'
        f"{metrics}<dl class=\"lineage\">{''.join(lineage)}</dl>{details}{run}</div>"
    )


def _deployment_panel(view: DeploymentView, now: dt.datetime,
                      decide_url: str | None = None) -> str:
    head = "<h3>Live deployment</h3>"
    note = f'<p class="error">{e(view.error)}</p>' if view.error else ""
    if not view.deployed:
        return (f'<div class="panel deployment">{head}{note}<p class="empty">Not deployed: the '
                "training DAG's deploy stage starts the model service behind a stable "
                "address.</p></div>")
    if view.proxy_alive is None:
        proxy = '<span class="chip">not checked</span>'
    elif view.proxy_alive:
        proxy = '<span class="chip ok">serving</span>'
    else:
        proxy = '<span class="chip bad">proxy down</span>'
    address = (f'<code class="address">{e(view.stable_url)}</code>' if view.stable_url
               else '<span class="muted">-</span>')
    slots = []
    for slot in view.slots:
        if slot.ready:
            health = '<span class="chip ok">ready</span>'
        elif slot.alive:
            health = '<span class="chip warn">alive, not ready</span>'
        elif slot.alive is None:
            health = '<span class="chip">not checked</span>'
        else:
            health = '<span class="chip bad">stopped</span>'
        role = "live" if slot.active else "rollback"
        slots.append(
            f"<tr><td>{e(slot.slot)} <span class=\"muted\">({role})</span></td>"
            f"<td>{e(slot.version or '-')}</td><td>{e(slot.target or '-')}</td>"
            f"<td>{health}</td></tr>"
        )
    table = ("<table><thead><tr><th>slot</th><th>version</th><th>target</th><th>health</th>"
             f"</tr></thead><tbody>{''.join(slots)}</tbody></table>" if slots else "")
    return (
        f'<div class="panel deployment">{head}{note}'
        f'<div class="version">version {e(view.active_version or "-")} {proxy}</div>'
        f"<dl><dt>address</dt><dd>{address}</dd>"
        f"<dt>live slot</dt><dd>{e(view.active_slot or '-')}</dd>"
        f"<dt>switched</dt><dd>{_time(view.switched_at, now)}</dd></dl>{table}"
        f"{canary_section(view.canary, now)}{shadow_section(view.shadow, now, decide_url)}"
        "</div>"
    )


def _windows_table(pipeline: str, windows: Iterable[WindowView], metric: str | None,
                   app_root: str, now: dt.datetime) -> str:
    rows = []
    for window in windows:
        perf = window.performance.get(metric) if metric else None
        breaches = (", ".join(window.breaches) if window.breaches
                    else '<span class="muted">none</span>')
        if window.breaches:
            breaches = e(breaches)
        if window.decision:
            decision = (f'<span class="decision-{e(window.decision)}">{e(window.decision)}</span>'
                        + (f'<div class="muted">{e(window.reason)}</div>' if window.reason else ""))
            if window.triggered_run_id:
                decision += f'<div class="mono">{e(window.triggered_run_id)}</div>'
        else:
            decision = '<span class="muted">pending</span>'
        report = "-"
        if window.has_report:
            url = (f"{app_root}/pipelines/{quote(pipeline, safe='')}/windows/"
                   f"{quote(window.window_id, safe='')}/report")
            report = _link(url, "Evidently report", new_tab=True)
        drifted = (f'<div class="muted">{e(", ".join(window.drifted_columns))}</div>'
                   if window.drifted_columns else "")
        rows.append(
            f'<tr class="window" data-window="{e(window.window_id)}">'
            f'<td><span class="mono">{e(window.window_id)}</span>'
            f"<div>{_time(window.start, now)}</div></td>"
            f'<td class="num">{e(window.rows if window.rows is not None else "-")}</td>'
            f'<td class="num">{e(window.label_count if window.label_count is not None else "-")}'
            "</td>"
            f'<td class="num">{_num(window.drift_share)}{drifted}</td>'
            f'<td class="num">{_num(window.prediction_drift)}</td>'
            f'<td class="num">{_num(perf)}{_estimate(window, metric)}</td>'
            f"<td>{breaches}</td><td>{decision}</td><td>{report}</td></tr>"
        )
    metric_head = e(metric) if metric else "performance"
    return (
        '<div class="table-wrap"><table class="windows"><thead><tr><th>window</th>'
        '<th class="num">rows</th><th class="num">labels</th><th class="num">drift share</th>'
        f'<th class="num">prediction drift</th><th class="num" title="realized from labels, '
        f'then (est.) estimated without labels">{metric_head} <span class="muted">realized '
        "(est.)</span></th>"
        "<th>breaches</th><th>decision</th><th>report</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _latest_summary(view: MonitoringView, now: dt.datetime) -> str:
    """The latest window in words, beside the chart."""
    latest = view.windows[-1]
    items = [f"<dt>window</dt><dd><span class=\"mono\">{e(latest.window_id)}</span></dd>",
             f"<dt>started</dt><dd>{_time(latest.start, now)}</dd>"]
    drift = _num(latest.drift_share)
    if latest.drift_share is not None and view.drift_threshold is not None:
        drift += f' <span class="muted">(threshold {_num(view.drift_threshold, 2)})</span>'
    items.append(f"<dt>drift share</dt><dd>{drift}</dd>")
    metric = view.performance_metric
    if metric:
        value = latest.performance.get(metric)
        shown = _num(value) if value is not None else (
            f'<span class="muted">not yet ({e(latest.label_count or 0)} labels)</span>')
        if value is not None and view.performance_floor is not None:
            bound = "floor" if view.floor_is_minimum else "ceiling"
            shown += f' <span class="muted">({bound} {_num(view.performance_floor, 2)})</span>'
        shown += _estimate(latest, metric)
        items.append(f"<dt>{e(metric)}</dt><dd>{shown}</dd>")
    breaches = (f'<span class="chip bad">{e(", ".join(latest.breaches))}</span>'
                if latest.breaches else '<span class="chip ok">none</span>')
    items.append(f"<dt>breaches</dt><dd>{breaches}</dd>")
    decision = e(latest.decision) if latest.decision else '<span class="muted">pending</span>'
    if latest.decision:
        decision = f'<span class="decision-{e(latest.decision)}">{decision}</span>'
    if latest.reason:
        decision += f'<div class="muted">{e(latest.reason)}</div>'
    items.append(f"<dt>decision</dt><dd>{decision}</dd>")
    return f'<div class="latest"><h4>Latest window</h4><dl>{"".join(items)}</dl></div>'


def _monitoring_section(pipeline: PipelineView, app_root: str, now: dt.datetime) -> str:
    view: MonitoringView = pipeline.monitoring
    head = "<h3>Monitoring</h3>"
    if view.error:
        return f'<div class="monitoring panel">{head}<p class="error">{e(view.error)}</p></div>'
    if not view.windows:
        return (f'<div class="monitoring panel">{head}<p class="empty">No monitoring windows '
                "yet: the monitoring DAG records one per interval once a champion serves "
                "traffic.</p></div>")
    chart = metrics_chart(
        view.windows, drift_threshold=view.drift_threshold,
        performance_metric=view.performance_metric, performance_floor=view.performance_floor,
        floor_is_minimum=view.floor_is_minimum, chart_id=f"chart-{pipeline.name}",
    )
    latest_first = list(reversed(view.windows))
    return (
        f'<div class="monitoring panel">{head}'
        f'<div class="chart-row"><div class="chart-wrap">{chart}</div>'
        f"{_latest_summary(view, now)}</div>"
        f"{_windows_table(pipeline.name, latest_first, view.performance_metric, app_root, now)}"
        "</div>"
    )


def _pipeline_section(pipeline: PipelineView, *, airflow_root: str, app_root: str,
                      now: dt.datetime, may_decide: bool = False) -> str:
    dag_links = []
    for role, dag_id in pipeline.dag_ids.items():
        url = f"{airflow_root}/dags/{quote(dag_id, safe='')}"
        if role == "training":
            url += "/runs"
            dag_links.append(f"{e(role)}: " + _link(url, f"{dag_id} runs", leave_frame=True))
        else:
            dag_links.append(f"{e(role)}: " + _link(url, dag_id, leave_frame=True))
    registry = pipeline.registry
    model = _link(registry.model_url, f"model {registry.model_name} in MLflow", new_tab=True)
    description = (f'<p class="muted">{e(pipeline.description)}</p>'
                   if pipeline.description else "")
    owner = f'<span class="chip">owner: {e(pipeline.owner)}</span>' if pipeline.owner else ""
    return (
        f'<section class="pipeline" id="pipeline-{e(pipeline.name)}" '
        f'data-pipeline="{e(pipeline.name)}">'
        f'<div class="pipeline-head"><h2>{e(pipeline.name)}</h2>'
        f'<span class="chip">{e(pipeline.task.replace("_", " "))}</span>'
        f'<span class="chip">primary metric: {e(pipeline.primary_metric)}</span>'
        f"{owner}"
        f"<span>{model}</span></div>{description}"
        f'<div class="dags">{" · ".join(dag_links)}</div>'
        '<div class="grid">'
        + _version_panel("Champion", registry.champion, registry, pipeline.primary_metric, now,
                         "No champion yet: a blessed version becomes champion once it is "
                         "deployed and healthy.")
        + _version_panel("Challenger", registry.challenger, registry, pipeline.primary_metric,
                         now, "No challenger: the next blessed training run registers one.",
                         same_as=registry.champion)
        + _deployment_panel(pipeline.deployment, now,
                            f"{app_root}/api/pipelines/{quote(pipeline.name, safe='')}"
                            "/shadow/decision" if may_decide else None)
        + "</div>"
        + _monitoring_section(pipeline, app_root, now)
        + "</section>"
    )


def render_page(
    overview: Overview,
    *,
    now: dt.datetime,
    nonce: str,
    app_root: str,
    airflow_root: str,
    viewer: str | None = None,
    selection: Mapping[str, str] | None = None,
    pipelines_dir: str | None = None,
    deciders: frozenset[str] = frozenset(),
) -> str:
    """The whole page. ``app_root``/``airflow_root`` are this app's and Airflow's URL paths;
    ``selection`` is the filter the page was asked for (``pipeline`` or ``dag_id``);
    ``deciders`` the pipelines whose running shadow the viewer may promote or reject."""
    selection = dict(selection or {})
    refresh = f"{app_root}/" + (f"?{urlencode(selection)}" if selection else "")
    mlflow = (_link(_external(overview.mlflow_ui_url), "MLflow UI", new_tab=True)
              if overview.mlflow_ui_url else "")
    banner = ""
    if overview.invalid_specs:
        banner = (f'<p class="banner">Invalid pipeline specs (not shown; see the DAG import '
                  f'errors): {e(", ".join(overview.invalid_specs))}</p>')
    if overview.pipelines:
        body = "".join(_pipeline_section(p, airflow_root=airflow_root, app_root=app_root,
                                         now=now, may_decide=p.name in deciders)
                       for p in overview.pipelines)
    elif selection:
        shown = ", ".join(f"{k}={v}" for k, v in selection.items())
        body = (f'<p class="empty pipeline">No pipeline matches {e(shown)} (or you may not read '
                f'its DAGs). {_link(f"{app_root}/", "Show all pipelines")}</p>')
    else:
        where = f" in {e(pipelines_dir)}" if pipelines_dir else ""
        body = (f'<p class="empty pipeline">No pipelines to show: there is no valid spec{where}, '
                "or you may not read any pipeline's DAGs.</p>")
    who = f" · signed in as {e(viewer)}" if viewer else ""
    generated = _time(overview.generated_at, now)
    return (
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        "<title>MLOps</title>"
        f'<style nonce="{e(nonce)}">{STYLE}</style></head><body>'
        '<div class="top"><div><h1>MLOps</h1>'
        f'<div class="muted">{len(overview.pipelines)} pipeline(s) · as of {generated}{who}'
        "</div></div>"
        f'<div>{mlflow}{" · " if mlflow else ""}{_link(refresh, "Refresh")}</div></div>'
        f"{banner}<main>{body}</main>"
        f'<script nonce="{e(nonce)}">{SCRIPT}{DECISION_SCRIPT}</script></body></html>'
    )
