"""A seeded, deterministic simulator of a subscription business (the demo's data source).

The world: ``customers`` subscribers with fixed profiles (plan, region, age, signup date, a fee
set by the plan) and a hidden engagement level. Every day each signed-up customer produces one
activity event (sessions, minutes watched, support tickets, payment failures). Once a week (on a
weekday set by its id) a customer is *observed*: the observation carries the profile, the
tenure, that day's activity and whether the customer churned within the label horizon, a
Bernoulli draw whose log-odds rise with low activity, tickets, payment failures, short tenure and
the basic plan.

Determinism is per day: profiles come from an RNG seeded by ``(seed, "profiles")`` and each
variable of day ``d`` from an RNG seeded by ``(seed, d.toordinal(), variable)``, so the rows of a
day never depend on the requested range (same interval = identical frame; overlapping ranges
agree on shared days) and a scenario that changes one variable leaves the others' draws alone.

Scenarios (from ``scenario_start`` onward, or from the beginning when it is None). The spec's
``source.scenario`` and ``source.scenario_start`` define the world every reader sees (ingest,
the feature store, the traffic replayer); :func:`with_world` gives a run its own world.

- ``stable``: the world above.
- ``covariate_drift``: sessions (hence minutes) down 40 %, payment failures x3; the label
  function is unchanged. A model retrained on it is hardly better than one trained on stable
  data (on the demo's features +0.006 ROC AUC on average over 78 days tried, worse on 3 of
  them): the inputs moved, what they mean did not.
- ``concept_drift``: identical inputs; the label function changes (support tickets stop
  mattering; the tenure and plan effects are reversed: long-standing and premium customers
  churn more). A model trained on stable data drops from ROC AUC ~0.79 to ~0.70.
- ``covariate_and_concept_drift``: both at once (a market shift: the inputs move as in
  ``covariate_drift`` and the label function changes as in ``concept_drift``). Input drift
  monitoring sees it, and retraining pays: on the demo's features a model trained before it
  scores ROC AUC ~0.59 on it, a model retrained on it ~0.76.
- ``data_quality``: a recording incident: ~30 % of ``minutes_watched`` null, some negative
  sessions and ages, and ``monthly_fee`` renamed ``monthly_charge`` on the incident days. The
  labels are those of the true (clean) values.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np
import pandas as pd

from airmlops.spec import SimulatorSource

SCENARIOS = ("stable", "covariate_drift", "concept_drift", "covariate_and_concept_drift",
             "data_quality")
_COVARIATE = frozenset({"covariate_drift", "covariate_and_concept_drift"})
_CONCEPT = frozenset({"concept_drift", "covariate_and_concept_drift"})

PLANS = ("basic", "standard", "premium")
PLAN_SHARES = (0.5, 0.3, 0.2)
PLAN_FEES = (9.99, 15.99, 22.99)
PLAN_ENGAGEMENT = (0.8, 1.0, 1.25)
PLAN_CHURN_EFFECT = (0.4, 0.0, -0.4)
REGIONS = ("north", "south", "east", "west")
REGION_SHARES = (0.3, 0.25, 0.25, 0.2)

SIGNUP_EPOCH = dt.date(2026, 1, 1)
SIGNUP_WINDOW_DAYS = (-1826, 365)
"""Signups are spread from 2021-01-01 to 2026-12-31: during 2026 new customers keep joining,
so short tenures exist on every day and the tenure distribution moves only slowly."""

OBSERVATION_PERIOD_DAYS = 7

# Log-odds of churn (tuned: ~20 % churn, LogisticRegression ROC AUC ~0.8 on a time split).
CHURN_INTERCEPT = -0.85
CHURN_W_SESSIONS = 0.65
CHURN_W_MINUTES = 0.65
CHURN_W_TICKETS = 0.6
CHURN_TICKETS_CENTER = 0.2  # ~mean tickets a day: dropping the effect keeps the base rate
CHURN_W_FAILURES = 0.9
CHURN_W_TENURE = 0.42
CHURN_TENURE_CENTER = 3.2  # ~mean log1p(tenure / 30): reversing the effect keeps the base rate
CHURN_W_ENGAGEMENT = 0.6
CHURN_W_AGE = 0.01

CONCEPT_DRIFT_TENURE = 0.8
COVARIATE_DRIFT_SESSIONS = 0.6
COVARIATE_DRIFT_FAILURES = 3.0
DATA_QUALITY_NULL_SHARE = 0.3
DATA_QUALITY_NEGATIVE_SHARE = 0.03

OBSERVATION_COLUMNS = (
    "customer_id", "event_timestamp", "plan", "region", "age", "tenure_days", "monthly_fee",
    "sessions", "minutes_watched", "support_tickets", "payment_failures", "churned",
)
EVENT_COLUMNS = (
    "customer_id", "event_timestamp", "sessions", "minutes_watched", "support_tickets",
    "payment_failures",
)
RENAMED_FEE_COLUMN = "monthly_charge"

_PROFILE_STREAM = 0x5052_4F46  # "PROF": keeps the profile RNG apart from every day's RNG
_SESSIONS, _MINUTES, _TICKETS, _FAILURES, _SECONDS, _CHURN, _QUALITY = range(7)


@dataclass(frozen=True)
class _Profiles:
    customer_id: np.ndarray  # str objects
    plan: np.ndarray  # index into PLANS
    region: np.ndarray  # index into REGIONS
    age: np.ndarray
    signup_ordinal: np.ndarray
    engagement: np.ndarray  # hidden
    ticket_rate: np.ndarray  # hidden
    failure_rate: np.ndarray  # hidden


def _profiles(source: SimulatorSource) -> _Profiles:
    rng = np.random.default_rng([source.seed, _PROFILE_STREAM])
    n = source.customers
    plan = rng.choice(len(PLANS), size=n, p=PLAN_SHARES)
    region = rng.choice(len(REGIONS), size=n, p=REGION_SHARES)
    age = np.clip(np.rint(rng.normal(40.0, 12.0, n)), 18, 85).astype(np.int64)
    signup_offset = rng.integers(SIGNUP_WINDOW_DAYS[0], SIGNUP_WINDOW_DAYS[1], n, endpoint=True)
    engagement = rng.gamma(2.0, 0.5, n) * np.asarray(PLAN_ENGAGEMENT)[plan]
    ticket_rate = 0.08 + 0.12 * rng.gamma(1.0, 1.0, n)
    failure_rate = rng.gamma(0.5, 0.12, n)
    width = len(str(max(n - 1, 999_999)))
    ids = np.array([f"C{i:0{width}d}" for i in range(n)], dtype=object)
    return _Profiles(
        customer_id=ids, plan=plan, region=region, age=age,
        signup_ordinal=SIGNUP_EPOCH.toordinal() + signup_offset,
        engagement=engagement, ticket_rate=ticket_rate, failure_rate=failure_rate,
    )


def _check_scenario(scenario: str) -> str:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {list(SCENARIOS)}")
    return scenario


def _scenario_on(day: dt.date, source: SimulatorSource, scenario: str | None) -> str:
    """The scenario in force on ``day``: the chosen one from ``scenario_start`` on."""
    chosen = _check_scenario(scenario or source.scenario)
    if source.scenario_start is not None and day < source.scenario_start:
        return "stable"
    return chosen


def scenario_on(source: SimulatorSource, day: dt.date, scenario: str | None = None) -> str:
    """The scenario of ``source``'s world on ``day`` (``scenario`` replaces the source's own;
    ``source.scenario_start`` still applies): what ingest, the feature store and the replayer
    all see on that day."""
    return _scenario_on(day, source, scenario)


def with_world(source: SimulatorSource, scenario: str | None = None,
               scenario_start: dt.date | None = None) -> SimulatorSource:
    """``source`` with its world replaced: ``scenario`` and/or ``scenario_start`` (each kept
    when None). Every reader given the result agrees on the world, day by day."""
    update: dict[str, object] = {}
    if scenario is not None:
        update["scenario"] = _check_scenario(scenario)
    if scenario_start is not None:
        if isinstance(scenario_start, dt.datetime) or not isinstance(scenario_start, dt.date):
            raise TypeError(f"scenario_start must be a date, got {scenario_start!r}")
        update["scenario_start"] = scenario_start
    return source.model_copy(update=update) if update else source


def _days(start: dt.date, end: dt.date) -> list[dt.date]:
    if isinstance(start, dt.datetime) or isinstance(end, dt.datetime):
        raise TypeError("start and end are dates (days in [start, end)), not datetimes")
    return [start + dt.timedelta(days=i) for i in range((end - start).days)]


def _churn_logit(profiles: _Profiles, sessions: np.ndarray, minutes: np.ndarray,
                 tickets: np.ndarray, failures: np.ndarray, tenure: np.ndarray,
                 concept_drift: bool) -> np.ndarray:
    tenure_term = np.log1p(np.maximum(tenure, 0) / 30.0) - CHURN_TENURE_CENTER
    logit = (
        CHURN_INTERCEPT
        - CHURN_W_SESSIONS * np.log1p(sessions)
        - CHURN_W_MINUTES * np.log1p(minutes) / 3.0
        + CHURN_W_FAILURES * failures
        - CHURN_W_ENGAGEMENT * np.log(profiles.engagement)
        + CHURN_W_AGE * (profiles.age - 40)
    )
    plan_effect = np.asarray(PLAN_CHURN_EFFECT)[profiles.plan]
    if concept_drift:
        # Tickets stop mattering; the tenure and plan effects are reversed (and stronger).
        return logit - plan_effect + CONCEPT_DRIFT_TENURE * tenure_term
    ticket_term = tickets - CHURN_TICKETS_CENTER
    return logit + plan_effect + CHURN_W_TICKETS * ticket_term - CHURN_W_TENURE * tenure_term


@dataclass
class _Day:
    """All customers' activity (and would-be observation) on one day, before selection."""

    ordinal: int
    scenario: str
    active: np.ndarray
    observed: np.ndarray
    timestamp_ns: np.ndarray
    sessions: np.ndarray
    minutes: np.ndarray
    tickets: np.ndarray
    failures: np.ndarray
    tenure: np.ndarray
    age: np.ndarray
    churned: np.ndarray


