"""The proxy process: ``python -m airmlops.serving.proxy --port N --state-dir D``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from airmlops.serving.http_limits import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_BYTES,
    DEFAULT_MAX_HEADER_COUNT,
    HttpLimits,
    guarded_protocol,
)
from airmlops.serving.proxy.app import ReverseProxy
from airmlops.serving.proxy.client import proxy_url
from airmlops.serving.proxy.settings import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_READ_TIMEOUT,
)
from airmlops.serving.proxy.shadow import SHADOW_QUEUE_SIZE, SHADOW_WORKERS
from airmlops.serving.proxy.table import (
    MAX_SLOTS,
    RoutingTable,
    SlotSpec,
    load_persisted_table,
    persist_table,
)
from airmlops.serving.proxy.validation import (
    HOST,
    validate_port,
    validate_slot,
    validate_upstreams,
    validate_version,
)

logger = logging.getLogger("airmlops.serving.proxy")


def build_parser() -> argparse.ArgumentParser:
    """The proxy's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m airmlops.serving.proxy",
        description="Reverse proxy giving a deployed model one stable address on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument(
        "--state-dir", type=Path, required=True, help="holds the admin token and the table"
    )
    parser.add_argument("--upstream", action="append",
                        help="an upstream of --slot, made active (repeat for replicas); "
                             "without it the persisted table is used as it is")
    parser.add_argument("--slot", default=None, help="slot name of --upstream (default: initial)")
    parser.add_argument("--version", default=None, help="model version served by --upstream")
    parser.add_argument("--spares", type=int, default=0,
                        help="how many of the last --upstream are hot spares")
    parser.add_argument("--health-interval", type=float, default=DEFAULT_HEALTH_INTERVAL,
                        help="seconds between health checks of every upstream")
    parser.add_argument("--connect-timeout", type=float, default=DEFAULT_CONNECT_TIMEOUT)
    parser.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                        help="most seconds an upstream answer may take (then 504)")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body (413 above)")
    parser.add_argument("--max-header-bytes", type=int, default=DEFAULT_MAX_HEADER_BYTES,
                        help="largest request line plus headers (431 above)")
    parser.add_argument("--max-header-count", type=int, default=DEFAULT_MAX_HEADER_COUNT,
                        help="most request header lines (431 above)")
    parser.add_argument("--header-timeout", type=float, default=DEFAULT_HEADER_TIMEOUT_S,
                        help="seconds a client has to send its headers (then 408)")
    parser.add_argument("--body-timeout", type=float, default=DEFAULT_BODY_TIMEOUT_S,
                        help="seconds a client has to send its body after the headers (408)")
    parser.add_argument("--keep-alive", type=float, default=DEFAULT_KEEP_ALIVE_S,
                        help="seconds an idle client connection is kept open")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help="open client connections; a request on one beyond gets 503")
    parser.add_argument("--shadow-queue-size", type=int, default=SHADOW_QUEUE_SIZE,
                        help="copies of live requests waiting for the shadow at most; more are "
                        "dropped")
    parser.add_argument("--shadow-workers", type=int, default=SHADOW_WORKERS,
                        help="copies sent to the shadow slot at once at most")
    parser.add_argument("--access-log", action="store_true", help="log every request")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proxy until interrupted; 2 for invalid arguments, else 0."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        port = validate_port(args.port)
        limits = _limits(args)
        if not 0.05 <= args.health_interval <= 3600:
            raise ValueError(f"--health-interval {args.health_interval:g} is not in 0.05..3600 s")
        if not 1 <= args.shadow_queue_size <= 65536 or not 1 <= args.shadow_workers <= 64:
            raise ValueError("--shadow-queue-size must be in 1..65536, --shadow-workers in 1..64")
        table = _initial_table(args)
    except ValueError as exc:
        print(f"proxy: {exc}", file=sys.stderr)
        return 2
    proxy = ReverseProxy(
        args.state_dir,
        table=table,
        connect_timeout=args.connect_timeout,
        read_timeout=args.read_timeout,
        max_body_bytes=args.max_body_bytes,
        health_interval=args.health_interval,
        shadow_queue_size=args.shadow_queue_size,
        shadow_workers=args.shadow_workers,
    )
    if args.upstream:
        persist_table(args.state_dir, table)
    spec = table.active_spec
    logger.info("proxy on %s -> %s", proxy_url(port),
                f"{table.active} (version {spec.version}): {', '.join(spec.upstreams)}"
                if spec else "-")
    _serve(proxy, port, limits, access_log=args.access_log)
    return 0


def _limits(args: argparse.Namespace) -> HttpLimits:
    """The client limits the arguments set (ValueError if invalid)."""
    return HttpLimits(
        max_header_bytes=args.max_header_bytes, max_header_count=args.max_header_count,
        max_body_bytes=args.max_body_bytes, header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, keep_alive_s=args.keep_alive,
        max_connections=args.max_connections,
    )


def _initial_table(args: argparse.Namespace) -> RoutingTable:
    """The persisted table, with the ``--upstream`` slot set and made active if given
    (ValueError if the arguments are invalid)."""
    table = load_persisted_table(args.state_dir)
    if args.upstream:
        spec = SlotSpec(validate_version(args.version), validate_upstreams(args.upstream),
                        args.spares)
        table = table.with_slot(validate_slot(args.slot or "initial"), spec, activate=True)
        if len(table.slots) > MAX_SLOTS:
            raise ValueError(f"the persisted table already holds {MAX_SLOTS} slots")
    elif args.slot is not None or args.version is not None or args.spares:
        raise ValueError("--slot, --version and --spares describe --upstream, which is missing")
    return table


def _serve(proxy: ReverseProxy, port: int, limits: HttpLimits, *, access_log: bool) -> None:
    """Serve ``proxy`` with uvicorn on 127.0.0.1:``port`` until interrupted."""
    import uvicorn

    config = uvicorn.Config(
        proxy,
        http=guarded_protocol(limits),
        host=HOST,
        port=port,
        lifespan="on",
        access_log=access_log,
        log_level="info",
        server_header=False,
        date_header=False,  # the upstream's Date is passed through
        proxy_headers=False,
        timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=15,
        backlog=2048,
    )
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run()
