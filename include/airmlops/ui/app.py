"""The MLOps view: a FastAPI app that the Airflow API server mounts at ``/mlops-ui``.

Routes (relative to the mount):

- ``GET /``: the HTML page, every pipeline (``?pipeline=<name>`` or ``?dag_id=<dag>`` narrows
  it to one; the DAG tab uses the latter);
- ``GET /api/pipelines`` and ``GET /api/pipelines/<name>``: the same data as JSON;
- ``GET /pipelines/<name>/windows/<window id>/report``: that window's Evidently HTML report;
- ``POST /api/pipelines/<name>/shadow/decision``: promote or reject the running shadow of a
  version (JSON ``{"version": <int>, "action": "promote"|"reject"}``), for users who may edit
  the pipeline's training DAG (:func:`_decide`);
- ``GET /icon.svg``: the navigation icon (public).

Airflow does not authenticate plugin apps, so every route but the icon requires the caller's
Airflow JWT: the ``Authorization: Bearer`` header, else the UI's ``_token`` cookie (sent along
when the page is shown inside the Airflow UI). It is validated by Airflow's own auth manager
(signature, expiry, revocation), and a viewer sees only pipelines whose training DAG they may
read. Without a valid token the page redirects to Airflow's login (and comes back), the JSON
and report routes answer 401.

Reports are looked up by window in the monitoring table, never by a path from the request,
confined under ``<data_root>/reports`` (:func:`airmlops.paths.safe_join`), and served with a
``sandbox`` Content-Security-Policy: a report's scripts run in an opaque origin and cannot act
as the viewer. The page itself gets a strict policy with a per-response nonce.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from airmlops.settings import Settings, get_settings
from airmlops.spec import NAME_PATTERN, PipelineSpec
from airmlops.ui import data
from airmlops.ui.decision import DecisionRefused, decide
from airmlops.ui.page import render_page

log = logging.getLogger(__name__)

MOUNT_PATH = "/mlops-ui"
TOKEN_COOKIE = "_token"  # noqa: S105 (the cookie's name, not a secret)
"""The cookie in which the Airflow UI keeps the user's JWT."""

_NAME = re.compile(NAME_PATTERN)
_DAG_ID = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")

ICON_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" '
    'stroke="#0b6bcb" stroke-width="2" stroke-linecap="round" stroke-linejoin="round">'
    '<polyline points="3 17 9 11 13 15 21 7"/><polyline points="15 7 21 7 21 13"/>'
    '<line x1="3" y1="21" x2="21" y2="21"/></svg>'
)

BASE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
REPORT_CSP = "sandbox allow-scripts allow-popups; frame-ancestors 'self'"
"""A report runs in an opaque origin: it can draw its charts, not read cookies or call APIs."""


class NotAuthenticated(Exception):
    """No valid Airflow token on the request; the message says why."""


@dataclasses.dataclass(frozen=True)
class Viewer:
    """The authenticated user: a display name and which DAGs they may read."""

    name: str
    readable: Callable[[set[str]], Awaitable[set[str]]]
    """``readable(dag_ids)`` -> the subset this user may read."""
    editable: Callable[[set[str]], Awaitable[set[str]]] | None = None
    """``editable(dag_ids)`` -> the subset this user may edit (None: none)."""

    async def may_edit(self, dag_id: str) -> bool:
        """Whether this user may edit (``PUT``) the DAG ``dag_id``."""
        return self.editable is not None and dag_id in await self.editable({dag_id})


class Authenticator(Protocol):
    """Turns a request into a :class:`Viewer` (or raises :class:`NotAuthenticated`)."""

    async def viewer(self, request: Request) -> Viewer:
        """The request's user; raises :class:`NotAuthenticated`."""

    def login_url(self, next_url: str) -> str | None:
        """Where to send a browser to log in and come back to ``next_url`` (None: nowhere)."""


def request_token(request: Request) -> str | None:
    """The JWT of a request: an ``Authorization: Bearer`` header wins over the cookie."""
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return request.cookies.get(TOKEN_COOKIE) or None


class AirflowAuthenticator:
    """Airflow's auth manager of this API server: its JWT validation and its DAG permissions."""

    async def viewer(self, request: Request) -> Viewer:
        from jwt import InvalidTokenError

        token = request_token(request)
        if not token:
            raise NotAuthenticated("no Airflow token (log in to Airflow first)")
        manager = _auth_manager()
        try:
            user = await manager.get_user_from_token(token)
        except InvalidTokenError as exc:  # expired, bad signature, revoked...
            raise NotAuthenticated(f"the Airflow token is not valid ({type(exc).__name__})"
                                   ) from None

        async def readable(dag_ids: set[str]) -> set[str]:
            return await run_in_threadpool(
                manager.filter_authorized_dag_ids, dag_ids=set(dag_ids), user=user, method="GET")

        async def editable(dag_ids: set[str]) -> set[str]:
            return await run_in_threadpool(
                manager.filter_authorized_dag_ids, dag_ids=set(dag_ids), user=user, method="PUT")

        return Viewer(name=str(user.get_name()), readable=readable, editable=editable)

    def login_url(self, next_url: str) -> str | None:
        try:
            return _auth_manager().get_url_login(next_url=next_url)
        except Exception:
            log.warning("MLOps view: no login URL from the auth manager", exc_info=True)
            return None


