"""Live services for the security suite: one Airflow platform that an attacker can reach.

``attack_platform`` is a real Airflow (API server with the ``mlops_ui`` and ``mlops_webhooks``
plugins, scheduler, DAG processor, triggerer) on the repository's ``dags/``, serving one
pipeline (``attack_probe``, a copy of the demo spec) from a pipelines folder and a data root of
its own. Its DAGs stay paused, so a run that slipped through would be queued, never executed,
and still be counted. The webhooks have a configured GitHub secret and GitLab token.

The data root holds a recorded monitoring window with a real report (the positive control) and
windows whose recorded report path points outside the reports folder, beside canary files that
must never be served. Helpers here count what an attack could have left behind: DAG runs
(through the REST API) and files under the data root.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from airflow_api import AirflowClient

from airmlops.monitoring.drift import ColumnDriftResult, WindowReport
from airmlops.monitoring.policy import Decision
from airmlops.monitoring.store import MonitoringStore
from airmlops.platform import Platform, wait_for_dag
from airmlops.settings import PROJECT_ROOT

PIPELINE = "attack_probe"
TRAINING_DAG = f"{PIPELINE}_training"
GITHUB_SECRET = "gh-secret-" + uuid.uuid4().hex
GITLAB_TOKEN = "gl-token-" + uuid.uuid4().hex
WEBHOOK_MAX_BODY = 32_768
CANARY = "canary-" + uuid.uuid4().hex
"""Written into files outside the reports folder: it must never appear in an answer."""
REPORT_MARKER = "report-" + uuid.uuid4().hex
GOOD_WINDOW = "w-good"
OUTSIDE_WINDOWS = {
    "absolute path outside": "w-absolute",
    "relative path with ..": "w-dotdot",
    "symlink leaving the root": "w-symlink",
    "not an html file": "w-text",
}


@dataclasses.dataclass(frozen=True)
class AttackTarget:
    """The running platform, a REST client with an admin JWT, and where its state lives."""

    platform: Platform
    client: AirflowClient
    data_root: Path

    @property
    def base_url(self) -> str:
        return self.platform.base_url

    @property
    def jwt_secret(self) -> str:
        """The API server's JWT signing key (to forge tokens that differ in one claim only)."""
        return self.platform.env["AIRFLOW__API_AUTH__JWT_SECRET"]

    def run_count(self, dag_id: str = TRAINING_DAG) -> int:
        """How many runs ``dag_id`` has, from the REST API."""
        return self.client.get_json(f"/dags/{dag_id}/dagRuns", params={"limit": 1}
                                    )["total_entries"]

    def data_files(self) -> set[str]:
        """Every file under the data root, relative to it."""
        return {p.relative_to(self.data_root).as_posix()
                for p in self.data_root.rglob("*") if p.is_file()}

    def server_log(self) -> str:
        """The API server's log (the webhooks and the MLOps view log there)."""
        return (self.platform.run_dir / "logs" / "api-server.log").read_text(errors="replace")


def _write_spec(pipelines: Path) -> None:
    spec = yaml.safe_load((PROJECT_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    spec["name"] = PIPELINE
    pipelines.mkdir(parents=True)
    (pipelines / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))


def _seed_monitoring(data_root: Path, outside: Path) -> None:
    """One window with a real report, and one per way its report path could leave the root."""
    reports = data_root / "reports" / PIPELINE / "monitoring"
    reports.mkdir(parents=True)
    good = reports / f"{GOOD_WINDOW}.html"
    good.write_text(f"<h1>{REPORT_MARKER}</h1>")
    (data_root / "canary.html").write_text(CANARY)
    (reports / "leak.html").symlink_to(outside)
    (reports / "notes.txt").write_text(CANARY)
    paths = {
        GOOD_WINDOW: str(good),
        OUTSIDE_WINDOWS["absolute path outside"]: str(outside),
        OUTSIDE_WINDOWS["relative path with .."]: "../../canary.html",
        OUTSIDE_WINDOWS["symlink leaving the root"]: f"{PIPELINE}/monitoring/leak.html",
        OUTSIDE_WINDOWS["not an html file"]: f"{PIPELINE}/monitoring/notes.txt",
    }
    store = MonitoringStore(data_root)
    start = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
    for i, (window_id, html_path) in enumerate(paths.items()):
        begin = start + dt.timedelta(days=i)
        store.record_window(PIPELINE, WindowReport(
            window_id=window_id, start=begin, end=begin + dt.timedelta(days=1), rows=10,
            sampled=10, columns={"sessions": ColumnDriftResult("wasserstein", 0.1, 0.3, False)},
            drift_share=0.0, prediction_drift=None, quality={}, performance=None, label_count=0,
            breaches=[], html_path=html_path), created=begin)
        store.record_decision(PIPELINE, window_id, Decision("none", "no breach"),
                              decided_at=begin)


@pytest.fixture(scope="session")
def attack_target(platform_factory, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[AttackTarget]:
    """The platform under attack (started once per session; see the module docstring)."""
    root = tmp_path_factory.mktemp("attack")
    pipelines, data_root = root / "pipelines", root / "data"
    _write_spec(pipelines)
    outside = root / "outside-secret.html"
    outside.write_text(CANARY)
    _seed_monitoring(data_root, outside)
    # The platform's processes inherit this environment (and only they need it).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLOPS_GITHUB_WEBHOOK_SECRET", GITHUB_SECRET)
        env.setenv("MLOPS_GITLAB_WEBHOOK_TOKEN", GITLAB_TOKEN)
        env.setenv("MLOPS_PIPELINES_DIR", str(pipelines))
        env.setenv("MLOPS_DATA_ROOT", str(data_root))
        env.setenv("MLOPS_WEBHOOK_BRANCHES", '["main"]')
        env.setenv("MLOPS_WEBHOOK_MAX_BODY_BYTES", str(WEBHOOK_MAX_BODY))
        platform = platform_factory("security", PROJECT_ROOT / "dags",
                                    dags_paused_at_creation=True)
    client = AirflowClient.for_platform(platform)
    wait_for_dag(platform.base_url, client.token, TRAINING_DAG, timeout=240)
    yield AttackTarget(platform, client, data_root)


@pytest.fixture(scope="session")
def raw_http() -> Iterator[httpx.Client]:
    """A plain HTTP client for attacks: no environment proxy, no redirects followed."""
    with httpx.Client(trust_env=False, timeout=30, follow_redirects=False) as client:
        yield client
