"""The traffic replayer against an in-process fake service (httpx.MockTransport) and a fake
clock: what it sends, how fast, when labels follow, and where it stops."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from airmlops.cli import main
from airmlops.monitoring.replay import (
    ReplayError,
    check_url,
    replay,
    replay_rows,
    request_instances,
)
from airmlops.spec import parse_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
DAY = dt.date(2026, 6, 1)
URL = "http://127.0.0.1:8600"


def _spec(**changes: Any):
    data = yaml.safe_load((REPO_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    data.pop("feature_store")
    data["source"]["customers"] = 300
    data.update(changes)
    return parse_spec(data)


@pytest.fixture(scope="module")
def spec():
    return _spec()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds


class FakeService:
    """Answers /predict like the model service and records /feedback, with the clock time."""

    def __init__(self, clock: FakeClock, fail_every: int = 0) -> None:
        self.clock = clock
        self.fail_every = fail_every
        self.predicts: list[tuple[float, dict[str, Any]]] = []
        self.feedback: list[tuple[float, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if request.url.path == "/predict":
            self.predicts.append((self.clock.now, body))
            number = len(self.predicts)
            if self.fail_every and number % self.fail_every == 0:
                return httpx.Response(422, json={"error": "invalid_request",
                                                 "message": "instances[0]: unknown entity"})
            rows = body["instances"]
            return httpx.Response(200, json={
                "predictions": [{"entity": r["customer_id"], "prediction": 0,
                                 "probability": 0.2} for r in rows],
                "model_name": "churn", "model_version": "3",
                "request_id": f"{number:032x}"})
        if request.url.path == "/feedback":
            self.feedback.append((self.clock.now, body))
            return httpx.Response(202, json={"request_id": body["request_id"],
                                             "accepted": len(body["labels"])})
        return httpx.Response(404)


def _run(spec, service: FakeService, clock: FakeClock, **kwargs: Any):
    client = httpx.Client(transport=httpx.MockTransport(service))
    options = {"rows": 30, "rate": 10.0, "day": DAY, "batch_size": 3, "label_delay": 2.0,
               "max_seconds": 60.0, "clock": clock, "sleep": clock.sleep, "client": client}
    options.update(kwargs)
    return replay(URL, spec, kwargs.pop("scenario", "stable"), **options)


def test_sends_the_rows_in_batches_at_the_rate_then_their_labels_after_the_delay(spec):
    clock = FakeClock()
    service = FakeService(clock)
    result = _run(spec, service, clock)

    assert (result.requests, result.rows_sent, result.rows_answered, result.errors) == (
        10, 30, 30, 0)
    times = [t for t, _ in service.predicts]
    assert [round(b - a, 6) for a, b in itertools.pairwise(times)] == [0.1] * 9
    sent = [row for _, body in service.predicts for row in body["instances"]]
    assert set(sent[0]) == {"customer_id", *spec.feature_names}

    expected = replay_rows(spec, "stable", day=DAY, rows=30)
    assert [r["customer_id"] for r in sent] == expected["customer_id"].tolist()
    labels = {}
    for (posted_at, body), (predicted_at, request) in zip(service.feedback, service.predicts,
                                                         strict=True):
        assert posted_at - predicted_at >= 2.0
        assert [item["entity"] for item in body["labels"]] == [
            r["customer_id"] for r in request["instances"]]
        labels.update({(body["request_id"], i["entity"]): i["label"] for i in body["labels"]})
    assert [labels[(f"{1 + n // 3:032x}", c)] for n, c in
            enumerate(expected["customer_id"])] == expected["churned"].tolist()
    assert result.labels_posted == 30 and result.labels_dropped == 0
    assert result.model_versions == {"3": 30}
    assert result.request_ids == [f"{n:032x}" for n in range(1, 11)]
    assert not result.stopped_by_time


def test_the_time_bound_stops_sending_and_drops_waiting_labels(spec):
    clock = FakeClock()
    service = FakeService(clock)
    result = _run(spec, service, clock, rows=1000, rate=2.0, batch_size=1, label_delay=3.0,
                  max_seconds=5.0)
    assert result.stopped_by_time
    assert result.requests == len(service.predicts) == 10  # 0.0, 0.5, ... 4.5 s
    assert result.labels_posted == len(service.feedback) == 4  # predicted by 1.5 s, due by 4.5
    assert result.labels_dropped == 6
    assert clock.now - 1000.0 <= 5.0 + 1e-9


def test_failed_requests_are_counted_and_get_no_labels(spec):
    clock = FakeClock()
    service = FakeService(clock, fail_every=4)
    result = _run(spec, service, clock, rows=24, batch_size=2, label_delay=0.0)
    assert result.requests == 12 and result.errors == 3
    assert result.rows_answered == 18 and result.labels_posted == 18
    assert result.error_samples[0].startswith("/predict 422:")
    assert "unknown entity" in result.error_samples[0]
    failed = {f"{n:032x}" for n in (4, 8, 12)}
    assert not failed & {body["request_id"] for _, body in service.feedback}


def test_a_label_share_labels_only_some_requests_deterministically(spec):
    counts = []
    for _ in range(2):
        clock = FakeClock()
        service = FakeService(clock)
        result = _run(spec, service, clock, rows=200, batch_size=1, rate=100.0,
                      label_share=0.25, label_delay=0.0)
        counts.append([body["request_id"] for _, body in service.feedback])
        assert 20 <= result.labels_posted <= 80
    assert counts[0] == counts[1]


def test_the_scenario_changes_the_rows_sent():
    spec = _spec()
    stable = replay_rows(spec, "stable", day=DAY, rows=2000)
    drifted = replay_rows(spec, "covariate_drift", day=DAY, rows=2000)
    assert drifted["sessions"].mean() < 0.75 * stable["sessions"].mean()
    assert drifted["payment_failures"].mean() > 2 * stable["payment_failures"].mean()
    again = replay_rows(spec, "stable", day=DAY, rows=2000)
    assert again.equals(stable)
    # more rows than the days hold: the shuffled rows are cycled
    small = replay_rows(spec, "stable", day=DAY, rows=50, days=1)
    many = replay_rows(spec, "stable", day=DAY, rows=len(small) * 3, days=1)
    assert many["customer_id"].value_counts().max() >= 2


def test_request_rows_are_json_with_nulls_and_schema_breaks_as_the_world_sends_them():
    spec = _spec()
    frame = replay_rows(spec, "data_quality", day=DAY, rows=400)
    instances = request_instances(spec, frame)
    json.dumps(instances, allow_nan=False)
    assert any(row["minutes_watched"] is None for row in instances)
    assert any(row["sessions"] < 0 for row in instances)
    # the incident renamed monthly_fee: the field is missing, the service will say so
    assert all("monthly_fee" not in row for row in instances)
    assert set(instances[0]) == {"customer_id", *spec.feature_names} - {"monthly_fee"}


@pytest.mark.parametrize("url, allowed", [
    ("http://127.0.0.1:8600", True), ("http://localhost:8600/", True),
    ("https://[::1]:8600", True), ("http://10.1.2.3:8600", False),
    ("http://model.example.com", False),
])
def test_only_loopback_urls_unless_remote_is_allowed(url, allowed):
    if allowed:
        assert check_url(url) == url.rstrip("/")
    else:
        with pytest.raises(ReplayError, match="not a loopback"):
            check_url(url)
        assert check_url(url, allow_remote=True) == url.rstrip("/")
    with pytest.raises(ReplayError):
        check_url("http://user:pw@127.0.0.1:8600")


@pytest.mark.parametrize("bad", [
    {"rows": 0}, {"rows": 2_000_000}, {"rate": 0.0}, {"rate": 5000.0}, {"batch_size": 0},
    {"max_seconds": 0.0}, {"max_seconds": 10_000.0}, {"label_delay": -1.0},
    {"label_share": 1.5},
])
def test_bounds_are_enforced_before_anything_is_sent(spec, bad):
    clock = FakeClock()
    service = FakeService(clock)
    with pytest.raises(ReplayError):
        _run(spec, service, clock, **bad)
    assert service.predicts == []


def test_only_simulator_pipelines_can_be_replayed():
    spec = _spec(source={"kind": "file", "path": "data/*.csv"})
    with pytest.raises(ReplayError, match="simulator source"):
        replay_rows(spec, "stable", day=DAY, rows=10)


def test_the_cli_refuses_a_remote_url_and_a_bad_pipeline_name(capsys):
    assert main(["replay", "--url", "http://10.0.0.9:8600", "--rows", "5"]) == 2
    assert "not a loopback address" in capsys.readouterr().err
    assert main(["replay", "--pipeline", "../etc/passwd"]) == 2
    assert "must match" in capsys.readouterr().err


def test_an_entity_named_twice_in_a_batch_is_labelled_once(spec):
    """The service takes one label per (request, entity) and refuses a body naming an entity
    twice: a batch holding two days of one customer posts that customer's label once."""
    clock = FakeClock()
    service = FakeService(clock)
    result = _run(spec, service, clock, rows=1200, rate=100.0, batch_size=400)
    requests = [body["instances"] for _, body in service.predicts]
    assert any(len({r["customer_id"] for r in rows}) < len(rows) for rows in requests), (
        "the data must hold a batch with a repeated customer for this test to mean anything")
    for (_, body), rows in zip(service.feedback, requests, strict=True):
        named = [item["entity"] for item in body["labels"]]
        assert len(named) == len(set(named))
        assert set(named) == {r["customer_id"] for r in rows}
    assert result.errors == 0
    assert result.labels_posted == sum(len({r["customer_id"] for r in rows}) for rows in requests)
