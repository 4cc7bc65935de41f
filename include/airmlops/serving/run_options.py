"""How a model image is run: confined, non-root, read-only, within its resource limits.

:func:`hardened_run_options` drops every capability and privilege gain, runs as uid
:data:`SERVICE_UID` on a read-only root filesystem (scratch space on small tmpfs mounts), and
applies the memory, CPU and process limits of :class:`ContainerResources` (from the spec's
``deploy.resources``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

SERVICE_UID = 10001
"""The user (and group) a model image runs as."""

_SCRATCH_DIR = re.compile(r"/[A-Za-z0-9_./-]{1,255}")

MIN_MEMORY_MB, MAX_MEMORY_MB = 128, 262_144
MIN_CPUS, MAX_CPUS = 0.1, 64.0
MIN_PIDS, MAX_PIDS = 32, 32_768


@dataclasses.dataclass(frozen=True)
class ContainerResources:
    """What one model container may use: memory (MiB, no swap beyond it), CPUs, processes."""

    memory_mb: int = 1024
    cpus: float = 1.0
    pids: int = 512

    def __post_init__(self) -> None:
        """Refuse a non-number or a value outside its range."""
        checks = (
            ("memory_mb", self.memory_mb, int, MIN_MEMORY_MB, MAX_MEMORY_MB),
            ("cpus", self.cpus, (int, float), MIN_CPUS, MAX_CPUS),
            ("pids", self.pids, int, MIN_PIDS, MAX_PIDS),
        )
        for name, value, kind, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
                raise ValueError(
                    f"deploy.resources.{name}: expected a number from {low} to {high}, "
                    f"got {value!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


SCRATCH_TMPFS_OPTIONS = "rw,nosuid,nodev,noexec,size=64m,mode=1777"
"""Writable scratch space of a model container whose root filesystem is read-only."""
SCRATCH_DIRS = (
    "/tmp",  # noqa: S108 (inside the container)
    *(f"/home/bentoml/{name}" for name in ("bentos", "models", "envs", "tmp")),
    "/home/bentoml/prometheus_multiproc_dir",
)
"""Where BentoML writes at run time: temporary files, the store folders it creates under
``BENTOML_HOME`` on start (empty: the served bento carries its models), and its metrics'
multiprocess folder."""


def hardened_run_options(
    resources: ContainerResources, scratch_dirs: Sequence[str] = ()
) -> dict[str, Any]:
    """``containers.run`` keyword arguments that confine a model container.

    Every capability dropped, ``no-new-privileges``, the image's non-root user, a read-only
    root filesystem with tmpfs scratch folders (:data:`SCRATCH_DIRS` plus ``scratch_dirs``,
    e.g. the service's data root), and the memory (no extra swap), CPU and pids limits of
    ``resources``. The caller chooses the network (``host`` or ``none``).
    """
    tmpfs: dict[str, str] = {}
    for directory in (*SCRATCH_DIRS, *scratch_dirs):
        absolute = isinstance(directory, str) and _SCRATCH_DIR.fullmatch(directory)
        if not absolute or ".." in directory.split("/"):
            raise ValueError(f"invalid scratch folder {directory!r}: expected an absolute path")
        tmpfs[directory] = SCRATCH_TMPFS_OPTIONS
    memory = f"{resources.memory_mb}m"
    return {
        "user": f"{SERVICE_UID}:{SERVICE_UID}",
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges:true"],
        "privileged": False,
        "read_only": True,
        "tmpfs": tmpfs,
        "mem_limit": memory,
        "memswap_limit": memory,
        "nano_cpus": round(resources.cpus * 1e9),
        "pids_limit": resources.pids,
    }
