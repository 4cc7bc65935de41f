"""airmlops: the whole model lifecycle as Apache Airflow 3 DAGs.

Nothing here runs at import time; heavy libraries are imported inside the functions that use them.
"""

__version__ = "0.1.0"
