"""What the proxy accepts as an upstream, a slot, a version and a port, and its admin token.

Shared by the proxy process and the clients that drive it (:mod:`.client`), so both refuse the
same things before anything is sent.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from airmlops.names import COLUMN_PATTERN

HOST = "127.0.0.1"
"""The only address the proxy binds."""
TOKEN_FILE = "admin-token"  # noqa: S105 (a file name, not a secret)
MAX_UPSTREAMS = 16

_SLOT_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")
_COLUMN_RE = re.compile(COLUMN_PATTERN)


def validate_upstream(url: str) -> str:
    """Return ``url`` normalised to ``http://<loopback>:<port>`` or raise ValueError.

    Only plain http to a loopback address with an explicit port, and nothing else (no path,
    query, credentials): the proxy must never be pointed at another machine.
    """
    if not isinstance(url, str) or len(url) > 64:
        raise ValueError(f"invalid upstream {url!r}")
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"invalid upstream {url!r}: bad port") from None
    if (
        parts.scheme != "http"
        or parts.username is not None
        or parts.password is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or port is None
        or not 0 < port < 65536
        or parts.hostname is None
    ):
        raise ValueError(f"invalid upstream {url!r}: expected http://127.0.0.1:PORT")
    host = parts.hostname
    if host != "localhost" and not _is_loopback(host):
        raise ValueError(f"upstream {url!r} is not a loopback address")
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"http://{netloc}"


def _is_loopback(host: str) -> bool:
    """True if ``host`` is a loopback IP address (a host name is not)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_upstreams(urls: Sequence[str], *, allow_empty: bool = False) -> tuple[str, ...]:
    """Each of ``urls`` validated by :func:`validate_upstream`: at most :data:`MAX_UPSTREAMS`,
    no duplicates, at least one unless ``allow_empty``; else ValueError."""
    if not isinstance(urls, list | tuple):
        raise ValueError(f"'upstreams' must be a list of URLs, not {type(urls).__name__}")
    if len(urls) > MAX_UPSTREAMS:
        raise ValueError(f"at most {MAX_UPSTREAMS} upstreams per slot, got {len(urls)}")
    normalised = tuple(validate_upstream(url) for url in urls)
    if len(set(normalised)) != len(normalised):
        raise ValueError("an upstream is listed twice")
    if not normalised and not allow_empty:
        raise ValueError("at least one upstream is required")
    return normalised


def validate_slot(slot: str) -> str:
    """Return ``slot`` if it is a short lowercase name (``blue``, ``green``); else ValueError."""
    if not isinstance(slot, str) or not _SLOT_RE.fullmatch(slot):
        raise ValueError(f"invalid slot name {slot!r}")
    return slot


def validate_version(version: str | None) -> str | None:
    """Return ``version`` (a model version such as ``7`` or ``1.2.0``, or None); else
    ValueError."""
    if version is not None and (not isinstance(version, str) or not _VERSION_RE.fullmatch(version)):
        raise ValueError(f"invalid version {version!r}")
    return version


def validate_weight(weight: int) -> int:
    """Return ``weight`` (the canary's share, in percent) if it is an int in 0..100; else
    ValueError naming the field."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise ValueError(f"'weight' must be an int percent in 0..100, got {weight!r}")
    return weight


def validate_percent(percent: int) -> int:
    """Return ``percent`` (the share of live requests a shadow mirrors) if it is an int in
    1..100; else ValueError naming the field."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 100:
        raise ValueError(f"'percent' must be an int percent in 1..100, got {percent!r}")
    return percent


def validate_entity_key(key: str) -> str:
    """Return ``key`` (the request field holding the entity id) if it is a column name; else
    ValueError naming the field."""
    if not isinstance(key, str) or not _COLUMN_RE.fullmatch(key):
        raise ValueError(f"'entity_key' must be a column name ({COLUMN_PATTERN}), got {key!r}")
    return key


def validate_port(port: int) -> int:
    """Return ``port`` if it is an int in 1..65535; else ValueError."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"invalid port {port!r}")
    return port


def ensure_admin_token(state_dir: Path) -> str:
    """The proxy's admin token, created once (random, file mode 0600) in ``state_dir``.

    Both the proxy and whoever drives it call this; the first creates the file (exclusively,
    so two callers racing agree on one token).
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
    os.chmod(path, 0o600)
    token = path.read_text().strip()
    if len(token) < 32:
        raise ValueError(f"admin token file {path} is empty or truncated; delete it to renew")
    return token
