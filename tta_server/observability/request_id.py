"""``X-Request-ID``: one id per request, taken from the client when sane, in a context variable.

Why a context variable: the id must reach code that never sees the request (the error
handlers, the model worker thread, uvicorn's access log) without threading an argument
through every call. The ASGI middleware below sets it for the request's task; the batcher
and the store pool copy the context into their threads, and :mod:`tta_server.observability.logs`
stamps it on every log record.

A client's id is accepted when it is 1 to 128 printable ASCII characters without spaces;
anything else (too long, control characters that could forge log lines, non-ASCII) is
replaced by a fresh id, so a log line can always be trusted to hold exactly one token.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
MAX_LENGTH = 128
HEADER_KEY = HEADER.lower().encode("latin-1")
_SANE = re.compile(rf"[\x21-\x7e]{{1,{MAX_LENGTH}}}")

_REQUEST_ID: ContextVar[str | None] = ContextVar("tta_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being served in this context, or None outside a request."""
    return _REQUEST_ID.get()


_PROCESS_PREFIX = os.urandom(8).hex()
_SEQUENCE = itertools.count(1)


def new_request_id() -> str:
    """A fresh id: 32 hex digits, this process's random 16 then a 16-digit counter.

    Unique across replicas and restarts (the prefix is drawn at start) and ordered within a
    process; a UUID4 per request cost a system call and a Python ``UUID`` object on every
    request that came without an id of its own (``itertools.count`` is atomic under the GIL).
    """
    return f"{_PROCESS_PREFIX}{next(_SEQUENCE):016x}"


def accept_request_id(given: str | None) -> str:
    """``given`` when it is sane (1-128 printable ASCII, no spaces), a fresh id otherwise."""
    if given is not None and _SANE.fullmatch(given):
        return given
    return new_request_id()


def set_request_id(request_id: str) -> Token[str | None]:
    """Make ``request_id`` the current one (this task's context) until :func:`reset_request_id`."""
    return _REQUEST_ID.set(request_id)


def reset_request_id(token: Token[str | None]) -> None:
    """Back to the id that was current before :func:`set_request_id` returned ``token``."""
    _REQUEST_ID.reset(token)


@contextmanager
def use_request_id(request_id: str) -> Iterator[None]:
    """``request_id`` is the current one inside the block (this task's context)."""
    token = set_request_id(request_id)
    try:
        yield
    finally:
        reset_request_id(token)


def request_id_header(scope: Scope) -> str | None:
    """The client's ``X-Request-ID`` header as text (None when absent or not ASCII)."""
    for key, value in scope.get("headers", ()):
        if key == HEADER_KEY:
            return request_id_text(value)
    return None


def request_id_text(value: bytes | None) -> str | None:
    """A raw ``X-Request-ID`` header value as text; None when absent or not ASCII."""
    if value is None or not value.isascii():
        return None
    return value.decode("ascii")


class RequestIdMiddleware:
    """Pure ASGI middleware: sets the request id for the request's task and answers it in ``X-Request-ID``.

    Pure ASGI rather than ``@app.middleware`` so that the id is set in the very task that
    runs the routes and calls uvicorn's ``send`` (where the access log line is written), at
    the cost of one header scan per request. It must be the outermost middleware, so that
    every other middleware, handler and error response sees the id.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = accept_request_id(request_id_header(scope))
        encoded = request_id.encode("ascii")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k != HEADER_KEY]
                headers.append((HEADER_KEY, encoded))
                message = {**message, "headers": headers}
            await send(message)

        with use_request_id(request_id):
            await self.app(scope, receive, send_with_id)
