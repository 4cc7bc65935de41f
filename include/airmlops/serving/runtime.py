"""The model, the online store and the prediction log of one service instance
(:class:`ServingRuntime`, independent of BentoML): scoring request rows, building answers,
storing labels (:func:`claim_labels_waiting`), and telling a store outage from a bug."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airmlops.model_files import ModelLoadError
from airmlops.serving.schemas import error_body

if TYPE_CHECKING:
    import numpy as np

    from airmlops.serving.config import ServingConfig
    from airmlops.serving.fast_predict import FastScorer
    from airmlops.serving.prediction_log import LogBackend, PredictionLog
    from airmlops.spec import PipelineSpec

log = logging.getLogger("airmlops.serving.service")  # the service's logger, as before the split

FEEDBACK_RETRY_AFTER_S = 5
"""``Retry-After`` of a /feedback refused because the prediction log's store is down."""


@dataclasses.dataclass
class Scored:
    """Scores of a batch of request rows, with what the prediction log needs."""

    scores: np.ndarray
    features: list[dict[str, Any]]
    unknown: set[str]

    def rows(self, start: int, stop: int) -> Scored:
        """The scores of rows ``start`` to ``stop`` (one request of a coalesced batch)."""
        return Scored(self.scores[start:stop], self.features[start:stop], self.unknown)


