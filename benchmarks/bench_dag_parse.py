"""Benchmark 8: DAG-folder parse time with 1, 10, 50 and 200 pipeline specs.

N copies of the demo spec (``include/pipelines/churn.yaml``, renamed ``churn0001`` … and each
with its own port) go into a scratch pipelines folder; then ``dags/ml_pipelines.py`` runs with
``MLOPS_PIPELINES_DIR`` pointing there, each time in a fresh interpreter that has only
``airflow.sdk`` imported, as the DAG processor has (the probe below). Per run: the wall and CPU
time of the file's execution (``runpy.run_path``), the process's peak resident set (``VmHWM``)
and how much the parse added to it, the DAGs and tasks it made. Sizes run in rounds, the order
rotating each round, so that a busy moment weighs on every size alike; the tables give medians.

Per-spec cost at N = (median parse time at N - median at 1 spec) / (N - 1): the fixed cost (the
package's imports) is left out, and a flat per-spec cost is the goal. One more case per round
reads the 200 specs' YAML with PyYAML's pure-Python parser (``spec_parsing._FastSpecLoader`` set
to None in the child), the way every spec was read before this benchmark's fix.

Airflow's own view: a ``DagBag`` over the repository's ``dags/`` folder in a fresh Airflow home
(SQLite, no examples, no database needed for parsing), in its own process, for each size: the
file's parse duration as the DagBag records it (``FileLoadStat.duration``, what the DAG
processor reports) and the time to serialize every DAG (what the processor stores).

One more run per size under cProfile counts the Python function calls of the parse: the work
done, which the machine's load does not change, so a per-spec count that stays the same from 10
to 200 specs shows that no code of the parse grows with the number of specs.

The scheduler's loop time with these sizes is measured by ``bench_scale_scheduler.py``, on a
running platform.

Run: ``.venv/bin/python benchmarks/bench_dag_parse.py`` (``--quick``: fewer rounds).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

SIZES = (1, 10, 50, 200)
DAG_FILE = common.REPO_ROOT / "dags" / "ml_pipelines.py"
DEMO_SPEC = common.REPO_ROOT / "include" / "pipelines" / "churn.yaml"
PURE_YAML = "200, PyYAML parser"
GOAL_50_SPECS_S = 2.0
FLAT_RATIO = 1.25
"""Per-spec cost counts as flat when the cost at 200 specs is within 25 % of the cost at 10."""

PROBE = r"""
import json, runpy, sys, time
from pathlib import Path

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024

import airflow.sdk  # the DAG processor has Airflow imported already
if sys.argv[2] == "pure-yaml":
    import airmlops.spec_parsing
    airmlops.spec_parsing._FastSpecLoader = None
rss_before = status("VmRSS")
heavy = ("sklearn", "mlflow", "great_expectations", "evidently", "bentoml", "pandas")
calls = None
wall, cpu = time.perf_counter(), time.process_time()
if sys.argv[2] == "calls":  # function calls made: the parse's work, whatever the machine's load
    import cProfile, pstats
    profile = cProfile.Profile()
    namespace = profile.runcall(runpy.run_path, sys.argv[1])
    calls = sum(row[1] for row in pstats.Stats(profile).stats.values())
else:
    namespace = runpy.run_path(sys.argv[1])
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
from airflow.sdk import DAG
dags = {v.dag_id: v for v in namespace.values() if isinstance(v, DAG)}
print(json.dumps({
    "wall_s": wall, "cpu_s": cpu, "calls": calls, "rss_before_mb": rss_before,
    "vmhwm_mb": status("VmHWM"),
    "dags": len(dags), "tasks": sum(len(d.tasks) for d in dags.values()),
    "invalid": sorted(i for i in dags if i.endswith("_invalid_spec")),
    "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(heavy)),
}))
"""

DAGBAG_PROBE = r"""
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.serialized_objects import DagSerialization

bag = DagBag(dag_folder=sys.argv[1], safe_mode=False)
started = time.perf_counter()
for dag in bag.dags.values():
    DagSerialization.to_dict(dag)
serialize = time.perf_counter() - started
[stat] = [s for s in bag.dagbag_stats if s.file.endswith("ml_pipelines.py")]
duration = stat.duration.total_seconds() if hasattr(stat.duration, "total_seconds") else float(
    stat.duration)
print(json.dumps({"parse_s": duration, "serialize_s": serialize, "dags": stat.dag_num,
                  "tasks": stat.task_num, "errors": len(bag.import_errors)}))
