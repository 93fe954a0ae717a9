"""Python client for tta-server. Depends on httpx and pydantic only (never torch)."""

from tta_client.client import TTAClient, TTAClientError

__all__ = ["TTAClient", "TTAClientError"]