def _simulate_day(source: SimulatorSource, profiles: _Profiles, day: dt.date,
                  scenario: str) -> _Day:
    n = source.customers
    ordinal = day.toordinal()

    def rng(stream: int) -> np.random.Generator:
        return np.random.default_rng([source.seed, ordinal, stream])

    weekend = 1.2 if day.weekday() >= 5 else 1.0
    session_scale = COVARIATE_DRIFT_SESSIONS if scenario in _COVARIATE else 1.0
    failure_scale = COVARIATE_DRIFT_FAILURES if scenario in _COVARIATE else 1.0

    sessions = rng(_SESSIONS).poisson(3.0 * profiles.engagement * weekend * session_scale)
    per_session = rng(_MINUTES).gamma(2.0, 12.0, n)
    minutes = np.round(np.minimum(sessions * per_session, 1440.0), 1)
    tickets = rng(_TICKETS).poisson(profiles.ticket_rate)
    failures = rng(_FAILURES).poisson(profiles.failure_rate * failure_scale)
    seconds = rng(_SECONDS).integers(0, 86_400, n)
    tenure = ordinal - profiles.signup_ordinal
    logit = _churn_logit(profiles, sessions, minutes, tickets, failures, tenure,
                         concept_drift=scenario in _CONCEPT)
    churned = (rng(_CHURN).random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)

    age = profiles.age
    if scenario == "data_quality":
        quality = rng(_QUALITY)
        minutes = np.where(quality.random(n) < DATA_QUALITY_NULL_SHARE, np.nan, minutes)
        sessions = np.where(quality.random(n) < DATA_QUALITY_NEGATIVE_SHARE, -sessions - 1,
                            sessions)
        age = np.where(quality.random(n) < DATA_QUALITY_NEGATIVE_SHARE, -age, age)

    active = tenure >= 0
    observed = active & ((ordinal + np.arange(n)) % OBSERVATION_PERIOD_DAYS == 0)
    day_ns = pd.Timestamp(day).value
    return _Day(
        ordinal=ordinal, scenario=scenario, active=active, observed=observed,
        timestamp_ns=day_ns + seconds * 1_000_000_000, sessions=sessions.astype(np.int64),
        minutes=minutes.astype(np.float64), tickets=tickets.astype(np.int64),
        failures=failures.astype(np.int64), tenure=tenure.astype(np.int64),
        age=np.asarray(age, dtype=np.int64), churned=churned,
    )


