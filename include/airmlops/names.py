"""The one pattern of platform names: pipelines, feature views, entities and features.

A name is also a path part, a Redis key part, a DAG id part and a Prometheus label, so it is
kept to lowercase letters, digits and underscores, starting with a letter, at most 63 long.
"""

from __future__ import annotations

import re

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
NAME_RE = re.compile(NAME_PATTERN)
COLUMN_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
"""A data column: what a source's frame may call it (wider than a platform name)."""


def is_name(value: object) -> bool:
    """True if ``value`` is a valid platform name."""
    return isinstance(value, str) and NAME_RE.fullmatch(value) is not None
