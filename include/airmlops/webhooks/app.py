"""The webhook receiver: a FastAPI app that the Airflow API server mounts at ``/webhooks``.

``POST /webhooks/github`` and ``POST /webhooks/gitlab`` accept push events and merged pull/merge
requests. Airflow does not authenticate plugin apps, so each request is checked here, in this
order, and refused at the first failure:

1. the provider's secret is configured (else 503: the endpoint fails closed);
2. GitLab's token header matches (else 401);
3. the body fits ``MLOPS_WEBHOOK_MAX_BODY_BYTES`` (else 413; read in bounded chunks);
4. GitHub's HMAC-SHA256 signature over the raw body matches (else 401);
5. the event and delivery-id headers are present and well formed (else 400);
6. the body is JSON of the kind the event announces (else 400; 415 for any content type but
   application/json).

An authentic delivery then either acts or is answered ``"ignored"`` with a reason: other events,
branches not in ``MLOPS_WEBHOOK_BRANCHES``, tags, deleted branches, pull requests closed without
merging, and pushes that change no pipeline file. "Pipeline files" are everything under
``dags/``, ``plugins/`` and ``include/``, top-level ``requirements*.txt`` files and the spec
files themselves; when the provider does not list the changed files (merge events, very large
pushes) every pipeline is concerned.

Acting means triggering the training DAG of every spec in ``MLOPS_PIPELINES_DIR`` with run id
``webhook__<provider>__<delivery id>``, so a redelivery answers ``"duplicate"`` and starts
nothing. A commit that a webhook already triggered for a DAG is not trained twice either: a
merged pull request also arrives as a push of the same commit, and only the first starts a run.
The trigger only queues the run (tens of milliseconds); the work happens in Airflow.

Runs are queued and looked up through Airflow's stable REST API (``/api/v2``), called on the
loopback address of this very API server (``http://127.0.0.1:<[api] port><path of [api]
base_url>``) with a short-lived JWT that the auth manager signs for the service user
``webhook`` (role ``USER``: it may trigger and read DAG runs, nothing else). The calls are
awaited on the event loop, never in a worker thread, so a burst of deliveries cannot exhaust
the thread pool that Airflow's own (synchronous) endpoints need to answer them.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from airmlops.settings import PROJECT_ROOT, Settings, get_settings
from airmlops.spec import load_spec, spec_paths
from airmlops.webhooks.verify import (
    IgnoredEvent,
    PayloadError,
    PushEvent,
    is_valid_delivery_id,
    load_json_object,
    parse_github_event,
    parse_gitlab_event,
    pipeline_files_changed,
    verify_github_signature,
    verify_gitlab_token,
)

log = logging.getLogger(__name__)

RUN_ID_PREFIX = "webhook__"
COMMIT_LOOKBACK_RUNS = 25
"""How many of a DAG's webhook runs whose conf mentions the commit are checked (newest first)."""
TRIGGERING_USER = "webhook"
"""The service user the runs are triggered as (the runs' ``triggering_user_name``)."""
SERVICE_ROLE = "USER"
"""The simple auth manager's role of that user: trigger and read DAG runs, nothing more."""
TOKEN_LIFETIME_SECONDS = 60
API_TIMEOUT_SECONDS = 30.0
LOOPBACK_HOST = "127.0.0.1"

Status = Literal["triggered", "duplicate", "error"]


@dataclass(frozen=True)
class TriggerOutcome:
    """What happened to one DAG: a new run, an existing one (``run_id`` names it), or an error."""

    status: Status
    run_id: str
    reason: str = ""


Trigger = Callable[[str, str, dict[str, Any]], Awaitable[TriggerOutcome]]
"""``await trigger(dag_id, run_id, conf)``: queue a run, idempotent on ``run_id`` and on the
commit."""


@dataclass(frozen=True)
class PipelineTarget:
    """A pipeline a webhook may concern: its name, training DAG and spec file.

    An invalid spec is still a target (named after its file, with ``error`` set), so that a push
    that touches it is answered as failed instead of silently training nothing.
    """

    name: str
    dag_id: str
    spec_file: str | None
    """The spec's path relative to the repository root, when it lives inside it."""
    error: str | None = None


@dataclass
class _Answer:
    status: str
    reason: str = ""
    runs: list[dict[str, str]] = field(default_factory=list)
    http_status: int = 200

    def response(self) -> JSONResponse:
        body = {"status": self.status, "runs": self.runs, "reason": self.reason}
        return JSONResponse(body, status_code=self.http_status)


class _Refusal(Exception):
    """A request refused before it could act; becomes a JSON answer with ``http_status``."""

    def __init__(self, http_status: int, reason: str) -> None:
        super().__init__(reason)
        self.answer = _Answer(status="rejected", reason=reason, http_status=http_status)


