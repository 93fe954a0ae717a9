"""The test Redis is real: `make test` starts one when none answers (tests/support/redis_server.py)."""

from __future__ import annotations

import uuid

import redis

from tests.support.redis_server import answers, redis_url_for_tests


def test_real_redis_answers_and_stores_bytes() -> None:
    url = redis_url_for_tests()
    assert answers(url), f"no Redis at {url}: run `make redis`"
    client = redis.Redis.from_url(url)
    key = f"tta-test:{uuid.uuid4()}"
    try:
        client.set(key, b"\x00\x01bytes", ex=30)
        assert client.get(key) == b"\x00\x01bytes"
        assert "redis_version" in client.info("server")
    finally:
        client.delete(key)
        client.close()
