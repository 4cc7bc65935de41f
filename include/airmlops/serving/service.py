"""The model service: one BentoML 1.4 service per deployed model version.

A bento built by :mod:`airmlops.serving.bento` carries, beside its entry module, ``serving.json``
(:class:`ServingConfig`: pipeline, model name and version, MLflow run, model directory), a copy
of the pipeline spec and the registered version's MLflow model directory; the entry module calls
:func:`create_service` with that file. Runtime settings come from the environment:
``MLOPS_DATA_ROOT`` and ``MLOPS_REDIS_URL`` (online store and prediction log, see
:mod:`airmlops.settings`), ``MLOPS_PREDICTION_LOG_*`` and ``MLOPS_SERVING_*``
(:class:`airmlops.settings.ServingSettings`; ``MLOPS_SERVING_TOKEN`` turns bearer-token
authentication on).

Endpoints:

- ``POST /predict`` ``{"instances": [{<entity_key>: id, <request fields>...}, ...]}`` (1 to
  ``max_instances`` rows) answers ``{"predictions": [{"entity", "prediction", "probability"}],
  "model_name", "model_version", "request_id"}`` (no ``probability`` for regression). The
  online features of every entity come in one round trip and the on-demand features from the
  same code as training (:func:`airmlops.features.pipeline.online_inputs`). An entity the
  online store does not know gets 422 naming it. Every answered row goes to the prediction log
  without blocking the response (:mod:`airmlops.serving.prediction_log`).
- ``POST /feedback`` ``{"request_id": ..., "labels": [{"entity": id, "label": y}],
  "overwrite": false}`` answers 202 once the labels are stored in the prediction log. A label
  is ``0``/``1``/``true``/``false`` for binary classification and a finite number for
  regression (else 422 naming it); the request id must be one this service issued (else 404),
  each entity one of that request's (else 422 naming it) and given once per request (a second
  label for the same (request id, entity) is 409 and leaves the first unchanged, unless the
  body says ``"overwrite": true``). A label that follows its prediction at once is accepted:
  the service flushes its own log buffer and waits up to ``feedback_wait_s`` for another
  worker's (:meth:`ServingRuntime.claim_labels`).
  When the prediction log's store is down, ``/feedback`` answers 503 with ``Retry-After``.
- ``/livez``, ``/readyz`` and Prometheus ``/metrics`` (requests, latency, errors by kind, model
  info, prediction-log counters) stay open when authentication is on; everything else needs
  ``Authorization: Bearer <token>``. ``/readyz`` is 200 when the model is loaded and the online
  store answers (503 otherwise), whatever the prediction log's state: the stable-address proxy
  routes by that code, and a log outage must not take a model that can answer out of service.
  Its body says how the log is: ``{"status": "ready" | "degraded" | "not_ready",
  "prediction_log": {...}}`` (:func:`readiness_body`).

Client mistakes never reach BentoML's handler, which would log them at ERROR with a traceback:
:class:`RequestGate`, an ASGI middleware, answers them itself with a 4xx whose ``message``
names the problem (401 token, 405 method, 413 body size, 415 media type (pickle is always
refused), 400 malformed JSON, 422 schema) and counts them by kind. Every response carries
``X-Model-Version``; ``/predict`` also ``X-Request-ID``.

Where a request's time goes, and what keeps it short (measured in benchmarks/README.md):

- the gate answers a valid ``/predict`` itself with :class:`PredictHandler`
  (``MLOPS_SERVING_DIRECT``): BentoML's API handler would parse and validate the body a second
  time and costs ~0.7 ms per request on its own; BentoML's middlewares (metrics, access log,
  timeout, concurrency limit) still wrap the gate;
- the model is scored on row dicts by a compiled form of the fitted Pipeline
  (:mod:`airmlops.serving.fast_predict`, ``MLOPS_SERVING_FAST_PATH``), checked against the
  Pipeline at startup: scikit-learn's per-call validation of a one-row DataFrame cost ~7 ms and
  building the frame ~3 ms, for a few microseconds of arithmetic;
- concurrent requests are coalesced (``MLOPS_SERVING_BATCHING``): while one batch is being
  scored, the requests that arrive are queued and scored together as the next batch, so one
  online read and one model call serve many requests and a lone request waits for nobody;
- the prediction log is written by a background thread in batches (see
  :mod:`airmlops.serving.prediction_log`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    create_model,
)

from airmlops.model_files import ModelDigests, ModelLoadError, load_model_dir, model_dir_under
from airmlops.paths import safe_join
from airmlops.settings import ServingSettings

if TYPE_CHECKING:
    import numpy as np

    from airmlops.serving.fast_predict import FastScorer
    from airmlops.serving.prediction_log import LogBackend, LogStats, PredictionLog
    from airmlops.settings import Settings
    from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)

CONFIG_FILE = "serving.json"
OPEN_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
"""Paths that answer without a token (probes and scraping)."""
PICKLE_MEDIA_TYPES = frozenset({
    "application/x-pickle", "application/python-pickle", "application/pickle",
    "application/x-python-pickle", "application/vnd.bentoml+pickle",
})
ENTITY_MAX_LENGTH = 256
RECENT_DROP_S = 60.0
"""For this long after the prediction log dropped an entry, ``/readyz`` says ``degraded``."""
FEEDBACK_RETRY_AFTER_S = 5
"""``Retry-After`` of a /feedback refused because the prediction log's store is down."""
LATENCY_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                   0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServingConfig(BaseModel):
    """What a bento knows about its model (``serving.json``, written at build time)."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    pipeline: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    model_name: str
    model_version: str = Field(pattern=r"^[0-9]{1,9}$")
    run_id: str | None = None
    model_uri: str
    model_dir: str = "model"
    spec_file: str = "spec.yaml"
    spec_hash: str
    features_hash: str
    model_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """sha256 of the model file recorded at logging; the service refuses a model without it."""
    mlmodel_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    """sha256 of the model's MLmodel file recorded at logging."""

    @classmethod
    def read(cls, path: Path) -> ServingConfig:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))


