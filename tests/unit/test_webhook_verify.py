"""Git webhooks: signature and token checks, payload parsing, and the HTTP layer of the receiver.

The HTTP tests run the real FastAPI app with a recording trigger in place of Airflow (the
``get_trigger`` dependency); ``tests/integration/test_webhooks.py`` runs it inside a real API
server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from airmlops.settings import PROJECT_ROOT, Settings
from airmlops.webhooks.app import (
    TriggerOutcome,
    create_app,
    earlier_run_of_commit,
    get_trigger,
    get_webhook_settings,
    loopback_api_url,
    pipeline_targets,
    run_conf,
    webhook_run_id,
)
from airmlops.webhooks.verify import (
    IgnoredEvent,
    PayloadError,
    PushEvent,
    github_signature,
    is_valid_delivery_id,
    load_json_object,
    parse_github_event,
    parse_gitlab_event,
    pipeline_files_changed,
    verify_github_signature,
    verify_gitlab_token,
)

GITHUB_SECRET = "unit-test-github-secret"
GITLAB_TOKEN = "unit-test-gitlab-token"
SHA = "6dcb09b5b57875f334f61aebed695e2e4193db5e"
BEFORE = "0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"
MERGE_SHA = "e5bd3914e2e596debea16f433f57875b5b90bcd6"
DELIVERY = "72d3162e-cc78-11e3-81ab-4c9367dc0958"


# --- realistic payloads (trimmed from the providers' documented examples) --------------------

def github_push(ref: str = "refs/heads/main", after: str = SHA,
                changed: tuple[list[str], list[str], list[str]] | None = None) -> dict[str, Any]:
    added, modified, removed = changed or (["include/airmlops/new.py"],
                                           ["dags/training.py"], ["README.md"])
    commit = {
        "id": after, "tree_id": "f9d2a07e9488b91af2641b26b9407fe22a451433", "distinct": True,
        "message": "Tune the churn estimator", "timestamp": "2026-03-02T10:15:00+01:00",
        "url": f"https://github.com/acme/churn-platform/commit/{after}",
        "author": {"name": "Ada", "email": "ada@example.com", "username": "ada"},
        "committer": {"name": "GitHub", "email": "noreply@github.com", "username": "web-flow"},
        "added": added, "removed": removed, "modified": modified,
    }
    return {
        "ref": ref, "before": BEFORE, "after": after,
        "repository": {
            "id": 35129377, "node_id": "MDEwOlJlcG9zaXRvcnkzNTEyOTM3Nw==",
            "name": "churn-platform", "full_name": "acme/churn-platform", "private": True,
            "owner": {"login": "acme", "id": 21031067, "type": "Organization"},
            "html_url": "https://github.com/acme/churn-platform", "default_branch": "main",
        },
        "pusher": {"name": "ada", "email": "ada@example.com"},
        "sender": {"login": "ada", "id": 583231, "type": "User"},
        "created": False, "deleted": False, "forced": False, "base_ref": None,
        "compare": f"https://github.com/acme/churn-platform/compare/{BEFORE[:12]}...{after[:12]}",
        "commits": [commit], "head_commit": commit,
    }


def github_pull_request(action: str = "closed", merged: bool = True,
                        base: str = "main") -> dict[str, Any]:
    return {
        "action": action, "number": 42,
        "pull_request": {
            "url": "https://api.github.com/repos/acme/churn-platform/pulls/42", "number": 42,
            "state": "closed" if action == "closed" else "open", "title": "Tune the estimator",
            "merged": merged, "merge_commit_sha": MERGE_SHA if merged else None,
            "merged_at": "2026-03-02T10:20:00Z" if merged else None,
            "head": {"ref": "tune-estimator", "sha": SHA},
            "base": {"ref": base, "sha": BEFORE},
        },
        "repository": {"name": "churn-platform", "full_name": "acme/churn-platform"},
        "sender": {"login": "ada", "id": 583231},
    }


def gitlab_push(ref: str = "refs/heads/main", after: str = SHA, total: int | None = None,
                modified: list[str] | None = None) -> dict[str, Any]:
    commit = {
        "id": after, "message": "Tune the churn estimator\n", "title": "Tune the churn estimator",
        "timestamp": "2026-03-02T10:15:00+01:00",
        "url": f"https://gitlab.example.com/ml/platform/churn/-/commit/{after}",
        "author": {"name": "Ada", "email": "ada@example.com"},
        "added": [], "modified": modified if modified is not None else ["dags/training.py"],
        "removed": [],
    }
    return {
        "object_kind": "push", "event_name": "push", "before": BEFORE, "after": after,
        "ref": ref, "ref_protected": True, "checkout_sha": after, "user_id": 4,
        "user_name": "Ada", "user_username": "ada", "project_id": 15,
        "project": {"id": 15, "name": "churn", "path_with_namespace": "ml/platform/churn",
                    "default_branch": "main",
                    "web_url": "https://gitlab.example.com/ml/platform/churn"},
        "commits": [commit], "total_commits_count": total if total is not None else 1,
        "repository": {"name": "churn", "homepage": "https://gitlab.example.com/ml/platform/churn"},
    }


def gitlab_merge_request(action: str = "merge", merge_sha: str | None = MERGE_SHA) -> dict:
    return {
        "object_kind": "merge_request", "event_type": "merge_request",
        "user": {"id": 1, "name": "Ada", "username": "ada"},
        "project": {"id": 15, "name": "churn", "path_with_namespace": "ml/platform/churn"},
        "object_attributes": {
            "id": 99, "iid": 7, "target_branch": "main", "source_branch": "tune-estimator",
            "state": "merged" if action == "merge" else "opened", "action": action,
            "merge_commit_sha": merge_sha, "squash_commit_sha": None,
            "last_commit": {"id": SHA, "message": "Tune the churn estimator"},
        },
    }


# --- signatures and tokens ------------------------------------------------------------------

def test_github_documented_test_vector() -> None:
    secret, body = "It's a Secret to Everybody", b"Hello, World!"
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert github_signature(secret, body) == expected
    assert verify_github_signature(secret, body, expected)


def test_github_signature_refuses_tampering_wrong_secret_and_other_forms() -> None:
    secret, body = "It's a Secret to Everybody", b"Hello, World!"
    good = github_signature(secret, body)
    assert not verify_github_signature(secret, b"Hello, World?", good)
    assert not verify_github_signature("another secret", body, good)
    assert not verify_github_signature(secret, body, None)
    assert not verify_github_signature(secret, body, "")
    assert not verify_github_signature(secret, body, good[:-1])
    assert not verify_github_signature(secret, body, good.removeprefix("sha256="))
    assert not verify_github_signature(secret, body, good.upper().replace("SHA256=", "sha256="))
    sha1 = "sha1=" + hmac.new(secret.encode(), body, hashlib.sha1).hexdigest()
    assert not verify_github_signature(secret, body, sha1)
    # An empty secret refuses even a signature made with the empty key.
    assert not verify_github_signature("", body, github_signature("", body))
    assert not verify_github_signature(secret, body, "sha256=ü" + good[8:])


def test_gitlab_token_is_compared_exactly_and_fails_closed() -> None:
    assert verify_gitlab_token("s3cret-token", "s3cret-token")
    assert not verify_gitlab_token("s3cret-token", "s3cret-toke")
    assert not verify_gitlab_token("s3cret-token", "s3cret-token ")
    assert not verify_gitlab_token("s3cret-token", None)
    assert not verify_gitlab_token("", "")
    assert not verify_gitlab_token("s3cret-token", "ß3cret-token")


@pytest.mark.parametrize(("value", "valid"), [
    (DELIVERY, True), ("abc", True), ("a" * 100, True), ("a" * 101, False), ("", False),
    (None, False), ("../etc", False), ("id with space", False), ("id_underscore", False),
    ("x\ny", False),
])
def test_delivery_id_validation(value: str | None, valid: bool) -> None:
    assert is_valid_delivery_id(value) is valid


def test_run_id_is_derived_from_the_delivery() -> None:
    assert webhook_run_id("github", DELIVERY) == f"webhook__github__{DELIVERY}"
    with pytest.raises(ValueError):
        webhook_run_id("github", "../../x")


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe", b""])
def test_bodies_that_are_not_json_objects_are_payload_errors(body: bytes) -> None:
    with pytest.raises(PayloadError):
        load_json_object(body)


# --- GitHub payloads ------------------------------------------------------------------------

def test_github_push_is_parsed_into_a_push_event() -> None:
    payload = github_push()
    payload["commits"].append({**payload["commits"][0], "added": ["requirements.txt"],
                               "modified": ["dags/training.py"], "removed": []})
    event = parse_github_event("push", DELIVERY, payload)
    assert event == PushEvent(
        provider="github", delivery_id=DELIVERY, kind="push",
        repository="acme/churn-platform", ref="refs/heads/main", branch="main", commit=SHA,
        changed_paths=("include/airmlops/new.py", "dags/training.py", "README.md",
                       "requirements.txt"),
    )
    assert event.describe() == f"git push to main of acme/churn-platform at {SHA[:12]}"


def test_github_merged_pull_request_is_a_merge_event_with_unknown_paths() -> None:
    event = parse_github_event("pull_request", DELIVERY, github_pull_request())
    assert isinstance(event, PushEvent)
    assert (event.kind, event.branch, event.ref, event.commit) == (
        "merge", "main", "refs/heads/main", MERGE_SHA)
    assert event.changed_paths is None


@pytest.mark.parametrize(("event", "payload", "reason"), [
    ("push", github_push(ref="refs/tags/v1.0"), "not a branch push"),
    ("push", {**github_push(), "deleted": True, "after": "0" * 40}, "branch deleted"),
    ("pull_request", github_pull_request(merged=False), "closed without merging"),
    ("pull_request", github_pull_request(action="opened", merged=False), "'opened'"),
    ("ping", {"zen": "Keep it logically awesome.", "hook_id": 1}, "ping"),
    ("issues", {"action": "opened"}, "'issues' is not handled"),
    ("we<ird>", {}, "(unrecognised)"),
])
def test_github_events_that_do_not_act_are_ignored_with_a_reason(
    event: str, payload: dict, reason: str
) -> None:
    parsed = parse_github_event(event, DELIVERY, payload)
    assert isinstance(parsed, IgnoredEvent)
    assert reason in parsed.reason


@pytest.mark.parametrize("mutate", [
    lambda p: p.pop("repository"),
    lambda p: p.update(after="not-a-sha"),
    lambda p: p.update(after=SHA[:7]),
    lambda p: p["repository"].update(full_name="acme/churn platform; rm -rf /"),
    lambda p: p.update(ref="refs/heads/main..evil"),
    lambda p: p.update(ref="refs/heads/" + "b" * 245),
    lambda p: p["commits"][0].update(added="dags/x.py"),
    lambda p: p.update(commits=["not an object"]),
    lambda p: p.update(ref=7),
])
def test_malformed_github_push_is_a_payload_error(mutate: Any) -> None:
    payload = github_push()
    mutate(payload)
    with pytest.raises(PayloadError):
        parse_github_event("push", DELIVERY, payload)


def test_github_push_without_listed_commits_has_unknown_paths() -> None:
    assert parse_github_event("push", DELIVERY, {**github_push(), "commits": []}).changed_paths \
        is None
    many = {**github_push(), "commits": [github_push()["commits"][0]] * 2048}
    assert parse_github_event("push", DELIVERY, many).changed_paths is None


# --- GitLab payloads ------------------------------------------------------------------------

def test_gitlab_push_is_parsed_into_a_push_event() -> None:
    event = parse_gitlab_event("Push Hook", DELIVERY, gitlab_push())
    assert event == PushEvent(
        provider="gitlab", delivery_id=DELIVERY, kind="push", repository="ml/platform/churn",
        ref="refs/heads/main", branch="main", commit=SHA, changed_paths=("dags/training.py",),
    )


def test_gitlab_push_with_more_commits_than_listed_has_unknown_paths() -> None:
    assert parse_gitlab_event("Push Hook", DELIVERY, gitlab_push(total=45)).changed_paths is None


def test_gitlab_merged_merge_request_is_a_merge_event() -> None:
    event = parse_gitlab_event("Merge Request Hook", DELIVERY, gitlab_merge_request())
    assert isinstance(event, PushEvent)
    assert (event.kind, event.branch, event.commit, event.repository) == (
        "merge", "main", MERGE_SHA, "ml/platform/churn")
    # A fast-forward merge has no merge commit: the source branch's last commit is what lands.
    fast_forward = parse_gitlab_event("Merge Request Hook", DELIVERY,
                                      gitlab_merge_request(merge_sha=None))
    assert fast_forward.commit == SHA


@pytest.mark.parametrize(("event", "payload", "reason"), [
    ("Push Hook", gitlab_push(after="0" * 40), "branch deleted"),
    ("Push Hook", gitlab_push(ref="refs/tags/v1"), "not a branch push"),
    ("Tag Push Hook", {"object_kind": "tag_push"}, "'Tag Push Hook' is not handled"),
    ("Merge Request Hook", gitlab_merge_request(action="open"), "'open'"),
    ("Note Hook", {"object_kind": "note"}, "not handled"),
])
def test_gitlab_events_that_do_not_act_are_ignored(event: str, payload: dict, reason: str) -> None:
    parsed = parse_gitlab_event(event, DELIVERY, payload)
    assert isinstance(parsed, IgnoredEvent)
    assert reason in parsed.reason


def test_gitlab_event_header_and_body_must_agree() -> None:
    with pytest.raises(PayloadError, match="object_kind"):
        parse_gitlab_event("Push Hook", DELIVERY, gitlab_merge_request())
    with pytest.raises(PayloadError, match="object_kind"):
        parse_gitlab_event("Merge Request Hook", DELIVERY, gitlab_push())


# --- which changes concern a pipeline -------------------------------------------------------

@pytest.mark.parametrize(("paths", "spec_file", "concerned"), [
    (["dags/training.py"], None, True),
    (["plugins/mlops_webhooks.py"], None, True),
    (["include/airmlops/spec.py"], None, True),
    (["requirements.txt"], None, True),
    (["requirements-dev.txt"], None, True),
    (["docs/requirements.txt"], None, False),
    (["README.md", "docs/index.md", ".github/workflows/ci.yml"], None, False),
    (["pipelines/churn.yaml"], "pipelines/churn.yaml", True),
    (["pipelines/other.yaml"], "pipelines/churn.yaml", False),
    ([], None, False),
])
def test_pipeline_files_changed(paths: list[str], spec_file: str | None, concerned: bool) -> None:
    assert pipeline_files_changed(paths, spec_file) is concerned


def test_run_conf_carries_the_commit_and_fits_the_dag_params() -> None:
    event = parse_github_event("push", DELIVERY, github_push())
    assert run_conf(event) == {
        "git_commit": SHA, "git_ref": "refs/heads/main", "git_repository": "acme/churn-platform",
        "trigger_reason": f"git push to main of acme/churn-platform at {SHA[:12]}",
        "triggered_by": "webhook",
    }


def test_run_conf_of_the_longest_event_passes_the_training_dag_params() -> None:
    from airflow.sdk.definitions.param import ParamsDict

    from airmlops.dags.common import training_params

    long_repo = "/".join(["g" * 100, "s" * 100, "n" * 53])
    event = parse_gitlab_event("Push Hook", DELIVERY, {
        **gitlab_push(ref="refs/heads/" + "b" * 244),
        "project": {"path_with_namespace": long_repo}})
    assert len(event.repository) == 255
    params = ParamsDict(training_params())
    params.update(run_conf(event))  # raises ParamValidationError on any param it breaks
    assert params.validate()["git_commit"] == SHA


# --- the HTTP layer -------------------------------------------------------------------------

class RecordingTrigger:
    """Stands in for Airflow: remembers runs and answers duplicates like the real trigger."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.fail_with: str | None = None

    async def __call__(self, dag_id: str, run_id: str, conf: dict[str, Any]) -> TriggerOutcome:
        if self.fail_with:
            return TriggerOutcome("error", run_id, self.fail_with)
        for earlier_dag, earlier_run, earlier_conf in self.calls:
            if earlier_dag == dag_id and (earlier_run == run_id or
                                          earlier_conf["git_commit"] == conf["git_commit"]):
                return TriggerOutcome("duplicate", earlier_run, "already triggered")
        self.calls.append((dag_id, run_id, conf))
        return TriggerOutcome("triggered", run_id)


