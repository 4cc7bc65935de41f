"""The failure callback of every pipeline task: an Airflow notifier that sends ``task_failed``.

:class:`PipelineFailureNotifier` is what the DAG factory sets as ``on_failure_callback`` of every
task of a pipeline whose spec has alerts. Airflow calls it once a task has failed for good (a try
that will be retried calls ``on_retry_callback`` instead), in the process that ran the task, or
in the DAG processor for a task that died without reporting. It sends ``task_failed`` (message
and details from :func:`airmlops.notifiers.task_failure`) through
:func:`airmlops.alerts.notify_config`, the one path of every alert, and never raises into
Airflow. It holds only the pipeline's name and its ``alerts`` section, so it stays small in
every DAG the factory builds.

Alert texts are data: Airflow renders a notifier's ``template_fields`` with Jinja when it is
called as a callback, so this notifier has none.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseNotifier

from airmlops.alerts import AlertsConfig, notify_config
from airmlops.notifiers import task_failure

if TYPE_CHECKING:
    from airflow.sdk import Context

log = logging.getLogger(__name__)


class PipelineFailureNotifier(BaseNotifier):
    """Sends ``task_failed`` for the pipeline ``pipeline`` to the channels of ``config``.

    Use as a task's ``on_failure_callback``; ``notify`` never raises.
    """

    template_fields = ()  # nothing is rendered: exception messages are data, never templates

    def __init__(self, pipeline: str, config: AlertsConfig | None) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.config = config

    def __repr__(self) -> str:
        channels = [name for name in ("smtp", "webhook")
                    if self.config is not None and getattr(self.config, name) is not None]
        return f"{type(self).__name__}(pipeline={self.pipeline!r}, channels={channels})"

    def __getstate__(self) -> dict[str, Any]:
        # Only the name and the config: the logger Airflow's mixin caches does not pickle.
        return {"pipeline": self.pipeline, "config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["pipeline"], state["config"])

    def __call__(self, *args: Any) -> None:
        try:
            super().__call__(*args)
        except Exception:  # Airflow logs a raising callback, but an alert must never fail
            log.exception("failure alert of %s could not be prepared", self.pipeline)

    def notify(self, context: Context) -> None:
        """Send ``task_failed`` with what ``context`` says about the failed task."""
        try:
            message, details = task_failure(context)
            result = notify_config(self.pipeline, self.config, "task_failed", message, details)
        except Exception:
            log.exception("failure alert of %s could not be sent", self.pipeline)
            return
        if result["skipped"]:
            log.info("failure alert of %s not sent: %s", self.pipeline, result["skipped"])
