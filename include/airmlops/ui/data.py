"""What the MLOps view shows for each pipeline, gathered quickly and never hanging.

Three sources per pipeline, read side by side in a small shared thread pool, each bounded by one
deadline (:data:`DEFAULT_DEADLINE_SECONDS`):

- the registry: the ``champion`` and ``challenger`` versions with their lineage tags and the
  test metrics of the runs that produced them, read by
  :func:`airmlops.training.registry_rest.registry_reader` (MLflow's REST API with a short
  timeout per call and no retries for an ``http(s)`` tracking URI, else ``MlflowClient``);
- the deployment: :func:`airmlops.serving.deploy.status` (recorded state plus what is alive and
  ready now); when the live check runs out of time, the recorded state is shown as such;
- monitoring: the last windows of :class:`airmlops.monitoring.store.MonitoringStore`, with
  their numbers, decisions and whether their Evidently report can be served.

A missing piece (no champion yet, nothing deployed, no window) is an empty value, not an error;
a source that fails or times out carries an ``error`` string for the page to show. Nothing here
writes: a pipeline whose monitoring table does not exist is not created by looking at it.
The view models themselves are in :mod:`airmlops.ui.views` (importable from here too).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from airmlops.names import NAME_RE
from airmlops.paths import safe_join
from airmlops.spec import PipelineSpec, load_spec, spec_paths
from airmlops.training.registry import CHALLENGER, CHAMPION, MODEL_NAME_RE, RUN_ID_RE
from airmlops.training.registry_rest import (
    MLFLOW_CALL_TIMEOUT_SECONDS,
    ClientRegistry,
    RegistryError,
    RegistryReader,
    RestRegistry,
    registry_reader,
)
from airmlops.ui.canary import canary_view, relabelled_comparison, shadow_view
from airmlops.ui.views import (
    DETAIL_KEYS,
    LINEAGE_KEYS,
    CanaryStepView,
    CanaryView,
    DeploymentView,
    ModelVersionView,
    MonitoringView,
    Overview,
    PipelineView,
    RegistryView,
    SlotView,
    WindowView,
)

__all__ = [
    "ALIASES", "CHALLENGER", "CHAMPION", "DEFAULT_DEADLINE_SECONDS", "DEFAULT_WINDOWS",
    "DETAIL_KEYS", "LINEAGE_KEYS", "MLFLOW_CALL_TIMEOUT_SECONDS", "CanaryStepView",
    "CanaryView", "ClientRegistry",
    "DeploymentView", "ModelVersionView", "MonitoringView", "Overview", "PipelineView",
    "RegistryError", "RegistryReader", "RegistryView", "RestRegistry", "SlotView", "WindowView",
    "collect_overview", "live_deployment", "load_pipelines", "mlflow_ui_base",
    "pipeline_dag_ids", "pipeline_of_dag", "read_monitoring", "read_registry",
    "recorded_deployment", "registry_reader", "report_file", "window_report",
]

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_SECONDS = 5.0
"""How long the page waits for all sources of all pipelines together."""
DEFAULT_WINDOWS = 20
"""How many recent monitoring windows a pipeline card shows."""
POOL_WORKERS = 8

ALIASES = (CHAMPION, CHALLENGER)
METRIC_PREFIX = "test_"
REPORT_SUFFIXES = (".html", ".htm")

_VERSION = re.compile(r"^[0-9]{1,10}$")
_EXPERIMENT_ID = re.compile(r"^[0-9]{1,20}$")

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


def load_pipelines(pipelines_dir: Path) -> tuple[list[PipelineSpec], list[str]]:
    """The valid specs of ``pipelines_dir`` and the file names of the invalid ones."""
    specs: list[PipelineSpec] = []
    invalid: list[str] = []
    for path in spec_paths(Path(pipelines_dir)):
        try:
            specs.append(load_spec(path))
        except Exception:  # any bad spec is skipped, never fatal
            log.warning("MLOps view: pipeline spec %s is invalid; it is not shown", path)
            invalid.append(path.name)
    return specs, invalid


def pipeline_dag_ids(spec: PipelineSpec) -> dict[str, str]:
    """The DAGs of a pipeline by role, as the DAG factory names them."""
    dags = {"training": spec.training_dag_id}
    if spec.feature_store is not None:
        dags["features"] = spec.features_dag_id
    dags["monitoring"] = f"{spec.name}_monitoring"
    dags["rollback"] = f"{spec.name}_rollback"
    return dags


def pipeline_of_dag(specs: Iterable[PipelineSpec], dag_id: str) -> PipelineSpec | None:
    """The pipeline a DAG belongs to: its id starts with ``<pipeline>_`` (longest name wins)."""
    matches = [s for s in specs if dag_id.startswith(f"{s.name}_")]
    return max(matches, key=lambda s: len(s.name), default=None)


# --------------------------------------------------------------------------------------------
# Registry (MLflow)
# --------------------------------------------------------------------------------------------


def mlflow_ui_base(tracking_uri: str, ui_url: str | None = None) -> str | None:
    """Where people open the MLflow UI: ``ui_url`` if given, else an ``http(s)`` tracking URI."""
    for candidate in (ui_url, tracking_uri):
        if candidate and candidate.startswith(("http://", "https://")):
            return candidate.rstrip("/")
    return None


def read_registry(reader: RegistryReader, model_name: str, ui_base: str | None) -> RegistryView:
    """Champion and challenger of ``model_name`` with their runs' metrics and lineage."""
    if not MODEL_NAME_RE.match(model_name):
        return RegistryView(model_name, error="not a valid registered model name")
    model_url = f"{ui_base}/#/models/{quote(model_name, safe='')}" if ui_base else None
    try:
        aliases = reader.aliases(model_name)
        if aliases is None:
            return RegistryView(model_name, model_url=None)
        views: dict[str, ModelVersionView | None] = {}
        runs: dict[str, dict[str, Any] | None] = {}
        for alias in ALIASES:
            version = aliases.get(alias)
            if version is None or not _VERSION.match(version):
                views[alias] = None
                continue
            found = reader.model_version(model_name, version)
            run_id = found.get("run_id")
            run_id = run_id if isinstance(run_id, str) and RUN_ID_RE.match(run_id) else None
            if run_id is not None and run_id not in runs:
                runs[run_id] = reader.run(run_id)
            views[alias] = _version_view(alias, model_name, found,
                                         runs.get(run_id) if run_id else None, ui_base)
    except RegistryError as exc:
        return RegistryView(model_name, model_url=model_url, error=str(exc))
    except Exception as exc:  # an MLflow client error of any kind must not break the page
        log.warning("MLOps view: reading the registry of %s failed", model_name, exc_info=True)
        return RegistryView(model_name, model_url=model_url,
                            error=f"reading MLflow failed ({type(exc).__name__})")
    return RegistryView(model_name, champion=views[CHAMPION], challenger=views[CHALLENGER],
                        model_url=model_url)