class ServingRuntime:
    """The model, the online store and the prediction log of one service instance.

    Independent of BentoML, so it can be exercised directly;
    :func:`~airmlops.serving.service.create_service` wraps it.
    With ``fast_path`` the model is compiled for rows when it can be and scores exactly like
    the Pipeline (:meth:`_compile`); otherwise rows go through the Pipeline on a DataFrame.
    """

    def __init__(
        self,
        config: ServingConfig,
        spec: PipelineSpec,
        model: Any,
        online_store: Any,
        prediction_log: PredictionLog,
        *,
        clock: Callable[[], float] = time.time,
        fast_path: bool = True,
        label_backend: LogBackend | None = None,
        shadow_log: Callable[[], PredictionLog] | None = None,
    ) -> None:
        import threading

        self.config = config
        # Shadow rows get a log of their own, opened at the first shadow request.
        self._open_shadow_log = shadow_log
        self._shadow_log: PredictionLog | None = None
        self._shadow_lock = threading.Lock()
        # Labels are checked and stored synchronously, on a backend connection of their own.
        self.label_backend = label_backend if label_backend is not None \
            else prediction_log.backend
        self._label_lock = threading.Lock()
        self.labels_stored = 0
        self.flush_timeout = 5.0
        self.spec = spec
        self.model = model
        self.online_store = online_store
        self.prediction_log = prediction_log
        self.clock = clock
        self.is_classifier = spec.task == "binary_classification"
        self.views = list(spec.feature_store.views) if spec.feature_store else []
        self.input_names = spec.input_names
        if self.is_classifier:
            classes = [int(c) for c in getattr(model, "classes_", [])]
            if 1 not in classes:
                raise ModelLoadError(f"the classifier has no positive class 1 (classes {classes})")
            self._positive = classes.index(1)
        self.fast = self._compile() if fast_path else None

    def _compile(self) -> FastScorer | None:
        """The model compiled for rows (:mod:`airmlops.serving.fast_predict`), if it compiles
        and scores synthetic rows exactly like the Pipeline does; else None (the Pipeline is
        used on a DataFrame, as before)."""
        from airmlops.serving.fast_predict import NotCompilable, compile_scorer

        spec = self.spec
        try:
            scorer = compile_scorer(self.model, spec.numeric_features, spec.categorical_features,
                                    positive=1 if self.is_classifier else None,
                                    boolean=spec.boolean_features)
        except NotCompilable as error:
            log.info("scoring with the Pipeline on DataFrames: %s", error)
            return None
        except Exception as error:  # an unexpected model shape must never stop serving
            log.warning("scoring with the Pipeline on DataFrames: compiling failed: %r", error)
            return None
        try:
            agrees, gap = scorer.agrees_with(self._predict_rows_frame)
        except Exception as error:  # a probe the Pipeline refuses: do not trust the compilation
            log.warning("compiled scorer not used: checking it failed: %s", error)
            return None
        if not agrees:
            log.warning("compiled scorer not used: it differs from the Pipeline by %.3g", gap)
            return None
        log.info("compiled scorer: %s (largest gap to the Pipeline on probe rows %.1g)",
                 scorer.description, gap)
        return scorer

    def score(self, rows: Sequence[Mapping[str, Any]]) -> Scored:
        """Online features (one read), on-demand features, model scores for request rows.

        Entity ids are matched as strings, like the online store keys them.
        """
        from airmlops.features.pipeline import online_rows

        key = self.spec.entity_key
        prepared = [{**row, key: str(row[key])} for row in rows]
        found = online_rows(self.spec, self.online_store, prepared)
        if self.fast is not None:
            scores = self.fast.scores(found.rows)
        else:
            scores = self._predict_rows_frame(found.rows)
        names = self.input_names
        features = [{name: row.get(name) for name in names} for row in found.rows]
        return Scored(scores, features, {str(e) for e in found.unknown})

    def _predict_rows_frame(self, rows: Sequence[Mapping[str, Any]]) -> np.ndarray:
        """Scores of feature rows through the Pipeline on a DataFrame (the reference path)."""
        import pandas as pd

        from airmlops.training.model import feature_frame

        columns = list(dict.fromkeys([*self.input_names, *(k for r in rows for k in r)]))
        frame = feature_frame(self.spec, pd.DataFrame.from_records(list(rows), columns=columns))
        return self._predict(frame)

    def _predict(self, frame: Any) -> np.ndarray:
        """:func:`airmlops.training.model.predict_scores` on a frame that is already the
        model's input frame (built by ``feature_frame``), so it is not rebuilt."""
        import numpy as np

        if not self.is_classifier:
            return np.asarray(self.model.predict(frame), dtype="float64")
        probabilities = np.asarray(self.model.predict_proba(frame), dtype="float64")
        return probabilities[:, self._positive]

    def check_ready(self) -> bool:
        """The online store answers a read (one round trip). The prediction log is not
        checked: its outage makes ``/readyz`` say ``degraded``, not 503
        (:func:`readiness_body`)."""
        if self.views:
            self.online_store.read(self.views, ["__readyz__"])
        return True

    @property
    def shadow_log(self) -> PredictionLog:
        """The log of shadow rows (:mod:`airmlops.serving.prediction_log.shadow`), opened on
        first use; a runtime built without one cannot take shadow requests (RuntimeError)."""
        with self._shadow_lock:
            if self._shadow_log is None:
                if self._open_shadow_log is None:
                    raise RuntimeError("this service instance was started without a shadow log")
                self._shadow_log = self._open_shadow_log()
            return self._shadow_log

    def answer(self, instances: Sequence[Mapping[str, Any]], scored: Scored, request_id: str,
               ts_us: int, *, log: bool = True, shadow: bool = False) -> dict[str, Any]:
        """The response body of a scored request; hands its rows to the prediction log unless
        ``log`` is False (synthetic traffic, :mod:`airmlops.serving.synthetic`), or to the
        shadow log if ``shadow`` (``request_id`` is then the live request's)."""
        from airmlops.serving.prediction_log import PredictionRecord
        from airmlops.training.model import DECISION_THRESHOLD

        key = self.spec.entity_key
        version = self.config.model_version
        predictions, records = [], []
        for position, (instance, score, features) in enumerate(
            zip(instances, scored.scores.tolist(), scored.features, strict=True)
        ):
            entity = instance[key]
            if self.is_classifier:
                item = {"entity": entity, "prediction": int(score >= DECISION_THRESHOLD),
                        "probability": score}
            else:
                item = {"entity": entity, "prediction": score}
            predictions.append(item)
            records.append(PredictionRecord(
                request_id=request_id, position=position, ts_us=ts_us, model_version=version,
                entity_id=str(entity), inputs=instance, features=features,
                prediction=float(item["prediction"]), probability=item.get("probability"),
            ))
        if log and shadow:
            self.shadow_log.log(records)
        elif log:
            self.prediction_log.log(records)
        return {"predictions": predictions, "model_name": self.config.model_name,
                "model_version": version, "request_id": request_id}

    def claim_labels(self, request_id: str, labels: Sequence[Mapping[str, Any]], ts_us: int,
                     *, overwrite: bool = False, flush: bool = False
                     ) -> tuple[int, dict[str, Any]]:
        """Store the labels of one earlier request; (HTTP status, body) of the answer.

        Stored in one atomic step by the log's backend (:meth:`LogBackend.claim_labels`), on
        a connection of its own (the writer thread has the log's): 202 when stored; 404 when
        the request id was never issued; 422 naming an entity the request did not predict or
        one labelled twice in the body; 409 naming an entity that already has a label (unless
        ``overwrite``). With ``flush``, this worker's buffered predictions are written first,
        so a label that follows its prediction at once finds it.
        """
        from airmlops.serving.prediction_log import LabelRecord

        entities = [str(item["entity"]) for item in labels]
        twice = [index for index, entity in enumerate(entities) if entity in entities[:index]]
        if twice:
            return 422, error_body("invalid_request", "; ".join(
                f"labels[{i}].entity: {entities[i]!r} is labelled more than once in this body"
                for i in twice[:10]), request_id=request_id)
        if flush:
            self.prediction_log.flush(timeout=self.flush_timeout)
        records = [LabelRecord(request_id=request_id, entity_id=entity,
                               label=float(item["label"]), ts_us=ts_us)
                   for entity, item in zip(entities, labels, strict=True)]
        with self._label_lock:
            claim = self.label_backend.claim_labels(request_id, records, overwrite=overwrite)
        if not claim.issued:
            return 404, error_body("unknown_request", f"request_id: {request_id} was not issued "
                                   "by this model (or no longer accepts labels)",
                                   request_id=request_id)
        if claim.unknown_entities:
            return 422, error_body("unknown_entity", "; ".join(
                f"labels[{entities.index(e)}].entity: {e!r} was not predicted in request "
                f"{request_id}" for e in claim.unknown_entities[:10]),
                unknown_entities=list(claim.unknown_entities), request_id=request_id)
        if claim.conflicts:
            return 409, error_body("label_exists", "; ".join(
                f"labels[{entities.index(e)}].entity: {e!r} already has a label for request "
                f"{request_id}" for e in claim.conflicts[:10]) + "; send \"overwrite\": true "
                "to replace it", conflicts=list(claim.conflicts), request_id=request_id)
        self.labels_stored += len(records)
        return 202, {"request_id": request_id, "accepted": len(records)}

    def close(self) -> None:
        """Flush and close the prediction log (and the shadow log if it was opened), the
        labels' connection and the online store."""
        self.prediction_log.close(timeout=5.0)
        if self._shadow_log is not None:
            self._shadow_log.close(timeout=2.0)
        if self.label_backend is not self.prediction_log.backend:
            self.label_backend.close()
        self.online_store.close()


