"""Server settings: one ``Settings`` object built at start-up from ``TTA_*`` variables and CLI flags.

Nothing reads the environment anywhere else; the object is passed down explicitly.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class DeviceChoice(StrEnum):
    """Where models run: ``auto`` picks CUDA when available, else CPU."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Settings(BaseSettings):
    """All configuration of one server process. Every field can be set as ``TTA_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix="TTA_", extra="forbid", validate_default=True)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    store_url: str = Field("memory://", description="state store: memory:// (embedded)")
    device: DeviceChoice = DeviceChoice.AUTO
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    models_dir: Path = Field(Path("../shared/models"), description="folder of third-party weights")
    data_dir: Path = Field(Path("../shared/data"), description="folder of datasets for eval and replay")
    model_config_file: Path | None = Field(None, description="JSON file of bring-your-own model entries")
    default_model: str = "resnet20"
    preload_models: list[str] = Field(
        default_factory=lambda: ["resnet20"], description="catalogue models loaded at start-up"
    )

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, v: str) -> str:
        if not v.startswith("memory://"):
            raise ValueError(f"unsupported state store URL {v!r}; use memory://")
        return v

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, v: object) -> object:
        return v.lower() if isinstance(v, str) else v