def _auth_manager() -> Any:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def get_authenticator() -> Authenticator:
    """FastAPI dependency: how requests are authenticated (tests override it)."""
    return AirflowAuthenticator()


def get_ui_settings() -> Settings:
    """FastAPI dependency: the platform settings (tests override it)."""
    return get_settings()


def get_clock() -> Callable[[], dt.datetime]:
    """FastAPI dependency: the current time, read at the edge and passed inward."""
    return lambda: dt.datetime.now(dt.UTC)


SettingsDep = Annotated[Settings, Depends(get_ui_settings)]
AuthDep = Annotated[Authenticator, Depends(get_authenticator)]
ClockDep = Annotated[Callable[[], dt.datetime], Depends(get_clock)]


def _page_csp(nonce: str) -> str:
    return (f"default-src 'none'; style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; "
            "img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; "
            "frame-ancestors 'self'")


def _roots(request: Request) -> tuple[str, str]:
    """This app's URL path (where it is mounted) and the Airflow UI's (the mount's parent)."""
    app_root = str(request.scope.get("root_path") or "").rstrip("/")
    return app_root, app_root.removesuffix(MOUNT_PATH)


class _LoginRequired(Exception):
    """Raised by the viewer dependency; becomes a redirect to the login page or a 401."""

    def __init__(self, reason: str, login_url: str | None) -> None:
        super().__init__(reason)
        self.login_url = login_url


def _wants_html(request: Request) -> bool:
    app_root, _ = _roots(request)
    return (request.method == "GET"
            and not request.url.path.startswith(f"{app_root}/api/")
            and "text/html" in request.headers.get("accept", ""))


async def _visible_specs(settings: Settings, viewer: Viewer
                         ) -> tuple[list[PipelineSpec], list[str]]:
    """The valid specs whose training DAG the viewer may read, and the invalid spec files."""
    specs, invalid = await run_in_threadpool(data.load_pipelines, settings.pipelines_dir)
    if not specs:
        return [], invalid
    allowed = await viewer.readable({s.training_dag_id for s in specs})
    return [s for s in specs if s.training_dag_id in allowed], invalid


async def _overview(specs: list[PipelineSpec], invalid: list[str], settings: Settings,
                    now: dt.datetime) -> data.Overview:
    return await run_in_threadpool(
        lambda: data.collect_overview(
            specs,
            data_root=settings.data_root,
            reports_dir=settings.reports_dir,
            tracking_uri=settings.mlflow_tracking_uri,
            mlflow_ui_url=settings.mlflow_ui_url,
            invalid_specs=invalid,
            now=now,
        )
    )


async def current_viewer(request: Request, auth: AuthDep) -> Viewer:
    """FastAPI dependency: the authenticated viewer, else a login redirect or a 401."""
    try:
        return await auth.viewer(request)
    except (NotAuthenticated, RuntimeError) as exc:
        # RuntimeError: Airflow's auth manager is not initialised (not in the API server).
        if isinstance(exc, RuntimeError):
            log.error("MLOps view: cannot authenticate: %s", exc)
            exc = NotAuthenticated("Airflow authentication is not available here")
        login_url = None
        if _wants_html(request):
            next_url = request.url.path + (f"?{request.url.query}" if request.url.query
                                           else "")
            login_url = auth.login_url(next_url)
        raise _LoginRequired(str(exc), login_url) from None


ViewerDep = Annotated[Viewer, Depends(current_viewer)]


async def _deciders(viewer: Viewer, specs: list[PipelineSpec]) -> frozenset[str]:
    """The pipelines among ``specs`` whose training DAG the viewer may edit (and so whose
    running shadow they may promote or reject)."""
    if viewer.editable is None or not specs:
        return frozenset()
    editable = await viewer.editable({s.training_dag_id for s in specs})
    return frozenset(s.name for s in specs if s.training_dag_id in editable)


async def shadow_decision(name: str, request: Request, viewer: ViewerDep,
                          settings: SettingsDep, clock: ClockDep) -> JSONResponse:
    """``POST /api/pipelines/<name>/shadow/decision``: promote or reject the running shadow of
    a version (every refusal: :mod:`airmlops.ui.decision`)."""
    specs, _ = await _visible_specs(settings, viewer)
    try:
        written = await decide(request, name, specs, viewer, settings.data_root, clock())
    except DecisionRefused as refused:
        return JSONResponse({"detail": refused.detail}, status_code=refused.status,
                            headers=BASE_HEADERS)
    return JSONResponse(written, status_code=202, headers=BASE_HEADERS)


