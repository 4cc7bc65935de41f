"""Airflow plugin: the MLOps view inside the Airflow UI.

Mounts :func:`airmlops.ui.app.create_app` at ``/mlops-ui`` on the API server and registers two
external views that show it in the UI, in an iframe:

- ``MLOps`` in the main navigation (all pipelines: champion and challenger with metrics and
  lineage, the live deployment, monitoring windows with a chart and their Evidently reports);
- an ``MLOps`` tab on every DAG page, narrowed to the pipeline that DAG belongs to.

The views' ``href`` and ``icon`` are relative: the UI resolves them against its ``<base href>``,
so they follow ``[api] base_url`` when Airflow is served under a sub-path. Airflow does not
authenticate plugin apps: the app validates the user's Airflow JWT itself. Importing this file is
cheap (FastAPI only) and reads no setting.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from airmlops.ui.app import MOUNT_PATH, create_app

_HREF = MOUNT_PATH.strip("/") + "/"
_ICON = _HREF + "icon.svg"


class MlopsUiPlugin(AirflowPlugin):
    """Serves the MLOps view under ``/mlops-ui`` and links it into the Airflow UI."""

    name = "mlops_ui"
    fastapi_apps = [
        {"app": create_app(), "url_prefix": MOUNT_PATH, "name": "MLOps view"},
    ]
    external_views = [
        {
            "name": "MLOps",
            "href": _HREF,
            "destination": "nav",
            "url_route": "mlops",
            "icon": _ICON,
            "nav_top_level": True,
        },
        {
            "name": "MLOps",
            "href": _HREF + "?dag_id={DAG_ID}",
            "destination": "dag",
            "url_route": "mlops-dag",
            "icon": _ICON,
        },
    ]