def _version_view(alias: str, model_name: str, version: Mapping[str, Any],
                  run: Mapping[str, Any] | None, ui_base: str | None) -> ModelVersionView:
    """The view of one aliased version and its run (None when the run is gone)."""
    number = str(version.get("version", ""))
    version_tags = _pairs(version.get("tags"))
    run_info = (run or {}).get("info") or {}
    run_data = (run or {}).get("data") or {}
    run_tags = _pairs(run_data.get("tags"))
    tags = {**run_tags, **version_tags}  # the version's tags win (containerize/deploy add some)
    metrics = {}
    for key, value in _pairs(run_data.get("metrics"), value_type=float).items():
        if key.startswith(METRIC_PREFIX):
            metrics[key.removeprefix(METRIC_PREFIX)] = value
    run_id = version.get("run_id") if isinstance(version.get("run_id"), str) else None
    experiment_id = str(run_info.get("experiment_id") or "") or None
    run_url = None
    if ui_base and run_id and experiment_id and _EXPERIMENT_ID.match(experiment_id):
        run_url = f"{ui_base}/#/experiments/{experiment_id}/runs/{run_id}"
    version_url = None
    if ui_base and _VERSION.match(number):
        version_url = f"{ui_base}/#/models/{quote(model_name, safe='')}/versions/{number}"
    created = version.get("creation_timestamp")
    return ModelVersionView(
        alias=alias,
        version=number,
        aliases=tuple(sorted(str(a) for a in version.get("aliases") or [])),
        status=str(version["status"]) if version.get("status") else None,
        created_at=_from_millis(created),
        run_id=run_id,
        experiment_id=experiment_id,
        metrics=dict(sorted(metrics.items())),
        lineage={k: tags[k] for k in LINEAGE_KEYS if k in tags},
        details={k: tags[k] for k in DETAIL_KEYS if k in tags},
        version_url=version_url,
        run_url=run_url,
    )


def _pairs(items: Any, value_type: Callable[[Any], Any] = str) -> dict[str, Any]:
    """MLflow's ``[{"key": k, "value": v}]`` lists as a dict (malformed entries skipped)."""
    result: dict[str, Any] = {}
    for item in items or []:
        if not isinstance(item, dict) or "key" not in item or "value" not in item:
            continue
        try:
            result[str(item["key"])] = value_type(item["value"])
        except (TypeError, ValueError):
            continue
    return result


