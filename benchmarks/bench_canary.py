"""The canary split's cost at the stable address: /predict p50 and p99 with and without a canary.

While a canary is set, the proxy reads every ``POST /predict`` body before forwarding it, parses
the entity id and hashes it (``airmlops.serving.proxy.canary``) to pick the slot. The goal is
that this adds at most 0.2 ms to the p50 of a single request. To keep model time from hiding
it, the proxy (started the way a deploy starts it, ``deploy.ensure_proxy``) forwards to two
trivial upstreams, each its own process answering every request with a small JSON body: slot
``blue`` is active, slot ``green`` is registered and becomes the canary (``set_canary``, the real
admin client) at 20 %.

One client, one keep-alive connection, requests one after another (``loadgen.Connection`` in
this process; the proxy and the upstreams are other processes). Cases, each over
``--requests`` requests per round for ``--rounds`` rounds, interleaved: each round runs every
case in ``--slices`` blocks, the cases' blocks alternating in a rotating order (the canary set or
cleared between blocks), so that drift on the machine weighs on every case alike:

- no canary, one instance per request; canary at 20 %, one instance;
- no canary, a batch of 10 instances; canary at 20 %, the same batch.

The entity ids cycle over 1,000 customers, so about 20 % of the canary cases' requests go to the
canary slot (the share is read back from the proxy's per-slot statistics).

    .venv/bin/python benchmarks/bench_canary.py               # 3 rounds x 2,000 per case
    .venv/bin/python benchmarks/bench_canary.py --quick       # 2 rounds x 500
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import loadgen

GOAL_MS = 0.2
WEIGHT = 20
ENTITIES = 1_000
BATCH = 10
ENTITY_KEY = "customer_id"
PIPELINE = "benchcanary"
CASES = (
    # name, canary weight (None: no canary), instances per request
    ("no canary, 1 instance", None, 1),
    (f"canary {WEIGHT} %, 1 instance", WEIGHT, 1),
    ("no canary, 10 instances", None, BATCH),
    (f"canary {WEIGHT} %, 10 instances", WEIGHT, BATCH),
)
PAIRS = (  # (with canary, without): the differences the goal is about
    (f"canary {WEIGHT} %, 1 instance", "no canary, 1 instance"),
    (f"canary {WEIGHT} %, 10 instances", "no canary, 10 instances"),
)
_ANSWER = b'{"predictions": [0.5], "version": "1"}'


# --- the upstreams ---------------------------------------------------------------------------


async def _serve_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer every HTTP/1.1 request on one keep-alive connection with ``_ANSWER``."""
    head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(_ANSWER))
    try:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in request.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            writer.write(head + _ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def serve_upstream(port: int) -> None:
    """Run the trivial upstream on 127.0.0.1:``port`` until terminated."""
    import uvloop

    async def main() -> None:
        server = await asyncio.start_server(_serve_client, "127.0.0.1", port)
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await server.serve_forever()

    uvloop.run(main())


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    """A trivial upstream in its own process (own session); yields its URL."""
    port = common.free_port()
    proc = subprocess.Popen([common.PYTHON, __file__, "--upstream", str(port)],
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the upstream on port {port} did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        common.stop_process(proc)


# --- the client ------------------------------------------------------------------------------


def bodies(instances: int) -> list[bytes]:
    """One /predict body per entity, ``instances`` instances each (the first names it)."""
    out = []
    for index in range(ENTITIES):
        rows = [{ENTITY_KEY: f"customer-{(index + k) % ENTITIES}", "tenure_days": 100 + k}
                for k in range(instances)]
        out.append(json.dumps({"instances": rows}).encode())
    return out


async def sequential(url: str, payloads: list[bytes], requests: int,
                     offset: int = 0) -> list[float]:
    """Send ``requests`` prepared requests (from ``offset`` on, round robin) one after another
    on one connection; latencies (s). Any answer other than 200 stops the run."""
    parts = url.split("//", 1)[1].split("/", 1)[0]
    host, port = parts.rsplit(":", 1)
    connection = loadgen.Connection(host, int(port))
    latencies = []
    try:
        for index in range(requests):
            started = time.perf_counter()
            status = await connection.request(payloads[(offset + index) % len(payloads)])
            latencies.append(time.perf_counter() - started)
            if status != 200:
                raise RuntimeError(f"request {index} to {url} answered {status}")
    finally:
        connection.close()
    return latencies


def run_block(url: str, payloads: list[bytes], requests: int, offset: int = 0) -> list[float]:
    """One block of sequential requests, garbage collection held off in this process."""
    import uvloop

    gc.collect()
    gc.disable()
    try:
        return uvloop.run(sequential(url, payloads, requests, offset))
    finally:
        gc.enable()


# --- the measurement -------------------------------------------------------------------------


def slot_requests(port: int) -> dict[str, int]:
    """Requests each slot has answered so far, as the proxy counted them."""
    from airmlops.serving import proxy as proxy_mod

    return {slot: int(stats["requests"]) for slot, stats in
            proxy_mod.get_state(port)["stats"].items()}


def measure(rounds: int, requests: int, warmup: int, slices: int) -> dict[str, Any]:
    """Start the proxy and the upstreams; run every case ``rounds`` times ``requests``
    requests, each round in ``slices`` blocks per case, the cases' blocks alternating."""
    from airmlops.serving import proxy as proxy_mod
    from airmlops.serving.deploy import ensure_proxy, undeploy

    samples: dict[str, list[list[float]]] = {name: [] for name, *_ in CASES}
    canary_share: dict[str, list[float]] = {name: [] for name, w, _ in CASES if w}
    root = Path(tempfile.mkdtemp(prefix="bench-canary-"))
    with upstream() as blue, upstream() as green:
        proxy = ensure_proxy(PIPELINE, common.free_port(), root)
        try:
            proxy_mod.switch(proxy.port, proxy.token, blue, "blue", version="1")
            proxy_mod.register(proxy.port, proxy.token, "green", [green], "2")
            target = f"{proxy.url}/predict"
            payloads = {n: loadgen.prepare(target, bodies(n), {})[2]
                        for n in {n for _, _, n in CASES}}
            for _name, weight, n in CASES:  # warm-up: both slots' connections, every code path
                set_case(proxy, weight)
                run_block(target, payloads[n], warmup)
            block = max(1, requests // slices)
            for index in range(rounds):
                for name, *_ in CASES:
                    samples[name].append([])
                for part in range(slices):  # the cases' blocks alternate; the order rotates
                    turn = index * slices + part
                    for name, weight, n in CASES[turn % len(CASES):] + CASES[:turn % len(CASES)]:
                        set_case(proxy, weight)
                        before = slot_requests(proxy.port)
                        samples[name][-1] += run_block(target, payloads[n], block,
                                                       offset=turn * block)
                        if weight:
                            taken = slot_requests(proxy.port).get("green", 0)
                            canary_share[name].append((taken - before.get("green", 0)) / block)
                for name, *_ in CASES:
                    common.log(f"round {index + 1}/{rounds} {name}: p50 "
                               f"{common.percentiles_ms(samples[name][-1])['p50']:.3f} ms")
            proxy_mod.clear_canary(proxy.port, proxy.token)
        finally:
            undeploy(PIPELINE, root)
            shutil.rmtree(root, ignore_errors=True)
    return {"samples": samples, "canary_share": canary_share, "slices": slices}


def set_case(proxy: Any, weight: int | None) -> None:
    """Set the canary at ``weight`` percent, or clear it (None)."""
    from airmlops.serving import proxy as proxy_mod

    if weight is None:
        proxy_mod.clear_canary(proxy.port, proxy.token)
    else:
        proxy_mod.set_canary(proxy.port, proxy.token, "green", weight, ENTITY_KEY)


def split_cost_us(repeat: int = 20_000) -> dict[str, float]:
    """The in-process cost of the split itself (``CanaryRoute.takes``: parse the body, hash the
    entity) per request, in microseconds, for each body size: the part of the difference above
    that is the canary's own work, without HTTP's noise around it."""
    from airmlops.serving.proxy.canary import CanaryRoute

    canary = CanaryRoute("green", WEIGHT, ENTITY_KEY, route=None)  # type: ignore[arg-type]
    out = {}
    for n in sorted({n for _, _, n in CASES}):
        payloads = bodies(n)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for index in range(repeat):
                canary.takes(payloads[index % len(payloads)])
            best = min(best, (time.perf_counter() - started) / repeat * 1e6)
        out[f"{n} instance{'s' if n > 1 else ''}"] = best
    return out


# --- results ---------------------------------------------------------------------------------


def summarize(measured: dict[str, Any], rounds: int, requests: int,
              load_before: tuple[float, ...], load_after: tuple[float, ...]) -> None:
    """Tables, the goal, and the results files."""
    samples = measured["samples"]
    pooled = {name: common.percentiles_ms([x for block in blocks for x in block])
              for name, blocks in samples.items()}
    per_round = {name: [common.percentiles_ms(block)["p50"] for block in blocks]
                 for name, blocks in samples.items()}
    shares = {name: statistics.fmean(v) for name, v in measured["canary_share"].items() if v}
    split_us = measured["split_cost_us"]
    rows = [[name, *(f"{pooled[name][q]:.3f}" for q in ("p50", "p90", "p99", "max")),
             " / ".join(f"{p:.3f}" for p in per_round[name]),
             f"{shares[name]:.1%}" if name in shares else "-"] for name, *_ in CASES]
    goals, differences = [], {}
    for with_canary, without in PAIRS:
        pooled_diff = pooled[with_canary]["p50"] - pooled[without]["p50"]
        round_diffs = [a - b for a, b in zip(per_round[with_canary], per_round[without],
                                             strict=True)]
        p99_diff = pooled[with_canary]["p99"] - pooled[without]["p99"]
        differences[with_canary] = {"p50_diff_ms": pooled_diff, "p99_diff_ms": p99_diff,
                                    "p50_diff_per_round_ms": round_diffs,
                                    "within_goal": pooled_diff <= GOAL_MS}
        goals.append([f"{with_canary} - {without}", f"{pooled_diff:+.3f}",
                      " / ".join(f"{d:+.3f}" for d in round_diffs), f"{p99_diff:+.3f}",
                      pooled_diff <= GOAL_MS])
    load_note = (f"load average (1 / 5 min) before the run {load_before[0]:.2f} / "
                 f"{load_before[1]:.2f}, after {load_after[0]:.2f} / {load_after[1]:.2f}; 2 "
                 "cores shared with other work: compare rows of this run with each other.")
    common.write_results(
        "canary", "6. Canary split at the stable address: /predict with and without a canary",
        {"cases": {name: {**pooled[name], "p50_per_round": per_round[name],
                          "canary_share": shares.get(name)} for name, *_ in CASES},
         "differences": differences, "split_cost_us": split_us, "goal_p50_ms": GOAL_MS,
         "rounds": rounds, "requests_per_round": requests, "slices": measured["slices"],
         "load_before": list(load_before), "load_after": list(load_after)},
        [("Sequential /predict through the proxy, 1 client, keep-alive (ms)",
          ["case", "p50", "p90", "p99", "max", "p50 per round", "to the canary"], rows),
         (f"Goal: the canary split adds <= {GOAL_MS} ms to the p50",
          ["difference", "p50 (pooled)", "p50 per round", "p99 (pooled)", "met"], goals),
         ("The split alone, in process (CanaryRoute.takes: parse the body, hash the entity; "
          "best of 5 x 20,000)", ["body", "us per request"],
          [[body, f"{us:.1f}"] for body, us in split_us.items()])],
        notes=[f"{rounds} rounds x {requests:,} requests per case, each round in "
               f"{measured['slices']} blocks per case, the cases' blocks alternating in a "
               "rotating order; the canary set (`set_canary`) or cleared between blocks.",
               "the proxy started by `deploy.ensure_proxy` (as a deploy starts it); two "
               "upstreams, each a raw asyncio HTTP/1.1 server in its own process answering "
               f"{len(_ANSWER)} bytes of JSON; slot blue active, slot green the canary.",
               f"entity ids cycle over {ENTITIES:,} customers; a batch body names "
               f"{BATCH} customers and is routed by its first.",
               load_note])


def main() -> int:
    """Run the benchmark (or, with ``--upstream PORT``, serve one trivial upstream)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2_000, help="per case and round")
    parser.add_argument("--warmup", type=int, default=300, help="per case, before round 1")
    parser.add_argument("--slices", type=int, default=8,
                        help="blocks per case and round (the cases' blocks alternate)")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 500 requests")
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.upstream:
        serve_upstream(args.upstream)
        return 0
    if args.quick:
        args.rounds, args.requests, args.warmup, args.slices = 2, 500, 100, 4
    load_before = os.getloadavg()
    measured = measure(args.rounds, args.requests, args.warmup, args.slices)
    measured["split_cost_us"] = split_cost_us()
    summarize(measured, args.rounds, args.requests, load_before, os.getloadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
