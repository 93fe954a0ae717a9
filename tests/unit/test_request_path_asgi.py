"""The in-process request-path benchmark: its ASGI driver and its report."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from benchmarks.request_path_asgi import Message, call, cpu_per_request, render, scope


def app_answering(status: int, seen: list[Message]) -> Any:
    async def app(s: Message, receive: Any, send: Any) -> None:
        seen.append({"scope": s, "message": await receive()})
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def test_a_request_reaches_the_app_whole_and_an_error_is_raised() -> None:
    seen: list[Message] = []
    asyncio.run(call(app_answering(200, seen), "/v1/streams/s/predict", b"\x93NUMPY"))
    assert seen[0]["scope"]["path"] == "/v1/streams/s/predict" and seen[0]["scope"]["method"] == "POST"
    assert (b"content-length", b"6") in seen[0]["scope"]["headers"]
    assert seen[0]["message"] == {"type": "http.request", "body": b"\x93NUMPY", "more_body": False}
    with pytest.raises(RuntimeError, match=r"answered \[422\]"):
        asyncio.run(call(app_answering(422, []), "/predict", b""))


def test_cpu_per_request_counts_every_call() -> None:
    seen: list[Message] = []
    figure = asyncio.run(cpu_per_request(app_answering(200, seen), "/predict", b"x", 7))
    assert len(seen) == 7 and figure >= 0.0


def test_report_names_both_apps_and_the_difference() -> None:
    cell = {"median": 2.5, "min": 2.4, "max": 2.6}
    report = {
        "date": "2026-12-03",
        "rounds": 3,
        "requests_per_round": 10,
        "cpu_ms_per_request": {"tta": cell, "plain": {"median": 2.25, "min": 2.2, "max": 2.3}},
        "difference_ms": {"median": 0.25, "min": 0.1, "max": 0.4},
    }
    text = render(report)
    assert "| tta | 2.500 (2.400-2.600) |" in text and "| plain | 2.250 (2.200-2.300) |" in text
    assert "+0.250 (+0.100 to +0.400)" in text and "3 interleaved rounds" in text
    assert scope("/p", b"ab")["headers"][-1] == (b"content-length", b"2")
