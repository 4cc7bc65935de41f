"""What the MLOps view shows for each pipeline, gathered quickly and never hanging.

Three sources per pipeline, read side by side in a small shared thread pool, each bounded by one
deadline (:data:`DEFAULT_DEADLINE_SECONDS`):

- the registry: the ``champion`` and ``challenger`` versions with their lineage tags and the
  test metrics of the runs that produced them. An ``http(s)`` tracking URI is read through
  MLflow's REST API with a short timeout per call and no retries (MLflow's client would retry
  for minutes against a dead server); any other URI (``sqlite:``, ``file:``...) goes through
  ``MlflowClient``;
- the deployment: :func:`airmlops.serving.deploy.status` (recorded state plus what is alive and
  ready now); when the live check runs out of time, the recorded state is shown as such;
- monitoring: the last windows of :class:`airmlops.monitoring.store.MonitoringStore`, with
  their numbers, decisions and whether their Evidently report can be served.

A missing piece (no champion yet, nothing deployed, no window) is an empty value, not an error;
a source that fails or times out carries an ``error`` string for the page to show. Nothing here
writes: a pipeline whose monitoring table does not exist is not created by looking at it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import logging
import os
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import quote

from airmlops.paths import safe_join
from airmlops.spec import NAME_PATTERN, PipelineSpec, load_spec, spec_paths

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_SECONDS = 5.0
"""How long the page waits for all sources of all pipelines together."""
MLFLOW_CALL_TIMEOUT_SECONDS = 2.0
"""Timeout of each MLflow REST call (connect and read)."""
DEFAULT_WINDOWS = 20
"""How many recent monitoring windows a pipeline card shows."""
POOL_WORKERS = 8

CHAMPION, CHALLENGER = "champion", "challenger"
ALIASES = (CHAMPION, CHALLENGER)
LINEAGE_KEYS = ("git_commit", "data_digest", "image_tag", "image_id", "bento_tag",
                "deployed_at", "deployed_target")
"""The lineage shown for every version, in this order (missing ones are shown as such)."""
DETAIL_KEYS = ("spec_hash", "features_hash", "airflow_dag_id", "airflow_run_id",
               "trigger_reason", "gate_blessed", "previous_champion")
"""Further tags shown when present."""
METRIC_PREFIX = "test_"
REPORT_SUFFIXES = (".html", ".htm")

_NAME = re.compile(NAME_PATTERN)
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,255}$")
_VERSION = re.compile(r"^[0-9]{1,10}$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_EXPERIMENT_ID = re.compile(r"^[0-9]{1,20}$")

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# What the page shows
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelVersionView:
    """One registered version behind an alias: its metrics, lineage and MLflow links."""

    alias: str
    version: str
    aliases: tuple[str, ...]
    status: str | None
    created_at: str | None
    run_id: str | None
    experiment_id: str | None
    metrics: dict[str, float]
    """The run's ``test_*`` metrics, unprefixed (``roc_auc``, ``log_loss``...)."""
    lineage: dict[str, str]
    """Every :data:`LINEAGE_KEYS` tag the version (or its run) carries."""
    details: dict[str, str]
    version_url: str | None
    run_url: str | None


@dataclasses.dataclass(frozen=True)
class RegistryView:
    """The pipeline's registered model: champion and challenger (None when not set)."""

    model_name: str
    champion: ModelVersionView | None = None
    challenger: ModelVersionView | None = None
    model_url: str | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class SlotView:
    """One slot of the blue/green deployment."""

    slot: str
    active: bool
    version: str | None
    target: str | None
    artifact: str | None
    upstream: str | None
    started_at: str | None
    alive: bool | None
    ready: bool | None


@dataclasses.dataclass(frozen=True)
class DeploymentView:
    """The live deployment: its stable address and what serves behind it."""

    deployed: bool
    stable_url: str | None = None
    active_slot: str | None = None
    active_version: str | None = None
    switched_at: str | None = None
    proxy_alive: bool | None = None
    live_checked: bool = False
    """False when only the recorded state could be read (the live check failed or timed out)."""
    slots: tuple[SlotView, ...] = ()
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class WindowView:
    """One monitoring window: its numbers, breaches and the decision taken."""

    window_id: str
    start: str
    end: str
    rows: int | None
    label_count: int | None
    drift_share: float | None
    drifted_columns: tuple[str, ...]
    prediction_drift: float | None
    performance: dict[str, float]
    breaches: tuple[str, ...]
    decision: str | None
    reason: str | None
    triggered_run_id: str | None
    has_report: bool
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class MonitoringView:
    """The recent windows (oldest first) and the thresholds they are judged by."""

    windows: tuple[WindowView, ...] = ()
    drift_threshold: float | None = None
    performance_metric: str | None = None
    performance_floor: float | None = None
    floor_is_minimum: bool = True
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class PipelineView:
    """Everything one pipeline card shows."""

    name: str
    description: str | None
    task: str
    owner: str | None
    dag_ids: dict[str, str]
    """Role (``training``, ``features``, ``monitoring``, ``rollback``) to DAG id."""
    primary_metric: str
    registry: RegistryView
    deployment: DeploymentView
    monitoring: MonitoringView


