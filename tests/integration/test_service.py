"""The model service for real: a model trained for the demo spec and registered in MLflow, its
bento built from the registered version and served by `bentoml serve` on loopback ports.

One model and one bento serve every test (module fixtures); each server configuration is its
own process: the default (SQLite online store and log, small request limits), one with a bearer
token, one with the prediction log on a private Redis that the test stops and restarts, and one
with the online store and the log on the session's Redis.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from airmlops.model_files import ModelDigests, check_model_dir
from airmlops.serving.bento import (
    BentoBuildError,
    build_bento,
    record_on_version,
    serve_command,
)
from airmlops.serving.prediction_log import (
    PredictionLogSettings,
    read_labels,
    read_predictions,
)
from airmlops.serving.service import ModelLoadError, ServingConfig, load_model
from airmlops.spec import load_spec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_service_fixtures import AS_OF, WINDOW, Server, metric
from redis_fixture import PrivateRedis, redis_server  # noqa: F401  (a session fixture)

pytestmark = pytest.mark.integration

MAX_INSTANCES = 50
MAX_BODY_BYTES = 20_000
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(scope="module")
def server(serve) -> Server:
    """The default configuration: no token, small limits so that they can be hit."""
    return serve("default", MLOPS_SERVING_MAX_INSTANCES=str(MAX_INSTANCES),
                 MLOPS_SERVING_MAX_BODY_BYTES=str(MAX_BODY_BYTES))


def _instance(entity: Any, tenure: float = 120.0) -> dict[str, Any]:
    return {"customer_id": entity, "tenure_days": tenure}


def _wait_logged(server: Server, count: int, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = httpx.get(f"{server.url}/metrics", timeout=5).text
        if (metric(text, "airmlops_prediction_log_logged_total") >= count
                and metric(text, "airmlops_prediction_log_buffered") == 0):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"prediction log did not reach {count} rows:\n"
                                 + "\n".join(line for line in text.splitlines()
                                             if line.startswith("airmlops_prediction_log")))
        time.sleep(0.2)


# --- the bento ------------------------------------------------------------------------------


def test_bento_is_built_from_the_registered_version_reproducibly(model, bento, tmp_path):
    from mlflow import MlflowClient

    from airmlops.serving.container import read_bento

    ref, home = bento
    assert re.fullmatch(rf"churn:v{model.version}-[0-9a-f]{{12}}", ref.tag)
    src = ref.path / "src"
    config = json.loads((src / "serving.json").read_text())
    assert config["model_version"] == model.version and config["model_name"] == "churn"
    assert config["spec_hash"] == model.spec.spec_hash()
    assert (src / "spec.yaml").read_bytes() == model.spec_path.read_bytes()
    assert (src / "airmlops" / "features" / "pipeline.py").is_file()
    assert not list(src.rglob("__pycache__"))
    # The digests recorded on the version travel in serving.json; the model matches them.
    version_tags = MlflowClient(model.tracking_uri).get_model_version("churn", model.version).tags
    assert config["model_sha256"] == version_tags["model_sha256"]
    assert config["mlmodel_sha256"] == version_tags["mlmodel_sha256"]
    check_model_dir(src / "model", ModelDigests.from_tags(config, "serving.json"))

    started = time.monotonic()
    again = build_bento(model.spec, model.version, model.tracking_uri, home,
                        spec_path=model.spec_path)
    assert again == ref and time.monotonic() - started < 30

    with tarfile.open(ref.export_path) as archive:
        archive.extractall(tmp_path / "bento", filter="data")
    info = read_bento(tmp_path / "bento")
    assert info.tag == ref.tag and info.python_version == "3.11"
    pins = {line.split("==")[0].lower(): line for line in info.requirements}
    assert {"bentoml", "scikit-learn", "skops", "pandas", "redis"} <= set(pins)
    assert all("==" in line for line in info.requirements)
    assert not any(name.startswith("airmlops") or name == "mlflow" for name in pins)

    record_on_version("churn", model.version, model.tracking_uri, bento_tag=ref.tag,
                      image_id=None)
    tags = MlflowClient(tracking_uri=model.tracking_uri).get_model_version(
        "churn", model.version).tags
    assert tags["bento_tag"] == ref.tag and "image_id" not in tags
    with pytest.raises(ValueError, match="invalid tag name"):
        record_on_version("churn", model.version, model.tracking_uri, **{"bad key": "x"})


def test_a_version_trained_on_other_feature_definitions_is_refused(model, bento, tmp_path):
    data = yaml.safe_load(model.spec_path.read_text())
    data["feature_store"]["on_demand"] = data["feature_store"]["on_demand"][:1]
    other_path = tmp_path / "churn.yaml"
    other_path.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(BentoBuildError, match="trained with feature definitions"):
        build_bento(load_spec(other_path), model.version, model.tracking_uri, bento[1],
                    spec_path=other_path)


def test_only_skops_models_with_library_types_are_loaded(bento, tmp_path):
    """The bento's own model loads; a tampered MLmodel is refused (tests/security has the
    whole attack suite)."""
    src = bento[0].path / "src"
    config = ServingConfig.read(src / "serving.json")
    assert hasattr(load_model(src, config), "predict_proba")
    for change in ({"serialization_format": "cloudpickle"},
                   {"skops_trusted_types": ["builtins.eval"]},
                   {"pickled_model": "../../../etc/passwd"}):
        tampered = tmp_path / f"bento-{len(list(tmp_path.iterdir()))}"
        shutil.copytree(src / "model", tampered / "model")
        mlmodel = yaml.safe_load((tampered / "model" / "MLmodel").read_text())
        mlmodel["flavors"]["sklearn"].update(change)
        (tampered / "model" / "MLmodel").write_text(yaml.safe_dump(mlmodel))
        with pytest.raises(ModelLoadError, match="does not match the mlmodel_sha256 recorded"):
            load_model(tampered, config)


def test_serve_command_validates_its_arguments(bento):
    ref = bento[0]
    command = serve_command(ref.tag, 3000)
    assert command[1:4] == ["-m", "bentoml", "serve"] and command[-4:] == [
        "--host", "127.0.0.1", "--port", "3000"]
    assert serve_command(ref.path, 3001)[4] == str(ref.path.resolve())
    for bad in ("churn", "churn:latest;rm -rf /", "/nonexistent/bento"):
        with pytest.raises(ValueError):
            serve_command(bad, 3000)
    with pytest.raises(ValueError):
        serve_command(ref.tag, 70000)


# --- predictions ----------------------------------------------------------------------------


def test_single_and_batch_predictions_match_the_training_code(model, bento, server):
    from airmlops.features.online import SqliteOnlineStore
    from airmlops.features.pipeline import online_inputs
    from airmlops.training.model import predict_scores

    entities = model.known[:3]
    single = httpx.post(f"{server.url}/predict",
                        json={"instances": [_instance(entities[0])]}, timeout=10)
    assert single.status_code == 200, single.text
    body = single.json()
    assert body["model_name"] == "churn" and body["model_version"] == model.version
    assert REQUEST_ID.fullmatch(body["request_id"])
    assert single.headers["X-Model-Version"] == model.version
    assert single.headers["X-Request-ID"] == body["request_id"]
    [only] = body["predictions"]
    assert only["entity"] == entities[0] and 0.0 <= only["probability"] <= 1.0
    assert only["prediction"] == int(only["probability"] >= 0.5)

    rows = [_instance(entities[0], 10), _instance(entities[1], 400), _instance(entities[2], 3000)]
    batch = httpx.post(f"{server.url}/predict", json={"instances": rows}, timeout=10)
    assert batch.status_code == 200, batch.text
    answered = batch.json()["predictions"]
    assert [p["entity"] for p in answered] == entities
    assert batch.json()["request_id"] != body["request_id"]

    # The same rows through the training code path give the same probabilities.
    fitted = load_model(bento[0].path / "src",
                        ServingConfig.read(bento[0].path / "src" / "serving.json"))
    with SqliteOnlineStore(model.data_root / "online" / "store.sqlite", "churn") as store:
        expected = predict_scores(model.spec, fitted, online_inputs(model.spec, store, rows).frame)
    assert [p["probability"] for p in answered] == pytest.approx(expected.tolist(), abs=1e-12)


BAD_REQUESTS = [
    # (case, content type, body, status, kind, words the message must contain)
    ("missing entity key", "application/json", {"instances": [{"tenure_days": 5}]}, 422,
     "invalid_request", "instances[0].customer_id: is required"),
    ("missing request field", "application/json", {"instances": [{"customer_id": "C000001"}]},
     422, "invalid_request", "instances[0].tenure_days: is required"),
    ("number as text", "application/json", {"instances": [_instance("C000001", "12")]}, 422,
     "invalid_request", "instances[0].tenure_days: Input should be a valid number"),
    ("boolean as number", "application/json", {"instances": [_instance("C000001", True)]}, 422,
     "invalid_request", "tenure_days: Input should be a valid number"),
    ("entity of wrong type", "application/json", {"instances": [_instance(["C1"])]}, 422,
     "invalid_request", "customer_id: must be a string or an integer"),
    ("null entity", "application/json", {"instances": [_instance(None)]}, 422,
     "invalid_request", "customer_id: must be a string or an integer"),
    ("entity id too long", "application/json", {"instances": [_instance("C" * 300)]}, 422,
     "invalid_request", "customer_id: must be 1 to 256 characters"),
    ("unknown field", "application/json",
     {"instances": [{**_instance("C000001"), "plan": "gold"}]}, 422, "invalid_request",
     "instances[0].plan: is not a known field"),
    ("unknown top-level field", "application/json",
     {"instances": [_instance("C000001")], "debug": True}, 422, "invalid_request",
     "debug: is not a known field"),
    ("out of the spec's range", "application/json", {"instances": [_instance("C000001", -3)]},
     422, "invalid_request", "tenure_days: Input should be greater than or equal to 0"),
    ("empty instances", "application/json", {"instances": []}, 422, "invalid_request",
     "instances: the list should have at least 1 item"),
    ("too many instances", "application/json",
     {"instances": [_instance("C000001")] * (MAX_INSTANCES + 1)}, 422, "invalid_request",
     f"instances: the list should have at most {MAX_INSTANCES} items"),
    ("instances not a list", "application/json", {"instances": {"customer_id": "C1"}}, 422,
     "invalid_request", "instances: Input should be a valid array"),
    ("no instances", "application/json", {"rows": []}, 422, "invalid_request",
     "instances: is required"),
    ("body is a JSON array", "application/json", [_instance("C000001")], 422,
     "invalid_request", "body: must be a JSON object"),
    ("malformed JSON", "application/json", b'{"instances": [', 400, "invalid_json",
     "the body is not valid JSON"),
    ("NaN", "application/json", b'{"instances": [{"customer_id": "C000001", '
     b'"tenure_days": NaN}]}', 422, "invalid_request", "tenure_days: Input should be a finite"),
    ("empty body", "application/json", b"", 400, "invalid_json", "the body is empty"),
    ("pickle (x-pickle)", "application/x-pickle", b"\x80\x04K\x01.", 415,
     "unsupported_media_type", "pickled payloads are never deserialized"),
    ("pickle (python-pickle)", "application/python-pickle", b"\x80\x04K\x01.", 415,
     "unsupported_media_type", "pickled payloads are never deserialized"),
    ("pickle (BentoML's)", "application/vnd.bentoml+pickle", b"\x80\x04K\x01.", 415,
     "unsupported_media_type", "pickled payloads are never deserialized"),
    ("form instead of JSON", "application/x-www-form-urlencoded", b"customer_id=C1", 415,
     "unsupported_media_type", "send application/json"),
    ("no content type", None, b'{"instances": []}', 415, "unsupported_media_type",
     "content type 'none' is not supported"),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_a_4xx_naming_the_problem(server, case):
    _, media_type, body, status, kind, words = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": media_type} if media_type else {}
    response = httpx.post(f"{server.url}/predict", content=content, headers=headers, timeout=10)
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["error"] == kind
    assert words in answer["message"]
    assert response.headers["X-Model-Version"]


def test_unknown_entities_and_size_limits_and_methods(model, server):
    url = f"{server.url}/predict"
    unknown = httpx.post(url, json={"instances": [_instance("NOPE-1")]}, timeout=10)
    assert unknown.status_code == 422
    assert unknown.json()["error"] == "unknown_entity"
    assert "'NOPE-1'" in unknown.json()["message"]

    mixed = [_instance(model.known[0]), _instance("NOPE-2"), _instance(12345)]
    answer = httpx.post(url, json={"instances": mixed}, timeout=10)
    assert answer.status_code == 422
    assert answer.json()["unknown_entities"] == ["NOPE-2", 12345]
    assert model.known[0] not in answer.json()["message"]

    big = json.dumps({"instances": [_instance("C000001")], "pad": "x" * MAX_BODY_BYTES})
    declared = httpx.post(url, content=big, headers={"Content-Type": "application/json"})
    assert declared.status_code == 413 and declared.json()["error"] == "body_too_large"
    assert f"limit of {MAX_BODY_BYTES} bytes" in declared.json()["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        yield b'{"instances": ['
        for _ in range(1000):
            yield json.dumps(_instance("C000001")).encode() + b","
        yield b"]}"

    streamed = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "exceeds the limit" in streamed.json()["message"]

    get = httpx.get(url)
    assert get.status_code == 405 and get.json()["message"] == "/predict accepts POST only"

    feedback = f"{server.url}/feedback"
    for body, words in (
        ({"request_id": "nope", "labels": [{"entity": "C1", "label": 1}]}, "request_id"),
        ({"request_id": "a" * 32, "labels": [{"entity": "C1", "label": "yes"}]},
         "labels[0].label: must be 0, 1, true or false"),
        ({"request_id": "a" * 32, "labels": []}, "labels: the list should have at least 1"),
        ({"request_id": "a" * 32}, "labels: is required"),
    ):
        response = httpx.post(feedback, json=body, timeout=10)
        assert response.status_code == 422, response.text
        assert words in response.json()["message"]


def test_bentoml_validation_tracebacks_are_demoted_to_one_info_line():
    import logging

    from pydantic import BaseModel, ValidationError

    from airmlops.serving.service import ClientErrorFilter

    class Body(BaseModel):
        x: int

    try:
        Body.model_validate({"x": "nope"})
    except ValidationError:
        client_mistake = sys.exc_info()
    record = logging.LogRecord("bentoml._internal.server.http_app", logging.ERROR, __file__, 1,
                               "Exception on %s [%s]", ("/predict", "POST"), client_mistake)
    assert ClientErrorFilter().filter(record)
    assert record.levelno == logging.INFO and record.exc_info is None
    assert record.getMessage().startswith("Exception on /predict [POST]: client error")
    try:
        raise RuntimeError("a real bug")
    except RuntimeError:
        server_error = sys.exc_info()
    record = logging.LogRecord("bentoml._internal.server.http_app", logging.ERROR, __file__, 1,
                               "Exception on %s [%s]", ("/predict", "POST"), server_error)
    assert ClientErrorFilter().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is server_error


def test_client_mistakes_are_not_logged_as_errors(server):
    # Runs after the bad-input tests: the log holds their requests.
    for content_type in ("application/json", "application/octet-stream", "text/plain"):
        httpx.post(f"{server.url}/predict", content=b"\x00\xff garbage",
                   headers={"Content-Type": content_type}, timeout=10)
    text = server.log_text()
    # 413s are refused by the HTTP protocol itself, before BentoML logs a request.
    assert "status=422" in text and "status=415" in text
    assert "[ERROR]" not in text and "Traceback" not in text, text[-3000:]


def test_metrics_count_requests_latency_errors_and_model(model, server):
    httpx.post(f"{server.url}/predict", json={"instances": [_instance(model.known[5])]})
    httpx.post(f"{server.url}/predict", json={"instances": []})
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert metric(text, "airmlops_requests_total", endpoint="/predict", status="200") >= 1
    assert metric(text, "airmlops_requests_total", endpoint="/predict", status="422") >= 1
    assert metric(text, "airmlops_request_duration_seconds_count", endpoint="/predict") >= 2
    assert metric(text, "airmlops_request_errors_total", endpoint="/predict",
                   kind="invalid_request") >= 1
    assert metric(text, "airmlops_model_info", model_name="churn",
                   model_version=model.version) == 1
    assert metric(text, "airmlops_predictions_total") >= 1
    for name in ("airmlops_prediction_log_logged_total", "airmlops_prediction_log_buffered",
                 "airmlops_prediction_log_spilled", "airmlops_prediction_log_failed_writes_total",
                 "airmlops_prediction_log_dropped_total", "airmlops_prediction_log_backend_up"):
        assert f"\n{name}" in text, name
    assert "bentoml_service_request_total" in text  # BentoML's own metrics are still there
    for probe in ("/livez", "/readyz"):
        assert httpx.get(f"{server.url}{probe}").status_code == 200
    ready = httpx.get(f"{server.url}/readyz").json()
    assert ready["status"] == "ready" and ready["prediction_log"]["state"] == "ok"


def test_prediction_log_has_one_row_per_answered_request_under_load(model, server):
    def client(thread: int) -> list[str]:
        ids = []
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for i in range(50):
                entity = model.known[(thread * 50 + i) % len(model.known)]
                response = http.post("/predict", json={"instances": [_instance(entity, i)]})
                assert response.status_code == 200, response.text
                ids.append(response.json()["request_id"])
        return ids

    before = metric(httpx.get(f"{server.url}/metrics").text,
                     "airmlops_prediction_log_logged_total")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answered = [rid for ids in pool.map(client, range(8)) for rid in ids]
    assert len(answered) == len(set(answered)) == 400
    text = _wait_logged(server, before + 400)
    # Concurrent requests were coalesced: on average more than one request per model call.
    assert metric(text, "airmlops_coalesced_requests_sum") > metric(
        text, "airmlops_coalesced_requests_count")

    logged = read_predictions("churn", *WINDOW, settings=model.settings)
    mine = logged[logged["request_id"].isin(answered)]
    assert len(mine) == 400 and set(mine["request_id"]) == set(answered)
    assert set(mine["model_version"]) == {model.version}
    assert mine["features"].map(lambda f: "fee_per_minute" in f).all()
    assert not logged.duplicated(["request_id", "position"]).any()


def test_feedback_is_recorded_by_request_id(model, server):
    entities = model.known[10:12]
    answer = httpx.post(f"{server.url}/predict",
                        json={"instances": [_instance(e) for e in entities]}).json()
    request_id = answer["request_id"]
    labels = [{"entity": entities[0], "label": 1}, {"entity": entities[1], "label": False}]
    response = httpx.post(f"{server.url}/feedback",
                          json={"request_id": request_id, "labels": labels})
    assert response.status_code == 202, response.text
    assert response.json() == {"request_id": request_id, "accepted": 2}
    deadline = time.monotonic() + 20
    while True:
        frame = read_labels("churn", *WINDOW, settings=model.settings)
        mine = frame[frame["request_id"] == request_id]
        if len(mine) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(zip(mine["entity_id"], mine["label"], strict=True)) == sorted(
        [(entities[0], 1.0), (entities[1], 0.0)])
    predictions = read_predictions("churn", *WINDOW, settings=model.settings)
    assert set(predictions[predictions["request_id"] == request_id]["entity_id"]) == set(entities)


def _synthetic_kept_out(model, server) -> None:
    """Synthetic requests of every kind are answered but never logged, counted by kind, and a
    label for one finds no request (404). A mark that names no kind is refused 400:
    tests/security/test_request_marks.py."""
    from airmlops.serving.synthetic import SYNTHETIC_HEADER, SYNTHETIC_KINDS

    entity = model.known[20]
    before = httpx.get(f"{server.url}/metrics").text
    marked = {}
    for kind in SYNTHETIC_KINDS:
        answer = httpx.post(f"{server.url}/predict", headers={SYNTHETIC_HEADER: kind},
                            json={"instances": [_instance(entity)]})
        assert answer.status_code == 200, answer.text
        marked[kind] = answer.json()["request_id"]
    plain = httpx.post(f"{server.url}/predict", json={"instances": [_instance(entity)]})
    assert plain.status_code == 200, plain.text
    text = _wait_logged(server, metric(before, "airmlops_prediction_log_logged_total") + 1)
    for kind in SYNTHETIC_KINDS:
        assert metric(text, "airmlops_synthetic_requests_total", kind=kind) == metric(
            before, "airmlops_synthetic_requests_total", kind=kind) + 1
    logged = read_predictions("churn", *WINDOW, settings=model.settings)
    assert plain.json()["request_id"] in set(logged["request_id"])
    assert not set(marked.values()) & set(logged["request_id"])
    assert metric(text, "airmlops_prediction_log_logged_total") == metric(
        before, "airmlops_prediction_log_logged_total") + 1

    label = httpx.post(f"{server.url}/feedback", json={
        "request_id": marked["smoke"], "labels": [{"entity": entity, "label": 1}]})
    assert label.status_code == 404, label.text


def test_synthetic_requests_are_answered_but_never_logged(model, server):
    _synthetic_kept_out(model, server)


def test_synthetic_requests_are_kept_out_on_bentomls_own_lane(model, serve):
    """The same without the request gate's direct lane (BentoML's API method answers)."""
    _synthetic_kept_out(model, serve("bentoml-lane", MLOPS_SERVING_DIRECT="false"))


# --- authentication ---------------------------------------------------------------------------


def test_bearer_token_protects_everything_but_probes_and_metrics(model, serve):
    secured = serve("auth", MLOPS_SERVING_TOKEN="s3cret-token")
    body = {"instances": [_instance(model.known[0])]}
    url = f"{secured.url}/predict"
    missing = httpx.post(url, json=body)
    assert missing.status_code == 401 and missing.json()["error"] == "unauthorized"
    assert "missing bearer token" in missing.json()["message"]
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer wrong", "Basic czNjcmV0LXRva2Vu", "s3cret-token",
                   "Bearer s3cret-token-and-more"):
        refused = httpx.post(url, json=body, headers={"Authorization": header})
        assert refused.status_code == 401, header
        assert "invalid bearer token" in refused.json()["message"]
    # The token is checked first: an unauthenticated client learns nothing else.
    pickled = httpx.post(url, content=b"x", headers={"Content-Type": "application/x-pickle"})
    assert pickled.status_code == 401
    good = {"Authorization": "Bearer s3cret-token"}
    assert httpx.post(url, json=body, headers=good).status_code == 200
    assert httpx.post(f"{secured.url}/feedback", json={
        "request_id": "b" * 32, "labels": [{"entity": "C1", "label": 1}]}).status_code == 401
    assert httpx.get(f"{secured.url}/docs.json").status_code == 401
    for open_path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{secured.url}{open_path}").status_code == 200, open_path
    metrics = httpx.get(f"{secured.url}/metrics").text
    assert metric(metrics, "airmlops_request_errors_total", endpoint="/predict",
                   kind="unauthorized") >= 5
    assert "s3cret-token" not in secured.log_text()


# --- Redis -------------------------------------------------------------------------------------


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_redis_log_outage_fails_no_request_and_loses_nothing(model, serve, private_redis):
    server = serve("redis-log", MLOPS_PREDICTION_LOG_REDIS_URL=private_redis.url)
    log_settings = PredictionLogSettings(redis_url=private_redis.url)

    def predict(count: int) -> list[str]:
        ids = []
        with httpx.Client(base_url=server.url, timeout=10) as http:
            for i in range(count):
                response = http.post("/predict", json={
                    "instances": [_instance(model.known[i % len(model.known)])]})
                assert response.status_code == 200, response.text
                ids.append(response.json()["request_id"])
        return ids

    before = predict(20)
    _wait_logged(server, 20)
    stream = redis.Redis.from_url(private_redis.url)
    assert stream.xlen("churn:predictions") == 20
    stream.close()

    private_redis.stop()
    started = time.monotonic()
    during = predict(30)
    assert time.monotonic() - started < 15  # no request waited for the log backend
    deadline = time.monotonic() + 20
    while True:  # the entries leave memory for the worker's spill file
        text = httpx.get(f"{server.url}/metrics").text
        if metric(text, "airmlops_prediction_log_spilled") == 30 or \
                time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert metric(text, "airmlops_prediction_log_failed_writes_total") >= 1
    assert metric(text, "airmlops_prediction_log_spilled") == 30
    assert metric(text, "airmlops_prediction_log_buffered") == 0
    assert metric(text, "airmlops_prediction_log_backend_up") == 0
    assert metric(text, "airmlops_prediction_log_dropped_total") == 0
    assert metric(text, "airmlops_requests_total", endpoint="/predict", status="200") == 50
    spill_dir = model.data_root / "prediction-log" / "spill" / "churn"
    assert list(spill_dir.glob("*.jsonl"))  # the worker's spill file (one worker here)
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 200  # the log is not a dependency: the model still answers
    assert ready.json()["status"] == "degraded"
    assert ready.json()["prediction_log"]["state"] == "spilling"
    assert ready.json()["prediction_log"]["spilled"] == 30
    refused = httpx.post(f"{server.url}/feedback", timeout=15, json={
        "request_id": during[0], "labels": [{"entity": model.known[0], "label": 1}]})
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "5"
    assert refused.json()["error"] == "unavailable"
    assert "labels were not recorded" in refused.json()["message"]

    private_redis.start()
    text = _wait_logged(server, 50, timeout=30)
    assert metric(text, "airmlops_prediction_log_backend_up") == 1
    deadline = time.monotonic() + 10
    while metric(text, "airmlops_prediction_log_spilled") != 0:  # the replay's last step
        assert time.monotonic() < deadline, "the spill was not replayed"
        time.sleep(0.2)
        text = httpx.get(f"{server.url}/metrics").text
    assert httpx.get(f"{server.url}/readyz").json()["status"] == "ready"
    logged = read_predictions("churn", *WINDOW, settings=model.settings,
                              log_settings=log_settings)
    assert sorted(logged["request_id"]) == sorted(before + during)
    assert "[ERROR]" not in server.log_text()


def test_an_online_store_outage_answers_503_and_recovers(model, serve, private_redis):
    from airmlops import stages

    redis_settings = model.settings.model_copy(update={"redis_url": private_redis.url})
    run = stages.RunContext(dag_id="churn_training", run_id="service-test-outage", as_of=AS_OF,
                            git_commit="0" * 40, trigger_reason="integration test")
    stages.materialize_features(model.spec, run, redis_settings)
    server = serve("redis-outage", MLOPS_REDIS_URL=private_redis.url)
    body = {"instances": [_instance(model.known[0])]}
    assert "loaded in" in server.log_text()
    assert httpx.post(f"{server.url}/predict", json=body, timeout=10).status_code == 200

    private_redis.stop()
    down = httpx.post(f"{server.url}/predict", json=body, timeout=15)
    assert down.status_code == 503, down.text
    assert down.json()["error"] == "unavailable"
    assert "online feature store is unavailable" in down.json()["message"]
    assert httpx.get(f"{server.url}/readyz", timeout=15).status_code == 503
    assert httpx.get(f"{server.url}/livez").status_code == 200

    private_redis.start()
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/readyz", timeout=15).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert httpx.post(f"{server.url}/predict", json=body, timeout=10).status_code == 200
    assert "Traceback" not in server.log_text()


def test_redis_online_store_and_log_streams(model, serve, request):
    from airmlops import stages

    redis_url = request.getfixturevalue("redis_server")
    redis_settings = model.settings.model_copy(update={"redis_url": redis_url})
    run = stages.RunContext(dag_id="churn_training", run_id="service-test-redis", as_of=AS_OF,
                            git_commit="0" * 40, trigger_reason="integration test")
    written = stages.materialize_features(model.spec, run, redis_settings)
    assert written.store.startswith("redis://")
    server = serve("redis", MLOPS_REDIS_URL=redis_url)
    entities = model.known[:4]
    answer = httpx.post(f"{server.url}/predict",
                        json={"instances": [_instance(e) for e in entities]}, timeout=10)
    assert answer.status_code == 200, answer.text
    request_id = answer.json()["request_id"]
    unknown = httpx.post(f"{server.url}/predict", json={"instances": [_instance("NOPE")]})
    assert unknown.status_code == 422
    assert httpx.post(f"{server.url}/feedback", json={
        "request_id": request_id, "labels": [{"entity": entities[0], "label": 1}],
    }).status_code == 202
    _wait_logged(server, 4)
    deadline = time.monotonic() + 20
    while True:
        labels = read_labels("churn", *WINDOW, settings=redis_settings)
        if request_id in set(labels["request_id"]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    predictions = read_predictions("churn", *WINDOW, settings=redis_settings)
    mine = predictions[predictions["request_id"] == request_id]
    assert list(mine["entity_id"]) == entities and list(mine["position"]) == [0, 1, 2, 3]
    assert mine["probability"].between(0, 1).all()
    assert labels[labels["request_id"] == request_id]["label"].tolist() == [1.0]
