"""The decision channel of a running shadow (airmlops.serving.deploy.decisions) and the spec's
promotion fields: a decision written is read back as written; a malformed one is ignored with a
warning and removed; one on another version is stale and removed; a consumed one is gone."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from airmlops.serving.deploy.decisions import (
    DecisionChannel,
    ShadowDecision,
    decision_path,
    read_decision,
    running_record,
    running_version,
    write_decision,
)
from airmlops.serving.deploy.shadow import ShadowPlan
from airmlops.spec_deploy import DeployConfig

AT = "2026-04-10T12:00:00+00:00"


def _no_pairs(start, end) -> dict:
    return {"pairs": 0}


def test_a_decision_round_trips(tmp_path: Path) -> None:
    decision = ShadowDecision("4", "promote", "alice", AT)
    path = write_decision("churn", tmp_path, decision)
    assert path == tmp_path / "deployments" / "churn" / "shadow-decision.json"
    assert read_decision("churn", tmp_path) == decision
    assert DecisionChannel("churn", tmp_path, "4").poll() == decision


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"[]", b'{"version": "4", "action": "promote", "by": "alice"}',
     b'{"version": "4", "action": "promote", "by": "alice", "at": "' + AT.encode()
     + b'", "extra": 1}',
     b'{"version": 4, "action": "promote", "by": "alice", "at": "' + AT.encode() + b'"}',
     b'{"version": "4", "action": "merge", "by": "alice", "at": "' + AT.encode() + b'"}',
     b'{"version": "../4", "action": "promote", "by": "alice", "at": "' + AT.encode() + b'"}',
     b'{"version": "4", "action": "promote", "by": "", "at": "' + AT.encode() + b'"}',
     b'{"version": "4", "action": "promote", "by": "alice", "at": "yesterday"}',
     b'{"version": "4", "action": "promote", "by": "alice", "at": "2026-04-10T12:00:00"}',
     b'{"version": "4", "action": "promote", "by": "a\\nb", "at": "' + AT.encode() + b'"}',
     b" " * 5000],
)
def test_a_malformed_decision_is_ignored_with_a_warning_and_removed(
        tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    path = decision_path("churn", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="airmlops.serving.deploy"):
        assert DecisionChannel("churn", tmp_path, "4").poll() is None
    assert "shadow decision" in caplog.text and "ignored" in caplog.text
    assert not path.exists()


def test_a_decision_on_another_version_is_stale_ignored_and_removed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_decision("churn", tmp_path, ShadowDecision("3", "promote", "alice", AT))
    with caplog.at_level(logging.WARNING, logger="airmlops.serving.deploy"):
        assert DecisionChannel("churn", tmp_path, "4").poll() is None
    assert "stale" in caplog.text
    assert not decision_path("churn", tmp_path).exists()


def test_a_decision_is_consumed_once(tmp_path: Path) -> None:
    channel = DecisionChannel("churn", tmp_path, "4")
    write_decision("churn", tmp_path, ShadowDecision("4", "reject", "bob", AT))
    assert channel.poll() == ShadowDecision("4", "reject", "bob", AT)
    assert channel.poll() == ShadowDecision("4", "reject", "bob", AT)  # until applied
    channel.consume()
    assert channel.poll() is None
    channel.consume()  # nothing left: no error


def test_no_decision_reads_as_none(tmp_path: Path) -> None:
    assert DecisionChannel("churn", tmp_path, "4").poll() is None


@pytest.mark.parametrize("pipeline", ["../etc", "Churn", ""])
def test_a_pipeline_name_that_is_not_one_is_refused(tmp_path: Path, pipeline: str) -> None:
    with pytest.raises(ValueError, match="pipeline name"):
        decision_path(pipeline, tmp_path)


def test_the_running_record_names_the_version_mode_and_rule() -> None:
    plan = ShadowPlan(30.0, _no_pairs, promotion="manual", decision_timeout=120.0)
    record = running_record("4", "green", AT, plan)
    assert running_version(record) == "4"
    assert (record["status"], record["promotion"], record["decision_timeout_seconds"]) == (
        "running", "manual", 120.0)
    assert record["rule"]["min_agreement"] == plan.min_agreement
    json.dumps(record)
    assert running_version({**record, "status": "awaiting"}) == "4"
    assert running_version({**record, "status": None, "outcome": "promoted"}) is None
    assert running_version(None) is None


def test_the_spec_promotion_fields_default_and_reach_the_plan() -> None:
    deploy = DeployConfig(strategy="shadow")
    assert (deploy.shadow_promotion, deploy.shadow_decision_timeout_seconds) == ("rule", 3600)
    manual = DeployConfig(strategy="shadow", shadow_promotion="manual",
                          shadow_decision_timeout_seconds=600)
    plan = ShadowPlan.from_spec(manual, _no_pairs)
    assert (plan.promotion, plan.decision_timeout) == ("manual", 600)


@pytest.mark.parametrize(
    ("field", "value"),
    [("shadow_promotion", "vote"), ("shadow_promotion", True),
     ("shadow_decision_timeout_seconds", 59), ("shadow_decision_timeout_seconds", 604801),
     ("shadow_decision_timeout_seconds", "soon")],
)
def test_the_spec_refuses_each_bad_promotion_field_by_name(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        DeployConfig(**{field: value})


@pytest.mark.parametrize(
    ("change", "field"),
    [({"promotion": "vote"}, "shadow_promotion"),
     ({"decision_timeout": 0}, "shadow_decision_timeout_seconds"),
     ({"decision_timeout": float("inf")}, "shadow_decision_timeout_seconds")],
)
def test_the_plan_refuses_each_bad_promotion_field_by_name(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ShadowPlan(**{"seconds": 5.0, "compare": _no_pairs, **change})
