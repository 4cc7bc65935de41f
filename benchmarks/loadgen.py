"""A small HTTP/1.1 load generator for loopback servers: keep-alive connections, raw asyncio.

Two modes, both bounded in requests and in time:

- ``closed``: ``--concurrency`` clients, each sending its next request as soon as the previous
  answer arrived (throughput at saturation, latency at N clients);
- ``open``: requests scheduled at a fixed ``--rate`` (evenly spaced) over ``--duration``
  seconds, served by at most ``--concurrency`` connections. Latency is measured from the
  scheduled time, so a server that falls behind is charged for the queueing it causes (no
  coordinated omission).

Request bodies come from a JSON-lines file (one body per line, used round robin). Only
loopback targets are accepted. The result is one JSON object on stdout: counts by status,
errors, achieved throughput and latency percentiles in milliseconds.

    python benchmarks/loadgen.py --url http://127.0.0.1:8600/predict --bodies bodies.jsonl \\
        --mode open --rate 200 --duration 5 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import sys
import time
from collections import Counter
from urllib.parse import urlsplit


class Connection:
    """One keep-alive HTTP/1.1 connection; reopened after an error or a ``Connection: close``."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, payload: bytes) -> int:
        """Send one prepared request; return the status (0 on a connection error)."""
        try:
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.write(payload)
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            length, chunked, close = None, False, False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
                elif name == b"connection" and b"close" in value.lower():
                    close = True
            if chunked:
                while True:
                    size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                    await self.reader.readexactly(size + 2)
                    if size == 0:
                        break
            elif length:
                await self.reader.readexactly(length)
            if close:
                self.close()
            return status
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                IndexError):
            self.close()
            return 0

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def prepare(url: str, bodies: list[bytes], headers: dict[str, str],
            method: str = "POST") -> tuple[str, int, list]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise SystemExit(f"refusing a non-loopback target {host!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if method == "GET":
        return host, port, [f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode()]
    payloads = [
        (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
         f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body
        for body in bodies
    ]
    return host, port, payloads


def summarize(latencies: list[float], statuses: Counter, began: float, ended: float,
              unfinished: int, mode: str, **extra: object) -> dict:
    ordered = sorted(latencies)

    def rank(q: float) -> float | None:
        if not ordered:
            return None
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1e3

    ok = sum(n for s, n in statuses.items() if 200 <= s < 300)
    elapsed = max(ended - began, 1e-9)
    return {
        "mode": mode, **extra, "requests": sum(statuses.values()) + unfinished, "ok": ok,
        "non_2xx": sum(n for s, n in statuses.items() if s and not 200 <= s < 300),
        "errors": statuses.get(0, 0), "unfinished": unfinished,
        "statuses": {str(s): n for s, n in sorted(statuses.items())},
        "seconds": elapsed, "throughput": ok / elapsed,
        "p50_ms": rank(0.50), "p90_ms": rank(0.90), "p99_ms": rank(0.99),
        "max_ms": ordered[-1] * 1e3 if ordered else None,
    }


async def closed_loop(host: str, port: int, payloads: list[bytes], concurrency: int,
                      duration: float, max_requests: int) -> dict:
    latencies: list[float] = []
    statuses: Counter = Counter()
    issued = 0
    began = time.perf_counter()
    deadline = began + duration

    async def client(offset: int) -> None:
        nonlocal issued
        connection = Connection(host, port)
        index = offset
        while issued < max_requests and time.perf_counter() < deadline:
            issued += 1
            payload = payloads[index % len(payloads)]
            index += concurrency
            started = time.perf_counter()
            status = await connection.request(payload)
            latencies.append(time.perf_counter() - started)
            statuses[status] += 1
        connection.close()

    await asyncio.gather(*(client(i) for i in range(concurrency)))
    return summarize(latencies, statuses, began, time.perf_counter(), 0, "closed",
                     concurrency=concurrency)


async def open_loop(host: str, port: int, payloads: list[bytes], rate: float, concurrency: int,
                    duration: float, max_requests: int, drain: float) -> dict:
    total = min(max_requests, max(1, int(rate * duration)))
    interval = 1.0 / rate
    latencies: list[float] = []
    statuses: Counter = Counter()
    state = {"next": 0, "done": 0, "last": 0.0}
    began = time.perf_counter() + 0.05

    async def worker() -> None:
        connection = Connection(host, port)
        try:
            while state["next"] < total:
                index = state["next"]
                state["next"] += 1
                scheduled = began + index * interval
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                status = await connection.request(payloads[index % len(payloads)])
                finished = time.perf_counter()
                latencies.append(finished - scheduled)
                statuses[status] += 1
                state["done"] += 1
                state["last"] = finished
        finally:
            connection.close()

    tasks = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, total))]
    _, pending = await asyncio.wait(tasks, timeout=duration + drain + 0.1)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    unfinished = total - state["done"]
    ended = state["last"] or time.perf_counter()
    return summarize(latencies, statuses, began, ended, unfinished, "open", rate=rate,
                     concurrency=concurrency)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--bodies", help="JSON-lines file of request bodies (POST)")
    parser.add_argument("--method", choices=("POST", "GET"), default="POST")
    parser.add_argument("--mode", choices=("closed", "open"), default="closed")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--rate", type=float, default=100.0, help="requests/s (open mode)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds (upper bound)")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--drain", type=float, default=10.0,
                        help="open mode: seconds to wait for answers after the last send")
    parser.add_argument("--header", action="append", default=[], help="'Name: value'")
    args = parser.parse_args()
    bodies: list[bytes] = []
    if args.method == "POST":
        if not args.bodies:
            parser.error("--bodies is required for POST")
        with open(args.bodies, "rb") as handle:
            bodies = [line.strip() for line in handle if line.strip()]
    headers = dict(h.split(":", 1) for h in args.header)
    host, port, payloads = prepare(args.url, bodies, {k.strip(): v.strip()
                                                      for k, v in headers.items()}, args.method)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.mode == "closed":
        result = asyncio.run(closed_loop(host, port, payloads, args.concurrency, args.duration,
                                         args.max_requests))
    else:
        result = asyncio.run(open_loop(host, port, payloads, args.rate, args.concurrency,
                                       args.duration, args.max_requests, args.drain))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
