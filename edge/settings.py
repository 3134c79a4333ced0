"""Settings of the edge processes (generate, chat, serve-edge, eval): env HANDOFF_EDGE_* and HANDOFF_SERVE_*, or flags."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from handoff.edge.link import LinkConfig
from handoff.edge.policy import PolicyConfig, policy_kinds
from handoff.edge.policy.default import AUTO
from handoff.edge.verifier_client import NetworkDelay
from handoff.shared.cli_options import Flags

_P = PolicyConfig()
_L = LinkConfig()


class EdgeSettings(BaseSettings):
    """Where the cloud is, how to reach it, and the handoff policy (defaults: PolicyConfig's).

    Every field is also a flag of the commands that run the edge (generate, chat, serve-edge, eval):
    shared/cli_options.py generates them from the field's name, description, bounds and Flags.
    """

    model_config = SettingsConfigDict(env_prefix="HANDOFF_EDGE_", extra="ignore")

    # The cloud
    cloud: str | None = Field(None, description="HOST:PORT of a running verifier; default: an embedded one.")
    tls: bool = Field(False, description="Connect to --cloud with TLS (system roots, or --tls-ca).")
    tls_ca: Path | None = Field(None, description="PEM root certificates to trust.")
    auth_token: str | None = Field(
        None, description="Bearer token sent to the verifier (prefer the environment: flags show in ps)."
    )
    mode: Annotated[
        Literal["hybrid", "edge", "cloud"],
        Flags(
            switches=[
                ("--edge-only", "edge", "Baseline: Q alone, no cloud (--mode edge)."),
                ("--cloud-only", "cloud", "Baseline: P generates everything (--mode cloud)."),
            ]
        ),
    ] = Field("hybrid", description="hybrid, or a baseline through the same code path: edge (Q), cloud (P).")
    n_ctx: int = Field(4096, ge=64, description="The edge model's context length (tokens).")
    experts: str = Field(
        "",
        description="A mixture of small experts on the edge (with --policy mixture): 'prompted' (the edge "
        "model with specialised system prompts) or a JSON file of [{name, model, system}]; empty: one Q.",
    )

    # The policy (edge/policy/config.py PolicyConfig; docs/policy_defaults.md says how they were chosen)
    # Any registered kind (edge/policy/core.py register_policy), so a new policy is selectable here too.
    policy: str = Field(
        AUTO,
        description="auto (the learned router shipped for the default model pair, with deferred checks; "
        "rollback for other pairs), rollback or seed (KL handoff), exact (speculative sampling: P's "
        "distribution), router (--router FILE), or any other registered policy kind.",
    )
    seed_tokens: int = Field(_P.seed_tokens, ge=0, description="N0: tokens the cloud generates first.")
    check_interval: int = Field(_P.check_interval, ge=1, description="N: edge tokens per check point.")
    threshold: float = Field(
        _P.threshold,
        ge=0,
        allow_inf_nan=False,
        description="tau in nats (top-k KL, a lower bound of the full KL).",
    )
    aggregation: Literal["max", "mean"] = Field(
        _P.aggregation, description="A check point's divergence: the max or the mean over its window."
    )
    handback_tokens: int = Field(_P.handback_tokens, ge=1, description="M: cloud tokens per handoff at most.")
    agree_tokens: int = Field(
        _P.agree_tokens, ge=0, description="Hand back once this many cloud positions in a row agree (0: off)."
    )
    top_k: int = Field(_P.top_k, ge=1, le=256, description="k of the top-k views.")
    lookahead_windows: Annotated[int, Flags("--lookahead")] = Field(
        _P.lookahead_windows, ge=0, description="Windows drafted while a check point is in flight (0: wait)."
    )
    defer_checks: bool = Field(
        _P.defer_checks,
        description="Gated: a flagged draft behind an unanswered check is uploaded once that check keeps "
        "its token (a correction drops it unsent).",
    )
    router_turn: int | None = Field(
        _P.router_turn,
        ge=1,
        description="Router: cloud tokens at a gated correction, at most (1: the correction alone; "
        "more: P writes on, as a handoff; default: the router file's turn, 1 if it names none).",
    )
    draft_tokens: int = Field(_P.draft_tokens, ge=1, description="exact: the first draft's length.")
    draft_tokens_max: int = Field(_P.draft_tokens_max, ge=1, description="exact: the longest draft.")
    trigger: Literal["kl", "entropy"] = Field(
        _P.trigger, description="What decides a handoff: kl (P's answer) or entropy (Q's own entropy vs tau)."
    )
    skip: Literal["off", "entropy", "top1"] = Field(
        _P.skip, description="Upload only the token id where Q is confident (entropy or top-1 probability)."
    )
    skip_entropy_max: float = Field(
        _P.skip_entropy_max, ge=0, description="skip entropy: Q is confident at this entropy (nats) or below."
    )
    skip_top1_min: float = Field(
        _P.skip_top1_min,
        gt=0,
        le=1,
        description="skip top1: Q is confident at this top-1 probability or above.",
    )
    budget: float = Field(
        _P.budget, ge=0, lt=1, description="Tune tau online to hold this cloud-token fraction (0: off)."
    )
    budget_window: int = Field(
        _P.budget_window, ge=1, description="budget: tokens of the sliding window the fraction is held over."
    )
    budget_gain: float = Field(
        _P.budget_gain, gt=0, description="budget: the gain of the control of log tau."
    )
    divergence: Literal["token", "surface", "char", "concept"] = Field(
        _P.divergence,
        description="KL over tokens, over surface forms (case and leading space folded), over the next "
        "character, or over concepts (clusters of P's output embeddings); each a lower bound of the token KL.",
    )
    concepts: int = Field(_P.concepts, ge=2, description="divergence concept: the number of clusters.")
    ensemble_weight: float = Field(
        _P.ensemble_weight, ge=0, le=1, description="safe: P's weight in the ensemble of P and Q."
    )
    use_experts: str = Field(
        _P.use_experts, description="Which of --experts take part (comma-separated names; empty: all)."
    )
    mixture: Literal["select", "weighted"] = Field(
        _P.mixture, description="mixture: the closest expert drafts (select), or their mixture (weighted)."
    )
    expert_decay: float = Field(
        _P.expert_decay,
        ge=0,
        le=1,
        description="mixture: how much of an expert's recent KL each window keeps.",
    )
    mixture_temperature: float = Field(
        _P.mixture_temperature,
        gt=0,
        description="mixture weighted: softmax temperature over recent KLs (nats).",
    )
    sharpen_below: float = Field(
        _P.sharpen_below,
        ge=0,
        le=1,
        description="safe: sharpen the ensemble when its top probability is below this (0: never).",
    )
    router: str = Field(_P.router, description="router: the learned router's file (handoff router train).")
    gate_threshold: float | None = Field(
        _P.gate_threshold,
        ge=0,
        le=1,
        description="router: check positions scored at or over this probability (default: the file's).",
    )

    # A slow or unreachable cloud (edge/link.py LinkConfig)
    check_timeout_s: Annotated[float, Flags("--check-timeout")] = Field(
        _L.check_timeout_s,
        gt=0,
        description="Seconds before an unanswered check point counts the cloud as gone.",
    )
    token_timeout_s: float = Field(
        _L.token_timeout_s,
        gt=0,
        description="Seconds between two cloud tokens before the cloud counts as gone.",
    )
    open_timeout_s: float = Field(
        _L.open_timeout_s, gt=0, description="Seconds to open (or resynchronise) a session."
    )
    retry_initial_s: float = Field(
        _L.retry_initial_s, gt=0, description="First wait (s) before probing an unreachable cloud again."
    )
    retry_max_s: float = Field(_L.retry_max_s, gt=0, description="Longest wait (s) between two probes.")

    # A simulated network on top of the real connection (edge/verifier_client.py NetworkDelay;
    # scripts/validate_simulator.py); bandwidths in kbit/s of 1000 bit/s.
    inject_rtt_ms: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="Loopback testing only: add this round-trip time (ms) to every message to the cloud.",
    )
    inject_uplink_kbps: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Loopback testing only: limit the uplink to the cloud to this many kbit/s.",
    )
    inject_downlink_kbps: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Loopback testing only: limit the downlink from the cloud to this many kbit/s.",
    )

    @field_validator("policy")
    @classmethod
    def _registered_kind(cls, kind: str) -> str:
        if kind != AUTO and kind not in policy_kinds():
            raise ValueError(f"unknown policy {kind!r}; {AUTO} or registered: {', '.join(policy_kinds())}")
        return kind

    def policy_config(self) -> PolicyConfig:
        """The policy; for "auto", its fallback (kind rollback), which edge.policy.default.auto_policy
        turns into the shipped router once Q's vocabulary is known (the Assistant does)."""
        names = {f.name for f in fields(PolicyConfig)} - {"kind"}
        kind = _P.kind if self.policy == AUTO else self.policy
        return PolicyConfig(kind=kind, **{n: getattr(self, n) for n in names})

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


class ServeSettings(BaseSettings):
    """Settings of `handoff serve-edge`'s HTTP side (env HANDOFF_SERVE_*, or flags); the model side is EdgeSettings."""

    model_config = SettingsConfigDict(env_prefix="HANDOFF_SERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=0, le=65535, description="Port; 0 picks a free one.")
    api_key: str | None = Field(
        None,
        description="Require `Authorization: Bearer <key>` on /v1 (prefer the environment: flags show in ps).",
    )
    max_queue: int = Field(8, ge=0, description="Requests that may wait while one generates; more get 429.")
    model_alias: str | None = Field(None, description="Model id to serve under (default: the edge model's).")
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Chat answers' length when max_tokens is not given (default: the context's rest).",
    )
    cors_origins: Annotated[list[str], Flags("--cors-origin")] = Field(
        default_factory=list, description="An origin browsers may call from (repeatable)."
    )
    shutdown_timeout_s: float = Field(10.0, gt=0, description="Grace for open requests on shutdown.")
