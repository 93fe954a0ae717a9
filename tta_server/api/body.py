"""Reading request bodies under a size limit (413 before the whole body is in memory)."""

from __future__ import annotations

from fastapi import Request
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from tta_server.errors import PayloadTooLargeError


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes by header or while streaming.

    The bytes are also cached on the request so that ``request.form()`` can parse them.
    """
    check_declared_length(request.headers.get("content-length"), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size = add_chunk(chunks, chunk, size, limit)
    body = b"".join(chunks)
    request._body = body  # Starlette's stream() and form() replay a cached body
    return body


async def read_asgi_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The same limits as :func:`read_body`, reading ASGI ``http.request`` messages directly."""
    check_declared_length(declared, limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        size = add_chunk(chunks, message.get("body", b""), size, limit)
        if not message.get("more_body", False):
            return b"".join(chunks)


def check_declared_length(declared: str | None, limit: int) -> None:
    """413 when the ``Content-Length`` header alone exceeds ``limit`` (nothing read yet)."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes exceeds the limit of {limit}")


def add_chunk(chunks: list[bytes], chunk: bytes, size: int, limit: int) -> int:
    """Append ``chunk`` and return the new size; 413 as soon as it passes ``limit``."""
    size += len(chunk)
    if size > limit:
        raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
    chunks.append(chunk)
    return size
