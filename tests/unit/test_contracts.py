"""The stage contracts: what crosses XCom between the training DAG's tasks, checked on the way
in, with the JSON keys tools and tests read through the REST API."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path

import pytest

from airmlops.contracts import (
    ContractError,
    DataCheck,
    Deployment,
    GateVerdict,
    MonitorResult,
    Package,
    RegisteredVersion,
    Snapshot,
    TrainedModel,
    TrainingSet,
    World,
)
from airmlops.errors import NonRetryable

START = dt.datetime(2026, 5, 1, tzinfo=dt.UTC)
END = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
SNAPSHOT = Snapshot(pipeline="churn", digest="a" * 64, path=Path("/data/a.parquet"), rows=10,
                    interval_start=START, interval_end=END, spec_hash="b" * 64,
                    spec_path=Path("/data/specs/churn/b.yaml"),
                    world=World("covariate_drift", dt.date(2026, 5, 20)))
TRAINED = TrainedModel(run_id="r1", model_uri="runs:/r1/model", metrics={"test_roc_auc": 0.8},
                       train_path="/t/train.parquet", test_path="/t/test.parquet",
                       lineage={"spec_hash": "b" * 64})
EXAMPLES = [
    SNAPSHOT,
    DataCheck(success=True, digest="a" * 64, statistics={"evaluated_expectations": 3}),
    TrainingSet(train_path="/t/train.parquet", test_path="/t/test.parquet",
                split={"train_end": "2026-05-20"}, data_digest="a" * 64),
    TRAINED,
    GateVerdict(blessed=True, reasons=["ok"], checks=[{"name": "x"}], primary_metric="roc_auc"),
    RegisteredVersion(name="churn", version="3", model_uri="models:/churn/3", refit=True),
    Package(version="3", bento_tag="churn:v3-abc", bento_export="/b/churn.bento"),
    Deployment(version="3", target="process", slot="blue", stable_url="http://127.0.0.1:9",
               previous_version="2", previous_champion=None),
    MonitorResult(version="3", bake={"requests": 5}, reference="/data/ref/3"),
]


@pytest.mark.parametrize("contract", EXAMPLES, ids=lambda c: type(c).__name__)
def test_every_contract_survives_a_json_round_trip(contract):
    value = json.loads(json.dumps(contract.to_xcom()))
    assert type(contract).from_xcom(value) == contract


def test_the_xcom_keys_are_those_tools_read():
    value = SNAPSHOT.to_xcom()
    assert value["interval_end"] == END.isoformat() and value["digest"] == "a" * 64
    assert value["world"] == {"scenario": "covariate_drift", "scenario_start": "2026-05-20"}
    assert {"spec_hash", "spec_path", "path", "rows", "created"} <= set(value)
    assert RegisteredVersion.from_xcom(EXAMPLES[5].to_xcom()).version == "3"
    assert set(TRAINED.to_xcom()) == {"run_id", "model_uri", "metrics", "train_path",
                                      "test_path", "lineage"}


def test_the_snapshot_hands_on_its_ref():
    ref = SNAPSHOT.ref
    assert (ref.digest, ref.rows, ref.interval_end) == ("a" * 64, 10, END)
    assert Snapshot.of(ref, "b" * 64, SNAPSHOT.spec_path, SNAPSHOT.world) == SNAPSHOT


@pytest.mark.parametrize(("change", "message"), [
    ({"run_id": None}, "TrainedModel.run_id: expected text, got NoneType"),
    ({"metrics": [1]}, "TrainedModel.metrics: expected a mapping, got list"),
    ({"lineage": "x"}, "TrainedModel.lineage: expected a mapping"),
])
def test_a_wrong_type_names_the_contract_and_the_field(change, message):
    with pytest.raises(ContractError, match=message):
        TrainedModel.from_xcom({**TRAINED.to_xcom(), **change})


def test_a_missing_field_names_the_contract_and_the_field():
    value = TRAINED.to_xcom()
    del value["test_path"]
    with pytest.raises(ContractError, match=r"^TrainedModel\.test_path: is missing$"):
        TrainedModel.from_xcom(value)
    with pytest.raises(ContractError, match=r"RegisteredVersion\.\(value\): expected a mapping"):
        RegisteredVersion.from_xcom(["3"])


def test_nested_times_and_checks_are_validated():
    value = SNAPSHOT.to_xcom()
    with pytest.raises(ContractError, match=r"Snapshot\.world\.scenario_start: expected an ISO"):
        Snapshot.from_xcom({**value, "world": {"scenario_start": "May 20"}})
    with pytest.raises(ContractError, match=r"Snapshot\.interval_end: .*UTC offset"):
        Snapshot.from_xcom({**value, "interval_end": "2026-06-01T00:00:00"})
    with pytest.raises(ContractError, match=r"Snapshot\.digest: expected 64 hex digits"):
        Snapshot.from_xcom({**value, "digest": "../../etc"})
    with pytest.raises(ContractError, match=r"Snapshot\.rows: expected an integer, got bool"):
        Snapshot.from_xcom({**value, "rows": True})


def test_defaults_extra_keys_and_ints_for_floats():
    value = {"name": "churn", "version": "3", "model_uri": "models:/churn/3", "extra": 1}
    assert RegisteredVersion.from_xcom(value).refit is False
    trained = TrainedModel.from_xcom({**TRAINED.to_xcom(), "metrics": {"test_roc_auc": 1}})
    assert trained.metrics == {"test_roc_auc": 1.0}


def test_contracts_are_frozen_and_their_errors_are_not_retried():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TRAINED.run_id = "other"  # type: ignore[misc]
    assert issubclass(ContractError, NonRetryable)