def _from_millis(value: Any) -> str | None:
    """An epoch-milliseconds value as an ISO UTC time; None when it is not one."""
    try:
        return dt.datetime.fromtimestamp(int(value) / 1000, tz=dt.UTC).isoformat()
    except (TypeError, ValueError, OverflowError, OSError):
        return None


# --------------------------------------------------------------------------------------------
# Deployment
# --------------------------------------------------------------------------------------------


def live_deployment(pipeline: str, data_root: Path, task_type: str | None = None,
                    now: dt.datetime | None = None) -> DeploymentView:
    """The deployment of ``pipeline`` as recorded plus what is alive and ready now (and, given
    the ``task_type``, its last shadow compared again with the labels received until ``now``).

    Can take seconds (it probes the proxy and each slot): run it under a deadline and fall back
    to :func:`recorded_deployment`.
    """
    from airmlops.serving import deploy

    try:
        if not deploy.state_path(pipeline, data_root).is_file():
            return DeploymentView(deployed=False)
    except ValueError as exc:
        return DeploymentView(deployed=False, error=str(exc))
    status = deploy.status(pipeline, data_root)
    relabelled = (relabelled_comparison(pipeline, task_type, status.get("shadow"), data_root,
                                        now or dt.datetime.now(dt.UTC)) if task_type else None)
    return _deployment_from_status(status, relabelled)


def recorded_deployment(pipeline: str, data_root: Path, note: str) -> DeploymentView:
    """The recorded deployment only (no probing), with ``note`` saying why."""
    from airmlops.serving import deploy

    try:
        if not deploy.state_path(pipeline, data_root).is_file():
            return DeploymentView(deployed=False, error=note)
        state = deploy.load_state(pipeline, data_root)
    except Exception as exc:
        return DeploymentView(deployed=False, error=f"deployment state unreadable: {exc}")
    return dataclasses.replace(_deployment_from_state(state), error=note)


def _deployment_from_status(status: Mapping[str, Any],
                            relabelled: Mapping[str, Any] | None = None) -> DeploymentView:
    """The view of a live :func:`airmlops.serving.deploy.status`."""
    active = status.get("active")
    proxy = status.get("proxy") or {}
    slots = []
    for slot, record in sorted((status.get("slots") or {}).items()):
        if not record:
            continue
        slots.append(_slot_view(slot, record, slot == active, record.get("alive"),
                                record.get("ready")))
    return DeploymentView(
        deployed=bool(status.get("stable_url") or active),
        stable_url=_str_or_none(status.get("stable_url")),
        active_slot=_str_or_none(active),
        active_version=_str_or_none(status.get("active_version")),
        switched_at=_str_or_none(status.get("switched_at")),
        proxy_alive=bool(proxy.get("alive")) if proxy else None,
        live_checked=True,
        slots=tuple(slots),
        canary=canary_view(status.get("canary")),
        shadow=shadow_view(status.get("shadow"), relabelled),
    )


def _deployment_from_state(state: Mapping[str, Any]) -> DeploymentView:
    """The view of the recorded deployment state alone (nothing probed)."""
    active = state.get("active")
    proxy = state.get("proxy") or {}
    slots_state = state.get("slots") or {}
    slots = [_slot_view(slot, record, slot == active, None, None)
             for slot, record in sorted(slots_state.items()) if record]
    active_record = slots_state.get(active) or {} if active else {}
    return DeploymentView(
        deployed=bool(proxy.get("url") or active),
        stable_url=_str_or_none(proxy.get("url")),
        active_slot=_str_or_none(active),
        active_version=_str_or_none(active_record.get("model_version")),
        switched_at=_str_or_none(state.get("switched_at")),
        live_checked=False,
        slots=tuple(slots),
        canary=canary_view(state.get("canary")),
        shadow=shadow_view(state.get("shadow")),
    )


def _slot_view(slot: str, record: Mapping[str, Any], active: bool, alive: Any, ready: Any
               ) -> SlotView:
    """The view of one slot record; ``alive``/``ready`` None when not probed."""
    return SlotView(
        slot=str(slot), active=active,
        version=_str_or_none(record.get("model_version")),
        target=_str_or_none(record.get("target")),
        artifact=_str_or_none(record.get("artifact")),
        upstream=_str_or_none(record.get("upstream")),
        started_at=_str_or_none(record.get("started_at")),
        alive=None if alive is None else bool(alive),
        ready=None if ready is None else bool(ready),
    )