_unconfigured_logged: set[str] = set()
_unconfigured_lock = threading.Lock()


def get_webhook_settings() -> Settings:
    """FastAPI dependency: the platform settings (tests override it)."""
    return get_settings()


def get_trigger() -> Trigger:
    """FastAPI dependency: how runs are queued (tests override it with a recorder)."""
    return trigger_in_airflow


def webhook_run_id(provider: str, delivery_id: str) -> str:
    """The run id of a delivery: the same delivery always maps to the same run."""
    if not is_valid_delivery_id(delivery_id):
        raise ValueError("delivery id must be 1-100 letters, digits or dashes")
    return f"{RUN_ID_PREFIX}{provider}__{delivery_id}"


def run_conf(event: PushEvent) -> dict[str, Any]:
    """The conf of a webhook-triggered training run (the DAG's params of the same names)."""
    return {
        "git_commit": event.commit,
        "git_ref": event.ref,
        "git_repository": event.repository,
        "trigger_reason": event.describe(),
        "triggered_by": "webhook",
    }


def pipeline_targets(pipelines_dir: Path) -> list[PipelineTarget]:
    """Every spec of ``pipelines_dir`` as a target (invalid ones carry their error)."""
    targets: list[PipelineTarget] = []
    for path in spec_paths(pipelines_dir):
        try:
            spec = load_spec(path)
        except Exception:  # any bad spec is skipped, never fatal
            log.warning("Webhook: pipeline spec %s is invalid; it cannot be triggered", path)
            targets.append(PipelineTarget(path.stem, "", _repo_relative(path),
                                          error="invalid pipeline spec"))
            continue
        targets.append(PipelineTarget(spec.name, spec.training_dag_id, _repo_relative(path)))
    return targets


async def trigger_in_airflow(dag_id: str, run_id: str, conf: dict[str, Any]) -> TriggerOutcome:
    """Queue a run of ``dag_id`` through the REST API of this API server.

    Answers ``duplicate`` when the run id exists (a redelivery, or two copies racing) or when an
    earlier webhook run of the DAG already carries the same commit.
    """
    import httpx

    failed = TriggerOutcome("error", run_id, "triggering the DAG failed; see the API server log")
    try:
        api_url = loopback_api_url()
        headers = {"Authorization": f"Bearer {_service_token()}"}
    except Exception:
        log.exception("Webhook: cannot authenticate to Airflow's REST API")
        return failed
    try:
        # trust_env=False: never route the loopback call through a proxy from the environment.
        # verify=False: the URL is plain HTTP on loopback, so no certificate is ever checked;
        # it only spares loading the CA bundle, which costs ~0.1 s per client on a busy host.
        async with httpx.AsyncClient(base_url=api_url, headers=headers, trust_env=False,
                                     verify=False,  # noqa: S501
                                     timeout=API_TIMEOUT_SECONDS) as client:
            return await _trigger_once(client, dag_id, run_id, conf)
    except httpx.HTTPError as error:  # the message names the URL only, never the token
        log.error("Webhook: Airflow's REST API did not answer for %s: %r", dag_id, error)
    except Exception:
        log.exception("Webhook: triggering %s failed", dag_id)
    return failed


async def _trigger_once(
    client: Any, dag_id: str, run_id: str, conf: dict[str, Any]
) -> TriggerOutcome:
    """Look for an earlier run of the commit, else create the run (``client``: httpx)."""
    dag_runs = f"/dags/{quote(dag_id, safe='')}/dagRuns"
    commit = str(conf.get("git_commit", ""))
    found = await client.get(dag_runs, params={
        "run_id_prefix_pattern": RUN_ID_PREFIX, "conf_contains": commit, "order_by": "-id",
        "limit": COMMIT_LOOKBACK_RUNS})
    if found.status_code != 200:
        return _failure(found, dag_id, run_id)
    earlier = earlier_run_of_commit(found.json()["dag_runs"], commit)
    if earlier is not None:
        return TriggerOutcome("duplicate", earlier, "commit already triggered a run")
    created = await client.post(
        dag_runs, json={"dag_run_id": run_id, "logical_date": None, "conf": conf})
    if created.status_code == 409:
        return TriggerOutcome("duplicate", run_id, "delivery already triggered this run")
    if created.status_code not in (200, 201):
        return _failure(created, dag_id, run_id)
    return TriggerOutcome("triggered", run_id)


