"""Run every benchmark (``make bench``): each in its own process, bounded, in under 30 minutes.

Prepares what the benchmarks share (a ``redis-server`` binary, the bench-only Feast venv
``benchmarks/.venv-feast``), then runs, in order: online features, point-in-time retrieval,
monitoring, serving, the canary split, shadow mirroring, the training DAG, DAG-folder parse
time. Each writes ``results/<name>.json`` and ``.md``; this script writes
``results/summary.md`` / ``summary.json`` (status, duration and the machine's load average
around each benchmark: other work on the machine skews latency) and replaces the figures
between the markers in ``benchmarks/README.md``.

    .venv/bin/python benchmarks/run_all.py                 # everything
    .venv/bin/python benchmarks/run_all.py --only online,pit
    .venv/bin/python benchmarks/run_all.py --quick         # a smoke run (~10 min)
    .venv/bin/python benchmarks/run_all.py --summary-only  # rebuild summary/README only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

BUDGET_S = 30 * 60
BENCHMARKS = (
    # name, script, timeout (s), extra arguments for --quick
    ("online", "bench_online.py", 420, ["--quick"]),
    ("pit", "bench_pit.py", 720, ["--rows", "100000"]),
    ("monitoring", "bench_monitoring.py", 540, ["--sizes", "100000"]),
    ("serving", "bench_serving.py", 720, ["--quick"]),
    ("canary", "bench_canary.py", 180, ["--quick"]),
    ("shadow", "bench_shadow.py", 600, ["--quick"]),
    ("training_dag", "bench_training_dag.py", 420, []),
    ("dag_parse", "bench_dag_parse.py", 600, ["--quick"]),
)
README = common.BENCH_DIR / "README.md"
START_MARKER = "<!-- results:start (written by run_all.py) -->"
END_MARKER = "<!-- results:end -->"


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} / {five:.1f}"


def prepare() -> None:
    common.log("preparing: redis-server, the bench-only Feast venv")
    if subprocess.run(["bash", str(common.REPO_ROOT / "scripts" / "ensure-redis.sh")],
                      capture_output=True).returncode != 0:
        common.log("scripts/ensure-redis.sh failed: the online and serving benchmarks need Redis")
    common.ensure_feast_venv()
    common.ensure_profiler()


def previous_entries() -> dict[str, dict]:
    """The status rows of the last summary (kept for benchmarks this run did not run)."""
    path = common.RESULTS_DIR / "summary.json"
    try:
        return {e["name"]: e for e in json.loads(path.read_text())["benchmarks"]
                if e.get("status") != "ok (run on its own)"}
    except (OSError, ValueError, KeyError):
        return {}


def measured_at(name: str) -> str:
    try:
        data = json.loads((common.RESULTS_DIR / f"{name}.json").read_text())
        return str(data.get("measured_at", "-"))
    except (OSError, ValueError):
        return "-"


def run_on_its_own(name: str) -> dict | None:
    """A status row for results a benchmark wrote when run by itself (not through this script)."""
    if not (common.RESULTS_DIR / f"{name}.json").exists():
        return None
    return {"name": name, "status": "ok (run on its own)", "seconds": "-", "load_before": "-"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated names: " + ", ".join(
        name for name, *_ in BENCHMARKS))
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter runs")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    parser.add_argument("--summary-only", action="store_true",
                        help="run nothing: rebuild the summary and README figures from results/")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else {name for name, *_ in BENCHMARKS}
    unknown = wanted - {name for name, *_ in BENCHMARKS}
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}")

    began = time.monotonic()
    if args.summary_only:
        wanted = set()
    else:
        prepare()
    summary = []
    # A scratch cwd: nothing a benchmark or a library writes by default lands in the repository.
    scratch = Path(tempfile.mkdtemp(prefix="bench-cwd-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name, script, timeout, quick_args in BENCHMARKS:
        if name not in wanted:
            continue
        remaining = BUDGET_S - (time.monotonic() - began)
        entry = {"name": name, "load_before": load()}
        if remaining < 60:
            entry.update(status="skipped: the 30-minute budget is spent", seconds=0.0)
            summary.append(entry)
            continue
        argv = [common.PYTHON, str(common.BENCH_DIR / script), *(quick_args if args.quick
                                                                 else [])]
        common.log(f"running {name} (timeout {min(timeout, remaining):.0f} s)")
        started = time.monotonic()
        try:
            done = subprocess.run(argv, cwd=scratch, env=env, timeout=min(timeout, remaining))
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"stopped after {min(timeout, remaining):.0f} s"
        entry.update(status=status, seconds=round(time.monotonic() - started, 1),
                     load_after=load())
        summary.append(entry)
        common.log(f"{name}: {status} in {entry['seconds']:.0f} s")
    total = time.monotonic() - began
    earlier = previous_entries()
    ran_now = {e["name"] for e in summary}
    summary = [next((e for e in summary if e["name"] == name), None)
               or earlier.get(name) or run_on_its_own(name) for name, *_ in BENCHMARKS]
    summary = [e for e in summary if e is not None]
    for entry in summary:
        entry["measured_at"] = measured_at(entry["name"])
        entry["this_run"] = entry["name"] in ran_now

    suite = sum(e["seconds"] for e in summary if isinstance(e["seconds"], (int, float)))
    parts = [f"{common.machine()['cores']} cores, {common.machine()['memory_gb']} GB "
             f"({common.machine()['cpu']}){' (--quick)' if args.quick else ''}; the benchmarks "
             f"below took {suite / 60:.1f} min in all.", "",
             common.markdown_table(["benchmark", "status", "seconds", "measured at (UTC)",
                                    "load avg before (1/5 min)", "after"],
                                   [[e["name"], e["status"], e["seconds"], e["measured_at"],
                                     e["load_before"], e.get("load_after", "-")]
                                    for e in summary]), ""]
    ran = {e["name"]: e for e in summary}
    for name, *_ in BENCHMARKS:  # the latest results of each benchmark
        path = common.RESULTS_DIR / f"{name}.md"
        if not path.exists() or (name in ran and not ran[name]["status"].startswith("ok")):
            continue
        parts += [path.read_text().replace("\n## ", "\n### ").replace("## ", "### ", 1), ""]
    text = "\n".join(parts).rstrip() + "\n"
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / "summary.md").write_text(text)
    (common.RESULTS_DIR / "summary.json").write_text(json.dumps(
        {"total_s": total, "quick": args.quick, "machine": common.machine(),
         "benchmarks": summary}, indent=2) + "\n")
    if not args.no_readme and not args.quick and README.exists():
        readme = README.read_text()
        if START_MARKER in readme and END_MARKER in readme:
            head, rest = readme.split(START_MARKER, 1)
            _, tail = rest.split(END_MARKER, 1)
            README.write_text(f"{head}{START_MARKER}\n\n{text}\n{END_MARKER}{tail}")
    print(text, flush=True)
    return 0 if all(e["status"] == "ok" for e in summary if e["this_run"]) else 1


if __name__ == "__main__":
    sys.exit(main())
