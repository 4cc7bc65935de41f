"""A file replay against the real model service (tests/model_service_fixtures.py): a CSV of the
service's own pipeline replayed at a high rate, every row answered and every label accepted;
a dry run of it finds no problem, and names the row and field of a bad one."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

import pandas as pd
import pytest
from model_service_fixtures import WINDOW, Model, Server

from airmlops.monitoring.file_replay import replay_file

pytestmark = pytest.mark.integration

ROWS = 200
START = dt.datetime(2026, 5, 20, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def server(serve) -> Server:
    return serve("file-replay")


def write_history(model: Model, folder: Path, name: str = "history.csv") -> Path:
    """``ROWS`` rows of the churn spec's replay columns (entity key, its one request field
    ``tenure_days``, the timestamp, the label) for entities the online store knows, written in
    reverse time order; any 20 rows in a row name 20 different customers."""
    spec = model.spec
    assert spec.request_fields == ["tenure_days"] and len(model.known) >= 20
    frame = pd.DataFrame({
        spec.entity_key: [model.known[i % len(model.known)] for i in range(ROWS)],
        "tenure_days": [float(30 + 7 * i % 3000) for i in range(ROWS)],
        spec.timestamp: [(START + dt.timedelta(minutes=i)).isoformat() for i in range(ROWS)],
        spec.label: [i % 2 for i in range(ROWS)],
    }).iloc[::-1]
    path = folder / name
    frame.to_csv(path, index=False)
    return path


def test_a_file_is_replayed_and_every_label_is_accepted(model, server, tmp_path):
    path = write_history(model, tmp_path)
    started = time.monotonic()
    result = replay_file(server.url, model.spec, path, rate=200.0, batch_size=20,
                         label_delay=0.2, max_seconds=60.0)
    took = time.monotonic() - started
    assert result.errors == 0, result.error_samples
    assert (result.requests, result.rows_sent, result.rows_answered) == (10, ROWS, ROWS)
    assert result.labels_posted == ROWS and result.label_errors == 0
    assert result.model_versions == {model.version: ROWS}
    assert not result.stopped_by_time and took < 30


def assert_never_logged(model: Model, server: Server, tmp_path: Path, dry: list[str]) -> None:
    """The dry run's request (synthetic) is not in the prediction log, although a replay
    right after it is, whole."""
    from airmlops.serving.prediction_log import read_predictions

    assert len(dry) == 1
    real = replay_file(server.url, model.spec, write_history(model, tmp_path, "after.csv"),
                       rate=200.0, batch_size=20, label_share=0.0)
    deadline = time.monotonic() + 20
    while True:
        logged = set(read_predictions(model.spec.name, *WINDOW,
                                      settings=model.settings)["request_id"])
        if set(real.request_ids) <= logged or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert set(real.request_ids) <= logged
    assert not set(dry) & logged


def test_a_dry_run_passes_good_rows_and_names_a_bad_one(model, server, tmp_path):
    good = replay_file(server.url, model.spec, write_history(model, tmp_path), rate=200.0,
                       batch_size=20, dry_run=True)
    assert good.dry_run and good.rows_checked == ROWS
    assert (good.invalid_rows, good.problems) == (0, [])
    assert good.live_check == f"accepted 20 rows (model version {model.version})"
    assert_never_logged(model, server, tmp_path, good.request_ids)

    path = write_history(model, tmp_path, "bad.csv")
    frame = pd.read_csv(path, dtype={model.spec.entity_key: str})
    frame.loc[16, "tenure_days"] = -3.0  # row 17 of the file: below the spec's min of 0
    frame.to_csv(path, index=False)
    bad = replay_file(server.url, model.spec, path, rate=200.0, batch_size=20, dry_run=True)
    assert bad.invalid_rows == 1
    [problem] = bad.problems
    assert problem.startswith("row 17: tenure_days: Input should be greater than or equal to 0")
    assert bad.live_check.startswith("accepted 20 rows")
