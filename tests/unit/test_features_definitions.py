"""Feature definitions: validation, stable feature names, the definitions hash."""

from __future__ import annotations

import copy

import pytest
from pydantic import ValidationError

from airmlops.features.definitions import (
    FEATURE_TIMESTAMP,
    Aggregation,
    Entity,
    FeatureSet,
    FeatureView,
    OnDemandFeature,
)

SPEC = {
    "entities": [{"name": "customer", "join_key": "customer_id"}],
    "request_fields": ["event_timestamp"],
    "views": [
        {
            "name": "activity",
            "entity": "customer",
            "source": "events",
            "ttl_days": 2,
            "aggregations": [
                {"column": "sessions", "function": "sum", "window_days": 7},
                {"column": "sessions", "function": "count", "window_days": 30},
                {"column": "minutes_watched", "function": "sum", "window_days": 7},
            ],
        },
        {
            "name": "profile",
            "entity": "customer",
            "source": "profiles",
            "ttl_days": 400,
            "columns": ["plan", "monthly_fee"],
        },
    ],
    "on_demand": [
        {
            "name": "minutes_per_session",
            "function": "minutes_per_session",
            "inputs": ["activity__minutes_watched_sum_7d", "activity__sessions_sum_7d"],
        },
        {"name": "weekend", "function": "is_weekend_request", "inputs": ["event_timestamp"]},
    ],
}


def spec(**changes: object) -> dict:
    data = copy.deepcopy(SPEC)
    data.update(changes)
    return data


def error_text(data: dict) -> str:
    with pytest.raises(ValidationError) as caught:
        FeatureSet.model_validate(data)
    return str(caught.value)


def test_a_valid_set_resolves_entities_and_names_features_stably() -> None:
    features = FeatureSet.model_validate(spec())
    activity, profile = features.views
    assert activity.entity == Entity(name="customer", join_key="customer_id")
    assert activity.join_key == "customer_id"
    assert activity.feature_names == [
        "activity__sessions_sum_7d",
        "activity__sessions_count_30d",
        "activity__minutes_watched_sum_7d",
    ]
    assert profile.feature_names == ["profile__plan", "profile__monthly_fee"]
    assert activity.source_columns == ["sessions", "minutes_watched"]
    assert activity.max_window_days == 30
    assert activity.ttl_seconds == 2 * 86_400
    assert features.feature_names[-2:] == ["minutes_per_session", "weekend"]
    assert features.view("profile") is profile
    assert features.select_views(["profile"]) == [profile]
    with pytest.raises(KeyError, match="no feature view 'nope'"):
        features.view("nope")


def test_definitions_round_trip_through_a_dump() -> None:
    features = FeatureSet.model_validate(spec())
    again = FeatureSet.model_validate(features.model_dump(mode="json"))
    assert again == features
    assert again.definitions_hash() == features.definitions_hash()


def test_models_are_frozen_and_strict() -> None:
    features = FeatureSet.model_validate(spec())
    with pytest.raises(ValidationError):
        features.views[0].ttl_days = 5  # type: ignore[misc]
    data = spec()
    data["views"][0]["window"] = 3
    assert "window" in error_text(data)


def test_the_hash_ignores_key_order_and_changes_with_any_definition() -> None:
    base = FeatureSet.model_validate(spec()).definitions_hash()
    reordered = {key: SPEC[key] for key in reversed(list(SPEC))}
    assert FeatureSet.model_validate(copy.deepcopy(reordered)).definitions_hash() == base

    longer_window = spec()
    longer_window["views"][0]["aggregations"][1]["window_days"] = 31
    other_ttl = spec()
    other_ttl["views"][1]["ttl_days"] = 30
    fewer_on_demand = spec(on_demand=SPEC["on_demand"][:1])
    hashes = {
        FeatureSet.model_validate(d).definitions_hash()
        for d in (longer_window, other_ttl, fewer_on_demand)
    }
    assert base not in hashes and len(hashes) == 3


