"""The demo simulator: deterministic per day, consistent views, visible scenarios."""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import pandas as pd
import pytest

from airmlops.data.simulator import (
    OBSERVATION_COLUMNS,
    simulate_events,
    simulate_observations,
    simulate_profiles,
)
from airmlops.data.snapshots import frame_digest
from airmlops.spec import SimulatorSource

DAY0 = dt.date(2026, 1, 1)
ACTIVITY = ["sessions", "minutes_watched", "support_tickets", "payment_failures"]
INPUTS = ["customer_id", "event_timestamp", "plan", "region", "age", "tenure_days",
          "monthly_fee", *ACTIVITY]


def source(**changes: object) -> SimulatorSource:
    base = SimulatorSource(kind="simulator", seed=7, customers=2000)
    return base.model_copy(update=changes)


def days(n: int, offset: int = 0) -> tuple[dt.date, dt.date]:
    return DAY0 + dt.timedelta(days=offset), DAY0 + dt.timedelta(days=offset + n)


@pytest.fixture(scope="module")
def stable() -> pd.DataFrame:
    return simulate_observations(source(), *days(56))


def test_schema_matches_the_demo_spec(stable: pd.DataFrame) -> None:
    assert tuple(stable.columns) == OBSERVATION_COLUMNS
    assert str(stable["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    assert stable["customer_id"].str.fullmatch(r"C\d{6}").all()
    assert set(stable["plan"]) == {"basic", "standard", "premium"}
    assert set(stable["region"]) == {"north", "south", "east", "west"}
    assert set(stable["churned"].unique()) == {0, 1}
    for column in ["age", "tenure_days", "sessions", "support_tickets", "payment_failures",
                   "churned"]:
        assert stable[column].dtype == np.int64, column
    assert stable[["age", "tenure_days", "sessions", "minutes_watched"]].ge(0).all().all()
    assert stable["age"].between(18, 100).all()
    assert stable["minutes_watched"].le(1440).all()
    assert stable.notna().all().all()
    assert stable["event_timestamp"].is_monotonic_increasing
    # ~customers/7 rows a day (slightly fewer: some customers sign up later in 2026)
    per_day = stable.groupby(stable["event_timestamp"].dt.date).size()
    assert per_day.between(0.75 * 2000 / 7, 1.05 * 2000 / 7).all()


def test_each_customer_is_observed_once_a_week(stable: pd.DataFrame) -> None:
    week = stable["event_timestamp"].dt.floor("D") - pd.Timestamp(DAY0, tz="UTC")
    week_index = week.dt.days // 7
    assert not stable.assign(week=week_index).duplicated(["customer_id", "week"]).any()
    gaps = stable.groupby("customer_id")["event_timestamp"].apply(
        lambda s: s.dt.floor("D").diff().dropna().dt.days.unique().tolist()
    )
    assert all(g in ([], [7]) for g in gaps)


def test_same_seed_and_interval_give_an_identical_frame_and_digest(
    stable: pd.DataFrame,
) -> None:
    again = simulate_observations(source(), *days(56))
    pd.testing.assert_frame_equal(stable, again)
    assert frame_digest(stable) == frame_digest(again)
    other = simulate_observations(source(seed=8), *days(56))
    assert frame_digest(other) != frame_digest(stable)
    assert not other["churned"].equals(stable["churned"])


def test_overlapping_ranges_agree_on_shared_days() -> None:
    first = simulate_observations(source(), *days(20))
    second = simulate_observations(source(), *days(20, offset=10))
    shared_start = pd.Timestamp(DAY0 + dt.timedelta(days=10), tz="UTC")
    left = first[first["event_timestamp"] >= shared_start].reset_index(drop=True)
    right = second[second["event_timestamp"] < shared_start + pd.Timedelta(days=10)]
    pd.testing.assert_frame_equal(left, right.reset_index(drop=True))
    one_day = simulate_observations(source(), *days(1, offset=12))
    day12 = first[first["event_timestamp"].dt.date == DAY0 + dt.timedelta(days=12)]
    pd.testing.assert_frame_equal(one_day, day12.reset_index(drop=True))


def test_empty_range_gives_an_empty_frame_with_the_schema() -> None:
    empty = simulate_observations(source(), DAY0, DAY0)
    assert empty.empty
    assert tuple(empty.columns) == OBSERVATION_COLUMNS
    assert str(empty["event_timestamp"].dtype) == "datetime64[ns, UTC]"
    with pytest.raises(TypeError, match="dates"):
        simulate_observations(source(), dt.datetime(2026, 1, 1), dt.datetime(2026, 1, 2))
    with pytest.raises(ValueError, match="unknown scenario"):
        simulate_observations(source(), *days(1), scenario="chaos")


def test_base_churn_rate_and_directional_effects(stable: pd.DataFrame) -> None:
    assert 0.15 <= stable["churned"].mean() <= 0.25
    rate = stable.groupby(stable["support_tickets"] > 0)["churned"].mean()
    assert rate[True] > rate[False] + 0.05
    rate = stable.groupby(stable["payment_failures"] > 0)["churned"].mean()
    assert rate[True] > rate[False] + 0.1
    rate = stable.groupby(stable["sessions"] <= 1)["churned"].mean()
    assert rate[True] > rate[False] + 0.1
    rate = stable.groupby("plan")["churned"].mean()
    assert rate["basic"] > rate["standard"] > rate["premium"]
    rate = stable.groupby(stable["tenure_days"] < 180)["churned"].mean()
    assert rate[True] > rate[False]


def test_events_and_profiles_are_consistent_with_observations(stable: pd.DataFrame) -> None:
    start, end = days(14)
    observations = stable[stable["event_timestamp"] < pd.Timestamp(end, tz="UTC")]
    events = simulate_events(source(), start, end)
    assert list(events.columns) == ["customer_id", "event_timestamp", *ACTIVITY]
    event_day = events["event_timestamp"].dt.date
    assert not events.assign(day=event_day).duplicated(["customer_id", "day"]).any()
    joined = observations.merge(events, on=["customer_id", "event_timestamp"],
                                suffixes=("", "_event"), validate="one_to_one")
    assert len(joined) == len(observations)
    for column in ACTIVITY:
        assert joined[column].equals(joined[f"{column}_event"]), column
    # every signed-up customer has one event a day, ~7x the observations
    assert 6.5 < len(events) / len(observations) < 7.5

    profiles = simulate_profiles(source())
    assert len(profiles) == 2000 and profiles["customer_id"].is_unique
    merged = observations.merge(profiles, on="customer_id", suffixes=("", "_profile"))
    for column in ["plan", "region", "age", "monthly_fee"]:
        assert merged[column].equals(merged[f"{column}_profile"]), column
    tenure = (merged["event_timestamp"].dt.floor("D") - merged["signup_date"]).dt.days
    assert tenure.equals(merged["tenure_days"])


def test_covariate_drift_shifts_activity_but_not_profiles(stable: pd.DataFrame) -> None:
    drifted = simulate_observations(source(), *days(56), scenario="covariate_drift")
    ratio = drifted[ACTIVITY].mean() / stable[ACTIVITY].mean()
    assert 0.5 < ratio["sessions"] < 0.7
    assert 0.5 < ratio["minutes_watched"] < 0.7
    assert ratio["payment_failures"] > 2.0
    assert 0.9 < ratio["support_tickets"] < 1.1
    pd.testing.assert_frame_equal(drifted[["customer_id", "event_timestamp", "plan", "age"]],
                                  stable[["customer_id", "event_timestamp", "plan", "age"]])
    # the label function is unchanged, so worse inputs mean more churn
    assert drifted["churned"].mean() > stable["churned"].mean() + 0.03


def test_concept_drift_keeps_inputs_and_changes_label_rates_by_segment(
    stable: pd.DataFrame,
) -> None:
    drifted = simulate_observations(source(), *days(56), scenario="concept_drift")
    pd.testing.assert_frame_equal(drifted[INPUTS], stable[INPUTS])
    assert abs(drifted["churned"].mean() - stable["churned"].mean()) < 0.06

    def gap(frame: pd.DataFrame, segment: pd.Series) -> float:
        rates = frame.groupby(segment)["churned"].mean()
        return float(rates[True] - rates[False])

    tickets = stable["support_tickets"] > 0
    assert gap(stable, tickets) > 0.05
    assert abs(gap(drifted, tickets)) < 0.03  # tickets stopped mattering
    veterans = stable["tenure_days"] > 1200
    assert gap(stable, veterans) < -0.02
    assert gap(drifted, veterans) > 0.05  # long tenure now churns more
    premium = stable["plan"] == "premium"
    assert gap(drifted, premium) > gap(stable, premium) + 0.05  # the plan effect reversed


def test_data_quality_incident_renames_nulls_and_out_of_range(stable: pd.DataFrame) -> None:
    broken = simulate_observations(source(), *days(56), scenario="data_quality")
    assert "monthly_fee" not in broken.columns
    assert broken["monthly_charge"].equals(stable["monthly_fee"])
    assert 0.25 < broken["minutes_watched"].isna().mean() < 0.35
    assert (broken["age"] < 0).any() and (broken["sessions"] < 0).any()
    assert 0.01 < (broken["age"] < 0).mean() < 0.06
    # labels are those of the true values; only the recording broke
    assert broken["churned"].equals(stable["churned"])
    events = simulate_events(source(), *days(7), scenario="data_quality")
    assert 0.25 < events["minutes_watched"].isna().mean() < 0.35


def test_scenario_starts_on_its_day() -> None:
    start_day = DAY0 + dt.timedelta(days=14)
    spec = source(scenario="data_quality", scenario_start=start_day)
    frame = simulate_observations(spec, *days(28))
    before = frame["event_timestamp"] < pd.Timestamp(start_day, tz="UTC")
    assert frame.loc[before, "monthly_fee"].notna().all()
    assert frame.loc[before, "monthly_charge"].isna().all()
    assert frame.loc[~before, "monthly_fee"].isna().all()
    assert frame.loc[~before, "monthly_charge"].notna().all()
    assert frame.loc[before, "minutes_watched"].notna().all()
    assert frame.loc[~before, "minutes_watched"].isna().mean() > 0.2
    # before the scenario starts, the data is the stable data
    stable_part = simulate_observations(source(), *days(14))
    pd.testing.assert_frame_equal(
        frame.loc[before].drop(columns="monthly_charge").reset_index(drop=True), stable_part
    )
    # the argument overrides the spec's scenario, and scenario_start still applies
    drift = simulate_observations(spec, *days(28), scenario="covariate_drift")
    assert "monthly_charge" not in drift.columns
    late = drift["event_timestamp"] >= pd.Timestamp(start_day, tz="UTC")
    assert drift.loc[late, "sessions"].mean() < 0.75 * drift.loc[~late, "sessions"].mean()


def test_two_thousand_customers_for_120_days_is_fast() -> None:
    started = time.perf_counter()
    observations = simulate_observations(source(), *days(120))
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, elapsed
    started = time.perf_counter()
    events = simulate_events(source(), *days(120))
    assert time.perf_counter() - started < 2.0
    assert len(observations) > 25_000 and len(events) > 180_000


def test_logistic_regression_reaches_a_realistic_roc_auc_on_a_time_split() -> None:
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame = simulate_observations(source(), *days(120))
    cut = pd.Timestamp(DAY0 + dt.timedelta(days=96), tz="UTC")
    train, test = frame[frame["event_timestamp"] < cut], frame[frame["event_timestamp"] >= cut]
    numeric = ["age", "tenure_days", "monthly_fee", *ACTIVITY]
    model = make_pipeline(
        make_column_transformer((StandardScaler(), numeric),
                                (OneHotEncoder(handle_unknown="ignore"), ["plan", "region"])),
        LogisticRegression(max_iter=1000),
    )
    model.fit(train, train["churned"])
    auc = roc_auc_score(test["churned"], model.predict_proba(test)[:, 1])
    assert 0.72 <= auc <= 0.88, auc
