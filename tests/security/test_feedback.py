"""/feedback abuse against a real model service, with the prediction log on SQLite and on Redis.

Labels are checked by the spec's task (the demo spec is a binary classifier), must belong to a
request the service issued and to one of that request's entities, and are given once per
(request id, entity) unless the client asks to overwrite. Each refusal is asserted with its
status and a message naming the field, and with what it must not have done: no label in the
prediction log, or the first label unchanged.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from airmlops.serving.prediction_log import (
    LabelRecord,
    PredictionLogSettings,
    PredictionRecord,
    RedisLogBackend,
    issued_key,
    read_labels,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))
from model_service_fixtures import WINDOW
from redis_fixture import redis_server  # noqa: F401  (a session fixture)

pytestmark = pytest.mark.integration


class LogTarget:
    """A model service and how to read the labels its prediction log holds."""

    def __init__(self, server: Any, trained: Any, log_settings: PredictionLogSettings | None):
        self.url = server.url
        self.model = trained
        self.log_settings = log_settings

    def labels(self, request_id: str) -> list[tuple[str, float]]:
        frame = read_labels("churn", *WINDOW, settings=self.model.settings,
                            log_settings=self.log_settings)
        mine = frame[frame["request_id"] == request_id]
        return sorted(zip(mine["entity_id"], mine["label"], strict=True))

    def predict(self, *entities: str) -> str:
        response = httpx.post(f"{self.url}/predict", timeout=10, json={"instances": [
            {"customer_id": e, "tenure_days": 30.0} for e in entities]})
        assert response.status_code == 200, response.text
        return response.json()["request_id"]

    def feedback(self, body: dict[str, Any] | bytes) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{self.url}/feedback", content=content, timeout=10,
                          headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def log_target(request, serve, model) -> LogTarget:
    if request.param == "sqlite":
        return LogTarget(serve("feedback-sqlite"), model, None)
    url = request.getfixturevalue("redis_server")
    server = serve("feedback-redis", MLOPS_PREDICTION_LOG_REDIS_URL=url)
    return LogTarget(server, model, PredictionLogSettings(redis_url=url))


def _label(entity: str, label: Any) -> dict[str, Any]:
    return {"entity": entity, "label": label}


BAD_LABELS = {
    # case: (raw JSON label, words the message must contain)
    "400-digit integer": ("1" * 400, "labels[0].label: must be 0, 1, true or false"),
    "2 for a binary task": ("2", "labels[0].label: must be 0, 1, true or false"),
    "0.5 for a binary task": ("0.5", "labels[0].label: must be 0, 1, true or false"),
    "-1 for a binary task": ("-1", "labels[0].label: must be 0, 1, true or false"),
    "a string": ('"1"', "labels[0].label: must be 0, 1, true or false"),
    "1e400 (infinite)": ("1e400", "labels[0].label: must be 0, 1, true or false"),
    "null": ("null", "labels[0].label: must be 0, 1, true or false"),
}


@pytest.mark.parametrize("case", list(BAD_LABELS), ids=list(BAD_LABELS))
def test_a_label_outside_the_task_gets_422_and_is_not_logged(log_target: LogTarget,
                                                            case: str) -> None:
    entity = log_target.model.known[20]
    request_id = log_target.predict(entity)
    raw, words = BAD_LABELS[case]
    body = (f'{{"request_id": "{request_id}", "labels": [{{"entity": "{entity}", '
            f'"label": {raw}}}]}}').encode()
    response = log_target.feedback(body)
    assert response.status_code == 422, response.text
    assert words in response.json()["message"]
    assert log_target.labels(request_id) == []


def test_regression_labels_must_be_finite_numbers_within_float_range() -> None:
    """The regression label type, on the request model a regression spec gets."""
    from pydantic import ValidationError

    from airmlops.serving.service import LabelItem, describe_errors

    assert LabelItem.model_validate_json('{"entity": "a", "label": 12.5}').label == 12.5
    for raw in ("1" * 400, "1e400", '"3"', "true", "NaN"):
        with pytest.raises(ValidationError) as refused:
            LabelItem.model_validate_json(f'{{"entity": "a", "label": {raw}}}')
        assert describe_errors(refused.value).startswith("label: ")


def test_a_never_issued_request_id_gets_404_and_is_not_logged(log_target: LogTarget) -> None:
    forged = "0123456789abcdef" * 2
    response = log_target.feedback({"request_id": forged,
                                    "labels": [_label(log_target.model.known[0], 1)]})
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "unknown_request"
    assert f"request_id: {forged} was not issued" in response.json()["message"]
    assert log_target.labels(forged) == []


def test_a_label_for_an_entity_outside_the_request_gets_422_and_nothing_is_logged(
        log_target: LogTarget) -> None:
    ours, other = log_target.model.known[21], log_target.model.known[22]
    request_id = log_target.predict(ours)
    response = log_target.feedback({"request_id": request_id,
                                    "labels": [_label(ours, 1), _label(other, 0)]})
    assert response.status_code == 422, response.text
    assert response.json()["unknown_entities"] == [other]
    assert f"labels[1].entity: {other!r} was not predicted" in response.json()["message"]
    assert log_target.labels(request_id) == []  # all or nothing: not even the valid label


def test_a_label_right_after_its_prediction_is_accepted(log_target: LogTarget) -> None:
    entities = log_target.model.known[23:25]
    request_id = log_target.predict(*entities)  # still in the log's buffer
    response = log_target.feedback({"request_id": request_id,
                                    "labels": [_label(entities[0], True),
                                               _label(entities[1], 0)]})
    assert response.status_code == 202, response.text
    assert response.json() == {"request_id": request_id, "accepted": 2}
    assert log_target.labels(request_id) == sorted([(entities[0], 1.0), (entities[1], 0.0)])


def test_a_second_label_gets_409_and_leaves_the_first_unchanged(log_target: LogTarget) -> None:
    entity = log_target.model.known[25]
    request_id = log_target.predict(entity)
    first = log_target.feedback({"request_id": request_id, "labels": [_label(entity, 1)]})
    assert first.status_code == 202, first.text
    second = log_target.feedback({"request_id": request_id, "labels": [_label(entity, 0)]})
    assert second.status_code == 409, second.text
    assert second.json()["error"] == "label_exists"
    assert second.json()["conflicts"] == [entity]
    assert f"labels[0].entity: {entity!r} already has a label" in second.json()["message"]
    assert '"overwrite": true' in second.json()["message"]
    assert log_target.labels(request_id) == [(entity, 1.0)]


def test_overwrite_true_replaces_the_label(log_target: LogTarget) -> None:
    entity = log_target.model.known[26]
    request_id = log_target.predict(entity)
    assert log_target.feedback({"request_id": request_id,
                                "labels": [_label(entity, 1)]}).status_code == 202
    replaced = log_target.feedback({"request_id": request_id, "labels": [_label(entity, 0)],
                                    "overwrite": True})
    assert replaced.status_code == 202, replaced.text
    assert log_target.labels(request_id) == [(entity, 0.0)]


def test_the_same_entity_twice_in_one_body_gets_422(log_target: LogTarget) -> None:
    entity = log_target.model.known[27]
    request_id = log_target.predict(entity)
    response = log_target.feedback({"request_id": request_id,
                                    "labels": [_label(entity, 1), _label(entity, 0)]})
    assert response.status_code == 422, response.text
    assert f"labels[1].entity: {entity!r} is labelled more than once" in \
        response.json()["message"]
    assert log_target.labels(request_id) == []


def test_overwrite_must_be_a_boolean(log_target: LogTarget) -> None:
    entity = log_target.model.known[28]
    request_id = log_target.predict(entity)
    response = log_target.feedback({"request_id": request_id, "labels": [_label(entity, 1)],
                                    "overwrite": "yes"})
    assert response.status_code == 422, response.text
    assert "overwrite: Input should be a valid boolean" in response.json()["message"]
    assert log_target.labels(request_id) == []


def test_records_of_issued_requests_are_bounded_like_the_streams(redis_server: str) -> None:  # noqa: F811
    """Any client that may call /predict makes a record; beyond ``maxlen`` requests the oldest
    records (and their labels' hash) are dropped, so Redis memory stays bounded."""
    import redis

    backend = RedisLogBackend(redis_server, "bounded_issued", maxlen=3)
    request_ids = [f"{n:032x}" for n in range(1, 6)]
    for n, request_id in enumerate(request_ids):
        backend.write([PredictionRecord(request_id, 0, 1_700_000_000_000_000 + n, "1", "C1",
                                        {}, {}, 0.0, 0.5)], [])
    label = [LabelRecord(request_ids[0], "C1", 1.0, 1_700_000_001_000_000)]
    assert backend.claim_labels(request_ids[0], label).issued is False  # dropped, oldest
    assert backend.claim_labels(request_ids[1], label).issued is False
    newest = [LabelRecord(request_ids[4], "C1", 1.0, 1_700_000_001_000_000)]
    assert backend.claim_labels(request_ids[4], newest).issued is True
    client = redis.Redis.from_url(redis_server)
    assert client.zcard(issued_key("bounded_issued")) == 3
    kept = {key.decode() for key in client.scan_iter("bounded_issued:request:*")}
    assert kept == {f"bounded_issued:request:{r}" for r in request_ids[2:]}
