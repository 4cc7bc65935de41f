"""The Airflow UI in a real browser: log in, find the demo DAGs, open the training DAG's runs,
open the MLOps view (navigation entry and DAG tab) and check what it shows.

Debian's Chromium (installed by scripts/ensure-chromium.sh; the test fails if it cannot be) is
driven by Playwright. The platform is started with its DAGs paused, so no scheduled training run
races the state prepared here: two registered versions of the ``churn`` model (champion and
challenger, trained small with the package's own training code) in the session's MLflow, and
four monitoring windows with their HTML reports in the platform's data root. That state is
removed afterwards, leaving MLflow and the data root as they were; when the ``churn`` model
already exists (another suite registered it), it is left untouched and the view is checked
against it. Screenshots go to tests/artifacts/ui/.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts" / "ui"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
PIPELINE = "churn"
DEMO_DAGS = ("churn_training", "churn_features", "churn_rollback")
WINDOW_PREFIX = "ui-e2e-"
T0 = dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
TIMEOUT_MS = 30_000


# --------------------------------------------------------------------------------------------
# State the view shows
# --------------------------------------------------------------------------------------------


@dataclass
class SeededRegistry:
    """The champion/challenger the view must show (None: whatever MLflow had, unseeded)."""

    champion: str | None
    challenger: str | None
    seeded: bool
    run_ids: list[str] = field(default_factory=list)


def _toy_spec():
    from airmlops.spec import parse_spec

    return parse_spec({
        "name": PIPELINE,
        "task": "binary_classification",
        "source": {"kind": "file", "path": "toy.parquet"},
        "entity_key": "id",
        "timestamp": "ts",
        "label": "y",
        "features": [{"name": "x1", "type": "numeric"}, {"name": "plan", "type": "categorical"}],
        "training": {"test_fraction": 0.25, "gap_days": 0, "min_rows": 100},
        "estimator": {"class_path": "sklearn.linear_model.LogisticRegression",
                      "params": {"C": 0.5}},
        "gates": {"primary_metric": "roc_auc"},
    })


def _toy_training_set(root: Path, seed: int) -> dict[str, str]:
    from airmlops.training.dataset import time_split, write_training_set

    rng = np.random.default_rng(seed)
    n = 600
    plan = rng.choice(["basic", "premium"], n)
    x1 = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(2 * x1 + (plan == "basic"))))).astype(int)
    frame = pd.DataFrame({
        "id": np.arange(n),
        "ts": pd.Timestamp("2026-01-01", tz="UTC") + pd.to_timedelta(np.arange(n), unit="h"),
        "x1": x1, "plan": plan, "y": y,
    })
    spec = _toy_spec()
    train, test, info = time_split(frame, spec)
    return write_training_set(train, test, root, f"toy{seed}", split=info)


def seed_registry(tracking_uri: str, work: Path) -> SeededRegistry:
    """Register champion (v1) and challenger (v2) of ``churn``, unless the model exists."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from airmlops.training.registry import CHAMPION, register_challenger, set_alias
    from airmlops.training.tracking import train_and_log

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        aliases = client.get_registered_model(PIPELINE).aliases
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    else:
        return SeededRegistry(aliases.get("champion"), aliases.get("challenger"), seeded=False)

    spec = _toy_spec()
    versions, run_ids = [], []
    for number, seed in ((1, 11), (2, 12)):
        paths = _toy_training_set(work, seed)
        result = train_and_log(
            spec, paths["train"], paths["test"], tracking_uri=tracking_uri,
            data_digest=f"sha256-{seed:02d}" + "cd" * 31,
            lineage={"git_commit": f"{number}" * 40, "airflow_dag_id": "churn_training",
                     "airflow_run_id": f"manual__ui-e2e-{number}",
                     "trigger_reason": "seeded by the UI browser test"},
        )
        run_ids.append(result.run_id)
        versions.append(register_challenger(spec, result, tracking_uri,
                                            {"gate_blessed": "true"}).version)
    champion, challenger = versions
    set_alias(PIPELINE, CHAMPION, champion, tracking_uri)
    for key, value in {
        "bento_tag": "churn:v1-0123abcd", "image_tag": "airmlops/churn:v1",
        "image_id": "sha256:" + "ab" * 32, "deployed_at": "2026-03-01T12:00:00+00:00",
        "deployed_target": "process http://127.0.0.1:8600",
    }.items():
        client.set_model_version_tag(PIPELINE, champion, key, value)
    return SeededRegistry(champion, challenger, seeded=True, run_ids=run_ids)


