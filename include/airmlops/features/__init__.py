"""The feature store: one definition of every feature, for training and for serving.

The pieces, each in its own module (import the one you need; nothing runs at import time):

- :mod:`~airmlops.features.definitions`: the typed definitions a pipeline spec embeds:
  entities, feature views (windowed aggregations of event rows, or the latest value of profile
  columns, each with a TTL) and on-demand features. Feature names are stable:
  ``<view>__<column>_<function>_<window>d`` for aggregations, ``<view>__<column>`` for profile
  columns, the bare name for on-demand features.
- :mod:`~airmlops.features.compute`: raw event rows -> feature-view rows (vectorised).
- :mod:`~airmlops.features.offline`: the offline store (Parquet partitioned by date) and
  point-in-time-correct retrieval for training sets; the join itself is
  :mod:`~airmlops.features.offline_join` (in memory) or
  :mod:`~airmlops.features.offline_duckdb` (DuckDB, spilling to disk), chosen by
  ``feature_store.offline_engine``; :mod:`~airmlops.features.join_memory` refuses an in-memory
  join that would not fit.
- :mod:`~airmlops.features.online`: the online store (SQLite embedded default, Redis when
  configured) behind one small interface; one round trip per read.
- :mod:`~airmlops.features.materialize`: incremental offline -> online copy with a watermark.
- :mod:`~airmlops.features.on_demand` and :mod:`~airmlops.features.on_demand_library`:
  request-time features, the same code on a DataFrame (training) and on request rows (serving).
- :mod:`~airmlops.features.parity`: checks that the online path returns the offline values.

How the data flows::

    raw events --compute--> offline store (Parquet) --get_historical_features--> training set
                                   |
                              materialize (watermark)
                                   v
    request --> online store read (1 round trip) --> apply_on_demand --> model
"""
