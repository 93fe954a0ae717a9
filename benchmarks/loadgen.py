"""A lean HTTP/1.1 load generator: one keep-alive connection per client, requests pre-encoded.

Why not httpx: the benchmarks run the load generator on the same 2-core machine as the server,
so every CPU millisecond the client spends is taken from the server it measures. httpx builds
a request object, headers and a response object per call (about 1 ms of Python per request
here); this client writes the same pre-built request bytes and reads the status line, the
headers up to ``content-length`` and the body, nothing more (tens of microseconds). It speaks
only what the benchmarks need: POST with a fixed body, ``content-length`` framed answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass


def encode_post(host: str, path: str, body: bytes, content_type: str) -> bytes:
    """The request bytes of ``POST path`` with ``body``, keep-alive (HTTP/1.1 default)."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin1") + body


@dataclass
class Answer:
    """The status code and body of one response."""

    status: int
    body: bytes


class Connection:
    """One keep-alive connection that sends pre-encoded requests one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def send(self, request: bytes) -> Answer:
        """Write ``request`` and read its whole answer (``content-length`` framing only)."""
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
                break
        else:
            raise ConnectionError("answer without content-length (chunked answers are not read by this client)")
        return Answer(status, await self.reader.readexactly(length))

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