def unseed_registry(tracking_uri: str, seeded: SeededRegistry) -> None:
    """Remove what :func:`seed_registry` created (the runs stay in the experiment, deleted)."""
    from mlflow import MlflowClient

    if not seeded.seeded:
        return
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.delete_registered_model(PIPELINE)
    for run_id in seeded.run_ids:
        client.delete_run(run_id)


def seed_monitoring(data_root: Path) -> tuple[list[str], bool]:
    """Four windows (drift rising, performance falling, the last one retrains) with reports.

    Returns the window ids and whether the monitoring table was created here.
    """
    from airmlops.monitoring.drift import ColumnDriftResult, WindowReport
    from airmlops.monitoring.policy import Decision
    from airmlops.monitoring.store import MonitoringStore

    store = MonitoringStore(data_root)
    created = not store.path(PIPELINE).exists()
    ids = []
    for i in range(4):
        window_id = f"{WINDOW_PREFIX}{i}"
        start = T0 + dt.timedelta(days=i)
        html = data_root / "reports" / PIPELINE / "monitoring" / f"{window_id}.html"
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(f"<!doctype html><title>Evidently report {window_id}</title>"
                        f"<h1>Evidently report {window_id}</h1>")
        drifted = i >= 2
        store.record_window(PIPELINE, WindowReport(
            window_id=window_id, start=start, end=start + dt.timedelta(days=1), rows=1200 + 50 * i,
            sampled=1000,
            columns={"sessions": ColumnDriftResult("wasserstein", 0.1, 0.04 + 0.1 * i, drifted),
                     "plan": ColumnDriftResult("jensenshannon", 0.1, 0.02, False)},
            drift_share=[0.0, 0.1, 0.35, 0.5][i],
            prediction_drift=ColumnDriftResult("wasserstein", 0.1, 0.02 + 0.03 * i, False),
            quality={}, performance={"roc_auc": [0.82, 0.8, 0.74, 0.69][i]},
            label_count=400, breaches=["drift_share"] if drifted else [], html_path=str(html),
        ), created=start + dt.timedelta(days=1))
        decision = (Decision("retrain", "2 of the last 3 windows breached: drift_share")
                    if i == 3 else Decision("none", "no breach" if not drifted
                                            else "1 of the last 3 windows breached"))
        store.record_decision(PIPELINE, window_id, decision,
                              decided_at=start + dt.timedelta(days=1, minutes=5),
                              triggered_run_id="monitoring__ui-e2e-3" if i == 3 else None)
        ids.append(window_id)
    return ids, created


