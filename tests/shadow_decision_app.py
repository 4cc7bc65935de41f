"""The MLOps view's app for the shadow-decision tests: mounted at /mlops-ui like Airflow does,
with a temporary data root holding the churn spec, and an authentication that stands in for
Airflow's auth manager (the real JWT path is covered by tests/e2e/test_ui_browser.py).

MLflow is a closed loopback port: the page reports it unreachable and renders the rest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from airmlops.platform import free_port
from airmlops.serving.deploy.decisions import running_record
from airmlops.settings import Settings
from airmlops.ui import app as ui

REPO_ROOT = Path(__file__).resolve().parents[1]
NOW = dt.datetime(2026, 4, 10, 12, tzinfo=dt.UTC)
TRAINING_DAG = "churn_training"
DECIDE = "/mlops-ui/api/pipelines/churn/shadow/decision"
AUTH = {"Authorization": "Bearer good"}
JSON = {**AUTH, "Content-Type": "application/json"}


class DecidingAuth:
    """Accepts the bearer token ``good`` (or the cookie) as ``name``; may read ``readable``
    DAGs (None: all) and edit ``editable`` ones (None: all)."""

    def __init__(self, readable: set[str] | None = None, editable: set[str] | None = None,
                 name: str = "alice") -> None:
        self.readable_dags, self.editable_dags, self.name = readable, editable, name

    async def viewer(self, request: Any) -> ui.Viewer:
        if ui.request_token(request) != "good":
            raise ui.NotAuthenticated("no valid token")

        async def readable(dag_ids: set[str]) -> set[str]:
            return dag_ids if self.readable_dags is None else dag_ids & self.readable_dags

        async def editable(dag_ids: set[str]) -> set[str]:
            return dag_ids if self.editable_dags is None else dag_ids & self.editable_dags

        return ui.Viewer(name=self.name, readable=readable, editable=editable)

    def login_url(self, next_url: str) -> str:
        return f"/auth/login?next={next_url}"


def write_spec(folder: Path) -> None:
    """The churn pipeline's spec in ``folder``."""
    spec = yaml.safe_load((REPO_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "churn.yaml").write_text(yaml.safe_dump(spec))


def settings_for(tmp_path: Path) -> Settings:
    """Settings with the churn spec and a data root under ``tmp_path``."""
    write_spec(tmp_path / "pipelines")
    return Settings(data_root=tmp_path / "data", pipelines_dir=tmp_path / "pipelines",
                    mlflow_tracking_uri=f"http://127.0.0.1:{free_port()}")


@contextlib.contextmanager
def view_client(settings: Settings, auth: DecidingAuth) -> Iterator[TestClient]:
    """A client of the view app, with ``settings`` and ``auth``."""
    sub = ui.create_app()
    sub.dependency_overrides[ui.get_authenticator] = lambda: auth
    sub.dependency_overrides[ui.get_ui_settings] = lambda: settings
    sub.dependency_overrides[ui.get_clock] = lambda: (lambda: NOW)
    root = FastAPI()
    root.mount(ui.MOUNT_PATH, sub)
    with TestClient(root) as client:
        yield client


class _Plan:
    """The plan fields a running record keeps."""

    seconds, percent, promotion, decision_timeout = 300.0, 100, "rule", 3600.0
    min_requests, min_agreement, max_score_ks = 50, 0.9, 0.2
    max_error_rate_increase, max_latency_ratio = 0.01, 1.5

    def __init__(self, promotion: str = "rule") -> None:
        self.promotion = promotion


def write_running_state(data_root: Path, version: str = "4", promotion: str = "rule",
                        shadow: dict[str, Any] | None = None) -> Path:
    """A deployment of version 3 in blue with a shadow of ``version`` running in green (or
    the ``shadow`` record given)."""
    state = data_root / "deployments" / "churn" / "state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    record = running_record(version, "green", NOW.isoformat(), _Plan(promotion))
    state.write_text(json.dumps({
        "pipeline": "churn", "active": "blue", "switched_at": "2026-04-09T08:00:00+00:00",
        "proxy": {"url": "http://127.0.0.1:8600", "port": 8600, "pid": None,
                  "create_time": None},
        "slots": {"blue": {"model_version": "3", "target": "process", "artifact": "churn:v3",
                           "upstream": "http://127.0.0.1:1", "port": 1, "instance": "x",
                           "pid": None, "create_time": None, "started_at": None},
                  "green": None},
        "shadow": record if shadow is None else shadow,
    }))
    return state


def decision_file(data_root: Path) -> Path:
    return data_root / "deployments" / "churn" / "shadow-decision.json"
