"""The request path of the model service without a server: the gate's direct lane for
``/predict`` (the handler that scores, refuses unknown entities, logs), the fallback to
BentoML's handler, and the runtime's compiled scorer against the Pipeline.

The runtime is real (a model fitted by the training code for the demo spec, the same feature
and on-demand code) with an in-memory online store and prediction-log backend.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from airmlops.features.online import OnlineResult
from airmlops.serving.prediction_log import PredictionLog
from airmlops.serving.service import (
    Coalescer,
    PredictHandler,
    RequestGate,
    ServingConfig,
    ServingRuntime,
    request_models,
)
from airmlops.spec import load_spec, resolve_estimator
from airmlops.training.model import build_pipeline, feature_frame, predict_scores

SPEC_PATH = Path(__file__).resolve().parents[2] / "include" / "pipelines" / "churn.yaml"
VERSION = "7"


class MemoryStore:
    """Online store answering from a dict; ``failure`` makes reads raise."""

    location = "memory"

    def __init__(self, rows: dict[str, dict[str, Any]]) -> None:
        self.rows = rows
        self.failure: Exception | None = None
        self.reads = 0

    def read(self, views, entity_ids, *, as_of=None) -> OnlineResult:
        self.reads += 1
        if self.failure is not None:
            raise self.failure
        names = [n for view in views for n in view.feature_names]
        values, missing = {}, []
        for entity in dict.fromkeys(entity_ids):
            row = self.rows.get(str(entity))
            values[entity] = dict(row) if row else dict.fromkeys(names)
            if row is None:
                missing.append(entity)
        return OnlineResult(values=values, missing=missing, event_ts={})

    def close(self) -> None:
        pass


class MemoryLog:
    location = "memory"

    def __init__(self) -> None:
        self.predictions: list = []

    def write(self, predictions, labels) -> None:
        self.predictions.extend(predictions)

    def close(self) -> None:
        pass


class Metrics:
    def __init__(self) -> None:
        self.recorded: list[tuple] = []
        self.predictions = self
        self.rows = 0

    def inc(self, amount: int) -> None:
        self.rows += amount

    def record(self, endpoint, status, seconds, kind) -> None:
        self.recorded.append((endpoint, status, kind))


@pytest.fixture(scope="module")
def world():
    spec = load_spec(SPEC_PATH)
    rng = np.random.default_rng(0)
    names = [n for view in spec.feature_store.views for n in view.feature_names]
    stored = {}
    for i in range(300):
        row = {}
        for name in names:
            if name == "profile__plan":
                row[name] = str(rng.choice(["basic", "standard", "premium"]))
            elif name == "profile__region":
                row[name] = str(rng.choice(["north", "south", "east", "west"]))
            else:
                row[name] = None if rng.random() < 0.05 else float(rng.integers(0, 300))
        stored[f"C{i:06d}"] = row
    store = MemoryStore(stored)
    from airmlops.features.pipeline import online_inputs

    requests = [{"customer_id": e, "tenure_days": float(rng.integers(0, 3000))} for e in stored]
    frame = online_inputs(spec, store, requests).frame
    model = build_pipeline(spec, resolve_estimator(spec))
    model.fit(frame, (rng.random(len(frame)) < 0.3).astype(int))
    config = ServingConfig(pipeline="churn", model_name="churn", model_version=VERSION,
                           model_uri="models:/churn/7", spec_hash="x", features_hash="y")
    return spec, store, model, config


def _runtime(world, **kwargs) -> tuple[ServingRuntime, MemoryLog]:
    spec, store, model, config = world
    backend = MemoryLog()
    runtime = ServingRuntime(config, spec, model, store, PredictionLog(backend), **kwargs)
    return runtime, backend


def _call(gate: RequestGate, path: str, body: bytes, *, method: str = "POST",
          content_type: bytes = b"application/json") -> tuple[int, dict, dict]:
    scope = {"type": "http", "path": path, "method": method,
             "headers": [(b"content-type", content_type),
                         (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(gate(scope, receive, send))
    start = sent[0]
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    content = b"".join(m.get("body", b"") for m in sent[1:])
    assert int(headers["content-length"]) == len(content)
    return start["status"], json.loads(content), headers


class Downstream:
    """Stands for BentoML's app: records what reached it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send):
        message = await receive()
        self.bodies.append(message["body"])
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})


def _gate(world, handler, downstream, metrics=None) -> RequestGate:
    spec = world[0]
    predict_model, feedback_model = request_models(spec, 50)
    return RequestGate(downstream, token="", max_body_bytes=20_000, model_version=VERSION,
                       validators={"/predict": predict_model, "/feedback": feedback_model},
                       metrics=lambda: metrics, predict=lambda: handler)


def _body(*entities: str, tenure: float = 100.0) -> bytes:
    return json.dumps({"instances": [{"customer_id": e, "tenure_days": tenure}
                                     for e in entities]}).encode()


