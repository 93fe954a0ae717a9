"""The async client against the real app, in-process (ASGI transport, lifespan started)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest
from asgi_lifespan import LifespanManager

from tests.api.helpers import encode, random_images
from tta_client import AsyncTTAClient, Conflict, ConnectFailed, Invalid, NotFound, QueueFull, RetryPolicy, Unauthorized
from tta_server.app import create_app
from tta_server.settings import Settings


@asynccontextmanager
async def served(settings: Settings, **client_args: object) -> AsyncIterator[AsyncTTAClient]:
    """An async client wired to a freshly started app (its batcher runs on this event loop)."""
    app = create_app(settings)
    async with (
        LifespanManager(app, startup_timeout=120) as manager,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=manager.app), base_url="http://tta.test") as http,
    ):
        yield AsyncTTAClient(http=http, retry=RetryPolicy.never(), **client_args)  # type: ignore[arg-type]


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=120))


def test_async_client_covers_the_api(settings: Settings) -> None:
    async def scenario() -> None:
        async with served(settings) as api:
            assert await api.health() and (await api.wait_ready(timeout=5)).ready
            assert "resnet20" in [m.name for m in await api.models()]
            assert "bn" in [m.name for m in await api.methods()]
            await api.create_stream("resnet20", "bn", stream_id="a")
            await api.create_stream("resnet20", "bn", stream_id="b", metadata={"site": "s"})
            with pytest.raises(Conflict):
                await api.create_stream("resnet20", "bn", stream_id="a")
            with pytest.raises(Invalid):
                await api.create_stream("resnet20", "nope")
            results = await asyncio.gather(*(api.predict("a", random_images(4, seed=i)) for i in range(3)))
            assert sorted(r.step for r in results)[-1] == (await api.get_stream("a")).steps
            assert sum(len(r.predictions) for r in results) == 12
            one = await api.predict("a", encode(random_images(1)[0]), top_k=2)
            assert len(one.predictions[0].top_k) == 2
            page = await api.list_streams(limit=1)
            assert page.total == 2 and len(page.streams) == 1
            assert [s.stream_id async for s in api.iter_streams(page_size=1)] == ["a", "b"]
            params = await api.parameters("a")
            assert params.stream_id == "a" and params.version == (await api.get_stream("a")).version
            backup = await api.export_state("a")
            assert (await api.import_state("b", backup)).step == (await api.get_stream("a")).steps
            assert (await api.drift("a")).lifetime_images == 13
            assert (await api.reset_stream("a")).version > backup.version
            assert "tta_images_total" in await api.metrics()
            await api.delete_stream("a")
            with pytest.raises(NotFound):
                await api.get_stream("a")

    run(scenario)


def test_async_client_sends_api_keys(settings: Settings) -> None:
    keyed = settings.model_copy(update={"api_keys": {"tenant-key-0123456789": "acme"}})

    async def scenario() -> None:
        async with served(keyed) as anonymous:
            with pytest.raises(Unauthorized):
                await anonymous.list_streams()
        async with served(keyed, api_key="tenant-key-0123456789") as acme:
            assert (await acme.create_stream("resnet20", "bn")).tenant == "acme"

    run(scenario)


def test_async_retries_honour_retry_after() -> None:
    answers = [429, 429, 200]
    waits: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        status = answers.pop(0)
        if status == 429:
            body = {"error": {"code": "queue_full", "message": "full", "detail": None}}
            return httpx.Response(429, json=body, headers={"Retry-After": "1"})
        return httpx.Response(200, json={"status": "ok"})

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def scenario() -> None:
        http = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://tta.test")
        async with AsyncTTAClient(http=http, sleep=sleep) as api:
            assert "ok" in await api.metrics()
        assert waits == [1.0, 1.0]
        answers.extend([429, 429])
        async with AsyncTTAClient(http=http, sleep=sleep, retry=RetryPolicy(max_attempts=2)) as api:
            with pytest.raises(QueueFull) as info:
                await api.metrics()
            assert info.value.retry_after == 1.0
        await http.aclose()

    run(scenario)


def test_async_connect_failures_name_the_url() -> None:
    async def scenario() -> None:
        async with AsyncTTAClient("http://127.0.0.1:9", retry=RetryPolicy.never(), timeout=5) as api:
            with pytest.raises(ConnectFailed) as info:
                await api.models()
        assert "http://127.0.0.1:9/v1/models" in str(info.value)

    run(scenario)