"""


def write_specs(folder: Path, count: int) -> Path:
    """``count`` renamed copies of the demo spec (own name, own port) in ``folder``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    demo = DEMO_SPEC.read_text()
    for index in range(1, count + 1):
        text, names = re.subn(r"(?m)^name: churn$", f"name: churn{index:04d}", demo)
        text, ports = re.subn(r"(?m)^(  port: )8600\b", rf"\g<1>{20000 + index}", text)
        if (names, ports) != (1, 1):
            raise RuntimeError(f"{DEMO_SPEC} no longer has one 'name: churn' and one port 8600")
        (folder / f"churn{index:04d}.yaml").write_text(text)
    return folder


def child_env(home: Path, pipelines: Path) -> dict[str, str]:
    """This environment without Airflow/platform settings, plus a fresh Airflow home."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AIRFLOW__", "MLOPS_", "MLFLOW_"))}
    env.update({
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAG_FILE.parent),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "MLOPS_PIPELINES_DIR": str(pipelines),
        "MLOPS_DATA_ROOT": str(home / "data"),
        "PYTHONWARNINGS": "ignore",
    })
    return env


def run_child(code: str, argv: list[str], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run ``python -c code argv`` (a fresh interpreter); its JSON answer plus its peak RSS."""
    done = common.run_measured([common.PYTHON, "-c", code, *argv], env=env, timeout=timeout,
                               cwd=Path(env["AIRFLOW_HOME"]))
    if done["timed_out"] or done["returncode"] != 0:
        raise RuntimeError(f"probe {argv} failed ({done['returncode']}, timed out: "
                           f"{done['timed_out']}):\n{done['stderr'][-3000:]}")
    answer = common.last_json_line(done["stdout"])
    answer["process_wall_s"] = done["wall_s"]
    answer["peak_rss_mb"] = done["peak_rss_mb"]
    return answer


def measure_parse(folders: dict[int, Path], home: Path, rounds: int) -> dict[str, list[dict]]:
    """Every size (and the pure-PyYAML case) once per round, the order rotating each round."""
    cases = [*((str(n), folders[n], "fast") for n in SIZES), (PURE_YAML, folders[200],
                                                                "pure-yaml")]
    runs: dict[str, list[dict]] = {name: [] for name, *_ in cases}
    for index in range(rounds):
        order = cases[index % len(cases):] + cases[:index % len(cases)]
        for name, folder, mode in order:
            answer = run_child(PROBE, [str(DAG_FILE), mode], child_env(home, folder), 300)
            runs[name].append(answer)
            common.log(f"round {index + 1}/{rounds}, {name} specs: parse {answer['wall_s']:.3f} s"
                       f" wall, {answer['cpu_s']:.3f} s CPU, {answer['dags']} DAGs")
    return runs


def measure_calls(folders: dict[int, Path], home: Path) -> dict[int, int]:
    """Python function calls of one parse per size (under cProfile): a count of the work that
    the machine's load does not change, so its growth per spec shows any non-linear code."""
    calls = {}
    for n in SIZES:
        calls[n] = run_child(PROBE, [str(DAG_FILE), "calls"], child_env(home, folders[n]),
                             600)["calls"]
        common.log(f"{n} specs: {calls[n]:,} function calls")
    return calls


