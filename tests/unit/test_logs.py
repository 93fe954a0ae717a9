"""Log formats: one JSON schema for the server's lines and uvicorn's access log; text keeps the id too."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import sys
from collections.abc import Iterator

import pytest

from tta_server.observability.logs import JsonFormatter, RequestIdFilter, TextFormatter, logging_config
from tta_server.observability.request_id import _REQUEST_ID

KEYS = {"ts", "level", "logger", "message", "request_id", "http", "exception"}


def record(name: str, msg: str, args: tuple[object, ...] = ()) -> logging.LogRecord:
    rec = logging.LogRecord(name, logging.INFO, __file__, 1, msg, args, None)
    RequestIdFilter().filter(rec)
    return rec


@pytest.fixture
def request_id() -> Iterator[str]:
    token = _REQUEST_ID.set("rid-9")
    yield "rid-9"
    _REQUEST_ID.reset(token)


def test_json_lines_share_one_schema(request_id: str) -> None:
    access = record("uvicorn.access", '%s - "%s %s HTTP/%s" %d', ("127.0.0.1:5", "GET", "/healthz?x=1", "1.1", 200))
    server = record("tta_server.serving.batcher", "batch of %d images\nfailed", (3,))
    lines = [JsonFormatter().format(r) for r in (access, server)]
    assert all("\n" not in line for line in lines)
    parsed = [json.loads(line) for line in lines]
    assert all(set(p) == KEYS for p in parsed)
    assert parsed[0]["http"] == {
        "client": "127.0.0.1:5",
        "method": "GET",
        "path": "/healthz?x=1",
        "version": "1.1",
        "status": 200,
    }
    assert parsed[0]["request_id"] == parsed[1]["request_id"] == request_id
    assert parsed[1]["http"] is None and parsed[1]["message"] == "batch of 3 images\nfailed"
    assert parsed[1]["level"] == "info" and parsed[1]["ts"].endswith("+00:00")


def test_text_format_names_the_request_or_a_dash(request_id: str) -> None:
    assert "[rid-9]: hello" in TextFormatter().format(record("x", "hello"))
    token = _REQUEST_ID.set(None)
    try:
        assert "[-]: hello" in TextFormatter().format(record("x", "hello"))
    finally:
        _REQUEST_ID.reset(token)


def test_logging_config_routes_uvicorn_access_through_the_json_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    try:
        logging.config.dictConfig(logging_config("info", "json"))
        logging.getLogger("uvicorn.access").info('%s - "%s %s HTTP/%s" %d', "c", "GET", "/", "1.1", 404)
        logging.getLogger("tta_server.app").warning("hello")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["logger"] for line in lines] == ["uvicorn.access", "tta_server.app"]
    assert lines[0]["http"]["status"] == 404 and lines[1]["http"] is None
