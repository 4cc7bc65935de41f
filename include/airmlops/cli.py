"""The `airmlops` command line: the platform (`airmlops platform up|down|status`), pipeline
specs (`airmlops spec check`) and traffic replay (`airmlops replay`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from airmlops.settings import Settings
    from airmlops.spec import PipelineSpec


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


SIMULATOR_ONLY = {"scenario": "--scenario", "day": "--day", "days": "--days",
                  "refresh_features": "--refresh-features"}
"""The replay options that pick or change simulator rows: meaningless for a --file replay."""
FILE_ONLY = {"dry_run": "--dry-run"}


def _replay_spec(args: argparse.Namespace, settings: Settings) -> PipelineSpec | None:
    """The spec to replay (--spec, else --pipeline under the pipelines dir), or None after
    printing why it cannot be loaded."""
    import re

    from airmlops.spec import NAME_PATTERN, SpecError, load_spec

    if args.spec is None and not re.match(NAME_PATTERN, args.pipeline):
        print(f"replay: --pipeline {args.pipeline!r} must match {NAME_PATTERN}", file=sys.stderr)
        return None
    try:
        return load_spec(args.spec or settings.pipelines_dir / f"{args.pipeline}.yaml")
    except SpecError as error:
        print(error, file=sys.stderr)
        return None


def _misplaced_options(args: argparse.Namespace) -> str | None:
    """Why the options given do not fit the kind of replay (--file or simulator), or None."""
    if args.file is not None:
        given = [flag for name, flag in SIMULATOR_ONLY.items()
                 if getattr(args, name) not in (None, False)]
        if given:
            return (f"{', '.join(given)} only apply to simulator replays; a --file replay "
                    "sends the file's own rows")
        return None
    given = [flag for name, flag in FILE_ONLY.items() if getattr(args, name)]
    if given:
        return f"{', '.join(given)} only applies to a --file replay"
    return None


def _progress_printer(stream: TextIO) -> tuple[Callable[[str], None], Callable[[], None]]:
    """(show, finish): ``show`` prints a progress line to ``stream``, over the previous one
    when it is a terminal, one line per update otherwise; ``finish`` ends the last line."""
    overwrite = stream.isatty()
    shown = False

    def show(line: str) -> None:
        nonlocal shown
        shown = True
        stream.write(f"\r{line}\x1b[K" if overwrite else f"{line}\n")
        stream.flush()

    def finish() -> None:
        if overwrite and shown:
            stream.write("\n")
            stream.flush()

    return show, finish


def _replay_file(args: argparse.Namespace, spec: PipelineSpec, url: str,
                 token: str | None) -> int:
    import json

    from airmlops.monitoring.file_replay import replay_file
    from airmlops.monitoring.replay import ReplayError

    show, finish = _progress_printer(sys.stderr)
    try:
        result = replay_file(url, spec, args.file, rate=args.rate, batch_size=args.batch,
                             label_delay=args.label_delay, label_share=args.label_share,
                             max_seconds=args.max_seconds, rows=args.rows,
                             dry_run=args.dry_run, seed=args.seed, token=token,
                             allow_remote=args.allow_remote, progress=show)
    except ReplayError as error:
        print(f"replay: {error}", file=sys.stderr)
        return 2
    finally:
        finish()
    print(json.dumps(result.to_dict(), indent=2))
    if args.dry_run:
        return 0 if not result.problems and not result.invalid_rows else 1
    return 0 if result.rows_answered else 1


def _replay(args: argparse.Namespace) -> int:
    import datetime as dt
    import json

    from airmlops.monitoring.replay import ReplayError, refresh_features, replay
    from airmlops.settings import get_settings

    misplaced = _misplaced_options(args)
    if misplaced:
        print(f"replay: {misplaced}", file=sys.stderr)
        return 2
    settings = get_settings()
    spec = _replay_spec(args, settings)
    if spec is None:
        return 2
    url = args.url or f"http://127.0.0.1:{spec.deploy.port}"
    token = settings.serving_token.get_secret_value() or None
    if args.file is not None:
        return _replay_file(args, spec, url, token)
    day = args.day or dt.datetime.now(dt.UTC).date()
    try:
        if args.refresh_features:
            print(json.dumps(refresh_features(spec, args.scenario, day, settings)), flush=True)
        result = replay(url, spec, args.scenario, rows=2000 if args.rows is None else args.rows,
                        rate=args.rate, day=day, days=7 if args.days is None else args.days,
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
        "replay", help="send simulator or file traffic to a model's stable address, labels later",
        description="Send rows to /predict at a bounded rate and count, and post their labels "
        "to /feedback after a delay (loopback only unless --allow-remote): the simulator's "
        "rows of a scenario, or with --file the rows of your own CSV or Parquet file in time "
        "order.")
    target = replay.add_mutually_exclusive_group()
    target.add_argument("--pipeline", default="churn",
                        help="spec name under the pipelines dir (default: churn)")
    target.add_argument("--spec", type=Path, help="spec file")
    replay.add_argument("--file", type=Path,
                        help="replay this CSV or Parquet file (.csv, .parquet, .pq) instead of "
                        "the simulator: it needs the spec's entity key, request fields, "
                        "timestamp and label columns; rows are sent in timestamp order")
    replay.add_argument("--dry-run", action="store_true",
                        help="with --file: check every row against the service's request "
                        "model and send one batch marked synthetic (not logged); exit 1 on "
                        "any problem")
    replay.add_argument("--scenario", choices=SCENARIOS, default=None,
                        help="a what-if world to replay instead of the spec's own "
                        "(default: the spec's source.scenario from its scenario_start; "
                        "simulator only)")
    replay.add_argument("--url", help="base URL (default: http://127.0.0.1:<deploy.port>)")
    replay.add_argument("--rows", type=int, default=None,
                        help="rows in total (default 2000); with --file, at most this many "
                        "rows, the first of the file (default: all)")
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
                        help="last simulated day of the rows (default: today, UTC; "
                        "simulator only)")
    replay.add_argument("--days", type=int, default=None,
                        help="days of simulator rows ending on --day (default 7; simulator "
                        "only)")
    replay.add_argument("--seed", type=int, default=0)
    replay.add_argument("--refresh-features", action="store_true",
                        help="first rebuild the offline feature days of the replayed world (the "
                        "last two, and every day since the spec's scenario_start) and "
                        "re-materialize the online store (demo stores only; simulator only)")
    replay.add_argument("--allow-remote", action="store_true",
                        help="allow a non-loopback URL")


def _add_platform(commands: argparse._SubParsersAction) -> None:
    """``airmlops platform up|down|status``: the options of ``python -m airmlops.platform``."""
    from airmlops.platform.commands import DESCRIPTION, add_commands

    platform = commands.add_parser("platform", help="start, stop and inspect the platform",
                                   description=DESCRIPTION)
    add_commands(platform.add_subparsers(dest="platform_command", required=True))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="airmlops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_platform(commands)
    spec = commands.add_parser("spec", help="pipeline specs")
    spec_commands = spec.add_subparsers(dest="spec_command", required=True)
    check = spec_commands.add_parser("check", help="validate spec files (all when none given)")
    check.add_argument("paths", nargs="*", type=Path)
    _add_replay(commands)
    args = parser.parse_args(argv)
    if args.command == "platform":
        from airmlops.platform.commands import run

        return run(args)
    if args.command == "spec" and args.spec_command == "check":
        return _spec_check(args.paths)
    if args.command == "replay":
        return _replay(args)
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
