"""Shadow deploys without processes: the promotion rule of a mirrored window, and the plan's
and the spec's validation of the rule's fields."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from airmlops.serving.deploy.shadow import ShadowPlan, judge_shadow
from airmlops.spec import DeployConfig


def _no_pairs(start, end):
    return {"pairs": 0}


PLAN = ShadowPlan(5.0, _no_pairs, min_requests=20, min_agreement=0.9, max_score_ks=0.2,
                  max_error_rate_increase=0.01, max_latency_ratio=1.5)


def window(requests: int, errors: int = 0, p50_ms: float | None = 2.0) -> dict[str, object]:
    return {"requests": requests, "errors": errors,
            "error_rate": errors / requests if requests else 0.0, "p50_ms": p50_ms}


def comparison(pairs: int = 500, agreement: float = 0.97, ks: float | None = 0.05
               ) -> dict[str, object]:
    return {"pairs": pairs, "agreement_rate": agreement, "score_ks": ks,
            "mean_score_shift": 0.01, "labelled": 0}


def test_a_shadow_like_the_live_version_is_promoted() -> None:
    verdict, reasons = judge_shadow(window(500), window(520), comparison(), PLAN)
    assert (verdict, reasons) == ("promote", [])


@pytest.mark.parametrize(
    ("shadow", "live", "compared", "broken"),
    [
        (window(0), window(500), comparison(), "answered no mirrored request"),
        (window(500, 60), window(500, 0), comparison(), "error rate"),
        (window(500, p50_ms=4.0), window(500, p50_ms=2.0), comparison(), "median latency"),
        (window(500), window(500), comparison(agreement=0.85), "agreement 0.8500 below 0.9"),
        (window(500), window(500), comparison(ks=0.35), "score distribution KS 0.3500"),
        (window(500), window(500), comparison(pairs=0), "no shadow prediction was logged"),
        (window(500), window(500), {"pairs": 0, "error": "ConnectionError: down"},
         "no shadow prediction was logged"),
    ],
)
def test_each_rule_rejects_on_its_own(shadow, live, compared, broken: str) -> None:
    verdict, reasons = judge_shadow(shadow, live, compared, PLAN)
    assert verdict == "reject"
    assert any(broken in reason for reason in reasons), reasons


def test_every_broken_rule_is_named() -> None:
    verdict, reasons = judge_shadow(window(500, 60, p50_ms=9.0), window(500, 0, p50_ms=2.0),
                                    comparison(agreement=0.5, ks=0.6), PLAN)
    assert verdict == "reject" and len(reasons) == 4


def test_a_few_errors_within_the_margin_do_not_reject() -> None:
    verdict, _ = judge_shadow(window(100, 1), window(400, 2), comparison(), PLAN)
    assert verdict == "promote"


def test_a_looser_rule_promotes_what_a_strict_one_rejects() -> None:
    loose = ShadowPlan(5.0, _no_pairs, min_agreement=0.8, max_score_ks=0.5)
    compared = comparison(agreement=0.85, ks=0.3)
    assert judge_shadow(window(500), window(500), compared, PLAN)[0] == "reject"
    assert judge_shadow(window(500), window(500), compared, loose)[0] == "promote"


def test_without_a_ks_statistic_only_agreement_is_judged() -> None:
    verdict, _ = judge_shadow(window(500), window(500), comparison(ks=None), PLAN)
    assert verdict == "promote"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"seconds": 0}, "shadow_seconds"),
        ({"percent": 0}, "shadow_percent"),
        ({"percent": 101}, "shadow_percent"),
        ({"percent": True}, "shadow_percent"),
        ({"min_requests": 0}, "shadow_min_requests"),
        ({"min_agreement": 1.5}, "shadow_min_agreement"),
        ({"max_score_ks": -0.1}, "shadow_max_score_ks"),
        ({"max_error_rate_increase": float("nan")}, "shadow_max_error_rate_increase"),
        ({"max_latency_ratio": 0.9}, "shadow_max_latency_ratio"),
        ({"compare": "not callable"}, "compare"),
    ],
)
def test_the_plan_refuses_each_bad_field_by_name(change: dict, field: str) -> None:
    arguments = {"seconds": 5.0, "compare": _no_pairs} | change
    with pytest.raises(ValueError, match=field):
        ShadowPlan(**arguments)


@pytest.mark.parametrize(
    ("field", "value"),
    [("strategy", "mirror"), ("shadow_seconds", 0), ("shadow_percent", 0),
     ("shadow_percent", 150), ("shadow_min_agreement", 2), ("shadow_max_score_ks", -1),
     ("shadow_max_latency_ratio", 0.5), ("shadow_min_requests", 0)],
)
def test_the_spec_refuses_each_bad_shadow_field_by_name(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        DeployConfig(**{field: value})


def test_the_plan_is_built_from_the_spec() -> None:
    deploy = DeployConfig(strategy="shadow", shadow_seconds=30, shadow_percent=50,
                          shadow_min_agreement=0.95, shadow_max_score_ks=0.1)
    plan = ShadowPlan.from_spec(deploy, _no_pairs)
    assert (plan.seconds, plan.percent, plan.min_agreement, plan.max_score_ks) == (
        30, 50, 0.95, 0.1)
    assert plan.max_latency_ratio == deploy.shadow_max_latency_ratio == 1.5
