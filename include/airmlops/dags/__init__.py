"""The DAG layer: every pipeline spec becomes its Airflow DAGs.

One module per DAG (:mod:`.training`, :mod:`.features`, :mod:`.monitoring`, :mod:`.rollback`)
and :mod:`.common` for what they share, among it :func:`~airmlops.dags.common.stage`, the one
place where task values cross XCom and where a non-retryable error fails a task for good. This
package is the only code of ``airmlops`` that builds DAGs; the stages it calls know nothing of
Airflow.

A spec that fails validation, or any other error while one spec's DAGs are built, yields one
placeholder DAG that explains the error (in its docs and in the failure of its only task), so the
problem shows in the UI while every other pipeline keeps loading and the DAG file never fails to
import.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from airflow.sdk import DAG, dag, task

from airmlops.dags.common import DEFAULT_ARGS, stage
from airmlops.dags.features import build_features_dag
from airmlops.dags.monitoring import build_monitoring_dag
from airmlops.dags.rollback import build_rollback_dag
from airmlops.dags.training import build_training_dag
from airmlops.errors import NonRetryable
from airmlops.names import is_name
from airmlops.settings import get_settings
from airmlops.spec import PipelineSpec, SpecError, load_spec, spec_paths

__all__ = ["build_all", "build_features_dag", "build_invalid_spec_dag", "build_monitoring_dag",
           "build_rollback_dag", "build_training_dag"]

log = logging.getLogger(__name__)


def _placeholder_name(path: Path) -> str:
    stem = re.sub(r"[^a-z0-9_]", "_", path.stem.lower())
    return stem if is_name(stem) else f"pipeline_{stem}"[:60]


def build_invalid_spec_dag(path: Path, error: Exception) -> DAG:
    """A DAG that shows a spec's validation error in the UI and fails if triggered."""
    message = str(error) if isinstance(error, SpecError) else (
        f"invalid pipeline spec {path}:\n  (build): {type(error).__name__}: "
        f"{' '.join(str(error).split())[:500]}")

    @dag(
        dag_id=f"{_placeholder_name(path)}_invalid_spec",
        schedule=None,
        start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        catchup=False,
        default_args=DEFAULT_ARGS,
        tags=["mlops", "invalid-spec"],
        doc_md=f"### Invalid pipeline spec\n\n```\n{message}\n```\n\nFix the file; this DAG "
        "disappears and the pipeline's DAGs load on the next parse.",
    )
    def invalid_spec() -> None:
        @task
        @stage
        def explain() -> None:
            """Fail without retries, with the spec's error."""
            raise NonRetryable(message)

        explain()

    return invalid_spec()


def _build_pipeline(spec: PipelineSpec, path: Path) -> list[DAG]:
    built = [build_training_dag(spec, path), build_rollback_dag(spec, path),
             build_monitoring_dag(spec, path)]
    if spec.feature_store is not None:
        built.append(build_features_dag(spec, path))
    return built


def _autoregistered() -> set:
    """DAGs Airflow's DagBag picks up from the DAG context even when they are not returned."""
    from airflow.sdk.definitions._internal.contextmanager import DagContext

    return DagContext.autoregistered_dags


def _forget(dags: list[DAG]) -> None:
    """Keep DAGs this layer discarded (half-built, duplicated ids) out of the DagBag."""
    registered = _autoregistered()
    for item in [item for item in registered if any(item[0] is gone for gone in dags)]:
        registered.discard(item)


@contextlib.contextmanager
def _registered_here() -> Iterator[set]:
    """The DAGs Airflow autoregisters inside the block, in a set of their own that joins the
    DAG context's set when the block ends.

    Each spec's DAGs are told apart from the earlier specs' this way, without copying the
    context's set (which grows with every spec) once per spec."""
    from airflow.sdk.definitions._internal.contextmanager import DagContext

    earlier = DagContext.autoregistered_dags
    DagContext.autoregistered_dags = here = set()
    try:
        yield here
    finally:
        DagContext.autoregistered_dags = earlier
        earlier |= here


@contextlib.contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """No cyclic garbage collection while the DAGs are built (it is switched back on after).

    Building makes many long-lived objects, so the collector runs full passes over a heap that
    only grows: with 200 specs 4 full passes took 15 % of the parse, and made the per-spec cost
    grow with the number of specs (benchmarks/bench_dag_parse.py)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def build_all(pipelines_dir: Path | None = None) -> dict[str, DAG]:
    """Every DAG of every spec in the folder, keyed by dag_id.

    Whatever goes wrong with one spec (a validation error or any other exception while its
    DAGs are built) gives that spec a ``<file>_invalid_spec`` DAG instead; the other specs'
    DAGs are unaffected.
    """
    folder = pipelines_dir or get_settings().pipelines_dir
    with _no_cyclic_gc():
        return _build_folder(folder)


def _build_folder(folder: Path) -> dict[str, DAG]:
    dags: dict[str, DAG] = {}
    owners: dict[str, Path] = {}
    for path in spec_paths(folder):
        with _registered_here() as registered:
            try:
                spec = load_spec(path)
                built = _build_pipeline(spec, path)
                taken = sorted({dag.dag_id for dag in built if dag.dag_id in dags})
                if taken:
                    raise SpecError(path, [("name", f"'{spec.name}' gives DAG ids {taken} "
                                            f"that {owners[taken[0]].name} already defines")])
            except Exception as error:  # one bad spec must never break the DAG file
                registered.clear()  # its half-built DAGs stay out of the DagBag
                log.error("%s", error if isinstance(error, SpecError) else
                          f"pipeline spec {path}: {type(error).__name__}: {error}")
                built = [build_invalid_spec_dag(path, error)]
        for item in built:
            if item.dag_id in dags:
                log.error("%s: dag_id %s is already defined by another spec; skipped",
                          path, item.dag_id)
                _forget([item])
                continue
            dags[item.dag_id] = item
            owners[item.dag_id] = path
    return dags
