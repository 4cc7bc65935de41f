"""The online store: one test body per behaviour, run on SQLite and on a real Redis server.

Also materialization (idempotent, incremental) and the online/offline parity check on the demo
simulator's data.
"""

from __future__ import annotations

import datetime as dt
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import redis

from airmlops.features.compute import compute_view, datetime_to_epoch_us
from airmlops.features.definitions import FEATURE_TIMESTAMP, FeatureSet
from airmlops.features.materialize import (
    WATERMARKS_FILE,
    materialize,
    read_watermarks,
    store_location,
)
from airmlops.features.offline import get_historical_features, read_view_rows, write_view_rows
from airmlops.features.online import (
    OnlineStore,
    RedisOnlineStore,
    SqliteOnlineStore,
    decode_value,
    encode_value,
    make_online_store,
)
from airmlops.features.parity import check_parity
from airmlops.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from redis_fixture import redis_server  # noqa: F401  (a session fixture)

pytestmark = pytest.mark.integration

FEATURES = FeatureSet.model_validate({
    "entities": [{"name": "customer", "join_key": "customer_id"}],
    "request_fields": ["event_timestamp"],
    "views": [
        {"name": "activity", "entity": "customer", "source": "events", "ttl_days": 2,
         "aggregations": [
             {"column": "sessions", "function": "sum", "window_days": 7},
             {"column": "minutes_watched", "function": "sum", "window_days": 7},
             {"column": "minutes_watched", "function": "mean", "window_days": 30},
             {"column": "support_tickets", "function": "count", "window_days": 30},
             {"column": "payment_failures", "function": "max", "window_days": 7},
             {"column": "sessions", "function": "last", "window_days": 3},
         ]},
        {"name": "profile", "entity": "customer", "source": "profiles", "ttl_days": 60,
         "columns": ["plan", "region", "age", "monthly_fee"]},
        {"name": "extra", "entity": "customer", "source": "profiles", "ttl_days": 60,
         "columns": ["note", "active", "visits"]},
    ],
    "on_demand": [
        {"name": "minutes_per_session", "function": "minutes_per_session",
         "inputs": ["activity__minutes_watched_sum_7d", "activity__sessions_sum_7d"]},
        {"name": "fee_per_minute", "function": "fee_per_minute",
         "inputs": ["profile__monthly_fee", "activity__minutes_watched_sum_7d"]},
        {"name": "weekend", "function": "is_weekend_request", "inputs": ["event_timestamp"]},
    ],
})
ACTIVITY, PROFILE, EXTRA = FEATURES.views
_namespaces = itertools.count()


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> OnlineStore:
    namespace = f"t{next(_namespaces)}"  # every test sees only its own rows
    if request.param == "redis":
        backend: OnlineStore = RedisOnlineStore(request.getfixturevalue("redis_server"),
                                                namespace)
    else:
        backend = SqliteOnlineStore(tmp_path / "online" / "store.sqlite", namespace)
    yield backend
    backend.close()


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)


def profile_row(customer: object, when: str, **values: object) -> dict:
    return {"customer_id": customer, FEATURE_TIMESTAMP: at(when),
            **{f"profile__{k}": v for k, v in values.items()}}


def test_values_come_back_typed(store: OnlineStore) -> None:
    frame = pd.DataFrame({
        "customer_id": [1, 2],
        FEATURE_TIMESTAMP: pd.to_datetime(["2026-01-05 10:00", "2026-01-05 11:00"], utc=True),
        "extra__note": ["käse: 100% \"ok\"", ""],
        "extra__active": np.array([True, False]),
        "extra__visits": np.array([2**53 + 1, -3], dtype=np.int64),
    })
    assert store.write(EXTRA, frame) == 2
    rows = [profile_row(1, "2026-01-05 09:00", plan="basic", region=None, age=np.int64(41),
                        monthly_fee=0.1 + 0.2),
            profile_row("x:1", "2026-01-05 09:00", plan="premium", region="north",
                        age=30, monthly_fee=float("nan"))]
    assert store.write(PROFILE, rows) == 2

    result = store.read([PROFILE, EXTRA], [1, 2, "x:1"])
    assert result.missing == []
    one = result[1]
    assert one == {
        "profile__plan": "basic", "profile__region": None, "profile__age": 41,
        "profile__monthly_fee": 0.1 + 0.2,
        "extra__note": "käse: 100% \"ok\"", "extra__active": True, "extra__visits": 2**53 + 1,
    }
    assert type(one["profile__age"]) is int and type(one["extra__active"]) is bool
    assert result[2]["extra__note"] == "" and result[2]["extra__active"] is False
    assert result[2]["profile__plan"] is None  # no profile row for 2
    assert result["x:1"]["profile__monthly_fee"] is None  # NaN is stored as missing
    assert result.event_ts[1]["extra"] == datetime_to_epoch_us(at("2026-01-05 10:00"))


