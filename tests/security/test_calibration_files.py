"""A model's ``calibration.json`` (the stored isotonic calibration the performance estimate
reads back from MLflow) is data from the artifact store, and so untrusted: every field is
checked, and a bad one is refused with its name (:meth:`Calibration.from_dict`)."""

from __future__ import annotations

import pytest

from airmlops.monitoring.estimation import Calibration, EstimationError


@pytest.mark.parametrize(("change", "field"), [
    ({"x_thresholds": [0.5, 0.2], "y_thresholds": [0.1, 0.2]}, "x_thresholds"),
    ({"y_thresholds": [0.9, 0.1]}, "y_thresholds"),
    ({"y_thresholds": [0.1, "a"]}, "y_thresholds"),
    ({"x_thresholds": [0.1]}, "x_thresholds/y_thresholds"),
    ({"kind": "pickle"}, "kind"),
    ({"rows": "many"}, "rows"),
])
def test_bad_stored_calibration_is_refused(change, field):
    data = {**Calibration(x=(0.1, 0.8), y=(0.05, 0.9), rows=10, positives=3).to_dict(), **change}
    with pytest.raises(EstimationError, match=f"calibration.{field}"):
        Calibration.from_dict(data)
