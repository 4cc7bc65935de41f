"""What every DAG of the platform shares: default args, the run's context and params, and
:func:`stage`, the one place where task values cross Airflow's XCom and where a
:class:`~airmlops.errors.NonRetryable` error becomes a failure without retries.

Parse-time cost matters (the DAG processor parses often), so this package imports only
Airflow's SDK, pydantic, YAML and the light modules of ``airmlops``; every task imports what it
needs when it runs.
"""

from __future__ import annotations

import datetime as dt
import functools
import inspect
import re
import typing
from collections.abc import Callable
from typing import Any, get_args

from airflow.sdk import Param, get_current_context
from airflow.sdk.exceptions import AirflowFailException

from airmlops.contracts import Contract
from airmlops.dags.callbacks import PipelineFailureNotifier
from airmlops.errors import NonRetryable
from airmlops.settings import get_settings
from airmlops.spec import PipelineSpec, SimulatorSource

DEFAULT_ARGS = {
    "owner": "mlops",
    "retries": 2,
    "retry_delay": dt.timedelta(seconds=30),
    "retry_exponential_backoff": True,
}
SCENARIOS = list(get_args(SimulatorSource.model_fields["scenario"].annotation))
DATE_PATTERN = r"^\d{4}-\d{2}-\d{2}$"
DATETIME_PATTERN = (r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?"
                    r"(Z|[+-]\d{2}:\d{2})$")


def stage(function: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a task body (under ``@task``): the one bridge between contracts and XCom.

    Arguments annotated with a :class:`~airmlops.contracts.Contract` arrive from XCom as dicts
    and are checked and converted (``from_xcom``); a contract returned goes back as its XCom
    dict (``to_xcom``). A :class:`~airmlops.errors.NonRetryable` error, including a malformed
    XCom value, fails the task at once (``AirflowFailException``); any other error is retried.
    """
    signature = inspect.signature(function)

    @functools.wraps(function)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
            hints = typing.get_type_hints(function)
            for name, value in bound.arguments.items():
                kind = hints.get(name)
                if isinstance(kind, type) and issubclass(kind, Contract):
                    bound.arguments[name] = kind.from_xcom(value)
            result = function(*bound.args, **bound.kwargs)
        except NonRetryable as error:
            raise AirflowFailException(str(error)) from error
        return result.to_xcom() if isinstance(result, Contract) else result

    # What Airflow sees: a contract leaves the task as a dict (as before the contracts existed,
    # so ``multiple_outputs`` is inferred the same way).
    returns = function.__annotations__.get("return")
    resolved = typing.get_type_hints(function).get("return") if returns else None
    if isinstance(resolved, type) and issubclass(resolved, Contract):
        run.__annotations__ = {**function.__annotations__, "return": dict}
    return run


def pipeline_dag_args(spec: PipelineSpec, kind: str) -> dict[str, Any]:
    """What every DAG of a pipeline shares: start, no catchup, one run at a time, retries,
    owner, tags and, in every task, the failure alert (:func:`failure_callbacks`)."""
    return {
        "start_date": dt.datetime.combine(spec.start_date, dt.time(), tzinfo=dt.UTC),
        "catchup": False,
        "max_active_runs": 1,
        "default_args": {**DEFAULT_ARGS, "owner": spec.owner, **failure_callbacks(spec)},
        "tags": ["mlops", kind, spec.name, *spec.tags],
    }


def failure_callbacks(spec: PipelineSpec) -> dict[str, Any]:
    """``on_failure_callback``: a ``task_failed`` alert when a task fails for good, if the spec's
    alerts have a channel and take that event; else nothing (no callback at all)."""
    if spec.alerts is None or not spec.alerts.sends("task_failed"):
        return {}
    return {"on_failure_callback": PipelineFailureNotifier(spec.name, spec.alerts)}


def run_context():
    """The current task's :class:`~airmlops.runs.RunContext`, from Airflow's context and the
    run's params."""
    from airmlops.runs import RunContext, resolve_git_commit

    context = get_current_context()
    dag_run = context["dag_run"]
    params = context["params"]
    as_of = context.get("data_interval_end") or dag_run.logical_date or dag_run.run_after
    reason = params.get("trigger_reason") or (
        "scheduled" if dag_run.run_type == "scheduled" else f"{dag_run.run_type} run"
    )
    return RunContext(
        dag_id=dag_run.dag_id,
        run_id=dag_run.run_id,
        as_of=as_of,
        git_commit=resolve_git_commit(params.get("git_commit"), get_settings()),
        trigger_reason=str(reason),
        scenario=params.get("scenario"),
        scenario_start=parse_scenario_start(params.get("scenario_start")),
        full_history=bool(params.get("full_history")),
        data_end=parse_data_end(params.get("data_end")),
    )


def parse_scenario_start(value: Any) -> dt.date | None:
    """The ``scenario_start`` param (``YYYY-MM-DD`` or empty) as a date."""
    if value in (None, "", "None"):
        return None
    if not isinstance(value, str) or not re.fullmatch(DATE_PATTERN, value):
        raise ValueError(f"scenario_start: expected a date YYYY-MM-DD, got {value!r}")
    return dt.date.fromisoformat(value)


def parse_data_end(value: Any) -> dt.datetime | None:
    """The ``data_end`` param (an ISO 8601 time with its offset, or empty) as an aware datetime.

    A templated conf renders a missing value as the text ``None``, which means "not set".
    """
    if value in (None, "", "None"):
        return None
    if not isinstance(value, str) or not re.fullmatch(DATETIME_PATTERN, value):
        raise ValueError(f"data_end: expected an ISO 8601 time with a UTC offset, got {value!r}")
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def training_params() -> dict[str, Param]:
    """Typed params for manual runs (and the conf a webhook or the monitoring DAG sends)."""
    return {
        "trigger_reason": Param(None, type=["null", "string"], maxLength=500,
                                description="Why this run happens; recorded in MLflow."),
        "git_commit": Param(None, type=["null", "string"], pattern="^[0-9a-fA-F]{7,64}$",
                            description="Commit to record in lineage (webhooks set it)."),
        "git_ref": Param(None, type=["null", "string"], maxLength=255),
        "git_repository": Param(None, type=["null", "string"], maxLength=255),
        "scenario": Param(None, type=["null", "string"], enum=[None, *SCENARIOS],
                          description="Simulator only: override the spec's scenario "
                          "(source.scenario) for this run."),
        "scenario_start": Param(None, type=["null", "string"], pattern=DATE_PATTERN,
                                format="date",
                                description="Simulator only: the first day of the scenario "
                                "(YYYY-MM-DD; stable before); overrides source.scenario_start."),
        "data_end": Param(None, type=["null", "string"], pattern=DATETIME_PATTERN,
                          description="Ingest data up to this time (ISO 8601 with offset) "
                          "instead of the run's own time; the monitoring DAG sets it to the "
                          "end of the window that triggered the retraining."),
        "full_history": Param(False, type="boolean",
                              description="Read the source from the spec's start_date."),
        "skip_deploy": Param(False, type="boolean",
                             description="Register the challenger but do not package or "
                             "deploy it."),
    }
