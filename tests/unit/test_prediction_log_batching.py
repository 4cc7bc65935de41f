"""The prediction log's writer lingers for more entries before a write that is not full, so
one backend call carries many requests' rows; a full batch, a flush or close does not wait."""

from __future__ import annotations

import threading
import time

import pytest

from airmlops.serving.prediction_log import PredictionLog, PredictionLogSettings, PredictionRecord


def record(i: int) -> PredictionRecord:
    return PredictionRecord(request_id=f"{i:032x}", position=0, ts_us=1_700_000_000_000_000 + i,
                            model_version="1", entity_id=f"C{i}", inputs={"customer_id": f"C{i}"},
                            features={"age": 30.0}, prediction=0.0, probability=0.25)


class Recording:
    location = "memory"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.written = threading.Event()

    def write(self, predictions, labels) -> None:
        self.batches.append([r.request_id for r in predictions])
        self.written.set()

    def close(self) -> None:
        pass


def test_entries_arriving_while_the_writer_lingers_go_in_one_write():
    backend = Recording()
    log = PredictionLog(backend, linger=0.3)
    for i in range(20):
        log.log([record(i)])
    assert backend.written.wait(5)
    assert backend.batches == [[f"{i:032x}" for i in range(20)]]
    log.close()


def test_flush_and_close_do_not_wait_for_the_linger():
    backend = Recording()
    log = PredictionLog(backend, linger=30.0)
    log.log([record(1)])
    started = time.monotonic()
    assert log.flush(5)
    assert time.monotonic() - started < 2.0 and backend.batches == [[f"{1:032x}"]]
    log.log([record(2)])
    started = time.monotonic()
    assert log.close(5)
    assert time.monotonic() - started < 2.0 and len(backend.batches) == 2


def test_a_full_batch_is_written_without_waiting():
    backend = Recording()
    log = PredictionLog(backend, batch_size=3, linger=30.0)
    started = time.monotonic()
    for i in range(3):
        log.log([record(i)])
    assert backend.written.wait(5) and time.monotonic() - started < 2.0
    assert backend.batches == [[f"{i:032x}" for i in range(3)]]
    log.close()


def test_the_linger_is_a_setting_and_never_negative(monkeypatch):
    monkeypatch.setenv("MLOPS_PREDICTION_LOG_LINGER_MS", "5")
    assert PredictionLogSettings().linger_ms == 5.0
    assert PredictionLogSettings.model_fields["linger_ms"].default == 20.0
    with pytest.raises(ValueError):
        PredictionLog(Recording(), linger=-1)
