"""Training: the preprocess, train, validate_model and register stages of the training DAG.

- :mod:`~airmlops.training.dataset`: time-based train/test split with an embargo; training sets
  written as Parquet, atomically.
- :mod:`~airmlops.training.model`: the scikit-learn Pipeline (preprocessing inside the model),
  metrics and scores.
- :mod:`~airmlops.training.tracking`: fit and log a run to MLflow with params, metrics, signature,
  input example, dataset inputs and lineage tags.
- :mod:`~airmlops.training.gates`: absolute thresholds and a paired bootstrap against the
  champion; decisions fail closed and are recorded on the run.
- :mod:`~airmlops.training.registry`: model versions and aliases (``challenger``, ``champion``);
  :mod:`~airmlops.training.registry_rest` reads them over MLflow's REST API for the MLOps view.
- :mod:`~airmlops.training.refit`: the blessed estimator refit on every labelled row.

Nothing is imported here: each module imports pandas, scikit-learn or MLflow itself, so that a
DAG file can import this package at parse time for nothing.
"""
