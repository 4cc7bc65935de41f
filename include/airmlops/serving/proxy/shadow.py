"""Shadow mirroring: a copy of live /predict requests sent to a challenger slot, afterwards.

Only a ``POST /predict`` whose live answer was 200 and carried a valid ``X-Request-ID`` (32
lowercase hex digits) is mirrored, and only once that answer has been sent. Whether it is
mirrored depends on its request id alone (its first 8 hex digits mod 100 below ``percent``), so
the selection is deterministic and ``percent`` of the answers on average. The copy goes into a
bounded queue with ``put_nowait``: when the queue is full it is dropped and counted, so the live
answer never waits for the shadow. A few workers send the queued copies, one at a time each, to a
healthy serving upstream of the shadow slot, with the client's proxied headers plus
:data:`~airmlops.serving.shadow_header.SHADOW_HEADER` (the live request id); never retried, and
their answers go nowhere but into the shadow slot's statistics and the ``shadow_*`` counters.

Under pressure the shadow yields first (:class:`LivePressure`): every quarter second the mirror
compares the mean latency of the live slot's answers in that window with the fastest window of
the last ten seconds; while it is more than 25 % (and 1 ms) slower, copies are shed, queued ones
too (counted in ``shadow_shed``), so a shadow whose server competes with the live one for
the CPU stops loading it. Windows of fewer than 20 answers change nothing.

Once a look has found pressure, copies flow at a budgeted rate (:class:`CopyBudget`), not in
bursts: half the rate sent in that window, then a step more at every calm look and half at
every look under pressure (additive increase, multiplicative decrease, as TCP's congestion
window), so the mirror settles just below the rate that slows the live answers instead of
swinging between all and nothing. Copies over the budget are shed too. A shadow that never
slows the live answers is never budgeted.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING

from airmlops.serving.shadow_header import SHADOW_HEADER

if TYPE_CHECKING:
    from airmlops.serving.proxy.routing import Backend, Route, Router
    from airmlops.serving.upstream import UpstreamPool

logger = logging.getLogger("airmlops.serving.proxy")

SHADOW_QUEUE_SIZE = 256
"""Copies waiting for a worker at most; one more is dropped (``shadow_dropped``)."""
SHADOW_WORKERS = 2
"""Copies sent to the shadow at once at most."""
SHADOW_COUNTERS = ("shadow_mirrored", "shadow_dropped", "shadow_shed", "shadow_errors")
SHED_INTERVAL = 0.25
"""Seconds between two looks at the live slot's latency."""
SHED_MIN_ANSWERS = 20
"""Live answers a window needs before it can change the verdict."""
SHED_MARGIN = 0.25
"""How much slower than the baseline window the live answers may get before copies are shed."""
SHED_FLOOR_MS = 1.0
"""...and by how many milliseconds at least (fast answers jitter by more than 25 %)."""
SHED_MEMORY = 40
"""Windows the baseline (the fastest of them) remembers: 10 s at the default interval."""
BUDGET_STEP = 25.0
"""Copies per second added at each calm look (every :data:`SHED_INTERVAL`): +100/s a second."""
BUDGET_FLOOR = 5.0
"""The budget never falls below this many copies per second."""
BUDGET_BURST = 0.05
"""Seconds of budget that may be spent at once."""

_REQUEST_ID = re.compile(rb"[0-9a-f]{32}")