# --- the model --------------------------------------------------------------------------------


def load_model(root: Path, config: ServingConfig) -> Any:
    """The bento's model, through the one loader (:mod:`airmlops.model_files`): ``model_dir``
    confined to the bento, the digests of ``serving.json`` checked before anything is parsed,
    skops only, exactly the trusted types recorded at training. :class:`ModelLoadError` if not.
    """
    expected = ModelDigests.from_tags(config.model_dump(), CONFIG_FILE)
    return load_model_dir(model_dir_under(root, config.model_dir), expected)


# --- request and response models -------------------------------------------------------------


def load_bento_spec(root: Path, config: ServingConfig) -> PipelineSpec:
    """The spec a bento was built with, checked against the hash recorded in ``serving.json``.

    Its file paths are not confined to this process's data roots: the service reads no source
    file, and a build sandbox or a container has other roots than the worker that validated
    the spec (the hash proves it is that spec).
    """
    from airmlops.spec import load_spec

    spec = load_spec(safe_join(root, config.spec_file), data_roots=(Path("/"),))
    if spec.name != config.pipeline or spec.spec_hash() != config.spec_hash:
        raise ValueError(f"{config.spec_file} is not the spec this bento was built with")
    return spec


def _entity_id(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError("must be a string or an integer")
    if isinstance(value, str) and not 0 < len(value) <= ENTITY_MAX_LENGTH:
        raise ValueError(f"must be 1 to {ENTITY_MAX_LENGTH} characters")
    return value


EntityId = Annotated[str | int, BeforeValidator(_entity_id)]


def _finite_label(value: Any) -> Any:
    """A regression label: a finite number within the float range (not a boolean)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a finite number")
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise ValueError("must be a finite number within the float range") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number within the float range")
    return number


def _binary_label(value: Any) -> Any:
    """A binary classification label: 0, 1, true or false."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return float(value)
    raise ValueError("must be 0, 1, true or false (binary classification)")


class LabelItem(BaseModel):
    """One observed outcome (a regression label; see :func:`request_models`)."""

    model_config = ConfigDict(extra="forbid")

    entity: EntityId
    label: Annotated[float, BeforeValidator(_finite_label)]


class BinaryLabelItem(LabelItem):
    """One observed outcome of a binary classifier."""

    label: Annotated[float, BeforeValidator(_binary_label)]


def _boolean_field(value: Any) -> str:
    """A boolean request field in the model's text: JSON true/false, "true"/"false" in any
    case, or 1/0 become "true"/"false"; anything else is refused."""
    from airmlops.data.categories import BOOLEAN_VALUES, category

    accepted = (isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
                or (isinstance(value, str) and value.lower() in BOOLEAN_VALUES))
    text = category(value, boolean=True) if accepted else None
    if text is None:
        raise ValueError('must be a boolean: true or false, "true" or "false" (any case), '
                         "or 1 or 0")
    return text


def _declared_category(allowed: frozenset[str], value: Any) -> Any:
    """A categorical request field with declared ``values``: a JSON boolean or integer (or a
    string in another case of "true"/"false") whose canonical text is one of them becomes that
    text, as in training; anything else is left for the ``Literal`` check to refuse."""
    from airmlops.data.categories import category

    if isinstance(value, bool | int | str):
        text = category(value)
        if text in allowed:
            return text
    return value


def request_models(spec: PipelineSpec, max_instances: int) -> tuple[type[BaseModel],
                                                                     type[BaseModel]]:
    """The (predict, feedback) request models of a pipeline, from its spec.

    A prediction row has the entity key and the spec's request fields, typed and bounded as
    the spec declares them (numbers finite and within min/max, categories among ``values``);
    a field may be null only if the spec allows missing values for it. Unknown fields are
    refused. Field names are the spec's column names (as aliases, so any column name works).
    Categories arrive in the canonical text training used (:mod:`airmlops.data.categories`):
    a boolean field takes true/false, "true"/"false" or 1/0 and becomes "true"/"false"; a
    field with ``values`` also takes a JSON boolean or integer whose text is among them.
    """
    by_name = {f.name: f for f in spec.features}
    fields: dict[str, Any] = {"f_entity": (EntityId, Field(alias=spec.entity_key))}
    for index, name in enumerate(spec.request_fields):
        column = by_name.get(name)
        if column is None:  # the event timestamp as a request field
            annotation: Any = Annotated[str, Strict(), Field(max_length=64)]
        elif column.type == "numeric":
            annotation = Annotated[float, Strict(), Field(ge=column.min, le=column.max,
                                                          allow_inf_nan=False)]
        elif column.type == "boolean":
            annotation = Annotated[str, BeforeValidator(_boolean_field)]
        elif column.values:
            allowed = functools.partial(_declared_category, frozenset(column.values))
            annotation = Annotated[Literal[tuple(column.values)], BeforeValidator(allowed)]
        else:
            annotation = Annotated[str, Strict(), Field(max_length=ENTITY_MAX_LENGTH)]
        if column is not None and column.max_null_fraction > 0:
            annotation = annotation | None
        fields[f"f_{index}"] = (annotation, Field(alias=name))
    instance = create_model(
        f"{spec.name.title().replace('_', '')}Instance",
        __config__=ConfigDict(extra="forbid", populate_by_name=False),
        **fields,
    )
    predict = create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        instances=(list[instance], Field(min_length=1, max_length=max_instances)),
    )
    label_item = BinaryLabelItem if spec.task == "binary_classification" else LabelItem
    feedback = create_model(
        "FeedbackRequest",
        __config__=ConfigDict(extra="forbid"),
        request_id=(str, Field(pattern=r"^[0-9a-f]{32}$")),
        labels=(list[label_item], Field(min_length=1, max_length=max_instances)),
        overwrite=(Annotated[bool, Strict()], False),
    )
    return predict, feedback