@pytest.fixture
def pipelines_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "pipelines"
    folder.mkdir()
    shutil.copy(PROJECT_ROOT / "include" / "pipelines" / "churn.yaml", folder / "churn.yaml")
    return folder


@pytest.fixture
def settings(pipelines_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None, data_root=tmp_path / "data", pipelines_dir=pipelines_dir,
        github_webhook_secret=GITHUB_SECRET, gitlab_webhook_token=GITLAB_TOKEN,
        webhook_branches=["main", "release"], webhook_max_body_bytes=64 * 1024,
    )


@pytest.fixture
def recorder() -> RecordingTrigger:
    return RecordingTrigger()


@pytest.fixture
def client(settings: Settings, recorder: RecordingTrigger) -> TestClient:
    app = create_app()
    app.dependency_overrides[get_webhook_settings] = lambda: settings
    app.dependency_overrides[get_trigger] = lambda: recorder
    return TestClient(app)


def github_headers(body: bytes, event: str = "push", delivery: str = DELIVERY,
                   secret: str = GITHUB_SECRET) -> dict[str, str]:
    return {
        "Content-Type": "application/json", "User-Agent": "GitHub-Hookshot/abc123",
        "X-GitHub-Event": event, "X-GitHub-Delivery": delivery,
        "X-GitHub-Hook-ID": "292430182",
        "X-Hub-Signature-256": github_signature(secret, body),
    }


