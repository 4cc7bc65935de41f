"""Benchmark 3: a point-in-time training set for 1M entity rows.

airmlops' ``get_historical_features`` against Feast 0.67's ``get_historical_features`` with its
file offline store (Dask) and with its DuckDB offline store, and a plain pandas ``merge_asof``
as a reference point, all on the same offline data (``common.feature_data_root``: 3 views of
3M rows each, 14 features) plus the 2 on-demand features. Each contender runs in its own
process: time is the retrieval call itself (to a pandas DataFrame), peak memory is the process's
maximum resident set (``wait4``), so imports and the loaded entity frame count for everyone.

Correctness: every entity row carries a ``row_id``; each result is joined to ours on it and the
16 feature values compared one by one (missing = missing; numbers equal within 1e-9 relative).
Rows lost = entity rows absent from a result.

Run: ``.venv/bin/python benchmarks/bench_pit.py`` (``--rows N`` for another size).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def entity_frame(rows: int, path: Path) -> Path:
    """``rows`` (customer, time) pairs, some customers unknown, times over the last 28 days."""
    if path.exists():
        return path
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(1)
    frame = pd.DataFrame({
        "row_id": np.arange(rows, dtype=np.int64),
        "customer_id": rng.integers(0, common.CUSTOMERS + 1000, rows),
        "event_timestamp": pd.Timestamp("2026-01-03", tz="UTC")
        + pd.to_timedelta(rng.integers(0, 28 * 86_400, rows), unit="s"),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return path


# --- workers (each in its own process) -------------------------------------------------------


def worker_ours(entity_path: str, out_path: str) -> dict[str, Any]:
    import pandas as pd

    from airmlops.features.offline import get_historical_features

    fs = common.feature_set()
    entity_df = pd.read_parquet(entity_path)
    baseline = common.memory_status_mb()
    began = time.perf_counter()
    frame = get_historical_features(entity_df, fs.views, common.feature_data_root(),
                                    common.PIPELINE, on_demand=fs.on_demand)
    seconds = time.perf_counter() - began
    frame.to_parquet(out_path)
    return {"seconds": seconds, "rows": len(frame), "baseline_rss_mb": baseline}


def worker_pandas(entity_path: str, out_path: str) -> dict[str, Any]:
    """A plain ``merge_asof`` per view (newest row at or before the time, within the TTL)."""
    import numpy as np
    import pandas as pd

    from airmlops.features.offline import read_view_rows
    from airmlops.features.on_demand import apply_on_demand

    fs = common.feature_set()
    entity_df = pd.read_parquet(entity_path)
    baseline = common.memory_status_mb()
    began = time.perf_counter()
    result = entity_df.astype({"event_timestamp": "datetime64[us, UTC]"})
    result = result.sort_values("event_timestamp", kind="stable")
    for view in fs.views:
        rows = read_view_rows(view, common.feature_data_root(), common.PIPELINE)
        rows = rows.rename(columns={"event_timestamp": "_feature_ts"}).sort_values("_feature_ts")
        rows["_feature_ts"] = rows["_feature_ts"].astype("datetime64[us, UTC]")
        result = pd.merge_asof(result, rows, left_on="event_timestamp", right_on="_feature_ts",
                               by="customer_id", direction="backward",
                               tolerance=pd.Timedelta(days=view.ttl_days))
        result = result.drop(columns="_feature_ts")
    result = apply_on_demand(result, fs.on_demand)
    result = result.sort_values("row_id")
    seconds = time.perf_counter() - began
    result.reset_index(drop=True).to_parquet(out_path)
    del np
    return {"seconds": seconds, "rows": len(result), "baseline_rss_mb": baseline}


# --- comparison ------------------------------------------------------------------------------


def compare(ours_path: Path, other_path: Path, names: list[str], rows: int) -> dict[str, Any]:
    """Rows lost and values that differ, joined on ``row_id``."""
    import numpy as np
    import pandas as pd

    ours = pd.read_parquet(ours_path, columns=["row_id", *names]).set_index("row_id")
    other = pd.read_parquet(other_path, columns=["row_id", *names])
    duplicated = int(other["row_id"].duplicated().sum())
    other = other.drop_duplicates("row_id").set_index("row_id")
    common_ids = ours.index.intersection(other.index)
    a, b = ours.loc[common_ids], other.loc[common_ids]
    differing_rows = np.zeros(len(common_ids), dtype=bool)
    per_feature = {}
    for name in names:
        left, right = a[name], b[name]
        if left.dtype == object or right.dtype == object:
            la = left.astype(object).where(left.notna(), None).to_numpy()
            ra = right.astype(object).where(right.notna(), None).to_numpy()
            bad = la != ra
        else:
            la, ra = left.to_numpy(dtype="float64"), right.to_numpy(dtype="float64")
            both_nan = np.isnan(la) & np.isnan(ra)
            close = np.isclose(la, ra, rtol=1e-9, atol=0.0)
            bad = ~(both_nan | close)
        per_feature[name] = int(bad.sum())
        differing_rows |= bad
    lost = ours.index.difference(other.index)
    entities = pd.read_parquet(ours_path, columns=["row_id", "customer_id", "event_timestamp"])
    repeated = entities.duplicated(["customer_id", "event_timestamp"], keep=False)
    lost_repeated = int(entities.loc[repeated, "row_id"].isin(lost).sum())
    return {"rows": len(other) + duplicated, "rows_lost": rows - len(common_ids),
            "rows_lost_repeating_an_entity_and_time": lost_repeated,
            "duplicated_rows": duplicated, "values_compared": len(common_ids) * len(names),
            "values_differing": int(sum(per_feature.values())),
            "rows_differing": int(differing_rows.sum()),
            "differing_by_feature": {k: v for k, v in per_feature.items() if v}}


def run_worker(kind: str, entity_path: Path, out_path: Path) -> dict[str, Any]:
    return common.run_worker(__file__, kind, str(entity_path), str(out_path))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--feast-timeout", type=float, default=420.0,
                        help="seconds after which a Feast retrieval is stopped and reported")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "ENTITIES", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, entity_path, out_path = args.worker
        handler = {"ours": worker_ours, "pandas": worker_pandas}[kind]
        answer = handler(entity_path, out_path)
        answer["vmhwm_mb"] = common.memory_status_mb()
        print(json.dumps(answer), flush=True)
        return 0

    root = common.feature_data_root()
    feast_spec = common.feast_spec(root)
    feast_python = common.ensure_feast_venv()
    work = common.WORK_DIR / "pit"
    work.mkdir(parents=True, exist_ok=True)
    entity_path = entity_frame(args.rows, work / f"entities-{args.rows}.parquet")
    names = common.feature_set().feature_names
    contenders: dict[str, dict[str, Any]] = {}
    outputs = {}
    for kind in ("ours", "pandas"):
        outputs[kind] = work / f"{kind}.parquet"
        contenders[kind] = run_worker(kind, entity_path, outputs[kind])
        common.log(f"{kind}: {contenders[kind]['seconds']:.2f} s, peak "
                   f"{contenders[kind]['_process']['peak_rss_mb']:.0f} MB")
    for store in ("file", "duckdb"):
        kind = f"feast_{store}"
        outputs[kind] = work / f"{kind}.parquet"
        repo = common.WORK_DIR / f"feast-pit-{store}"
        import shutil

        shutil.rmtree(repo, ignore_errors=True)
        contenders[kind] = common.run_feast(feast_python, "historical", {
            "spec": feast_spec, "repo": str(repo), "offline": store,
            "entity_path": str(entity_path), "out_path": str(outputs[kind])},
            timeout=args.feast_timeout)
        if contenders[kind].get("timed_out"):
            common.log(f"{kind}: stopped after {args.feast_timeout:.0f} s")
            continue
        common.log(f"{kind}: {contenders[kind]['seconds']:.2f} s, peak "
                   f"{contenders[kind]['_process']['peak_rss_mb']:.0f} MB")
    for kind in contenders:
        contenders[kind]["vs_ours"] = (
            None if kind == "ours" or contenders[kind].get("timed_out")
            else compare(outputs["ours"], outputs[kind], names, args.rows))

    labels = {"ours": "airmlops get_historical_features", "pandas": "pandas merge_asof (reference)",
              "feast_file": f"Feast {common.feast_version(feast_python)} file store (Dask)",
              "feast_duckdb": f"Feast {common.feast_version(feast_python)} DuckDB store"}
    rows = []
    for kind in ("ours", "pandas", "feast_file", "feast_duckdb"):
        c = contenders[kind]
        if c.get("timed_out"):
            rows.append([labels[kind], f"> {c['timeout_s']:.0f} (stopped)",
                         c["_process"]["peak_rss_mb"], None, None, None, None])
            continue
        check = c["vs_ours"] or {"rows": c["rows"], "rows_lost": args.rows - c["rows"],
                                 "values_differing": 0, "rows_differing": 0}
        rows.append([labels[kind], c["seconds"], c["_process"]["peak_rss_mb"],
                     c["_process"]["peak_rss_mb"] - c["baseline_rss_mb"], check["rows"],
                     check["rows_lost"], "-" if kind == "ours" else check["rows_differing"]])
    ours, duck = contenders["ours"], contenders["feast_duckdb"]
    duck_seconds = math.inf if duck.get("timed_out") else duck["seconds"]
    goal = [["faster than Feast's DuckDB store", f"{duck_seconds / ours['seconds']:.1f}x",
             ours["seconds"] < duck_seconds],
            ["no row lost", ours["rows"], ours["rows"] == args.rows]]
    def repeats(kind: str) -> int:
        return contenders[kind]["vs_ours"]["rows_lost_repeating_an_entity_and_time"]

    results = {"entity_rows": args.rows, "features": len(names), "contenders": contenders}
    common.write_results(
        "pit", f"3. Point-in-time training set ({args.rows:,} entity rows)", results,
        [("", ["retrieval", "seconds", "peak RSS MB", "peak - baseline MB", "rows out",
               "rows lost", "rows differing from ours"], rows),
         ("Goals", ["goal", "measured", "met"], goal)],
        notes=["3 views x 3M stored rows (14 features) + 2 on-demand features; time = the "
               "retrieval call to a pandas DataFrame; peak RSS = the whole process (imports, "
               "entity frame, result), baseline = RSS before the call.",
               "rows differing = rows present in both whose 16 values are not all equal "
               "(missing = missing, numbers within 1e-9 relative).",
               "rows lost by Feast that repeat another entity row's (customer, time): "
               + (", ".join(f"{labels[k]} {repeats(k)} of {contenders[k]['vs_ours']['rows_lost']}"
                            for k in contenders
                            if k.startswith("feast") and contenders[k].get("vs_ours"))
                  or "-") + " (the entity frame has such pairs with distinct row ids).",
               f"a Feast retrieval still running after {args.feast_timeout:.0f} s is stopped "
               "(the suite has a 30-minute budget); its peak is the peak until then."])
    return 0


if __name__ == "__main__":
    sys.exit(main())
