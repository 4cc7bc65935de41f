"""A traffic replayer: simulator rows sent to the stable endpoint, their labels posted later.

It lets anyone watch the loop: replay ``stable`` traffic for a few monitoring windows (nothing
happens), then ``covariate_drift`` traffic (drift is reported, the policy decides to retrain,
``<name>_training`` runs and deploys a new champion at the same address).

What it sends: the simulator's labelled observations (:mod:`airmlops.data.simulator`) of the
days ending on ``day``, in a seeded random order. Each ``/predict``
request carries ``batch_size`` rows (the entity key and the spec's request fields); after
``label_delay`` seconds the simulator's label of every answered row is posted to ``/feedback``
under the request id the service returned (for a ``label_share`` of the requests).

What bounds it: ``rows`` in total (at most 1,000,000), ``rate`` requests per second (at most
1,000), and ``max_seconds`` of wall time, after which labels still waiting are dropped (and
counted). Only loopback URLs are accepted unless ``allow_remote`` is set.

Which world: by default (``scenario=None``) the pipeline's own, the spec's ``source.scenario``
from ``source.scenario_start`` (stable before), which is also what ingest and the feature store
read: the traffic monitoring sees, the features the service looks up and the data a retraining
trains on then agree. To show drift that the loop can act on, put the drift in the spec (for
example ``scenario: covariate_drift`` with a ``scenario_start`` at least ``label_delay_days``
plus ``training.gap_days`` days back, so that labelled drifted rows exist to retrain on) and
replay its world. An explicit ``scenario`` replays another world ("what if the traffic looked
like this"): monitoring reports it, but a retraining still trains on the spec's world, so the
replay logs a warning when the two differ on the replayed days.

Pipelines with a feature store read most inputs from the online store, not from the request:
drift of those features reaches the model only through the store, which the ``<name>_features``
DAG keeps up to date in the spec's world (it rebuilds the latest days and materializes them).
:func:`refresh_features` does the same at once for a demo: it rebuilds the offline days the
world changed (from ``scenario_start`` when that is recent, else the last two days) and
re-materializes the online store. With an explicit ``scenario`` it rebuilds the last two days in
that world instead: this rewrites those offline days (use it on a demo, not on a store that
matters).

The sending loop, :func:`send_and_label` (pacing, label delay, seeded label share, time bound),
is shared with :mod:`airmlops.monitoring.file_replay`, which replays a CSV or Parquet file of
one's own history instead of simulator rows.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airmlops.alerts import is_loopback_host

if TYPE_CHECKING:
    import httpx
    import pandas as pd

    from airmlops.settings import Settings
    from airmlops.spec import PipelineSpec

log = logging.getLogger(__name__)

MAX_ROWS = 1_000_000
MAX_RATE = 1000.0
MAX_SECONDS = 3600.0
MAX_BATCH = 1000
ERROR_SAMPLES = 5
DRY_RUN_FIELDS = ("dry_run", "rows_checked", "invalid_rows", "problems", "live_check")


class ReplayError(ValueError):
    """The replay cannot start (a bad URL, a non-simulator source, bad bounds, a bad file)."""


@dataclasses.dataclass
class ReplayResult:
    """What a replay did."""

    scenario: str
    world_warning: str | None = None
    requests: int = 0
    rows_sent: int = 0
    rows_answered: int = 0
    errors: int = 0
    error_samples: list[str] = dataclasses.field(default_factory=list)
    labels_posted: int = 0
    label_errors: int = 0
    labels_dropped: int = 0
    seconds: float = 0.0
    stopped_by_time: bool = False
    request_ids: list[str] = dataclasses.field(default_factory=list)
    model_versions: dict[str, int] = dataclasses.field(default_factory=dict)
    # A dry run (file replays only: see airmlops.monitoring.file_replay).
    dry_run: bool = False
    rows_checked: int = 0
    invalid_rows: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)
    live_check: str | None = None

    def to_dict(self, with_ids: bool = False) -> dict[str, Any]:
        """The result as JSON-ready data; the dry-run fields only for a dry run."""
        data = dataclasses.asdict(self)
        if not with_ids:
            data.pop("request_ids")
        if not self.dry_run:
            for name in DRY_RUN_FIELDS:
                data.pop(name)
        return data

    def _error(self, text: str) -> None:
        self.errors += 1
        if len(self.error_samples) < ERROR_SAMPLES:
            self.error_samples.append(text[:300])


def check_url(url: str, allow_remote: bool = False) -> str:
    """``url`` without a trailing slash, if it is http(s) on loopback (or anywhere if allowed)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ReplayError(f"{url!r} is not an http(s) URL")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ReplayError(f"{url!r} must be a plain base URL (no credentials, query or fragment)")
    if not allow_remote and not is_loopback_host(parts.hostname):
        raise ReplayError(f"{url!r} is not a loopback address; pass allow_remote to send "
                          "traffic elsewhere")
    return url.rstrip("/")


