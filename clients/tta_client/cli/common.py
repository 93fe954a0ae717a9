"""What both tools share: connection options, the method config argument, percentiles."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from tta_client.client import DEFAULT_URL
from tta_client.retry import RetryPolicy


class UsageError(Exception):
    """A bad command line or an unusable environment: printed without a traceback, exit 2."""


def add_connection_args(parser: argparse.ArgumentParser, default_retries: int) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--url", default=os.environ.get("TTA_URL", DEFAULT_URL), help="server URL [env TTA_URL]")
    group.add_argument("--api-key", default=os.environ.get("TTA_API_KEY"), help="Bearer API key [env TTA_API_KEY]")
    group.add_argument("--tenant", default=os.environ.get("TTA_TENANT"), help="admin keys: act in this tenant")
    group.add_argument("--timeout", type=positive_float, default=30.0, help="seconds per request (default 30)")
    group.add_argument(
        "--retries",
        type=int,
        default=default_retries,
        help=f"retries on 429/503 honouring Retry-After (default {default_retries})",
    )


def add_stream_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("stream")
    group.add_argument("--model", default="resnet20", help="catalogue model (default resnet20)")
    group.add_argument("--method", default="bn", help="adaptation method (default bn)")
    group.add_argument("--config", type=json_object, default={}, help="method config as JSON, e.g. '{\"lr\": 0.001}'")
    group.add_argument("--seed", type=int, default=0, help="seed of the method's initialization")
    group.add_argument("--keep", action="store_true", help="keep the streams this run creates (default: delete)")


def retry_policy(args: argparse.Namespace) -> RetryPolicy:
    return RetryPolicy(max_attempts=max(1, int(args.retries) + 1))


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between closest ranks; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = (len(sorted_values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)