def measure_dagbag(folders: dict[int, Path], home: Path, rounds: int,
                   sizes: tuple[int, ...] = SIZES) -> dict[int, list[dict]]:
    """Airflow's DagBag over dags/ for each size, ``rounds`` times (sizes rotating)."""
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    for index in range(rounds):
        for n in sizes[index % len(sizes):] + sizes[:index % len(sizes)]:
            answer = run_child(DAGBAG_PROBE, [str(DAG_FILE.parent)],
                               child_env(home, folders[n]), 300)
            if answer["errors"]:
                raise RuntimeError(f"the DagBag has import errors with {n} specs: {answer}")
            runs[n].append(answer)
            common.log(f"DagBag round {index + 1}/{rounds}, {n} specs: "
                       f"{answer['parse_s']:.3f} s parse, {answer['serialize_s']:.3f} s serialize")
    return runs


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def summarize(runs: dict[str, list[dict]], bag: dict[int, list[dict]],
              calls: dict[int, int]) -> dict[str, Any]:
    """Medians per size, the per-spec costs, the goals."""
    base_wall, base_cpu = median(runs["1"], "wall_s"), median(runs["1"], "cpu_s")
    sizes = []
    for n in SIZES:
        rows = runs[str(n)]
        first = rows[0]
        if first["invalid"] or first["heavy"] or first["dags"] != 4 * n:
            raise RuntimeError(f"{n} specs gave an unexpected parse: {first}")
        wall, cpu = median(rows, "wall_s"), median(rows, "cpu_s")
        sizes.append({
            "specs": n, "dags": first["dags"], "tasks": first["tasks"], "wall_s": wall,
            "wall_min_s": min(r["wall_s"] for r in rows),
            "wall_max_s": max(r["wall_s"] for r in rows), "cpu_s": cpu,
            "per_spec_wall_ms": (wall - base_wall) / (n - 1) * 1e3 if n > 1 else None,
            "per_spec_cpu_ms": (cpu - base_cpu) / (n - 1) * 1e3 if n > 1 else None,
            "calls": calls.get(n),
            "per_spec_calls": (calls[n] - calls[1]) / (n - 1) if n > 1 and calls else None,
            "peak_rss_mb": median(rows, "vmhwm_mb"),
            "parse_rss_mb": statistics.median(r["vmhwm_mb"] - r["rss_before_mb"] for r in rows),
            "dagbag_parse_s": median(bag[n], "parse_s") if bag.get(n) else None,
            "dagbag_serialize_s": median(bag[n], "serialize_s") if bag.get(n) else None,
        })
    by_size = {s["specs"]: s for s in sizes}
    pure = runs[PURE_YAML]
    flat_wall = by_size[200]["per_spec_wall_ms"] / by_size[10]["per_spec_wall_ms"]
    flat_cpu = by_size[200]["per_spec_cpu_ms"] / by_size[10]["per_spec_cpu_ms"]
    return {
        "sizes": sizes,
        "pure_yaml_200": {"wall_s": median(pure, "wall_s"), "cpu_s": median(pure, "cpu_s")},
        "goals": {"parse_50_specs_s": by_size[50]["wall_s"],
                  "parse_50_specs_ok": by_size[50]["wall_s"] <= GOAL_50_SPECS_S,
                  "per_spec_ratio_200_vs_10_wall": flat_wall,
                  "per_spec_ratio_200_vs_10_cpu": flat_cpu,
                  "per_spec_flat": min(flat_wall, flat_cpu) <= FLAT_RATIO,
                  "per_spec_ratio_200_vs_10_calls": (
                      by_size[200]["per_spec_calls"] / by_size[10]["per_spec_calls"]
                      if calls else None)},
    }


