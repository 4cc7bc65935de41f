"""The platform's commands: ``up``, ``down`` and ``status``.

They are added to ``airmlops platform`` (:mod:`airmlops.cli`) and also make up
``python -m airmlops.platform`` (:mod:`airmlops.platform.__main__`); both run the same code
with the same options.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airmlops.platform.airflow_api import (
    DAG_ID_PATTERN,
    api_token,
    follow_dag_run,
    run_url,
    set_dag_paused,
    trigger_dag,
    wait_for_dag,
)
from airmlops.platform.components import Platform, start_platform
from airmlops.platform.config import (
    API_SERVER,
    DEFAULT_AIRFLOW_PORT,
    DEFAULT_LOG_SERVER_PORT,
    DEFAULT_MLFLOW_PORT,
    PlatformConfig,
    PlatformError,
    default_run_dir,
    load_recorded_config,
    resolve_config,
    say,
)
from airmlops.platform.health import airflow_health
from airmlops.platform.supervise import component_status, stop_all, stop_deployments

DESCRIPTION = "Start, stop and inspect the embedded platform (PostgreSQL, MLflow, Airflow)."
STOP_HINT = "airmlops platform down --run-dir {run_dir}"
"""How to stop a platform, as the messages of ``up`` tell it."""


def _print_summary(platform: Platform) -> None:
    config = platform.config
    print(
        "\n"
        f"  Airflow UI   {config.airflow_url}    login: {platform.username} / {platform.password}\n"
        f"  MLflow UI    {config.mlflow_url}\n"
        f"  Logs         {config.logs_dir}  (task logs: {config.airflow_home / 'logs'})\n"
        f"  Password     stored in {config.passwords_file}\n"
        f"  Stop         make stop"
        f"  (or: {STOP_HINT.format(run_dir=config.run_dir)})\n",
        flush=True,
    )


def _up_config(args: argparse.Namespace) -> tuple[PlatformConfig, dict[str, Any] | None]:
    """The config ``up`` starts and the conf of the run it triggers, checked before anything
    starts."""
    config = resolve_config(
        args.run_dir,
        airflow_port=args.airflow_port,
        mlflow_port=args.mlflow_port,
        log_server_port=args.log_server_port,
        dags_folder=args.dags_folder,
        plugins_folder=args.plugins_folder,
        dags_paused_at_creation=args.dags_paused,
        external_mlflow_uri=args.mlflow_uri,
    )
    if args.trigger and not DAG_ID_PATTERN.fullmatch(args.trigger):
        raise PlatformError(f"invalid DAG id {args.trigger!r}: expected {DAG_ID_PATTERN.pattern}")
    try:
        conf = json.loads(args.conf) if args.conf else None
    except json.JSONDecodeError as exc:
        raise PlatformError(f"--conf is not valid JSON: {exc}") from exc
    if conf is not None and not isinstance(conf, dict):
        raise PlatformError("--conf must be a JSON object")
    return config, conf


def _cmd_up(args: argparse.Namespace) -> int:
    config, conf = _up_config(args)
    say(f"run dir {config.run_dir}")
    try:
        platform = start_platform(config, timeout=args.timeout)
    except PlatformError as exc:
        raise PlatformError(
            f"{exc}\nWhat did start keeps running for inspection; stop it with "
            f"`{STOP_HINT.format(run_dir=config.run_dir)}` (or `make stop`)."
        ) from exc
    took = ", ".join(f"{k} {v:.1f} s" for k, v in platform.timings.items())
    what = f"started {', '.join(platform.started)}" if platform.started else "all reused"
    say(f"ready ({what}; {took})")
    _print_summary(platform)
    if not args.trigger:
        return 0
    return _trigger(platform, args.trigger, conf, wait=args.wait, timeout=args.timeout)


def _trigger(
    platform: Platform, dag_id: str, conf: dict[str, Any] | None, *, wait: bool, timeout: float
) -> int:
    """Unpause and trigger ``dag_id`` once it is parsed; with ``wait``, follow the run to its
    end (exit code 1 unless it succeeds)."""
    token = api_token(platform.base_url, platform.username, platform.password)
    wait_for_dag(platform.base_url, token, dag_id, timeout=timeout)
    set_dag_paused(platform.base_url, token, dag_id, paused=False)
    run = trigger_dag(platform.base_url, token, dag_id, conf=conf)
    run_id = run["dag_run_id"]
    say(f"triggered {dag_id} run {run_id}")
    say(f"follow it at {run_url(platform.base_url, dag_id, run_id)}")
    if not wait:
        return 0
    try:
        state = follow_dag_run(platform.base_url, token, dag_id, run_id)
    except KeyboardInterrupt:
        say("stopped following; the run goes on (the platform keeps running)")
        return 130
    say(f"run {run_id} finished: {state}")
    if state != "success":
        say(f"task logs: {run_url(platform.base_url, dag_id, run_id)}")
        return 1
    return 0


def _run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir).resolve() if args.run_dir else default_run_dir()


def _cmd_down(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    stopped = stop_all(run_dir, timeout=args.timeout, progress=say)
    stopped += stop_deployments(timeout=args.timeout)
    say(f"stopped {', '.join(stopped)}" if stopped else f"nothing was running in {run_dir}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    run_dir = _run_dir(args)
    status = component_status(run_dir)
    recorded = load_recorded_config(run_dir)
    health = (
        airflow_health(recorded.airflow_url)
        if recorded and status.get(API_SERVER, {}).get("alive")
        else None
    )
    if args.json:
        report = {
            "run_dir": str(run_dir),
            "components": status,
            "airflow_url": recorded.airflow_url if recorded else None,
            "mlflow_url": recorded.mlflow_url if recorded else None,
            "airflow_health": health,
        }
        print(json.dumps(report, indent=2))
        return 0
    print(f"run dir {run_dir}")
    for name, info in status.items():
        state = f"alive (pid {info['pid']})" if info["alive"] else "not running"
        print(f"  {name:<14} {state}")
    if recorded:
        print(f"  Airflow UI     {recorded.airflow_url}")
        print(f"  MLflow UI      {recorded.mlflow_url}")
        print(f"  Logs           {recorded.logs_dir}")
    if health:
        print("  Airflow health " + ", ".join(f"{k}={v}" for k, v in health.items()))
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``up``, ``down`` and ``status`` with their options to ``commands``."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="runtime state (pidfiles, logs, database); default MLOPS_RUN_DIR or <repo>/.run",
    )
    up = commands.add_parser("up", parents=[common], help="start (or reuse) every component")
    _add_up_options(up)
    up.set_defaults(func=_cmd_up)

    down = commands.add_parser("down", parents=[common], help="stop every component")
    down.add_argument("--timeout", type=float, default=10.0, help="seconds before SIGKILL")
    down.set_defaults(func=_cmd_down)

    status = commands.add_parser(
        "status", parents=[common], help="show which components are alive"
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_cmd_status)


def _add_up_options(up: argparse.ArgumentParser) -> None:
    up.add_argument(
        "--airflow-port", type=int, help=f"default MLOPS_AIRFLOW_PORT or {DEFAULT_AIRFLOW_PORT}"
    )
    up.add_argument(
        "--mlflow-port", type=int, help=f"default MLOPS_MLFLOW_PORT or {DEFAULT_MLFLOW_PORT}"
    )
    up.add_argument(
        "--log-server-port", type=int, help=f"task-log server; default {DEFAULT_LOG_SERVER_PORT}"
    )
    up.add_argument(
        "--dags-folder", type=Path, help="default MLOPS_AIRFLOW_DAGS_FOLDER or <repo>/dags"
    )
    up.add_argument("--plugins-folder", type=Path, help="default <repo>/plugins")
    up.add_argument("--mlflow-uri", help="use this MLflow server instead of starting one")
    up.add_argument(
        "--dags-paused",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="whether new DAGs start paused (default: not paused)",
    )
    up.add_argument("--trigger", metavar="DAG_ID", help="unpause and trigger this DAG once up")
    up.add_argument("--conf", help="JSON object passed as the triggered run's conf")
    up.add_argument("--wait", action="store_true", help="follow the triggered run to its end")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for readiness")


def build_parser(prog: str = "python -m airmlops.platform") -> argparse.ArgumentParser:
    """The standalone parser of the platform's commands (``python -m airmlops.platform``)."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; a :class:`PlatformError` becomes one error line and exit code 1."""
    try:
        return args.func(args)
    except PlatformError as exc:
        print(f"[platform] error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        say("interrupted; components already started keep running (stop them with `down`)")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m airmlops.platform``."""
    return run(build_parser().parse_args(argv))
