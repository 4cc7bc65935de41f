"""The `airmlops` command line: small helpers around the platform."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _spec_check(paths: list[Path]) -> int:
    from airmlops.settings import get_settings
    from airmlops.spec import SpecError, load_spec, resolve_estimator, spec_paths

    targets = paths or spec_paths(get_settings().pipelines_dir)
    failures = 0
    for path in targets:
        try:
            spec = load_spec(path)
            resolve_estimator(spec, path)
        except SpecError as error:
            failures += 1
            print(error, file=sys.stderr)
        except Exception as error:  # a bad spec is reported, never a traceback
            failures += 1
            print(f"invalid pipeline spec {path}:\n  (file): {type(error).__name__}",
                  file=sys.stderr)
        else:
            print(f"ok  {path}  ({spec.name}: {spec.task}, {len(spec.features)} features)")
    return 1 if failures else 0


def _replay(args: argparse.Namespace) -> int:
    import datetime as dt
    import json
    import re

    from airmlops.monitoring.replay import ReplayError, refresh_features, replay
    from airmlops.settings import get_settings
    from airmlops.spec import NAME_PATTERN, SpecError, load_spec

    settings = get_settings()
    if args.spec is None and not re.match(NAME_PATTERN, args.pipeline):
        print(f"replay: --pipeline {args.pipeline!r} must match {NAME_PATTERN}", file=sys.stderr)
        return 2
    path = args.spec or settings.pipelines_dir / f"{args.pipeline}.yaml"
    try:
        spec = load_spec(path)
    except SpecError as error:
        print(error, file=sys.stderr)
        return 2
    day = args.day or dt.datetime.now(dt.UTC).date()
    url = args.url or f"http://127.0.0.1:{spec.deploy.port}"
    token = settings.serving_token.get_secret_value() or None
    try:
        if args.refresh_features:
            print(json.dumps(refresh_features(spec, args.scenario, day, settings)), flush=True)
        result = replay(url, spec, args.scenario, rows=args.rows, rate=args.rate, day=day,
                        days=args.days,
                        batch_size=args.batch, label_delay=args.label_delay,
                        label_share=args.label_share, max_seconds=args.max_seconds,
                        seed=args.seed, token=token, allow_remote=args.allow_remote,
                        progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ReplayError as error:
        print(f"replay: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_dict(), indent=2))
    return 0 if result.rows_answered else 1


def _add_replay(commands: argparse._SubParsersAction) -> None:
    import datetime as dt

    from airmlops.data.simulator import SCENARIOS

    replay = commands.add_parser(
        "replay", help="send simulator traffic to a model's stable address, labels later",
        description="Send the simulator's rows of a scenario to /predict at a bounded rate and "
        "count, and post their labels to /feedback after a delay (loopback only unless "
        "--allow-remote).")
    target = replay.add_mutually_exclusive_group()
    target.add_argument("--pipeline", default="churn",
                        help="spec name under the pipelines dir (default: churn)")
    target.add_argument("--spec", type=Path, help="spec file")
    replay.add_argument("--scenario", choices=SCENARIOS, default=None,
                        help="a what-if world to replay instead of the spec's own "
                        "(default: the spec's source.scenario from its scenario_start)")
    replay.add_argument("--url", help="base URL (default: http://127.0.0.1:<deploy.port>)")
    replay.add_argument("--rows", type=int, default=2000, help="rows in total (default 2000)")
    replay.add_argument("--rate", type=float, default=20.0,
                        help="requests per second (default 20)")
    replay.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    replay.add_argument("--label-delay", type=float, default=30.0,
                        help="seconds before a request's labels are posted (default 30)")
    replay.add_argument("--label-share", type=float, default=1.0,
                        help="share of requests whose labels are posted (default 1)")
    replay.add_argument("--max-seconds", type=float, default=600.0,
                        help="stop after this long, labels still waiting included (default 600)")
    replay.add_argument("--day", type=dt.date.fromisoformat,
                        help="last simulated day of the rows (default: today, UTC)")
    replay.add_argument("--days", type=int, default=7,
                        help="days of simulator rows ending on --day (default 7)")
    replay.add_argument("--seed", type=int, default=0)
    replay.add_argument("--refresh-features", action="store_true",
                        help="first rebuild the offline feature days of the replayed world (the "
                        "last two, and every day since the spec's scenario_start) and "
                        "re-materialize the online store (demo stores only)")
    replay.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback URL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="airmlops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    spec = commands.add_parser("spec", help="pipeline specs")
    spec_commands = spec.add_subparsers(dest="spec_command", required=True)
    check = spec_commands.add_parser("check", help="validate spec files (all when none given)")
    check.add_argument("paths", nargs="*", type=Path)
    _add_replay(commands)
    args = parser.parse_args(argv)
    if args.command == "spec" and args.spec_command == "check":
        return _spec_check(args.paths)
    if args.command == "replay":
        return _replay(args)
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
