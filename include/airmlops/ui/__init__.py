"""The MLOps view inside the Airflow UI: one page per platform, one card per pipeline.

- :mod:`airmlops.ui.data` gathers what the page shows (registry, deployment, monitoring) into
  the view models of :mod:`airmlops.ui.views`, each source bounded in time so a slow MLflow or a
  stuck model server never hangs the page;
- :mod:`airmlops.ui.chart` draws the monitored metrics over time as a small inline SVG;
- :mod:`airmlops.ui.page` renders the self-contained HTML page (no CDN, everything escaped);
- :mod:`airmlops.ui.app` is the FastAPI app the Airflow API server mounts at ``/mlops-ui``
  (``plugins/mlops_ui.py``), authenticated with the user's Airflow JWT.
"""
