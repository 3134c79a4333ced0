"""The handoff policy core: pure decisions (no asyncio, no I/O) that the async controller calls.

- config: PolicyConfig, the constants, validated once.
- core: HandoffPolicy (every decision: window -> keep or hand over, cloud streak -> hand back,
  committed counts -> budget), the registry of kinds (register_policy) and the built-in kinds.
- triggers: per-token scorers (KL, Q's entropy, any function) and the cut they imply.
- budget: the budget-holding threshold (tau tuned online).
- skip: the uplink skip gate.
- features, router: the learned edge router (its features, its file, the gated "router" kind).
- ensemble: selective ensembling (SAFE, the "safe" kind): the edge places the ensemble's token.
- mixture: a mixture of small experts (the "mixture" kind), selected or weighted by divergence.

Every comparison with tau lives in this package.
"""

from handoff.edge.policy.budget import BudgetConfig, BudgetController
from handoff.edge.policy.config import TRIGGERS, PolicyConfig
from handoff.edge.policy.core import (
    ROUND_KINDS,
    CorrectionPolicy,
    DivergenceCorrectionPolicy,
    ExactPolicy,
    HandBack,
    HandoffPolicy,
    RollbackPolicy,
    RoundKind,
    SeedPolicy,
    WindowDecision,
    make_policy,
    policy_class,
    policy_kinds,
    register_policy,
)
from handoff.edge.policy.ensemble import SafePolicy
from handoff.edge.policy.mixture import MixturePolicy
from handoff.edge.policy.router import RouterMismatch, RouterModel, RouterPolicy, load_router
from handoff.edge.policy.skip import GATE_KINDS, SkipGate, skipped_kl, window_divergence
from handoff.edge.policy.triggers import (
    CUT_KINDS,
    CallableScorer,
    EntropyScorer,
    KLScorer,
    TokenScorer,
    WindowView,
    trigger_cut,
)

__all__ = [
    "CUT_KINDS",
    "GATE_KINDS",
    "ROUND_KINDS",
    "TRIGGERS",
    "BudgetConfig",
    "BudgetController",
    "CallableScorer",
    "CorrectionPolicy",
    "DivergenceCorrectionPolicy",
    "EntropyScorer",
    "ExactPolicy",
    "HandBack",
    "HandoffPolicy",
    "KLScorer",
    "MixturePolicy",
    "PolicyConfig",
    "RollbackPolicy",
    "RoundKind",
    "RouterMismatch",
    "RouterModel",
    "RouterPolicy",
    "SafePolicy",
    "SeedPolicy",
    "SkipGate",
    "TokenScorer",
    "WindowDecision",
    "WindowView",
    "load_router",
    "make_policy",
    "policy_class",
    "policy_kinds",
    "register_policy",
    "skipped_kl",
    "trigger_cut",
    "window_divergence",
]