def test_the_direct_lane_answers_scores_and_logs_without_bentoml(world):
    spec, store, model, _ = world
    runtime, backend = _runtime(world)
    assert runtime.fast is not None and runtime.fast.kind == "logistic"
    metrics = Metrics()
    downstream = Downstream()
    gate = _gate(world, PredictHandler(runtime, None, metrics), downstream, metrics)

    status, body, headers = _call(gate, "/predict", _body("C000001", "C000002"))
    assert status == 200 and downstream.bodies == []
    assert headers["x-model-version"] == VERSION
    assert headers["x-request-id"] == body["request_id"] and len(body["request_id"]) == 32
    assert body["model_name"] == "churn" and body["model_version"] == VERSION
    from airmlops.features.pipeline import online_inputs

    rows = [{"customer_id": e, "tenure_days": 100.0} for e in ("C000001", "C000002")]
    expected = predict_scores(spec, model, online_inputs(spec, store, rows).frame)
    answered = body["predictions"]
    assert [p["entity"] for p in answered] == ["C000001", "C000002"]
    assert [p["probability"] for p in answered] == pytest.approx(expected.tolist(), abs=1e-12)
    assert [p["prediction"] for p in answered] == [int(p >= 0.5) for p in expected]
    assert metrics.recorded == [("/predict", 200, None)] and metrics.rows == 2

    assert runtime.prediction_log.flush(5)
    logged = backend.predictions
    assert [(r.request_id, r.position, r.entity_id) for r in logged] == [
        (body["request_id"], 0, "C000001"), (body["request_id"], 1, "C000002")]
    assert logged[0].inputs == rows[0] and "fee_per_minute" in logged[0].features
    assert logged[0].model_version == VERSION
    runtime.close()


def test_refusals_and_failures_keep_their_status_and_kind(world):
    _, store, _, _ = world
    runtime, _ = _runtime(world)
    metrics = Metrics()
    gate = _gate(world, PredictHandler(runtime, None, metrics), Downstream(), metrics)

    status, body, _ = _call(gate, "/predict", _body("C000001", "NOPE"))
    assert status == 422 and body["error"] == "unknown_entity"
    assert body["unknown_entities"] == ["NOPE"] and "'NOPE'" in body["message"]
    status, body, _ = _call(gate, "/predict", json.dumps({"instances": []}).encode())
    assert status == 422 and body["error"] == "invalid_request"
    status, body, _ = _call(gate, "/predict", b"{", content_type=b"application/json")
    assert status == 400 and body["error"] == "invalid_json"

    store.failure = sqlite3.OperationalError("database is locked")
    try:
        status, body, headers = _call(gate, "/predict", _body("C000001"))
        assert status == 503 and body["error"] == "unavailable"
        assert headers["x-request-id"] == body["request_id"]
        store.failure = RuntimeError("a bug")
        status, body, headers = _call(gate, "/predict", _body("C000001"))
        assert status == 500 and body["error"] == "internal"
        assert headers["x-model-version"] == VERSION
    finally:
        store.failure = None
    assert [(s, k) for _, s, k in metrics.recorded] == [
        (422, "unknown_entity"), (422, "invalid_request"), (400, "invalid_json"),
        (503, "unavailable"), (500, "internal")]
    runtime.close()


def test_without_a_handler_valid_requests_reach_bentoml_with_the_same_bytes(world):
    downstream = Downstream()
    gate = _gate(world, None, downstream)
    body = _body("C000003")
    status, answer, headers = _call(gate, "/predict", body)
    assert status == 200 and answer == {} and downstream.bodies == [body]
    assert headers["x-model-version"] == VERSION
    feedback = json.dumps({"request_id": "a" * 32,
                           "labels": [{"entity": "C1", "label": 1}]}).encode()
    status, _, _ = _call(_gate(world, object(), downstream), "/feedback", feedback)
    assert status == 200 and downstream.bodies[-1] == feedback


def test_the_compiled_scorer_is_checked_and_can_be_turned_off(world):
    fast, _ = _runtime(world)
    slow, _ = _runtime(world, fast_path=False)
    assert slow.fast is None
    rows = [{"customer_id": f"C{i:06d}", "tenure_days": float(i)} for i in range(200)]
    a, b = fast.score(rows), slow.score(rows)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-12)
    assert a.features == b.features and a.unknown == b.unknown == set()
    fast.close()
    slow.close()


def test_concurrent_requests_are_coalesced_and_a_lone_one_is_scored_at_once(world):
    runtime, _ = _runtime(world)
    sizes: list[int] = []
    coalescer = Coalescer(runtime.score, 2000, sizes.append)
    handler = PredictHandler(runtime, coalescer)

    async def scenario():
        lone = await handler([{"customer_id": "C000004", "tenure_days": 5.0}])
        together = await asyncio.gather(*(
            handler([{"customer_id": f"C{i:06d}", "tenure_days": 5.0}]) for i in range(40)))
        return lone, together

    lone, together = asyncio.run(scenario())
    assert lone[0] == 200 and sizes[0] == 1
    assert all(status == 200 for status, _, _ in together)
    assert len(sizes) < 41 and sum(sizes) == 41 and max(sizes) > 1
    entities = [body["predictions"][0]["entity"] for _, body, _ in together]
    assert entities == [f"C{i:06d}" for i in range(40)]
    single = runtime.score([{"customer_id": "C000017", "tenure_days": 5.0}]).scores[0]
    assert together[17][1]["predictions"][0]["probability"] == pytest.approx(single, abs=1e-12)
    runtime.close()


def test_the_frame_path_equals_the_training_code(world):
    spec, store, model, _ = world
    runtime, _ = _runtime(world, fast_path=False)
    rows = [{"customer_id": f"C{i:06d}", "tenure_days": 10.0 * i} for i in range(50)]
    from airmlops.features.pipeline import online_rows

    found = online_rows(spec, store, rows)
    expected = predict_scores(spec, model, pd.DataFrame.from_records(found.rows))
    np.testing.assert_allclose(runtime.score(rows).scores, expected, rtol=0, atol=0)
    assert list(feature_frame(spec, pd.DataFrame.from_records(found.rows)).columns) == \
        spec.input_names
    runtime.close()
