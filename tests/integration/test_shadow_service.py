"""Shadow traffic at the real model service (tests/model_service_fixtures.py): a /predict
marked ``X-Airmlops-Shadow-Of: <live request id>`` is answered under that id and written to the
shadow log only, on the request gate's direct lane and on BentoML's own; a label for a request
id that only the shadow log holds is refused like an unknown request. (The refusals of bad
marks are in tests/security/test_shadow_admin.py.)"""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
from model_service_fixtures import WINDOW, Model, Server, metric

from airmlops.serving.prediction_log import read_predictions, read_shadow_pairs
from airmlops.serving.shadow_header import SHADOW_HEADER

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["direct", "bentoml-lane"])
def server(request: pytest.FixtureRequest, serve) -> Server:
    if request.param == "direct":
        return serve("shadow")
    return serve("shadow-bentoml-lane", MLOPS_SERVING_DIRECT="false")


def _body(model: Model, *entities: int) -> dict[str, Any]:
    return {"instances": [{"customer_id": model.known[e], "tenure_days": 90.0}
                          for e in entities]}


def _wait_for(server: Server, name: str, count: float, timeout: float = 30.0) -> str:
    """The metrics text once counter ``name`` has reached ``count``."""
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        if metric(text, name) >= count:
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} did not reach {count}:\n{server.log_text()[-3000:]}")
        time.sleep(0.2)


def test_a_shadow_request_is_answered_and_logged_to_the_shadow_log_only(model, server):
    before = httpx.get(f"{server.url}/metrics").text
    live = httpx.post(f"{server.url}/predict", json=_body(model, 30, 31))
    assert live.status_code == 200, live.text
    live_id = live.json()["request_id"]
    copy = httpx.post(f"{server.url}/predict", json=_body(model, 30, 31),
                      headers={SHADOW_HEADER: live_id})
    assert copy.status_code == 200, copy.text
    assert copy.json()["request_id"] == live_id and copy.headers["x-request-id"] == live_id
    assert copy.json()["predictions"] == live.json()["predictions"]  # the same model here
    orphan = uuid.uuid4().hex  # a live id this service never issued (another slot's)
    alone = httpx.post(f"{server.url}/predict", json=_body(model, 32),
                       headers={SHADOW_HEADER: orphan})
    assert alone.status_code == 200, alone.text

    text = _wait_for(server, "airmlops_shadow_log_logged_total",
                     metric(before, "airmlops_shadow_log_logged_total") + 3)
    _wait_for(server, "airmlops_prediction_log_logged_total",
              metric(before, "airmlops_prediction_log_logged_total") + 2)
    assert metric(text, "airmlops_shadow_requests_total") == metric(
        before, "airmlops_shadow_requests_total") + 2
    assert metric(text, "airmlops_prediction_log_logged_total") == metric(
        before, "airmlops_prediction_log_logged_total") + 2  # the live request only

    logged = read_predictions("churn", *WINDOW, settings=model.settings)
    assert len(logged[logged["request_id"] == live_id]) == 2
    assert orphan not in set(logged["request_id"])
    pairs = read_shadow_pairs("churn", *WINDOW, settings=model.settings)
    mine = pairs[pairs["request_id"] == live_id]
    assert mine["position"].tolist() == [0, 1]
    assert mine["entity_id"].tolist() == [model.known[30], model.known[31]]
    assert set(mine["shadow_version"]) == {model.version}
    assert mine["shadow_probability"].tolist() == pytest.approx(
        mine["live_probability"].tolist())
    assert orphan not in set(pairs["request_id"])  # no live row to pair with


def test_feedback_for_a_request_only_the_shadow_log_holds_is_an_unknown_request(model, server):
    before = httpx.get(f"{server.url}/metrics").text
    shadow_only = uuid.uuid4().hex
    copy = httpx.post(f"{server.url}/predict", json=_body(model, 35),
                      headers={SHADOW_HEADER: shadow_only})
    assert copy.status_code == 200, copy.text
    _wait_for(server, "airmlops_shadow_log_logged_total",
              metric(before, "airmlops_shadow_log_logged_total") + 1)
    label = httpx.post(f"{server.url}/feedback", json={
        "request_id": shadow_only, "labels": [{"entity": model.known[35], "label": 1}]})
    assert label.status_code == 404, label.text
    assert label.json()["error"] == "unknown_request"