def _check_bounds(rows: int, rate: float, batch_size: int, max_seconds: float,
                  label_delay: float, label_share: float) -> None:
    problems = []
    if not 1 <= rows <= MAX_ROWS:
        problems.append(f"rows must be within 1..{MAX_ROWS} (got {rows})")
    if not (math.isfinite(rate) and 0 < rate <= MAX_RATE):
        problems.append(f"rate must be within (0, {MAX_RATE}] requests/s (got {rate})")
    if not 1 <= batch_size <= MAX_BATCH:
        problems.append(f"batch_size must be within 1..{MAX_BATCH} (got {batch_size})")
    if not (math.isfinite(max_seconds) and 0 < max_seconds <= MAX_SECONDS):
        problems.append(f"max_seconds must be within (0, {MAX_SECONDS}] (got {max_seconds})")
    if not (math.isfinite(label_delay) and 0 <= label_delay <= max_seconds):
        problems.append(f"label_delay must be within [0, max_seconds] (got {label_delay})")
    if not 0.0 <= label_share <= 1.0:
        problems.append(f"label_share must be within [0, 1] (got {label_share})")
    if problems:
        raise ReplayError("; ".join(problems))


def _check_replayable(spec: PipelineSpec, scenario: str | None) -> None:
    from airmlops.data.simulator import SCENARIOS

    if spec.source.kind != "simulator":
        raise ReplayError(f"pipeline {spec.name}: the replayer needs a simulator source "
                          f"(got '{spec.source.kind}')")
    if scenario is not None and scenario not in SCENARIOS:
        raise ReplayError(f"unknown scenario {scenario!r}; expected one of {list(SCENARIOS)}")


def describe_world(spec: PipelineSpec, scenario: str | None = None) -> str:
    """``covariate_drift`` for an explicit scenario; the spec's world otherwise, as
    ``spec: covariate_drift from 2026-07-01`` (or ``spec: stable``)."""
    if scenario is not None:
        return scenario
    source = spec.source
    since = f" from {source.scenario_start.isoformat()}" if source.scenario_start else ""
    return f"spec: {source.scenario}{since}"


def world_warning(spec: PipelineSpec, scenario: str | None, *, day: dt.date,
                  days: int) -> str | None:
    """Why a replay of ``scenario`` would not be the world a retraining trains on, or None.

    None when ``scenario`` is None (the spec's world) or when the spec's world is that scenario
    on every replayed day.
    """
    from airmlops.data.simulator import scenario_on

    if scenario is None or spec.source.kind != "simulator":
        return None
    replayed = [day - dt.timedelta(days=i) for i in range(days)]
    differing = [d for d in replayed if scenario_on(spec.source, d) != scenario]
    if not differing:
        return None
    return (f"replaying '{scenario}' while the pipeline's world ({describe_world(spec)}) is "
            f"'{scenario_on(spec.source, differing[0])}' on {len(differing)} of the {days} "
            f"replayed days: monitoring will report this traffic, but a retraining trains on "
            f"the spec's world; set source.scenario/scenario_start in the spec (and replay "
            f"without a scenario) to make the drift real")


def replay_rows(spec: PipelineSpec, scenario: str | None, *, day: dt.date, rows: int,
                days: int = 7, seed: int = 0) -> pd.DataFrame:
    """``rows`` simulator observations of the ``days`` days ending on ``day`` in a seeded random
    order, cycled when the days hold fewer rows. ``scenario`` None is the spec's world (its
    scenario from its ``scenario_start``, as ingest reads it); a named scenario replaces the
    spec's (its ``scenario_start`` still applies)."""
    import numpy as np

    from airmlops.data.simulator import simulate_observations

    _check_replayable(spec, scenario)
    if days < 1:
        raise ReplayError(f"days must be positive (got {days})")
    start = day - dt.timedelta(days=days - 1)
    frame = simulate_observations(spec.source, start, day + dt.timedelta(days=1),
                                  scenario=scenario)
    if frame.empty:
        raise ReplayError(f"the simulator has no observations for {start}..{day}")
    order = np.random.default_rng([seed, 0x5245_504C]).permutation(len(frame))
    picks = np.resize(order, rows)  # cycles through the shuffled rows
    return frame.iloc[picks].reset_index(drop=True)


