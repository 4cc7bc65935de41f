"""Benchmark 2: online features and materialization, airmlops on Redis vs Feast 0.67 on Redis.

The same data set for both (``common.feature_data_root``: 3 views, 14 features, 2 on-demand
features, 100k customers, 30 days), the same Redis server (ours in db 0, Feast's in db 1), the
same random entity batches:

- materialization: the whole offline history into an empty online store (the newest row per
  entity and view: 300k rows), rows written per second;
- reads of 1 and 100 entities, with and without the on-demand features, p50/p99 over thousands
  of requests (in blocks, the cases' blocks interleaved), and Redis round trips per request
  (socket writes of redis-py, counted the same way in both processes);
- the floor: the same reads as one raw redis-py pipeline of HMGETs (no decoding, no assembly);
- a cross-check that both return the same 16 values for 200 random customers.

Run: ``.venv/bin/python benchmarks/bench_online.py`` (``--quick`` for fewer requests).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

ROUND_TRIPS = {"count": 0}


def count_round_trips() -> None:
    """Count redis-py socket writes (one per pipeline or plain command), like the Feast worker."""
    import redis.connection

    original = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        ROUND_TRIPS["count"] += 1
        return original(self, *args, **kwargs)

    redis.connection.AbstractConnection.send_packed_command = counted


def entity_batches(size: int, count: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return rng.integers(0, common.CUSTOMERS, (count, size)).tolist()


def reader(store: Any, views: list, on_demand: list, with_on_demand: bool,
           as_of: dt.datetime) -> Any:
    """One airmlops read (and the on-demand features) of a batch of entities."""
    from airmlops.features.on_demand import apply_on_demand

    def once(ids: list[int]) -> Any:
        result = store.read(views, ids, as_of=as_of)
        if with_on_demand:
            rows = [{**result.values[e], "event_timestamp": as_of} for e in ids]
            return apply_on_demand(rows, on_demand)
        return result

    return once


def floor_reader(client: Any, views: list) -> Any:
    """The floor: one redis-py pipeline of HMGET (the view's fields + __ts) per view and
    entity, nothing decoded."""
    fields = {v.name: [*v.feature_names, "__ts"] for v in views}

    def once(ids: list[int]) -> Any:
        pipe = client.pipeline(transaction=False)
        for view in views:
            for entity in ids:
                pipe.hmget(f"airmlops:{common.PIPELINE}:{view.name}:{entity}", fields[view.name])
        return pipe.execute()

    return once


def interleaved(calls: dict[Any, tuple[Any, list[list[int]]]],
                blocks: int = 10) -> dict[Any, dict[str, Any]]:
    """Time every call on its batches in ``blocks`` blocks per case, the cases' blocks taken
    round robin: steady state within a block, and a busy moment on the machine weighs on every
    case alike."""
    for function, batches in calls.values():
        for ids in batches[:50]:  # warm-up
            function(ids)
    latencies: dict[Any, list[float]] = {key: [] for key in calls}
    trips = dict.fromkeys(calls, 0)
    for block in range(blocks):
        for key, (function, batches) in calls.items():
            size = math.ceil(len(batches) / blocks)
            for ids in batches[block * size:(block + 1) * size]:
                before = ROUND_TRIPS["count"]
                began = time.perf_counter()
                function(ids)
                latencies[key].append(time.perf_counter() - began)
                trips[key] += ROUND_TRIPS["count"] - before
    return {key: {"latencies_s": latencies[key],
                  "round_trips_per_request": trips[key] / len(latencies[key])} for key in calls}


def same(a: Any, b: Any) -> bool:
    if a is None or (isinstance(a, float) and math.isnan(a)):
        return b is None or (isinstance(b, float) and math.isnan(b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    return a == b


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0

    import redis

    from airmlops.features.materialize import materialize
    from airmlops.features.online import RedisOnlineStore

    fs = common.feature_set()
    views, on_demand = list(fs.views), list(fs.on_demand)
    root = common.feature_data_root()
    feast_spec = common.feast_spec(root)
    feast_python = common.ensure_feast_venv()
    as_of = dt.datetime(2026, 1, 31, tzinfo=dt.UTC)  # the day after the last partition
    counts = {1: int(5000 * scale), 100: int(1000 * scale)}
    feast_counts = {1: int(2000 * scale), 100: int(300 * scale)}
    batches = {n: entity_batches(n, counts[n], seed=n) for n in counts}
    check_ids = entity_batches(200, 1, seed=7)[0]
    results: dict[str, Any] = {"customers": common.CUSTOMERS, "views": len(views),
                               "features": sum(len(v.feature_names) for v in views),
                               "on_demand": len(on_demand), "feast": common.feast_version(
                                   feast_python), "requests": counts,
                               "feast_requests": feast_counts}
    with common.redis_server() as url:
        count_round_trips()
        # --- materialization ----------------------------------------------------------------
        store = RedisOnlineStore(url, common.PIPELINE)
        began = time.perf_counter()
        done = materialize(views, root, common.PIPELINE, store, full=True)
        seconds = time.perf_counter() - began
        written = sum(r.rows_written for r in done.values())
        results["ours_materialize"] = {"seconds": seconds, "rows_written": written,
                                       "rows_read": sum(r.rows_read for r in done.values()),
                                       "rows_per_s": written / seconds}
        common.log(f"ours: materialized {written} rows in {seconds:.1f} s")
        port = url.split(":")[2].split("/")[0]
        feast_args = {"spec": feast_spec, "repo": str(common.WORK_DIR / "feast-online-repo"),
                      "redis": f"127.0.0.1:{port},db=1"}
        import shutil

        shutil.rmtree(feast_args["repo"], ignore_errors=True)
        feast_mat = common.run_feast(feast_python, "materialize", {
            **feast_args, "start": "2025-11-01T00:00:00+00:00",
            "end": as_of.isoformat()})
        results["feast_materialize"] = feast_mat
        common.log(f"feast: materialized {feast_mat['rows_written']} rows in "
                   f"{feast_mat['seconds']:.1f} s")

        # --- reads ----------------------------------------------------------------------------
        cases = [(n, od) for n in (1, 100) for od in (False, True)]
        client = redis.Redis.from_url(url)
        calls = {("ours", n, od): (reader(store, views, on_demand, od, as_of), batches[n])
                 for n, od in cases}
        calls.update({("floor", n, False): (floor_reader(client, views), batches[n])
                      for n in (1, 100)})
        timed = interleaved(calls)
        client.close()
        ours_reads = {(n, od): timed[("ours", n, od)] for n, od in cases}
        floor_reads = {n: timed[("floor", n, False)] for n in (1, 100)}
        for n, od in cases:
            common.log(f"ours {n} entities on-demand={od}: p50 "
                       f"{common.percentiles_ms(ours_reads[(n, od)]['latencies_s'])['p50']:.3f} ms")
        fields = {v.name: [*v.feature_names, "__ts"] for v in views}
        hiredis = common.run_feast(feast_python, "floor", {"url": url, "cases": [
            {"views": fields, "prefix": f"airmlops:{common.PIPELINE}",
             "entity_batches": batches[n]} for n in (1, 100)]})
        hiredis_reads = {c["entities"]: c for c in hiredis["cases"]}
        results["hiredis_in_bench_venv"] = hiredis["hiredis"]
        import redis.utils

        results["hiredis_in_project_venv"] = bool(redis.utils.HIREDIS_AVAILABLE)
        feast_online = common.run_feast(feast_python, "online", {
            **feast_args,
            "cases": [{"on_demand": od, "entity_batches": batches[n][: feast_counts[n]]}
                      for n, od in cases],
            "max_seconds": 240,
            "check_entities": check_ids}, timeout=900)
        feast_reads = {(c["entities"], c["on_demand"]): c for c in feast_online["cases"]}

        # --- same values? ---------------------------------------------------------------------
        from airmlops.features.on_demand import apply_on_demand

        read = store.read(views, check_ids, as_of=as_of)
        rows = apply_on_demand([{**read.values[e], "event_timestamp": as_of} for e in check_ids],
                               on_demand)
        theirs = feast_online["check"]
        names = fs.feature_names
        mismatches = sum(not same(row[name], theirs[name][i])
                         for i, row in enumerate(rows) for name in names)
        results["cross_check"] = {"entities": len(check_ids), "values": len(check_ids) *
                                  len(names), "mismatches": mismatches}
        store.close()
        redis.Redis.from_url(url).close()

    # --- tables -----------------------------------------------------------------------------
    read_rows, goal_rows = [], []
    results["reads"] = []
    for n, od in cases:
        ours = common.percentiles_ms(ours_reads[(n, od)]["latencies_s"])
        feast = common.percentiles_ms(feast_reads[(n, od)]["latencies_s"])
        plain = common.percentiles_ms(floor_reads[n]["latencies_s"])
        fast = common.percentiles_ms(hiredis_reads[n]["latencies_s"])
        floor = fast if fast["p50"] <= plain["p50"] else plain
        entry = {"entities": n, "on_demand": od, "ours": ours, "feast": feast,
                 "floor_redis_py": plain, "floor_hiredis": fast, "floor": floor,
                 "ours_round_trips": ours_reads[(n, od)]["round_trips_per_request"],
                 "feast_round_trips": feast_reads[(n, od)]["round_trips_per_request"],
                 "floor_round_trips": floor_reads[n]["round_trips_per_request"],
                 "ours_requests": len(ours_reads[(n, od)]["latencies_s"]),
                 "feast_requests": len(feast_reads[(n, od)]["latencies_s"]),
                 "speedup_p50": feast["p50"] / ours["p50"],
                 "speedup_p99": feast["p99"] / ours["p99"],
                 "vs_floor_p50": ours["p50"] / floor["p50"]}
        results["reads"].append(entry)
        label = f"{n} entit{'y' if n == 1 else 'ies'}{' + on-demand' if od else ''}"
        read_rows.append([label, ours["p50"], ours["p99"], feast["p50"], feast["p99"],
                          plain["p50"], plain["p99"], fast["p50"], fast["p99"],
                          entry["ours_round_trips"], entry["feast_round_trips"]])
        goal_rows.append([label, f"{entry['speedup_p50']:.1f}x / {entry['speedup_p99']:.1f}x",
                          f"{entry['vs_floor_p50']:.2f}x",
                          entry["speedup_p50"] >= 5 and entry["speedup_p99"] >= 5,
                          entry["vs_floor_p50"] <= 2])
    ours_m, feast_m = results["ours_materialize"], results["feast_materialize"]
    results["materialize_speedup"] = ours_m["rows_per_s"] / feast_m["rows_per_s"]
    mat_rows = [["airmlops (Redis, Lua upsert-if-newer)", ours_m["rows_written"], ours_m["seconds"],
                 ours_m["rows_per_s"]],
                [f"Feast {results['feast']} (Redis)", feast_m["rows_written"], feast_m["seconds"],
                 feast_m["rows_per_s"]]]
    goal_rows.append(["materialization", f"{results['materialize_speedup']:.1f}x", "-",
                      results["materialize_speedup"] >= 5, None])
    check = results["cross_check"]
    common.write_results(
        "online", "2. Online features and materialization (Redis)", results,
        [("Reads (ms; round trips per request)",
          ["request", "ours p50", "ours p99", "Feast p50", "Feast p99", "floor p50", "floor p99",
           "floor (bench venv) p50", "floor (bench venv) p99", "ours RT", "Feast RT"], read_rows),
         ("Materialization (whole history into an empty store)",
          ["store", "rows written", "seconds", "rows/s"], mat_rows),
         ("Goals: >= 5x Feast, within 2x of the raw redis-py floor (the faster of the two)",
          ["measure", "vs Feast (p50 / p99)", "ours / floor (p50)", ">= 5x Feast",
           "<= 2x floor"], goal_rows)],
        notes=[f"{common.CUSTOMERS:,} customers, 3 views, 14 features, 2 on-demand features; "
               f"ours {counts[1]:,} / {counts[100]:,} requests of 1 / 100 entities per case, "
               f"Feast {feast_counts[1]:,} / {feast_counts[100]:,}.",
               "floor = one raw redis-py pipeline of HMGETs for the same keys and fields, "
               "without decoding or assembling the values, in the project's venv; floor (bench "
               "venv) = the same with Feast's venv's redis-py.",
               f"cross-check: {check['mismatches']} of {check['values']:,} values differ between "
               f"ours and Feast ({check['entities']} customers, 16 features each).",
               f"hiredis (redis-py's C reply parser) in both venvs: ours "
               f"{results['hiredis_in_project_venv']}, Feast's {results['hiredis_in_bench_venv']}."
               ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