async def claim_labels_waiting(runtime: ServingRuntime, request_id: str,
                               labels: Sequence[Mapping[str, Any]], *, overwrite: bool,
                               wait_s: float
                               ) -> tuple[int, dict[str, Any], dict[str, str]]:
    """:meth:`ServingRuntime.claim_labels`, in a thread, waiting for a request id not yet
    found: predictions reach the log store asynchronously, so the first miss flushes this
    worker's buffer and later ones poll (another worker's buffer is written within its
    linger) until ``wait_s`` has passed; then 404. A log store that is down (unreachable,
    read-only, out of memory, an unusable file) answers 503 with ``Retry-After``: the labels
    were not stored. Returns (HTTP status, JSON body, extra headers)."""
    import anyio.to_thread

    ts_us = now_us(runtime.clock)
    deadline = time.monotonic() + wait_s
    attempt, pause = 0, 0.02
    while True:
        try:
            status, body = await anyio.to_thread.run_sync(functools.partial(
                runtime.claim_labels, request_id, labels, ts_us, overwrite=overwrite,
                flush=attempt == 1))
        except Exception as error:
            if not _log_store_unavailable(error):
                raise
            log.warning("prediction log unavailable for labels: %s: %s",
                        type(error).__name__, error)
            return 503, error_body(
                "unavailable", "the prediction log is unavailable; the labels were not "
                f"recorded, retry in {FEEDBACK_RETRY_AFTER_S} seconds",
                request_id=request_id), {"Retry-After": str(FEEDBACK_RETRY_AFTER_S)}
        if status != 404 or (attempt > 0 and time.monotonic() >= deadline):
            return status, body, {}
        attempt += 1
        if attempt > 1:
            await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, 0.2)


def now_us(clock: Callable[[], float]) -> int:
    """The time of ``clock`` (seconds since the epoch) in whole microseconds."""
    return int(clock() * 1_000_000)


def is_connection_error(error: BaseException) -> bool:
    """A store could not be reached or timed out (Redis), or could not be used (SQLite)."""
    try:
        import redis

        if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
            return True
    except ImportError:  # pragma: no cover - redis is a requirement of the service
        pass
    import sqlite3

    return isinstance(error, sqlite3.OperationalError)


def _log_store_unavailable(error: BaseException) -> bool:
    """The prediction log's store cannot take a write now (not a bug): unreachable or timing
    out, loading, read-only, out of memory, failing over; a SQLite file or folder that cannot
    be opened or written."""
    if is_connection_error(error) or isinstance(error, OSError):
        return True
    try:
        import redis.exceptions as redis_errors
    except ImportError:  # pragma: no cover - redis is a requirement of the service
        return False
    return isinstance(error, (redis_errors.ReadOnlyError, redis_errors.OutOfMemoryError,
                              redis_errors.MasterDownError, redis_errors.TryAgainError,
                              redis_errors.ClusterDownError))