def _plain(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def request_instances(spec: PipelineSpec, frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The ``/predict`` rows of ``frame``: the entity key and the spec's request fields.

    A request field the rows lack is left out, as a client with that schema break would (the
    ``data_quality`` scenario renames a column; the service answers 422 naming it).
    """
    if spec.entity_key not in frame.columns:
        raise ReplayError(f"the simulator rows lack the entity key {spec.entity_key!r}")
    columns = [c for c in [spec.entity_key, *spec.request_fields] if c in frame.columns]
    records = frame[columns].to_dict(orient="records")
    return [{key: _plain(value) for key, value in record.items()} for record in records]


def refresh_days(spec: PipelineSpec, scenario: str | None, day: dt.date) -> tuple[dt.date,
                                                                                 dt.date]:
    """The offline feature days ``[start, end)`` :func:`refresh_features` rebuilds: ``day - 1``
    and ``day``, and, in the spec's world (``scenario`` None or the spec's own), every day from
    a ``scenario_start`` within the feature store's backfill (the days the world's change
    touched)."""
    start = day - dt.timedelta(days=1)
    simulator = spec.source.kind == "simulator"
    begins = spec.source.scenario_start if simulator else None
    own_world = scenario is None or (simulator and scenario == spec.source.scenario)
    if own_world and begins is not None and spec.feature_store is not None:
        earliest = day - dt.timedelta(days=spec.feature_store.backfill_days)
        start = min(start, max(begins, earliest))
    return start, day + dt.timedelta(days=1)


def refresh_features(spec: PipelineSpec, scenario: str | None, day: dt.date,
                     settings: Settings) -> dict[str, Any]:
    """Rebuild the offline feature days of :func:`refresh_days` in the world of ``scenario``
    (None: the spec's) and copy the newest rows of every entity to the online store (a full
    materialization)."""
    from airmlops.features import pipeline as features
    from airmlops.features.online import make_online_store

    if spec.feature_store is None:
        return {"refreshed": False, "why": "the pipeline has no feature store"}
    if scenario is not None:
        _check_replayable(spec, scenario)
    start, end = refresh_days(spec, scenario, day)
    built = features.build_offline(spec, start, end, settings.data_root, scenario=scenario)
    store = make_online_store(settings, spec.name)
    try:
        moment = dt.datetime.combine(end, dt.time(), tzinfo=dt.UTC)
        written = features.materialize_online(spec, settings.data_root, store, end=moment,
                                              full=True)
    finally:
        store.close()
    return {"refreshed": True, "offline_rows": built, "online_rows": written,
            "days": [start.isoformat(), day.isoformat()],
            "world": describe_world(spec, scenario)}


# --- sending: the loop every replay shares ---------------------------------------------------

PROGRESS_STEP = 0.5
"""Longest sleep between two progress reports while the replay waits (seconds)."""


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a running replay stands, for a progress report: the counts so far, the rows it
    sends in all, the seconds since it started and an estimate of the seconds left."""

    result: ReplayResult
    rows_total: int
    elapsed: float
    eta: float
    final: bool = False


Report = Callable[[Progress], None]


@contextlib.contextmanager
def http_client(client: httpx.Client | None) -> Iterator[httpx.Client]:
    """``client`` as given, or a new one closed on exit (no redirects: a replay talks to one
    address)."""
    import httpx

    if client is not None:
        yield client
        return
    with httpx.Client(timeout=10.0, follow_redirects=False) as own:
        yield own


