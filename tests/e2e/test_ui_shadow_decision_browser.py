"""Promote a running shadow from the MLOps page in a real browser: Debian's Chromium (through
Playwright) loads the page from the view's app served by uvicorn on loopback, under the page's
real Content-Security-Policy, clicks Promote, and the page's nonce'd script posts the decision
(JSON, same origin, the cookie) that the deploy then reads.

Authentication is stood in (tests/shadow_decision_app.py: the ``_token`` cookie ``good``); the
Airflow JWT path is covered by test_ui_browser.py.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI
from proxy_process import wait_until
from shadow_decision_app import (
    NOW,
    DecidingAuth,
    decision_file,
    settings_for,
    write_running_state,
)

from airmlops.platform import free_port
from airmlops.ui import app as ui

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO_ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """``(page URL, data root)``: the view app on a loopback port, a shadow of version 4
    running."""
    settings = settings_for(tmp_path)
    write_running_state(settings.data_root, promotion="manual")
    sub = ui.create_app()
    sub.dependency_overrides[ui.get_authenticator] = lambda: DecidingAuth(name="alice")
    sub.dependency_overrides[ui.get_ui_settings] = lambda: settings
    sub.dependency_overrides[ui.get_clock] = lambda: (lambda: NOW)
    root = FastAPI()
    root.mount(ui.MOUNT_PATH, sub)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(root, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "the view to serve")
    yield f"http://127.0.0.1:{port}/mlops-ui/?pipeline=churn", settings.data_root
    server.should_exit = True
    thread.join(timeout=20)


@pytest.fixture
def chromium() -> str:
    result = subprocess.run([str(REPO_ROOT / "scripts" / "ensure-chromium.sh")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return CHROMIUM


def test_clicking_promote_posts_the_decision_under_the_strict_policy(served, chromium) -> None:
    from playwright.sync_api import sync_playwright

    url, data_root = served
    console: list[str] = []
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, \
            sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=chromium, headless=True, args=CHROMIUM_FLAGS)
        context.set_default_timeout(30_000)
        try:
            context.add_cookies([{"name": ui.TOKEN_COOKIE, "value": "good",
                                  "url": url.split("/mlops-ui")[0]}])
            page = context.new_page()
            page.on("console", lambda message: console.append(message.text))
            page.goto(url)
            assert "Shadow running: version 4" in page.content()
            page.click("button[data-shadow-action='promote']")
            outcome = page.locator(".decision-outcome")
            outcome.filter(has_text="sent by alice").wait_for()
            text = outcome.inner_text()
        finally:
            context.close()
    assert text.startswith("promote of version 4 sent by alice")
    written = json.loads(decision_file(data_root).read_text())
    assert (written["version"], written["action"], written["by"]) == ("4", "promote", "alice")
    assert not [line for line in console if "Content Security Policy" in line], console
