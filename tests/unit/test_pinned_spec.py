"""The spec is pinned per training run: ingest records the bytes it read and their hash, later
stages use that copy whatever the file holds by then, and packaging refuses a spec other than
the one the model version was trained with."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml

from airmlops import stages
from airmlops.serving import bento
from airmlops.settings import Settings
from airmlops.spec_pin import SpecHashMismatch, load_pinned, pin, read_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 9, 15, 14, 30, tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def _spec_data() -> dict[str, Any]:
    """The demo pipeline, small: 150 customers, two weeks, no feature store."""
    data = yaml.safe_load((REPO_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    data.pop("feature_store")
    data["name"] = "pinned"
    data["source"].update(customers=150, label_delay_days=0)
    data["training"].update(window_days=14, gap_days=2, min_rows=50, test_fraction=0.25)
    data["gates"].update({"thresholds": {"roc_auc": 0.55}})
    return data


@pytest.fixture
def home(tmp_path) -> dict[str, Any]:
    from mlflow import MlflowClient

    from airmlops.training.tracking import get_or_create_experiment

    settings = Settings(data_root=tmp_path / "data",
                        mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    get_or_create_experiment(MlflowClient(settings.mlflow_tracking_uri), "pinned",
                             (tmp_path / "artifacts").as_uri())
    path = tmp_path / "pipelines" / "pinned.yaml"
    path.parent.mkdir()
    path.write_text("# the run's spec, with a comment kept byte for byte\n"
                    + yaml.safe_dump(_spec_data(), sort_keys=False))
    run = stages.RunContext(dag_id="pinned_training", run_id="manual__1", as_of=NOW,
                            git_commit="0" * 40, trigger_reason="test")
    return {"settings": settings, "path": path, "run": run}


def _edit(path: Path, **training: Any) -> None:
    data = yaml.safe_load(path.read_text())
    data["training"].update(training)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _ingest(home: dict[str, Any]):
    """What the DAG's ingest task does: read the file once, ingest, pin those bytes."""
    spec, raw = read_spec(home["path"])
    return spec, stages.ingest(spec, home["run"], home["settings"], spec_bytes=raw)


def test_ingest_pins_the_bytes_it_read_and_their_hash(home):
    spec, snapshot = _ingest(home)
    assert snapshot.spec_hash == spec.spec_hash()
    assert snapshot.spec_path.read_bytes() == home["path"].read_bytes()
    assert snapshot.spec_path.is_relative_to(home["settings"].data_root / "specs" / "pinned")
    assert snapshot.to_xcom()["spec_hash"] == spec.spec_hash()


def test_a_spec_edited_between_ingest_and_train_does_not_change_the_training(home):
    spec, snapshot = _ingest(home)
    _edit(home["path"], gap_days=5, test_fraction=0.4)  # someone edits the file mid-run
    edited, _ = read_spec(home["path"])
    assert edited.spec_hash() != spec.spec_hash()

    pinned = load_pinned(snapshot.spec_path, snapshot.spec_hash)  # what later tasks load
    assert pinned == spec and pinned.training.gap_days == 2
    training_set = stages.preprocess(pinned, snapshot, home["settings"])
    assert training_set.split["gap_days"] == 2
    trained = stages.train(pinned, training_set, home["run"], home["settings"])
    assert trained.lineage["spec_hash"] == spec.spec_hash() != edited.spec_hash()


def test_a_changed_pinned_copy_is_refused_naming_both_hashes(home):
    spec, snapshot = _ingest(home)
    _edit(snapshot.spec_path, gap_days=5)
    with pytest.raises(SpecHashMismatch) as refused:
        load_pinned(snapshot.spec_path, snapshot.spec_hash)
    assert spec.spec_hash() in str(refused.value) and refused.value.found in str(refused.value)


def test_pinning_bytes_of_another_spec_is_refused(home):
    spec, _ = read_spec(home["path"])
    _edit(home["path"], gap_days=5)
    other, other_raw = read_spec(home["path"])
    with pytest.raises(SpecHashMismatch, match=other.spec_hash()):
        pin(spec, home["settings"].data_root, other_raw)
    # Without file bytes (a spec built in memory) the canonical JSON is pinned, and loads back.
    pinned = pin(other, home["settings"].data_root)
    assert load_pinned(pinned.path, other.spec_hash()) == other


def test_packaging_with_another_spec_hash_is_refused(home, tmp_path):
    spec, snapshot = _ingest(home)
    settings = home["settings"]
    trained = stages.train(spec, stages.preprocess(spec, snapshot, settings), home["run"],
                           settings)
    registered = stages.register(spec, trained, settings)
    _edit(home["path"], gap_days=5)
    edited, _ = read_spec(home["path"])
    with pytest.raises(SpecHashMismatch) as refused:
        bento.build_bento(edited, registered.version, settings.mlflow_tracking_uri,
                          tmp_path / "bentoml", spec_path=home["path"])
    message = str(refused.value)
    assert spec.spec_hash() in message and edited.spec_hash() in message
    assert f"version {registered.version}" in message
    with pytest.raises(SpecHashMismatch):  # the packaging stage says the same
        stages.containerize(edited, home["path"], registered, settings)
