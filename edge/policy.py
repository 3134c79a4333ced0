"""The handoff policy's constants, validated once (PolicyConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from handoff.edge.policies import (
    BudgetConfig,
    BudgetController,
    EntropyScorer,
    KLScorer,
    SkipGate,
    TokenScorer,
)
from handoff.shared.divergence import AGGREGATIONS
from handoff.shared.errors import ShapeError
from handoff.shared.wire import pb


@dataclass(frozen=True)
class PolicyConfig:
    """Constants of a handoff policy. Defaults and how they were chosen: docs/policy_defaults.md."""

    kind: Literal["seed", "rollback", "exact"] = "rollback"
    seed_tokens: int = 0  # N0: tokens the cloud generates first
    check_interval: int = 8  # N: edge tokens per check point
    threshold: float = 0.2  # tau, nats, on the top-k KL (a lower bound of the full KL)
    aggregation: str = "max"  # over a window: "max" or "mean"
    handback_tokens: int = 4  # M: cloud tokens per handoff at most
    agree_tokens: int = 0  # hand back early once this many cloud positions in a row have KL <= tau; 0 = off
    top_k: int = 20
    lookahead_windows: int = 1  # windows drafted beyond the oldest unanswered check point; 0 = wait
    draft_tokens: int = 4  # exact: the first draft's length gamma (then adapted to the acceptance rate)
    draft_tokens_max: int = 12  # exact: the longest draft
    # What decides a handoff: "kl" (P's answer at the check point) or "entropy" (Q's own entropy, nats,
    # against the threshold: the edge needs no cloud answer to decide); HybridGenerator also takes any
    # edge.policies.TokenScorer.
    trigger: str = "kl"
    # skip: upload only the token id where Q is confident ("entropy": entropy <= skip_entropy_max;
    # "top1": top-1 probability >= skip_top1_min); KL is computed where distributions were sent.
    skip: str = "off"
    skip_entropy_max: float = 0.5
    skip_top1_min: float = 0.9
    # budget > 0: tau is tuned online to hold this cloud-token fraction (edge.policies.BudgetController);
    # the threshold above is where it starts.
    budget: float = 0.0
    budget_window: int = 128
    budget_gain: float = 2.0  # stable for |d cloud-share / d log tau| < ~0.3 (edge/policies.py)

    def __post_init__(self) -> None:
        if self.kind not in ("seed", "rollback", "exact"):
            raise ShapeError(f"policy kind must be seed, rollback or exact, got {self.kind!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ShapeError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.check_interval < 1 or self.handback_tokens < 1 or self.top_k < 1:
            raise ShapeError("check_interval, handback_tokens and top_k must be >= 1")
        if self.seed_tokens < 0 or self.agree_tokens < 0 or self.lookahead_windows < 0:
            raise ShapeError("seed_tokens, agree_tokens and lookahead_windows must be >= 0")
        if not (self.threshold >= 0.0 and math.isfinite(self.threshold)):
            raise ShapeError(f"threshold must be a finite number >= 0 nats, got {self.threshold}")
        if not 1 <= self.draft_tokens <= self.draft_tokens_max:
            raise ShapeError("draft_tokens must be >= 1 and <= draft_tokens_max")
        if self.trigger not in ("kl", "entropy"):
            raise ShapeError(f"trigger must be kl or entropy, got {self.trigger!r}")
        self.skip_gate()  # validates skip and its bounds
        if not 0.0 <= self.budget < 1.0:
            raise ShapeError(f"budget must be a cloud-token fraction in [0, 1), got {self.budget}")
        if self.budget and self.budget_window < 1:
            raise ShapeError("budget_window must be >= 1")

    def skip_gate(self) -> SkipGate:
        return SkipGate(kind=self.skip, entropy_max=self.skip_entropy_max, top1_min=self.skip_top1_min)  # type: ignore[arg-type]

    def budget_controller(self) -> BudgetController | None:
        if not self.budget:
            return None
        tau = min(max(self.threshold, 0.01), 10.0)
        return BudgetController(
            BudgetConfig(target=self.budget, window=self.budget_window, gain=self.budget_gain, tau_init=tau)
        )

    def scorer(self) -> TokenScorer:
        return EntropyScorer() if self.trigger == "entropy" else KLScorer()

    def to_proto(self) -> pb.Policy:
        kind = {
            "seed": pb.POLICY_KIND_SEED,
            "rollback": pb.POLICY_KIND_ROLLBACK,
            "exact": pb.POLICY_KIND_EXACT,
        }[self.kind]
        return pb.Policy(
            kind=kind,
            check_interval=self.check_interval,
            threshold=self.threshold,
            aggregation=self.aggregation,
            handback_tokens=self.handback_tokens,
            seed_tokens=self.seed_tokens,
        )
