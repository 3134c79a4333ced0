"""Process-wide settings read from the environment (prefix HANDOFF_) and CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import platformdirs
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_EDGE_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"
DEFAULT_CLOUD_MODEL = "qwen2.5-coder-1.5b-instruct-q4_k_m"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class HandoffSettings(BaseSettings):
    """Settings shared by every `handoff` subcommand."""

    model_config = SettingsConfigDict(env_prefix="HANDOFF_", extra="ignore")

    cache_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_cache_dir("handoff")),
        description="Where fetched models and derived metadata are kept (HANDOFF_CACHE_DIR).",
    )
    edge_model: str = Field(DEFAULT_EDGE_MODEL, description="Registry name or GGUF path of Q.")
    cloud_model: str = Field(
        DEFAULT_CLOUD_MODEL, description="Registry name, GGUF path or Hugging Face directory of P."
    )
    threads: int = Field(2, ge=1, description="CPU threads for llama.cpp.")
    log_level: str = Field(
        "WARNING", description="DEBUG, INFO, WARNING or ERROR (DEBUG also shows llama.cpp's own log)."
    )
    log_format: Literal["text", "json"] = Field("text", description="text, or json for one object per line.")
    verbose: bool = Field(False, description="Show llama.cpp's own log (model loading and its warnings).")

    @field_validator("log_level", mode="before")
    @classmethod
    def _known_level(cls, value: object) -> object:
        level = str(value).upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {value!r}; choose from {', '.join(LOG_LEVELS)}")
        return level

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"


def get_settings() -> HandoffSettings:
    """Read the settings afresh (environment variables may change between calls in tests)."""
    return HandoffSettings()
