"""Per-slot answer statistics: what the proxy counts, and the comparison a bake judges by.

:class:`SlotStats` lives in the proxy process; :func:`bake_window` runs on the deploy side,
comparing two snapshots that :func:`airmlops.serving.proxy.client.slot_stats` fetched.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Mapping
from typing import Any

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
"""Upper bounds (inclusive) of the per-slot latency histogram; one more bucket holds the rest."""

_BOUNDS_MS = tuple(float(bound) for bound in LATENCY_BUCKETS_MS)


class SlotStats:
    """Cumulative answers charged to one slot: count, errors (status >= 500) and latency.

    Kept cheap for the request path: integers in lists, one bisect per answer.
    """

    __slots__ = ("classes", "counts", "errors", "requests", "sum_ms")

    def __init__(self) -> None:
        """Start with nothing counted."""
        self.requests = 0
        self.errors = 0
        self.classes = [0] * 10  # by status // 100 (llhttp reads three-digit statuses)
        self.counts = [0] * (len(_BOUNDS_MS) + 1)  # per bucket, not cumulative; last: overflow
        self.sum_ms = 0.0

    def record(self, status: int, seconds: float) -> None:
        """Count one answer of ``status`` given ``seconds`` after the request arrived."""
        self.requests += 1
        if status >= 500:
            self.errors += 1
        self.classes[status // 100] += 1
        ms = seconds * 1000.0
        self.sum_ms += ms
        self.counts[bisect_left(_BOUNDS_MS, ms)] += 1

    def snapshot(self, boot: str) -> dict[str, Any]:
        """What :func:`~airmlops.serving.proxy.client.slot_stats` returns (``boot`` names the
        proxy process)."""
        return {
            "proxy_boot": boot,
            "requests": self.requests,
            "errors": self.errors,
            "latency_buckets_ms": list(LATENCY_BUCKETS_MS),
            "latency_counts": list(self.counts),
            "latency_sum_ms": round(self.sum_ms, 3),
        }


def step_window(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What a slot served between two snapshots, for a canary step's judgement:
    ``{"requests", "errors", "error_rate", "p50_ms"}``. ``p50_ms`` is the median read from the
    latency histogram, interpolated linearly inside its bucket (as Prometheus'
    ``histogram_quantile`` does; the overflow bucket reads as its lower bound), None when
    nothing was counted. ValueError as :func:`bake_window`."""
    requests, errors, bounds, counts = _difference(before, after)
    return {"requests": requests, "errors": errors,
            "error_rate": errors / requests if requests else 0.0,
            "p50_ms": _interpolated_quantile(bounds, counts, 0.5)}


def _interpolated_quantile(bounds: list[Any], counts: list[int], q: float) -> float | None:
    """The ``q`` quantile of the histogram ``counts`` (upper ``bounds``), interpolated inside
    its bucket; None when empty."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = q * total, 0
    for index, count in enumerate(counts):
        if count and seen + count >= rank:
            low = float(bounds[index - 1]) if index else 0.0
            if index >= len(bounds):
                return low
            return round(low + (float(bounds[index]) - low) * (rank - seen) / count, 3)
        seen += count
    return None


def bake_window(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """What a slot served between two :func:`~airmlops.serving.proxy.client.slot_stats`
    snapshots.

    ``{"requests", "errors", "error_rate", "p99_ms"}``: errors are answers >= 500 (the
    proxy's own 502/503/504 included); ``p99_ms`` is the upper bound of the latency bucket
    holding the 99th percentile, ``math.inf`` if that is the overflow bucket. With no request
    in the window, ``error_rate`` is 0.0 and ``p99_ms`` is None: the window measured nothing,
    which the judge must not read as a pass. Raises ValueError when the snapshots cannot be
    compared: from different proxy processes (a restart resets the counters), of different
    bucket layouts, or in the wrong order.
    """
    requests, errors, bounds, counts = _difference(before, after)
    return {"requests": requests, "errors": errors,
            "error_rate": errors / requests if requests else 0.0,
            "p99_ms": _p99_bound(bounds, counts)}


def _difference(before: Mapping[str, Any], after: Mapping[str, Any]
                ) -> tuple[int, int, list[Any], list[int]]:
    """Requests, errors, bucket bounds and per-bucket counts between two snapshots; ValueError
    when they cannot be compared (see :func:`bake_window`)."""
    try:
        if before["proxy_boot"] != after["proxy_boot"]:
            raise ValueError("the snapshots come from different proxy processes (it restarted)")
        bounds = list(after["latency_buckets_ms"])
        if list(before["latency_buckets_ms"]) != bounds:
            raise ValueError("the snapshots have different latency buckets")
        counts = [int(a) - int(b) for a, b in
                  zip(after["latency_counts"], before["latency_counts"], strict=True)]
        requests = int(after["requests"]) - int(before["requests"])
        errors = int(after["errors"]) - int(before["errors"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a slot_stats snapshot: {exc!r}") from None
    if len(counts) != len(bounds) + 1:
        raise ValueError("the latency counts do not match the buckets")
    if requests < 0 or errors < 0 or min(counts) < 0:
        raise ValueError("the counters went backwards: 'before' was taken after 'after'")
    return requests, errors, bounds, counts


def _p99_bound(bounds: list[Any], counts: list[int]) -> float | None:
    """The upper bound of the bucket holding the 99th percentile of ``counts`` (``math.inf``
    for the overflow bucket), None when nothing was counted."""
    total = sum(counts)
    if not total:
        return None
    rank, seen = math.ceil(0.99 * total), 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return float(bounds[index]) if index < len(bounds) else math.inf
    return None
