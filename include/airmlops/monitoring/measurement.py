"""What one monitoring window measured, and the breaches judged from it.

:class:`WindowMeasurement` holds the numbers only (each input's drift test, the drift share,
the prediction drift, the data quality shares and the performance); :class:`WindowReport` is a
measurement with the breaches :func:`airmlops.monitoring.judgement.judge` decided from it, so
the numbers are defined once. Both are plain values: no pandas, no Evidently.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airmlops.monitoring.judgement import Judgement


@dataclass(frozen=True)
class ColumnDriftResult:
    """One column's drift test: the explicit method and threshold, the score and the verdict.

    ``score``/``drifted`` are None when the column had no values to compare.
    """

    method: str
    threshold: float
    score: float | None
    drifted: bool | None


@dataclass(frozen=True)
class WindowMeasurement:
    """The numbers of one window, without any judgement of them.

    ``columns``: each model input's drift test (method, threshold, score, verdict);
    ``drift_share``: the measured share of drifted inputs (None when drift was not tested);
    ``quality``: per input the measured shares, with the limits and valid range they were
    measured against as metadata; ``performance``: metric -> value on ``label_count`` labelled
    rows (None below ``performance.min_labels``); ``estimated_performance``: the label-free
    estimate of the same window (:mod:`airmlops.monitoring.estimation`: ``roc_auc``,
    ``accuracy``, ``precision``, ``recall`` and ``rows``; None when the champion has no
    calibration, or for regression).
    """

    window_id: str
    start: dt.datetime
    end: dt.datetime
    rows: int
    sampled: int
    columns: dict[str, ColumnDriftResult]
    drift_share: float | None
    prediction_drift: ColumnDriftResult | None
    quality: dict[str, dict[str, float]]
    performance: dict[str, float] | None
    label_count: int
    notes: list[str] = field(default_factory=list)
    html_path: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    estimated_performance: dict[str, float | int | None] | None = None

    @property
    def drift_assessed(self) -> bool:
        """Whether drift was tested at all (a window below ``min_rows`` is not)."""
        return self.drift_share is not None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values (times as ISO 8601)."""
        data = dataclasses.asdict(self)
        data["start"] = self.start.isoformat()
        data["end"] = self.end.isoformat()
        return data


@dataclass(frozen=True)
class WindowReport(WindowMeasurement):
    """The numbers of one window, and which breach conditions they meet (``breaches``)."""

    breaches: list[str] = field(kw_only=True)

    @classmethod
    def judged(cls, measurement: WindowMeasurement, judgement: Judgement) -> WindowReport:
        """A measurement with the breaches its judgement decided."""
        values = {f.name: getattr(measurement, f.name)
                  for f in dataclasses.fields(WindowMeasurement)}
        return cls(**values, breaches=list(judgement.breaches))