def loopback_api_url() -> str:
    """The REST API (v2) of this API server on the loopback address.

    The port is ``[api] port`` (what ``airflow api-server`` listens on unless ``--port`` says
    otherwise) and the path is that of ``[api] base_url`` (Airflow serves under that path); the
    host of ``base_url`` is never used, so the token cannot leave this machine.
    """
    from airflow.configuration import conf

    if conf.get("api", "ssl_cert", fallback=""):
        raise RuntimeError("the webhook receiver calls Airflow's REST API over plain HTTP on "
                           "loopback; it does not support an API server with [api] ssl_cert")
    port = conf.getint("api", "port")
    root = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    return f"http://{LOOPBACK_HOST}:{port}{root}/api/v2"


def _service_token() -> str:
    """A short-lived JWT of the service user ``webhook``, signed by Airflow's auth manager.

    ``get_auth_manager().generate_jwt(user)`` is the auth manager's public interface; building
    the user is auth-manager specific, and only the simple auth manager (the platform's) has
    users that need no account: any other auth manager is refused with a clear error.
    """
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    manager = get_auth_manager()
    if not isinstance(manager, SimpleAuthManager):
        raise RuntimeError(f"the webhook receiver needs Airflow's simple auth manager to sign "
                           f"its service token; [core] auth_manager is {type(manager).__name__}")
    user = SimpleAuthManagerUser(username=TRIGGERING_USER, role=SERVICE_ROLE)
    return manager.generate_jwt(user, expiration_time_in_seconds=TOKEN_LIFETIME_SECONDS)


def earlier_run_of_commit(runs: list[dict[str, Any]], commit: str) -> str | None:
    """The run id of the first webhook run in ``runs`` (REST representations) for ``commit``.

    The REST filters only narrow the search (a prefix filter ignores trailing ``_`` and
    ``conf_contains`` is a substring match), so the run id and the commit are checked here.
    """
    if not commit:
        return None
    for run in runs:
        conf = run.get("conf")
        run_id = run.get("dag_run_id", "")
        if (run_id.startswith(RUN_ID_PREFIX) and isinstance(conf, dict)
                and conf.get("git_commit") == commit):
            return run_id
    return None


def _failure(response: Any, dag_id: str, run_id: str) -> TriggerOutcome:
    """The outcome of an error answer of the REST API (logged without the request)."""
    if response.status_code == 404:
        log.warning("Webhook: DAG %s is not known to Airflow (not parsed yet?)", dag_id)
        return TriggerOutcome("error", run_id, "DAG not found in Airflow; redeliver once parsed")
    log.error("Webhook: triggering %s failed: HTTP %s: %s",
              dag_id, response.status_code, response.text[:500])
    return TriggerOutcome("error", run_id, "triggering the DAG failed; see the API server log")


def create_app() -> FastAPI:
    """The receiver app. Builds routes only: settings are read per request, so the plugin
    imports even when nothing is configured."""
    app = FastAPI(
        title="airmlops webhooks",
        description="Git webhooks that trigger training runs.",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )

    @app.exception_handler(_Refusal)
    async def _refused(_request: Request, refusal: _Refusal) -> JSONResponse:
        return refusal.answer.response()

    @app.post("/github")
    async def github(
        request: Request,
        settings: Annotated[Settings, Depends(get_webhook_settings)],
        trigger: Annotated[Trigger, Depends(get_trigger)],
    ) -> JSONResponse:
        """A GitHub delivery: signature, then headers, then payload."""
        secret = settings.github_webhook_secret.get_secret_value()
        _require_configured("github", secret, "MLOPS_GITHUB_WEBHOOK_SECRET")
        body = await _read_bounded_body(request, settings.webhook_max_body_bytes)
        signature = request.headers.get("x-hub-signature-256")
        if signature is None:
            raise _Refusal(401, "missing X-Hub-Signature-256 header")
        if not verify_github_signature(secret, body, signature):
            raise _Refusal(401, "signature does not match (expected sha256=<HMAC-SHA256>)")
        event_name = _required_header(request, "x-github-event", "X-GitHub-Event")
        delivery_id = _delivery_id(request.headers.get("x-github-delivery"), "X-GitHub-Delivery")
        payload = _json_payload(request, body)
        event = _parsed(parse_github_event, event_name, delivery_id, payload)
        return (await _act(event, settings, trigger)).response()

    @app.post("/gitlab")
    async def gitlab(
        request: Request,
        settings: Annotated[Settings, Depends(get_webhook_settings)],
        trigger: Annotated[Trigger, Depends(get_trigger)],
    ) -> JSONResponse:
        """A GitLab delivery: token, then headers, then payload."""
        token = settings.gitlab_webhook_token.get_secret_value()
        _require_configured("gitlab", token, "MLOPS_GITLAB_WEBHOOK_TOKEN")
        provided = request.headers.get("x-gitlab-token")
        if provided is None:
            raise _Refusal(401, "missing X-Gitlab-Token header")
        if not verify_gitlab_token(token, provided):
            raise _Refusal(401, "token does not match")
        body = await _read_bounded_body(request, settings.webhook_max_body_bytes)
        event_name = _required_header(request, "x-gitlab-event", "X-Gitlab-Event")
        # Idempotency-Key stays the same across GitLab's retries; older GitLab sends only the
        # event UUID.
        delivery_header = "Idempotency-Key"
        delivery = request.headers.get("idempotency-key")
        if delivery is None:
            delivery_header = "X-Gitlab-Event-UUID"
            delivery = request.headers.get("x-gitlab-event-uuid")
        delivery_id = _delivery_id(delivery, delivery_header)
        payload = _json_payload(request, body)
        event = _parsed(parse_gitlab_event, event_name, delivery_id, payload)
        return (await _act(event, settings, trigger)).response()

    return app


