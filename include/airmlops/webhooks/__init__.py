"""Git webhooks that trigger training runs, received inside the Airflow API server.

:mod:`airmlops.webhooks.verify` holds the pure parts (signature and token checks, payload
parsing); :mod:`airmlops.webhooks.app` is the FastAPI app that the plugin in
``plugins/mlops_webhooks.py`` mounts at ``/webhooks``.
"""
