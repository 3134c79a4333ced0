"""Settings of the edge processes (`handoff generate`, `chat`, `serve-edge`): env HANDOFF_EDGE_*, or flags."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from handoff.edge.link import LinkConfig
from handoff.edge.policy import PolicyConfig
from handoff.edge.verifier_client import NetworkDelay

_P = PolicyConfig()
_L = LinkConfig()
_INJECT = (
    "Loopback testing only: add this round-trip time / bandwidth limit to every message to the cloud "
    "(see scripts/validate_simulator.py)"
)


class EdgeSettings(BaseSettings):
    """Where the cloud is, how to reach it, and the handoff policy (defaults: PolicyConfig's)."""

    model_config = SettingsConfigDict(env_prefix="HANDOFF_EDGE_", extra="ignore")

    # The cloud
    cloud: str | None = Field(None, description="HOST:PORT of a running verifier; None: an embedded one.")
    tls: bool = Field(False, description="Connect with TLS (system roots, or tls_ca).")
    tls_ca: Path | None = Field(None, description="PEM root certificates to trust.")
    auth_token: str | None = Field(None, description="Bearer token sent to the verifier.")
    mode: Literal["hybrid", "edge", "cloud"] = Field("hybrid", description="edge / cloud: the baselines.")
    n_ctx: int = Field(4096, ge=64, description="The edge model's context length.")

    # The policy (edge/controller.py PolicyConfig; docs/policy_defaults.md says how they were chosen)
    policy: Literal["seed", "rollback", "exact"] = Field(_P.kind, description="exact: speculative sampling.")
    seed_tokens: int = Field(_P.seed_tokens, ge=0, description="N0: tokens the cloud generates first.")
    check_interval: int = Field(_P.check_interval, ge=1, description="N: edge tokens per check point.")
    threshold: float = Field(_P.threshold, ge=0, description="tau, nats, top-k KL (a lower bound of KL).")
    aggregation: Literal["max", "mean"] = Field(_P.aggregation)
    handback_tokens: int = Field(_P.handback_tokens, ge=1, description="M: cloud tokens per handoff.")
    agree_tokens: int = Field(_P.agree_tokens, ge=0, description="Hand back after this many agreeing.")
    top_k: int = Field(_P.top_k, ge=1, le=256)
    lookahead_windows: int = Field(_P.lookahead_windows, ge=0)
    draft_tokens: int = Field(_P.draft_tokens, ge=1, description="exact: the first draft's length.")
    draft_tokens_max: int = Field(_P.draft_tokens_max, ge=1, description="exact: the longest draft.")
    trigger: Literal["kl", "entropy"] = Field(_P.trigger, description="What decides a handoff.")
    skip: Literal["off", "entropy", "top1"] = Field(_P.skip, description="Upload only ids where Q is sure.")
    skip_entropy_max: float = Field(_P.skip_entropy_max, ge=0)
    skip_top1_min: float = Field(_P.skip_top1_min, gt=0, le=1)
    budget: float = Field(_P.budget, ge=0, lt=1, description="Hold this cloud-token fraction (0: off).")
    budget_window: int = Field(_P.budget_window, ge=1)
    budget_gain: float = Field(_P.budget_gain, gt=0)

    # A slow or unreachable cloud
    check_timeout_s: float = Field(_L.check_timeout_s, gt=0)
    token_timeout_s: float = Field(_L.token_timeout_s, gt=0)
    open_timeout_s: float = Field(_L.open_timeout_s, gt=0)
    retry_initial_s: float = Field(_L.retry_initial_s, gt=0)
    retry_max_s: float = Field(_L.retry_max_s, gt=0)

    # A simulated network on top of the real connection (edge/verifier_client.py NetworkDelay);
    # bandwidths in kbit/s of 1000 bit/s.
    inject_rtt_ms: float = Field(0.0, ge=0, allow_inf_nan=False, description=_INJECT)
    inject_uplink_kbps: float | None = Field(None, gt=0, allow_inf_nan=False, description=_INJECT)
    inject_downlink_kbps: float | None = Field(None, gt=0, allow_inf_nan=False, description=_INJECT)

    def policy_config(self) -> PolicyConfig:
        names = {f.name for f in fields(PolicyConfig)} - {"kind"}
        return PolicyConfig(kind=self.policy, **{n: getattr(self, n) for n in names})

    def link_config(self) -> LinkConfig:
        names = {f.name for f in fields(LinkConfig)} - {"retry_multiplier"}
        return LinkConfig(**{n: getattr(self, n) for n in names})

    def network_delay(self) -> NetworkDelay | None:
        """The injected network delay for GrpcTransport; None when none is asked for.

        Returns:
            A NetworkDelay (kbit/s converted to bytes/s: kbps * 1000 / 8), or None when the round-trip
            time is 0 and neither bandwidth is limited.
        """
        if self.inject_rtt_ms == 0 and self.inject_uplink_kbps is None and self.inject_downlink_kbps is None:
            return None

        def bytes_per_s(kbps: float | None) -> float | None:
            return None if kbps is None else kbps * 1000 / 8

        return NetworkDelay(
            rtt_s=self.inject_rtt_ms / 1000,
            uplink_bytes_per_s=bytes_per_s(self.inject_uplink_kbps),
            downlink_bytes_per_s=bytes_per_s(self.inject_downlink_kbps),
        )
