"""What every benchmark shares: paths, result files, a private Redis, child-process measurement,
the bench-only Feast environment and the feature-store data set of benchmarks 2 and 3.

Nothing here runs at import time. Every server a benchmark starts binds 127.0.0.1 on a free port
and is stopped by the benchmark itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
WORK_DIR = Path(os.environ.get("AIRMLOPS_BENCH_WORK", tempfile.gettempdir())) / "airmlops-bench"
"""Scratch data (feature stores, models, Airflow homes); reused between runs where keyed."""
FEAST_VENV = BENCH_DIR / ".venv-feast"
FEAST_REQUIREMENTS = ("feast[redis,duckdb]==0.67.*",)
"""Feast pins redis<8 and pulls its own pyarrow/duckdb/ibis: it lives in its own venv."""
PYTHON = sys.executable

# The feature-store data set of benchmarks 2 and 3 (the shape: 3 views, 14 features,
# 2 on-demand features, 100k customers); 30 days of daily activity.
CUSTOMERS = 100_000
DAYS = 30
START = dt.date(2026, 1, 1)
PIPELINE = "bench"
DATA_VERSION = "features-v1"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- results ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    memory_gb = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 2**20, 1)
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cores": os.cpu_count(), "memory_gb": memory_gb, "cpu": cpu,
            "python": platform.python_version(), "kernel": platform.release()}


def fmt(value: Any, digits: int = 2) -> str:
    """A table cell: numbers rounded, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}f}" if abs(value) >= 0.01 or value == 0 else f"{value:.4f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, title: str, results: Mapping[str, Any],
                  tables: Sequence[tuple[str, Sequence[str], Sequence[Sequence[Any]]]],
                  notes: Sequence[str] = ()) -> Path:
    """Print the tables and write ``results/<name>.json`` and ``results/<name>.md``.

    ``tables`` holds (caption, headers, rows). The JSON has the raw numbers, the machine and the
    time; the markdown is what the README quotes.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    measured_at = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    payload = {"benchmark": name, "title": title, "measured_at": measured_at,
               "machine": machine(), "results": results, "notes": list(notes)}
    parts = [f"## {title}", "", f"Measured {measured_at} on {machine()['cores']} cores "
             f"({machine()['cpu'] or 'unknown CPU'}).", ""]
    for caption, headers, rows in tables:
        if caption:
            parts += [f"**{caption}**", ""]
        parts += [markdown_table(headers, rows), ""]
    parts += [f"- {note}" for note in notes]
    text = "\n".join(parts).rstrip() + "\n"
    _atomic_write(RESULTS_DIR / f"{name}.json", json.dumps(payload, indent=2, default=str) + "\n")
    _atomic_write(RESULTS_DIR / f"{name}.md", text)
    print("\n" + text, flush=True)
    return RESULTS_DIR / f"{name}.json"


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def percentiles_ms(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max in milliseconds of latencies in seconds (nearest rank)."""
    if not seconds:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(seconds)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * 1e3

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": ordered[-1] * 1e3}


# --- processes and servers -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_measured(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
                 timeout: float = 900.0, cwd: Path | None = None) -> dict[str, Any]:
    """Run ``argv`` to completion; return wall time, its peak RSS (from ``wait4``), output.

    The peak is the child's own maximum resident set (its imports included), which is what
    ``/usr/bin/time -v`` reports as "Maximum resident set size".
    """
    started = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(argv), env=dict(env) if env is not None else None,
                                stdout=out, stderr=err, cwd=cwd)
        deadline = time.monotonic() + timeout
        status = rusage = None
        while True:
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    return {"returncode": proc.returncode, "wall_s": wall, "peak_rss_mb": rusage.ru_maxrss / 1024,
            "cpu_s": rusage.ru_utime + rusage.ru_stime, "stdout": stdout, "stderr": stderr,
            "timed_out": time.monotonic() > deadline}


