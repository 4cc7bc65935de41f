"""A request may mark itself synthetic (``X-Airmlops-Synthetic: <kind>``, kept out of the
prediction log); a mark naming no known kind is refused 400 ``invalid_header``, naming the
header, by the request gate and on BentoML's own lane alike (:mod:`airmlops.serving.synthetic`).
"""

from __future__ import annotations

import httpx
import pytest

from airmlops.serving.gate import synthetic_kind
from airmlops.serving.synthetic import SYNTHETIC_HEADER, SYNTHETIC_KINDS


@pytest.mark.parametrize("mark", ["load-test", "", "SMOKE", "smoke,probe", "x" * 200])
def test_a_mark_naming_no_kind_is_refused(mark: str) -> None:
    scope = {"headers": [(SYNTHETIC_HEADER.lower().encode(), mark.encode("latin-1"))]}
    kind, refusal = synthetic_kind(scope)
    assert kind is None and refusal is not None
    status, error, message, _ = refusal
    assert (status, error) == (400, "invalid_header") and SYNTHETIC_HEADER in message
    assert len(message) < 200  # the mark is quoted cut short


def test_every_known_kind_and_no_mark_are_accepted() -> None:
    for kind in SYNTHETIC_KINDS:
        assert synthetic_kind({"headers": [(b"x-airmlops-synthetic", kind.encode())]}) == (
            kind, None)
    assert synthetic_kind({"headers": []}) == (None, None)


@pytest.mark.integration
@pytest.mark.parametrize("lane", ["gate", "bentoml"])
def test_the_service_refuses_an_unknown_synthetic_kind(model, serve, lane: str) -> None:
    """The direct lane (the request gate) and BentoML's API method both refuse it."""
    server = (serve("marks-gate") if lane == "gate"
              else serve("marks-bentoml-lane", MLOPS_SERVING_DIRECT="false"))
    instance = {"customer_id": model.known[20], "tenure_days": 120.0}
    refused = httpx.post(f"{server.url}/predict", headers={SYNTHETIC_HEADER: "load-test"},
                         json={"instances": [instance]})
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_header"
    assert SYNTHETIC_HEADER in refused.json()["message"]