def request_id_of(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The live answer's ``X-Request-ID`` if it is 32 lowercase hex digits, else None."""
    for name, value in headers:
        if name.lower() == b"x-request-id":
            return value.decode() if _REQUEST_ID.fullmatch(value) else None
    return None


def selected(request_id: str, percent: int) -> bool:
    """True if the request ``request_id`` is mirrored at ``percent`` percent."""
    return int(request_id[:8], 16) % 100 < percent


class LivePressure:
    """The shedding rule: whether live answers are slower than lately.

    Fed the live slot's cumulative statistics (answers, summed latency) at most every
    ``interval`` seconds, it takes the mean latency of the answers since the last look (once
    there are ``min_answers`` of them) and compares it with the fastest window mean of the last
    ``memory`` windows: more than ``margin`` and ``floor_ms`` above it is pressure, and the
    mirror sheds copies until a window is back under. A baseline that stays higher for
    ``memory`` windows becomes the new normal; a switch of the live slot starts afresh.
    """

    def __init__(self, *, interval: float = SHED_INTERVAL, min_answers: int = SHED_MIN_ANSWERS,
                 margin: float = SHED_MARGIN, floor_ms: float = SHED_FLOOR_MS,
                 memory: int = SHED_MEMORY) -> None:
        """A rule with these thresholds; no pressure until two windows were compared."""
        self.interval, self.min_answers = interval, min_answers
        self.margin, self.floor_ms = margin, floor_ms
        self.shedding = False
        self.looks = 0
        """Windows compared so far (each one a verdict the copy budget follows)."""
        self._next = 0.0
        self._last: tuple[str, int, float] | None = None  # slot, answers, summed ms
        self._means: collections.deque[float] = collections.deque(maxlen=memory)

    def update(self, now: float, slot: str, answers: int, sum_ms: float) -> bool:
        """The verdict after the live slot ``slot`` has answered ``answers`` requests taking
        ``sum_ms`` in all (cumulative) by the monotonic time ``now``: True while shedding."""
        if now < self._next:
            return self.shedding
        self._next = now + self.interval
        last = self._last
        if last is None or last[0] != slot or answers < last[1]:  # first look, or a new slot
            self._last, self.shedding = (slot, answers, sum_ms), False
            self._means.clear()
            return False
        if answers - last[1] < self.min_answers:  # too few yet: the window grows
            return self.shedding
        mean = (sum_ms - last[2]) / (answers - last[1])
        self._last = (slot, answers, sum_ms)
        self.looks += 1
        baseline = min(self._means, default=mean)
        self._means.append(mean)
        self.shedding = mean > baseline * (1 + self.margin) and mean > baseline + self.floor_ms
        return self.shedding


class CopyBudget:
    """How many copies per second the mirror may send: none counted until the first look under
    pressure, which sets the rate to half of what was sent in that window; from then on a
    token bucket whose rate grows by ``step`` at each calm look and halves at each look under
    pressure (never under ``floor``); at most ``burst`` seconds of it are spent at once."""

    def __init__(self, *, step: float = BUDGET_STEP, floor: float = BUDGET_FLOOR,
                 burst: float = BUDGET_BURST) -> None:
        """An unlimited budget until the first pressure."""
        self.step, self.floor, self.burst = step, floor, burst
        self.rate: float | None = None
        self._tokens = 0.0
        self._last: float | None = None
        self._window: tuple[float, int] | None = None  # when the window began, copies sent

    def adjust(self, now: float, pressure: bool) -> None:
        """One look's verdict at the monotonic time ``now``: halve the rate (or, the first
        time, half the rate just sent) under ``pressure``, else add a step to a set rate."""
        began, sent = self._window or (now, 0)
        self._window = (now, 0)
        if pressure:
            measured = sent / (now - began) if now > began else self.floor
            if self.rate is None:  # the first pressure: a full bucket at half the rate sent
                self.rate = max(self.floor, measured / 2)
                self._tokens, self._last = max(1.0, self.rate * self.burst), None
            else:
                self.rate = max(self.floor, min(self.rate, max(measured, 1.0)) / 2)
        elif self.rate is not None:
            self.rate += self.step

    def take(self, now: float) -> bool:
        """Spend one copy at the monotonic time ``now``: True if the budget had it."""
        if self._window is None:
            self._window = (now, 0)
        if self.rate is not None:
            if self._last is not None:
                self._tokens = min(max(1.0, self.rate * self.burst),
                                   self._tokens + (now - self._last) * self.rate)
            self._last = now
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
        self._window = (self._window[0], self._window[1] + 1)
        return True


class ShadowRoute:
    """The shadow in force: its slot, its percent and its route (the healthy serving upstreams
    of the shadow slot). Replaced, never mutated, like :class:`Route`."""

    __slots__ = ("percent", "route", "slot")

    def __init__(self, slot: str, percent: int, route: Route) -> None:
        """The shadow ``slot`` mirroring ``percent`` percent of the requests through ``route``."""
        self.slot = slot
        self.percent = percent
        self.route = route


class ShadowCopy:
    """One mirrored request waiting in the queue: the live request id, target, headers, body."""

    __slots__ = ("body", "headers", "request_id", "target")

    def __init__(self, request_id: str, target: str, headers: list[tuple[str, str]],
                 body: bytes) -> None:
        """The copy of the live request ``request_id``."""
        self.request_id, self.target, self.headers, self.body = request_id, target, headers, body


class Mirror:
    """The bounded queue of copies and the workers that send them to the shadow slot."""

    def __init__(self, router: Router, counters: MutableMapping[str, int],
                 pool: Callable[[], UpstreamPool], read_timeout: float, *,
                 queue_size: int = SHADOW_QUEUE_SIZE, workers: int = SHADOW_WORKERS,
                 pressure: LivePressure | None = None,
                 budget: CopyBudget | None = None) -> None:
        """Mirror to ``router``'s shadow through ``pool()``, counting in ``counters``,
        shedding copies while ``pressure`` (by default :class:`LivePressure`'s rule) says so
        and beyond ``budget`` (by default a fresh :class:`CopyBudget`)."""
        if queue_size < 1 or workers < 1:
            raise ValueError("the shadow queue size and worker count must be at least 1")
        self.router, self.counters, self.pool = router, counters, pool
        self.read_timeout = read_timeout
        self.queue: asyncio.Queue[ShadowCopy] = asyncio.Queue(queue_size)
        self.workers = workers
        self.tasks: list[asyncio.Task[None]] = []
        self._turn = 0
        self.pressure = pressure if pressure is not None else LivePressure()
        self.budget = budget if budget is not None else CopyBudget()
        self._budgeted: tuple[str, int] | None = None  # the shadow the budget is for
        self._looks = 0
        for key in SHADOW_COUNTERS:
            counters.setdefault(key, 0)

    def start(self) -> list[asyncio.Task[None]]:
        """Start the workers in the running loop (once); their tasks."""
        if not self.tasks:
            loop = asyncio.get_running_loop()
            self.tasks = [loop.create_task(self._work()) for _ in range(self.workers)]
        return self.tasks

    def offer(self, shadow: ShadowRoute, response_headers: Sequence[tuple[bytes, bytes]],
              target: str, headers: list[tuple[str, str]], body: bytes) -> None:
        """Queue a copy of the live request just answered 200 with ``response_headers`` if it
        is selected; drop it (counted) when the queue is full. Never waits, never raises."""
        request_id = request_id_of(response_headers)
        if request_id is None or not selected(request_id, shadow.percent):
            return
        if (shadow.slot, shadow.percent) != self._budgeted:
            if self._budgeted is not None:  # another shadow than before: a fresh budget
                self.budget = CopyBudget()
            self._budgeted = (shadow.slot, shadow.percent)
        if self.under_pressure() or not self.budget.take(time.monotonic()):
            self.counters["shadow_shed"] += 1
            return
        if not self.tasks:  # served without lifespan: start the workers on first use
            self.start()
        try:
            self.queue.put_nowait(ShadowCopy(request_id, target, headers, body))
        except asyncio.QueueFull:
            self.counters["shadow_dropped"] += 1

    def under_pressure(self) -> bool:
        """True while copies are shed: the live slot answers slower than lately."""
        router = self.router
        active = router.table.active
        if active is None:
            return False
        stats = router.stats_for(active)
        pressure, now = self.pressure, time.monotonic()
        shedding = pressure.update(now, active, stats.requests, stats.sum_ms)
        if pressure.looks != self._looks:  # a window was judged: the budget follows it
            self._looks = pressure.looks
            self.budget.adjust(now, shedding)
        return shedding

    async def _work(self) -> None:
        """Send queued copies, one at a time, until cancelled; shed them under pressure."""
        while True:
            copy = await self.queue.get()
            if self.pressure.shedding:
                self.counters["shadow_shed"] += 1
                continue
            try:
                await self._send(copy)
            except Exception:  # a bug here must not stop the worker for good
                logger.exception("mirroring request %s failed", copy.request_id)

    async def _send(self, copy: ShadowCopy) -> None:
        """Send ``copy`` to a healthy upstream of the shadow in force (dropped, counted, when
        there is none any more) and record its answer in the shadow slot's statistics."""
        shadow = self.router.shadow
        if shadow is None:
            self.counters["shadow_dropped"] += 1
            return
        candidates = shadow.route.candidates
        self._turn = (self._turn + 1) % len(candidates)
        backend = candidates[self._turn]
        self.counters["shadow_mirrored"] += 1
        started = time.perf_counter()
        status = await self._exchange(backend, copy)
        backend.stats.record(status, time.perf_counter() - started)
        if not 200 <= status < 300:
            self.counters["shadow_errors"] += 1

    async def _exchange(self, backend: Backend, copy: ShadowCopy) -> int:
        """The status ``backend`` answered ``copy`` with; 504 if it did not within the read
        timeout, 502 if it could not be reached or answered invalidly (never retried)."""
        from airmlops.serving.upstream import UpstreamConnectError, UpstreamError

        headers = [*copy.headers, (SHADOW_HEADER, copy.request_id)]
        try:
            response = await self.pool().request(backend.host, backend.port, "POST",
                                                  copy.target, headers, copy.body,
                                                  timeout=self.read_timeout)
        except TimeoutError:
            logger.warning("shadow upstream %s (%s) timed out", backend.url, backend.slot)
            return 504
        except UpstreamConnectError as exc:
            self.router.mark(backend, f"{type(exc).__name__}: {exc}", fall=1)
            return 502
        except UpstreamError as exc:
            logger.warning("shadow upstream %s (%s) failed: %r", backend.url, backend.slot, exc)
            return 502
        return response.status
