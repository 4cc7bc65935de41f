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
- A ``/predict`` marked ``X-Airmlops-Synthetic: <kind>`` is answered but not logged
  (:mod:`~airmlops.serving.synthetic`); one marked ``X-Airmlops-Shadow-Of: <live request id>``
  (a copy the stable-address proxy mirrors to a challenger,
  :mod:`~airmlops.serving.shadow_header`) is answered under that id and logged to the shadow
  log only (:mod:`airmlops.serving.prediction_log.shadow`). A malformed mark, or both, is 400.
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

The jobs live in their own modules, all re-exported here: :mod:`~airmlops.serving.config`
(``serving.json``, the model, the spec copy), :mod:`~airmlops.serving.schemas` (request and
response bodies), :mod:`~airmlops.serving.runtime` (scoring, answers, labels),
:mod:`~airmlops.serving.predict` (coalescing and ``/predict``), :mod:`~airmlops.serving.gate`
(the HTTP edge), :mod:`~airmlops.serving.metrics` (Prometheus) and
:mod:`~airmlops.serving.process_setup` (logging, HTTP limits, garbage collector); this module
assembles them into the BentoML service (:func:`create_service`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airmlops.model_files import ModelLoadError
from airmlops.serving.config import CONFIG_FILE, ServingConfig, load_bento_spec, load_model
from airmlops.serving.gate import (
    OPEN_PATHS,
    PICKLE_MEDIA_TYPES,
    RECENT_DROP_S,
    Refusal,
    RequestGate,
    readiness_body,
    shadow_of,
    synthetic_kind,
    traffic_marks,
)
from airmlops.serving.metrics import LATENCY_BUCKETS, ServiceMetrics
from airmlops.serving.predict import Coalescer, PredictHandler
from airmlops.serving.process_setup import (
    ClientErrorFilter,
    freeze_startup_objects,
    install_http_limits,
    install_log_filter,
)
from airmlops.serving.runtime import (
    FEEDBACK_RETRY_AFTER_S,
    Scored,
    ServingRuntime,
    claim_labels_waiting,
)
from airmlops.serving.schemas import (
    ENTITY_MAX_LENGTH,
    BinaryLabelItem,
    EntityId,
    FeedbackResponse,
    LabelItem,
    PredictionItem,
    PredictResponse,
    describe_errors,
    error_body,
    request_models,
)
from airmlops.settings import ServingSettings, Settings

if TYPE_CHECKING:
    from pydantic import BaseModel

    from airmlops.serving.prediction_log import PredictionLog
    from airmlops.spec import PipelineSpec

__all__ = [
    "CONFIG_FILE", "ENTITY_MAX_LENGTH", "FEEDBACK_RETRY_AFTER_S", "LATENCY_BUCKETS",
    "OPEN_PATHS", "PICKLE_MEDIA_TYPES", "RECENT_DROP_S", "BinaryLabelItem", "ClientErrorFilter",
    "Coalescer", "EntityId", "FeedbackResponse", "LabelItem", "ModelLoadError",
    "PredictHandler", "PredictResponse", "PredictionItem", "Refusal", "RequestGate", "Scored",
    "ServiceMetrics", "ServingConfig", "ServingRuntime", "ServingSettings",
    "claim_labels_waiting", "create_service", "describe_errors", "error_body",
    "freeze_startup_objects", "install_http_limits", "install_log_filter", "load_bento_spec",
    "load_model", "readiness_body", "request_models", "shadow_of", "synthetic_kind",
    "traffic_marks",
]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class _Bento:
    """What :func:`create_service` reads once per process: the bento's config and spec, the
    settings, and the request models built from the spec."""

    root: Path
    config: ServingConfig
    spec: PipelineSpec
    settings: Settings
    serving: ServingSettings
    predict_model: type[BaseModel]
    feedback_model: type[BaseModel]


@dataclasses.dataclass
class _Instance:
    """What the request gate needs of this worker's service instance, set when BentoML
    starts it (None before)."""

    metrics: ServiceMetrics | None = None
    predict: PredictHandler | None = None
    log: PredictionLog | None = None


def create_service(config_path: Path | str, *, settings: Settings | None = None,
                   serving: ServingSettings | None = None) -> Any:
    """The BentoML service of the bento whose ``serving.json`` is ``config_path``.

    Reads the config, the spec copy beside it and the settings; the model, the online store
    and the prediction log are opened when BentoML starts the service instance (per worker).
    """
    config_path = Path(config_path).resolve()
    root = config_path.parent
    config = ServingConfig.read(config_path)
    spec = load_bento_spec(root, config)
    settings = settings or Settings()
    serving = serving or settings.serving
    predict_model, feedback_model = request_models(spec, serving.max_instances)
    install_log_filter()
    install_http_limits(serving)
    bento = _Bento(root, config, spec, settings, serving, predict_model, feedback_model)
    instance = _Instance()
    return _bento_service(bento, instance, _model_service_class(bento, instance))


def _start_instance(bento: _Bento, instance: _Instance) -> PredictHandler:
    """Open the model, the online store and the prediction log of a service instance (in the
    worker); its ``/predict`` handler, which the gate's direct lane uses if enabled."""
    from airmlops.features.online import make_online_store
    from airmlops.serving.prediction_log import open_backend, open_log, open_shadow_log

    config, spec, settings, serving = bento.config, bento.spec, bento.settings, bento.serving
    install_log_filter()
    started = time.perf_counter()
    metrics = ServiceMetrics.get(config)
    instance.metrics = metrics
    model = load_model(bento.root, config)
    store = make_online_store(settings, spec.name)
    prediction_log = open_log(spec.name, settings, observer=metrics.observe_log)
    instance.log = prediction_log
    runtime = ServingRuntime(config, spec, model, store, prediction_log,
                             fast_path=serving.fast_path,
                             label_backend=open_backend(spec.name, settings),
                             shadow_log=functools.partial(
                                 open_shadow_log, spec.name, settings,
                                 observer=metrics.observe_shadow_log))
    coalescer = Coalescer(runtime.score, serving.max_batch_rows,
                          metrics.batch_requests.observe) if serving.batching else None
    handler = PredictHandler(runtime, coalescer, metrics)
    if serving.direct:
        instance.predict = handler
    # BentoML shows its own loggers' INFO lines, so the startup summary goes there.
    logging.getLogger("bentoml.serve").info(
        "model %s version %s loaded in %.2fs; online store %s; prediction log %s; "
        "scoring %s", config.model_name, config.model_version,
        time.perf_counter() - started, store.location, prediction_log.backend.location,
        runtime.fast.description if runtime.fast else "with the Pipeline")
    freeze_startup_objects()
    return handler


def _model_service_class(bento: _Bento, instance: _Instance) -> type:
    """The class BentoML instantiates once per worker, its API methods typed by the bento's
    request models."""
    import bentoml

    serving = bento.serving

    class ModelService:
        """Predictions of one registered model version, with online and on-demand features."""

        def __init__(self) -> None:
            self.handler = _start_instance(bento, instance)
            self.runtime = self.handler.runtime
            self.coalescer = self.handler.coalescer
            self.metrics = self.handler.metrics

        @bentoml.api(route="/predict", input_spec=bento.predict_model,
                     output_spec=PredictResponse)
        async def predict(self, instances: list[Any], ctx) -> Any:
            """Predict for 1..N entities: online + on-demand features, the model, the log.

            (Normally answered by the request gate's direct lane with the same handler; the
            gate has checked the synthetic and shadow marks. ``ctx`` is BentoML's request
            context, which BentoML recognises by the name of an unannotated parameter.)"""
            from airmlops.serving.shadow_header import SHADOW_HEADER
            from airmlops.serving.synthetic import SYNTHETIC_HEADER

            rows = [row.model_dump(by_alias=True) for row in instances]
            shadow = ctx.request.headers.get(SHADOW_HEADER)
            status, body, headers = await self.handler(
                rows, ctx.request.headers.get(SYNTHETIC_HEADER),
                shadow.strip() if shadow is not None else None)
            return _json_response(status, body, headers)

        @bentoml.api(route="/feedback", input_spec=bento.feedback_model,
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
            """The online store answers (in a thread); BentoML's ``/readyz`` status."""
            import anyio.to_thread

            try:
                return await anyio.to_thread.run_sync(self.runtime.check_ready)
            except Exception as error:
                log.warning("not ready: online store check failed: %s", error)
                return False

        @bentoml.on_shutdown
        def close(self) -> None:
            """Close the runtime's stores when BentoML stops the worker."""
            self.runtime.close()

    return ModelService


def _bento_service(bento: _Bento, instance: _Instance, model_service: type) -> Any:
    """``model_service`` as a BentoML service with the bento's traffic and tracing settings,
    behind the :class:`RequestGate`."""
    import bentoml

    spec, config, serving = bento.spec, bento.config, bento.serving
    untraced = [*sorted(OPEN_PATHS), *([] if serving.trace_predict else ["/predict"])]
    service = bentoml.service(
        name=f"{spec.name}_model",
        workers=serving.workers,
        traffic={"timeout": serving.timeout_s, "max_concurrency": serving.max_concurrency},
        tracing={"excluded_urls": untraced},
        labels={"pipeline": spec.name, "model_name": config.model_name,
                "model_version": config.model_version},
    )(model_service)
    service.add_asgi_middleware(
        RequestGate,
        token=serving.token.get_secret_value(),
        max_body_bytes=serving.max_body_bytes,
        model_version=config.model_version,
        validators={"/predict": bento.predict_model, "/feedback": bento.feedback_model},
        metrics=lambda: instance.metrics,
        predict=lambda: instance.predict,
        log_stats=lambda: instance.log.stats() if instance.log is not None else None,
    )
    return service


def _json_response(status: int, body: Mapping[str, Any],
                   headers: Mapping[str, str] | None = None) -> Any:
    """A JSON response for BentoML's API methods (the gate answers on the raw ASGI ``send``)."""
    from starlette.responses import Response

    return Response(json.dumps(body, separators=(",", ":"), allow_nan=False), status_code=status,
                    headers=dict(headers or {}), media_type="application/json")
