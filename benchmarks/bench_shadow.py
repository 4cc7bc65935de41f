"""Shadow mirroring's cost to live traffic: the live /predict p99 with and without a shadow.

The issue's goal: "shadow mode keeps the live p99 within 10% of no shadow at half the maximum
throughput". Setup (loopback, a scratch directory): a private Redis; the demo churn spec's
features built and materialized, a model trained and registered, its bento built (the same
stages as ``bench_serving.py``); then two real model servers of that bento (``bentoml serve``,
the spec's workers each, the prediction log and the shadow log on Redis) behind the
deployment's proxy, started by ``deploy.ensure_proxy`` as a deploy starts it. Slot ``blue``
serves the live traffic; slot ``green`` is registered and becomes the shadow
(``set_shadow``, the real admin client) at 100 %. A third server of the same bento runs as
slot ``green-idle`` in the idle CPU class a deploy gives its shadow
(:mod:`airmlops.serving.cpu_class`; ``--no-idle-shadow`` leaves it out): the shadow's server
yields the CPU to the live one.

1. The live path's maximum throughput through the stable address, no shadow: an open-loop
   ramp (x1.25 per step of ``--max-seconds``) up to the first rate it does not sustain.
2. At half of it, open-loop load (``loadgen.py``, 32 connections, latency from the scheduled
   send time) for ``--seconds`` per round; each round runs every case once, in a rotating
   order (the shadow set or cleared between them): no shadow; shadow at 100 %; (shadow at
   100 % on the idle-class server). Per round: the live p50/p99 and throughput, the shadow
   counters of ``/__proxy/state`` (mirrored, dropped, shed, errors) and the CPU time of the proxy
   and each server.
3. The goal: the median over rounds of the live p99 with a shadow, over the same without,
   at most 1.10.

    .venv/bin/python benchmarks/bench_shadow.py                  # 3 rounds x 20 s per case
    .venv/bin/python benchmarks/bench_shadow.py --no-idle-shadow # without the idle-class shadow
    .venv/bin/python benchmarks/bench_shadow.py --quick          # 2 rounds x 8 s
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serving as serving
import common

GOAL_RATIO = 1.10
LOAD_SHARE = 0.5
"""The open-loop rate, as a share of the live path's maximum throughput."""
CONNECTIONS = 32
RAMP_STEPS = 12
LIVE, SHADOW, SHADOW_IDLE = "blue", "green", "green-idle"
SHADOW_COUNTERS = ("shadow_mirrored", "shadow_dropped", "shadow_shed", "shadow_errors")


# --- setup -----------------------------------------------------------------------------------


def build(work: Path, redis_url: str) -> dict[str, Any]:
    """Features, a registered model and its bento (``bench_serving``'s stages); the bodies."""
    from airmlops.serving.bento import build_bento

    setup = serving.train_and_register(work, redis_url)
    spec, settings = setup["spec"], setup["settings"]
    ref = build_bento(spec, setup["version"], settings.mlflow_tracking_uri,
                      settings.bentoml_store, spec_path=setup["spec_path"])
    setup["ref"] = ref
    setup["bodies"] = serving.request_bodies(setup, work)["ours"]
    return setup


def start_server(setup: dict[str, Any], env: dict[str, str], work: Path, name: str,
                 idle: bool = False) -> tuple[subprocess.Popen, str]:
    """One model server of the bento (``bentoml serve``, its own session); with ``idle``, put
    in the idle CPU class as a deploy puts a shadow (``cpu_class.yield_cpu``)."""
    from airmlops.serving.bento import serve_command

    port = common.free_port()
    log_path = work / f"{name}.log"
    full = {k: v for k, v in os.environ.items()
            if not k.startswith(("MLOPS_SERVING_", "MLOPS_PREDICTION_LOG_"))}
    full.update(BENTOML_HOME=str(setup["settings"].bentoml_store), BENTOML_DO_NOT_TRACK="true",
                **env)
    argv = serve_command(setup["ref"].tag, port)
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, env=full, cwd=work, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    serving.wait_http(f"{url}/readyz", proc, log_path)
    if idle:
        from airmlops.serving.cpu_class import yield_cpu
        from airmlops.serving.deploy.state import SlotHandle

        handle = SlotHandle(target="process", artifact=str(setup["ref"].tag), port=port,
                            instance="bench", pid=proc.pid)
        common.log(f"{name}: idle CPU class {yield_cpu(handle, f'bench-{name}')}")
    return proc, url


