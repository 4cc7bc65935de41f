"""Git webhooks against a real Airflow API server with the ``mlops_webhooks`` plugin loaded.

The platform of this module serves a tiny DAG (``webhook_probe_training``, paused so nothing
runs) and a pipelines folder with one spec naming it. Its API server gets a GitHub secret and
an EMPTY GitLab token, so both the acting path and the fail-closed path run for real. Run counts
come from the REST API; each refused delivery must leave them unchanged.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from airmlops.platform import Platform, api_token, stop_all, wait_for_dag
from airmlops.settings import PROJECT_ROOT
from airmlops.webhooks.verify import github_signature

pytestmark = pytest.mark.integration

SECRET = "integration-" + uuid.uuid4().hex
PIPELINE = "webhook_probe"
DAG_ID = f"{PIPELINE}_training"
MAX_BODY = 65_536
PROBE_DAG = f'''"""A DAG that stands in for a training DAG in the webhook tests."""
import datetime as dt

from airflow.sdk import dag, task


@dag(dag_id="{DAG_ID}", schedule=None, catchup=False, tags=["test"],
     start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
def probe():
    @task
    def noop() -> None:
        return None

    noop()


probe()
'''


@dataclass(frozen=True)
class WebhookServer:
    platform: Platform
    token: str

    @property
    def github_url(self) -> str:
        return f"{self.platform.base_url}/webhooks/github"

    @property
    def gitlab_url(self) -> str:
        return f"{self.platform.base_url}/webhooks/gitlab"

    def api(self, path: str) -> dict[str, Any]:
        response = httpx.get(f"{self.platform.base_url}/api/v2/dags/{DAG_ID}{path}",
                             headers={"Authorization": f"Bearer {self.token}"}, timeout=30)
        response.raise_for_status()
        return response.json()

    def run_count(self) -> int:
        return self.api("/dagRuns?limit=1")["total_entries"]


@pytest.fixture(scope="module")
def server(platform_factory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebhookServer]:
    root = tmp_path_factory.mktemp("webhooks")
    dags = root / "dags"
    dags.mkdir()
    (dags / "webhook_probe.py").write_text(PROBE_DAG)
    pipelines = root / "pipelines"
    pipelines.mkdir()
    churn = (PROJECT_ROOT / "include" / "pipelines" / "churn.yaml").read_text()
    (pipelines / f"{PIPELINE}.yaml").write_text(churn.replace("name: churn", f"name: {PIPELINE}"))
    # The platform's processes inherit this environment (and only they need it).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLOPS_GITHUB_WEBHOOK_SECRET", SECRET)
        env.setenv("MLOPS_GITLAB_WEBHOOK_TOKEN", "")
        env.setenv("MLOPS_PIPELINES_DIR", str(pipelines))
        env.setenv("MLOPS_WEBHOOK_BRANCHES", '["main"]')
        env.setenv("MLOPS_WEBHOOK_MAX_BODY_BYTES", str(MAX_BODY))
        platform = platform_factory("webhooks", dags, dags_paused_at_creation=True)
    try:
        token = api_token(platform.base_url, platform.username, platform.password)
        wait_for_dag(platform.base_url, token, DAG_ID, timeout=240)
        yield WebhookServer(platform, token)
    finally:
        stop_all(platform.run_dir)


def new_sha() -> str:
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


def push_payload(sha: str, ref: str = "refs/heads/main") -> dict[str, Any]:
    """A GitHub push as GitHub sends it (trimmed of URLs that play no part)."""
    commit = {
        "id": sha, "tree_id": new_sha(), "distinct": True, "message": "Tune the estimator",
        "timestamp": "2026-03-02T10:15:00+01:00",
        "author": {"name": "Ada", "email": "ada@example.com", "username": "ada"},
        "committer": {"name": "GitHub", "email": "noreply@github.com", "username": "web-flow"},
        "added": [], "removed": [], "modified": ["include/pipelines/churn.yaml"],
    }
    return {
        "ref": ref, "before": new_sha(), "after": sha, "created": False, "deleted": False,
        "forced": False, "base_ref": None,
        "repository": {"id": 35129377, "name": "churn-platform",
                       "full_name": "acme/churn-platform", "private": True,
                       "owner": {"login": "acme", "id": 21031067}, "default_branch": "main"},
        "pusher": {"name": "ada", "email": "ada@example.com"},
        "sender": {"login": "ada", "id": 583231, "type": "User"},
        "commits": [commit], "head_commit": commit,
    }


def signed(payload: dict[str, Any] | bytes, event: str = "push", delivery: str | None = None,
           secret: str = SECRET) -> tuple[bytes, dict[str, str]]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {
        "Content-Type": "application/json", "User-Agent": "GitHub-Hookshot/044aadd",
        "X-GitHub-Event": event, "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
        "X-GitHub-Hook-ID": "292430182", "X-Hub-Signature-256": github_signature(secret, body),
    }
    return body, headers


def test_signed_push_creates_exactly_one_run_and_a_redelivery_none(server: WebhookServer):
    sha = new_sha()
    delivery = str(uuid.uuid4())
    body, headers = signed(push_payload(sha), delivery=delivery)
    before = server.run_count()

    started = time.perf_counter()
    answer = httpx.post(server.github_url, content=body, headers=headers, timeout=30)
    elapsed = time.perf_counter() - started
    print(f"\nfirst valid webhook answered in {elapsed * 1000:.0f} ms")

    assert answer.status_code == 202, answer.text
    run_id = f"webhook__github__{delivery}"
    assert answer.json()["status"] == "triggered"
    assert [(r["dag_id"], r["run_id"], r["status"]) for r in answer.json()["runs"]] == [
        (DAG_ID, run_id, "triggered")]
    assert server.run_count() == before + 1
    run = server.api(f"/dagRuns/{run_id}")
    assert run["conf"] == {
        "git_commit": sha, "git_ref": "refs/heads/main", "git_repository": "acme/churn-platform",
        "trigger_reason": f"git push to main of acme/churn-platform at {sha[:12]}",
        "triggered_by": "webhook",
    }
    assert run["run_type"] == "manual"
    assert run["triggered_by"] == "rest_api"
    assert run["triggering_user_name"] == "webhook"
    assert run["logical_date"] is None

    again = httpx.post(server.github_url, content=body, headers=headers, timeout=30)
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "duplicate"
    assert again.json()["runs"][0]["run_id"] == run_id
    assert server.run_count() == before + 1


def test_merged_pull_request_of_an_already_pushed_commit_creates_no_run(server: WebhookServer):
    sha = new_sha()
    body, headers = signed(push_payload(sha))
    assert httpx.post(server.github_url, content=body, headers=headers).status_code == 202
    count = server.run_count()
    merged = {
        "action": "closed", "number": 42,
        "pull_request": {"number": 42, "state": "closed", "merged": True, "merge_commit_sha": sha,
                         "base": {"ref": "main", "sha": new_sha()},
                         "head": {"ref": "tune", "sha": new_sha()}},
        "repository": {"name": "churn-platform", "full_name": "acme/churn-platform"},
    }
    body, headers = signed(merged, event="pull_request")
    answer = httpx.post(server.github_url, content=body, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "duplicate"
    assert server.run_count() == count


def _tampered() -> tuple[bytes, dict[str, str]]:
    body, headers = signed(push_payload(new_sha()))
    return body.replace(b"acme/churn-platform", b"evil/churn-platform"), headers


def _sha1_header() -> tuple[bytes, dict[str, str]]:
    body, headers = signed(push_payload(new_sha()))
    digest = hmac.new(SECRET.encode(), body, hashlib.sha1).hexdigest()
    return body, {**headers, "X-Hub-Signature-256": f"sha1={digest}"}


def _without(header: str) -> tuple[bytes, dict[str, str]]:
    body, headers = signed(push_payload(new_sha()))
    headers.pop(header)
    return body, headers


def _oversized() -> tuple[bytes, dict[str, str]]:
    payload = push_payload(new_sha())
    payload["padding"] = "x" * MAX_BODY
    return signed(payload)


REFUSALS = {
    "tampered body": (_tampered, 401, "rejected"),
    "wrong secret": (lambda: signed(push_payload(new_sha()), secret="guess"), 401, "rejected"),
    "sha1 header": (_sha1_header, 401, "rejected"),
    "missing signature header": (lambda: _without("X-Hub-Signature-256"), 401, "rejected"),
    "missing event header": (lambda: _without("X-GitHub-Event"), 400, "rejected"),
    "missing delivery header": (lambda: _without("X-GitHub-Delivery"), 400, "rejected"),
    "wrong event": (lambda: signed({"action": "opened", "issue": {"number": 1}}, event="issues"),
                    200, "ignored"),
    "wrong branch": (lambda: signed(push_payload(new_sha(), ref="refs/heads/feature/x")),
                     200, "ignored"),
    "tag push": (lambda: signed(push_payload(new_sha(), ref="refs/tags/v1.0")), 200, "ignored"),
    "oversized body": (_oversized, 413, "rejected"),
    "malformed json": (lambda: signed(b'{"ref": "refs/heads/main", "after": '), 400, "rejected"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_or_ignored_deliveries_create_nothing(server: WebhookServer, case: str):
    make, status, outcome = REFUSALS[case]
    body, headers = make()
    before = server.run_count()
    answer = httpx.post(server.github_url, content=body, headers=headers, timeout=30)
    assert answer.status_code == status, answer.text
    assert answer.json()["status"] == outcome
    assert answer.json()["reason"]
    assert server.run_count() == before


def test_gitlab_fails_closed_without_a_token_and_logs_why_once(server: WebhookServer):
    payload = {"object_kind": "push", "ref": "refs/heads/main", "after": new_sha(),
               "checkout_sha": None, "project": {"path_with_namespace": "ml/churn"}, "commits": []}
    before = server.run_count()
    for token in ("", "anything", "integration-guess"):
        answer = httpx.post(server.gitlab_url, json=payload, headers={
            "X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": token,
            "Idempotency-Key": str(uuid.uuid4())})
        assert answer.status_code == 503, answer.text
        assert answer.json()["status"] == "rejected"
    assert server.run_count() == before
    log = (server.platform.run_dir / "logs" / "api-server.log").read_text(errors="replace")
    assert log.count("MLOPS_GITLAB_WEBHOOK_TOKEN is empty") == 1


def test_valid_webhooks_answer_well_under_a_second(server: WebhookServer):
    timings = []
    with httpx.Client(timeout=30) as client:
        for _ in range(10):
            body, headers = signed(push_payload(new_sha()))
            started = time.perf_counter()
            answer = client.post(server.github_url, content=body, headers=headers)
            timings.append(time.perf_counter() - started)
            assert answer.status_code == 202, answer.text
    median, worst = statistics.median(timings), max(timings)
    print(f"\nvalid webhook (trigger included): p50 {median * 1000:.0f} ms, "
          f"max {worst * 1000:.0f} ms over {len(timings)}")
    assert median < 0.5
    assert worst < 1.0


BURST = 45
"""More concurrent deliveries than the API server's worker threads (anyio's default: 40)."""


def webhook_log_lines(server: WebhookServer, last: int = 20) -> str:
    """The API server log's last ``last`` lines of the webhook receiver (what a 503 names)."""
    log = (server.platform.run_dir / "logs" / "api-server.log").read_text(errors="replace")
    return "\n".join([line for line in log.splitlines() if "Webhook" in line][-last:])


