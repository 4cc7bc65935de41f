"""Monitoring of deployed models: drift, data quality and delayed-label performance per window.

The pieces, each usable without a running Airflow:

- :mod:`~airmlops.monitoring.config`: the ``monitoring:`` section of a pipeline spec (window,
  sample sizes, the drift method and threshold of every column, quality limits, the performance
  floor and the retraining policy).
- :mod:`~airmlops.monitoring.reference`: the champion's reference data, summarized once at
  deploy (a fixed stratified sample as Parquet plus per-column statistics as JSON).
- :mod:`~airmlops.monitoring.drift`: one window's report, computed with Evidently on a
  fixed-size, time-stratified sample so that cost is bounded and decisions do not depend on
  traffic volume.
- :mod:`~airmlops.monitoring.policy`: the pure retraining decision (k of the last N windows and
  the latest, cooldown, at most one active retraining).
- :mod:`~airmlops.monitoring.store`: the per-pipeline SQLite table of windows and decisions that
  the policy reads and the UI shows.

Importing this package imports nothing heavy; pandas and Evidently load inside the functions
that need them.
"""
