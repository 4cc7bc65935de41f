"""Every pipeline spec under include/pipelines/ becomes its Airflow DAGs.

This file stays thin: the DAG layer lives in the ``airmlops.dags`` package. Adding a model to
the platform means adding a spec file, not editing this one.
"""

from airmlops.dags import build_all

for _dag_id, _dag in build_all().items():
    globals()[_dag_id] = _dag
