"""The service's Prometheus metrics: requests, latency and errors by endpoint, predictions,
synthetic and shadow requests, coalesced batch sizes, the model served and the counters of the
prediction log and the shadow log (:class:`ServiceMetrics`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airmlops.serving.config import ServingConfig

LATENCY_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                   0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


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
        self.shadow = prom.Counter(
            "airmlops_shadow_requests", "Shadow /predict requests (mirrored copies of live "
            "ones, answered and written to the shadow log, never to the live one).")
        self.shadow_log_counters = {
            event: prom.Counter(f"airmlops_shadow_log_{event}", help_text)
            for event, help_text in (
                ("logged", "Shadow rows written to the shadow log."),
                ("failed_writes", "Failed shadow-log writes (each retried)."),
                ("dropped", "Shadow rows dropped (best-effort: the shadow log's memory buffer "
                 "was full while its backend was down, or the service stopped)."),
            )
        }
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
                ("quarantined", "Log entries the backend refused while it answered, set aside "
                 "in the spill directory's quarantine folder (never retried by themselves)."),
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
        """This process's metrics, created on first use."""
        if cls._instance is None:
            cls._instance = cls(config)
        return cls._instance

    def observe_log(self, event: str, amount: int) -> None:
        """The prediction log's observer: a counter event, or a gauge's new value."""
        if event in self.log_counters:
            self.log_counters[event].inc(amount)
        elif event == "buffered":
            self.log_buffered.set(amount)
        elif event == "spilled":
            self.log_spilled.set(amount)
        elif event == "backend_up":
            self.log_backend_up.set(amount)

    def observe_shadow_log(self, event: str, amount: int) -> None:
        """The shadow log's observer: its counter events (its gauges are not exported; the
        live log's ``backend_up`` tells whether the shared backend answers)."""
        if event in self.shadow_log_counters:
            self.shadow_log_counters[event].inc(amount)

    def record(self, endpoint: str, status: int, seconds: float, kind: str | None) -> None:
        """One answered request: its status, its time and, if refused or failed, its kind."""
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if kind is not None:
            self.errors.labels(endpoint, kind).inc()
