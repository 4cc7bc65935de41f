"""Evidently plumbing shared by the drift and the performance measurements.

:func:`data_definition` declares the columns of a frame, :func:`finite` turns a metric value
into a float or None, :func:`merge_snapshots` puts several reports into one and
:func:`save_html` writes a report's HTML and, beside it, its machine-readable snapshot.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from airmlops.paths import atomic_replace


def data_definition(numeric: list[str], categorical: list[str], **tasks: Any) -> Any:
    """Evidently's ``DataDefinition`` of exactly these columns (``tasks``: the
    ``classification=`` or ``regression=`` of a performance report)."""
    from evidently import DataDefinition

    return DataDefinition(numerical_columns=numeric, categorical_columns=categorical,
                          text_columns=[], datetime_columns=[], unknown_columns=[],
                          list_columns=[], **tasks)


def finite(value: Any) -> float | None:
    """``value`` as a float, or None when it is missing, infinite or NaN."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def merge_snapshots(snapshots: list[Any]) -> Any:
    """One snapshot holding the widgets and results of several (for one HTML file)."""
    from evidently.core.report import Snapshot

    merged = snapshots[0].dump_dict()
    for other in snapshots[1:]:
        data = other.dump_dict()
        merged["metric_results"].update(data["metric_results"])
        merged["top_level_metrics"] = merged["top_level_metrics"] + data["top_level_metrics"]
        merged["widgets"] = merged["widgets"] + data["widgets"]
        merged["tests_widgets"] = merged["tests_widgets"] + data["tests_widgets"]
    return Snapshot.load_dict(merged)


def save_html(snapshot: Any, html_path: Path) -> None:
    """The HTML report and, beside it, the snapshot (``Snapshot.loads`` reads it back), each
    written atomically."""
    atomic_replace(html_path, lambda temp: snapshot.save_html(str(temp)))
    text = snapshot.dumps()
    atomic_replace(html_path.with_suffix(".snapshot.json"),
                   lambda temp: temp.write_text(text, encoding="utf-8"))