def _select(day: _Day, mask: np.ndarray) -> np.ndarray:
    """Indices of the selected customers, ordered by (timestamp, customer)."""
    index = np.flatnonzero(mask)
    return index[np.argsort(day.timestamp_ns[index], kind="stable")]


def _timestamps(ns: np.ndarray) -> pd.DatetimeIndex:
    return pd.DatetimeIndex(ns.astype("datetime64[ns]")).tz_localize("UTC")


def simulate_observations(source: SimulatorSource, start: dt.date, end: dt.date,
                          scenario: str | None = None) -> pd.DataFrame:
    """Labelled observations for the days in ``[start, end)``, ordered by time then customer.

    ``scenario`` overrides the source's scenario (``scenario_start`` still applies). On
    ``data_quality`` days the fee column is called ``monthly_charge``; a range that spans the
    incident start has both columns, each null on the other's days.
    """
    profiles = _profiles(source)
    columns: dict[str, list[np.ndarray]] = {name: [] for name in OBSERVATION_COLUMNS}
    columns[RENAMED_FEE_COLUMN] = []
    renamed_seen = fee_seen = False
    fees = np.asarray(PLAN_FEES)[profiles.plan]
    for day in _days(start, end):
        daily = _simulate_day(source, profiles, day, _scenario_on(day, source, scenario))
        idx = _select(daily, daily.observed)
        renamed = daily.scenario == "data_quality"
        renamed_seen |= renamed
        fee_seen |= not renamed
        nulls = np.full(len(idx), np.nan)
        columns["customer_id"].append(profiles.customer_id[idx])
        columns["event_timestamp"].append(daily.timestamp_ns[idx])
        columns["plan"].append(profiles.plan[idx])
        columns["region"].append(profiles.region[idx])
        columns["age"].append(daily.age[idx])
        columns["tenure_days"].append(daily.tenure[idx])
        columns["monthly_fee"].append(nulls if renamed else fees[idx])
        columns[RENAMED_FEE_COLUMN].append(fees[idx] if renamed else nulls)
        columns["sessions"].append(daily.sessions[idx])
        columns["minutes_watched"].append(daily.minutes[idx])
        columns["support_tickets"].append(daily.tickets[idx])
        columns["payment_failures"].append(daily.failures[idx])
        columns["churned"].append(daily.churned[idx])

    def joined(name: str, dtype: str) -> np.ndarray:
        parts = columns[name]
        return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

    frame = pd.DataFrame({
        "customer_id": joined("customer_id", "object"),
        "event_timestamp": _timestamps(joined("event_timestamp", "int64")),
        "plan": np.asarray(PLANS, dtype=object)[joined("plan", "int64")],
        "region": np.asarray(REGIONS, dtype=object)[joined("region", "int64")],
        "age": joined("age", "int64"),
        "tenure_days": joined("tenure_days", "int64"),
        "monthly_fee": joined("monthly_fee", "float64"),
        "sessions": joined("sessions", "int64"),
        "minutes_watched": joined("minutes_watched", "float64"),
        "support_tickets": joined("support_tickets", "int64"),
        "payment_failures": joined("payment_failures", "int64"),
        "churned": joined("churned", "int64"),
    })
    if renamed_seen:
        position = frame.columns.get_loc("monthly_fee")
        frame.insert(position + 1, RENAMED_FEE_COLUMN, joined(RENAMED_FEE_COLUMN, "float64"))
        if not fee_seen:
            frame = frame.drop(columns="monthly_fee")
    return frame


