"""Airflow plugin: git webhooks that trigger training runs, served by the API server itself.

Mounts :func:`airmlops.webhooks.app.create_app` at ``/webhooks`` (``POST /webhooks/github``,
``POST /webhooks/gitlab``). Airflow does not authenticate plugin apps: the app checks every
request's signature or token itself, then queues runs through Airflow's REST API on loopback
(see :mod:`airmlops.webhooks.app`). Importing this file is cheap (FastAPI and pydantic only)
and reads no setting, so every Airflow component can load it even when nothing is configured.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airmlops.webhooks.app import create_app


class MlopsWebhooksPlugin(AirflowPlugin):
    """Serves the git webhook receiver under ``/webhooks`` on the Airflow API server."""

    name = "mlops_webhooks"
    fastapi_apps = [
        {"app": create_app(), "url_prefix": "/webhooks", "name": "MLOps git webhooks"},
    ]