def test_writes_are_monotonic(store: OnlineStore) -> None:
    assert store.write(PROFILE, [profile_row(7, "2026-01-05 10:00", plan="basic",
                                             monthly_fee=10.0)]) == 1
    older = profile_row(7, "2026-01-05 09:00", plan="old", monthly_fee=1.0)
    assert store.write(PROFILE, [older]) == 0
    same_time = profile_row(7, "2026-01-05 10:00", plan="again", monthly_fee=2.0)
    assert store.write(PROFILE, [same_time]) == 0
    assert store.read([PROFILE], [7])[7]["profile__plan"] == "basic"
    # In one batch, out of order: the newest wins whatever the order.
    batch = [profile_row(7, "2026-01-06 10:00", plan="premium", monthly_fee=None),
             profile_row(7, "2026-01-05 12:00", plan="standard", monthly_fee=15.0)]
    assert store.write(PROFILE, batch) == 1
    newest = store.read([PROFILE], [7])[7]
    assert newest["profile__plan"] == "premium"
    assert newest["profile__monthly_fee"] is None  # a value that became missing does not linger


def test_keys_expire_after_the_ttl(store: OnlineStore) -> None:
    row = profile_row(3, "2026-01-05 10:00", plan="basic")
    assert store.write(PROFILE, [row], ttl_seconds=1) == 1
    assert not store.read([PROFILE], [3]).missing
    time.sleep(2.2)
    result = store.read([PROFILE], [3])
    assert result.missing == [3] and result[3]["profile__plan"] is None
    # Once expired, even an older row is accepted again.
    assert store.write(PROFILE, [profile_row(3, "2026-01-04 10:00", plan="old")]) == 1
    assert store.read([PROFILE], [3])[3]["profile__plan"] == "old"


def test_as_of_applies_the_same_ttl_rule_as_the_offline_store(store: OnlineStore) -> None:
    store.write(ACTIVITY, [{"customer_id": 5, FEATURE_TIMESTAMP: at("2026-01-05 23:59:59"),
                            "activity__sessions_sum_7d": 4}])
    assert store.read([ACTIVITY], [5], as_of=at("2026-01-07 23:59:58"))[5][
        "activity__sessions_sum_7d"] == 4
    late = store.read([ACTIVITY], [5], as_of=at("2026-01-07 23:59:59"))  # exactly 2 days old
    assert late.missing == [5]


