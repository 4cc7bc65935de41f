"""The MLOps view's running shadow and its decision action, without Airflow or a browser: the
page shows a running shadow (version, since when, promotion mode, the rule) with Promote and
Reject buttons for users who may edit the training DAG only, the action writes the decision
the deploy reads, and the last shadow names who decided. The refusals are in
tests/security/test_shadow_decision_refusals.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

from shadow_decision_app import (
    AUTH,
    DECIDE,
    NOW,
    DecidingAuth,
    decision_file,
    settings_for,
    view_client,
    write_running_state,
)

from airmlops.serving.deploy.decisions import DecisionChannel, ShadowDecision


def page(tmp_path: Path, auth: DecidingAuth, **state) -> str:
    settings = settings_for(tmp_path)
    write_running_state(settings.data_root, **state)
    with view_client(settings, auth) as client:
        response = client.get("/mlops-ui/?pipeline=churn", headers=AUTH)
    assert response.status_code == 200
    return response.text


def test_a_running_shadow_is_shown_with_buttons_for_a_user_who_may_edit(tmp_path: Path) -> None:
    html = page(tmp_path, DecidingAuth(), promotion="manual")
    assert "Shadow running: version 4" in html
    assert "promotion manual" in html
    assert "<dt>min agreement</dt><dd>0.9</dd>" in html
    assert f'data-decision-url="{DECIDE}"' in html and 'data-version="4"' in html
    assert 'data-shadow-action="promote"' in html and 'data-shadow-action="reject"' in html


def test_a_user_who_may_only_read_sees_the_shadow_but_no_buttons(tmp_path: Path) -> None:
    html = page(tmp_path, DecidingAuth(editable=set()))
    assert "Shadow running: version 4" in html
    assert "data-shadow-action=" not in html and "data-decision-url=" not in html


def test_the_page_keeps_its_strict_policy_every_script_carries_the_nonce(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    write_running_state(settings.data_root)
    with view_client(settings, DecidingAuth()) as client:
        response = client.get("/mlops-ui/?pipeline=churn", headers=AUTH)
    csp = response.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([^']+)'", csp).group(1)
    assert "unsafe-inline" not in csp and "connect-src 'self'" in csp
    scripts = re.findall(r"<script([^>]*)>", response.text)
    assert len(scripts) == 1 and all(f'nonce="{nonce}"' in s for s in scripts)
    assert not re.search(r"\son[a-z]+=", response.text)  # no inline event handler


def test_a_decision_posted_is_written_for_the_deploy_and_answered_202(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    write_running_state(settings.data_root)
    with view_client(settings, DecidingAuth(name="alice")) as client:
        response = client.post(DECIDE, json={"version": 4, "action": "reject"}, headers=AUTH)
    assert response.status_code == 202
    written = {"version": "4", "action": "reject", "by": "alice", "at": NOW.isoformat()}
    assert response.json() == {"pipeline": "churn", **written}
    assert json.loads(decision_file(settings.data_root).read_text()) == written
    channel = DecisionChannel("churn", settings.data_root, "4")
    assert channel.poll() == ShadowDecision(**written)


def test_a_shadow_awaiting_a_decision_shows_its_numbers_and_the_rules_advice(
        tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    state = write_running_state(settings.data_root, promotion="manual")
    record = json.loads(state.read_text())
    record["shadow"].update(status="awaiting", judgement={
        "percent": 100, "shadow": {"requests": 120, "errors": 0, "error_rate": 0.0,
                                   "p50_ms": 4.0},
        "live": {"requests": 120, "errors": 0, "error_rate": 0.0, "p50_ms": 3.0},
        "comparison": {"pairs": 118, "agreement_rate": 0.5, "score_ks": 0.4},
        "verdict": "reject", "rule_verdict": "reject", "reasons": ["agreement 0.5 below 0.9"],
        "window": {"start": "2026-04-10T11:00:00+00:00", "end": "2026-04-10T11:05:00+00:00"}})
    state.write_text(json.dumps(record))
    with view_client(settings, DecidingAuth()) as client:
        html = client.get("/mlops-ui/?pipeline=churn", headers=AUTH).text
        api = client.get("/mlops-ui/api/pipelines/churn", headers=AUTH).json()
    assert "awaiting a decision" in html and "the rule advises" in html
    assert "agreement 0.5 below 0.9" in html and 'data-shadow-action="promote"' in html
    assert api["deployment"]["shadow"]["status"] == "awaiting"


def test_the_last_shadow_names_who_decided_and_when(tmp_path: Path) -> None:
    decision = {"version": "4", "action": "promote", "by": "<b>alice</b>",
                "at": "2026-04-10T11:30:00+00:00"}
    html = page(tmp_path, DecidingAuth(), shadow={
        "version": "4", "slot": "green", "started_at": "2026-04-10T11:00:00+00:00",
        "outcome": "promoted", "promotion": "rule", "decided_by": "<b>alice</b>",
        "decision": decision,
        "judgement": {"verdict": "promote", "rule_verdict": "reject", "reasons": ["slow"],
                      "decided_by": "<b>alice</b>", "decision": decision}})
    assert "Last shadow: version 4" in html
    assert "decided by &lt;b&gt;alice&lt;/b&gt;" in html and "<b>alice" not in html
    assert "data-shadow-action=" not in html
