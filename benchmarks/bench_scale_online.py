"""Scale: the online store and materialization at 100k, 1M and 10M entities (curves, not points).

Issue 18, "cost grows linearly and memory stays bounded". Our code only (no Feast), each size
on its own private Redis (the servers run side by side, so that the reads can be interleaved):

- materialization: the offline store of one size (synthetic, written with the package's own
  ``write_partition``) into an empty Redis, in a worker process: wall time, rows/s, the worker's
  peak RSS (``VmHWM``; also its RSS after imports and its peak at the end of the read phase, to
  say where memory goes) and Redis ``used_memory`` afterwards;
- reads of 1 and 100 random entities per request, p50/p99 over thousands of requests per
  (size, batch) case, in blocks taken round robin across every case, so a busy moment on the
  machine weighs on every size alike. Goal: p99 at the largest size within 1.2x of the smallest.

The data set: one view (``usage``, 4 features: 2 ints, 1 float, 1 string), one row per entity
(entity-days = entities), the rows spread over 10 daily partitions. Built per size under
``$AIRMLOPS_BENCH_WORK/airmlops-bench/scale-online-v1`` and removed at the end (``--keep-data``
keeps it for the next run).

Run: ``.venv/bin/python benchmarks/bench_scale_online.py`` (``--quick``: 10k and 100k
entities, fewer requests; ``--sizes 100000,1000000,3000000`` to choose).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import shutil
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

NAME = "scale_online"
PIPELINE = "scale"
DAYS = 10
DATA_DIR = common.WORK_DIR / "scale-online-v1"
SIZES = (100_000, 1_000_000, 10_000_000)
QUICK_SIZES = (10_000, 100_000)
AS_OF = dt.datetime(2026, 1, 1 + DAYS, tzinfo=dt.UTC)  # the day after the last partition
P99_GOAL = 1.2


def usage_view() -> Any:
    """The one view of this benchmark: 4 features of a customer (2 int, 1 float, 1 string)."""
    from airmlops.features.definitions import FeatureView

    return FeatureView.model_validate({
        "name": "usage", "entity": {"name": "customer", "join_key": "customer_id"},
        "source": "profiles", "ttl_days": 30,
        "columns": ["sessions_7d", "tickets_30d", "minutes_7d", "plan"]})


# --- workers (each runs in its own process) --------------------------------------------------


def generate(size: int) -> dict[str, Any]:
    """Write the offline store of ``size`` entities (one row each, over DAYS partitions), once."""
    import numpy as np
    import pandas as pd

    from airmlops.features.offline import write_partition

    root = DATA_DIR / str(size)
    marker = root / ".complete"
    if marker.exists():
        return {"size": size, "cached": True, "seconds": 0.0}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    view = usage_view()
    began = time.perf_counter()
    for day in range(DAYS):
        rng = np.random.default_rng(day)
        ids = np.arange(day, size, DAYS, dtype=np.int64)
        n = len(ids)
        date = common.START + dt.timedelta(days=day)
        stamps = (pd.Timestamp(date, tz="UTC")
                  + pd.to_timedelta(rng.integers(0, 86_400_000_000, n), unit="us"))
        frame = pd.DataFrame({
            "customer_id": ids, "event_timestamp": stamps,
            "usage__sessions_7d": rng.poisson(20, n),
            "usage__tickets_30d": rng.poisson(0.3, n),
            "usage__minutes_7d": np.where(rng.random(n) < 0.03, np.nan, rng.gamma(2, 200, n)),
            "usage__plan": rng.choice(np.array(["basic", "standard", "premium"], dtype=object),
                                      n)})
        write_partition(frame, view, root, PIPELINE, date)
    marker.write_text(json.dumps({"entities": size, "days": DAYS}))
    files = list(root.rglob("*.parquet"))
    return {"size": size, "cached": False, "seconds": time.perf_counter() - began,
            "offline_mb": sum(p.stat().st_size for p in files) / 2**20}


def materialize_worker(size: int, url: str) -> dict[str, Any]:
    """Materialize the whole offline store of ``size`` into the Redis at ``url``; time and
    memory, with the read phase (``_newest_rows``) timed apart from the writes."""
    import numpy  # noqa: F401  (imported before the baseline: it counts imports only)
    import pandas  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    from airmlops.features import materialize as module
    from airmlops.features.online import RedisOnlineStore

    phases: dict[str, float | None] = {}
    newest_rows = module._newest_rows

    def timed_newest_rows(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        answer = newest_rows(*args, **kwargs)
        phases["read_s"] = time.perf_counter() - began
        phases["read_peak_rss_mb"] = common.memory_status_mb("VmHWM")
        return answer

    module._newest_rows = timed_newest_rows  # measurement only: the same function, timed
    store = RedisOnlineStore(url, PIPELINE)
    baseline = common.memory_status_mb("VmRSS")
    began = time.perf_counter()
    done = module.materialize([usage_view()], DATA_DIR / str(size), PIPELINE, store, full=True)
    seconds = time.perf_counter() - began
    store.close()
    result = done["usage"]
    return {"size": size, "seconds": seconds, "rows_read": result.rows_read,
            "rows_written": result.rows_written, "rows_per_s": result.rows_written / seconds,
            "read_s": phases.get("read_s"), "write_s": seconds - (phases.get("read_s") or 0),
            "baseline_rss_mb": baseline, "read_peak_rss_mb": phases.get("read_peak_rss_mb"),
            "vmhwm_mb": common.memory_status_mb("VmHWM")}


def worker(kind: str, args: list[str]) -> int:
    """Run one worker and print its JSON answer as the last line."""
    size = int(args[0])
    answer = generate(size) if kind == "generate" else materialize_worker(size, args[1])
    print(json.dumps(answer), flush=True)
    return 0


# --- reads ---------------------------------------------------------------------------------


def read_cases(urls: dict[int, str], counts: dict[int, int],
               seed: int = 11) -> dict[tuple[int, int], tuple[Any, Any, list[list[int]]]]:
    """(size, entities per request) -> (store, view, batches of random entity ids)."""
    import numpy as np

    from airmlops.features.online import RedisOnlineStore

    cases = {}
    for size, url in urls.items():
        store = RedisOnlineStore(url, PIPELINE)
        for n, count in counts.items():
            rng = np.random.default_rng(seed + size + n)
            cases[(size, n)] = (store, usage_view(), rng.integers(0, size, (count, n)).tolist())
    return cases


def interleaved_reads(cases: dict[tuple[int, int], tuple[Any, Any, list[list[int]]]],
                      blocks: int = 20) -> dict[tuple[int, int], dict[str, Any]]:
    """Time every case's reads in ``blocks`` blocks, the cases' blocks taken round robin."""
    for store, view, batches in cases.values():
        for ids in batches[:100]:  # warm-up
            store.read([view], ids, as_of=AS_OF)
    latencies: dict[tuple[int, int], list[float]] = {key: [] for key in cases}
    found = dict.fromkeys(cases, 0)
    for block in range(blocks):
        for key, (store, view, batches) in cases.items():
            size = math.ceil(len(batches) / blocks)
            for ids in batches[block * size:(block + 1) * size]:
                began = time.perf_counter()
                result = store.read([view], ids, as_of=AS_OF)
                latencies[key].append(time.perf_counter() - began)
                found[key] += sum(not result.is_unknown(e) for e in set(ids))
    return {key: {**common.percentiles_ms(latencies[key]), "requests": len(latencies[key]),
                  "found": found[key]} for key in cases}


# --- the run -------------------------------------------------------------------------------


def redis_info(url: str) -> dict[str, Any]:
    """Keys and memory of the Redis at ``url``."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        memory = client.info("memory")
        return {"keys": client.dbsize(), "used_memory_mb": memory["used_memory"] / 2**20,
                "used_memory_rss_mb": memory["used_memory_rss"] / 2**20}
    finally:
        client.close()