def memory_status_mb(key: str = "VmHWM") -> float | None:
    """This process's ``VmHWM`` (peak resident set) or ``VmRSS`` from /proc, in MB.

    Workers report their own peak this way: ``wait4``'s ``ru_maxrss`` of a child also counts the
    parent's resident set at fork time, which inflates it when the parent is large.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return None


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU seconds of the processes ``pids`` so far (a gone one counts 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
    return total


def last_json_line(text: str) -> dict[str, Any]:
    """The last line of ``text`` that parses as a JSON object (a worker's answer)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                return json.loads(line)
    raise ValueError(f"no JSON line in the output:\n{text[-3000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM the process group ``proc`` leads (it was started with a new session), then KILL."""
    import signal

    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A private ``redis-server`` on a free loopback port (persistence off), started and stopped
    the way the tests start theirs (``tests/integration/redis_fixture.py``); yields its URL."""
    sys.path.insert(0, str(REPO_ROOT / "tests" / "integration"))
    from redis_fixture import run_redis_server

    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    try:
        with contextlib.contextmanager(run_redis_server)(workdir) as url:
            yield url
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --- the bench-only Feast environment -------------------------------------------------------


def ensure_feast_venv() -> Path:
    """``benchmarks/.venv-feast`` with Feast 0.67 (created with uv on first use); its python."""
    python = FEAST_VENV / "bin" / "python"
    stamp = FEAST_VENV / ".installed"
    wanted = "\n".join(FEAST_REQUIREMENTS)
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    uv = shutil.which("uv")
    if uv is None:
        subprocess.run([PYTHON, "-m", "pip", "install", "--quiet", "uv"], check=True)
        uv = shutil.which("uv") or str(Path(PYTHON).with_name("uv"))
    log(f"creating {FEAST_VENV} with {', '.join(FEAST_REQUIREMENTS)}")
    if not python.exists():
        subprocess.run([uv, "venv", "--quiet", "--python",
                        f"{sys.version_info.major}.{sys.version_info.minor}", str(FEAST_VENV)],
                       check=True, timeout=600)
    subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python),
                    *FEAST_REQUIREMENTS], check=True, timeout=1200)
    stamp.write_text(wanted)
    return python


def ensure_profiler() -> Path | None:
    """py-spy in the bench-only venv (never in the project's); its venv's python, or None."""
    python = ensure_feast_venv()
    if (FEAST_VENV / "bin" / "py-spy").exists():
        return python
    uv = shutil.which("uv")
    if uv is None:
        return None
    done = subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), "py-spy"],
                          capture_output=True, timeout=600)
    return python if done.returncode == 0 and (FEAST_VENV / "bin" / "py-spy").exists() else None


def feast_version(python: Path) -> str:
    done = subprocess.run([str(python), "-c", "import feast; print(feast.__version__)"],
                          capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip()


# --- the feature-store data set (benchmarks 2 and 3) ----------------------------------------


def feature_set() -> Any:
    """3 views (activity 6, billing 4, profile 4 = 14 features) and 2 on-demand features."""
    from airmlops.features.definitions import FeatureSet

    activity = [{"column": c, "function": f, "window_days": w}
                for c in ("sessions", "minutes_watched") for f, w in (("sum", 7), ("sum", 30),
                                                                      ("mean", 7))]
    billing = [{"column": "support_tickets", "function": "sum", "window_days": 30},
               {"column": "payment_failures", "function": "sum", "window_days": 30},
               {"column": "payment_failures", "function": "max", "window_days": 7},
               {"column": "support_tickets", "function": "count", "window_days": 7}]
    return FeatureSet.model_validate({
        "entities": [{"name": "customer", "join_key": "customer_id"}],
        "request_fields": ["event_timestamp"],
        "views": [
            {"name": "activity", "entity": "customer", "source": "events", "ttl_days": 2,
             "aggregations": activity},
            {"name": "billing", "entity": "customer", "source": "events", "ttl_days": 2,
             "aggregations": billing},
            {"name": "profile", "entity": "customer", "source": "profiles", "ttl_days": 400,
             "columns": ["plan", "region", "age", "monthly_fee"]},
        ],
        "on_demand": [
            {"name": "minutes_per_session", "function": "minutes_per_session",
             "inputs": ["activity__minutes_watched_sum_7d", "activity__sessions_sum_7d"]},
            {"name": "fee_per_minute", "function": "fee_per_minute",
             "inputs": ["profile__monthly_fee", "activity__minutes_watched_sum_30d"]},
        ],
    })


def synthetic_events(customers: int = CUSTOMERS, days: int = DAYS, seed: int = 0) -> Any:
    """One event per customer per day (random time of day), with activity and profile columns."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    n = customers * days
    day = np.repeat(np.arange(days), customers)
    stamps = (pd.Timestamp(START, tz="UTC") + pd.to_timedelta(day, unit="D")
              + pd.to_timedelta(rng.integers(0, 86_400, n), unit="s"))
    return pd.DataFrame({
        "customer_id": np.tile(np.arange(customers, dtype=np.int64), days),
        "event_timestamp": stamps,
        "sessions": rng.poisson(3, n),
        "minutes_watched": np.where(rng.random(n) < 0.03, np.nan, rng.gamma(2, 30, n)),
        "support_tickets": rng.poisson(0.1, n),
        "payment_failures": rng.poisson(0.05, n),
        "plan": rng.choice(np.array(["basic", "standard", "premium"], dtype=object), n),
        "region": rng.choice(np.array(["north", "south", "east", "west"], dtype=object), n),
        "age": rng.integers(18, 90, n),
        "monthly_fee": rng.choice([9.99, 14.99, 19.99], n),
    })


def feature_data_root() -> Path:
    """The offline store of the shared data set, built once (about 20 s) and reused."""
    root = WORK_DIR / DATA_VERSION
    marker = root / ".complete"
    if marker.exists():
        return root
    from airmlops.features.compute import compute_view
    from airmlops.features.offline import write_view_rows

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    started = time.perf_counter()
    events = synthetic_events()
    for view in feature_set().views:
        rows = compute_view(events, view, timestamp_column="event_timestamp")
        write_view_rows(rows, view, root, PIPELINE)
    marker.write_text(json.dumps({"customers": CUSTOMERS, "days": DAYS, "events": len(events)}))
    log(f"feature data set built in {time.perf_counter() - started:.1f} s at {root}")
    return root


def feast_sources(root: Path) -> dict[str, Path]:
    """Each view's offline rows as one Parquet file (Feast's FileSource input), made once;
    columns are named as Feast names features, without the ``<view>__`` prefix."""
    from airmlops.features.offline import read_view_table

    folder = root / "feast-sources-v2"
    paths = {view.name: folder / f"{view.name}.parquet" for view in feature_set().views}
    if all(p.exists() for p in paths.values()):
        return paths
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for view in feature_set().views:
        table = read_view_table(view, root, PIPELINE)
        # Feast names source columns like its features: without the view prefix.
        table = table.rename_columns([c.split("__", 1)[-1] for c in table.column_names])
        temporary = paths[view.name].with_suffix(".tmp")
        pq.write_table(table, temporary)
        os.replace(temporary, paths[view.name])
    return paths


def feast_spec(root: Path) -> dict[str, Any]:
    """The feature definitions in the plain form the Feast worker turns into Feast objects."""
    import pyarrow.parquet as pq

    sources = feast_sources(root)
    views = []
    for view in feature_set().views:
        schema = pq.read_schema(sources[view.name])
        fields = []
        for name in view.feature_names:
            kind = schema.field(name.split("__", 1)[1]).type
            dtype = ("String" if str(kind) in ("string", "large_string") else
                     "Int64" if str(kind).startswith("int") else "Float64")
            fields.append({"name": name.split("__", 1)[1], "dtype": dtype})
        views.append({"name": view.name, "ttl_days": view.ttl_days,
                      "path": str(sources[view.name]), "fields": fields})
    on_demand = [{"name": f.name, "function": f.function, "inputs": list(f.inputs)}
                 for f in feature_set().on_demand]
    return {"entity": "customer", "join_key": "customer_id", "views": views,
            "on_demand": on_demand}


def run_feast(python: Path, command: str, args: Mapping[str, Any], *,
              timeout: float = 900.0) -> dict[str, Any]:
    """Run ``feast_worker.py <command>`` in the Feast venv; its JSON answer plus wall/peak.

    A worker killed at ``timeout`` answers ``{"timed_out": True, ...}`` instead of raising."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["FEAST_USAGE"] = "False"
    env["PYTHONWARNINGS"] = "ignore"
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="feast-args-") as handle:
        json.dump(dict(args), handle)
        handle.flush()
        done = run_measured([str(python), str(BENCH_DIR / "feast_worker.py"), command,
                             f"@{handle.name}"], env=env, timeout=timeout)
    if done["timed_out"]:
        return {"timed_out": True, "timeout_s": timeout,
                "_process": {k: done[k] for k in ("wall_s", "peak_rss_mb", "cpu_s")}}
    if done["returncode"] != 0:
        raise RuntimeError(f"feast worker {command} failed ({done['returncode']}):\n"
                           f"{done['stderr'][-4000:]}")
    answer = last_json_line(done["stdout"])
    answer["_process"] = process_figures(done, answer)
    return answer


def process_figures(done: Mapping[str, Any], answer: Mapping[str, Any]) -> dict[str, Any]:
    """Wall, CPU and peak RSS of a finished worker (its own VmHWM when it reported one)."""
    peak = answer.get("vmhwm_mb") or done["peak_rss_mb"]
    return {"wall_s": done["wall_s"], "cpu_s": done["cpu_s"], "peak_rss_mb": peak}


def run_worker(script: str, kind: str, *args: str, timeout: float = 900) -> dict[str, Any]:
    """Run ``script --worker kind args...`` in this venv; its JSON answer, with its wall, CPU
    and peak memory under ``_process``. A failed worker raises with the end of its stderr."""
    done = run_measured([PYTHON, script, "--worker", kind, *args], timeout=timeout)
    if done["returncode"] != 0:
        raise RuntimeError(f"{kind} worker failed:\n{done['stderr'][-4000:]}")
    answer = last_json_line(done["stdout"])
    answer["_process"] = process_figures(done, answer)
    return answer


def time_and_memory_figure(path: Path, title: str, xlabel: str,
                           series: Mapping[str, tuple[Sequence[float], Sequence[float],
                                                      Sequence[float]]],
                           *, linear_guide: bool = False) -> None:
    """Write a PNG of two log-log panels, seconds and peak MB against ``xlabel``: one line per
    ``series`` entry, ``label -> (xs, seconds, peaks)`` (with ``linear_guide``, a dotted line
    growing linearly from each series' first point). Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for label, (xs, seconds, peaks) in series.items():
        for axis, ys in ((axes[0], seconds), (axes[1], peaks)):
            line, = axis.plot(xs, ys, marker="o", label=label)
            if linear_guide and len(xs) > 1:
                axis.plot([xs[0], xs[-1]], [ys[0], ys[0] * xs[-1] / xs[0]], linestyle=":",
                          color=line.get_color(), alpha=0.6)
    for axis, panel, unit in ((axes[0], "wall time of the call", "seconds"),
                              (axes[1], "peak RSS of the process", "MB")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title(panel)
        axis.set_xlabel(xlabel)
        axis.set_ylabel(unit)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    temporary.replace(path)