def auth_headers(token: str | None) -> dict[str, str]:
    """The bearer token header of the model service, when it has one."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def predict_once(http: httpx.Client, base: str, headers: dict[str, str],
                 batch: list[dict[str, Any]], result: ReplayResult) -> str | None:
    """POST one batch to ``/predict`` and count it in ``result``; the request id if answered."""
    import httpx

    result.requests += 1
    result.rows_sent += len(batch)
    try:
        answer = http.post(f"{base}/predict", headers=headers, json={"instances": batch})
    except httpx.HTTPError as error:
        result._error(f"/predict: {type(error).__name__}: {error}")
        return None
    if answer.status_code != 200:
        result._error(f"/predict {answer.status_code}: {answer.text}")
        return None
    try:
        body = answer.json()
        request_id = str(body["request_id"])
    except (ValueError, KeyError, TypeError):
        result._error(f"/predict 200 without a request id: {answer.text}")
        return None
    version = str(body.get("model_version"))
    result.rows_answered += len(batch)
    result.request_ids.append(request_id)
    result.model_versions[version] = result.model_versions.get(version, 0) + len(batch)
    return request_id


def _post_labels(http: httpx.Client, base: str, headers: dict[str, str], request_id: str,
                 items: list[dict[str, Any]], result: ReplayResult) -> None:
    import httpx

    try:
        answer = http.post(f"{base}/feedback", headers=headers,
                           json={"request_id": request_id, "labels": items})
    except httpx.HTTPError as error:
        result.label_errors += 1
        result._error(f"/feedback: {type(error).__name__}: {error}")
        return
    if answer.status_code == 202:
        result.labels_posted += len(items)
    else:
        result.label_errors += 1
        result._error(f"/feedback {answer.status_code}: {answer.text}")


def label_items(entities: list[Any], labels: list[Any], start: int,
                stop: int) -> list[dict[str, Any]]:
    """The ``/feedback`` items of rows ``start..stop-1``: one per entity, with the label of the
    entity's last row (the service takes one label per request and entity), none for a row
    whose label is None (not known)."""
    by_entity = {entities[i]: labels[i] for i in range(start, stop)}
    return [{"entity": entity, "label": label} for entity, label in by_entity.items()
            if label is not None]


def labelled_requests(requests: int, label_share: float, seed: int) -> Any:
    """Which of ``requests`` requests get their labels posted: a seeded ``label_share``."""
    import numpy as np

    return np.random.default_rng([seed, 0x4C41_4245]).random(requests) < label_share


@dataclasses.dataclass
class _Sender:
    """One run of :func:`send_and_label`: its pacing, the labels waiting for their time, and
    its progress reports. ``pending`` holds (due time, request id, label items), oldest first."""

    base: str
    http: httpx.Client
    headers: dict[str, str]
    result: ReplayResult
    rows: int
    requests_total: int
    label_delay: float
    label_share: float
    interval: float
    started: float
    deadline: float
    clock: Callable[[], float]
    sleep: Callable[[float], None]
    report: Report | None
    pending: collections.deque[tuple[float, str, list[dict[str, Any]]]] = dataclasses.field(
        default_factory=collections.deque)

    def eta(self, now: float) -> float:
        """Seconds left: the requests still to send at the pace so far, then the label delay;
        once all are sent, until the last waiting label is due (never past the deadline)."""
        result = self.result
        left = self.requests_total - result.requests
        if left:
            pace = max(self.interval,
                       (now - self.started) / result.requests if result.requests else 0)
            seconds = left * pace + (self.label_delay if self.label_share > 0 else 0.0)
        else:
            seconds = self.pending[-1][0] - now if self.pending else 0.0
        return max(0.0, min(seconds, self.deadline - now))

    def tick(self, final: bool = False) -> None:
        """Report the progress (when there is a report to give it to)."""
        if self.report is not None:
            now = self.clock()
            self.report(Progress(self.result, self.rows, now - self.started, self.eta(now),
                                 final))

    def wait_until(self, moment: float) -> None:
        """Sleep until ``moment``, reporting at most every :data:`PROGRESS_STEP` seconds."""
        if self.report is None:
            if (left := moment - self.clock()) > 0:
                self.sleep(left)
            return
        while (left := moment - self.clock()) > 0:
            step = min(left, PROGRESS_STEP)
            self.sleep(step)
            if step == left:
                return
            self.tick()

    def post_due_labels(self, now: float) -> None:
        """Post every waiting label that is due at ``now``."""
        while self.pending and self.pending[0][0] <= now:
            _, request_id, items = self.pending.popleft()
            _post_labels(self.http, self.base, self.headers, request_id, items, self.result)

    def send(self, instances: list[dict[str, Any]], entities: list[Any], labels: list[Any],
             labelled: Any, batch_size: int) -> None:
        """Send the rows at the pace, queueing the labels of the ``labelled`` requests."""
        next_send = self.started
        for number, offset in enumerate(range(0, self.rows, batch_size)):
            now = self.clock()
            if now >= self.deadline:
                self.result.stopped_by_time = True
                return
            self.post_due_labels(now)
            if next_send > now:
                self.wait_until(min(next_send, self.deadline))
                if self.clock() >= self.deadline:
                    self.result.stopped_by_time = True
                    return
            next_send += self.interval
            stop = min(offset + batch_size, self.rows)
            request_id = predict_once(self.http, self.base, self.headers,
                                      instances[offset:stop], self.result)
            if request_id is not None and labelled[number]:
                items = label_items(entities, labels, offset, stop)
                if items:
                    self.pending.append((self.clock() + self.label_delay, request_id, items))
            self.tick()

    def drain(self) -> None:
        """Post the waiting labels as they fall due, until none is left or time is up."""
        while self.pending:
            now = self.clock()
            if now >= self.deadline:
                self.result.stopped_by_time = True
                return
            if self.pending[0][0] > now:
                self.wait_until(min(self.pending[0][0], self.deadline))
                continue
            self.post_due_labels(now)
            self.tick()


def send_and_label(base: str, instances: list[dict[str, Any]], entities: list[Any],
                   labels: list[Any], result: ReplayResult, *, http: httpx.Client,
                   headers: dict[str, str], rate: float, batch_size: int, label_delay: float,
                   label_share: float, max_seconds: float, seed: int,
                   clock: Callable[[], float], sleep: Callable[[float], None],
                   report: Report | None = None) -> ReplayResult:
    """Send ``instances`` in their order to ``base``/predict, ``batch_size`` rows a request at
    ``rate`` requests per second, and post the labels of a seeded ``label_share`` of the
    answered requests to ``/feedback`` ``label_delay`` seconds after their answer (``labels[i]``
    is row i's, None when unknown: not posted); stop after ``max_seconds`` whatever is left,
    counting the labels still waiting as dropped. Counts go to ``result``, which is returned.

    ``report`` (optional) gets a :class:`Progress` after every request, at most every
    :data:`PROGRESS_STEP` seconds while waiting, and once at the end (``final``)."""
    rows = len(instances)
    requests_total = math.ceil(rows / batch_size)
    labelled = labelled_requests(requests_total, label_share, seed)
    started = clock()
    sender = _Sender(base=base, http=http, headers=headers, result=result, rows=rows,
                     requests_total=requests_total, label_delay=label_delay,
                     label_share=label_share, interval=1.0 / rate, started=started,
                     deadline=started + max_seconds, clock=clock, sleep=sleep, report=report)
    sender.send(instances, entities, labels, labelled, batch_size)
    sender.drain()
    result.labels_dropped = sum(len(items) for _, _, items in sender.pending)
    result.seconds = round(clock() - started, 3)
    sender.tick(final=True)
    return result


def _every_100_requests(progress: Callable[[str], None]) -> Report:
    """The simulator replay's report: one line every 100 requests."""
    said = 0

    def report(state: Progress) -> None:
        nonlocal said
        result = state.result
        if state.final or result.requests % 100 or result.requests == said:
            return
        said = result.requests
        progress(f"{result.requests} requests, {result.rows_answered} rows answered, "
                 f"{result.errors} errors, {result.labels_posted} labels posted")

    return report


def replay(url: str, spec: PipelineSpec, scenario: str | None, *, rows: int, rate: float,
           day: dt.date, days: int = 7, batch_size: int = 1, label_delay: float = 5.0,
           label_share: float = 1.0, max_seconds: float = 120.0, seed: int = 0,
           token: str | None = None, allow_remote: bool = False,
           client: httpx.Client | None = None, clock: Callable[[], float] = time.monotonic,
           sleep: Callable[[float], None] = time.sleep,
           progress: Callable[[str], None] | None = None) -> ReplayResult:
    """Send ``rows`` simulator rows of ``scenario`` (None: the spec's world) from the ``days``
    days ending on ``day`` to ``url`` at ``rate`` requests per second, ``batch_size`` rows a
    request, and post each answered request's labels ``label_delay`` seconds later; stop after
    ``max_seconds`` whatever is left. See the module docstring."""
    base = check_url(url, allow_remote)
    _check_bounds(rows, rate, batch_size, max_seconds, label_delay, label_share)
    frame = replay_rows(spec, scenario, day=day, rows=rows, days=days, seed=seed)
    instances = request_instances(spec, frame)
    labels = [_plain(v) for v in frame[spec.label].tolist()]
    entities = [str(v) for v in frame[spec.entity_key].tolist()]
    result = ReplayResult(scenario=describe_world(spec, scenario),
                          world_warning=world_warning(spec, scenario, day=day, days=days))
    if result.world_warning:
        log.warning("replay %s: %s", spec.name, result.world_warning)
    with http_client(client) as http:
        send_and_label(base, instances, entities, labels, result, http=http,
                       headers=auth_headers(token), rate=rate, batch_size=batch_size,
                       label_delay=label_delay, label_share=label_share,
                       max_seconds=max_seconds, seed=seed, clock=clock, sleep=sleep,
                       report=_every_100_requests(progress) if progress else None)
    log.info("replay %s (%s): %s", spec.name, scenario, result.to_dict())
    return result
