"""Canary deploys without processes: the z-test and latency judgement of a step, the plan and
spec validation, the sticky entity split and the routing table's canary setting."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from airmlops.serving import proxy as proxy_mod
from airmlops.serving.deploy.canary import Z_CRITICAL, CanaryPlan, error_rate_z, judge
from airmlops.serving.proxy.admin import parse_canary
from airmlops.serving.proxy.canary import bucket, entity_of
from airmlops.serving.proxy.table import CanarySpec, RoutingTable, SlotSpec
from airmlops.spec import DeployConfig

PLAN = CanaryPlan((20, 100), 3.0, "customer_id", max_error_rate_increase=0.01,
                  max_latency_ratio=1.5, min_requests=20)


def window(requests: int, errors: int, p50_ms: float | None = 2.0) -> dict[str, object]:
    return {"requests": requests, "errors": errors,
            "error_rate": errors / requests if requests else 0.0, "p50_ms": p50_ms}


# -- the error-rate test ---------------------------------------------------------------------


def test_z_statistic_is_the_unpooled_two_proportion_one() -> None:
    # 10 % vs 2 % with margin 1 %: (0.10 - 0.02 - 0.01) / sqrt(.09/200 + .0196/800)
    expected = 0.07 / math.sqrt(0.1 * 0.9 / 200 + 0.02 * 0.98 / 800)
    assert error_rate_z(20, 200, 16, 800, 0.01) == pytest.approx(expected)
    assert expected > Z_CRITICAL


@pytest.mark.parametrize(
    ("canary", "live", "verdict"),
    [
        ((100, 0), (400, 0), "pass"),    # both clean
        ((100, 1), (400, 2), "pass"),    # 1 % vs 0.5 %: within the margin
        ((100, 3), (400, 0), "pass"),    # 3 % on 100 requests: not significant beyond 1 %
        ((1000, 40), (4000, 0), "fail"),  # 4 % on 1000: significant
        ((100, 100), (400, 0), "fail"),  # all errors (zero variance, beyond the margin)
        ((20, 20), (0, 0), "fail"),      # all errors, no live requests to compare with
        ((50, 10), (200, 8), "fail"),    # 20 % vs 4 %
        ((50, 3), (200, 8), "pass"),     # 6 % vs 4 %
    ],
)
def test_error_rate_decision(canary: tuple[int, int], live: tuple[int, int],
                             verdict: str) -> None:
    got, reason, _ = judge(window(*canary), window(*live), PLAN)
    assert got == verdict, reason
    if verdict == "fail":
        assert "error rate" in reason and "z =" in reason


def test_a_wider_margin_accepts_what_a_narrow_one_refuses() -> None:
    wide = CanaryPlan((100,), 1.0, "customer_id", max_error_rate_increase=0.05)
    assert judge(window(1000, 40), window(4000, 0), PLAN)[0] == "fail"
    assert judge(window(1000, 40), window(4000, 0), wide)[0] == "pass"


def test_latency_decision_and_no_data() -> None:
    assert judge(window(100, 0, 3.0), window(400, 0, 2.0), PLAN)[0] == "pass"  # 1.5x exactly
    verdict, reason, _ = judge(window(100, 0, 3.1), window(400, 0, 2.0), PLAN)
    assert verdict == "fail" and "median latency" in reason
    assert judge(window(100, 0, 50.0), window(0, 0, None), PLAN)[0] == "pass"  # no baseline
    verdict, reason, z = judge(window(0, 0, None), window(400, 0), PLAN)
    assert (verdict, z) == ("fail", None) and "no request" in reason


def test_step_window_interpolates_the_median() -> None:
    bounds = list(proxy_mod.LATENCY_BUCKETS_MS)

    def snap(counts: dict[int, int], errors: int = 0) -> dict[str, object]:
        latency = [counts.get(index, 0) for index in range(len(bounds) + 1)]
        return {"proxy_boot": "b", "requests": sum(latency), "errors": errors,
                "latency_buckets_ms": bounds, "latency_counts": latency, "latency_sum_ms": 0.0}

    empty = snap({})
    # 10 answers in (2, 5] ms: the median is halfway through that bucket.
    assert proxy_mod.step_window(empty, snap({2: 10}))["p50_ms"] == pytest.approx(3.5)
    got = proxy_mod.step_window(empty, snap({0: 5, 3: 5}, errors=1))
    assert got["p50_ms"] == pytest.approx(1.0) and got["error_rate"] == pytest.approx(0.1)
    assert proxy_mod.step_window(empty, empty)["p50_ms"] is None


# -- the plan and the spec -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ([5, 5, 100], "strictly increasing"),
        ([50, 25, 100], "strictly increasing"),
        ([0, 100], "1..100"),
        ([5, 101], "1..100"),
        ([5, 50], "last step must be 100"),
        ([True, 100], "valid integer"),
    ],
)
def test_spec_refuses_bad_canary_steps_naming_the_field(steps: list[object],
                                                        message: str) -> None:
    with pytest.raises(ValidationError) as refused:
        DeployConfig(strategy="canary", canary_steps=steps)
    assert "canary_steps" in str(refused.value) and message in str(refused.value)


@pytest.mark.parametrize(
    ("field", "value"),
    [("strategy", "rolling"), ("canary_step_seconds", 0), ("canary_max_latency_ratio", 0.5),
     ("canary_max_error_rate_increase", -0.1), ("canary_min_requests", 0)],
)
def test_spec_refuses_bad_canary_settings(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as refused:
        DeployConfig(**{field: value})
    assert field in str(refused.value)


def test_spec_defaults_and_the_plan_made_from_them() -> None:
    config = DeployConfig(strategy="canary")
    assert DeployConfig().strategy == "blue_green"
    plan = CanaryPlan.from_spec(config, "customer_id")
    assert plan == CanaryPlan((5, 25, 50, 100), 60.0, "customer_id", 0.01, 1.5, 50)


@pytest.mark.parametrize(
    ("changes", "field"),
    [({"steps": (50, 20, 100)}, "canary_steps"), ({"steps": ()}, "canary_steps"),
     ({"step_seconds": 0}, "canary_step_seconds"),
     ({"step_seconds": math.nan}, "canary_step_seconds"),
     ({"max_latency_ratio": 0.9}, "canary_max_latency_ratio"),
     ({"min_requests": 0}, "canary_min_requests"),
     ({"entity_key": "id; rm -rf"}, "entity_key")],
)
def test_plan_refuses_bad_values_naming_the_field(changes: dict[str, object],
                                                  field: str) -> None:
    arguments = {"steps": (20, 100), "step_seconds": 1.0, "entity_key": "customer_id", **changes}
    with pytest.raises(ValueError, match=field):
        CanaryPlan(**arguments)


# -- the sticky split ------------------------------------------------------------------------


def test_entity_of_reads_the_first_instance_or_the_flat_body() -> None:
    assert entity_of(b'{"instances": [{"customer_id": 17}, {"customer_id": 3}]}',
                     "customer_id") == "17"
    assert entity_of(b'{"customer_id": "c-9", "x": 1}', "customer_id") == "c-9"
    for body in (b"not json", b"[1, 2]", b'{"instances": []}', b'{"customer_id": true}',
                 b'{"customer_id": null}', b'{"customer_id": ""}', b'{"other": 1}',
                 b'{"instances": ["x"]}', b"\xff\xfe"):
        assert entity_of(body, "customer_id") is None, body


def test_buckets_are_stable_uniform_and_sticky() -> None:
    assert bucket("17") == bucket("17") and 0 <= bucket("17") < 10_000
    entities = [f"customer-{index}" for index in range(20_000)]
    share = sum(bucket(e) < 2000 for e in entities) / len(entities)
    assert 0.19 < share < 0.21
    # An entity taken at 5 % stays taken at 25 % and 50 % (raising the weight only adds).
    taken = {e for e in entities if bucket(e) < 500}
    assert taken <= {e for e in entities if bucket(e) < 2500}


# -- the routing table and the admin request -------------------------------------------------


def table_with_green() -> RoutingTable:
    blue = SlotSpec("1", ("http://127.0.0.1:9001",))
    green = SlotSpec("2", ("http://127.0.0.1:9002",))
    return RoutingTable({"blue": blue, "green": green}, "blue")


def test_the_table_holds_a_valid_canary_and_persists_it() -> None:
    table = table_with_green().with_canary(CanarySpec("green", 20, "customer_id"))
    again = RoutingTable.from_json(json.loads(json.dumps(table.to_json())))
    assert again == table and again.canary == CanarySpec("green", 20, "customer_id")
    # Switching to the canary's slot ends the canary; removing its slot too.
    assert table.with_slot("green", table.slots["green"], activate=True).canary is None
    assert table.with_slot("blue", table.slots["blue"], activate=True).canary is not None
    assert table.without_slot("green").canary is None
    assert "canary" not in table_with_green().to_json()  # no canary: the format of before


def test_the_admin_request_sets_and_clears() -> None:
    assert parse_canary(b'{"slot": "green", "weight": 5, "entity_key": "c"}') == CanarySpec(
        "green", 5, "c")
    assert parse_canary(b'{"slot": null}') is None
