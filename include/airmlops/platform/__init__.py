"""The embedded platform on one machine: PostgreSQL, MLflow and Airflow, started and stopped.

``airmlops platform up [--trigger DAG_ID [--wait]]`` (or ``python -m airmlops.platform up``)
brings up

* an embedded PostgreSQL (unix socket only) holding Airflow's and MLflow's metadata,
* an MLflow tracking server (artifacts proxied by the server into the data root),
* Airflow with LocalExecutor as separate processes: api-server, scheduler, dag-processor,
  triggerer, plus a task-log server bound to loopback,

each in its own process group with a pidfile and a log under the run directory (``.run`` by
default), plus a watchdog (:mod:`airmlops.platform.watchdog`) that starts any of them again
when it dies, and returns while they keep running. ``down`` stops them, ``status`` shows them.
``up`` is idempotent: components found alive (pidfile + process start time) are reused.

The modules, one job each:

* :mod:`.config` the settings (flags, ``MLOPS_*`` environment, the recorded ``up``, defaults),
* :mod:`.secrets` the keys and admin password, generated once under the run dir,
* :mod:`.environment` each component's command line and environment,
* :mod:`.supervise` pidfiles, starting a component detached, stopping, status,
* :mod:`.health` waiting until MLflow and Airflow are ready,
* :mod:`.components` bringing the whole platform up (:func:`start_platform`),
* :mod:`.airflow_api` the REST client (token, DAGs, triggering and following runs),
* :mod:`.commands` ``up``, ``down``, ``status`` for ``airmlops platform`` and ``-m``.

This package re-exports the names callers and tests import from ``airmlops.platform``; the
functions are public so tests start the same platform on free ports in a temporary run
directory without disturbing a running ``make run``.
"""

from airmlops.platform.airflow_api import (
    api_token,
    follow_dag_run,
    get_dag,
    http_client,
    import_errors,
    run_url,
    set_dag_paused,
    trigger_dag,
    wait_for_dag,
)
from airmlops.platform.commands import build_parser, main
from airmlops.platform.components import (
    Platform,
    migrate_airflow_db,
    start_airflow,
    start_mlflow,
    start_platform,
)
from airmlops.platform.config import (
    ADMIN_USER,
    AIRFLOW_COMPONENTS,
    API_SERVER,
    DAG_PROCESSOR,
    DEFAULT_AIRFLOW_PORT,
    DEFAULT_LOG_SERVER_PORT,
    DEFAULT_MLFLOW_PORT,
    DEFAULT_PARALLELISM,
    HEALTH_KEYS,
    HOST,
    LOG_SERVER,
    MLFLOW,
    POSTGRES,
    SCHEDULER,
    TRIGGERER,
    WATCHDOG,
    PlatformConfig,
    PlatformError,
    Progress,
    default_run_dir,
    load_recorded_config,
    resolve_config,
)
from airmlops.platform.environment import (
    airflow_env,
    common_env,
    component_argv,
    loopback_hostname,
    mlflow_env,
)
from airmlops.platform.health import (
    airflow_health,
    mlflow_ready,
    wait_airflow_healthy,
    wait_mlflow,
)
from airmlops.platform.secrets import PlatformSecrets, ensure_secrets
from airmlops.platform.supervise import (
    ProcessRecord,
    component_status,
    group_members,
    is_alive,
    log_tail,
    pidfile,
    platform_lock,
    read_record,
    spawn,
    stop_all,
    stop_components,
    stop_deployments,
)
from airmlops.processes import free_port

__all__ = [
    "ADMIN_USER",
    "AIRFLOW_COMPONENTS",
    "API_SERVER",
    "DAG_PROCESSOR",
    "DEFAULT_AIRFLOW_PORT",
    "DEFAULT_LOG_SERVER_PORT",
    "DEFAULT_MLFLOW_PORT",
    "DEFAULT_PARALLELISM",
    "HEALTH_KEYS",
    "HOST",
    "LOG_SERVER",
    "MLFLOW",
    "POSTGRES",
    "SCHEDULER",
    "TRIGGERER",
    "WATCHDOG",
    "Platform",
    "PlatformConfig",
    "PlatformError",
    "PlatformSecrets",
    "ProcessRecord",
    "Progress",
    "airflow_env",
    "airflow_health",
    "api_token",
    "build_parser",
    "common_env",
    "component_argv",
    "component_status",
    "default_run_dir",
    "ensure_secrets",
    "follow_dag_run",
    "free_port",
    "get_dag",
    "group_members",
    "http_client",
    "import_errors",
    "is_alive",
    "load_recorded_config",
    "log_tail",
    "loopback_hostname",
    "main",
    "migrate_airflow_db",
    "mlflow_env",
    "mlflow_ready",
    "pidfile",
    "platform_lock",
    "read_record",
    "resolve_config",
    "run_url",
    "set_dag_paused",
    "spawn",
    "start_airflow",
    "start_mlflow",
    "start_platform",
    "stop_all",
    "stop_components",
    "stop_deployments",
    "trigger_dag",
    "wait_airflow_healthy",
    "wait_for_dag",
    "wait_mlflow",
]
