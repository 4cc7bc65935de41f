"""The MLOps view's one action: promote or reject the running shadow of a pipeline.

``POST /api/pipelines/<name>/shadow/decision`` with ``{"version": <int>, "action":
"promote"|"reject"}`` leaves a decision for the deploy holding the shadow
(:mod:`airmlops.serving.deploy.decisions`) and answers 202. The caller is already authenticated
(401 otherwise). Refused, in this order:

- 403 when the request carries an ``Origin`` other than its own (the page authenticates by
  cookie: another site must not be able to post for the user);
- 415 when the body is not declared ``application/json`` (a plain HTML form cannot declare it);
- 404 when the pipeline is unknown or its training DAG not readable by the user;
- 403 when the user may read the training DAG but not edit it;
- 400 naming the field when the body is not exactly that object;
- 409 when no shadow of that version is running.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from airmlops.spec import PipelineSpec

MAX_BODY_BYTES = 1024
MAX_VERSION = 10**9
_FIELDS = {"version", "action"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class DecisionRefused(Exception):
    """A refused decision: the HTTP status and why."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def own_origin(request: Request) -> str:
    """The origin the request was addressed to (scheme and host as the server saw them)."""
    return f"{request.url.scheme}://{request.url.netloc}".lower()


def check_same_origin(request: Request) -> None:
    """Refuse (403) a request whose ``Origin`` is present and not its own, and (415) one whose
    body is not declared JSON."""
    origin = request.headers.get("origin")
    if origin is not None and origin.lower() != own_origin(request):
        raise DecisionRefused(403, "cross-origin request refused")
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        raise DecisionRefused(415, "Content-Type: application/json required")


def parse_body(raw: bytes) -> tuple[int, str]:
    """``(version, action)`` of a decision body; DecisionRefused(400) naming what is wrong."""
    if len(raw) > MAX_BODY_BYTES:
        raise DecisionRefused(400, f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw)
    except ValueError:
        raise DecisionRefused(400, "body: a JSON object expected") from None
    if not isinstance(body, dict):
        raise DecisionRefused(400, "body: a JSON object expected")
    missing, extra = sorted(_FIELDS - set(body)), sorted(set(body) - _FIELDS)
    if missing:
        raise DecisionRefused(400, f"{missing[0]}: required")
    if extra:
        raise DecisionRefused(400, f"{str(extra[0])[:40]!r}: unexpected field")
    version, action = body["version"], body["action"]
    if isinstance(version, bool) or not isinstance(version, int) or not (
            1 <= version <= MAX_VERSION):
        raise DecisionRefused(400, f"version: an int in 1..{MAX_VERSION} expected")
    if action not in ("promote", "reject"):
        raise DecisionRefused(400, "action: 'promote' or 'reject' expected")
    return version, action


def user_name(name: str) -> str:
    """The viewer's name as a decision records it: printable, at most 200 characters."""
    return _CONTROL.sub("?", name)[:200] or "unknown"


async def decide(request: Request, name: str, specs: list[PipelineSpec], viewer: Any,
                 data_root: Path, now: Any) -> dict[str, Any]:
    """Check and write the decision of ``request`` on pipeline ``name`` (``specs``: those the
    viewer may read); the decision written, or DecisionRefused."""
    check_same_origin(request)
    spec = next((s for s in specs if s.name == name), None)
    if spec is None:
        raise DecisionRefused(404, "no such pipeline")
    if not await viewer.may_edit(spec.training_dag_id):
        raise DecisionRefused(403, f"you may not edit the DAG {spec.training_dag_id}")
    version, action = parse_body(await request.body())
    return await run_in_threadpool(_write, spec.name, data_root, str(version), action,
                                   user_name(viewer.name), now.isoformat())


def _write(pipeline: str, data_root: Path, version: str, action: str, by: str,
           at: str) -> dict[str, Any]:
    """Write the decision if a shadow of ``version`` is running (else 409)."""
    from airmlops.serving.deploy.decisions import (
        ShadowDecision,
        running_version,
        write_decision,
    )
    from airmlops.serving.deploy.errors import DeployError
    from airmlops.serving.deploy.state import load_state, state_path

    try:
        state = load_state(pipeline, data_root) if state_path(pipeline, data_root).is_file() \
            else {}
    except DeployError:
        state = {}
    if running_version(state.get("shadow")) != version:
        raise DecisionRefused(409, f"no shadow of version {version} is running")
    decision = ShadowDecision(version, action, by, at)  # type: ignore[arg-type]
    write_decision(pipeline, data_root, decision)
    return {"pipeline": pipeline, **decision.to_dict()}