class PredictionItem(BaseModel):
    entity: str | int
    prediction: float
    probability: float | None = None


class PredictResponse(BaseModel):
    """The answer of ``/predict`` (documented in the OpenAPI schema)."""

    model_config = ConfigDict(protected_namespaces=())

    predictions: list[PredictionItem]
    model_name: str
    model_version: str
    request_id: str


class FeedbackResponse(BaseModel):
    request_id: str
    accepted: int


def describe_errors(error: ValidationError, limit: int = 10) -> str:
    """One line per problem, naming the field: ``instances[0].age: is required``."""
    parts = []
    for item in error.errors(include_url=False)[:limit]:
        path = ""
        for part in item["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        kind, message = item["type"], item["msg"].removeprefix("Value error, ")
        if kind == "missing":
            message = "is required"
        elif kind == "model_type" and not item["loc"]:
            message = "must be a JSON object"
        elif kind == "extra_forbidden":
            message = "is not a known field"
        elif kind in ("too_short", "too_long") and path in ("instances", "labels"):
            message = message.replace("List", "the list")
        elif "input" in item and kind not in ("model_type", "model_attributes_type", "list_type"):
            shown = repr(item["input"])
            message = f"{message} (got {shown[:60]}{'...' if len(shown) > 60 else ''})"
        parts.append(f"{path or 'body'}: {message}")
    more = error.error_count() - limit
    if more > 0:
        parts.append(f"... and {more} more")
    return "; ".join(parts)


# --- scoring -------------------------------------------------------------------------------


@dataclasses.dataclass
class Scored:
    """Scores of a batch of request rows, with what the prediction log needs."""

    scores: np.ndarray
    features: list[dict[str, Any]]
    unknown: set[str]

    def rows(self, start: int, stop: int) -> Scored:
        return Scored(self.scores[start:stop], self.features[start:stop], self.unknown)


class ServingRuntime:
    """The model, the online store and the prediction log of one service instance.

    Independent of BentoML, so it can be exercised directly; :func:`create_service` wraps it.
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
    ) -> None:
        import threading

        self.config = config
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

    def answer(self, instances: Sequence[Mapping[str, Any]], scored: Scored, request_id: str,
               ts_us: int, *, log: bool = True) -> dict[str, Any]:
        """The response body of a scored request; hands its rows to the prediction log unless
        ``log`` is False (synthetic traffic, :mod:`airmlops.serving.synthetic`)."""
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
        if log:
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
        self.prediction_log.close(timeout=5.0)
        if self.label_backend is not self.prediction_log.backend:
            self.label_backend.close()
        self.online_store.close()


class Coalescer:
    """Scores concurrent requests together: requests arriving while a batch is being scored
    wait and are scored as the next batch (up to ``max_rows`` rows). No timer: a request that
    finds the scorer idle is scored at once."""

    def __init__(self, score: Callable[[list[Mapping[str, Any]]], Scored], max_rows: int,
                 observe: Callable[[int], None] | None = None) -> None:
        self._score = score
        self._max_rows = max_rows
        self._observe = observe
        self._queue: list[tuple[Sequence[Mapping[str, Any]], asyncio.Future[Scored]]] = []
        self._task: asyncio.Task[None] | None = None

    async def score(self, rows: Sequence[Mapping[str, Any]]) -> Scored:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Scored] = loop.create_future()
        self._queue.append((rows, future))
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        import anyio.to_thread

        try:
            while self._queue:
                taken = [self._queue.pop(0)]
                total = len(taken[0][0])
                while self._queue and total + len(self._queue[0][0]) <= self._max_rows:
                    taken.append(self._queue.pop(0))
                    total += len(taken[-1][0])
                taken = [(rows, f) for rows, f in taken if not f.done()]  # timed out meanwhile
                if not taken:
                    continue
                merged = [row for rows, _ in taken for row in rows]
                if self._observe is not None:
                    self._observe(len(taken))
                try:
                    scored = await anyio.to_thread.run_sync(self._score, merged)
                    offset = 0
                    for rows, future in taken:
                        if not future.done():
                            future.set_result(scored.rows(offset, offset + len(rows)))
                        offset += len(rows)
                except Exception as error:
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(error)
        finally:
            self._task = None


class PredictHandler:
    """``/predict`` for validated request rows: score them (coalesced with concurrent
    requests), refuse unknown entities (422) or an unreachable store (503), answer, log.

    Returns (HTTP status, JSON body, extra headers); used by :class:`RequestGate`'s direct lane
    and by the BentoML API method alike, so both answer the same.
    """

    def __init__(self, runtime: ServingRuntime, coalescer: Coalescer | None,
                 metrics: ServiceMetrics | None = None) -> None:
        self.runtime = runtime
        self.coalescer = coalescer
        self.metrics = metrics
        self.entity_key = runtime.spec.entity_key

    async def __call__(self, rows: list[dict[str, Any]], synthetic: str | None = None
                       ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Answer ``rows``; a ``synthetic`` request (its kind) is answered but not logged."""
        import anyio.to_thread

        runtime = self.runtime
        ts_us = _now_us(runtime.clock)
        request_id = uuid.uuid4().hex
        headers = {"X-Request-ID": request_id}
        try:
            if self.coalescer is not None:
                scored = await self.coalescer.score(rows)
            else:
                scored = await anyio.to_thread.run_sync(runtime.score, rows)
        except Exception as error:
            if _is_connection_error(error):
                log.warning("online store unavailable: %s: %s", type(error).__name__, error)
                return 503, error_body(
                    "unavailable", "the online feature store is unavailable; retry later",
                    request_id=request_id), headers
            raise
        key = self.entity_key
        if scored.unknown:
            unknown = [row[key] for row in rows if str(row[key]) in scored.unknown]
            if unknown:
                shown = ", ".join(repr(e) for e in list(dict.fromkeys(unknown))[:20])
                return 422, error_body(
                    "unknown_entity", f"unknown {key} (no features in the online store): "
                    f"{shown}", unknown_entities=list(dict.fromkeys(unknown)),
                    request_id=request_id), headers
        body = runtime.answer(rows, scored, request_id, ts_us, log=synthetic is None)
        if self.metrics is not None:
            self.metrics.predictions.inc(len(rows))
            if synthetic is not None:
                self.metrics.synthetic.labels(synthetic).inc()
        return 200, body, headers


# --- HTTP edge ---------------------------------------------------------------------------------


def _json_response(status: int, body: Mapping[str, Any],
                   headers: Mapping[str, str] | None = None) -> Any:
    from starlette.responses import Response

    return Response(json.dumps(body, separators=(",", ":"), allow_nan=False), status_code=status,
                    headers=dict(headers or {}), media_type="application/json")


def error_body(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": kind, "message": message, **extra}


def readiness_body(ready: bool, log_stats: LogStats | None) -> dict[str, Any]:
    """The body of ``/readyz``. ``status``: ``not_ready`` when BentoML's check failed (the
    model or the online store), else ``degraded`` while the prediction log spills to disk, its
    backend fails, or it dropped entries in the last ``RECENT_DROP_S`` seconds, else ``ready``;
    ``prediction_log``: its :class:`~airmlops.serving.prediction_log.LogStats`."""
    if log_stats is None:  # the service instance is not set up yet
        return {"status": "ready" if ready else "not_ready"}
    recent_drop = log_stats.seconds_since_drop is not None and \
        log_stats.seconds_since_drop < RECENT_DROP_S
    degraded = log_stats.state != "ok" or not log_stats.backend_up or recent_drop
    status = "not_ready" if not ready else "degraded" if degraded else "ready"
    return {"status": status, "prediction_log": log_stats.to_dict()}


class ServiceMetrics:
    """The service's Prometheus metrics (created in the worker, after BentoML has set up
    prometheus_client's multiprocess mode; once per process)."""

    _instance: ServiceMetrics | None = None

    def __init__(self, config: ServingConfig) -> None:
        import prometheus_client as prom

        self.requests = prom.Counter(
            "airmlops_requests", "Requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"])
        self.latency = prom.Histogram(
            "airmlops_request_duration_seconds", "Time to answer a request, by endpoint.",
            ["endpoint"], buckets=LATENCY_BUCKETS)
        self.errors = prom.Counter(
            "airmlops_request_errors", "Requests refused or failed, by endpoint and kind.",
            ["endpoint", "kind"])
        self.predictions = prom.Counter("airmlops_predictions", "Rows predicted.")
        self.synthetic = prom.Counter(
            "airmlops_synthetic_requests", "Synthetic /predict requests (answered, not logged), "
            "by kind (smoke, probe, replay-dry-run).", ["kind"])
        self.batch_requests = prom.Histogram(
            "airmlops_coalesced_requests", "Requests scored together in one model call.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.model_info = prom.Gauge(
            "airmlops_model_info", "The model this service serves (value 1).",
            ["pipeline", "model_name", "model_version", "run_id"], multiprocess_mode="max")
        self.model_info.labels(config.pipeline, config.model_name, config.model_version,
                               config.run_id or "").set(1)
        self.log_counters = {
            event: prom.Counter(f"airmlops_prediction_log_{event}", help_text)
            for event, help_text in (
                ("logged", "Prediction rows written to the prediction log."),
                ("labels_logged", "Labels written to the prediction log."),
                ("failed_writes", "Failed prediction-log writes (each retried)."),
                ("dropped", "Log entries dropped: the memory buffer or the spill directory "
                 "was full, or the spill file could not be written."),
            )
        }
        self.log_buffered = prom.Gauge(
            "airmlops_prediction_log_buffered", "Log entries in memory waiting to be written.",
            multiprocess_mode="livesum")
        self.log_spilled = prom.Gauge(
            "airmlops_prediction_log_spilled", "Log entries in spill files on disk, waiting "
            "for the backend (replayed in order once it answers).",
            multiprocess_mode="livesum")
        self.log_backend_up = prom.Gauge(
            "airmlops_prediction_log_backend_up", "1 when the last log write succeeded.",
            multiprocess_mode="livemin")
        self.log_backend_up.set(1)

    @classmethod
    def get(cls, config: ServingConfig) -> ServiceMetrics:
        if cls._instance is None:
            cls._instance = cls(config)
        return cls._instance

    def observe_log(self, event: str, amount: int) -> None:
        if event in self.log_counters:
            self.log_counters[event].inc(amount)
        elif event == "buffered":
            self.log_buffered.set(amount)
        elif event == "spilled":
            self.log_spilled.set(amount)
        elif event == "backend_up":
            self.log_backend_up.set(amount)

    def record(self, endpoint: str, status: int, seconds: float, kind: str | None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if kind is not None:
            self.errors.labels(endpoint, kind).inc()


_KIND_BY_STATUS = {400: "bad_request", 401: "unauthorized", 404: "not_found",
                   405: "method_not_allowed", 408: "timeout", 409: "conflict",
                   413: "body_too_large",
                   415: "unsupported_media_type", 422: "unknown_entity", 429: "overloaded",
                   500: "internal", 503: "unavailable", 504: "timeout"}


Refusal = tuple[int, str, str, dict[str, Any]]
"""(HTTP status, error kind, message, extra body fields) of a request refused at the edge."""


class RequestGate:
    """ASGI middleware in front of the service's endpoints (see the module docstring).

    For ``/predict`` and ``/feedback`` it reads the body (at most ``max_body_bytes``) and
    validates it with the request models. A valid ``/predict`` is then answered here, by the
    service's :class:`PredictHandler` (the direct lane: BentoML's own handler would parse the
    body a second time and cost more than the whole prediction); other valid requests reach
    BentoML, which is handed the same bytes. BentoML's middlewares (its metrics, access log,
    timeout and concurrency limit) wrap this one, so they apply to both. It also times and
    counts every request to those endpoints, and gives ``GET /readyz`` its JSON body
    (:meth:`_readyz`).
    """

    def __init__(self, app: Any, *, token: str, max_body_bytes: int, model_version: str,
                 validators: Mapping[str, type[BaseModel]],
                 metrics: Callable[[], ServiceMetrics | None],
                 predict: Callable[[], PredictHandler | None] = lambda: None,
                 log_stats: Callable[[], LogStats | None] = lambda: None) -> None:
        self.app = app
        self.log_stats = log_stats
        self.token = token.encode("utf-8") if token else b""
        self.max_body_bytes = max_body_bytes
        self.validators = dict(validators)
        self.metrics = metrics
        self.predict = predict
        self.version_header = (b"x-model-version", model_version.encode("ascii"))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in self.validators else None
        started = time.perf_counter()
        outcome: dict[str, Any] = {"status": 500, "kind": None}

        async def send_with_version(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.version_header]
                outcome["status"] = message["status"]
            await send(message)

        try:
            refusal, body, parsed = await self._check(scope, receive, path, endpoint)
            synthetic = None
            if refusal is None and endpoint == "/predict":
                synthetic, refusal = synthetic_kind(scope)
            handler = self.predict() if endpoint == "/predict" and parsed is not None else None
            if refusal is None and handler is not None:
                status, answer, headers = await self._direct(handler, parsed, synthetic)
                outcome["kind"] = _KIND_BY_STATUS.get(status, "error") if status >= 400 else None
                await _send_json(send_with_version, status, answer, headers)
            elif refusal is None and path == "/readyz" and scope["method"] == "GET":
                await self._readyz(scope, receive, send_with_version)
            elif refusal is None:
                downstream = receive if body is None else _replay(body, receive)
                await self.app(scope, downstream, send_with_version)
                status = outcome["status"]
                outcome["kind"] = _KIND_BY_STATUS.get(status, "error") if status >= 400 else None
            else:
                status, kind, message, extra = refusal
                outcome["kind"] = kind
                headers = {"WWW-Authenticate": 'Bearer realm="model"'} if status == 401 else {}
                await _send_json(send_with_version, status, error_body(kind, message, **extra),
                                 headers)
        finally:
            metrics = self.metrics()
            if endpoint is not None and metrics is not None:
                metrics.record(endpoint, outcome["status"], time.perf_counter() - started,
                               outcome["kind"])

    async def _readyz(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """BentoML's own readiness check (the service's ``__is_ready__``) gives the status
        code; its plain-text body is replaced by :func:`readiness_body`."""
        answered = {"status": 503}

        async def keep_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]

        await self.app(scope, receive, keep_status)
        status = answered["status"]
        await _send_json(send, status, readiness_body(status == 200, self.log_stats()))

    @staticmethod
    async def _direct(handler: PredictHandler, parsed: Any, synthetic: str | None
                      ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Answer a validated ``/predict``; an unexpected failure is a logged 500."""
        rows = [instance.model_dump(by_alias=True) for instance in parsed.instances]
        try:
            return await handler(rows, synthetic)
        except Exception:
            log.exception("Exception on /predict [POST]")
            return 500, error_body("internal", "an unexpected error occurred; see the service "
                                   "log"), {}

    async def _check(self, scope: dict[str, Any], receive: Any, path: str,
                     endpoint: str | None) -> tuple[Refusal | None, bytes | None, Any]:
        """(None, the body if it was read, the validated request if it was validated) when
        the request may pass, else (refusal, None, None)."""
        headers: dict[str, bytes] = {}
        for name, value in scope.get("headers", []):
            headers.setdefault(name.decode("latin-1").lower(), value)
        if self.token and path not in OPEN_PATHS:
            supplied = headers.get("authorization", b"")
            scheme, _, credentials = supplied.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(),
                                                                       self.token):
                reason = "invalid" if supplied else "missing"
                return (401, "unauthorized",
                        f"{reason} bearer token (send 'Authorization: Bearer <token>')",
                        {}), None, None
        media_type = headers.get("content-type", b"").decode("latin-1").split(";")[0]
        media_type = media_type.strip().lower()
        if media_type in PICKLE_MEDIA_TYPES or "pickle" in media_type:
            return (415, "unsupported_media_type",
                    f"content type {media_type!r} is refused: pickled payloads are never "
                    "deserialized; send JSON (application/json)", {}), None, None
        if endpoint is None:
            return None, None, None
        if scope["method"] != "POST":
            return (405, "method_not_allowed", f"{path} accepts POST only", {}), None, None
        if media_type != "application/json":
            return (415, "unsupported_media_type",
                    f"content type {media_type or 'none'!r} is not supported; send "
                    "application/json", {}), None, None
        declared = headers.get("content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                return (400, "bad_request", "Content-Length is not a number", {}), None, None
            if length > self.max_body_bytes:
                return (413, "body_too_large", f"body of {length} bytes exceeds the limit "
                        f"of {self.max_body_bytes} bytes", {}), None, None
        chunks = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return (400, "bad_request", "the client disconnected before the body ended",
                        {}), None, None
            chunks.extend(message.get("body", b""))
            if len(chunks) > self.max_body_bytes:
                return (413, "body_too_large",
                        f"body exceeds the limit of {self.max_body_bytes} bytes", {}), None, None
            if not message.get("more_body", False):
                break
        body = bytes(chunks)
        if not body.strip():
            return (400, "invalid_json", "the body is empty; send a JSON object", {}), None, None
        try:
            parsed = self.validators[endpoint].model_validate_json(body)
        except ValidationError as error:
            problems = error.errors(include_url=False)
            if problems and problems[0]["type"] == "json_invalid":
                reason = (problems[0].get("ctx") or {}).get("error", problems[0]["msg"])
                return (400, "invalid_json", f"the body is not valid JSON: {reason}",
                        {}), None, None
            detail = [{"loc": list(p["loc"]), "type": p["type"], "msg": p["msg"]}
                      for p in problems[:20]]
            return (422, "invalid_request", describe_errors(error), {"detail": detail}), None, \
                None
        return None, body, parsed


def synthetic_kind(scope: Mapping[str, Any]) -> tuple[str | None, Refusal | None]:
    """(the kind of a request marked synthetic or None, None), or (None, a 400 refusal) when
    the mark names no known kind (:mod:`airmlops.serving.synthetic`)."""
    from airmlops.serving.synthetic import SYNTHETIC_HEADER, SYNTHETIC_KINDS

    name = SYNTHETIC_HEADER.lower().encode("latin-1")
    for header, value in scope.get("headers", []):
        if header.lower() == name:
            kind = value.decode("latin-1").strip()
            if kind in SYNTHETIC_KINDS:
                return kind, None
            return None, (400, "invalid_header",
                          f"{SYNTHETIC_HEADER}: {kind[:40]!r} is not a synthetic traffic kind; "
                          f"expected one of {list(SYNTHETIC_KINDS)}", {})
    return None, None


async def _send_json(send: Any, status: int, body: Mapping[str, Any],
                     headers: Mapping[str, str] | None = None) -> None:
    """Answer with a JSON body straight on the ASGI ``send`` (no Response object)."""
    content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
    raw = [(b"content-type", b"application/json"),
           (b"content-length", str(len(content)).encode("ascii"))]
    raw += [(name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": content})


def _replay(body: bytes, receive: Any) -> Callable[[], Any]:
    """A ``receive`` that hands over the already-read body once, then the client's events."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class ClientErrorFilter(logging.Filter):
    """Demote BentoML's ERROR-with-traceback for a request that failed validation (a client's
    mistake, already answered with a 4xx) to one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.exc_info:
            error = record.exc_info[1]
            if isinstance(error, ValidationError):
                record.levelno, record.levelname = logging.INFO, "INFO"
                record.msg = f"{record.getMessage()}: client error ({error.error_count()} " \
                    "validation error(s))"
                record.args = None
                record.exc_info = None
                record.exc_text = None
        return True


def install_log_filter() -> None:
    """Attach :class:`ClientErrorFilter` to BentoML's request-error loggers (idempotent)."""
    for name in ("bentoml._internal.server.http_app", "bentoml.serve"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
            logger.addFilter(ClientErrorFilter())


# --- the BentoML service ---------------------------------------------------------------------


def freeze_startup_objects() -> None:
    """Move everything loaded so far (libraries, the app, the model) out of the garbage
    collector's reach.

    A full collection walks every tracked object: in a worker with scikit-learn, pandas and
    BentoML loaded that took ~200 ms here, a pause every request in flight waits for (the p99).
    Frozen objects are never scanned again; what requests allocate is collected as usual.
    """
    import gc

    gc.collect()
    gc.freeze()


def install_http_limits(serving: ServingSettings) -> None:
    """Hold clients of this process's uvicorn (built later by BentoML's worker) to the
    service's :class:`~airmlops.serving.http_limits.HttpLimits`: 431, 413, 408, 503."""
    from airmlops.serving.http_limits import HttpLimits, install_as_uvicorn_default

    install_as_uvicorn_default(HttpLimits(
        max_header_bytes=serving.max_header_bytes, max_header_count=serving.max_header_count,
        max_body_bytes=serving.max_body_bytes, header_timeout_s=serving.header_timeout_s,
        body_timeout_s=serving.body_timeout_s, keep_alive_s=serving.keep_alive_s,
        max_connections=serving.max_connections))


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

    ts_us = _now_us(runtime.clock)
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


def _now_us(clock: Callable[[], float]) -> int:
    return int(clock() * 1_000_000)


def create_service(config_path: Path | str, *, settings: Settings | None = None,
                   serving: ServingSettings | None = None) -> Any:
    """The BentoML service of the bento whose ``serving.json`` is ``config_path``.

    Reads the config, the spec copy beside it and the settings; the model, the online store
    and the prediction log are opened when BentoML starts the service instance (per worker).
    """
    import bentoml

    from airmlops.settings import Settings

    config_path = Path(config_path).resolve()
    root = config_path.parent
    config = ServingConfig.read(config_path)
    spec = load_bento_spec(root, config)
    settings = settings or Settings()
    serving = serving or settings.serving
    predict_model, feedback_model = request_models(spec, serving.max_instances)
    install_log_filter()
    install_http_limits(serving)

    state: dict[str, Any] = {"metrics": None, "predict": None, "log": None}

    class ModelService:
        """Predictions of one registered model version, with online and on-demand features."""

        def __init__(self) -> None:
            from airmlops.features.online import make_online_store
            from airmlops.serving.prediction_log import open_backend, open_log

            install_log_filter()
            started = time.perf_counter()
            metrics = ServiceMetrics.get(config)
            state["metrics"] = metrics
            model = load_model(root, config)
            store = make_online_store(settings, spec.name)
            prediction_log = open_log(spec.name, settings, observer=metrics.observe_log)
            state["log"] = prediction_log
            self.runtime = ServingRuntime(config, spec, model, store, prediction_log,
                                          fast_path=serving.fast_path,
                                          label_backend=open_backend(spec.name, settings))
            self.metrics = metrics
            self.coalescer = Coalescer(self.runtime.score, serving.max_batch_rows,
                                       metrics.batch_requests.observe) if serving.batching \
                else None
            self.handler = PredictHandler(self.runtime, self.coalescer, metrics)
            if serving.direct:
                state["predict"] = self.handler
            # BentoML shows its own loggers' INFO lines, so the startup summary goes there.
            logging.getLogger("bentoml.serve").info(
                "model %s version %s loaded in %.2fs; online store %s; prediction log %s; "
                "scoring %s", config.model_name, config.model_version,
                time.perf_counter() - started, store.location, prediction_log.backend.location,
                self.runtime.fast.description if self.runtime.fast else "with the Pipeline")
            freeze_startup_objects()

        @bentoml.api(route="/predict", input_spec=predict_model, output_spec=PredictResponse)
        async def predict(self, instances: list[Any], ctx) -> Any:
            """Predict for 1..N entities: online + on-demand features, the model, the log.

            (Normally answered by the request gate's direct lane with the same handler; the
            gate has checked the synthetic mark. ``ctx`` is BentoML's request context, which
            BentoML recognises by the name of an unannotated parameter.)"""
            from airmlops.serving.synthetic import SYNTHETIC_HEADER

            rows = [instance.model_dump(by_alias=True) for instance in instances]
            status, body, headers = await self.handler(
                rows, ctx.request.headers.get(SYNTHETIC_HEADER))
            return _json_response(status, body, headers)

        @bentoml.api(route="/feedback", input_spec=feedback_model,
                     output_spec=FeedbackResponse)
        async def feedback(self, request_id: str, labels: list[Any],
                           overwrite: bool = False) -> Any:
            """Record labels that arrived later for the entities of an earlier request (see
            :meth:`ServingRuntime.claim_labels`): at most one per (request id, entity)."""
            status, body, headers = await claim_labels_waiting(
                self.runtime, request_id, [item.model_dump() for item in labels],
                overwrite=overwrite, wait_s=serving.feedback_wait_s)
            if status == 202:
                self.metrics.observe_log("labels_logged", body["accepted"])
            return _json_response(status, body, headers)

        async def __is_ready__(self) -> bool:
            import anyio.to_thread

            try:
                return await anyio.to_thread.run_sync(self.runtime.check_ready)
            except Exception as error:
                log.warning("not ready: online store check failed: %s", error)
                return False

        @bentoml.on_shutdown
        def close(self) -> None:
            self.runtime.close()

    untraced = [*sorted(OPEN_PATHS), *([] if serving.trace_predict else ["/predict"])]
    service = bentoml.service(
        name=f"{spec.name}_model",
        workers=serving.workers,
        traffic={"timeout": serving.timeout_s, "max_concurrency": serving.max_concurrency},
        tracing={"excluded_urls": untraced},
        labels={"pipeline": spec.name, "model_name": config.model_name,
                "model_version": config.model_version},
    )(ModelService)
    service.add_asgi_middleware(
        RequestGate,
        token=serving.token.get_secret_value(),
        max_body_bytes=serving.max_body_bytes,
        model_version=config.model_version,
        validators={"/predict": predict_model, "/feedback": feedback_model},
        metrics=lambda: state["metrics"],
        predict=lambda: state["predict"],
        log_stats=lambda: state["log"].stats() if state["log"] is not None else None,
    )
    return service


def _is_connection_error(error: BaseException) -> bool:
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
    if _is_connection_error(error) or isinstance(error, OSError):
        return True
    try:
        import redis.exceptions as redis_errors
    except ImportError:  # pragma: no cover - redis is a requirement of the service
        return False
    return isinstance(error, (redis_errors.ReadOnlyError, redis_errors.OutOfMemoryError,
                              redis_errors.MasterDownError, redis_errors.TryAgainError,
                              redis_errors.ClusterDownError))
