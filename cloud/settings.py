"""Settings of the cloud verifier service (environment variables HANDOFF_CLOUD_*, or flags)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from handoff.shared.settings import DEFAULT_CLOUD_MODEL


class CloudSettings(BaseSettings):
    """Everything `handoff serve-cloud` can be told: each field is a flag and a HANDOFF_CLOUD_* variable."""

    model_config = SettingsConfigDict(env_prefix="HANDOFF_CLOUD_", extra="ignore")

    # Model
    model: str = Field(DEFAULT_CLOUD_MODEL, description="Registry name, GGUF path or Hugging Face directory.")
    backend: Literal["auto", "transformers", "llama.cpp"] = Field(
        "auto", description="auto: transformers on CUDA, llama.cpp elsewhere."
    )
    device: str = Field("auto", description="transformers: auto, cpu, cuda, cuda:N.")
    dtype: str = Field(
        "auto", description="transformers: auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16."
    )
    threads: int = Field(2, ge=1, description="CPU threads for the model.")

    ray: bool = Field(
        False,
        description="Run replicas on Ray Serve behind its gRPC proxy on --port (the `ray` extra; docs/ray.md).",
    )

    # Network
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(50051, ge=0, le=65535, description="Port; 0 picks a free one.")
    tls_cert: Path | None = Field(None, description="PEM certificate chain; with tls_key enables TLS.")
    tls_key: Path | None = Field(None, description="PEM private key.")
    auth_token: str | None = Field(
        None,
        description="Require `authorization: Bearer <token>` on every call (prefer the environment: flags show in ps).",
    )
    max_message_bytes: int = Field(4 << 20, ge=1024, description="Largest message received or sent.")
    keepalive_time_s: float = Field(30.0, gt=0, description="Interval of keepalive pings to idle clients.")
    keepalive_timeout_s: float = Field(10.0, gt=0, description="Wait for a ping's answer before closing.")
    grace_s: float = Field(10.0, ge=0, description="On shutdown, time given to running streams to finish.")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve Prometheus metrics on this port."
    )

    # Limits
    max_sessions: int = Field(64, ge=1, description="Concurrent sessions; more get RESOURCE_EXHAUSTED.")
    max_context: int = Field(4096, ge=16, description="Tokens per session, prompt included.")
    max_top_k: int = Field(64, ge=1, description="Largest k of the top-k views.")
    max_tokens_per_append: int = Field(1024, ge=1, description="Tokens one Append may carry.")
    max_handoff_tokens: int = Field(1024, ge=1, description="Tokens one handoff may ask the cloud for.")
    max_queue: int = Field(1024, ge=1, description="Forward requests waiting for the model.")
    max_batch_items: int = Field(64, ge=1, description="Sessions per forward pass.")
    max_batch_tokens: int = Field(8192, ge=1, description="New tokens per forward pass.")
    deterministic: bool = Field(
        True,
        description="Batch-invariant answers: a session's views and tokens are bit-identical whatever else "
        "the server runs and however its tokens are split into passes (costs throughput; docs/determinism.md).",
    )
    deterministic_path: Literal["single", "padded"] = Field(
        "single",
        description="llama.cpp, deterministic: single (one token per call, as cloud-only decoding: check "
        "points cost a call per token) or padded (calls of >= 8 rows: single tokens cost ~5x).",
    )
    kv_unified: bool = Field(
        True,
        description="llama.cpp, when not deterministic: one KV pool for all sessions (any sessions batch "
        "together) or one stream per session (only consecutive ids share a pass). Deterministic mode "
        "always uses one stream per session.",
    )
    batch_wait_s: float = Field(
        0.003, ge=0, description="Wait this long for other open sessions' requests before a forward pass."
    )
    kv_cache_tokens: int | None = Field(
        32768,
        ge=16,
        description="llama.cpp: KV cells shared by all sessions (allocated up front); None = sessions x context.",
    )
    session_idle_timeout_s: float = Field(300.0, gt=0, description="Sessions idle this long are closed.")
    resume_sessions: int = Field(
        8,
        ge=0,
        description="Caches of sessions whose stream broke kept for a resynchronising edge (a new session "
        "adopts the longest common prefix instead of prefilling it again); 0 turns this off.",
    )
    resume_ttl_s: float = Field(60.0, gt=0, description="How long a broken session's cache is kept.")
    server_id: str | None = Field(
        None, description="This server's name in SessionOpened (default host/pid; Ray replicas set theirs)."
    )
