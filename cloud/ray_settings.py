"""Settings of `handoff serve-cloud --ray` (environment variables HANDOFF_RAY_*, or flags)."""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RaySettings(BaseSettings):
    """How the verifier runs on Ray Serve (with `serve-cloud --ray`): replicas, autoscaling, affinity,
    the cluster to join.
    """

    model_config = SettingsConfigDict(env_prefix="HANDOFF_RAY_", extra="ignore")

    address: str | None = Field(
        None,
        description="Ray cluster to join (`auto`, or ray://HOST:PORT); none: start a local one on 127.0.0.1.",
    )
    replicas: int = Field(1, ge=1, description="Replicas (each one backend, one model) when not autoscaling.")
    min_replicas: int | None = Field(
        None, ge=0, description="Autoscale between --min-replicas and --max-replicas (both needed)."
    )
    max_replicas: int | None = Field(None, ge=1, description="Upper bound of autoscaling.")
    target_sessions: float = Field(
        4.0,
        gt=0,
        description="Autoscaling target: open sessions (Ray's ongoing requests) per replica.",
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Load above target this long adds replicas.")
    downscale_delay_s: float = Field(60.0, ge=0, description="Load below target this long removes replicas.")
    fallback_replicas: int = Field(
        2,
        ge=0,
        description="A full replica passes a new session to the next N on the hash ring (0: strict affinity).",
    )
    cpus_per_replica: float | None = Field(
        None, gt=0, description="CPUs Ray reserves per replica (default: the model's --threads)."
    )
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs Ray reserves per replica.")
    app_name: str = Field("handoff", description="The Ray Serve application's name.")

    @model_validator(mode="after")
    def _autoscaling_bounds(self) -> RaySettings:
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("autoscaling needs both min_replicas and max_replicas")
        if self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None
