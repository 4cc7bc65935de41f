"""The Docker engine as the platform sees it: reachable or not, and a few shared calls.

The engine is optional (the embedded default serves models as local processes), so
:func:`engine_available` answers a plain bool and never raises. Every container the platform
starts uses the ``host`` network (servers bound to 127.0.0.1) or ``none``:
:func:`check_network_mode` is the one place that rule is enforced, so no container ever gets,
or is reached at, a bridge address.
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from docker import DockerClient
    from docker.models.containers import Container

ALLOWED_NETWORK_MODES = frozenset({"host", "none"})
"""Network modes a platform build or container may use (never a bridge network)."""

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_HOST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_REGISTRY = rf"(?:{_HOST_LABEL}(?:\.{_HOST_LABEL})*(?::[0-9]{{1,5}})?/)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}"

IMAGE_TAG_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*:{_TAG}$")
"""A tag the platform writes: lowercase ``repository:tag``, explicit tag, no registry host."""

IMAGE_REF_RE = re.compile(
    rf"^{_REGISTRY}{_COMPONENT}(?:/{_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?$"
)
"""An image the platform reads (a base image): optional registry host, tag and/or digest."""

_MAX_REF_LENGTH = 255
_CONTAINER_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")


def validate_image_tag(tag: str) -> str:
    """Return ``tag`` if it is a strict ``repository:tag`` the platform may write; else ValueError.

    The tag usually carries a model name and version, so it is checked before it reaches the
    engine: lowercase path components, an explicit tag, nothing else (no registry, no digest).
    """
    if not isinstance(tag, str) or len(tag) > _MAX_REF_LENGTH or not IMAGE_TAG_RE.fullmatch(tag):
        raise ValueError(
            f"invalid image tag {tag!r}: expected lowercase 'name[/name]:tag' "
            "(tag: letters, digits, '_', '.', '-'; at most 128 characters)"
        )
    return tag


def validate_image_ref(ref: str) -> str:
    """Return ``ref`` if it is a well-formed image reference (a base image); else ValueError."""
    if not isinstance(ref, str) or len(ref) > _MAX_REF_LENGTH or not IMAGE_REF_RE.fullmatch(ref):
        raise ValueError(f"invalid image reference {ref!r}")
    return ref


def validate_container_name(name: str) -> str:
    """Return ``name`` if Docker accepts it as a container name; else ValueError."""
    if not isinstance(name, str) or not _CONTAINER_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid container name {name!r}")
    return name


def check_network_mode(mode: str) -> str:
    """Return ``mode`` if it is ``host`` or ``none``; anything else (a bridge) is a ValueError."""
    if mode not in ALLOWED_NETWORK_MODES:
        raise ValueError(
            f"network mode {mode!r} is not allowed: use one of {sorted(ALLOWED_NETWORK_MODES)}"
        )
    return mode


def docker_client(timeout: float = 120.0) -> DockerClient:
    """A client for the engine named by the environment (``DOCKER_HOST`` or the local socket).

    Raises ``docker.errors.DockerException`` when no engine can be reached.
    """
    import docker

    return docker.from_env(timeout=max(1, round(timeout)))


def engine_available(timeout: float = 2.0) -> bool:
    """True when a Docker engine answers a ping within ``timeout`` seconds; never raises."""
    try:
        client = docker_client(timeout=timeout)
    except Exception:
        return False
    try:
        return bool(client.ping())
    except Exception:
        return False
    finally:
        client.close()


def remove_container(client: DockerClient, name_or_id: str, timeout: int = 10) -> bool:
    """Stop (SIGTERM, then SIGKILL after ``timeout`` s) and remove a container; False if absent."""
    import docker.errors

    try:
        container = client.containers.get(name_or_id)
    except docker.errors.NotFound:
        return False
    # Already stopped or being removed: the removal below is what matters.
    with contextlib.suppress(docker.errors.APIError):
        container.stop(timeout=timeout)
    try:
        container.remove(force=True)
    except docker.errors.NotFound:
        return False
    return True


def container_logs_tail(container: Container, lines: int = 50) -> str:
    """The last ``lines`` lines of a container's output, for error messages."""
    try:
        return container.logs(tail=lines).decode("utf-8", errors="replace")
    except Exception as exc:  # the container may be gone already
        return f"<logs unavailable: {exc}>"
