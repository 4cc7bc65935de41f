"""The DAG layer's one bridge between stages and Airflow: contracts in and out of XCom, and a
non-retryable error failing the task for good (every other error is retried)."""

from __future__ import annotations

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airmlops.contracts import RegisteredVersion, TrainingSet
from airmlops.dags.common import stage
from airmlops.errors import NonRetryable
from airmlops.stages import BakeFailed, DataValidationFailed

SET = TrainingSet(train_path="/t/train.parquet", test_path="/t/test.parquet", split={},
                  data_digest="a" * 64)


def test_contracts_arrive_typed_and_leave_as_xcom_dicts():
    @stage
    def register(training_set: TrainingSet, note: str) -> RegisteredVersion:
        assert isinstance(training_set, TrainingSet) and note == "n"
        return RegisteredVersion(name="churn", version="3", model_uri="models:/churn/3")

    value = register(SET.to_xcom(), note="n")
    assert value == {"name": "churn", "version": "3", "model_uri": "models:/churn/3",
                     "refit": False}
    assert register.__annotations__["return"] is dict  # Airflow infers multiple_outputs


@pytest.mark.parametrize("error", [DataValidationFailed("quarantined"), BakeFailed("rolled back"),
                                   NonRetryable("invalid spec")])
def test_a_non_retryable_error_fails_the_task_without_retries(error):
    @stage
    def body() -> None:
        raise error

    with pytest.raises(AirflowFailException, match=str(error)) as failed:
        body()
    assert failed.value.__cause__ is error


def test_a_malformed_xcom_fails_without_retries_and_other_errors_are_retried():
    @stage
    def train(training_set: TrainingSet) -> None:
        raise OSError("disk full")

    with pytest.raises(AirflowFailException, match=r"TrainingSet\.test_path: is missing"):
        train({"train_path": "/t", "split": {}, "data_digest": "a"})
    with pytest.raises(OSError, match="disk full"):
        train(SET.to_xcom())


def test_deploy_and_spec_errors_are_non_retryable():
    from airmlops.serving.deploy.errors import DeployFailed
    from airmlops.spec import SpecError
    from airmlops.spec_pin import SpecHashMismatch
    from airmlops.training.refit import RefitError

    for kind in (DeployFailed, SpecError, SpecHashMismatch, RefitError):
        assert issubclass(kind, NonRetryable), kind
