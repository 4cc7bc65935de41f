"""Replaying a file of one's own history (airmlops.monitoring.file_replay) against a real HTTP
server on 127.0.0.1 that answers like the model service and records what it receives.

Pacing is driven by a fake clock where a test needs exact times (the sleeps advance it); the
requests themselves always go over a real socket to the recording server.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from toy_specs import LOANS_SPEC

from airmlops.cli import main
from airmlops.monitoring import file_replay
from airmlops.monitoring.file_replay import read_replay_file, replay_file
from airmlops.monitoring.replay import ReplayError
from airmlops.platform import free_port
from airmlops.serving.synthetic import SYNTHETIC_HEADER
from airmlops.spec import PipelineSpec, parse_spec

SPEC = LOANS_SPEC
START = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


def make_spec(root: Path, **changes: Any) -> PipelineSpec:
    return parse_spec({**SPEC, **changes}, data_roots=[root])


@pytest.fixture
def spec(tmp_path: Path) -> PipelineSpec:
    return make_spec(tmp_path)


# --- a recording service -----------------------------------------------------------------------


class Recorder:
    """What the server received, in order: (path, headers, JSON body); and which rows each
    request id it issued carried."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[tuple[str, dict[str, str], Any]] = []
        self.issued: dict[str, list[dict[str, Any]]] = {}
        self.refuse: set[str] = set()  # entities whose /predict gets a 422

    def calls(self, path: str) -> list[tuple[dict[str, str], Any]]:
        with self.lock:
            return [(headers, body) for p, headers, body in self.received if p == path]


