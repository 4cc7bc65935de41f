"""The MLOps view's shadow decision (``POST /api/pipelines/<name>/shadow/decision``) refuses
what it must, and writes no decision when it does: no valid token (401), a request from
another origin (403), a body not declared JSON (415), an unknown or unreadable pipeline (404),
a user who may read but not edit the training DAG (403), a body that is not exactly
``{version, action}`` (400 naming the field), no shadow of that version running (409).

The app runs in-process with its authentication stood in (see tests/shadow_decision_app.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shadow_decision_app import (
    AUTH,
    DECIDE,
    JSON,
    TRAINING_DAG,
    DecidingAuth,
    decision_file,
    settings_for,
    view_client,
    write_running_state,
)

GOOD = {"version": 4, "action": "promote"}


def post(tmp_path: Path, auth: DecidingAuth, body: object = GOOD,
         headers: dict[str, str] | None = None, url: str = DECIDE, raw: bytes | None = None):
    """Post a decision with a shadow of version 4 running; ``(response, data_root)``."""
    settings = settings_for(tmp_path)
    write_running_state(settings.data_root)
    content = raw if raw is not None else json.dumps(body).encode()
    with view_client(settings, auth) as client:
        response = client.post(url, content=content, headers=JSON if headers is None else headers)
    return response, settings.data_root


@pytest.mark.parametrize("headers", [{"Content-Type": "application/json"},
                                     {"Content-Type": "application/json",
                                      "Authorization": "Bearer forged"}])
def test_without_a_valid_token_it_answers_401(tmp_path: Path, headers) -> None:
    response, root = post(tmp_path, DecidingAuth(), headers=headers)
    assert response.status_code == 401
    assert not decision_file(root).exists()


def test_a_user_who_may_read_but_not_edit_the_training_dag_is_refused_403(
        tmp_path: Path) -> None:
    response, root = post(tmp_path, DecidingAuth(editable=set()))
    assert response.status_code == 403
    assert TRAINING_DAG in response.json()["detail"]
    assert not decision_file(root).exists()


@pytest.mark.parametrize("url", [DECIDE.replace("churn", "fraud"),
                                 DECIDE.replace("churn", "Churn%20x")])
def test_an_unknown_pipeline_answers_404(tmp_path: Path, url: str) -> None:
    response, root = post(tmp_path, DecidingAuth(), url=url)
    assert response.status_code == 404
    assert not decision_file(root).exists()


def test_a_pipeline_whose_dag_the_user_may_not_read_answers_404(tmp_path: Path) -> None:
    response, root = post(tmp_path, DecidingAuth(readable=set()))
    assert response.status_code == 404
    assert not decision_file(root).exists()


@pytest.mark.parametrize(
    ("body", "field"),
    [({"action": "promote"}, "version"),
     ({"version": 4}, "action"),
     ({"version": 4, "action": "promote", "by": "mallory"}, "'by'"),
     ({"version": "4", "action": "promote"}, "version"),
     ({"version": True, "action": "promote"}, "version"),
     ({"version": 4.0, "action": "promote"}, "version"),
     ({"version": 0, "action": "promote"}, "version"),
     ({"version": 4, "action": "rollback"}, "action"),
     ({"version": 4, "action": ["promote"]}, "action"),
     ([4, "promote"], "body"),
     ("promote", "body")],
)
def test_a_malformed_body_answers_400_naming_the_field(tmp_path: Path, body, field) -> None:
    response, root = post(tmp_path, DecidingAuth(), body=body)
    assert response.status_code == 400
    assert field in response.json()["detail"]
    assert not decision_file(root).exists()


@pytest.mark.parametrize("raw", [b"{not json", b"", b'{"version": 4, "action": "' +
                                 b"x" * 2000 + b'"}'])
def test_a_body_that_is_not_json_or_too_large_answers_400(tmp_path: Path, raw: bytes) -> None:
    response, root = post(tmp_path, DecidingAuth(), raw=raw)
    assert response.status_code == 400
    assert not decision_file(root).exists()


def test_a_decision_on_a_version_not_shadowed_answers_409(tmp_path: Path) -> None:
    response, root = post(tmp_path, DecidingAuth(), body={"version": 5, "action": "promote"})
    assert response.status_code == 409
    assert "version 5" in response.json()["detail"]
    assert not decision_file(root).exists()


@pytest.mark.parametrize("shadow", [{}, {"version": "4", "outcome": "promoted"},
                                    {"status": "running", "version": 4}, "running"])
def test_without_a_running_shadow_it_answers_409(tmp_path: Path, shadow) -> None:
    settings = settings_for(tmp_path)
    write_running_state(settings.data_root, shadow=shadow)
    with view_client(settings, DecidingAuth()) as client:
        response = client.post(DECIDE, json=GOOD, headers=AUTH)
    assert response.status_code == 409
    assert not decision_file(settings.data_root).exists()


def test_no_deployment_at_all_answers_409(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    with view_client(settings, DecidingAuth()) as client:
        response = client.post(DECIDE, json=GOOD, headers=AUTH)
    assert response.status_code == 409


@pytest.mark.parametrize("origin", ["https://evil.example", "http://testserver.evil.example",
                                    "null"])
def test_a_request_from_another_origin_is_refused_403(tmp_path: Path, origin: str) -> None:
    response, root = post(tmp_path, DecidingAuth(), headers={**JSON, "Origin": origin})
    assert response.status_code == 403
    assert "cross-origin" in response.json()["detail"]
    assert not decision_file(root).exists()


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_body_not_declared_json_is_refused_415(tmp_path: Path, content_type) -> None:
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    response, root = post(tmp_path, DecidingAuth(), headers=headers)
    assert response.status_code == 415
    assert not decision_file(root).exists()


def test_the_same_origin_and_json_are_accepted_202(tmp_path: Path) -> None:
    response, root = post(tmp_path, DecidingAuth(),
                          headers={**JSON, "Origin": "http://testserver"})
    assert response.status_code == 202
    assert json.loads(decision_file(root).read_text())["action"] == "promote"


def test_a_user_name_with_control_characters_is_recorded_printable(tmp_path: Path) -> None:
    response, root = post(tmp_path, DecidingAuth(name="eve\r\nX-Injected: 1"))
    assert response.status_code == 202
    assert json.loads(decision_file(root).read_text())["by"] == "eve??X-Injected: 1"