@contextlib.contextmanager
def servers(setup: dict[str, Any], redis_url: str, work: Path, workers: int,
            idle_shadow: bool) -> Iterator[dict[str, tuple[subprocess.Popen, str]]]:
    """The live server, the shadow server (and the idle-class one), by slot; stopped at the end."""
    env = {"MLOPS_DATA_ROOT": str(setup["settings"].data_root), "MLOPS_REDIS_URL": redis_url,
           "MLOPS_SERVING_WORKERS": str(workers)}
    started: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for slot, idle in ((LIVE, False), (SHADOW, False),
                           *(((SHADOW_IDLE, True),) if idle_shadow else ())):
            started[slot] = start_server(setup, env, work, slot, idle)
            common.log(f"slot {slot}: {started[slot][1]}{' (idle CPU class)' if idle else ''}")
        yield started
    finally:
        from airmlops.serving.cpu_class import release_group

        for slot, (proc, _) in started.items():
            common.stop_process(proc)
            release_group(f"bench-{slot}")


# --- measurement -----------------------------------------------------------------------------


def counters(port: int) -> dict[str, int]:
    """The proxy's shadow counters and its live slot's request count."""
    from airmlops.serving import proxy as proxy_mod

    state = proxy_mod.get_state(port)
    out = {key: int(state.get(key, 0)) for key in SHADOW_COUNTERS}
    for slot, stats in state["stats"].items():
        out[f"requests {slot}"] = int(stats["requests"])
    return out


def set_case(proxy: Any, shadow: tuple[str, int] | None) -> None:
    """Make slot ``shadow[0]`` the shadow at ``shadow[1]`` %, or clear it (None)."""
    from airmlops.serving import proxy as proxy_mod

    if shadow is None:
        proxy_mod.clear_shadow(proxy.port, proxy.token)
    else:
        proxy_mod.set_shadow(proxy.port, proxy.token, *shadow)



def maximum(url: str, bodies: Path, seconds: float) -> dict[str, Any]:
    """The live path's maximum throughput, no shadow: an open-loop ramp (32 connections, x1.25
    per step from half the 32-client closed-loop burst) up to the first rate it does not
    sustain (under 95 % of it achieved, a failure, or a p99 over 1 s); the most any step
    achieved. At most ``RAMP_STEPS`` steps of ``seconds``."""
    serving.load(url, bodies, "closed", concurrency=4, duration=2.0)  # warm-up
    burst = serving.load(url, bodies, "closed", concurrency=CONNECTIONS, duration=seconds)
    rate, steps = max(50.0, round(burst["throughput"] * 0.5, -1)), []
    for _ in range(RAMP_STEPS):
        step = serving.load(url, bodies, "open", concurrency=CONNECTIONS, duration=seconds,
                            rate=rate, max_requests=int(rate * seconds) + 10)
        steps.append(step)
        common.log(f"ramp {rate:.0f} req/s: achieved {step['throughput']:.0f}, p99 "
                   f"{step['p99_ms']:.1f} ms")
        if (step["throughput"] < 0.95 * rate or step["non_2xx"] + step["errors"]
                + step["unfinished"] or (step["p99_ms"] or 0) > 1000):
            capped = False
            break
        rate = round(rate * 1.25, -1)
    else:
        capped = True  # every step sustained: the maximum is a lower bound
    best = max(step["throughput"] for step in steps)
    common.log(f"maximum throughput {best:.0f} req/s (closed-loop burst, {CONNECTIONS} "
               f"clients: {burst['throughput']:.0f})")
    return {"burst": burst, "ramp": steps, "throughput": best, "lower_bound": capped}


def one_round(proxy: Any, url: str, bodies: Path, rate: float, seconds: float,
              shadow: tuple[str, int] | None, groups: dict[str, list[int]]) -> dict[str, Any]:
    """One case for one round: open-loop load at ``rate``; the live figures, the shadow
    counters' increase and the CPU seconds each process group spent per live answer."""
    set_case(proxy, shadow)
    time.sleep(1.0)  # copies of the previous case drain; the servers settle
    before, cpu_before = counters(proxy.port), {k: common.cpu_seconds(v) for k, v in groups.items()}
    result = serving.load(url, bodies, "open", concurrency=CONNECTIONS, duration=seconds,
                          rate=rate, max_requests=int(rate * seconds) + 10)
    time.sleep(0.5)  # the last copies reach the shadow
    after, cpu_after = counters(proxy.port), {k: common.cpu_seconds(v) for k, v in groups.items()}
    answered = max(result["ok"], 1)
    result["shadow"] = {key: after[key] - before.get(key, 0) for key in after}
    result["cpu_ms_per_request"] = {k: (cpu_after[k] - cpu_before[k]) / answered * 1e3
                                    for k in groups}
    result["load1"] = os.getloadavg()[0]
    return result


