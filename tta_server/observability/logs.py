"""Log records that name their request, as text or as one JSON object per line.

``TTA_LOG_FORMAT=text`` (the default) keeps the readable format, with the request id in
brackets (``-`` outside a request). ``TTA_LOG_FORMAT=json`` writes every record, the server's
own and uvicorn's access log alike, as one JSON object per line with the same keys:

``ts`` (UTC, ISO 8601, milliseconds), ``level``, ``logger``, ``message``, ``request_id`` (null
outside a request), ``http`` (for access-log lines ``{"client", "method", "path", "version",
"status"}``, null otherwise) and ``exception`` (the formatted traceback, or null).

Every key is present on every line, so a log pipeline needs one parser and one schema. The
request id comes from :func:`tta_server.observability.request_id.current_request_id`, stamped
by a filter on the handler, so records of every logger (uvicorn's included) get it.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal

from tta_server.observability.request_id import current_request_id

LogFormat = Literal["text", "json"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id_text)s]: %(message)s"
ACCESS_LOGGER = "uvicorn.access"


class RequestIdFilter(logging.Filter):
    """Stamps ``record.request_id`` (None outside a request); never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


class TextFormatter(logging.Formatter):
    """The plain format, with the request id (or ``-``) after the logger name."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        record.request_id_text = getattr(record, "request_id", None) or "-"
        return super().format(record)


def access_fields(record: logging.LogRecord) -> dict[str, Any] | None:
    """The HTTP fields of a uvicorn access-log record (its args are client, method, path, version, status)."""
    args = record.args
    if record.name != ACCESS_LOGGER or not isinstance(args, tuple) or len(args) != 5:
        return None
    client, method, path, version, status = args
    return {
        "client": str(client),
        "method": str(method),
        "path": str(path),
        "version": str(version),
        "status": int(status) if isinstance(status, int) else None,
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record, one schema for every logger (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        exception = None
        if record.exc_info:
            exception = self.formatException(record.exc_info)
        elif record.exc_text:
            exception = record.exc_text
        line = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "http": access_fields(record),
            "exception": exception,
        }
        # ensure_ascii keeps every line 7-bit clean; json escapes newlines, so one record is one line
        return json.dumps(line, default=str)


def logging_config(level: str, log_format: LogFormat, stream: str = "ext://sys.stderr") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for the server and uvicorn: one handler, one format, request ids.

    uvicorn's own loggers (``uvicorn``, ``uvicorn.error``, ``uvicorn.access``) lose their
    handlers and propagate to the root handler, so the access log has the same format (and, in
    JSON, the same schema) as every other line. Pass the same dict to ``uvicorn.run(log_config=...)``
    so that uvicorn does not install its defaults over it.
    """
    formatter = JsonFormatter if log_format == "json" else TextFormatter
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": RequestIdFilter}},
        "formatters": {"tta": {"()": formatter}},
        "handlers": {
            "tta": {
                "class": "logging.StreamHandler",
                "formatter": "tta",
                "filters": ["request_id"],
                "stream": stream,
            }
        },
        "root": {"handlers": ["tta"], "level": level.upper()},
        "loggers": {
            name: {"handlers": [], "propagate": True, "level": level.upper()}
            for name in ("uvicorn", "uvicorn.error", ACCESS_LOGGER)
        },
    }
