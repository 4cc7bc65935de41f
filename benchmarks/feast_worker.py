"""The Feast side of benchmarks 2 and 3; runs inside ``benchmarks/.venv-feast`` only.

``python feast_worker.py <command> '<json args>'`` (or ``@<file with the json>``) prints one
JSON line. Data comes in and goes
out as Parquet files; nothing from the airmlops package is imported (Feast's pins conflict
with ours). Commands:

- ``materialize``: apply the definitions, time ``FeatureStore.materialize`` over the whole
  history into Redis.
- ``online``: time ``get_online_features`` for the given entity lists (with or without the
  on-demand feature view), count Redis round trips, dump some values for a cross-check.
- ``floor``: the raw redis-py floor of the airmlops reads, with hiredis (this venv has it).
- ``historical``: time ``get_historical_features(...).to_df()`` on an entity Parquet file with
  the file or the DuckDB offline store; write the result to Parquet.

The definitions mirror the airmlops ones exactly (see ``common.feast_spec``): one entity, one
FileSource-backed FeatureView per view with the same TTL, and one python-mode on-demand feature
view computing both on-demand features with the same null rules.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROUND_TRIPS = {"count": 0}


def _count_round_trips() -> None:
    """Count socket writes of redis-py: one per pipeline execute or plain command."""
    import redis.connection

    original = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        ROUND_TRIPS["count"] += 1
        return original(self, *args, **kwargs)

    redis.connection.AbstractConnection.send_packed_command = counted


def build_store(args: dict[str, Any]) -> tuple[Any, list[str], list[str]]:
    """The FeatureStore, the view feature references and the on-demand references."""
    from feast import (
        Entity,
        FeatureStore,
        FeatureView,
        Field,
        FileSource,
        RepoConfig,
        ValueType,
    )
    from feast.infra.online_stores.redis import RedisOnlineStoreConfig
    from feast.on_demand_feature_view import on_demand_feature_view
    from feast.types import Float64, Int64, String

    spec = args["spec"]
    repo = Path(args["repo"])
    repo.mkdir(parents=True, exist_ok=True)
    if args.get("offline", "file") == "duckdb":
        from feast.infra.offline_stores.duckdb import DuckDBOfflineStoreConfig

        offline = DuckDBOfflineStoreConfig()
    else:
        from feast.infra.offline_stores.dask import DaskOfflineStoreConfig

        offline = DaskOfflineStoreConfig()
    online = RedisOnlineStoreConfig(connection_string=args.get("redis", "127.0.0.1:6379"))
    config = RepoConfig(project="bench", provider="local", registry=str(repo / "registry.db"),
                        online_store=online, offline_store=offline, repo_path=repo,
                        entity_key_serialization_version=3)
    store = FeatureStore(config=config)
    types = {"Float64": Float64, "Int64": Int64, "String": String}
    entity = Entity(name=spec["entity"], join_keys=[spec["join_key"]], value_type=ValueType.INT64)
    views = {}
    for view in spec["views"]:
        views[view["name"]] = FeatureView(
            name=view["name"], entities=[entity], ttl=timedelta(days=view["ttl_days"]),
            schema=[Field(name=f["name"], dtype=types[f["dtype"]]) for f in view["fields"]],
            source=FileSource(name=f"{view['name']}_source", path=view["path"],
                              timestamp_field="event_timestamp"),
            online=True,
        )
    # Feast re-creates the udf from its source text, so it is self-contained: the inputs are
    # spelled out (checked against the spec here) and the null rule is inlined.
    expected = {"minutes_per_session": ["activity__minutes_watched_sum_7d",
                                        "activity__sessions_sum_7d"],
                "fee_per_minute": ["profile__monthly_fee", "activity__minutes_watched_sum_30d"]}
    if {f["name"]: f["inputs"] for f in spec["on_demand"]} != expected:
        raise ValueError(f"the Feast on-demand view is written for {expected}")

    @on_demand_feature_view(
        name="on_demand", sources=[views["activity"], views["profile"]],
        schema=[Field(name="minutes_per_session", dtype=Float64),
                Field(name="fee_per_minute", dtype=Float64)],
        mode="python",
    )
    def on_demand(inputs: dict[str, Any]) -> dict[str, Any]:
        def divide(a: Any, b: Any) -> Any:
            if a is None or b is None:
                return None
            a, b = float(a), float(b)
            if a != a or b != b or b == 0.0:
                return None
            return a / b

        return {
            "minutes_per_session": [divide(a, b) for a, b in zip(
                inputs["minutes_watched_sum_7d"], inputs["sessions_sum_7d"], strict=True)],
            "fee_per_minute": [divide(a, b) for a, b in zip(
                inputs["monthly_fee"], inputs["minutes_watched_sum_30d"], strict=True)],
        }

    store.apply([entity, *views.values(), on_demand])
    refs = [f"{v['name']}:{f['name']}" for v in spec["views"] for f in v["fields"]]
    on_demand_refs = ["on_demand:minutes_per_session", "on_demand:fee_per_minute"]
    return store, refs, on_demand_refs


def _our_names(spec: dict[str, Any]) -> dict[str, str]:
    """Feast's short feature names (unique here, so no full names are asked for) -> ours.

    Full names would oblige a python-mode on-demand udf to return prefixed keys."""
    return {f["name"]: f"{v['name']}__{f['name']}" for v in spec["views"] for f in v["fields"]}


def materialize(args: dict[str, Any]) -> dict[str, Any]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    store, _, _ = build_store(args)
    start = datetime.fromisoformat(args["start"])
    end = datetime.fromisoformat(args["end"])
    rows = 0
    for view in args["spec"]["views"]:  # what materialize writes: the newest row per entity
        table = pq.read_table(view["path"], columns=[args["spec"]["join_key"]])
        rows += len(pc.unique(table.column(0)))
    began = time.perf_counter()
    store.materialize(start_date=start, end_date=end)
    seconds = time.perf_counter() - began
    return {"seconds": seconds, "rows_written": rows, "rows_per_s": rows / seconds}


def online(args: dict[str, Any]) -> dict[str, Any]:
    store, refs, on_demand_refs = build_store(args)
    _count_round_trips()
    key = args["spec"]["join_key"]
    out: dict[str, Any] = {"cases": []}
    cases = args["cases"]
    features = [refs + (on_demand_refs if case["on_demand"] else []) for case in cases]

    def once(index: int, ids: list[int]) -> None:
        store.get_online_features(features=features[index], entity_rows=[{key: i} for i in ids],
                                  full_feature_names=False).to_dict()

    for index, case in enumerate(cases):  # warm-up: connections, caches
        for ids in case["entity_batches"][:20]:
            once(index, ids)
    latencies: list[list[float]] = [[] for _ in cases]
    trips = [0] * len(cases)
    deadline = time.monotonic() + args.get("max_seconds", 240)
    blocks = args.get("blocks", 10)
    # The cases' blocks taken round robin, like the airmlops side.
    for block in range(blocks):
        for index, case in enumerate(cases):
            size = -(-len(case["entity_batches"]) // blocks)
            for ids in case["entity_batches"][block * size:(block + 1) * size]:
                before = ROUND_TRIPS["count"]
                began = time.perf_counter()
                once(index, ids)
                latencies[index].append(time.perf_counter() - began)
                trips[index] += ROUND_TRIPS["count"] - before
        if time.monotonic() > deadline:
            break
    for index, case in enumerate(cases):
        out["cases"].append({"entities": len(case["entity_batches"][0]),
                             "on_demand": case["on_demand"], "latencies_s": latencies[index],
                             "round_trips_per_request": trips[index] / len(latencies[index])})
    check = args.get("check_entities") or []
    if check:
        answer = store.get_online_features(features=refs + on_demand_refs,
                                           entity_rows=[{key: i} for i in check],
                                           full_feature_names=False).to_dict()
        names = _our_names(args["spec"])
        out["check"] = {names.get(name, name): values for name, values in answer.items()}
    return out


def floor(args: dict[str, Any]) -> dict[str, Any]:
    """The raw floor with this venv's redis-py (hiredis parser): one pipeline of HMGETs of the
    airmlops keys (view fields + ``__ts``) per request, nothing decoded."""
    import redis

    _count_round_trips()
    client = redis.Redis.from_url(args["url"])
    out: dict[str, Any] = {"cases": [], "hiredis": bool(getattr(
        redis.utils, "HIREDIS_AVAILABLE", False))}
    for case in args["cases"]:
        def once(ids: list[int], case: dict[str, Any] = case) -> Any:
            pipe = client.pipeline(transaction=False)
            for view, fields in case["views"].items():
                for entity in ids:
                    pipe.hmget(f"{case['prefix']}:{view}:{entity}", fields)
            return pipe.execute()

        for ids in case["entity_batches"][:50]:
            once(ids)
        ROUND_TRIPS["count"] = 0
        latencies = []
        for ids in case["entity_batches"]:
            began = time.perf_counter()
            once(ids)
            latencies.append(time.perf_counter() - began)
        out["cases"].append({"entities": len(case["entity_batches"][0]),
                             "latencies_s": latencies,
                             "round_trips_per_request": ROUND_TRIPS["count"] / len(latencies)})
    return out


def historical(args: dict[str, Any]) -> dict[str, Any]:
    import pandas as pd

    store, refs, on_demand_refs = build_store(args)
    entity_df = pd.read_parquet(args["entity_path"])
    baseline_mb = next(int(line.split()[1]) / 1024 for line in
                       Path("/proc/self/status").read_text().splitlines()
                       if line.startswith("VmHWM:"))
    began = time.perf_counter()
    features = refs + (on_demand_refs if args.get("on_demand", True) else [])
    job = store.get_historical_features(entity_df=entity_df, features=features,
                                        full_feature_names=False)
    frame = job.to_df()
    seconds = time.perf_counter() - began
    names = _our_names(args["spec"])
    frame.columns = [names.get(c, c) for c in frame.columns]
    frame.to_parquet(args["out_path"])
    return {"seconds": seconds, "rows": len(frame), "baseline_rss_mb": baseline_mb}


def main() -> None:
    command, raw = sys.argv[1], sys.argv[2]
    if raw.startswith("@"):  # large arguments come in a file (argv is limited to 128 KB)
        raw = Path(raw[1:]).read_text()
    args = json.loads(raw)
    handlers = {"materialize": materialize, "online": online, "historical": historical,
                "floor": floor}
    result = handlers[command](args)
    result["feast_measured_at"] = datetime.now(UTC).isoformat()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):  # this process's own peak resident set
            result["vmhwm_mb"] = int(line.split()[1]) / 1024
    print(json.dumps(result, default=str), flush=True)


if __name__ == "__main__":
    main()