def test_unknown_entity_is_named() -> None:
    data = spec()
    data["views"][1]["entity"] = "account"
    assert "unknown entity 'account'" in error_text(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"aggregations": []}, "needs at least one aggregation"),
        ({"columns": ["plan"]}, "has aggregations, not columns"),
        ({"name": "Activity"}, "String should match pattern"),
        ({"name": "act__ivity"}, "must not contain '__'"),
        ({"name": "activity_"}, "must not contain '__'"),
        ({"ttl_days": 0}, "greater than or equal to 1"),
        (
            {"aggregations": [{"column": "sessions", "function": "median", "window_days": 7}]},
            "'count', 'sum', 'mean', 'min', 'max' or 'last'",
        ),
        (
            {"aggregations": [{"column": "sessions", "function": "sum", "window_days": 0}]},
            "greater than or equal to 1",
        ),
        (
            {"aggregations": [{"column": "sessions", "function": "sum", "window_days": 7}] * 2},
            "duplicated features ['activity__sessions_sum_7d']",
        ),
        (
            {"aggregations": [{"column": "customer_id", "function": "count", "window_days": 7}]},
            "is the join key or the feature timestamp",
        ),
    ],
)
def test_bad_event_views_are_rejected(change: dict, message: str) -> None:
    data = spec(on_demand=[])
    data["views"][0].update(change)
    assert message in error_text(data)


def test_profile_views_need_columns_and_no_aggregations() -> None:
    data = spec()
    data["views"][1]["columns"] = []
    assert "needs at least one column" in error_text(data)
    data = spec()
    data["views"][1]["aggregations"] = [{"column": "plan", "function": "last", "window_days": 1}]
    assert "has columns, not aggregations" in error_text(data)


def test_names_must_be_unique() -> None:
    data = spec()
    data["views"][1]["name"] = "activity"
    data["views"][1]["source"] = "events"
    data["views"][1].pop("columns")
    data["views"][1]["aggregations"] = [{"column": "x", "function": "sum", "window_days": 1}]
    assert "views: duplicated names ['activity']" in error_text(data)

    data = spec(entities=[*SPEC["entities"], SPEC["entities"][0]])
    assert "entities: duplicated names ['customer']" in error_text(data)

    data = spec()
    data["on_demand"][1]["name"] = "minutes_per_session"
    assert "must be unique" in error_text(data)


def test_join_key_cannot_be_the_feature_timestamp() -> None:
    with pytest.raises(ValidationError, match="reserved"):
        Entity(name="customer", join_key=FEATURE_TIMESTAMP)


def test_on_demand_functions_come_from_the_allow_list_only() -> None:
    data = spec()
    data["on_demand"][0]["function"] = "os_system"
    assert "not a registered on-demand function" in error_text(data)
    data["on_demand"][0]["function"] = "airmlops.features.on_demand_library.share"
    assert "String should match pattern" in error_text(data)


def test_on_demand_arity_and_type_must_fit_the_function() -> None:
    data = spec()
    data["on_demand"][0]["inputs"] = ["activity__sessions_sum_7d"]
    assert "takes 2 input(s), got 1" in error_text(data)
    data = spec()
    data["on_demand"][0]["type"] = "categorical"
    assert "returns numeric values" in error_text(data)


def test_on_demand_inputs_must_be_request_fields_view_features_or_earlier_features() -> None:
    data = spec()
    data["on_demand"][1]["inputs"] = ["request_time"]
    assert "input(s) ['request_time'] are neither" in error_text(data)

    chained = spec()
    chained["on_demand"].append(
        {"name": "busy_share", "function": "share",
         "inputs": ["minutes_per_session", "activity__minutes_watched_sum_7d"]}
    )
    assert FeatureSet.model_validate(chained).feature_names[-1] == "busy_share"

    ahead = spec()
    ahead["on_demand"].insert(
        0, {"name": "busy_share", "function": "share",
            "inputs": ["minutes_per_session", "activity__minutes_watched_sum_7d"]}
    )
    assert "input(s) ['minutes_per_session'] are neither" in error_text(ahead)


def test_views_can_be_built_directly_in_python() -> None:
    customer = Entity(name="customer", join_key="customer_id")
    view = FeatureView(
        name="activity", entity=customer, source="events", ttl_days=3,
        aggregations=[Aggregation(column="sessions", function="mean", window_days=7)],
    )
    assert view.feature_names == ["activity__sessions_mean_7d"]
    feature = OnDemandFeature(name="ratio", function="share", inputs=["a", "b"])
    with pytest.raises(ValidationError, match="neither"):
        FeatureSet(entities=[customer], views=[view], on_demand=[feature])
    other = Entity(name="customer", join_key="id")
    with pytest.raises(ValidationError, match="is not declared"):
        FeatureSet(entities=[other], views=[view])
