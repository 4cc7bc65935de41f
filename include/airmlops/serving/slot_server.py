"""``python -m airmlops.serving.slot_server serve <bento> --host H --port N``: ``bentoml serve``
whose process manager cannot be driven by anyone else on the machine.

BentoML 1.4 supervises its workers with circus. Its arbiter binds a ZeroMQ control endpoint and
a pub/sub endpoint on random ``127.0.0.1`` TCP ports (``bentoml._internal.utils.circus.
create_standalone_arbiter``); the control endpoint takes unauthenticated commands from any
local process (stop, add a watcher with any command line, change its environment). Here both
endpoints are ``ipc://`` sockets in a fresh folder only this user can enter (0700), removed when
the server exits; the only TCP socket left is the HTTP port. Everything else is ``bentoml serve``
unchanged (same arguments, same workers, same supervision).

Each server also gets a Prometheus multiprocess folder of its own (BentoML's default is one
folder under ``BENTOML_HOME``, shared by every service of the machine and emptied whenever one
starts: a deploy erased the live slot's counters, and one pipeline's ``/metrics`` could report
another's model). The folder is fresh, private (0700) and removed when the server exits.
"""

from __future__ import annotations

import atexit
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CONTROL_SOCKET = "control.sock"
PUBSUB_SOCKET = "pubsub.sock"


def private_arbiter_factory(socket_dir: Path) -> Callable[..., Any]:
    """A drop-in ``create_standalone_arbiter`` binding circus's endpoints under ``socket_dir``."""
    from bentoml._internal.utils import circus as bento_circus

    def create_standalone_arbiter(watchers: list[Any], *, threaded: bool = False,
                                  **kwargs: Any) -> Any:
        arbiter_class = bento_circus.ThreadedArbiter if threaded else bento_circus.Arbiter
        return arbiter_class(
            watchers,
            endpoint=f"ipc://{socket_dir / CONTROL_SOCKET}",
            pubsub_endpoint=f"ipc://{socket_dir / PUBSUB_SOCKET}",
            check_delay=kwargs.pop("check_delay", 10),  # BentoML's own value
            **kwargs,
        )

    return create_standalone_arbiter


def install_private_endpoints() -> Path:
    """Make every arbiter BentoML creates in this process use private ``ipc://`` endpoints.

    Returns the 0700 folder holding the sockets (removed at exit). Fails loudly if BentoML no
    longer has the factory this replaces, rather than serving with open control ports.
    """
    from bentoml._internal.utils import circus as bento_circus

    if not callable(getattr(bento_circus, "create_standalone_arbiter", None)):
        raise RuntimeError(
            "bentoml._internal.utils.circus.create_standalone_arbiter is gone: this BentoML "
            "version is not supported by airmlops.serving.slot_server"
        )
    # mkdtemp makes the folder 0700; the short /tmp path keeps socket paths under 108 bytes.
    socket_dir = Path(tempfile.mkdtemp(prefix="airmlops-circus-"))
    atexit.register(shutil.rmtree, socket_dir, ignore_errors=True)
    bento_circus.create_standalone_arbiter = private_arbiter_factory(socket_dir)
    return socket_dir


def install_private_metrics_dir() -> Path:
    """Give this server's workers a Prometheus multiprocess folder of their own (removed at
    exit) instead of BentoML's one folder under ``BENTOML_HOME``."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    metrics_dir = Path(tempfile.mkdtemp(prefix="airmlops-metrics-"))
    atexit.register(shutil.rmtree, metrics_dir, ignore_errors=True)
    BentoMLContainer.prometheus_multiproc_dir.set(str(metrics_dir))
    return metrics_dir


def main(argv: Sequence[str]) -> None:
    """Run BentoML's command line (``argv`` as after ``bentoml``) with private endpoints and
    a private metrics folder."""
    install_private_endpoints()
    install_private_metrics_dir()
    from bentoml_cli.cli import cli

    cli(args=list(argv), prog_name="bentoml")


if __name__ == "__main__":
    main(sys.argv[1:])
