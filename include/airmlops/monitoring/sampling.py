"""Fixed-size, time-stratified samples: what keeps a window's cost and verdicts independent of
its traffic volume, and what the reference keeps of the champion's data.

:func:`stratified_sample` spreads a sample evenly over time; :func:`window_seed` gives each
window its own, repeatable seed. Both the reference summary
(:mod:`airmlops.monitoring.reference`) and the window measurement
(:mod:`airmlops.monitoring.drift`) draw their samples here.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def stratified_sample(window_df: pd.DataFrame, ts_column: str, size: int, seed: int, *,
                      strata: int = 12) -> pd.DataFrame:
    """At most ``size`` rows of ``window_df``, spread evenly over time, in time order.

    The span between the first and last timestamp is cut into ``strata`` equal buckets and each
    gets an equal share of ``size`` (a bucket with fewer rows gives all of them and its unused
    share goes to the others), so a burst of traffic cannot dominate the sample. Rows are drawn
    without replacement by an RNG seeded with ``(seed, bucket)``: the same window and seed give
    the same sample, whatever the order of the input rows (rows with identical timestamps keep
    their input order). Rows without a timestamp are left out; a window of at most ``size`` rows
    comes back whole.
    """
    import pandas as pd

    stamps = pd.DatetimeIndex(pd.to_datetime(window_df[ts_column], utc=True)).asi8
    rows = stratified_positions(stamps, size, seed, strata=strata)
    return window_df.iloc[rows].reset_index(drop=True)


def stratified_positions(stamps: Any, size: int, seed: int, *, strata: int = 12) -> Any:
    """The row positions :func:`stratified_sample` picks, in its order, from the rows' times
    as int64 (``numpy.iinfo(int64).min`` where missing): what lets a window streamed from a
    file draw the very sample its whole frame would give."""
    import numpy as np

    if size < 1 or strata < 1:
        raise ValueError(f"size and strata must be positive (got {size}, {strata})")
    stamps = np.asarray(stamps, dtype=np.int64)
    valid = np.flatnonzero(stamps != np.iinfo(np.int64).min)
    order = valid[np.argsort(stamps[valid], kind="stable")]
    del valid
    if len(order) <= size:
        return order
    ordered = stamps[order]
    first, span = int(ordered[0]), int(ordered[-1]) - int(ordered[0]) + 1
    edges = first + (np.arange(1, strata) * span) // strata
    bounds = np.concatenate(([0], np.searchsorted(ordered, edges, side="left"), [len(order)]))
    del ordered
    capacity = np.diff(bounds)
    quota = _equal_shares(capacity, size)
    picked = []
    for bucket in range(strata):
        if quota[bucket] == 0:
            continue
        rng = np.random.default_rng([seed, bucket])
        chosen = rng.choice(int(capacity[bucket]), size=int(quota[bucket]), replace=False)
        picked.append(bounds[bucket] + np.sort(chosen))
    return order[np.concatenate(picked)]


def _equal_shares(capacity: Any, size: int) -> Any:
    """Split ``size`` into equal integer shares over buckets, capped by each one's capacity."""
    import numpy as np

    quota = np.zeros(len(capacity), dtype=np.int64)
    remaining = min(int(size), int(capacity.sum()))
    while remaining > 0:
        open_buckets = np.flatnonzero(capacity > quota)
        share, extra = divmod(remaining, len(open_buckets))
        for i, bucket in enumerate(open_buckets):
            add = min(int(capacity[bucket] - quota[bucket]), share + (1 if i < extra else 0))
            quota[bucket] += add
            remaining -= add
    return quota


def window_seed(seed: int, window_id: str) -> int:
    """A per-window seed: windows get different samples, a repeated window the same one."""
    digest = hashlib.sha256(window_id.encode()).digest()
    return (seed * 1_000_003 + int.from_bytes(digest[:8], "big")) % (2**63)