def unseed_monitoring(data_root: Path, window_ids: list[str], created: bool) -> None:
    """Remove the seeded windows (the whole table when it was created here) and reports."""
    from airmlops.monitoring.store import MonitoringStore

    table = MonitoringStore(data_root).path(PIPELINE)
    if created:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{table}{suffix}").unlink(missing_ok=True)
    elif table.exists():
        with contextlib.closing(sqlite3.connect(table)) as connection, connection:
            connection.executemany("DELETE FROM windows WHERE window_id = ?",
                                   [(w,) for w in window_ids])
    for window_id in window_ids:
        (data_root / "reports" / PIPELINE / "monitoring" / f"{window_id}.html").unlink(
            missing_ok=True)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium() -> str:
    """Debian's Chromium, installed if missing (a failure to install fails the test)."""
    result = subprocess.run([str(REPO_ROOT / "scripts" / "ensure-chromium.sh")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        "scripts/ensure-chromium.sh could not provide /usr/bin/chromium:\n"
        + result.stdout[-3000:] + result.stderr[-3000:])
    assert Path(CHROMIUM).exists()
    return CHROMIUM


@pytest.fixture(scope="module")
def ui_platform(platform_factory):
    """The repository's DAGs and plugins on a platform whose DAGs start paused."""
    return platform_factory("ui", REPO_ROOT / "dags", dags_paused_at_creation=True)


@pytest.fixture(scope="module")
def token(ui_platform) -> str:
    from airmlops.platform import api_token, wait_for_dag

    token = api_token(ui_platform.base_url, ui_platform.username, ui_platform.password)
    for dag_id in DEMO_DAGS:
        wait_for_dag(ui_platform.base_url, token, dag_id, timeout=180.0)
    return token


@pytest.fixture(scope="module")
def seeded(ui_platform, tmp_path_factory) -> Iterator[tuple[SeededRegistry, list[str]]]:
    data_root = Path(ui_platform.env["MLOPS_DATA_ROOT"])
    registry = seed_registry(ui_platform.mlflow_url, tmp_path_factory.mktemp("ui-seed"))
    windows, created = seed_monitoring(data_root)
    yield registry, windows
    unseed_monitoring(data_root, windows, created)
    unseed_registry(ui_platform.mlflow_url, registry)


@pytest.fixture(scope="module")
def browser_page(chromium):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, \
            sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()


def shot(page, name: str, full_page: bool = False) -> Path:
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


# --------------------------------------------------------------------------------------------
# The tests (in order: they share one browser session)
# --------------------------------------------------------------------------------------------


def test_the_view_refuses_requests_without_a_valid_airflow_token(ui_platform, token, seeded):
    base = f"{ui_platform.base_url}/mlops-ui"
    with httpx.Client(trust_env=False, timeout=30) as client:
        assert client.get(f"{base}/api/pipelines").status_code == 401
        forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
        denied = client.get(f"{base}/api/pipelines", headers={"Authorization": f"Bearer {forged}"})
        assert denied.status_code == 401
        page = client.get(f"{base}/", headers={"Accept": "text/html"})
        assert page.status_code == 303 and "/auth/login" in page.headers["location"]
        report = client.get(f"{base}/pipelines/{PIPELINE}/windows/{seeded[1][0]}/report")
        assert report.status_code == 401

        started = time.monotonic()
        allowed = client.get(f"{base}/api/pipelines",
                             headers={"Authorization": f"Bearer {token}"})
        took = time.monotonic() - started
    assert allowed.status_code == 200, allowed.text
    assert took < 10, f"the view's data took {took:.1f} s"
    churn = next(p for p in allowed.json()["pipelines"] if p["name"] == PIPELINE)
    registry, windows = seeded
    champion = churn["registry"]["champion"]
    assert (champion["version"] if champion else None) == registry.champion
    shown = [w["window_id"] for w in churn["monitoring"]["windows"]]
    assert [w for w in shown if w.startswith(WINDOW_PREFIX)] == windows  # oldest first


def on_url(page, part: str, *, present: bool = True) -> None:
    """Wait until the page's URL contains ``part`` (or no longer does). Polls the URL, so a
    navigation the app's own redirects abort (net::ERR_ABORTED) does not fail the wait, as
    ``page.wait_for_url`` can when the login redirect chain replaces the navigation it waits
    for."""
    import re

    from playwright.sync_api import expect

    pattern = re.compile(f".*{re.escape(part)}.*")
    if present:
        expect(page).to_have_url(pattern, timeout=TIMEOUT_MS)
    else:
        expect(page).not_to_have_url(pattern, timeout=TIMEOUT_MS)


def test_login_and_find_the_demo_dags(ui_platform, token, browser_page):
    page = browser_page
    page.goto(f"{ui_platform.base_url}/")
    on_url(page, "/auth/login")
    page.get_by_label("Username").fill(ui_platform.username)
    page.get_by_label("Password").fill(ui_platform.password)
    page.get_by_role("button", name="Sign in").click()
    on_url(page, "/auth/", present=False)
    assert any(c["name"] == "_token" for c in page.context.cookies())

    page.goto(f"{ui_platform.base_url}/dags")
    for dag_id in DEMO_DAGS:
        page.get_by_role("link", name=dag_id, exact=True).first.wait_for()
    shot(page, "01-dags")


def test_open_the_training_dag_runs(ui_platform, token, browser_page):
    from airmlops.platform import trigger_dag

    # The DAG is paused, so this run stays queued: it shows on the page and trains nothing.
    run_id = trigger_dag(ui_platform.base_url, token, "churn_training",
                         run_id="ui_e2e__queued")["dag_run_id"]
    page = browser_page
    page.goto(f"{ui_platform.base_url}/dags/churn_training/runs")
    page.get_by_role("heading", name="churn_training").first.wait_for()
    page.get_by_role("link", name=run_id).first.wait_for()
    page.locator("a[href$='/dags/churn_training/plugin/mlops-dag']").wait_for()  # the DAG tab
    shot(page, "02-training-runs")


def _mlops_frame(page):
    return page.frame_locator("iframe[title='MLOps']")


def test_the_mlops_view_shows_registry_deployment_and_monitoring(ui_platform, seeded,
                                                                 browser_page):
    registry, windows = seeded
    page = browser_page
    page.locator("a[href$='/plugin/mlops']").click()  # the navigation entry
    on_url(page, "/plugin/mlops")
    frame = _mlops_frame(page)
    card = frame.locator(f"section[data-pipeline='{PIPELINE}']")
    card.wait_for()
    assert card.locator("h2").inner_text() == PIPELINE

    champion = card.locator(".panel.champion")
    challenger = card.locator(".panel.challenger")
    if registry.champion is None:
        assert "No champion yet" in champion.inner_text()
    else:
        assert champion.get_attribute("data-version") == registry.champion
        assert f"version {registry.champion}" in champion.inner_text()
    if registry.challenger is None:
        assert "No challenger" in challenger.inner_text()
    else:
        assert challenger.get_attribute("data-version") == registry.challenger
    if registry.seeded:
        text = champion.inner_text()
        for expected in ("roc_auc", "1111111111", "sha256-11", "airmlops/churn:v1",
                         "churn:v1-0123abcd", "process http://127.0.0.1:8600"):
            assert expected in text, f"{expected!r} missing from the champion panel:\n{text}"
        link = champion.get_by_role("link", name=f"version {registry.champion}")
        assert link.get_attribute("href") == (
            f"{ui_platform.mlflow_url}/#/models/{PIPELINE}/versions/{registry.champion}")
        assert "roc_auc" in challenger.inner_text()

    assert "Not deployed" in card.locator(".panel.deployment").inner_text() or \
        card.locator(".panel.deployment code.address").count() == 1

    chart = card.locator("svg.mlops-chart")
    chart.wait_for()
    assert chart.locator("circle.point").count() >= 2 * len(windows)
    assert chart.locator("circle.point.breach").count() >= 2
    rows = card.locator("table.windows tr.window")
    shown = [rows.nth(i).get_attribute("data-window") for i in range(rows.count())]
    assert [w for w in shown if w.startswith(WINDOW_PREFIX)] == windows[::-1]  # latest first
    latest = card.locator(f"tr.window[data-window='{windows[-1]}']").inner_text()
    assert "retrain" in latest and "drift_share" in latest and "0.500" in latest
    shot(page, "03-mlops-view")


def test_a_window_report_opens_from_the_view(ui_platform, seeded, browser_page):
    _, windows = seeded
    page = browser_page
    row = _mlops_frame(page).locator(f"tr.window[data-window='{windows[-1]}']")
    with page.context.expect_page() as opened:
        row.get_by_role("link", name="Evidently report").click()
    report = opened.value
    report.wait_for_load_state()
    assert report.url.endswith(f"/mlops-ui/pipelines/{PIPELINE}/windows/{windows[-1]}/report")
    assert f"Evidently report {windows[-1]}" in report.locator("h1").inner_text()
    shot(report, "04-window-report")
    report.close()


def test_the_mlops_tab_of_a_dag_shows_its_pipeline(ui_platform, seeded, browser_page):
    page = browser_page
    page.goto(f"{ui_platform.base_url}/dags/churn_training")
    page.locator("a[href$='/dags/churn_training/plugin/mlops-dag']").click()
    on_url(page, "/dags/churn_training/plugin/mlops-dag")
    card = page.frame_locator("iframe[title='MLOps']").locator(
        f"section[data-pipeline='{PIPELINE}']")
    card.wait_for()
    assert card.locator("svg.mlops-chart").count() == 1
    shot(page, "05-dag-mlops-tab")

    # The page on its own, whole (the iframe above scrolls inside the UI).
    page.goto(f"{ui_platform.base_url}/mlops-ui/")
    page.locator(f"section[data-pipeline='{PIPELINE}'] svg.mlops-chart").wait_for()
    shot(page, "06-mlops-page-full", full_page=True)