@dataclasses.dataclass(frozen=True)
class Overview:
    """The whole page: every pipeline the viewer may see, and specs that failed to load."""

    pipelines: tuple[PipelineView, ...]
    invalid_specs: tuple[str, ...]
    generated_at: str
    mlflow_ui_url: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (the page's JSON API)."""
        return dataclasses.asdict(self)


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


class RegistryError(RuntimeError):
    """MLflow could not be read; the message says which server and why."""


class RegistryReader(Protocol):
    """Read-only access to the model registry; versions and runs as MLflow REST JSON."""

    def aliases(self, name: str) -> dict[str, str] | None:
        """Alias to version of registered model ``name``; None when the model does not exist."""

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        """The version as MLflow's REST API returns it (``tags`` a list of key/value)."""

    def run(self, run_id: str) -> dict[str, Any] | None:
        """The run as MLflow's REST API returns it; None when it does not exist."""

    def close(self) -> None:
        """Release connections."""


class RestRegistry:
    """MLflow's REST API over ``httpx``: one short timeout per call, no retries.

    Credentials come from MLflow's own variables (``MLFLOW_TRACKING_TOKEN``, or
    ``MLFLOW_TRACKING_USERNAME`` and ``MLFLOW_TRACKING_PASSWORD``) when they are set.
    """

    def __init__(self, tracking_uri: str, timeout: float = MLFLOW_CALL_TIMEOUT_SECONDS,
                 environ: Mapping[str, str] | None = None) -> None:
        import httpx

        environ = os.environ if environ is None else environ
        self.base = tracking_uri.rstrip("/")
        headers = {"Accept": "application/json"}
        auth = None
        if environ.get("MLFLOW_TRACKING_TOKEN"):
            headers["Authorization"] = f"Bearer {environ['MLFLOW_TRACKING_TOKEN']}"
        elif environ.get("MLFLOW_TRACKING_USERNAME"):
            auth = (environ["MLFLOW_TRACKING_USERNAME"],
                    environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        # trust_env=False: a proxy configured for the package registries must not see
        # loopback traffic; MLflow's own TLS variable is honoured explicitly.
        verify: bool | str = True
        if environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            verify = False
        elif environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            verify = environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
        self._client = httpx.Client(timeout=timeout, headers=headers, auth=auth, verify=verify,
                                    trust_env=False, follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def _get(self, endpoint: str, params: dict[str, str]) -> dict[str, Any] | None:
        import httpx

        url = f"{self.base}/api/2.0/mlflow/{endpoint}"
        try:
            response = self._client.get(url, params=params)
        except httpx.TimeoutException:
            raise RegistryError(f"MLflow at {self.base} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise RegistryError(f"MLflow at {self.base} is unreachable ({type(exc).__name__})"
                                ) from None
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise RegistryError(f"MLflow at {self.base} answered {response.status_code} to "
                                f"{endpoint}: {_error_message(response)}")
        try:
            body = response.json()
        except ValueError:
            raise RegistryError(f"MLflow at {self.base} answered {endpoint} with non-JSON"
                                ) from None
        if not isinstance(body, dict):
            raise RegistryError(f"MLflow at {self.base} answered {endpoint} unexpectedly")
        return body

    def aliases(self, name: str) -> dict[str, str] | None:
        body = self._get("registered-models/get", {"name": name})
        if body is None:
            return None
        model = body.get("registered_model") or {}
        return {str(a.get("alias")): str(a.get("version"))
                for a in model.get("aliases") or [] if isinstance(a, dict)}

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        body = self._get("model-versions/get", {"name": name, "version": version})
        if body is None or not isinstance(body.get("model_version"), dict):
            raise RegistryError(f"version {version} of {name!r} is aliased but not found")
        return body["model_version"]

    def run(self, run_id: str) -> dict[str, Any] | None:
        body = self._get("runs/get", {"run_id": run_id})
        return None if body is None else body.get("run")


class ClientRegistry:
    """``MlflowClient`` for tracking URIs that are not HTTP (``sqlite:``, ``file:``...)."""

    def __init__(self, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        self._client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def close(self) -> None:
        """Nothing to release."""

    def aliases(self, name: str) -> dict[str, str] | None:
        from mlflow.exceptions import MlflowException

        try:
            model = self._client.get_registered_model(name)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise RegistryError(f"MLflow: {exc.message}") from None
        return {str(alias): str(version) for alias, version in model.aliases.items()}

    def model_version(self, name: str, version: str) -> dict[str, Any]:
        found = self._client.get_model_version(name, version)
        return {
            "name": found.name, "version": str(found.version), "run_id": found.run_id,
            "status": found.status, "creation_timestamp": found.creation_timestamp,
            "aliases": list(found.aliases),
            "tags": [{"key": k, "value": v} for k, v in (found.tags or {}).items()],
        }

    def run(self, run_id: str) -> dict[str, Any] | None:
        from mlflow.exceptions import MlflowException

        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise RegistryError(f"MLflow: {exc.message}") from None
        return {
            "info": {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id},
            "data": {
                "metrics": [{"key": k, "value": v} for k, v in run.data.metrics.items()],
                "tags": [{"key": k, "value": v} for k, v in run.data.tags.items()],
            },
        }


def registry_reader(tracking_uri: str, timeout: float = MLFLOW_CALL_TIMEOUT_SECONDS
                    ) -> RestRegistry | ClientRegistry:
    """The right reader for ``tracking_uri``: REST for ``http(s)``, else ``MlflowClient``."""
    if tracking_uri.startswith(("http://", "https://")):
        return RestRegistry(tracking_uri, timeout)
    return ClientRegistry(tracking_uri)


def mlflow_ui_base(tracking_uri: str, ui_url: str | None = None) -> str | None:
    """Where people open the MLflow UI: ``ui_url`` if given, else an ``http(s)`` tracking URI."""
    for candidate in (ui_url, tracking_uri):
        if candidate and candidate.startswith(("http://", "https://")):
            return candidate.rstrip("/")
    return None


def read_registry(reader: RegistryReader, model_name: str, ui_base: str | None) -> RegistryView:
    """Champion and challenger of ``model_name`` with their runs' metrics and lineage."""
    if not _MODEL_NAME.match(model_name):
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
            run_id = run_id if isinstance(run_id, str) and _RUN_ID.match(run_id) else None
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
    try:
        return dt.datetime.fromtimestamp(int(value) / 1000, tz=dt.UTC).isoformat()
    except (TypeError, ValueError, OverflowError, OSError):
        return None


def _error_message(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return "no details"
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])[:200]
    return "no details"


# --------------------------------------------------------------------------------------------
# Deployment
# --------------------------------------------------------------------------------------------


def live_deployment(pipeline: str, data_root: Path) -> DeploymentView:
    """The deployment of ``pipeline`` as recorded plus what is alive and ready now.

    Can take seconds (it probes the proxy and each slot): run it under a deadline and fall back
    to :func:`recorded_deployment`.
    """
    from airmlops.serving import deploy

    try:
        if not deploy.state_path(pipeline, data_root).is_file():
            return DeploymentView(deployed=False)
    except ValueError as exc:
        return DeploymentView(deployed=False, error=str(exc))
    return _deployment_from_status(deploy.status(pipeline, data_root))


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


def _deployment_from_status(status: Mapping[str, Any]) -> DeploymentView:
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
    )


def _deployment_from_state(state: Mapping[str, Any]) -> DeploymentView:
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
    )


def _slot_view(slot: str, record: Mapping[str, Any], active: bool, alive: Any, ready: Any
               ) -> SlotView:
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
    columns = row.get("columns") or {}
    drifted = tuple(sorted(name for name, result in columns.items()
                           if isinstance(result, dict) and result.get("drifted")))
    prediction = row.get("prediction_drift") or {}
    performance = {str(k): float(v) for k, v in (row.get("performance") or {}).items()
                   if isinstance(v, int | float) and not isinstance(v, bool)}
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
    )


def _float_or_none(value: Any) -> float | None:
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

    if not _NAME.match(pipeline):
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
        spec.name: pool.submit(live_deployment, spec.name, data_root) for spec in specs
    }

    def remaining() -> float:
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
    try:
        return future.result(timeout=timeout)
    except concurrent.futures.TimeoutError:
        return fallback("timeout")
    except Exception as exc:
        log.warning("MLOps view: a source failed", exc_info=True)
        return fallback(type(exc).__name__)