def measure(setup: dict[str, Any], redis_url: str, work: Path, args: argparse.Namespace
            ) -> dict[str, Any]:
    """Start the servers and the proxy; find the maximum; run the interleaved rounds."""
    from airmlops.serving import proxy as proxy_mod
    from airmlops.serving.deploy import ensure_proxy, undeploy

    cases: list[tuple[str, tuple[str, int] | None]] = [("no shadow", None),
                                                       ("shadow 100 %", (SHADOW, 100))]
    if args.idle_shadow:
        cases += [(f"shadow {percent} %, shadow server in the idle CPU class",
                   (SHADOW_IDLE, percent)) for percent in args.idle_percents]
    root = work / "deployments"
    version = str(setup["version"])
    with servers(setup, redis_url, work, args.workers, args.idle_shadow) as started:
        proxy = ensure_proxy(setup["spec"].name, common.free_port(), root)
        try:
            proxy_mod.switch(proxy.port, proxy.token, started[LIVE][1], LIVE, version=version)
            for slot in started:
                if slot != LIVE:
                    proxy_mod.register(proxy.port, proxy.token, slot, [started[slot][1]],
                                       version)
            groups = {"proxy": serving.server_processes(proxy.pid),
                      "redis": [pid for pid in [serving.proxy_pid(
                          int(redis_url.rsplit(":", 1)[1].split("/")[0]))] if pid],
                      **{f"server {slot}": serving.server_processes(proc.pid)
                         for slot, (proc, _) in started.items()}}
            url = f"{proxy.url}/predict"
            peak = maximum(url, setup["bodies"], args.max_seconds)
            rate = round(peak["throughput"] * LOAD_SHARE, 1)
            for _name, shadow in cases:  # warm-up: every server's connections and code paths
                one_round(proxy, url, setup["bodies"], rate, 2.0, shadow, groups)
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in cases}
            for index in range(args.rounds):
                turn = index % len(cases)
                for name, shadow in cases[turn:] + cases[:turn]:
                    result = one_round(proxy, url, setup["bodies"], rate, args.seconds,
                                       shadow, groups)
                    rounds[name].append(result)
                    common.log(f"round {index + 1}/{args.rounds} {name}: p50 "
                               f"{result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
                               f"{result['throughput']:.0f} req/s, shadow {result['shadow']}, "
                               f"load {result['load1']:.2f}")
            set_case(proxy, None)
        finally:
            undeploy(setup["spec"].name, root)
    return {"maximum": peak, "rate": rate, "rounds": rounds, "cases": [n for n, _ in cases]}


# --- results ---------------------------------------------------------------------------------