def gitlab_headers(event: str = "Push Hook", token: str = GITLAB_TOKEN,
                   delivery: str = DELIVERY) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-Gitlab-Event": event,
            "X-Gitlab-Token": token, "Idempotency-Key": delivery,
            "X-Gitlab-Event-UUID": "13792a34-cac6-4fda-95a8-c58e00a3954e"}


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def test_signed_push_triggers_once_and_redelivery_is_a_duplicate(
    client: TestClient, recorder: RecordingTrigger
) -> None:
    body = encode(github_push())
    first = client.post("/github", content=body, headers=github_headers(body))
    assert first.status_code == 202, first.text
    run_id = f"webhook__github__{DELIVERY}"
    assert first.json() == {
        "status": "triggered",
        "runs": [{"pipeline": "churn", "dag_id": "churn_training", "status": "triggered",
                  "run_id": run_id, "reason": ""}],
        "reason": f"git push to main of acme/churn-platform at {SHA[:12]}",
    }
    assert recorder.calls == [("churn_training", run_id, {
        "git_commit": SHA, "git_ref": "refs/heads/main", "git_repository": "acme/churn-platform",
        "trigger_reason": f"git push to main of acme/churn-platform at {SHA[:12]}",
        "triggered_by": "webhook"})]
    again = client.post("/github", content=body, headers=github_headers(body))
    assert again.status_code == 200
    assert again.json()["status"] == "duplicate"
    assert len(recorder.calls) == 1