def plot(summary: dict[str, Any], path: Path) -> bool:
    """The parse-time curve and the per-spec cost as a PNG; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sizes = summary["sizes"]
    specs = [s["specs"] for s in sizes]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(specs, [s["wall_s"] for s in sizes], "o-", label="wall (median)")
    left.plot(specs, [s["cpu_s"] for s in sizes], "s--", label="CPU (median)")
    if all(s["dagbag_parse_s"] is not None for s in sizes):
        left.plot(specs, [s["dagbag_parse_s"] for s in sizes], "^:", label="Airflow DagBag")
    left.axhline(GOAL_50_SPECS_S, color="grey", linewidth=0.8, label="goal at 50 specs")
    left.set(xlabel="pipeline specs", ylabel="seconds", title="dags/ml_pipelines.py parse")
    left.legend()
    right.plot(specs[1:], [s["per_spec_wall_ms"] for s in sizes[1:]], "o-", label="wall")
    right.plot(specs[1:], [s["per_spec_cpu_ms"] for s in sizes[1:]], "s--", label="CPU")
    right.set(xlabel="pipeline specs", ylabel="ms per spec", xscale="log",
              title="per-spec cost ((t(N) - t(1)) / (N - 1))", ylim=(0, None))
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def report(summary: dict[str, Any], rounds: int, bag_rounds: int, loads: list[str],
           png: bool) -> None:
    """Print the tables and write results/dag_parse.json and .md."""
    rows = [[s["specs"], s["dags"], s["tasks"], s["wall_s"],
             f"{s['wall_min_s']:.2f}-{s['wall_max_s']:.2f}", s["cpu_s"], s["per_spec_wall_ms"],
             s["per_spec_cpu_ms"], s["per_spec_calls"], s["peak_rss_mb"], s["parse_rss_mb"],
             s["dagbag_parse_s"], s["dagbag_serialize_s"]] for s in summary["sizes"]]
    goals = summary["goals"]
    by_size = {s["specs"]: s for s in summary["sizes"]}
    pure = summary["pure_yaml_200"]
    common.write_results(
        "dag_parse", "8. DAG-folder parse time with 1 to 200 pipeline specs", summary,
        [("", ["specs", "DAGs", "tasks", "parse wall s (median)", "min-max", "parse CPU s",
               "per spec ms (wall)", "per spec ms (CPU)", "per spec Python calls",
               "peak RSS MB", "RSS added MB",
               "Airflow DagBag parse s", "serialize s"], rows),
         ("Goals (issue 18)", ["goal", "measured", "met"],
          [["parse time of 50 specs <= 2 s (wall, median)", f"{goals['parse_50_specs_s']:.2f} s",
            goals["parse_50_specs_ok"]],
           ["per-spec cost flat from 10 to 200 (cost at 200 / cost at 10 <= "
            f"{FLAT_RATIO})", f"{goals['per_spec_ratio_200_vs_10_wall']:.2f} wall, "
            f"{goals['per_spec_ratio_200_vs_10_cpu']:.2f} CPU", goals["per_spec_flat"]],
           ["per-spec work flat from 10 to 200 (Python calls per spec, 200 / 10, <= "
            f"{FLAT_RATIO})", f"{goals['per_spec_ratio_200_vs_10_calls']:.3f}",
            goals["per_spec_ratio_200_vs_10_calls"] <= FLAT_RATIO]]),
         ("The fix: spec YAML read by libyaml (200 specs, same rounds)",
          ["YAML parser", "parse wall s", "parse CPU s"],
          [["PyYAML pure Python (before)", pure["wall_s"], pure["cpu_s"]],
           ["libyaml, PyYAML's refusals kept (now)", by_size[200]["wall_s"],
            by_size[200]["cpu_s"]]])],
        notes=[f"each size ran {rounds} times (order rotating per round) in a fresh interpreter "
               "with only airflow.sdk imported (as the DAG processor); the DagBag "
               f"{bag_rounds} times per size in a fresh Airflow home (SQLite)",
               "per spec = (median at N - median at 1 spec) / (N - 1): the fixed cost (imports) "
               "left out; peak RSS = the probe's VmHWM, RSS added = VmHWM - VmRSS before the "
               "parse",
               f"load average (1 / 5 min) before {loads[0]}, after {loads[1]}: other work on "
               "the machine shows in wall times; CPU times are steadier",
               "the DagBag runs in a process that has more of Airflow imported (its own "
               "import time is not counted), so its parse is shorter than the probe's; "
               "serialize = DagSerialization.to_dict of every DAG, what the DAG processor "
               "stores after each parse: most of it is Airflow validating each task's copy of "
               "the DAG params with jsonschema (check_schema per Param per task)",
               "per spec Python calls = (function calls at N - at 1 spec) / (N - 1), counted "
               "once per size under cProfile: the same count at every N means the parse does "
               "the same work per spec, whatever the timings say",
               "scheduler loop time with 1 to 200 specs: results/scale_scheduler.md",
               "curve: results/dag_parse.png" if png else
               "no curve: matplotlib is not installed in the venv"])


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} / {five:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="parse runs per size")
    parser.add_argument("--dagbag-rounds", type=int, default=1,
                        help="DagBag runs per size (200 specs: about a minute each, serializing)")
    parser.add_argument("--quick", action="store_true",
                        help="3 parse rounds; the DagBag once, up to 50 specs")
    args = parser.parse_args()
    rounds, bag_rounds = (3, 1) if args.quick else (args.rounds, args.dagbag_rounds)
    bag_sizes = tuple(n for n in SIZES if n <= 50) if args.quick else SIZES
    loads = [load()]
    common.WORK_DIR.mkdir(parents=True, exist_ok=True)
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="dag-parse-", dir=common.WORK_DIR))
    try:
        folders = {n: write_specs(scratch / f"pipelines-{n}", n) for n in SIZES}
        home = scratch / "airflow-home"
        home.mkdir()
        started = time.perf_counter()
        runs = measure_parse(folders, home, rounds)
        calls = measure_calls(folders, home)
        bag = measure_dagbag(folders, home, bag_rounds, bag_sizes) if bag_rounds > 0 else {}
        common.log(f"measured in {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    loads.append(load())
    summary = summarize(runs, bag, calls)
    summary.update(rounds=rounds, dagbag_rounds=bag_rounds, load_before=loads[0],
                   load_after=loads[1], runs=runs, dagbag_runs=bag)
    png = plot(summary, common.RESULTS_DIR / "dag_parse.png")
    report(summary, rounds, bag_rounds, loads, png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