def count_round_trips(store: OnlineStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count what really crosses to the server: packed sends (Redis) or statements (SQLite)."""
    calls = [0]
    if isinstance(store, RedisOnlineStore):
        real = redis.connection.AbstractConnection.send_packed_command

        def counted(self, *args, **kwargs):
            calls[0] += 1
            return real(self, *args, **kwargs)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    else:
        store._db.set_trace_callback(lambda statement: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_a_batch_read_of_all_views_is_one_round_trip(
    store: OnlineStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = list(range(120))
    stamp = pd.Timestamp("2026-01-05 10:00", tz="UTC")
    store.write(PROFILE, pd.DataFrame({"customer_id": ids, FEATURE_TIMESTAMP: stamp,
                                       "profile__age": ids}))
    store.write(EXTRA, pd.DataFrame({"customer_id": ids[::2], FEATURE_TIMESTAMP: stamp,
                                     "extra__visits": ids[::2]}))
    store.write(ACTIVITY, pd.DataFrame({"customer_id": ids[::3], FEATURE_TIMESTAMP: stamp,
                                        "activity__sessions_sum_7d": 1.5}))
    store.read([PROFILE], [0])  # connects (Redis: the client's handshake is not a read)
    calls = count_round_trips(store, monkeypatch)
    before = store.round_trips
    result = store.read([ACTIVITY, PROFILE, EXTRA], [*ids, "ghost"])
    assert store.round_trips - before == 1
    assert calls[0] == 1
    assert result.missing == ["ghost"]
    for i in ids:
        row = result[i]
        assert row["profile__age"] == i
        assert row["extra__visits"] == (i if i % 2 == 0 else None)
        assert row["activity__sessions_sum_7d"] == (1.5 if i % 3 == 0 else None)
        assert len(row) == len(ACTIVITY.feature_names + PROFILE.feature_names
                               + EXTRA.feature_names)
    single = store.read([ACTIVITY, PROFILE, EXTRA], [3])
    assert calls[0] == 2 and single[3]["profile__age"] == 3


def test_an_unknown_entity_is_a_result_not_an_exception(store: OnlineStore) -> None:
    store.write(PROFILE, [profile_row(1, "2026-01-05 10:00", plan="basic")])
    result = store.read([PROFILE, EXTRA], [1, 99, 1])
    assert result.missing == [99]
    assert result.is_unknown(99) and not result.is_unknown(1)
    assert result[99] == dict.fromkeys(PROFILE.feature_names + EXTRA.feature_names)
    assert result.event_ts[99] == {"profile": None, "extra": None}
    assert result.event_ts[1]["extra"] is None  # known, but not in every view
    assert list(result.values) == [1, 99]
    empty = store.read([PROFILE], [])
    assert empty.values == {} and empty.missing == []


def events_for(days: range, customers: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for day in days:
        for customer in range(customers):
            if rng.random() < 0.8:
                rows.append({
                    "customer_id": customer,
                    "event_timestamp": pd.Timestamp("2026-01-01", tz="UTC")
                    + pd.Timedelta(days=day, seconds=int(rng.integers(0, 86_400))),
                    "sessions": int(rng.integers(0, 6)),
                    "minutes_watched": float(rng.gamma(2, 20)),
                    "support_tickets": int(rng.integers(0, 2)),
                    "payment_failures": int(rng.integers(0, 2)),
                    "plan": str(rng.choice(["basic", "premium"])),
                    "region": "north",
                    "age": int(rng.integers(18, 80)),
                    "monthly_fee": 9.99,
                })
    return pd.DataFrame(rows)


def build_offline(events: pd.DataFrame, root: Path, start: dt.date, end: dt.date) -> None:
    for view in (ACTIVITY, PROFILE):
        rows = compute_view(events, view, timestamp_column="event_timestamp", start=start,
                            end=end)
        days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
        write_view_rows(rows, view, root, "churn", days=days)


def test_materialization_is_incremental_and_idempotent(store: OnlineStore, tmp_path: Path) -> None:
    root = tmp_path / "data"
    events = events_for(range(0, 5), customers=30)
    build_offline(events, root, dt.date(2026, 1, 1), dt.date(2026, 1, 5))

    first = materialize([ACTIVITY, PROFILE], root, "churn", store)
    offline_rows = {v.name: len(read_view_rows(v, root, "churn")) for v in (ACTIVITY, PROFILE)}
    assert first["activity"].rows_read == offline_rows["activity"]
    assert first["profile"].rows_read == offline_rows["profile"] == len(events)
    assert first["activity"].rows_written == events["customer_id"].nunique()
    assert first["profile"].rows_written == events["customer_id"].nunique()
    marks = read_watermarks(root, "churn")[store_location(store)]
    assert marks["activity"] == datetime_to_epoch_us(at("2026-01-05 23:59:59.999999"))
    assert (root / "features" / "churn" / WATERMARKS_FILE).is_file()

    again = materialize([ACTIVITY, PROFILE], root, "churn", store)
    assert [(r.rows_read, r.rows_written) for r in again.values()] == [(0, 0), (0, 0)]

    # New data for day 6, for five customers: only the new offline rows are read and written.
    newer = events_for(range(5, 6), customers=5, seed=9)
    build_offline(pd.concat([events, newer], ignore_index=True), root, dt.date(2026, 1, 6),
                  dt.date(2026, 1, 6))
    day6 = {v.name: read_view_rows(v, root, "churn", start=dt.date(2026, 1, 6))
            for v in (ACTIVITY, PROFILE)}
    third = materialize([ACTIVITY, PROFILE], root, "churn", store)
    assert third["profile"].rows_read == len(newer) == len(day6["profile"])
    assert third["profile"].rows_written == newer["customer_id"].nunique()
    assert third["activity"].rows_read == len(day6["activity"])  # every customer still in reach
    assert third["activity"].rows_written == day6["activity"]["customer_id"].nunique()

    # The store now holds each entity's newest offline row.
    latest = read_view_rows(PROFILE, root, "churn").groupby("customer_id").last()
    online = store.read([PROFILE], list(latest.index))
    assert {c: online[c]["profile__age"] for c in latest.index} == latest["profile__age"].to_dict()


def test_a_bounded_run_stops_at_its_end(store: OnlineStore, tmp_path: Path) -> None:
    root = tmp_path / "data"
    build_offline(events_for(range(0, 4), customers=10), root, dt.date(2026, 1, 1),
                  dt.date(2026, 1, 4))
    until_day2 = materialize([ACTIVITY], root, "churn", store, end=at("2026-01-03 00:00"))
    assert until_day2["activity"].watermark == "2026-01-02T23:59:59.999999+00:00"
    rest = materialize([ACTIVITY], root, "churn", store)
    assert rest["activity"].rows_read == len(read_view_rows(ACTIVITY, root, "churn",
                                                            start=dt.date(2026, 1, 3)))
    assert rest["activity"].watermark == "2026-01-04T23:59:59.999999+00:00"


def demo_data(start: dt.date, end: dt.date) -> tuple[pd.DataFrame, pd.DataFrame]:
    from airmlops.data.simulator import simulate_events, simulate_observations
    from airmlops.spec import SimulatorSource

    source = SimulatorSource(kind="simulator", customers=300, seed=7)
    return simulate_events(source, start, end), simulate_observations(source, start, end)


def test_online_path_equals_offline_point_in_time_values(store: OnlineStore,
                                                        tmp_path: Path) -> None:
    root = tmp_path / "data"
    start, end = dt.date(2026, 1, 1), dt.date(2026, 2, 10)
    events, observations = demo_data(start, end)
    write_view_rows(compute_view(events, ACTIVITY, timestamp_column="event_timestamp"),
                    ACTIVITY, root, "churn")
    write_view_rows(compute_view(observations, PROFILE, timestamp_column="event_timestamp"),
                    PROFILE, root, "churn")
    materialize([ACTIVITY, PROFILE], root, "churn", store)

    as_of = dt.datetime.combine(end, dt.time(6, 30), tzinfo=dt.UTC)
    customers = sorted(events["customer_id"].unique())
    sample = pd.DataFrame({"customer_id": [*customers[::3], "C999999"]})
    views, on_demand = [ACTIVITY, PROFILE], FEATURES.on_demand
    report = check_parity(sample, views, on_demand, root, "churn", store, as_of)
    assert report.ok, report.to_dict()
    assert report.rows == len(sample)
    assert len(report.features) == len(ACTIVITY.feature_names + PROFILE.feature_names) + 3

    # The comparison is not vacuous: the offline values are mostly present ...
    offline = get_historical_features(sample.assign(event_timestamp=as_of), views, root,
                                      "churn", on_demand=on_demand)
    assert offline["activity__sessions_sum_7d"].notna().mean() > 0.9
    assert offline["profile__plan"].notna().mean() > 0.5
    assert offline["minutes_per_session"].notna().any()

    # ... and a changed online value is caught.
    victim = customers[0]
    store.write(ACTIVITY, [{"customer_id": victim, FEATURE_TIMESTAMP: as_of - dt.timedelta(hours=1),
                            "activity__sessions_sum_7d": -1}])
    broken = check_parity(sample, views, on_demand, root, "churn", store, as_of)
    wrong = {(m.entity["customer_id"], m.feature) for m in broken.mismatches}
    assert (victim, "activity__sessions_sum_7d") in wrong
    assert (victim, "minutes_per_session") in wrong
    assert all(customer == victim for customer, _ in wrong)


def test_make_online_store_picks_the_backend(redis_server: str, tmp_path: Path) -> None:  # noqa: F811
    with make_online_store(Settings(data_root=tmp_path, redis_url=None), "churn") as embedded:
        assert isinstance(embedded, SqliteOnlineStore)
        assert embedded.path == tmp_path / "online" / "store.sqlite"
        assert embedded.path.is_file()
    with make_online_store(Settings(data_root=tmp_path, redis_url=redis_server),
                           "churn") as remote:
        assert isinstance(remote, RedisOnlineStore)
        assert remote.key(PROFILE, 7) == "airmlops:churn:profile:7"
        assert store_location(remote) == redis_server
    with pytest.raises(ValueError, match="must start with"):
        RedisOnlineStore("http://127.0.0.1:6379", "churn")
    with pytest.raises(ValueError, match="does not match"):
        SqliteOnlineStore(tmp_path / "x.sqlite", "Bad Name")


def test_redis_replies_are_parsed_by_hiredis_here_and_in_model_images(
    redis_server: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The lock installs hiredis (redis-py's C reply parser) and the bento pins it, so online
    reads in tasks and in model containers do not parse replies in Python; without it the
    store says so once it opens."""
    from importlib import metadata

    import redis.utils

    from airmlops.serving.bento import service_requirements

    with RedisOnlineStore(redis_server, "churn") as store:
        connection = store._client.connection_pool.make_connection()
        assert type(connection._parser).__name__ == "_HiredisParser"
        connection.disconnect()
    assert f"hiredis=={metadata.version('hiredis')}" in service_requirements()
    monkeypatch.setattr(redis.utils, "HIREDIS_AVAILABLE", False)
    with caplog.at_level("WARNING", logger="airmlops.features.online"):
        RedisOnlineStore(redis_server, "churn").close()
    assert "hiredis is not installed" in caplog.text


def test_redis_reads_stay_in_step_after_an_error_reply_and_without_hiredis(
    redis_server: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A key of the wrong type makes one HMGET of a batch fail: the read raises Redis' error
    after reading every reply, so the next read on the same connection is right. The plain
    reply path (no hiredis reader) returns the same values as the hiredis one."""
    from airmlops.features import online as online_module

    with RedisOnlineStore(redis_server, "instep") as store:
        store.write(PROFILE, [profile_row(c, "2026-01-05 10:00", age=c) for c in (1, 2, 3)])
        expected = store.read([PROFILE, EXTRA], [1, 2, 3, 4]).values
        other_client = redis.Redis.from_url(redis_server)
        other_client.set(store.key(PROFILE, 2), "not a hash")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            store.read([PROFILE, EXTRA], [1, 2, 3])
        assert store.read([PROFILE], [3])[3]["profile__age"] == 3
        assert len(store._idle) == 1  # the connection was kept: it is in step
        other_client.delete(store.key(PROFILE, 2))
        store.write(PROFILE, [profile_row(2, "2026-01-05 10:00", age=2)])
        monkeypatch.setattr(online_module, "_hiredis_marker", lambda: None)
        assert store.read([PROFILE, EXTRA], [1, 2, 3, 4]).values == expected


def test_the_redis_encoding_round_trips() -> None:
    for value in (None, True, False, 0, -7, 2**62, 0.1 + 0.2, -1e-300, 1e300, "", "a:b ü"):
        assert decode_value(encode_value(value).encode() or None) == value
    assert encode_value(float("nan")) == "fnan"  # python_value() turns NaN into None first
    with pytest.raises(ValueError, match="unknown online value encoding"):
        decode_value(b"x1")


def test_sqlite_expiry_follows_its_clock_and_purges(tmp_path: Path) -> None:
    now = [1_000_000.0]
    with SqliteOnlineStore(tmp_path / "s.sqlite", "churn", clock=lambda: now[0]) as embedded:
        embedded.write(PROFILE, [profile_row(1, "2026-01-05 10:00", plan="basic")],
                       ttl_seconds=60)
        now[0] += 59
        assert not embedded.read([PROFILE], [1]).missing
        now[0] += 1
        assert embedded.read([PROFILE], [1]).missing == [1]
        assert embedded.purge_expired() == 1
        assert embedded.location == f"sqlite:{(tmp_path / 's.sqlite').resolve()}"
