"""Every pipeline spec under include/pipelines/ becomes its Airflow DAGs.

This file stays thin: the DAG factory lives in the ``airmlops`` package. Adding a model to the
platform means adding a spec file, not editing this one.
"""

from airmlops.dag_factory import build_all

for _dag_id, _dag in build_all().items():
    globals()[_dag_id] = _dag
