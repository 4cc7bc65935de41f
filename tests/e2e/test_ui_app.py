"""The MLOps view's app without Airflow or a browser: authentication, authorization, escaping,
empty states, bounded waits on MLflow, report confinement, and the chart.

MLflow is a stub HTTP server in a thread (its REST answers are canned), authentication a fake
that stands in for Airflow's auth manager (the real JWT path is covered by test_ui_browser.py).
Fast: no services are started.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from airmlops.monitoring.drift import ColumnDriftResult, WindowReport
from airmlops.monitoring.policy import Decision
from airmlops.monitoring.store import MonitoringStore
from airmlops.settings import Settings
from airmlops.ui import app as ui
from airmlops.ui import data
from airmlops.ui.chart import metrics_chart

REPO_ROOT = Path(__file__).resolve().parents[2]
NOW = dt.datetime(2026, 4, 10, 12, tzinfo=dt.UTC)
T0 = dt.datetime(2026, 4, 1, tzinfo=dt.UTC)
EVIL = "<script>alert(1)</script>"
RUN_ID = "a" * 32


# --------------------------------------------------------------------------------------------
# A stub MLflow
# --------------------------------------------------------------------------------------------


class StubMlflow(http.server.ThreadingHTTPServer):
    """Answers the three REST endpoints the view reads, from ``self.models``."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StubHandler)
        self.models: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _StubHandler(http.server.BaseHTTPRequestHandler):
    server: StubMlflow

    def log_message(self, *args) -> None:
        pass

    def _answer(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        missing = {"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "not found"}
        if url.path.endswith("/registered-models/get"):
            model = self.server.models.get(query.get("name"))
            if model is None:
                return self._answer(404, missing)
            aliases = [{"alias": a, "version": v} for a, v in model["aliases"].items()]
            return self._answer(200, {"registered_model": {"name": query["name"],
                                                           "aliases": aliases}})
        if url.path.endswith("/model-versions/get"):
            model = self.server.models.get(query.get("name"), {})
            version = model.get("versions", {}).get(query.get("version"))
            return self._answer(200, {"model_version": version}) if version else \
                self._answer(404, missing)
        if url.path.endswith("/runs/get"):
            run = self.server.runs.get(query.get("run_id"))
            return self._answer(200, {"run": run}) if run else self._answer(404, missing)
        return self._answer(404, missing)


@pytest.fixture
def mlflow() -> Iterator[StubMlflow]:
    server = StubMlflow()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def register(mlflow: StubMlflow, *, champion: str | None = "3", challenger: str | None = "4",
             tag_value: str = "0123456789abcdef0123456789abcdef01234567") -> None:
    versions = {}
    for number in ("3", "4"):
        versions[number] = {
            "name": "churn", "version": number, "run_id": RUN_ID, "status": "READY",
            "creation_timestamp": int(T0.timestamp() * 1000),
            "aliases": [a for a, v in (("champion", champion), ("challenger", challenger))
                        if v == number],
            "tags": [{"key": "git_commit", "value": tag_value},
                     {"key": "image_tag", "value": f"airmlops/churn:v{number}"},
                     {"key": "gate_blessed", "value": "true"}],
        }
    aliases = {a: v for a, v in (("champion", champion), ("challenger", challenger)) if v}
    mlflow.models["churn"] = {"aliases": aliases, "versions": versions}
    mlflow.runs[RUN_ID] = {
        "info": {"run_id": RUN_ID, "experiment_id": "7"},
        "data": {"metrics": [{"key": "test_roc_auc", "value": 0.81},
                             {"key": "train_roc_auc", "value": 0.9},
                             {"key": "test_log_loss", "value": 0.42}],
                 "tags": [{"key": "git_commit", "value": "from-the-run"},
                          {"key": "data_digest", "value": "sha256-" + "ef" * 32}]},
    }


# --------------------------------------------------------------------------------------------
# The app with fake authentication and a temporary data root
# --------------------------------------------------------------------------------------------


class FakeAuth:
    """Accepts the bearer token ``good`` (or the cookie); may read only ``readable`` DAGs."""

    def __init__(self, readable: set[str] | None = None) -> None:
        self.readable_dags = readable
        self.login_calls: list[str] = []

    async def viewer(self, request) -> ui.Viewer:
        if ui.request_token(request) != "good":
            raise ui.NotAuthenticated("no valid token")

        async def readable(dag_ids: set[str]) -> set[str]:
            return dag_ids if self.readable_dags is None else dag_ids & self.readable_dags

        return ui.Viewer(name="alice", readable=readable)

    def login_url(self, next_url: str) -> str:
        self.login_calls.append(next_url)
        return f"/auth/login?next={next_url}"


def write_spec(folder: Path, description: str = "Churn, for tests.") -> None:
    spec = yaml.safe_load((REPO_ROOT / "include" / "pipelines" / "churn.yaml").read_text())
    spec["description"] = description
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "churn.yaml").write_text(yaml.safe_dump(spec))


def record_windows(data_root: Path, n: int = 3, reason: str = "no breach",
                   html: str | None = "default") -> list[str]:
    """``n`` windows; all but the second carry a label-free estimate (roc_auc 0.81 - 0.05 i)."""
    store = MonitoringStore(data_root)
    ids = []
    for i in range(n):
        window_id = f"w{i:03d}"
        start = T0 + dt.timedelta(days=i)
        path = None
        if html == "default":
            target = data_root / "reports" / "churn" / "monitoring" / f"{window_id}.html"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(f"<h1>report {window_id}</h1>")
            path = str(target)
        elif html is not None:
            path = html
        store.record_window("churn", WindowReport(
            window_id=window_id, start=start, end=start + dt.timedelta(days=1), rows=100,
            sampled=100, columns={"sessions": ColumnDriftResult("wasserstein", 0.1, 0.3, i == 2)},
            drift_share=0.2 * i, prediction_drift=None, quality={},
            performance={"roc_auc": 0.8 - 0.05 * i} if i else None, label_count=300 if i else 0,
            breaches=["drift_share"] if i == 2 else [], html_path=path,
            estimated_performance=None if i == 1 else {
                "roc_auc": 0.81 - 0.05 * i, "accuracy": 0.7, "precision": None, "recall": 0.6,
                "rows": 100}), created=start)
        store.record_decision("churn", window_id, Decision("none", reason), decided_at=start)
        ids.append(window_id)
    return ids


@pytest.fixture
def env(tmp_path: Path, mlflow: StubMlflow):
    """``(client, settings, auth)``: the app mounted at /mlops-ui like Airflow does."""
    write_spec(tmp_path / "pipelines")
    settings = Settings(data_root=tmp_path / "data", pipelines_dir=tmp_path / "pipelines",
                        mlflow_tracking_uri=mlflow.url)
    auth = FakeAuth()
    sub = ui.create_app()
    sub.dependency_overrides[ui.get_authenticator] = lambda: auth
    sub.dependency_overrides[ui.get_ui_settings] = lambda: settings
    sub.dependency_overrides[ui.get_clock] = lambda: (lambda: NOW)
    root = FastAPI()
    root.mount(ui.MOUNT_PATH, sub)
    with TestClient(root) as client:
        yield client, settings, auth


AUTH = {"Authorization": "Bearer good"}


# --------------------------------------------------------------------------------------------
# Authentication and authorization
# --------------------------------------------------------------------------------------------


def test_without_a_valid_token_the_api_answers_401_and_the_page_redirects_to_login(env):
    client, _, auth = env
    assert client.get("/mlops-ui/api/pipelines").status_code == 401
    wrong = client.get("/mlops-ui/api/pipelines", headers={"Authorization": "Bearer bad"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    page = client.get("/mlops-ui/?pipeline=churn", headers={"Accept": "text/html"},
                      follow_redirects=False)
    assert page.status_code == 303
    assert auth.login_calls == ["/mlops-ui/?pipeline=churn"]
    assert client.get("/mlops-ui/pipelines/churn/windows/w000/report").status_code == 401
    # The icon is public: the navigation shows it before anyone logs in.
    assert client.get("/mlops-ui/icon.svg").status_code == 200


def test_the_ui_cookie_authenticates_and_a_bearer_header_wins_over_it(env):
    client, _, _ = env
    client.cookies.set("_token", "good")
    assert client.get("/mlops-ui/api/pipelines").status_code == 200
    assert client.get("/mlops-ui/api/pipelines",
                      headers={"Authorization": "Bearer bad"}).status_code == 401


def test_a_viewer_sees_only_pipelines_whose_training_dag_they_may_read(env):
    client, settings, auth = env
    record_windows(settings.data_root)
    auth.readable_dags = {"some_other_dag"}
    assert client.get("/mlops-ui/api/pipelines", headers=AUTH).json()["pipelines"] == []
    assert client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).status_code == 404
    assert client.get("/mlops-ui/pipelines/churn/windows/w000/report",
                      headers=AUTH).status_code == 404
    auth.readable_dags = {"churn_training"}
    assert [p["name"] for p in client.get("/mlops-ui/api/pipelines",
                                          headers=AUTH).json()["pipelines"]] == ["churn"]


# --------------------------------------------------------------------------------------------
# Content
# --------------------------------------------------------------------------------------------


def test_empty_states_render_when_nothing_exists_yet(env):
    client, settings, _ = env
    response = client.get("/mlops-ui/", headers=AUTH)
    assert response.status_code == 200
    html = response.text
    assert 'data-pipeline="churn"' in html
    for empty in ("No champion yet", "No challenger", "Not deployed", "No monitoring windows"):
        assert empty in html
    assert "<svg" not in html
    # Looking creates nothing in the data root.
    assert not (settings.data_root / "monitoring").exists()
    assert not (settings.data_root / "deployments").exists()


def test_champion_challenger_metrics_lineage_and_mlflow_links(env, mlflow):
    client, _, _ = env
    register(mlflow)
    body = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()
    champion = body["registry"]["champion"]
    assert champion["version"] == "3" and body["registry"]["challenger"]["version"] == "4"
    assert champion["metrics"] == {"log_loss": 0.42, "roc_auc": 0.81}  # test_* only
    assert champion["lineage"]["git_commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert champion["lineage"]["data_digest"] == "sha256-" + "ef" * 32  # from the run
    assert champion["lineage"]["image_tag"] == "airmlops/churn:v3"
    assert champion["details"] == {"gate_blessed": "true"}
    assert champion["version_url"] == f"{mlflow.url}/#/models/churn/versions/3"
    assert champion["run_url"] == f"{mlflow.url}/#/experiments/7/runs/{RUN_ID}"

    html = client.get("/mlops-ui/", headers=AUTH).text
    assert f'href="{mlflow.url}/#/models/churn/versions/3"' in html
    assert "airmlops/churn:v4" in html and "0123456789" in html


def test_links_use_the_configured_mlflow_ui_address(env, mlflow):
    client, settings, _ = env
    settings.mlflow_ui_url = "https://mlflow.example.org/"  # e.g. behind a reverse proxy
    register(mlflow)
    champion = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()["registry"][
        "champion"]
    assert champion["version_url"] == "https://mlflow.example.org/#/models/churn/versions/3"
    assert mlflow.url not in client.get("/mlops-ui/", headers=AUTH).text


def test_a_challenger_that_is_the_champion_is_named_not_repeated(env, mlflow):
    client, _, _ = env
    register(mlflow, champion="3", challenger="3")
    html = client.get("/mlops-ui/", headers=AUTH).text
    assert "The champion itself" in html
    assert html.count("airmlops/churn:v3") == 1


def test_monitoring_windows_chart_and_report_links(env):
    client, settings, _ = env
    ids = record_windows(settings.data_root)
    html = client.get("/mlops-ui/?dag_id=churn_features", headers=AUTH).text
    assert 'id="chart-churn"' in html and html.count('class="point drift') == 3
    assert html.count('class="point perf') == 2  # the first window had too few labels
    assert [w for w in ids if f'data-window="{w}"' in html] == ids
    assert html.index('data-window="w002"') < html.index('data-window="w000"')  # latest first
    assert 'href="/mlops-ui/pipelines/churn/windows/w002/report"' in html
    assert 'href="/dags/churn_training/runs"' in html  # Airflow's pages, from the mount
    # The label-free estimate beside the realized metric, labelled as such.
    assert "0.700 <span class=\"muted estimate\"" in html and "(est. 0.710)" in html
    assert "- <span class=\"muted estimate\"" in html and "(est. 0.810)" in html  # no labels yet
    assert html.count("(est. ") == 3  # w002 in the table and the latest summary, w000; not w001
    assert "from 100 predictions" in html and "realized (est.)" in html
    windows = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()["monitoring"][
        "windows"]
    assert [w["estimated_performance"].get("roc_auc") for w in windows] == [
        pytest.approx(0.81), None, pytest.approx(0.71)]
    assert windows[0]["estimated_performance"] == {
        "roc_auc": pytest.approx(0.81), "accuracy": 0.7, "recall": 0.6}  # None and rows left out
    assert windows[0]["estimated_rows"] == 100 and windows[1]["estimated_rows"] is None

    report = client.get("/mlops-ui/pipelines/churn/windows/w002/report", headers=AUTH)
    assert report.status_code == 200 and "report w002" in report.text
    assert report.headers["content-security-policy"].startswith("sandbox allow-scripts")


def test_everything_from_specs_mlflow_and_the_store_is_escaped(env, mlflow):
    client, settings, _ = env
    write_spec(settings.pipelines_dir, description=f"Churn {EVIL}")
    register(mlflow, tag_value=EVIL)
    record_windows(settings.data_root, reason=EVIL)
    html = client.get("/mlops-ui/", headers=AUTH).text
    assert EVIL not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # The page's only script is its own, allowed by the response's nonce.
    assert html.count("<script") == 1
    nonce = client.get("/mlops-ui/", headers=AUTH).headers["content-security-policy"]
    assert "script-src 'nonce-" in nonce and "unsafe-inline" not in nonce


def test_a_dag_of_no_pipeline_and_an_unknown_pipeline_show_an_empty_page(env):
    client, _, _ = env
    for query in ("dag_id=other_dag", "pipeline=nope", "pipeline=../x"):
        response = client.get(f"/mlops-ui/?{query}", headers=AUTH)
        assert response.status_code == 200 and "No pipeline matches" in response.text


def test_an_invalid_spec_is_named_and_does_not_break_the_page(env):
    client, settings, _ = env
    (settings.pipelines_dir / "broken.yaml").write_text("name: Broken\n")
    html = client.get("/mlops-ui/", headers=AUTH).text
    assert "broken.yaml" in html and 'data-pipeline="churn"' in html


# --------------------------------------------------------------------------------------------
# Never hang, never leak
# --------------------------------------------------------------------------------------------


def test_an_unreachable_mlflow_is_reported_not_fatal(env):
    client, settings, _ = env
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings.mlflow_tracking_uri = f"http://127.0.0.1:{port}"  # nothing listens there
    response = client.get("/mlops-ui/", headers=AUTH)
    assert response.status_code == 200
    assert "is unreachable" in response.text


def test_a_silent_mlflow_costs_at_most_the_deadline(env):
    client, settings, _ = env
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    try:
        settings.mlflow_tracking_uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        response = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH)
        took = time.monotonic() - started
    finally:
        silent.close()
    assert response.status_code == 200
    assert took < data.DEFAULT_DEADLINE_SECONDS + 2
    assert "did not answer" in response.json()["registry"]["error"]


def test_the_overview_waits_no_longer_than_its_deadline(tmp_path: Path):
    from airmlops.spec import load_spec

    spec = load_spec(REPO_ROOT / "include" / "pipelines" / "churn.yaml")
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        started = time.monotonic()
        overview = data.collect_overview(
            [spec], data_root=tmp_path, reports_dir=tmp_path / "reports",
            tracking_uri=f"http://127.0.0.1:{silent.getsockname()[1]}", now=NOW, deadline=0.3)
        took = time.monotonic() - started
    finally:
        silent.close()
    assert took < 1.0
    registry = overview.pipelines[0].registry
    assert registry.champion is None and registry.error == "MLflow did not answer within 0.3 s"
    assert overview.generated_at == NOW.isoformat()


def test_reports_are_served_only_from_inside_the_reports_folder(tmp_path: Path):
    reports = tmp_path / "reports"
    inside = reports / "churn" / "a.html"
    inside.parent.mkdir(parents=True)
    inside.write_text("ok")
    outside = tmp_path / "secret.html"
    outside.write_text("secret")
    (reports / "link.html").symlink_to(outside)
    (reports / "churn" / "notes.txt").write_text("not a report")

    assert data.report_file(reports, str(inside)) == inside.resolve()
    assert data.report_file(reports, "churn/a.html") == inside.resolve()
    for bad in (str(outside), "../secret.html", str(reports / "link.html"), "link.html",
                "churn/notes.txt", "churn/missing.html", "", None, 42):
        assert data.report_file(reports, bad) is None, bad


def test_a_window_whose_report_lies_outside_is_not_linked_or_served(env, tmp_path: Path):
    client, settings, _ = env
    outside = tmp_path / "elsewhere.html"
    outside.write_text("not yours")
    record_windows(settings.data_root, n=1, html=str(outside))
    body = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()
    assert body["monitoring"]["windows"][0]["has_report"] is False
    assert client.get("/mlops-ui/pipelines/churn/windows/w000/report",
                      headers=AUTH).status_code == 404
    assert client.get("/mlops-ui/pipelines/churn/windows/..%2F..%2Fx/report",
                      headers=AUTH).status_code == 404


def write_state(data_root: Path, canary=None, shadow=None) -> None:
    """A recorded deployment of version 3 in blue (nothing runs), with ``canary`` and
    ``shadow`` records if given."""
    state = data_root / "deployments" / "churn" / "state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "pipeline": "churn", "active": "blue", "switched_at": "2026-04-09T08:00:00+00:00",
        "proxy": {"url": "http://127.0.0.1:8600", "port": 8600, "pid": None,
                  "create_time": None},
        "slots": {"blue": {"model_version": "3", "target": "process", "artifact": "churn:v3",
                           "upstream": "http://127.0.0.1:1", "port": 1, "instance": "x",
                           "pid": None, "create_time": None, "started_at": None},
                  "green": None},
    }
    if canary is not None:
        record["canary"] = canary
    if shadow is not None:
        record["shadow"] = shadow
    state.write_text(json.dumps(record))


def _step(percent: int, requests: int, error_rate: float, p50: float, verdict: str = "pass",
          reason: str = "") -> dict:
    """One canary step as :func:`airmlops.serving.deploy.canary.run_canary` records it."""
    return {"percent": percent, "seconds": 30.0, "extended": percent == 100,
            "requests": requests, "errors": round(requests * error_rate),
            "error_rate": error_rate, "p50_ms": p50,
            "live": {"requests": 900, "errors": 9, "error_rate": 0.01, "p50_ms": 12.0,
                     "window": "step"},
            "z": -3.2, "verdict": verdict, "reason": reason}


def test_a_recorded_deployment_is_shown_with_its_address(env):
    client, settings, _ = env
    write_state(settings.data_root)
    body = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()["deployment"]
    assert body["deployed"] and body["stable_url"] == "http://127.0.0.1:8600"
    assert body["active_version"] == "3" and body["proxy_alive"] is False
    assert body["slots"][0]["alive"] is False
    html = client.get("/mlops-ui/", headers=AUTH).text
    assert "http://127.0.0.1:8600" in html and "proxy down" in html
    assert body["canary"] is None and "Last canary" not in html


def test_the_last_canary_and_its_steps_are_shown_escaped(env):
    client, settings, _ = env
    write_state(settings.data_root, canary={
        "version": "4", "slot": "green", "started_at": "2026-04-09T07:00:00+00:00",
        "outcome": "rolled_back",
        "steps": [_step(10, 120, 0.0083, 11.5), _step(50, 480, 0.0104, 12.25),
                  _step(100, 95, 0.2, 40.0, "fail", f"error rate too high {EVIL}")]})
    canary = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()["deployment"][
        "canary"]
    assert canary["version"] == "4" and canary["outcome"] == "rolled_back"
    assert [s["percent"] for s in canary["steps"]] == [10, 50, 100]
    assert canary["steps"][2]["live_p50_ms"] == 12.0 and canary["steps"][2]["verdict"] == "fail"
    html = client.get("/mlops-ui/", headers=AUTH).text
    assert "Last canary: version 4" in html and '<span class="chip bad">rolled back</span>' in html
    assert html.count('class="canary-step"') == 3
    assert "0.83 % <span class=\"muted\">/ 1.00 %" in html  # error rate, canary / live
    assert "12.2 ms <span class=\"muted\">/ 12.0 ms" in html  # p50, canary / live
    assert "480 <span class=\"muted\">/ 900" in html and "(held twice)" in html
    assert '<span class="verdict-fail">fail</span>' in html
    assert EVIL not in html and "error rate too high &lt;script&gt;" in html

    write_state(settings.data_root, canary={"version": "5", "outcome": "promoted",
                                             "steps": [_step(100, 300, 0.0, 10.0)]})
    html = client.get("/mlops-ui/", headers=AUTH).text
    assert '<span class="chip ok">promoted</span>' in html and "Last canary: version 5" in html


def _judgement(reasons: list[str], labelled: int = 0) -> dict:
    """A shadow judgement as :func:`airmlops.serving.deploy.shadow.run_shadow` records it."""
    return {"seconds": 60.0, "extended": False, "percent": 100,
            "window": {"start": "2026-04-09T07:00:00+00:00", "end": "2026-04-09T07:01:00+00:00"},
            "shadow": {"requests": 1180, "errors": 2, "error_rate": 0.0017, "p50_ms": 9.5},
            "live": {"requests": 1200, "errors": 0, "error_rate": 0.0, "p50_ms": 8.25},
            "comparison": {"pairs": 1150, "agreement_rate": 0.9412, "score_ks": 0.0731,
                           "mean_score_shift": -0.0125, "labelled": labelled, "metric": "roc_auc",
                           "live_metric": 0.81 if labelled else None,
                           "shadow_metric": 0.8345 if labelled else None},
            "verdict": "reject" if reasons else "promote", "reasons": reasons}


def test_the_last_shadow_and_its_comparison_are_shown_escaped(env):
    client, settings, _ = env
    write_state(settings.data_root, shadow={
        "version": "4", "slot": "green", "started_at": "2026-04-09T07:00:00+00:00",
        "outcome": "rejected", "judgement": _judgement([f"agreement too low {EVIL}"])})
    shadow = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()["deployment"][
        "shadow"]
    assert shadow["version"] == "4" and shadow["outcome"] == "rejected"
    assert shadow["pairs"] == 1150 and shadow["agreement_rate"] == 0.9412
    assert shadow["shadow_p50_ms"] == 9.5 and shadow["live_requests"] == 1200
    html = client.get("/mlops-ui/", headers=AUTH).text
    assert "Last shadow: version 4" in html and '<span class="chip bad">rejected</span>' in html
    assert "<dt>agreement</dt><dd>94.12 %</dd>" in html
    assert "<dt>score KS</dt><dd>0.0731</dd>" in html and "-0.0125" in html
    assert "no label yet" in html and "100 % mirrored" in html
    assert EVIL not in html and "agreement too low &lt;script&gt;" in html

    write_state(settings.data_root, shadow={"version": "5", "outcome": "promoted",
                                             "judgement": _judgement([], labelled=300)})
    html = client.get("/mlops-ui/", headers=AUTH).text
    assert '<span class="chip ok">promoted</span>' in html and "Last shadow: version 5" in html
    assert "0.8345 <span class=\"muted\">/ live 0.8100 on 300 labelled" in html


def _log_shadow_window(data_root: Path) -> None:
    """Four live predictions, their shadow rows and labels, logged in the judgement's window
    (07:00-07:01 on 2026-04-09): live scores rank the labels perfectly, shadow scores not."""
    from airmlops.serving.prediction_log import (
        LabelRecord,
        PredictionRecord,
        SqliteLogBackend,
        sqlite_log_path,
    )
    from airmlops.times import epoch_us

    ts = epoch_us(dt.datetime(2026, 4, 9, 7, 0, 30, tzinfo=dt.UTC))
    labels = [1, 0, 1, 0]
    live_scores, shadow_scores = [0.9, 0.1, 0.8, 0.2], [0.7, 0.6, 0.3, 0.1]

    def rows(scores: list[float], version: str) -> list[PredictionRecord]:
        return [PredictionRecord(f"{i:032x}", 0, ts + i, version, f"c{i}", {}, {},
                                 float(score >= 0.5), score)
                for i, score in enumerate(scores)]

    backend = SqliteLogBackend(sqlite_log_path(data_root, "churn"))
    try:
        backend.write(rows(live_scores, "3"), [
            LabelRecord(f"{i:032x}", f"c{i}", float(label), ts + 1000)
            for i, label in enumerate(labels)])
        backend.write_shadow(rows(shadow_scores, "4"))
    finally:
        backend.close()


def test_the_shadow_metrics_are_read_again_once_labels_arrived(env):
    client, settings, _ = env
    _log_shadow_window(settings.data_root)
    write_state(settings.data_root, shadow={
        "version": "4", "slot": "green", "outcome": "promoted",
        "judgement": _judgement([], labelled=0)})
    shadow = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()["deployment"][
        "shadow"]
    # Read again from the log: 4 pairs, all labelled; live AUC 1.0, shadow AUC 0.75.
    assert shadow["pairs"] == 4 and shadow["labelled"] == 4
    assert shadow["live_metric"] == 1.0 and shadow["shadow_metric"] == 0.75
    assert shadow["agreement_rate"] == 0.5
    html = client.get("/mlops-ui/", headers=AUTH).text
    assert "0.7500 <span class=\"muted\">/ live 1.0000 on 4 labelled" in html


@pytest.mark.parametrize("shadow", [
    "not a record", {"judgement": "garbage"},
    {"outcome": ["x"], "judgement": {"shadow": 7, "live": {"requests": -3},
                                     "comparison": {"pairs": True, "agreement_rate": "high",
                                                    "score_ks": float("inf")},
                                     "reasons": "not a list", "percent": 300.5}},
])
def test_an_absent_or_malformed_shadow_renders_without_error(env, shadow):
    client, settings, _ = env
    write_state(settings.data_root, shadow=shadow)
    response = client.get("/mlops-ui/", headers=AUTH)
    assert response.status_code == 200 and "http://127.0.0.1:8600" in response.text
    found = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()["deployment"][
        "shadow"]
    if not isinstance(shadow, dict):
        assert found is None and "Last shadow" not in response.text
    else:
        assert found["pairs"] is None and found["agreement_rate"] is None
        assert found["live_requests"] is None and found["reasons"] == []
        assert "Last shadow: version -" in response.text and "outcome unknown" in response.text


@pytest.mark.parametrize("canary", [
    "not a record", ["a", "list"], {"steps": "garbage"},
    {"outcome": {"x": 1}, "version": None,
     "steps": [None, 7, {"no": "percent"}, {"percent": True},
               {"percent": 20, "requests": -1, "error_rate": "high", "p50_ms": float("nan"),
                "live": "down", "z": None, "verdict": ["x"], "extended": "yes"}]},
])
def test_an_absent_or_malformed_canary_renders_without_error(env, canary):
    client, settings, _ = env
    write_state(settings.data_root, canary=canary)
    response = client.get("/mlops-ui/", headers=AUTH)
    assert response.status_code == 200 and "http://127.0.0.1:8600" in response.text
    found = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()["deployment"][
        "canary"]
    if not isinstance(canary, dict):
        assert found is None and "Last canary" not in response.text
    elif isinstance(canary["steps"], str):
        assert found["steps"] == [] and "no step recorded" in response.text
    else:
        assert [s["percent"] for s in found["steps"]] == [20]
        assert found["steps"][0] | {"percent": 0} == dict.fromkeys(found["steps"][0]) | {
            "percent": 0, "extended": False}
        assert "Last canary: version -" in response.text and "outcome unknown" in response.text


def test_a_malformed_estimate_is_shown_as_none_not_an_error(env):
    client, settings, _ = env
    record_windows(settings.data_root)
    table = MonitoringStore(settings.data_root).path("churn")
    with sqlite3.connect(table) as connection:
        for window_id, raw in (("w000", "{not json"), ("w001", "[1, 2]"),
                               ("w002", json.dumps({"roc_auc": "high", "accuracy": True,
                                                    "recall": 0.5, "rows": "many"}))):
            connection.execute("UPDATE windows SET estimated_performance = ? "
                               "WHERE window_id = ?", (raw, window_id))
    connection.close()
    response = client.get("/mlops-ui/", headers=AUTH)
    assert response.status_code == 200 and "(est. " not in response.text
    assert response.text.count('class="window"') == 3
    windows = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()["monitoring"][
        "windows"]
    assert [w["estimated_performance"] for w in windows] == [{}, {}, {"recall": 0.5}]
    assert [w["estimated_rows"] for w in windows] == [None, None, None]


# --------------------------------------------------------------------------------------------
# The chart
# --------------------------------------------------------------------------------------------


def _window(i: int, drift: float | None, auc: float | None, breaches=()) -> data.WindowView:
    return data.WindowView(
        window_id=f"w{i}<&>", start=f"2026-04-0{i + 1}T00:00:00+00:00", end="", rows=1,
        label_count=1, drift_share=drift, drifted_columns=(), prediction_drift=None,
        performance={} if auc is None else {"roc_auc": auc}, breaches=tuple(breaches),
        decision=None, reason=None, triggered_run_id=None, has_report=False)


def test_the_chart_breaks_lines_at_gaps_and_marks_breaches():
    windows = [_window(0, 0.1, 0.8), _window(1, None, 0.78), _window(2, 0.5, None, ["x"]),
               _window(3, 0.6, 0.7, ["drift_share"])]
    svg = metrics_chart(windows, drift_threshold=0.3, performance_metric="roc_auc",
                        performance_floor=0.75)
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    # 0.1 | gap | 0.5-0.6: a lone point gets no line, so one line per series here.
    assert svg.count('class="line drift"') == 1 and svg.count('class="line perf"') == 1
    assert svg.count('class="point drift') == 3 and svg.count('class="point perf') == 3
    assert svg.count("breach") >= 3
    assert "threshold 0.3" in svg and "floor 0.75" in svg
    assert "w3&lt;&amp;&gt;" in svg and "w3<&>" not in svg
    assert metrics_chart([], drift_threshold=0.3, performance_metric=None,
                         performance_floor=None) == ""
