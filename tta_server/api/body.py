"""Reading request bodies under a size limit (413 before the whole body is in memory)."""

from __future__ import annotations

from fastapi import Request

from tta_server.errors import PayloadTooLargeError


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes by header or while streaming.

    The bytes are also cached on the request so that ``request.form()`` can parse them.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    request._body = body  # Starlette's stream() and form() replay a cached body
    return body