def _str_or_none(value: Any) -> str | None:
    """``value`` as a string; None for None or an empty string."""
    return None if value is None or value == "" else str(value)


# --------------------------------------------------------------------------------------------
# Monitoring
# --------------------------------------------------------------------------------------------


def read_monitoring(spec: PipelineSpec, data_root: Path, reports_dir: Path,
                    n: int = DEFAULT_WINDOWS) -> MonitoringView:
    """The last ``n`` windows of ``spec``'s pipeline (oldest first) and its thresholds."""
    from airmlops.monitoring.config import HIGHER_IS_BETTER, METRICS_BY_TASK
    from airmlops.monitoring.store import MonitoringStore

    performance = spec.monitoring.performance
    metric = performance.metric
    if metric is None:
        task_metrics = METRICS_BY_TASK.get(spec.task, ())
        primary = spec.gates.primary_metric
        metric = primary if primary in task_metrics else (task_metrics[0] if task_metrics
                                                          else None)
    floor = performance.min if performance.min is not None else performance.max
    base = MonitoringView(
        drift_threshold=spec.monitoring.policy.max_drift_share,
        performance_metric=metric,
        performance_floor=floor if performance.metric is not None else None,
        floor_is_minimum=HIGHER_IS_BETTER.get(metric or "", True),
    )
    store = MonitoringStore(data_root)
    try:
        if not store.path(spec.name).is_file():
            return base
        records = store.history(spec.name, n)
        rows = [store.window(spec.name, record.window_id) for record in records]
    except Exception as exc:
        log.warning("MLOps view: reading the monitoring table of %s failed", spec.name,
                    exc_info=True)
        return dataclasses.replace(
            base, error=f"monitoring table unreadable ({type(exc).__name__})")
    windows = tuple(_window_view(row, reports_dir) for row in rows if row is not None)
    return dataclasses.replace(base, windows=windows)


def _window_view(row: Mapping[str, Any], reports_dir: Path) -> WindowView:
    """The view of one monitoring table row."""
    columns = row.get("columns") or {}
    drifted = tuple(sorted(name for name, result in columns.items()
                           if isinstance(result, dict) and result.get("drifted")))
    prediction = row.get("prediction_drift") or {}
    performance = _metrics(row.get("performance"))
    estimated = row.get("estimated_performance")
    estimated_rows = estimated.get("rows") if isinstance(estimated, dict) else None
    return WindowView(
        window_id=str(row["window_id"]),
        start=str(row.get("start") or ""),
        end=str(row.get("end") or ""),
        rows=row.get("rows"),
        label_count=row.get("label_count"),
        drift_share=_float_or_none(row.get("drift_share")),
        drifted_columns=drifted,
        prediction_drift=_float_or_none(prediction.get("score")) if isinstance(prediction, dict)
        else None,
        performance=performance,
        breaches=tuple(str(b) for b in row.get("breaches") or []),
        decision=_str_or_none(row.get("decision")),
        reason=_str_or_none(row.get("reason")),
        triggered_run_id=_str_or_none(row.get("triggered_run_id")),
        has_report=report_file(reports_dir, row.get("html_path")) is not None,
        notes=tuple(str(n) for n in row.get("notes") or []),
        estimated_performance={k: v for k, v in _metrics(estimated).items() if k != "rows"},
        estimated_rows=estimated_rows if isinstance(estimated_rows, int)
        and not isinstance(estimated_rows, bool) and estimated_rows >= 0 else None,
    )


def _metrics(values: Any) -> dict[str, float]:
    """A recorded ``{metric: value}`` mapping, its finite real numbers only ({} if none)."""
    if not isinstance(values, dict):
        return {}
    return {str(k): float(v) for k, v in values.items()
            if _float_or_none(v) is not None and math.isfinite(v)}