def case_summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The medians over rounds of one case's live figures, and its shadow totals."""
    def median(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    totals = {key: sum(r["shadow"].get(key, 0) for r in rounds) for key in SHADOW_COUNTERS}
    cpu_keys = rounds[0]["cpu_ms_per_request"]
    return {"p50_ms": median("p50_ms"), "p99_ms": median("p99_ms"),
            "throughput": median("throughput"), "p99_per_round": [r["p99_ms"] for r in rounds],
            "p50_per_round": [r["p50_ms"] for r in rounds],
            "failed": sum(r["non_2xx"] + r["errors"] + r["unfinished"] for r in rounds),
            "cpu_ms_per_request": {k: statistics.median(r["cpu_ms_per_request"][k]
                                                        for r in rounds) for k in cpu_keys},
            **totals}


def summarize(measured: dict[str, Any], args: argparse.Namespace,
              load_before: tuple[float, ...], load_after: tuple[float, ...]) -> None:
    """Tables, the goal, and the results files."""
    cases = measured["cases"]
    summary = {name: case_summary(measured["rounds"][name]) for name in cases}
    base = summary["no shadow"]
    rows, goals, cpu_rows = [], [], []
    for name in cases:
        s = summary[name]
        rows.append([name, s["p50_ms"], s["p99_ms"],
                     " / ".join(f"{p:.1f}" for p in s["p99_per_round"]), s["throughput"],
                     s["failed"], s["shadow_mirrored"], s["shadow_dropped"], s["shadow_shed"],
                     s["shadow_errors"]])
        cpu_rows.append([name, *(f"{v:.2f}" for v in s["cpu_ms_per_request"].values())])
        if name == "no shadow":
            continue
        ratio = s["p99_ms"] / base["p99_ms"]
        per_round = [a / b for a, b in zip(s["p99_per_round"], base["p99_per_round"],
                                           strict=True)]
        s["p99_ratio"], s["p99_ratio_per_round"] = ratio, per_round
        s["within_goal"] = ratio <= GOAL_RATIO
        goals.append([f"{name} / no shadow", f"{ratio:.2f}",
                      " / ".join(f"{r:.2f}" for r in per_round),
                      f"{s['p50_ms'] / base['p50_ms']:.2f}", ratio <= GOAL_RATIO])
    cpu_headers = ["case", *(f"{k} (ms)" for k in summary["no shadow"]["cpu_ms_per_request"])]
    peak = measured["maximum"]
    common.write_results(
        "shadow", "7. Shadow mirroring: the live /predict p99 with and without a shadow",
        {"cases": summary, "rounds": measured["rounds"], "maximum": peak,
         "rate": measured["rate"], "goal_ratio": GOAL_RATIO, "seconds": args.seconds,
         "load_share": LOAD_SHARE, "workers": args.workers, "load_before": list(load_before),
         "load_after": list(load_after)},
        [(f"Live /predict through the proxy at {measured['rate']:.0f} req/s (half the maximum, "
          f"{peak['throughput']:.0f} req/s), open loop, {CONNECTIONS} connections; medians "
          f"over {args.rounds} rounds of {args.seconds:.0f} s",
          ["case", "p50 ms", "p99 ms", "p99 per round", "req/s", "failed", "mirrored",
           "dropped", "shed", "shadow errors"], rows),
         (f"Goal: the live p99 with a shadow <= {GOAL_RATIO:.2f} x without",
          ["ratio", "p99 (medians)", "p99 per round", "p50 (medians)", "met"], goals),
         ("CPU time per live answer, by process tree (median over rounds)", cpu_headers,
          cpu_rows)],
        notes=[f"two model servers of the demo model ({args.workers} workers each; the live "
               "slot and the shadow slot serve the same version) and the proxy (started by "
               "`deploy.ensure_proxy`); Redis, the load generator and everything else share "
               f"the same {common.machine()['cores']} cores.",
               "maximum: the most an open-loop ramp through the stable address achieved (no "
               f"shadow; x1.25 per {args.max_seconds:.0f}-s step up to the first rate not "
               "sustained; the 32-client closed-loop burst was "
               f"{peak['burst']['throughput']:.0f} req/s).",
               "the proxy sheds copies while its live answers are slower than lately "
               "(`LivePressure` in `serving/proxy/shadow.py`: a 0.25-s window's mean latency "
               "over 1.25 x and 1 ms above the fastest window of the last 10 s) and, from the "
               "first such window on, beyond a copy budget (`CopyBudget`: half the rate sent "
               "then, +25 copies/s per calm window, halved per window under pressure); shed "
               "copies are counted apart from those dropped by a full queue.",
               "each round runs every case once, the order rotating between rounds; the "
               "shadow set (`set_shadow`, 100 %) or cleared 1 s before each case; latency "
               "from the scheduled send time (no coordinated omission).",
               f"load average (1 / 5 min) before the run {load_before[0]:.2f} / "
               f"{load_before[1]:.2f}, after {load_after[0]:.2f} / {load_after[1]:.2f}; "
               "compare rows of this run with each other."])


def main() -> int:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=20.0, help="per case and round")
    parser.add_argument("--max-seconds", type=float, default=5.0,
                        help="per closed-loop run finding the maximum")
    parser.add_argument("--workers", type=int, help="workers per server (default: the spec's)")
    parser.add_argument("--no-idle-shadow", dest="idle_shadow", action="store_false",
                        help="leave out the case of the shadow server in the idle CPU class")
    parser.add_argument("--idle-percents", type=lambda text: [int(p) for p in text.split(",")],
                        default=[100], help="mirrored shares of the idle-class shadow's cases "
                        "(comma-separated, default 100)")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 8 s")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.max_seconds = 2, 8.0, 3.0
    work = common.WORK_DIR / "shadow"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    load_before = os.getloadavg()
    try:
        with common.redis_server() as redis_url:
            setup = build(work, redis_url)
            args.workers = args.workers or setup["spec"].deploy.workers
            measured = measure(setup, redis_url, work, args)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summarize(measured, args, load_before, os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
