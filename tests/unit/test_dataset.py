"""Time-based split with an embargo, and atomic, idempotent training-set files."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from airmlops.spec import parse_spec
from airmlops.training.dataset import (
    SplitInfo,
    read_split_info,
    time_split,
    write_training_set,
)


def _spec(task: str = "binary_classification", **training):
    return parse_spec(
        {
            "name": "toy",
            "task": task,
            "source": {"kind": "file", "path": "toy.parquet"},
            "entity_key": "id",
            "timestamp": "ts",
            "label": "y",
            "features": [{"name": "x", "type": "numeric"}],
            "training": {"test_fraction": 0.2, "gap_days": 10, "min_rows": 100, **training},
            "estimator": {"class_path": "sklearn.linear_model.LogisticRegression"
                          if task != "regression" else "sklearn.linear_model.Ridge"},
            "gates": {"primary_metric": "roc_auc" if task != "regression" else "rmse"},
        }
    )


def _frame(days: int = 100, per_day: int = 10, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = days * per_day
    start = pd.Timestamp("2026-01-01", tz="UTC")
    frame = pd.DataFrame(
        {
            "id": np.arange(n),
            "ts": start + pd.to_timedelta(np.repeat(np.arange(days), per_day), unit="D")
            + pd.to_timedelta(rng.integers(0, 86_400, n), unit="s"),
            "x": rng.normal(size=n),
            "y": rng.integers(0, 2, n),
        }
    )
    return frame.sample(frac=1.0, random_state=1)  # shuffled: the split must sort


def test_split_is_in_time_order_with_an_embargo():
    spec = _spec()
    train, test, info = time_split(_frame(), spec)

    cutoff = pd.Timestamp(info.cutoff)
    train_end = pd.Timestamp(info.train_end)
    assert train_end == cutoff - pd.Timedelta(days=10)
    assert train["ts"].max() < train_end
    assert test["ts"].min() >= cutoff
    assert train["ts"].is_monotonic_increasing and test["ts"].is_monotonic_increasing
    assert set(train["id"]).isdisjoint(test["id"])


def test_split_counts_add_up_and_test_is_about_the_fraction():
    frame = _frame()
    frame.loc[frame.index[:7], "y"] = np.nan  # labels that have not arrived yet
    train, test, info = time_split(frame, _spec())

    assert info.unlabeled_rows == 7
    assert info.train_rows == len(train) and info.test_rows == len(test)
    assert info.train_rows + info.test_rows + info.embargoed_rows == len(frame) - 7
    assert info.embargoed_rows > 0  # ten days of rows sit in the gap
    assert 0.19 <= len(test) / (len(frame) - 7) <= 0.21
    assert not train["y"].isna().any() and not test["y"].isna().any()


def test_split_info_round_trips_through_json():
    _, _, info = time_split(_frame(), _spec())
    again = SplitInfo.from_dict(json.loads(json.dumps(info.to_dict())))
    assert again == info


def test_zero_gap_keeps_every_labelled_row():
    frame = _frame()
    train, test, info = time_split(frame, _spec(gap_days=0))
    assert info.embargoed_rows == 0
    assert len(train) + len(test) == len(frame)


def test_too_few_training_rows_is_a_clear_error():
    with pytest.raises(ValueError, match=r"training set has \d+ rows, fewer than .*min_rows=5000"):
        time_split(_frame(), _spec(min_rows=5000))


def test_too_few_test_rows_is_a_clear_error():
    with pytest.raises(ValueError, match=r"test set has \d+ rows, fewer than 50"):
        time_split(_frame(days=30, per_day=10), _spec(test_fraction=0.1, min_rows=10))


def test_a_single_class_is_a_clear_error_for_classification():
    frame = _frame()
    frame["y"] = 0
    with pytest.raises(ValueError, match="single label class"):
        time_split(frame, _spec())


def test_a_constant_target_is_fine_for_regression():
    frame = _frame().assign(y=1.5)
    train, test, _ = time_split(frame, _spec(task="regression"))
    assert len(train) > 0 and len(test) > 0


def test_missing_columns_are_named():
    with pytest.raises(ValueError, match=r"\['y'\]"):
        time_split(_frame().drop(columns="y"), _spec())


def test_write_training_set_is_atomic_and_idempotent(tmp_path):
    train, test, info = time_split(_frame(), _spec())
    paths = write_training_set(train, test, tmp_path, "toy/abc123", split=info)

    assert paths == {
        "train": str(tmp_path / "toy" / "abc123" / "train.parquet"),
        "test": str(tmp_path / "toy" / "abc123" / "test.parquet"),
        "split": str(tmp_path / "toy" / "abc123" / "split.json"),
    }
    pd.testing.assert_frame_equal(pd.read_parquet(paths["train"]), train)
    pd.testing.assert_frame_equal(pd.read_parquet(paths["test"]), test)
    assert read_split_info(paths["train"]) == info
    stamps = {part: os.stat(path).st_mtime_ns for part, path in paths.items()}

    again = write_training_set(train, test, tmp_path, "toy/abc123", split=info)
    assert again == paths
    assert {part: os.stat(path).st_mtime_ns for part, path in paths.items()} == stamps
    assert sorted(p.name for p in (tmp_path / "toy" / "abc123").iterdir()) == [
        "split.json", "test.parquet", "train.parquet"
    ]  # no temporary files left behind


def test_write_training_set_replaces_changed_content(tmp_path):
    train, test, info = time_split(_frame(), _spec())
    paths = write_training_set(train, test, tmp_path, "k", split=info)
    write_training_set(train.head(10), test, tmp_path, "k")
    assert len(pd.read_parquet(paths["train"])) == 10
    assert read_split_info(paths["train"]) is None


@pytest.mark.parametrize("key", ["../escape", "a/../../b", "/abs", "", "a b", "a/./b", "x;rm"])
def test_write_training_set_refuses_unsafe_keys(tmp_path, key):
    frame = pd.DataFrame({"a": [1]})
    with pytest.raises(ValueError, match="not valid"):
        write_training_set(frame, frame, tmp_path / "root", key)
    assert not (tmp_path / "root").exists() or not any((tmp_path / "root").iterdir())


def test_ingest_reads_a_file_source_under_the_runs_data_root(tmp_path, monkeypatch):
    """The file source is read under the data root of the settings the stage is given, not
    under the process's default one."""
    import datetime as dt

    from airmlops import stages
    from airmlops.settings import Settings

    elsewhere = tmp_path / "process-default"
    monkeypatch.setenv("MLOPS_DATA_ROOT", str(elsewhere))
    root = tmp_path / "run-root"
    root.mkdir()
    frame = _frame(days=20)
    frame.to_parquet(root / "toy.parquet")
    spec = parse_spec(_spec().model_dump(mode="json"), data_roots=[root])
    run = stages.RunContext(dag_id="toy_training", run_id="manual__1",
                            as_of=dt.datetime(2026, 2, 1, tzinfo=dt.UTC), git_commit="0" * 40,
                            trigger_reason="test", full_history=True)
    snapshot = stages.ingest(spec, run, Settings(data_root=root))
    assert snapshot.rows == len(frame)
    assert not elsewhere.exists()
