"""What every step of the model image build shares: its error, its progress callback and the
form of a Python minor version.

The steps are :mod:`~airmlops.serving.bento_archive` (the exported bento),
:mod:`~airmlops.serving.base_image` (what the base image runs),
:mod:`~airmlops.serving.wheelhouse` (the wheels) and :mod:`~airmlops.serving.container` (the
image itself).
"""

from __future__ import annotations

import re
from collections.abc import Callable

Progress = Callable[[str], None]
"""Receives one line of progress at a time."""

PYTHON_MINOR_RE = re.compile(r"^3\.[0-9]{1,2}$")
"""A Python minor version such as ``3.11``."""


class ContainerBuildError(RuntimeError):
    """The bento, the wheelhouse or the image build failed; the message says which and why."""