def test_merged_pull_request_after_its_push_is_a_duplicate(
    client: TestClient, recorder: RecordingTrigger
) -> None:
    push = encode(github_push(after=MERGE_SHA))
    assert client.post("/github", content=push, headers=github_headers(push)).status_code == 202
    merged = encode(github_pull_request())
    answer = client.post("/github", content=merged, headers=github_headers(
        merged, event="pull_request", delivery="8e1a3a40-cc78-11e3-81ab-4c9367dc0958"))
    assert answer.status_code == 200
    assert answer.json()["status"] == "duplicate"
    assert answer.json()["runs"][0]["run_id"] == f"webhook__github__{DELIVERY}"
    assert len(recorder.calls) == 1


@pytest.mark.parametrize(("case", "status", "reason"), [
    ("tampered body", 401, "signature does not match"),
    ("wrong secret", 401, "signature does not match"),
    ("sha1 header", 401, "signature does not match"),
    ("missing signature", 401, "missing X-Hub-Signature-256"),
    ("missing event", 400, "missing X-GitHub-Event"),
    ("missing delivery", 400, "missing X-GitHub-Delivery"),
    ("unsafe delivery", 400, "X-GitHub-Delivery must be"),
    ("malformed json", 400, "not valid JSON"),
    ("malformed payload", 400, "malformed payload: after"),
    ("form encoded", 415, "application/json"),
    ("oversized body", 413, "larger than"),
    ("bad content length", 400, "Content-Length"),
])
def test_github_refusals_trigger_nothing(
    client: TestClient, recorder: RecordingTrigger, case: str, status: int, reason: str
) -> None:
    body = encode(github_push())
    headers = github_headers(body)
    if case == "tampered body":
        body = body.replace(b"acme/churn-platform", b"evil/churn-platform")
    elif case == "wrong secret":
        headers = github_headers(body, secret="not-the-secret")
    elif case == "sha1 header":
        digest = hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha1).hexdigest()
        headers["X-Hub-Signature-256"] = f"sha1={digest}"
    elif case == "missing signature":
        headers.pop("X-Hub-Signature-256")
        headers["X-Hub-Signature"] = "sha1=" + hmac.new(
            GITHUB_SECRET.encode(), body, hashlib.sha1).hexdigest()
    elif case == "missing event":
        headers.pop("X-GitHub-Event")
    elif case == "missing delivery":
        headers.pop("X-GitHub-Delivery")
    elif case == "unsafe delivery":
        headers["X-GitHub-Delivery"] = "../../../etc/passwd"
    elif case == "malformed json":
        body = b'{"ref": "refs/heads/main", '
        headers = github_headers(body)
    elif case == "malformed payload":
        body = encode(github_push(after="deadbeef"))
        headers = github_headers(body)
    elif case == "form encoded":
        body = b"payload=" + body
        headers = {**github_headers(body), "Content-Type": "application/x-www-form-urlencoded"}
    elif case == "oversized body":
        payload = github_push()
        payload["padding"] = "x" * (64 * 1024)
        body = encode(payload)
        headers = github_headers(body)
    elif case == "bad content length":
        headers["Content-Length"] = "12abc"
    answer = client.post("/github", content=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["status"] == "rejected"
    assert reason in answer.json()["reason"]
    assert recorder.calls == []


def test_oversized_chunked_body_without_content_length_is_refused(
    client: TestClient, recorder: RecordingTrigger
) -> None:
    chunk = b"x" * 8192

    def chunks():
        yield from [chunk] * 64  # 512 KiB in all, far above the 64 KiB limit

    answer = client.post("/github", content=chunks(),
                         headers=github_headers(b"irrelevant"))
    assert answer.status_code == 413
    assert recorder.calls == []


@pytest.mark.parametrize(("event", "payload", "reason"), [
    ("issues", {"action": "opened"}, "not handled"),
    ("ping", {"zen": "Design for failure.", "hook_id": 1}, "ping"),
    ("push", github_push(ref="refs/heads/feature/x"), "'feature/x' is not in"),
    ("push", github_push(ref="refs/tags/v1"), "not a branch push"),
    ("push", github_push(changed=([], ["README.md"], [])), "no pipeline files changed"),
    ("pull_request", github_pull_request(merged=False), "closed without merging"),
    ("pull_request", github_pull_request(base="develop"), "'develop' is not in"),
])
def test_github_deliveries_that_do_not_act_are_2xx_ignored(
    client: TestClient, recorder: RecordingTrigger, event: str, payload: dict, reason: str
) -> None:
    body = encode(payload)
    answer = client.post("/github", content=body, headers=github_headers(body, event=event))
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "ignored"
    assert reason in answer.json()["reason"]
    assert recorder.calls == []


def test_a_second_configured_branch_acts(client: TestClient, recorder: RecordingTrigger) -> None:
    body = encode(github_push(ref="refs/heads/release"))
    assert client.post("/github", content=body, headers=github_headers(body)).status_code == 202
    assert recorder.calls[0][2]["git_ref"] == "refs/heads/release"


def test_requirements_change_concerns_every_pipeline(
    client: TestClient, recorder: RecordingTrigger, pipelines_dir: Path
) -> None:
    text = (pipelines_dir / "churn.yaml").read_text()
    (pipelines_dir / "fraud.yaml").write_text(text.replace("name: churn", "name: fraud"))
    body = encode(github_push(changed=([], ["requirements.txt"], [])))
    answer = client.post("/github", content=body, headers=github_headers(body))
    assert answer.status_code == 202
    assert [call[0] for call in recorder.calls] == ["churn_training", "fraud_training"]


def test_gitlab_push_and_merge_request(client: TestClient, recorder: RecordingTrigger) -> None:
    body = encode(gitlab_push())
    answer = client.post("/gitlab", content=body, headers=gitlab_headers())
    assert answer.status_code == 202, answer.text
    assert recorder.calls == [("churn_training", f"webhook__gitlab__{DELIVERY}", {
        "git_commit": SHA, "git_ref": "refs/heads/main", "git_repository": "ml/platform/churn",
        "trigger_reason": f"git push to main of ml/platform/churn at {SHA[:12]}",
        "triggered_by": "webhook"})]
    # GitLab retries with the same Idempotency-Key (and may send a fresh event UUID).
    retry = {**gitlab_headers(), "X-Gitlab-Event-UUID": "f0f0f0f0-0000-4000-8000-000000000000"}
    assert client.post("/gitlab", content=body, headers=retry).json()["status"] == "duplicate"
    merged = encode(gitlab_merge_request())
    answer = client.post("/gitlab", content=merged, headers=gitlab_headers(
        event="Merge Request Hook", delivery="5f1b7e52-0b9f-4a4e-9d0a-0a1c2e3f4a5b"))
    assert answer.status_code == 202
    assert recorder.calls[-1][2]["git_commit"] == MERGE_SHA
    assert len(recorder.calls) == 2


def test_gitlab_without_idempotency_key_uses_the_event_uuid(
    client: TestClient, recorder: RecordingTrigger
) -> None:
    headers = gitlab_headers()
    headers.pop("Idempotency-Key")
    body = encode(gitlab_push())
    assert client.post("/gitlab", content=body, headers=headers).status_code == 202
    assert recorder.calls[0][1] == "webhook__gitlab__13792a34-cac6-4fda-95a8-c58e00a3954e"


@pytest.mark.parametrize(("headers", "status", "reason"), [
    ({"X-Gitlab-Token": "wrong"}, 401, "token does not match"),
    ({"X-Gitlab-Token": None}, 401, "missing X-Gitlab-Token"),
    ({"X-Gitlab-Event": None}, 400, "missing X-Gitlab-Event"),
    ({"Idempotency-Key": None, "X-Gitlab-Event-UUID": None}, 400, "missing X-Gitlab-Event-UUID"),
    ({"Idempotency-Key": "not/safe"}, 400, "Idempotency-Key must be"),
])
def test_gitlab_refusals_trigger_nothing(
    client: TestClient, recorder: RecordingTrigger, headers: dict, status: int, reason: str
) -> None:
    sent = gitlab_headers()
    for name, value in headers.items():
        sent.pop(name)
        if value is not None:
            sent[name] = value
    answer = client.post("/gitlab", content=encode(gitlab_push()), headers=sent)
    assert answer.status_code == status, answer.text
    assert reason in answer.json()["reason"]
    assert recorder.calls == []


def test_gitlab_token_is_checked_before_the_body_is_read(
    client: TestClient, recorder: RecordingTrigger
) -> None:
    huge = b"{" + b" " * (128 * 1024) + b"}"
    answer = client.post("/gitlab", content=huge, headers=gitlab_headers(token="wrong"))
    assert answer.status_code == 401
    assert client.post("/gitlab", content=huge, headers=gitlab_headers()).status_code == 413
    assert recorder.calls == []


def test_empty_secrets_refuse_everything_and_say_why_once(
    settings: Settings, recorder: RecordingTrigger, caplog: pytest.LogCaptureFixture
) -> None:
    import airmlops.webhooks.app as webhook_app

    webhook_app._unconfigured_logged.clear()
    unconfigured = settings.model_copy(update={
        "github_webhook_secret": SecretStr(" "), "gitlab_webhook_token": SecretStr(""),
    })
    app = create_app()
    app.dependency_overrides[get_webhook_settings] = lambda: unconfigured
    app.dependency_overrides[get_trigger] = lambda: recorder
    client = TestClient(app)
    body = encode(github_push())
    with caplog.at_level(logging.WARNING, logger="airmlops.webhooks.app"):
        for _ in range(3):
            answer = client.post("/github", content=body, headers=github_headers(body, secret=" "))
            assert answer.status_code == 503
            assert answer.json()["status"] == "rejected"
            answer = client.post("/gitlab", content=encode(gitlab_push()),
                                 headers=gitlab_headers(token=""))
            assert answer.status_code == 503
    messages = [r.getMessage() for r in caplog.records]
    assert sum("MLOPS_GITHUB_WEBHOOK_SECRET is empty" in m for m in messages) == 1
    assert sum("MLOPS_GITLAB_WEBHOOK_TOKEN is empty" in m for m in messages) == 1
    assert recorder.calls == []


def test_trigger_errors_and_invalid_specs_answer_503_so_the_provider_can_redeliver(
    client: TestClient, recorder: RecordingTrigger, pipelines_dir: Path
) -> None:
    recorder.fail_with = "DAG not found in Airflow; redeliver once parsed"
    body = encode(github_push())
    answer = client.post("/github", content=body, headers=github_headers(body))
    assert answer.status_code == 503
    assert answer.json()["status"] == "error"
    assert answer.json()["runs"][0]["reason"].startswith("DAG not found")

    recorder.fail_with = None
    (pipelines_dir / "broken.yaml").write_text("name: Not A Valid Name\n")
    answer = client.post("/github", content=body, headers=github_headers(body))
    assert answer.status_code == 503
    runs = {run["pipeline"]: run["status"] for run in answer.json()["runs"]}
    assert runs == {"broken": "error", "churn": "triggered"}
    assert len(recorder.calls) == 1


def test_no_specs_means_ignored(client: TestClient, recorder: RecordingTrigger,
                                pipelines_dir: Path) -> None:
    (pipelines_dir / "churn.yaml").unlink()
    body = encode(github_push())
    answer = client.post("/github", content=body, headers=github_headers(body))
    assert answer.json()["status"] == "ignored"
    assert "no pipeline specs" in answer.json()["reason"]


def test_neither_secret_nor_body_reaches_the_log(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    payload = github_push()
    payload["head_commit"]["message"] = "marker-in-the-body-7f3a"
    body = encode(payload)
    with caplog.at_level(logging.DEBUG):
        assert client.post("/github", content=body, headers=github_headers(body)).status_code \
            == 202
        client.post("/github", content=body, headers=github_headers(body, secret="wrong"))
        client.post("/gitlab", content=encode(gitlab_push()), headers=gitlab_headers())
    text = caplog.text
    assert DELIVERY in text  # the outcome is logged...
    for secret in (GITHUB_SECRET, GITLAB_TOKEN, "marker-in-the-body-7f3a"):
        assert secret not in text  # ...but never a secret or the body


def test_pipeline_targets_name_the_spec_file_relative_to_the_repository() -> None:
    targets = pipeline_targets(PROJECT_ROOT / "include" / "pipelines")
    churn = next(t for t in targets if t.name == "churn")
    assert churn.dag_id == "churn_training"
    assert churn.spec_file == "include/pipelines/churn.yaml"
    assert churn.error is None


def test_plugin_imports_cheaply_and_without_settings(tmp_path: Path) -> None:
    probe = (
        "import importlib.util, sys\n"
        "spec = importlib.util.spec_from_file_location('mlops_webhooks', sys.argv[1])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "[entry] = module.MlopsWebhooksPlugin.fastapi_apps\n"
        "assert entry['url_prefix'] == '/webhooks' and entry['name'], entry\n"
        "routes = entry['app'].routes\n"
        "paths = sorted(r.path for r in routes if 'POST' in getattr(r, 'methods', ()))\n"
        "assert paths == ['/github', '/gitlab'], paths\n"
        "heavy = [m for m in ('pandas', 'sklearn', 'mlflow', 'great_expectations', 'evidently')\n"
        "         if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLOPS_")}
    # Settings that would not even validate must not stop the plugin from loading.
    env.update(MLOPS_WEBHOOK_MAX_BODY_BYTES="not-a-number", AIRFLOW_HOME=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", probe, str(PROJECT_ROOT / "plugins" / "mlops_webhooks.py")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]


# --- how the real trigger reaches Airflow ---------------------------------------------------

@pytest.mark.parametrize("base_url, expected", [
    ("", "http://127.0.0.1:9137/api/v2"),
    ("https://airflow.example.com", "http://127.0.0.1:9137/api/v2"),
    ("https://airflow.example.com/ops/airflow/", "http://127.0.0.1:9137/ops/airflow/api/v2"),
])
def test_the_rest_api_is_called_on_loopback_under_the_base_url_path(
    monkeypatch: pytest.MonkeyPatch, base_url: str, expected: str
) -> None:
    monkeypatch.setenv("AIRFLOW__API__PORT", "9137")
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", base_url)
    monkeypatch.delenv("AIRFLOW__API__SSL_CERT", raising=False)
    assert loopback_api_url() == expected


def test_an_api_server_with_tls_is_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__API__SSL_CERT", "/etc/ssl/airflow.pem")
    with pytest.raises(RuntimeError, match="ssl_cert"):
        loopback_api_url()


def _rest_run(run_id: str, commit: str | None) -> dict[str, Any]:
    conf = {"git_commit": commit, "triggered_by": "webhook"} if commit else {}
    return {"dag_run_id": run_id, "dag_id": "churn_training", "conf": conf}


def test_an_earlier_run_counts_only_for_the_same_commit_and_a_webhook_run_id() -> None:
    runs = [
        _rest_run("webhookish_manual", SHA),            # the prefix filter ignores trailing "_"
        _rest_run("webhook__github__b", MERGE_SHA),     # conf_contains matched another key
        _rest_run("webhook__gitlab__c", None),
        _rest_run("webhook__github__a", SHA),
    ]
    assert earlier_run_of_commit(runs, SHA) == "webhook__github__a"
    assert earlier_run_of_commit(runs, BEFORE) is None
    assert earlier_run_of_commit(runs, "") is None
    assert earlier_run_of_commit([], SHA) is None
