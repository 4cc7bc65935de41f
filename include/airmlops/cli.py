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
        else:
            print(f"ok  {path}  ({spec.name}: {spec.task}, {len(spec.features)} features)")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="airmlops", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    spec = commands.add_parser("spec", help="pipeline specs")
    spec_commands = spec.add_subparsers(dest="spec_command", required=True)
    check = spec_commands.add_parser("check", help="validate spec files (all when none given)")
    check.add_argument("paths", nargs="*", type=Path)
    args = parser.parse_args(argv)
    if args.command == "spec" and args.spec_command == "check":
        return _spec_check(args.paths)
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
