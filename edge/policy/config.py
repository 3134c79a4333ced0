"""The handoff policy's constants, validated once (PolicyConfig)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from handoff.edge.policy.budget import BudgetConfig, BudgetController
from handoff.edge.policy.core import policy_class, policy_kinds
from handoff.edge.policy.skip import SkipGate
from handoff.edge.policy.triggers import EntropyScorer, KLScorer, TokenScorer
from handoff.shared.concepts import DIVERGENCES
from handoff.shared.divergence import AGGREGATIONS
from handoff.shared.errors import ShapeError
from handoff.shared.wire import pb

__all__ = ["TRIGGERS", "PolicyConfig"]

TRIGGERS: tuple[str, ...] = ("kl", "entropy")


@dataclass(frozen=True)
class PolicyConfig:
    """Constants of a handoff policy. Defaults and how they were chosen: docs/policy_defaults.md.

    Every field is checked at creation; a bad value raises ShapeError naming the field.
    """

    kind: str = "rollback"  # a registered policy kind: seed, rollback, exact (edge.policy.policy_kinds())
    seed_tokens: int = 0  # N0: tokens the cloud generates first
    check_interval: int = 8  # N: edge tokens per check point
    threshold: float = 0.2  # tau, nats, on the top-k KL (a lower bound of the full KL)
    aggregation: str = "max"  # over a window: "max" or "mean"
    handback_tokens: int = 4  # M: cloud tokens per handoff at most
    agree_tokens: int = 0  # hand back early once this many cloud positions in a row have KL <= tau; 0 = off
    top_k: int = 20
    lookahead_windows: int = 1  # windows drafted beyond the oldest unanswered check point; 0 = wait
    # gated: a flagged draft behind an unanswered check point is uploaded only once that check keeps
    # its token (a correction drops it unsent: no cloud pass for a draft thrown away); Q waits with it.
    defer_checks: bool = False
    # router: cloud tokens at a gated correction, at most: 1 = the correction alone (placed in place
    # under greedy); M > 1 = a handoff, P writes on for up to M tokens (back early by agree_tokens),
    # the tokens after the first counted as other cloud tokens. None: the router file's turn (1 in a
    # file that names none).
    router_turn: int | None = None
    draft_tokens: int = 4  # exact: the first draft's length gamma (then adapted to the acceptance rate)
    draft_tokens_max: int = 12  # exact: the longest draft
    # What decides a handoff: "kl" (P's answer at the check point) or "entropy" (Q's own entropy, nats,
    # against the threshold: the edge needs no cloud answer to decide); HybridGenerator also takes any
    # edge.policy.TokenScorer.
    trigger: str = "kl"
    # skip: upload only the token id where Q is confident ("entropy": entropy <= skip_entropy_max;
    # "top1": top-1 probability >= skip_top1_min); KL is computed where distributions were sent.
    skip: str = "off"
    skip_entropy_max: float = 0.5
    skip_top1_min: float = 0.9
    # budget > 0: tau is tuned online to hold this cloud-token fraction (edge.policy.BudgetController);
    # the threshold above is where it starts.
    budget: float = 0.0
    budget_window: int = 128
    # Loop gain lam = budget_gain * |d cloud-share / d log tau|: a monotone approach for lam < 0.65,
    # i.e. slopes up to ~0.3 (measured: 0.15-0.25, docs/policy_defaults.md); see BudgetController.
    budget_gain: float = 2.0
    # router: the learned router's file (handoff router train); gate_threshold replaces its threshold
    # (a probability: positions scored at or over it are checked); None: the file's, chosen on validation.
    router: str = ""
    gate_threshold: float | None = None
    # What the KL is over: "token" (each id its own bucket), "surface" (ids equal up to case and
    # leading whitespace share one), "char" (ids whose text starts with the same character share one:
    # the next-character distribution) or "concept" (k-means clusters of P's output embeddings,
    # `concepts` of them); handoff.shared.concepts. Always a lower bound of the token KL.
    divergence: str = "token"
    concepts: int = 1024
    # safe (selective ensembling, edge/policy/ensemble.py): P's weight in the average of P and Q, and
    # sharpen the average when its largest probability is below sharpen_below (0: never). The best of
    # the settings measured on the default pair (docs/methods.md: W 0.5, 0.7, 0.9).
    ensemble_weight: float = 0.9
    sharpen_below: float = 0.5
    # mixture (a mixture of small experts, edge/mixture.py, edge/policy/mixture.py): which of the edge's
    # experts take part (comma-separated names; "": all; other policies draft with the first alone),
    # "select" (the lowest recent KL drafts) or "weighted" (their distributions mixed), the recent KL's
    # decay per window, and the weighted mixture's temperature (nats).
    use_experts: str = ""
    mixture: str = "select"
    expert_decay: float = 0.5
    mixture_temperature: float = 0.25

    def __post_init__(self) -> None:
        if self.kind not in policy_kinds():
            raise ShapeError(f"kind: expected a registered policy kind {policy_kinds()}, got {self.kind!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ShapeError(f"aggregation: expected one of {AGGREGATIONS}, got {self.aggregation!r}")
        for name in ("check_interval", "handback_tokens", "top_k"):
            _int_at_least(name, getattr(self, name), 1)
        if self.router_turn is not None:
            _int_at_least("router_turn", self.router_turn, 1)
        for name in ("seed_tokens", "agree_tokens", "lookahead_windows"):
            _int_at_least(name, getattr(self, name), 0)
        if not (self.threshold >= 0.0 and math.isfinite(self.threshold)):  # also rejects NaN
            raise ShapeError(f"threshold: expected a finite number >= 0 nats, got {self.threshold!r}")
        _int_at_least("draft_tokens", self.draft_tokens, 1)
        _int_at_least("draft_tokens_max", self.draft_tokens_max, 1)
        if self.draft_tokens > self.draft_tokens_max:
            limit = self.draft_tokens_max
            raise ShapeError(f"draft_tokens: expected <= draft_tokens_max ({limit}), got {self.draft_tokens}")
        if self.divergence not in DIVERGENCES:
            raise ShapeError(f"divergence: expected one of {DIVERGENCES}, got {self.divergence!r}")
        _int_at_least("concepts", self.concepts, 2)
        if self.mixture not in ("select", "weighted"):
            raise ShapeError(f"mixture: expected select or weighted, got {self.mixture!r}")
        if not (isinstance(self.mixture_temperature, int | float) and self.mixture_temperature > 0):
            raise ShapeError(
                f"mixture_temperature: expected a number > 0 nats, got {self.mixture_temperature!r}"
            )
        for name in ("ensemble_weight", "sharpen_below", "expert_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ShapeError(f"{name}: expected a number in [0, 1], got {value!r}")
        if self.trigger not in TRIGGERS:
            raise ShapeError(f"trigger: expected one of {TRIGGERS}, got {self.trigger!r}")
        self.skip_gate()  # validates skip and its bounds
        if not 0.0 <= self.budget < 1.0:  # also rejects NaN
            raise ShapeError(f"budget: expected a cloud-token fraction in [0, 1), got {self.budget!r}")
        if not isinstance(self.defer_checks, bool):
            raise ShapeError(f"defer_checks: expected a bool, got {self.defer_checks!r}")
        if self.gate_threshold is not None and not 0.0 <= self.gate_threshold <= 1.0:
            raise ShapeError(f"gate_threshold: expected a probability in [0, 1], got {self.gate_threshold!r}")
        if self.budget:
            _int_at_least("budget_window", self.budget_window, 1)
            self.budget_controller()  # validates budget_gain

    def skip_gate(self) -> SkipGate:
        """The uplink skip gate of skip, skip_entropy_max and skip_top1_min."""
        return SkipGate(self.skip, self.skip_entropy_max, self.skip_top1_min)  # type: ignore[arg-type]

    def budget_controller(self) -> BudgetController | None:
        """A fresh budget controller starting at the threshold (clamped to its bounds); None when off."""
        if not self.budget:
            return None
        tau = min(max(self.threshold, 0.01), 10.0)
        return BudgetController(
            BudgetConfig(target=self.budget, window=self.budget_window, gain=self.budget_gain, tau_init=tau)
        )

    def scorer(self) -> TokenScorer:
        """The trigger's per-token score."""
        return EntropyScorer() if self.trigger == "entropy" else KLScorer()

    def to_proto(self) -> pb.Policy:
        """The policy as OpenSession carries it (a kind without a wire name: UNSPECIFIED)."""
        return pb.Policy(
            kind=policy_class(self.kind).proto_kind,
            check_interval=self.check_interval,
            threshold=self.threshold,
            aggregation=self.aggregation,
            handback_tokens=self.handback_tokens,
            seed_tokens=self.seed_tokens,
        )


def _int_at_least(name: str, value: object, low: int) -> None:
    # bool is an int subclass: True as a count is a bug upstream, not a 1.
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        raise ShapeError(f"{name}: expected an integer >= {low}, got {value!r}")
