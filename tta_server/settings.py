"""Server settings: one ``Settings`` object built at start-up from ``TTA_*`` variables and CLI flags.

Nothing reads the environment anywhere else; the object is passed down explicitly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tta_server.devices import DeviceChoice
from tta_server.state.factory import StoreOptions
from tta_server.state.write_policy import WriteMode


class Settings(BaseSettings):
    """All configuration of one server process. Every field can be set as ``TTA_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="TTA_", extra="forbid", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    store_url: str = Field(
        "memory://",
        description="state store: memory:// (embedded), redis://[user:password@]host:port/db, rediss:// (TLS), "
        "redis+cluster://host:port[,host:port...] (Redis Cluster; rediss+cluster:// with TLS)",
    )
    device: DeviceChoice = DeviceChoice.AUTO
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    log_format: Literal["text", "json"] = Field(
        "text", description="text, or json: one JSON object per line for every log, the access log included"
    )
    tracing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="OpenTelemetry spans (needs the otel extra); auto: on when OTEL_TRACES_EXPORTER or "
        "OTEL_EXPORTER_OTLP_ENDPOINT is set",
    )
    models_dir: Path = Field(Path("../shared/models"), description="folder of third-party weights")
    data_dir: Path = Field(Path("../shared/data"), description="folder of datasets for eval and replay")
    model_config_file: Path | None = Field(None, description="JSON file of bring-your-own model entries")
    default_model: str = "resnet20"
    preload_models: list[str] = Field(
        default_factory=lambda: ["resnet20"], description="catalogue models loaded at start-up"
    )

    max_batch_size: int = Field(64, ge=1, le=4096, description="images per adaptation batch")
    max_delay_ms: float = Field(
        5.0,
        ge=0,
        le=10_000,
        description="the longest the worker waits for more images once it could start a batch (only while more "
        "are on their way: see gather_quiet_ms)",
    )
    gather_quiet_ms: float = Field(
        1.0,
        ge=0,
        le=1000,
        description="after a batch of N images, while fewer than N are queued and requests keep arriving at most "
        "this far apart, the worker waits for them (at most max_delay_ms); 0 = wait only for requests being decoded",
    )
    fuse_streams: bool = Field(
        True, description="run batches of different streams of one model, method and config in one forward pass"
    )
    inline_max_images: int = Field(
        4,
        ge=0,
        le=4096,
        description="a lone batch of at most this many images, with nothing else queued or decoding and the worker "
        "idle, runs on the event loop instead of the worker thread (saves the thread hand-off); 0 = never; "
        "only with the in-memory store (a Redis read or write never runs on the event loop)",
    )
    inline_max_ms: float = Field(
        10.0,
        ge=0,
        le=1000,
        description="...and only while such small batches have recently taken at most this long (the event loop "
        "is busy for the whole batch)",
    )
    max_queue: int = Field(256, ge=1, le=1_000_000, description="waiting requests before 429")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="queue deadline per request (504)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="largest request body (413)")
    max_images_per_request: int = Field(256, ge=1, le=100_000)
    max_pixels_per_image: int = Field(4096 * 4096, ge=64, description="decompression-bomb guard (413)")
    max_pixels_per_request: int = Field(
        4096 * 4096, ge=64, description="decode budget: pixels of all images of one request, from their headers (413)"
    )
    decode_threads: int = Field(2, ge=1, le=64, description="threads that decode admitted request bodies")
    memory_max_streams: int = Field(10_000, ge=1, description="memory store: LRU bound")
    memory_ttl_s: float | None = Field(None, gt=0, description="memory store: idle streams expire")
    redis_key_prefix: str = Field(
        "tta", min_length=1, max_length=64, pattern=r"^[^{}\s]+$", description="redis store: prefix of every key"
    )
    redis_ttl_s: float | None = Field(None, gt=0, description="redis store: idle streams expire (None = never)")
    redis_write_policy: WriteMode = Field(
        WriteMode.WRITE_THROUGH,
        description="redis store: write-through (every step) or write-behind (every N steps / T seconds)",
    )
    redis_flush_every_steps: int = Field(10, ge=1, description="redis write-behind: flush after N unpersisted steps")
    redis_flush_every_s: float = Field(5.0, gt=0, description="redis write-behind: flush steps older than T seconds")
    redis_cache_streams: int = Field(1000, ge=0, description="redis store: streams kept in the hot cache")
    redis_max_connections: int = Field(32, ge=1, description="redis store: connection pool size")
    redis_timeout_s: float = Field(2.0, gt=0, le=60, description="redis store: connect and socket timeout")
    redis_retry_s: float = Field(1.0, gt=0, le=60, description="redis store: probe interval while Redis is down")
    redis_wait_replicas: int = Field(
        0, ge=0, le=16, description="redis store: acknowledge a state write once this many replicas have it (WAIT)"
    )
    drift_sample_every: int = Field(10, ge=0, description="run the source model every N batches (0 = never)")
    channels_last: bool = Field(
        True, description="hand the model NHWC-strided input (faster convolutions on CPU and tensor-core GPUs)"
    )
    autocast: Literal["off", "bf16", "fp16"] = Field(
        "off",
        description="CUDA only: mixed-precision forward for the forward-only methods (source, bn, alpha_bn, "
        "unmix_tns, adab2n); changes a few top-1 answers (docs/operations.md); ignored on the CPU",
    )
    torch_threads: int | None = Field(
        None, ge=1, le=512, description="torch CPU threads of the model worker (default: torch's choice, all cores)"
    )
    keep_freed_memory: bool = Field(
        True,
        description="glibc: keep freed tensor memory for reuse instead of returning it to the OS after every "
        "batch (fewer page faults, ~20% faster CPU forward; the process keeps its peak heap)",
    )
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description='API key -> tenant, e.g. {"k1": "acme"}; tenant "*" is admin; empty = auth off',
    )
    require_key_for_catalog_and_docs: bool = Field(
        False,
        description="with api_keys set, /v1/models, /v1/methods, /docs, /redoc and /openapi.json need a key too",
    )

    @field_validator("api_keys")
    @classmethod
    def _keys_named(cls, v: dict[str, str]) -> dict[str, str]:
        for key, tenant in v.items():
            if len(key) < 16:
                raise ValueError("API keys must be at least 16 characters")
            if not tenant:
                raise ValueError("every API key needs a tenant name")
        return v

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, v: str) -> str:
        if not v.startswith(("memory://", "redis://", "rediss://", "redis+cluster://", "rediss+cluster://")):
            shown = v.rsplit("@", maxsplit=1)[-1]  # never echo credentials
            raise ValueError(
                f"unsupported state store URL {shown!r}; "
                "use memory://, redis://, rediss://, redis+cluster:// or rediss+cluster://"
            )
        if "+cluster://" in v:
            from tta_server.state.redis.connect import parse_cluster_url

            parse_cluster_url(v)  # seeds must be host:port, database 0; the error names no credentials
        return v

    @field_validator("log_level", "log_format", "tracing", "autocast", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v

    def store_options(self) -> StoreOptions:
        """What :func:`tta_server.state.factory.open_store` needs (the state layer never sees settings)."""
        return StoreOptions(
            url=self.store_url,
            memory_max_streams=self.memory_max_streams,
            memory_ttl_s=self.memory_ttl_s,
            redis_key_prefix=self.redis_key_prefix,
            redis_ttl_s=self.redis_ttl_s,
            redis_write_policy=self.redis_write_policy,
            redis_flush_every_steps=self.redis_flush_every_steps,
            redis_flush_every_s=self.redis_flush_every_s,
            redis_cache_streams=self.redis_cache_streams,
            redis_max_connections=self.redis_max_connections,
            redis_timeout_s=self.redis_timeout_s,
            redis_retry_s=self.redis_retry_s,
            redis_wait_replicas=self.redis_wait_replicas,
        )