async def _act(event: PushEvent | IgnoredEvent, settings: Settings, trigger: Trigger) -> _Answer:
    """Decide which pipelines an authentic event concerns and trigger their training DAGs."""
    if isinstance(event, IgnoredEvent):
        return _Answer("ignored", event.reason)
    if event.branch not in settings.webhook_branches:
        return _Answer("ignored", f"branch {event.branch!r} is not in MLOPS_WEBHOOK_BRANCHES")
    targets = await run_in_threadpool(pipeline_targets, settings.pipelines_dir)
    if not targets:
        return _Answer("ignored", "no pipeline specs in MLOPS_PIPELINES_DIR")
    if event.changed_paths is not None:
        targets = [t for t in targets
                   if pipeline_files_changed(event.changed_paths, t.spec_file)]
        if not targets:
            return _Answer("ignored", "no pipeline files changed")

    run_id = webhook_run_id(event.provider, event.delivery_id)
    conf = run_conf(event)

    outcomes = [
        (target, TriggerOutcome("error", run_id, target.error) if target.error
         else await trigger(target.dag_id, run_id, conf))
        for target in targets
    ]
    runs = [
        {"pipeline": target.name, "dag_id": target.dag_id, **asdict(outcome)}
        for target, outcome in outcomes
    ]
    statuses = {run["status"] for run in runs}
    log.info(
        "Webhook %s delivery %s: %s of %s at %s -> %s",
        event.provider, event.delivery_id, event.kind, event.branch, event.short_commit,
        ", ".join(f"{run['pipeline']}={run['status']}" for run in runs),
    )
    if "error" in statuses:
        # Not a 2xx, so the provider shows the delivery as failed; redelivering is safe.
        return _Answer("error", "some pipelines could not be triggered", runs, 503)
    if "triggered" in statuses:
        return _Answer("triggered", event.describe(), runs, 202)
    return _Answer("duplicate", "this delivery or commit already triggered its runs", runs)


def _require_configured(provider: str, secret: str, variable: str) -> None:
    """Fail closed without a secret, and say why in the log once per process."""
    if secret.strip():
        return
    with _unconfigured_lock:
        first = provider not in _unconfigured_logged
        _unconfigured_logged.add(provider)
    if first:
        log.warning("Webhook /%s refuses every delivery: %s is empty", provider, variable)
    raise _Refusal(503, f"{provider} webhooks are not configured on this server")


async def _read_bounded_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not re.fullmatch(r"[0-9]{1,20}", declared):
            raise _Refusal(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise _Refusal(413, f"body larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _Refusal(413, f"body larger than {limit} bytes")
    return bytes(body)


def _required_header(request: Request, name: str, shown: str) -> str:
    value = request.headers.get(name)
    if not value:
        raise _Refusal(400, f"missing {shown} header")
    return value


def _delivery_id(value: str | None, shown: str) -> str:
    if not value:
        raise _Refusal(400, f"missing {shown} header")
    if not is_valid_delivery_id(value):
        raise _Refusal(400, f"{shown} must be 1-100 letters, digits or dashes")
    return value


def _json_payload(request: Request, body: bytes) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "application/json")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise _Refusal(415, "set the webhook's content type to application/json")
    try:
        return load_json_object(body)
    except PayloadError as error:
        raise _Refusal(400, str(error)) from None


def _parsed(
    parse: Callable[[str, str, dict[str, Any]], PushEvent | IgnoredEvent],
    event_name: str,
    delivery_id: str,
    payload: dict[str, Any],
) -> PushEvent | IgnoredEvent:
    try:
        return parse(event_name, delivery_id, payload)
    except PayloadError as error:
        raise _Refusal(400, f"malformed payload: {error}") from None


def _repo_relative(path: Path) -> str | None:
    try:
        return path.resolve().relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return None