def _float_or_none(value: Any) -> float | None:
    """``value`` as a float when it is a real number (not a bool); else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def report_file(reports_dir: Path, html_path: Any) -> Path | None:
    """The window's Evidently HTML file, if it exists and lies under ``reports_dir``.

    A relative ``html_path`` is taken relative to ``reports_dir``; an absolute one must resolve
    inside it. Anything else (outside, through ``..`` or a symlink, not an HTML file) is None.
    """
    if not isinstance(html_path, str) or not html_path:
        return None
    root = Path(reports_dir).resolve()
    try:
        candidate = Path(html_path)
        if candidate.is_absolute():
            relative = candidate.resolve().relative_to(root).as_posix()
        else:
            relative = html_path
        path = safe_join(root, relative)
    except (ValueError, OSError):
        return None
    if path.suffix.lower() not in REPORT_SUFFIXES or not path.is_file():
        return None
    return path


def window_report(data_root: Path, reports_dir: Path, pipeline: str, window_id: str
                  ) -> Path | None:
    """The report file of one recorded window (None when there is none to serve)."""
    from airmlops.monitoring.policy import check_window_id
    from airmlops.monitoring.store import MonitoringStore

    if not NAME_RE.match(pipeline):
        return None
    try:
        check_window_id(window_id)
    except ValueError:
        return None
    store = MonitoringStore(data_root)
    if not store.path(pipeline).is_file():
        return None
    row = store.window(pipeline, window_id)
    return None if row is None else report_file(reports_dir, row.get("html_path"))


# --------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------

_pool_lock = threading.Lock()
_pool_instance: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The shared worker pool (bounded: a hung source occupies a worker, never more)."""
    global _pool_instance
    with _pool_lock:
        if _pool_instance is None:
            _pool_instance = concurrent.futures.ThreadPoolExecutor(
                max_workers=POOL_WORKERS, thread_name_prefix="mlops-ui")
        return _pool_instance


def _with_reader(tracking_uri: str, read: Callable[[RegistryReader], T]) -> T:
    """Run ``read`` with a registry reader for ``tracking_uri``, closed afterwards."""
    reader = registry_reader(tracking_uri)
    try:
        return read(reader)
    finally:
        reader.close()


def collect_overview(
    specs: Iterable[PipelineSpec],
    *,
    data_root: Path,
    reports_dir: Path,
    tracking_uri: str,
    now: dt.datetime,
    mlflow_ui_url: str | None = None,
    invalid_specs: Iterable[str] = (),
    deadline: float = DEFAULT_DEADLINE_SECONDS,
    windows: int = DEFAULT_WINDOWS,
) -> Overview:
    """Every pipeline's card, all sources read concurrently within ``deadline`` s in total.

    A source still running at the deadline is shown as timed out (its worker finishes in the
    background, bounded by its own timeouts).
    """
    import time

    specs = list(specs)
    ui_base = mlflow_ui_base(tracking_uri, mlflow_ui_url)
    started = time.monotonic()
    pool = _pool()
    registry_jobs = {
        spec.name: pool.submit(_with_reader, tracking_uri,
                               lambda reader, s=spec: read_registry(
                                   reader, s.registered_model_name, ui_base))
        for spec in specs
    }
    monitoring_jobs = {
        spec.name: pool.submit(read_monitoring, spec, data_root, reports_dir, windows)
        for spec in specs
    }
    deployment_jobs = {
        spec.name: pool.submit(live_deployment, spec.name, data_root, spec.task, now)
        for spec in specs
    }

    def remaining() -> float:
        """Seconds left until the overall deadline (never negative)."""
        return max(0.0, deadline - (time.monotonic() - started))

    pipelines = []
    for spec in specs:
        registry = _result(
            registry_jobs[spec.name], remaining(),
            lambda why, s=spec: RegistryView(
                s.registered_model_name,
                error=f"MLflow did not answer within {deadline:g} s" if why == "timeout"
                else f"reading MLflow failed ({why})"))
        monitoring = _result(
            monitoring_jobs[spec.name], remaining(),
            lambda why: MonitoringView(
                error=f"the monitoring table did not answer within {deadline:g} s"
                if why == "timeout" else f"reading the monitoring table failed ({why})"))
        deployment = _result(
            deployment_jobs[spec.name], remaining(),
            lambda why, s=spec: recorded_deployment(
                s.name, data_root,
                f"live check did not finish within {deadline:g} s; showing the recorded state"
                if why == "timeout" else f"live check failed ({why}); showing the recorded state"))
        pipelines.append(PipelineView(
            name=spec.name,
            description=spec.description,
            task=spec.task,
            owner=spec.owner or None,
            dag_ids=pipeline_dag_ids(spec),
            primary_metric=spec.gates.primary_metric,
            registry=registry,
            deployment=deployment,
            monitoring=monitoring,
        ))
    return Overview(pipelines=tuple(pipelines), invalid_specs=tuple(invalid_specs),
                    generated_at=now.astimezone(dt.UTC).isoformat(), mlflow_ui_url=ui_base)


def _result(future: concurrent.futures.Future[T], timeout: float,
            fallback: Callable[[str], T]) -> T:
    """The future's result within ``timeout`` s, else ``fallback`` of "timeout" or the error."""
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return fallback("timeout")
    except Exception as exc:
        log.warning("MLOps view: a source failed", exc_info=True)
        return fallback(type(exc).__name__)
