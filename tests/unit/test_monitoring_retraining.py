"""What a retraining triggered by monitoring reads, no servers: data up to the window that
triggered it (``data_end``), in the simulator world of the spec (or of the run), with the
feature days of its batch in that same world; the params that carry it are validated; the
replayer says when its traffic is not the world a retraining would train on."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from airmlops import stages
from airmlops.contracts import Snapshot, World
from airmlops.data.simulator import scenario_on, with_world
from airmlops.monitoring.replay import describe_world, refresh_days, world_warning
from airmlops.settings import Settings
from airmlops.spec import PipelineSpec, parse_spec

REPO_ROOT = Path(__file__).resolve().parents[2]
TODAY = dt.date(2026, 9, 15)
DRIFT_START = dt.date(2026, 8, 1)
NOW = dt.datetime(2026, 9, 15, 14, 30, tzinfo=dt.UTC)


def _spec(feature_store: bool = False, **source: Any) -> PipelineSpec:
    data = yaml.safe_load((REPO_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    if not feature_store:
        data.pop("feature_store")
    data["source"].update(customers=150, label_delay_days=0, **source)
    data["training"].update(window_days=14, gap_days=0, min_rows=50)
    return parse_spec(data)


def _run(**changes: Any) -> stages.RunContext:
    return stages.RunContext(**{"dag_id": "churn_training", "run_id": "retrain__w",
                                "as_of": NOW, "git_commit": "0" * 40,
                                "trigger_reason": "monitoring", **changes})


def test_the_interval_ends_at_the_day_of_the_window_that_triggered_the_run() -> None:
    spec = _spec()
    window_end = dt.datetime(2026, 9, 13, 16, 45, tzinfo=dt.UTC)
    start, end = stages.training_interval(spec, _run(data_end=window_end))
    assert end == dt.datetime(2026, 9, 13, tzinfo=dt.UTC)  # not the day the run happens to run
    assert start == end - dt.timedelta(days=14)
    assert stages.training_interval(spec, _run())[1] == dt.datetime(2026, 9, 15, tzinfo=dt.UTC)
    with pytest.raises(ValueError, match="cannot read data from its future"):
        stages.training_interval(spec, _run(data_end=NOW + dt.timedelta(minutes=1)))
    assert _run(data_end=window_end).lineage()["data_end"] == window_end.isoformat()
    assert "data_end" not in _run().lineage()


def test_the_params_that_carry_it_are_validated() -> None:
    from airmlops.dags.common import parse_data_end, parse_scenario_start, training_params

    assert parse_data_end("2026-09-13T16:45:00+00:00") == dt.datetime(2026, 9, 13, 16, 45,
                                                                      tzinfo=dt.UTC)
    assert parse_data_end("2026-09-13T16:45:00Z").utcoffset() == dt.timedelta(0)
    assert parse_data_end(None) is None and parse_data_end("None") is None
    assert parse_scenario_start("2026-08-01") == DRIFT_START
    for bad in ("2026-09-13T16:45:00", "yesterday", "2026-09-13T16:45:00+00:00; rm -rf /"):
        with pytest.raises(ValueError, match="data_end"):
            parse_data_end(bad)
    for bad in ("2026-8-1", "../etc", "2026-13-01"):
        with pytest.raises(ValueError):
            parse_scenario_start(bad)
    from airflow.sdk.exceptions import ParamValidationError

    params = training_params()
    with pytest.raises(ParamValidationError):
        params["data_end"].resolve("2026-09-13 no zone")
    with pytest.raises(ParamValidationError):
        params["scenario_start"].resolve("next week")
    assert params["scenario_start"].resolve("2026-08-01") == "2026-08-01"


def test_every_reader_sees_the_spec_world_and_a_run_can_replace_it() -> None:
    spec = _spec(scenario="covariate_drift", scenario_start=DRIFT_START.isoformat())
    assert scenario_on(spec.source, DRIFT_START - dt.timedelta(days=1)) == "stable"
    assert scenario_on(spec.source, DRIFT_START) == "covariate_drift"
    moved = with_world(spec.source, scenario_start=dt.date(2026, 9, 1))
    assert moved.scenario == "covariate_drift" and moved.scenario_start == dt.date(2026, 9, 1)
    assert with_world(spec.source) is spec.source
    with pytest.raises(ValueError, match="unknown scenario"):
        with_world(spec.source, scenario="meteor")
    assert stages.world_spec(spec, None, None) is spec
    file_spec = parse_spec({**spec.model_dump(mode="json"),
                            "source": {"kind": "file", "path": "x.csv"}})
    with pytest.raises(ValueError, match="simulator sources only"):
        stages.world_spec(file_spec, "stable", None)


def _ingest(spec: PipelineSpec, settings: Settings,
            **run: Any) -> tuple[Snapshot, pd.DataFrame]:
    from airmlops.data import snapshots

    snapshot = stages.ingest(spec, _run(**run), settings)
    return snapshot, snapshots.read_snapshot(snapshot.ref)


def test_ingest_reads_the_world_of_the_spec_or_of_the_run(tmp_path: Path) -> None:
    settings = Settings(data_root=tmp_path / "data")
    drifted = _spec(scenario="covariate_drift", scenario_start=DRIFT_START.isoformat())
    snapshot, frame = _ingest(drifted, settings)
    assert snapshot.world is None  # the spec's own world: nothing to hand on
    stable_spec = _spec()
    _, stable = _ingest(stable_spec, settings)
    assert stable["payment_failures"].mean() * 2 < frame["payment_failures"].mean()
    # A run's own world (the params): the same rows as a spec saying so, and handed on.
    overridden, same = _ingest(stable_spec, settings, scenario="covariate_drift",
                               scenario_start=DRIFT_START)
    assert overridden.world == World(scenario="covariate_drift", scenario_start=DRIFT_START)
    assert overridden.digest == snapshot.digest and same.equals(frame)
    # Before the scenario starts the world is stable.
    _, early = _ingest(stable_spec, settings, scenario="covariate_drift",
                       scenario_start=dt.date(2026, 9, 20))
    assert early.equals(stable)


def test_a_run_world_rebuilds_the_feature_days_of_its_batch_in_that_world(tmp_path) -> None:
    settings = Settings(data_root=tmp_path / "data")
    spec = _spec(feature_store=True)
    failures = "activity__payment_failures_sum_30d"

    stable_set = stages.preprocess(spec, _ingest(spec, settings)[0], settings)
    stable = pd.read_parquet(stable_set.train_path)
    # The offline store now holds the stable world for these days; a run in a drifted world
    # must not join its drifted rows with those stable features.
    snapshot, _ = _ingest(spec, settings, scenario="covariate_drift")
    drifted = pd.read_parquet(stages.preprocess(spec, snapshot, settings).train_path)
    assert drifted[failures].mean() > 2 * stable[failures].mean()
    assert drifted["activity__sessions_sum_7d"].mean() < 0.8 * stable[
        "activity__sessions_sum_7d"].mean()


def test_the_replayer_names_its_world_and_warns_when_a_retraining_would_not_see_it() -> None:
    spec = _spec(scenario="covariate_drift", scenario_start=DRIFT_START.isoformat())
    assert describe_world(spec) == f"spec: covariate_drift from {DRIFT_START}"
    assert describe_world(spec, "stable") == "stable"
    assert world_warning(spec, None, day=TODAY, days=7) is None
    assert world_warning(spec, "covariate_drift", day=TODAY, days=7) is None
    warning = world_warning(spec, "covariate_drift", day=DRIFT_START, days=3)
    assert "'stable' on 2 of the 3 replayed days" in warning
    assert "a retraining trains on the spec's world" in warning
    assert "is 'covariate_drift' on 7 of the 7" in world_warning(spec, "stable", day=TODAY,
                                                                 days=7)


def test_refreshing_features_rebuilds_the_days_the_world_changed() -> None:
    spec = _spec(feature_store=True, scenario="covariate_drift",
                 scenario_start=DRIFT_START.isoformat())
    assert refresh_days(spec, None, TODAY) == (DRIFT_START, TODAY + dt.timedelta(days=1))
    assert refresh_days(spec, "covariate_drift", TODAY)[0] == DRIFT_START  # the spec's own
    assert refresh_days(spec, "stable", TODAY) == (TODAY - dt.timedelta(days=1),
                                                   TODAY + dt.timedelta(days=1))
    long_ago = _spec(feature_store=True, scenario="covariate_drift", scenario_start="2025-01-01")
    backfill = long_ago.feature_store.backfill_days
    assert refresh_days(long_ago, None, TODAY)[0] == TODAY - dt.timedelta(days=backfill)
    assert refresh_days(_spec(feature_store=True), None, TODAY)[0] == TODAY - dt.timedelta(
        days=1)


def test_a_market_shift_moves_the_inputs_like_covariate_drift_and_the_labels_like_concept():
    from airmlops.data.simulator import simulate_observations

    source = _spec().source
    start, end = dt.date(2026, 5, 1), dt.date(2026, 6, 1)
    shifted = simulate_observations(source, start, end, "covariate_and_concept_drift")
    covariate = simulate_observations(source, start, end, "covariate_drift")
    inputs = [c for c in shifted.columns if c != "churned"]
    assert shifted[inputs].equals(covariate[inputs])  # what input monitoring sees: the same
    assert (shifted["churned"] != covariate["churned"]).mean() > 0.1
    by_plan = shifted.groupby("plan")["churned"].mean()
    assert by_plan["premium"] > by_plan["basic"]  # the concept change: premium churns more
    by_plan = covariate.groupby("plan")["churned"].mean()
    assert by_plan["premium"] < by_plan["basic"]