def simulate_events(source: SimulatorSource, start: dt.date, end: dt.date,
                    scenario: str | None = None) -> pd.DataFrame:
    """The daily activity event of every signed-up customer for each day in ``[start, end)``.

    An observation's activity columns equal its customer's event of that day (same timestamp),
    including a ``data_quality`` incident's nulls and negative sessions.
    """
    profiles = _profiles(source)
    ids, stamps, sessions, minutes, tickets, failures = [], [], [], [], [], []
    for day in _days(start, end):
        daily = _simulate_day(source, profiles, day, _scenario_on(day, source, scenario))
        idx = _select(daily, daily.active)
        ids.append(profiles.customer_id[idx])
        stamps.append(daily.timestamp_ns[idx])
        sessions.append(daily.sessions[idx])
        minutes.append(daily.minutes[idx])
        tickets.append(daily.tickets[idx])
        failures.append(daily.failures[idx])

    def joined(parts: list[np.ndarray], dtype: str) -> np.ndarray:
        return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)

    return pd.DataFrame({
        "customer_id": joined(ids, "object"),
        "event_timestamp": _timestamps(joined(stamps, "int64")),
        "sessions": joined(sessions, "int64"),
        "minutes_watched": joined(minutes, "float64"),
        "support_tickets": joined(tickets, "int64"),
        "payment_failures": joined(failures, "int64"),
    })


def simulate_profiles(source: SimulatorSource) -> pd.DataFrame:
    """Every customer's fixed profile (including customers whose signup is still ahead).

    ``tenure_days`` of an observation on day ``d`` is ``d - signup_date`` in days.
    """
    profiles = _profiles(source)
    days_after_epoch = (profiles.signup_ordinal - SIGNUP_EPOCH.toordinal()).astype("timedelta64[D]")
    signup = (np.datetime64(SIGNUP_EPOCH, "D") + days_after_epoch).astype("datetime64[ns]")
    return pd.DataFrame({
        "customer_id": profiles.customer_id,
        "signup_date": pd.DatetimeIndex(signup).tz_localize("UTC"),
        "plan": np.asarray(PLANS, dtype=object)[profiles.plan],
        "region": np.asarray(REGIONS, dtype=object)[profiles.region],
        "age": profiles.age,
        "monthly_fee": np.asarray(PLAN_FEES)[profiles.plan],
    })
