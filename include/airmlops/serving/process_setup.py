"""What a service process sets up around BentoML: quiet logs for client mistakes
(:class:`ClientErrorFilter`), uvicorn's HTTP limits (:func:`install_http_limits`), and the
startup objects moved out of the garbage collector's reach (:func:`freeze_startup_objects`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from pydantic import ValidationError

if TYPE_CHECKING:
    from airmlops.settings import ServingSettings


class ClientErrorFilter(logging.Filter):
    """Demote BentoML's ERROR-with-traceback for a request that failed validation (a client's
    mistake, already answered with a 4xx) to one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Demote ``record`` in place if it is a validation error's; keep every record."""
        if record.levelno >= logging.ERROR and record.exc_info:
            error = record.exc_info[1]
            if isinstance(error, ValidationError):
                record.levelno, record.levelname = logging.INFO, "INFO"
                record.msg = f"{record.getMessage()}: client error ({error.error_count()} " \
                    "validation error(s))"
                record.args = None
                record.exc_info = None
                record.exc_text = None
        return True


def install_log_filter() -> None:
    """Attach :class:`ClientErrorFilter` to BentoML's request-error loggers (idempotent)."""
    for name in ("bentoml._internal.server.http_app", "bentoml.serve"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
            logger.addFilter(ClientErrorFilter())


def freeze_startup_objects() -> None:
    """Move everything loaded so far (libraries, the app, the model) out of the garbage
    collector's reach.

    A full collection walks every tracked object: in a worker with scikit-learn, pandas and
    BentoML loaded that took ~200 ms here, a pause every request in flight waits for (the p99).
    Frozen objects are never scanned again; what requests allocate is collected as usual.
    """
    import gc

    gc.collect()
    gc.freeze()


def install_http_limits(serving: ServingSettings) -> None:
    """Hold clients of this process's uvicorn (built later by BentoML's worker) to the
    service's :class:`~airmlops.serving.http_limits.HttpLimits`: 431, 413, 408, 503."""
    from airmlops.serving.http_limits import HttpLimits, install_as_uvicorn_default

    install_as_uvicorn_default(HttpLimits(
        max_header_bytes=serving.max_header_bytes, max_header_count=serving.max_header_count,
        max_body_bytes=serving.max_body_bytes, header_timeout_s=serving.header_timeout_s,
        body_timeout_s=serving.body_timeout_s, keep_alive_s=serving.keep_alive_s,
        max_connections=serving.max_connections))
