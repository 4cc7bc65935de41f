"""Answering ``/predict``: concurrent requests scored together (:class:`Coalescer`), then
unknown entities refused, the answer built and logged (:class:`PredictHandler`)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airmlops.serving.runtime import is_connection_error, now_us
from airmlops.serving.schemas import error_body

if TYPE_CHECKING:
    from airmlops.serving.metrics import ServiceMetrics
    from airmlops.serving.runtime import Scored, ServingRuntime

log = logging.getLogger("airmlops.serving.service")  # the service's logger, as before the split


class Coalescer:
    """Scores concurrent requests together: requests arriving while a batch is being scored
    wait and are scored as the next batch (up to ``max_rows`` rows). No timer: a request that
    finds the scorer idle is scored at once."""

    def __init__(self, score: Callable[[list[Mapping[str, Any]]], Scored], max_rows: int,
                 observe: Callable[[int], None] | None = None) -> None:
        self._score = score
        self._max_rows = max_rows
        self._observe = observe
        self._queue: list[tuple[Sequence[Mapping[str, Any]], asyncio.Future[Scored]]] = []
        self._task: asyncio.Task[None] | None = None

    async def score(self, rows: Sequence[Mapping[str, Any]]) -> Scored:
        """The scores of ``rows``, scored alone or with the requests queued beside them."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Scored] = loop.create_future()
        self._queue.append((rows, future))
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        """Score queued requests batch by batch (in a thread) until the queue is empty."""
        import anyio.to_thread

        try:
            while self._queue:
                taken = [self._queue.pop(0)]
                total = len(taken[0][0])
                while self._queue and total + len(self._queue[0][0]) <= self._max_rows:
                    taken.append(self._queue.pop(0))
                    total += len(taken[-1][0])
                taken = [(rows, f) for rows, f in taken if not f.done()]  # timed out meanwhile
                if not taken:
                    continue
                merged = [row for rows, _ in taken for row in rows]
                if self._observe is not None:
                    self._observe(len(taken))
                try:
                    scored = await anyio.to_thread.run_sync(self._score, merged)
                    offset = 0
                    for rows, future in taken:
                        if not future.done():
                            future.set_result(scored.rows(offset, offset + len(rows)))
                        offset += len(rows)
                except Exception as error:
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(error)
        finally:
            self._task = None


class PredictHandler:
    """``/predict`` for validated request rows: score them (coalesced with concurrent
    requests), refuse unknown entities (422) or an unreachable store (503), answer, log.

    Returns (HTTP status, JSON body, extra headers); used by :class:`RequestGate`'s direct lane
    and by the BentoML API method alike, so both answer the same.
    """

    def __init__(self, runtime: ServingRuntime, coalescer: Coalescer | None,
                 metrics: ServiceMetrics | None = None) -> None:
        self.runtime = runtime
        self.coalescer = coalescer
        self.metrics = metrics
        self.entity_key = runtime.spec.entity_key

    async def __call__(self, rows: list[dict[str, Any]], synthetic: str | None = None,
                       shadow_of: str | None = None
                       ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Answer ``rows``; a ``synthetic`` request (its kind) is answered but not logged; a
        shadow request (``shadow_of``: the live request id, checked by the gate) is answered
        under that id and logged to the shadow log (:mod:`airmlops.serving.shadow_header`)."""
        import anyio.to_thread

        runtime = self.runtime
        ts_us = now_us(runtime.clock)
        request_id = shadow_of or uuid.uuid4().hex
        headers = {"X-Request-ID": request_id}
        try:
            if self.coalescer is not None:
                scored = await self.coalescer.score(rows)
            else:
                scored = await anyio.to_thread.run_sync(runtime.score, rows)
        except Exception as error:
            if is_connection_error(error):
                log.warning("online store unavailable: %s: %s", type(error).__name__, error)
                return 503, error_body(
                    "unavailable", "the online feature store is unavailable; retry later",
                    request_id=request_id), headers
            raise
        key = self.entity_key
        if scored.unknown:
            unknown = [row[key] for row in rows if str(row[key]) in scored.unknown]
            if unknown:
                shown = ", ".join(repr(e) for e in list(dict.fromkeys(unknown))[:20])
                return 422, error_body(
                    "unknown_entity", f"unknown {key} (no features in the online store): "
                    f"{shown}", unknown_entities=list(dict.fromkeys(unknown)),
                    request_id=request_id), headers
        body = runtime.answer(rows, scored, request_id, ts_us, log=synthetic is None,
                              shadow=shadow_of is not None)
        if self.metrics is not None:
            self.metrics.predictions.inc(len(rows))
            if synthetic is not None:
                self.metrics.synthetic.labels(synthetic).inc()
            if shadow_of is not None:
                self.metrics.shadow.inc()
        return 200, body, headers