def hmget_usec(url: str) -> float | None:
    """Redis's own time per HMGET (``INFO commandstats``) since the last reset, in us: the
    server's share of a read, apart from the client's and the network's."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats").get("cmdstat_hmget")
        return float(stats["usec_per_call"]) if stats else None
    finally:
        client.close()


def load_sizes(sizes: list[int], stack: ExitStack, timeout: float) -> tuple[dict, dict, dict]:
    """Start one Redis per size, build each offline store and materialize it; returns
    (urls, generation answers, materialization answers with Redis's figures)."""
    urls, built, loaded = {}, {}, {}
    script = str(Path(__file__).resolve())
    for size in sizes:
        built[size] = common.run_worker(script, "generate", str(size), timeout=timeout)
        common.log(f"{size:,} entities: offline store ready "
                   f"({built[size]['seconds']:.1f} s{', cached' if built[size]['cached'] else ''})")
        urls[size] = stack.enter_context(common.redis_server())
        answer = common.run_worker(script, "materialize", str(size), urls[size], timeout=timeout)
        answer.update(redis_info(urls[size]))
        loaded[size] = answer
        common.log(f"{size:,} entities: materialized {answer['rows_written']:,} rows in "
                   f"{answer['seconds']:.1f} s ({answer['rows_per_s']:,.0f} rows/s), peak RSS "
                   f"{answer['vmhwm_mb']:.0f} MB, Redis {answer['used_memory_mb']:.0f} MB")
    return urls, built, loaded


def _reset_stats(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        client.config_resetstat()
    finally:
        client.close()


def fitted_slope(xs: list[float], ys: list[float]) -> float | None:
    """The least-squares slope of log(y) on log(x): 1 is linear, 0 is flat."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if x > 0 and y]
    if len(pairs) < 2:
        return None
    mx = sum(p[0] for p in pairs) / len(pairs)
    my = sum(p[1] for p in pairs) / len(pairs)
    den = sum((p[0] - mx) ** 2 for p in pairs)
    return sum((p[0] - mx) * (p[1] - my) for p in pairs) / den if den else None


def plot(sizes: list[int], loaded: dict[int, dict], reads: dict[tuple[int, int], dict],
         path: Path) -> None:
    """Materialization time, memory and read latency against size, log-log (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.6))
    seconds = [loaded[s]["seconds"] for s in sizes]
    left.plot(sizes, seconds, "o-", label="materialization (total)")
    left.plot(sizes, [loaded[s]["read_s"] for s in sizes], "s--", label="read phase")
    left.plot(sizes, [seconds[0] * s / sizes[0] for s in sizes], ":", color="grey",
              label="linear from the smallest")
    left.set(title="Materialization time", xlabel="entities (rows)", ylabel="seconds")
    middle.plot(sizes, [loaded[s]["vmhwm_mb"] for s in sizes], "o-",
                label="materializer peak RSS")
    middle.plot(sizes, [loaded[s]["baseline_rss_mb"] for s in sizes], ":", color="grey",
                label="materializer RSS after imports")
    middle.plot(sizes, [loaded[s]["used_memory_mb"] for s in sizes], "s-",
                label="Redis used_memory")
    middle.set(title="Memory", xlabel="entities (rows)", ylabel="MB")
    for n, marker in ((1, "o"), (100, "s")):
        for q, style in (("p50", "-"), ("p99", "--")):
            right.plot(sizes, [reads[(s, n)][q] for s in sizes], marker + style,
                       label=f"{n} entit{'y' if n == 1 else 'ies'} {q}")
    right.set(title="Online read latency", xlabel="entities loaded", ylabel="ms")
    for axes in (left, middle, right):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def report(sizes: list[int], built: dict, loaded: dict, reads: dict, counts: dict[int, int],
           load: tuple[float, float]) -> None:
    """Tables, notes, the JSON/markdown results and the plot."""
    smallest, largest = sizes[0], sizes[-1]
    mat_rows = [[s, loaded[s]["rows_written"], loaded[s]["seconds"], loaded[s]["read_s"],
                 loaded[s]["write_s"], loaded[s]["rows_per_s"], loaded[s]["baseline_rss_mb"],
                 loaded[s]["read_peak_rss_mb"], loaded[s]["vmhwm_mb"],
                 loaded[s]["used_memory_mb"], loaded[s]["used_memory_mb"] * 2**20 / s]
                for s in sizes]
    read_rows, goal_rows = [], []
    for n in counts:
        for s in sizes:
            r = reads[(s, n)]
            read_rows.append([f"{n} entit{'y' if n == 1 else 'ies'}", s, r["p50"], r["p90"],
                              r["p99"], r["max"], r["requests"], r["found"],
                              r["redis_usec_per_hmget"]])
        ratio = reads[(largest, n)]["p99"] / reads[(smallest, n)]["p99"]
        goal_rows.append([f"read p99, {n} entit{'y' if n == 1 else 'ies'}",
                          f"{ratio:.2f}x", ratio <= P99_GOAL])
    xs = [float(s) for s in sizes]
    slopes = {"materialize_seconds": fitted_slope(xs, [loaded[s]["seconds"] for s in sizes]),
              "materialize_peak_rss_above_baseline": fitted_slope(
                  xs, [loaded[s]["vmhwm_mb"] - loaded[s]["baseline_rss_mb"] for s in sizes]),
              "redis_used_memory": fitted_slope(xs, [loaded[s]["used_memory_mb"] for s in sizes])}
    slope_rows = [[k, v] for k, v in slopes.items()]
    results = {"sizes": sizes, "days": DAYS, "view": "usage (4 features)", "requests": counts,
               "generate": {str(s): built[s] for s in sizes},
               "materialize": {str(s): loaded[s] for s in sizes},
               "reads": [{"size": s, "entities": n, **reads[(s, n)]} for n in counts
                         for s in sizes],
               "slopes_log_log": slopes, "load_average_1m_5m_before": load}
    results["p99_ratio"] = {str(n): reads[(largest, n)]["p99"] / reads[(smallest, n)]["p99"]
                            for n in counts}
    common.write_results(NAME, "Scale: online store and materialization vs size (Redis)",
                         results, [
        ("Materialization (whole offline store into an empty Redis; MB, seconds)",
         ["entities", "rows written", "seconds", "read phase s", "write phase s", "rows/s",
          "RSS after imports", "peak RSS after read phase", "peak RSS", "Redis used_memory",
          "Redis bytes/entity"], mat_rows),
        ("Online reads (ms), interleaved blocks across every size",
         ["request", "entities loaded", "p50", "p90", "p99", "max", "requests", "found",
          "Redis us/HMGET (all reads of that size)"],
         read_rows),
        ("Log-log slopes (1 = linear in size, 0 = flat)", ["measure", "slope"], slope_rows),
        (f"Goal: p99 at {largest:,} within {P99_GOAL}x of p99 at {smallest:,}",
         ["measure", "ratio", "met"], goal_rows)],
        notes=[f"One view, 4 features (2 int, 1 float, 1 string); one row per entity over "
               f"{DAYS} daily Parquet partitions (entity-days = entities); each size on its own "
               "redis-server (persistence off), all loaded before the reads start.",
               "peak RSS = the materializing worker's VmHWM (Python, pandas, pyarrow, redis-py "
               "imported); 'after read phase' = its VmHWM when materialize's _newest_rows "
               "returned (every chosen row as one pandas frame), before any Redis write.",
               f"{counts[1]:,} / {counts[100]:,} requests of 1 / 100 random entities per size, "
               "20 blocks per case taken round robin across all cases; 100 warm-up requests.",
               f"load average (1 / 5 min) before the run: {load[0]:.2f} / {load[1]:.2f} "
               "(2 cores shared with other work)."])
    plot(sizes, loaded, reads, common.RESULTS_DIR / f"{NAME}.png")
    common.log(f"plot written to {common.RESULTS_DIR / f'{NAME}.png'}")


def main() -> int:
    """Parse the options, load every size, read interleaved, report."""
    import os

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k and 100k entities (a smoke run)")
    parser.add_argument("--sizes", help="comma-separated entity counts (default 100k,1M,10M)")
    parser.add_argument("--keep-data", action="store_true", help="keep the offline stores")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        return worker(args.worker, rest)
    sizes = sorted(int(s) for s in args.sizes.split(",")) if args.sizes else list(
        QUICK_SIZES if args.quick else SIZES)
    counts = {1: 2000, 100: 400} if args.quick else {1: 10_000, 100: 2000}
    load = os.getloadavg()[:2]
    try:
        with ExitStack() as stack:
            urls, built, loaded = load_sizes(sizes, stack, timeout=900)
            cases = read_cases(urls, counts)
            common.log(f"reading: {len(cases)} cases, {sum(counts.values())} requests each")
            for url in urls.values():
                _reset_stats(url)
            reads = interleaved_reads(cases)
            for (size, _), figures in reads.items():
                figures["redis_usec_per_hmget"] = hmget_usec(urls[size])
            for store in {id(c[0]): c[0] for c in cases.values()}.values():
                store.close()
    finally:
        if not args.keep_data:
            shutil.rmtree(DATA_DIR, ignore_errors=True)
    report(sizes, built, loaded, reads, counts, load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
