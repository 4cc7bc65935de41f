"""The monitored metrics over time as one small inline SVG (no script, no external library).

Two panels share the time axis (one point per window, oldest left): the share of drifted model
inputs against the policy's threshold, and the performance metric on delayed labels against its
floor. A window's point is red when the window breached, and carries a tooltip with its
numbers. Missing values (no drift assessment, too few labels) leave a gap in the line.
Every text that reaches the SVG is escaped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

from airmlops.ui.data import WindowView

WIDTH = 640
PANEL_HEIGHT = 92
GAP = 26
LEFT, RIGHT, TOP, BOTTOM = 46, 14, 18, 22


def _fmt(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") if math.isfinite(value) else "n/a"


def _short_time(iso: str) -> str:
    """``2026-04-01T10:00:00+00:00`` -> ``04-01 10:00`` (as is when not ISO-like)."""
    if len(iso) >= 16 and iso[4] == "-" and iso[10] == "T":
        return f"{iso[5:10]} {iso[11:16]}"
    return iso[:16]


def _scale(values: Sequence[float], reference: float | None, fixed: tuple[float, float] | None
           ) -> tuple[float, float]:
    if fixed is not None:
        return fixed
    points = [v for v in values if math.isfinite(v)]
    if reference is not None:
        points.append(reference)
    if not points:
        return 0.0, 1.0
    low, high = min(points), max(points)
    pad = (high - low) * 0.15 or max(abs(high) * 0.05, 0.01)
    return low - pad, high + pad


def _panel(
    *,
    top: float,
    title: str,
    values: Sequence[float | None],
    windows: Sequence[WindowView],
    reference: float | None,
    reference_label: str,
    fixed: tuple[float, float] | None,
    series_class: str,
) -> list[str]:
    plot_w = WIDTH - LEFT - RIGHT
    plot_h = PANEL_HEIGHT - TOP
    y0 = top + TOP
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low, high = _scale(finite, reference, fixed)
    span = (high - low) or 1.0
    count = len(values)

    def x(i: int) -> float:
        return LEFT + (plot_w / 2 if count == 1 else plot_w * i / (count - 1))

    def y(v: float) -> float:
        return y0 + plot_h - (min(max(v, low), high) - low) / span * plot_h

    parts = [
        f'<text class="panel-title" x="{LEFT}" y="{top + 12}">{escape(title)}</text>',
        f'<rect class="plot" x="{LEFT}" y="{y0}" width="{plot_w}" height="{plot_h}"/>',
        f'<text class="axis" x="{LEFT - 6}" y="{y0 + 8}" text-anchor="end">{_fmt(high)}</text>',
        f'<text class="axis" x="{LEFT - 6}" y="{y0 + plot_h}" text-anchor="end">'
        f"{_fmt(low)}</text>",
    ]
    if reference is not None and math.isfinite(reference):
        ry = y(reference)
        parts.append(f'<line class="threshold" x1="{LEFT}" x2="{LEFT + plot_w}" y1="{ry:.1f}" '
                     f'y2="{ry:.1f}"/>')
        # The legend of the dashed line sits in the title row, clear of the data.
        lx = LEFT + plot_w
        parts.append(f'<line class="threshold" x1="{lx - 150}" x2="{lx - 128}" y1="{top + 8}" '
                     f'y2="{top + 8}"/>')
        parts.append(f'<text class="threshold-label" x="{lx - 124}" y="{top + 12}">'
                     f"{escape(reference_label)} {_fmt(reference)}</text>")
    if not finite:
        parts.append(f'<text class="no-data" x="{LEFT + plot_w / 2}" y="{y0 + plot_h / 2 + 4}" '
                     f'text-anchor="middle">no values yet</text>')
        return parts
    # The line, broken where a window has no value.
    segments: list[list[str]] = [[]]
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            segments.append([])
            continue
        segments[-1].append(f"{x(i):.1f},{y(v):.1f}")
    for segment in segments:
        if len(segment) > 1:
            parts.append(f'<polyline class="line {series_class}" points="{" ".join(segment)}"/>')
    for i, v in enumerate(values):
        if v is None or not math.isfinite(v):
            continue
        window = windows[i]
        state = "breach" if window.breaches else "ok"
        tip = f"{window.window_id} ({_short_time(window.start)}): {title} {_fmt(v)}"
        if window.breaches:
            tip += f"; breaches: {', '.join(window.breaches)}"
        if window.decision:
            tip += f"; decision: {window.decision}"
        parts.append(f'<circle class="point {series_class} {state}" cx="{x(i):.1f}" '
                     f'cy="{y(v):.1f}" r="3.5"><title>{escape(tip)}</title></circle>')
    return parts


def metrics_chart(
    windows: Sequence[WindowView],
    *,
    drift_threshold: float | None,
    performance_metric: str | None,
    performance_floor: float | None,
    floor_is_minimum: bool = True,
    chart_id: str = "chart",
) -> str:
    """The SVG of drift share and performance over ``windows`` (oldest first); "" if none."""
    if not windows:
        return ""
    drift = [w.drift_share for w in windows]
    perf = [w.performance.get(performance_metric) if performance_metric else None
            for w in windows]
    height = 2 * PANEL_HEIGHT + GAP + BOTTOM
    metric_title = f"{performance_metric} (labelled)" if performance_metric else "performance"
    floor_label = "floor" if floor_is_minimum else "ceiling"
    body = [
        *_panel(top=0, title="drift share", values=drift, windows=windows,
                reference=drift_threshold, reference_label="threshold", fixed=(0.0, 1.0),
                series_class="drift"),
        *_panel(top=PANEL_HEIGHT + GAP, title=metric_title, values=perf, windows=windows,
                reference=performance_floor, reference_label=floor_label, fixed=None,
                series_class="perf"),
        f'<text class="axis" x="{LEFT}" y="{height - 4}">{escape(_short_time(windows[0].start))}'
        "</text>",
    ]
    if len(windows) > 1:
        body.append(f'<text class="axis" x="{WIDTH - RIGHT}" y="{height - 4}" text-anchor="end">'
                    f"{escape(_short_time(windows[-1].start))}</text>")
    label = (f"Drift share and {performance_metric or 'performance'} over the last "
             f"{len(windows)} monitoring windows")
    return (
        f'<svg class="mlops-chart" id="{escape(chart_id)}" role="img" '
        f'aria-label="{escape(label)}" viewBox="0 0 {WIDTH} {height}" '
        f'xmlns="http://www.w3.org/2000/svg"><title>{escape(label)}</title>'
        + "".join(body) + "</svg>"
    )