async def report(name: str, window_id: str, viewer: ViewerDep, settings: SettingsDep
                 ) -> Response:
    """``GET /pipelines/<name>/windows/<window id>/report``: the Evidently HTML report of one
    window (404 when there is none to serve)."""
    missing = JSONResponse({"detail": "no report for this window"}, status_code=404,
                           headers=BASE_HEADERS)
    if not _NAME.match(name):
        return missing
    specs, _ = await _visible_specs(settings, viewer)
    if name not in {s.name for s in specs}:
        return missing
    path = await run_in_threadpool(data.window_report, settings.data_root,
                                   settings.reports_dir, name, window_id)
    if path is None:
        return missing
    return FileResponse(path, media_type="text/html; charset=utf-8",
                        headers={**BASE_HEADERS, "Content-Security-Policy": REPORT_CSP})


def create_app() -> FastAPI:
    """The MLOps view app. Builds routes only: settings are read per request, so the plugin
    imports even when nothing is configured."""
    app = FastAPI(title="airmlops MLOps view", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(_LoginRequired)
    async def _login_required(_request: Request, exc: _LoginRequired) -> Response:
        if exc.login_url:
            return RedirectResponse(exc.login_url, status_code=303, headers=BASE_HEADERS)
        return JSONResponse({"detail": str(exc)}, status_code=401,
                            headers={**BASE_HEADERS, "WWW-Authenticate": "Bearer"})

    @app.get("/icon.svg", include_in_schema=False)
    async def icon() -> Response:
        return Response(ICON_SVG, media_type="image/svg+xml",
                        headers={"Cache-Control": "public, max-age=86400",
                                 "X-Content-Type-Options": "nosniff"})

    @app.get("/", response_class=HTMLResponse)
    async def page(request: Request, viewer: ViewerDep, settings: SettingsDep, clock: ClockDep,
                   pipeline: str | None = None, dag_id: str | None = None) -> Response:
        """The MLOps page (all pipelines, or the one named or owning ``dag_id``)."""
        now = clock()
        specs, invalid = await _visible_specs(settings, viewer)
        selection: dict[str, str] = {}
        if pipeline is not None:
            selection["pipeline"] = pipeline
            specs = [s for s in specs if s.name == pipeline] if _NAME.match(pipeline) else []
        if dag_id is not None:
            selection["dag_id"] = dag_id
            owner = data.pipeline_of_dag(specs, dag_id) if _DAG_ID.match(dag_id) else None
            specs = [owner] if owner is not None else []
        overview = await _overview(specs, invalid, settings, now)
        app_root, airflow_root = _roots(request)
        nonce = secrets.token_urlsafe(16)
        html = render_page(overview, now=now, nonce=nonce, app_root=app_root,
                           airflow_root=airflow_root, viewer=viewer.name, selection=selection,
                           pipelines_dir=str(settings.pipelines_dir),
                           deciders=await _deciders(viewer, specs))
        return HTMLResponse(html, headers={**BASE_HEADERS,
                                           "Content-Security-Policy": _page_csp(nonce)})

    @app.get("/api/pipelines")
    async def api_pipelines(viewer: ViewerDep, settings: SettingsDep, clock: ClockDep
                            ) -> JSONResponse:
        """Every visible pipeline's data as JSON."""
        specs, invalid = await _visible_specs(settings, viewer)
        overview = await _overview(specs, invalid, settings, clock())
        return JSONResponse(overview.to_dict(), headers=BASE_HEADERS)

    @app.get("/api/pipelines/{name}")
    async def api_pipeline(name: str, viewer: ViewerDep, settings: SettingsDep, clock: ClockDep
                           ) -> JSONResponse:
        """One pipeline's data as JSON (404 when unknown or not readable)."""
        specs, _ = await _visible_specs(settings, viewer)
        chosen = [s for s in specs if s.name == name] if _NAME.match(name) else []
        if not chosen:
            return JSONResponse({"detail": f"no pipeline {name!r}"}, status_code=404,
                                headers=BASE_HEADERS)
        overview = await _overview(chosen, [], settings, clock())
        return JSONResponse(dataclasses.asdict(overview.pipelines[0]), headers=BASE_HEADERS)

    app.add_api_route("/api/pipelines/{name}/shadow/decision", shadow_decision,
                      methods=["POST"], status_code=202)

    app.add_api_route("/pipelines/{name}/windows/{window_id}/report", report,
                      methods=["GET"])
    return app
