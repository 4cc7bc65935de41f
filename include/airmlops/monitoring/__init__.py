"""Monitoring of deployed models: drift, data quality and delayed-label performance per window.

The pieces, each usable without a running Airflow:

- :mod:`~airmlops.monitoring.config`: the ``monitoring:`` section of a pipeline spec (window,
  sample sizes, the drift method and threshold of every column, quality limits, the performance
  floor and the retraining policy).
- :mod:`~airmlops.monitoring.reference`: the champion's reference data, summarized once at
  deploy (a fixed stratified sample as Parquet plus per-column statistics as JSON).
- :mod:`~airmlops.monitoring.drift`: one window's measurement, computed with Evidently on a
  fixed-size, time-stratified sample (:mod:`~airmlops.monitoring.sampling`) so that cost is
  bounded and decisions do not depend on traffic volume; the numbers it returns are in
  :mod:`~airmlops.monitoring.measurement`, performance once labels arrive in
  :mod:`~airmlops.monitoring.performance`.
- :mod:`~airmlops.monitoring.judgement`: the breaches of a window, judged from its numbers and
  the spec (pure, so recorded windows are judged again under a changed spec).
- :mod:`~airmlops.monitoring.policy`: the pure retraining decision (k of the last N windows and
  the latest, cooldown, at most one active retraining).
- :mod:`~airmlops.monitoring.store`: the per-pipeline SQLite table of windows and decisions that
  the policy reads and the UI shows.

Importing this package imports nothing heavy; pandas and Evidently load inside the functions
that need them.
"""