def _handler(recorder: Recorder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # headers and body leave in two writes: without this, Nagle's algorithm and the
            # client's delayed ACK hold every answer for ~40 ms
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._answer(200, {"status": "ok"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with recorder.lock:
                recorder.received.append((self.path, dict(self.headers), body))
            if self.path == "/predict":
                rows = body["instances"]
                refused = [r["loan_id"] for r in rows if r["loan_id"] in recorder.refuse]
                if refused:
                    self._answer(422, {"error": "unknown_entity",
                                       "message": f"unknown entities {refused}"})
                    return
                request_id = uuid.uuid4().hex
                with recorder.lock:
                    recorder.issued[request_id] = rows
                self._answer(200, {"predictions": [{"entity": r["loan_id"], "prediction": 0,
                                                    "probability": 0.1} for r in rows],
                                   "request_id": request_id, "model_version": "1",
                                   "model_name": "x"})
            elif self.path == "/feedback":
                self._answer(202, {"request_id": body["request_id"],
                                   "accepted": len(body["labels"])})
            else:
                self._answer(404, {"error": "not_found"})

    return Handler


@pytest.fixture
def service() -> Iterator[tuple[str, Recorder]]:
    recorder = Recorder()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(recorder))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", recorder
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


# --- files -------------------------------------------------------------------------------------


def history(count: int, *, seed: int = 3) -> pd.DataFrame:
    """``count`` good rows whose file order is not their time order (minutes shuffled, with
    some ties, and some times written with an offset)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    minutes = rng.permutation(count) // 2 * 2  # pairs of equal times: the sort must be stable
    times = [START + dt.timedelta(minutes=int(m)) for m in minutes]
    text = [t.astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat() if i % 3 == 0
            else t.strftime("%Y-%m-%dT%H:%M:%S") for i, t in enumerate(times)]
    return pd.DataFrame({
        "loan_id": [f"L{i:04d}" for i in range(count)],
        "event_time": text,
        "amount": rng.integers(100, 50_000, count),
        "grade": rng.choice(["A", "B", "C"], count),
        "income": rng.uniform(1000, 9000, count).round(2),
        "defaulted": rng.integers(0, 2, count),
        "notes": "not sent",
    })


def instant(text: str) -> dt.datetime:
    """One ISO 8601 time, naive as UTC (parsed alone: pandas lends one value's offset to the
    next when a column mixes both)."""
    moment = dt.datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def time_order(frame: pd.DataFrame) -> list[str]:
    """The entities of ``frame`` in time order, ties in file order (``sorted`` is stable)."""
    rows = zip(frame["event_time"].astype(str), frame["loan_id"], strict=True)
    return [entity for _, entity in sorted(rows, key=lambda row: instant(row[0]))]


def write_csv(root: Path, frame: pd.DataFrame, name: str = "history.csv") -> Path:
    path = root / "history" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def run(url: str, spec: PipelineSpec, path: Path, **options: Any):
    clock = FakeClock()
    settings = {"rate": 50.0, "batch_size": 4, "label_delay": 1.0, "max_seconds": 300.0,
                "clock": clock, "sleep": clock.sleep}
    settings.update(options)
    return replay_file(url, spec, path, **settings)


# --- sending -----------------------------------------------------------------------------------


def test_rows_go_in_time_order_and_their_labels_follow_under_the_right_request_ids(
        tmp_path, spec, service):
    url, recorder = service
    frame = history(40)
    frame.loc[7, "defaulted"] = None  # a label not known yet: sent, never posted
    frame.loc[9, "income"] = None  # a missing value the spec allows: sent as null
    path = write_csv(tmp_path, frame)

    result = run(url, spec, path)

    predicts = recorder.calls("/predict")
    sent = [row for _, body in predicts for row in body["instances"]]
    assert [row["loan_id"] for row in sent] == time_order(frame)
    assert all(set(row) == {"loan_id", "amount", "grade", "income"} for row in sent)
    assert all(len(body["instances"]) == 4 for _, body in predicts)
    [nine] = [row for row in sent if row["loan_id"] == "L0009"]
    assert nine["income"] is None and isinstance(nine["amount"], int)

    labels = {row.loan_id: row.defaulted for row in frame.itertuples()}
    posted = {}
    for _, body in recorder.calls("/feedback"):
        assert set(body) == {"request_id", "labels"}
        asked = {row["loan_id"] for row in recorder.issued[body["request_id"]]}
        for item in body["labels"]:
            assert item["entity"] in asked
            posted[item["entity"]] = item["label"]
    assert posted == {e: int(y) for e, y in labels.items() if e != "L0007"}
    assert (result.requests, result.rows_sent, result.rows_answered) == (10, 40, 40)
    assert (result.errors, result.labels_posted, result.labels_dropped) == (0, 39, 0)
    assert result.scenario == "file: history.csv"
    assert result.model_versions == {"1": 40}
    assert all(REQUEST_ID.fullmatch(r) for r in result.request_ids)
    assert all(SYNTHETIC_HEADER not in headers for _, headers, _ in recorder.received)
    assert "dry_run" not in result.to_dict()


def test_pacing_and_label_delay_follow_the_clock(tmp_path, spec, service):
    url, recorder = service
    path = write_csv(tmp_path, history(12))
    clock = FakeClock()
    sent_at: list[float] = []
    posted_at: list[float] = []

    class Timed:
        """A real httpx client that notes the fake time of every call."""

        def __init__(self) -> None:
            import httpx

            self.http = httpx.Client(timeout=5)

        def post(self, url: str, **kwargs: Any):
            (sent_at if url.endswith("/predict") else posted_at).append(clock.now)
            return self.http.post(url, **kwargs)

    timed = Timed()
    try:
        result = replay_file(url, spec, path, rate=4.0, batch_size=3, label_delay=2.0,
                             client=timed, clock=clock, sleep=clock.sleep)
    finally:
        timed.http.close()
    assert sent_at == pytest.approx([100.0, 100.25, 100.5, 100.75])
    assert [round(b - a, 6) for a, b in zip(sent_at, posted_at, strict=True)] == [2.0] * 4
    assert result.labels_posted == 12 and len(recorder.calls("/feedback")) == 4


def test_parquet_with_real_timestamps_and_a_pq_suffix(tmp_path, spec, service):
    url, recorder = service
    frame = history(20)
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True, format="ISO8601")
    path = tmp_path / "history" / "rows.pq"
    path.parent.mkdir()
    frame.to_parquet(path, index=False)

    result = run(url, spec, path, batch_size=5)
    sent = [r["loan_id"] for _, body in recorder.calls("/predict") for r in body["instances"]]
    assert sent == time_order(frame.assign(event_time=frame["event_time"].astype(str)))
    assert result.rows_answered == 20 and result.labels_posted == 20
    assert result.scenario == "file: rows.pq"


def test_the_timestamp_as_a_request_field_is_sent_as_written(tmp_path, service):
    spec = make_spec(tmp_path, feature_store={
        "entities": [{"name": "loan", "join_key": "loan_id"}],
        "request_fields": ["amount", "event_time"], "views": []},
        features=[{"name": "amount", "type": "numeric", "min": 0}])
    url, recorder = service
    frame = history(6)
    path = write_csv(tmp_path, frame)
    run(url, spec, path, batch_size=6)
    [(_, body)] = recorder.calls("/predict")
    assert [r["event_time"] for r in body["instances"]] == [
        frame.set_index("loan_id").loc[e, "event_time"] for e in time_order(frame)]


def test_boolean_features_stay_booleans(tmp_path, service):
    spec = make_spec(tmp_path, features=[
        *SPEC["features"], {"name": "autopay", "type": "boolean", "max_null_fraction": 0.5}])
    url, recorder = service
    frame = history(6)
    frame["autopay"] = [True, False, True, None, False, True]
    with_digits = frame.assign(autopay=[1, 0, 1, None, 0, 1])  # read back as 1.0/0.0/NaN
    write_csv(tmp_path, frame, "flags.csv")
    write_csv(tmp_path, with_digits, "digits.csv")
    for name in ("flags.csv", "digits.csv"):
        result = run(url, spec, tmp_path / "history" / name, batch_size=6)
        assert result.errors == 0
    flags = [r["autopay"] for _, body in recorder.calls("/predict") for r in body["instances"]]
    assert flags[:6] == flags[6:]
    assert set(map(type, flags)) == {bool, type(None)}


def test_rows_limits_to_the_first_rows_of_the_file(tmp_path, spec, service):
    url, recorder = service
    frame = history(30)
    path = write_csv(tmp_path, frame)
    result = run(url, spec, path, rows=10)
    assert result.rows_sent == 10
    sent = [r["loan_id"] for _, body in recorder.calls("/predict") for r in body["instances"]]
    assert sent == time_order(frame.iloc[:10])


def test_a_label_share_labels_a_seeded_part_of_the_requests(tmp_path, spec, service):
    url, recorder = service
    path = write_csv(tmp_path, history(200))
    runs = []
    for _ in range(2):
        before = len(recorder.calls("/feedback"))
        result = run(url, spec, path, batch_size=1, label_share=0.3, label_delay=0.0, rate=500)
        posted = recorder.calls("/feedback")[before:]
        order = {rid: n for n, rid in enumerate(result.request_ids)}
        runs.append(sorted(order[body["request_id"]] for _, body in posted))
        assert 30 <= result.labels_posted <= 90 and result.labels_posted == len(posted)
    assert runs[0] == runs[1]


def test_without_labels_the_label_column_is_not_needed(tmp_path, spec, service):
    url, recorder = service
    path = write_csv(tmp_path, history(8).drop(columns="defaulted"))
    result = run(url, spec, path, label_share=0.0)
    assert result.rows_answered == 8 and result.labels_posted == 0
    assert recorder.calls("/feedback") == []


def test_a_real_clock_run_waits_for_its_labels(tmp_path, spec, service):
    url, recorder = service
    path = write_csv(tmp_path, history(30))
    result = replay_file(url, spec, path, rate=500.0, batch_size=5, label_delay=0.05,
                         max_seconds=10.0)
    assert result.rows_answered == 30 and result.labels_posted == 30
    assert not result.stopped_by_time and len(recorder.calls("/feedback")) == 6


# --- the file and its columns ------------------------------------------------------------------


@pytest.mark.parametrize(("column", "role"), [
    ("loan_id", "entity key"), ("amount", "request field"), ("grade", "request field"),
    ("event_time", "timestamp"), ("defaulted", "label"),
])
def test_each_missing_column_is_named_with_the_file(tmp_path, spec, service, column, role):
    url, recorder = service
    path = write_csv(tmp_path, history(5).drop(columns=column))
    with pytest.raises(ReplayError) as caught:
        run(url, spec, path)
    assert f"{column!r} ({role})" in str(caught.value) and str(path) in str(caught.value)
    assert recorder.received == []


def test_two_missing_columns_are_both_named(tmp_path, spec):
    path = write_csv(tmp_path, history(5).drop(columns=["amount", "income"]))
    with pytest.raises(ReplayError, match=r"'amount' \(request field\), 'income' \(request"):
        read_replay_file(spec, path)


def test_a_parquet_file_missing_a_column_is_named(tmp_path, spec):
    path = tmp_path / "rows.parquet"
    history(5).drop(columns="grade").to_parquet(path)
    with pytest.raises(ReplayError, match=r"'grade' \(request field\)"):
        read_replay_file(spec, path)


def test_an_unparseable_timestamp_names_its_row(tmp_path, spec):
    frame = history(10)
    frame.loc[6, "event_time"] = "yesterday"
    frame.loc[8, "event_time"] = None
    path = write_csv(tmp_path, frame)
    with pytest.raises(ReplayError) as caught:
        read_replay_file(spec, path)
    message = str(caught.value)
    assert "row 7 ('yesterday')" in message and "row 9" in message
    assert "'event_time'" in message and str(path) in message


def test_rows_keep_their_file_numbers_in_time_order(tmp_path, spec):
    frame = history(3)
    frame["event_time"] = ["2026-05-01T10:00:00Z", "2026-05-01T09:00:00Z",
                           "2026-05-01T11:00:00+02:00"]  # 09:00 UTC: ties with row 2
    frame = read_replay_file(spec, write_csv(tmp_path, frame))
    assert frame.index.tolist() == [2, 3, 1]


def test_more_rows_than_the_bound_need_a_row_limit(tmp_path, spec, monkeypatch):
    monkeypatch.setattr(file_replay, "MAX_ROWS", 50)  # the real bound is 1,000,000 rows
    path = write_csv(tmp_path, history(60))
    with pytest.raises(ReplayError, match="has more than 50 rows; pass rows"):
        read_replay_file(spec, path)
    assert len(read_replay_file(spec, path, rows=50)) == 50
    assert len(read_replay_file(spec, write_csv(tmp_path, history(50), "fits.csv"))) == 50


@pytest.mark.parametrize("bad", [
    {"rows": 0}, {"rows": 2_000_000}, {"rate": 0.0}, {"rate": 5000.0}, {"batch_size": 0},
    {"max_seconds": 0.0}, {"label_delay": -1.0}, {"label_share": 1.5},
])
def test_bounds_are_checked_before_anything_is_sent(tmp_path, spec, service, bad):
    url, recorder = service
    path = write_csv(tmp_path, history(5))
    with pytest.raises(ReplayError):
        run(url, spec, path, **bad)
    with pytest.raises(ReplayError, match="not a loopback"):
        run("http://10.9.8.7:8600", spec, path)
    assert recorder.received == []


# --- the dry run -------------------------------------------------------------------------------


def test_a_dry_run_names_bad_rows_and_fields_and_sends_one_synthetic_batch(
        tmp_path, spec, service):
    url, recorder = service
    frame = history(30)
    frame["amount"] = frame["amount"].astype(object)
    frame.loc[2, "amount"] = -5  # below the spec's min
    frame.loc[4, "grade"] = "Z"  # not a declared category
    frame.loc[4, "defaulted"] = 2  # not a binary label
    frame.loc[6, "amount"] = "lots"  # text in a numeric column
    frame.loc[8, "loan_id"] = None  # no entity
    path = write_csv(tmp_path, frame)

    result = run(url, spec, path, dry_run=True, batch_size=4)

    assert result.dry_run and result.rows_checked == 30
    assert result.invalid_rows == 4
    problems = "\n".join(result.problems)
    assert "row 3: amount: Input should be greater than or equal to 0" in problems
    assert "row 5: grade: Input should be 'A', 'B' or 'C'" in problems
    assert "row 5: defaulted: must be 0, 1, true or false" in problems
    assert "row 7: amount: Input should be a valid number" in problems
    assert "row 9: loan_id: must be a string or an integer" in problems
    # nothing that is logged: one synthetic /predict of good rows, no /feedback
    [(headers, body)] = recorder.calls("/predict")
    assert headers[SYNTHETIC_HEADER] == "replay-dry-run"
    assert len(body["instances"]) == 4
    assert recorder.calls("/feedback") == []
    assert result.live_check == "accepted 4 rows (model version 1)"
    assert result.to_dict()["problems"] == result.problems


def test_a_dry_run_of_good_rows_has_no_problems(tmp_path, spec, service):
    url, recorder = service
    result = run(url, spec, write_csv(tmp_path, history(25)), dry_run=True, batch_size=10)
    assert (result.rows_checked, result.invalid_rows, result.problems) == (25, 0, [])
    assert result.model_versions == {"1": 10}
    assert len(recorder.received) == 1


def test_a_dry_run_lists_the_first_20_problems_and_counts_them_all(tmp_path, spec, service):
    url, _ = service
    frame = history(40)
    frame["amount"] = -1
    result = run(url, spec, write_csv(tmp_path, frame), dry_run=True)
    assert result.invalid_rows == 40 and len(result.problems) == 20
    assert result.problems[0].startswith("row 1: amount:")
    assert result.live_check == "skipped: no batch passed the local checks"


def test_a_dry_run_reports_what_the_live_service_refuses(tmp_path, spec, service):
    url, recorder = service
    frame = history(8)
    path = write_csv(tmp_path, frame)
    recorder.refuse = {time_order(frame)[0]}  # the online store does not know it
    result = run(url, spec, path, dry_run=True, batch_size=4)
    assert result.invalid_rows == 0
    [problem] = result.problems
    assert "refused the first batch of good rows: /predict 422" in problem
    assert "unknown entities" in problem


def test_a_dry_run_without_a_service_checks_the_file_alone(tmp_path, spec):
    url = f"http://127.0.0.1:{free_port()}"
    result = run(url, spec, write_csv(tmp_path, history(5)), dry_run=True)
    assert result.problems == [] and result.live_check.startswith("skipped:")
    assert "does not answer" in result.live_check


def test_a_dry_run_checks_regression_labels_as_finite_numbers(tmp_path, service):
    spec = make_spec(tmp_path, task="regression",
                     estimator={"class_path": "sklearn.linear_model.Ridge"},
                     gates={"primary_metric": "rmse"})
    url, _ = service
    frame = history(4)
    frame["defaulted"] = frame["defaulted"].astype(object)
    frame.loc[1, "defaulted"] = "high"
    frame.loc[2, "defaulted"] = 12.5
    result = run(url, spec, write_csv(tmp_path, frame), dry_run=True)
    assert result.problems == ["row 2: defaulted: must be a finite number (got 'high')"]


# --- progress ----------------------------------------------------------------------------------


def test_progress_is_one_line_at_most_every_half_second_and_at_the_end(tmp_path, spec, service):
    url, _ = service
    path = write_csv(tmp_path, history(40))
    lines: list[str] = []
    clock = FakeClock()
    times: list[float] = []

    def progress(line: str) -> None:
        lines.append(line)
        times.append(clock.now)

    result = replay_file(url, spec, path, rate=10.0, batch_size=2, label_delay=1.5,
                         clock=clock, sleep=clock.sleep, progress=progress)
    assert result.labels_posted == 40
    assert all(b - a >= 0.5 - 1e-9 for a, b in itertools.pairwise(times[:-1]))
    assert 4 <= len(lines) <= 8  # 2 s of sending and 1.5 s of waiting for labels
    pattern = re.compile(r"^\[[#-]{20}\] \d+% \d+/40 rows · \d+\.\d req/s · \d+ errors · "
                         r"\d+ labels posted · eta \d+s$")
    assert all(pattern.fullmatch(line) for line in lines), lines
    assert lines[-1].startswith("[####################] 100% 40/40 rows")
    assert lines[-1].endswith("· 0 errors · 40 labels posted · eta 0s")
    assert any(re.match(r"^\[#+-+\] \d\d% ", line) for line in lines)  # a partial bar


def test_progress_line_format():
    from airmlops.monitoring.replay import Progress, ReplayResult

    result = ReplayResult(scenario="file: x.csv", requests=800, rows_sent=800,
                          labels_posted=640)
    line = file_replay.progress_line(Progress(result, 2000, 65.0, 9.4))
    assert line == ("[########------------] 40% 800/2000 rows · 12.3 req/s · 0 errors · "
                    "640 labels posted · eta 9s")
    assert file_replay.progress_line(Progress(result, 2000, 65.0, 125.0)).endswith("eta 2m05s")


# --- the command line --------------------------------------------------------------------------


def spec_file(tmp_path: Path) -> Path:
    path = tmp_path / "loans.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def test_the_cli_dry_run_prints_json_and_exits_by_the_problems(tmp_path, service, capsys):
    url, recorder = service
    good = write_csv(tmp_path, history(12), "good.csv")
    bad_rows = history(12)
    bad_rows.loc[3, "grade"] = "Q"
    bad = write_csv(tmp_path, bad_rows, "bad.csv")
    spec_path = spec_file(tmp_path)
    common = ["replay", "--spec", str(spec_path), "--url", url, "--dry-run", "--batch", "6"]
    assert main([*common, "--file", str(good)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"] and out["problems"] == [] and out["rows_checked"] == 12
    assert out["scenario"] == "file: good.csv"
    assert main([*common, "--file", str(bad)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["invalid_rows"] == 1 and out["problems"][0].startswith("row 4: grade:")
    assert all(h[SYNTHETIC_HEADER] == "replay-dry-run" for h, _ in recorder.calls("/predict"))


def test_the_cli_replays_a_file_with_progress_on_stderr(tmp_path, service, capsys):
    url, recorder = service
    path = write_csv(tmp_path, history(20))
    spec_path = spec_file(tmp_path)
    code = main(["replay", "--spec", str(spec_path), "--url", url, "--file", str(path),
                 "--rate", "200", "--batch", "5", "--label-delay", "0", "--rows", "15"])
    captured = capsys.readouterr()
    assert code == 0
    out = json.loads(captured.out)
    assert out["rows_answered"] == 15 and out["labels_posted"] == 15
    assert "dry_run" not in out
    last = captured.err.strip().splitlines()[-1]  # not a terminal: one line per update
    assert last.startswith("[####################] 100% 15/15 rows")
    assert len(recorder.calls("/predict")) == 3