def test_a_burst_of_deliveries_triggers_every_run_without_starving_the_api(
    server: WebhookServer,
):
    """The receiver calls the API server it runs in: a burst must not wait on itself."""
    deliveries = [signed(push_payload(new_sha())) for _ in range(BURST)]
    before = server.run_count()

    async def deliver_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(
                client.post(server.github_url, content=body, headers=headers)
                for body, headers in deliveries))

    started = time.perf_counter()
    answers = asyncio.run(deliver_all())
    elapsed = time.perf_counter() - started
    print(f"\n{BURST} concurrent webhooks answered in {elapsed:.1f} s")
    assert [a.status_code for a in answers] == [202] * BURST, (
        f"{answers[0].text}\nthe API server's log on webhooks:\n{webhook_log_lines(server)}")
    assert server.run_count() == before + BURST


def test_neither_the_secret_nor_a_body_reaches_the_server_log(server: WebhookServer):
    payload = push_payload(new_sha())
    payload["head_commit"]["message"] = "body-marker-5c1e"
    body, headers = signed(payload)
    assert httpx.post(server.github_url, content=body, headers=headers).status_code == 202
    body, headers = signed(payload, secret="wrong")
    assert httpx.post(server.github_url, content=body, headers=headers).status_code == 401
    log = (server.platform.run_dir / "logs" / "api-server.log").read_text(errors="replace")
    assert "Webhook github delivery" in log
    assert SECRET not in log
    assert "body-marker-5c1e" not in log
    assert "eyJ" not in log  # nor the receiver's JWT (every JWT starts with it)


def test_plugin_is_listed_by_the_api_server(server: WebhookServer):
    response = httpx.get(f"{server.platform.base_url}/api/v2/plugins",
                         headers={"Authorization": f"Bearer {server.token}"})
    response.raise_for_status()
    plugins = {p["name"]: p for p in response.json()["plugins"]}
    apps = plugins["mlops_webhooks"]["fastapi_apps"]
    assert [(app["url_prefix"], app["name"]) for app in apps] == [
        ("/webhooks", "MLOps git webhooks")]
