"""The handoff policy core: every decision of a handoff policy, pure (no asyncio, no I/O).

A HandoffPolicy answers the async driver (edge/controller.py) and the offline replay
(edge/simulation/replay.py) alike; both feed it numbers and act on its answers:

- a checked window's scores -> keep n of its tokens, and whether the cloud takes over (decide);
- each cloud token's KL during a handoff -> hand back to the edge now (hand_back -> HandBack);
- committed token counts -> the budget moves tau (on_committed);
- which positions upload only the token id (skip), and which round type the driver runs (round).

State: a HandoffPolicy lives as long as its HybridGenerator, so what it holds is per generator (the
budget's tau carries across generate() calls); begin() is called at the start of each generation
for per-generation state (none in the built-in kinds); a HandBack holds one cloud turn's streak.

Kinds are classes in a registry that PolicyConfig.kind is validated against. A new policy is one
subclass plus `@register_policy("name")`; the driver needs no change as long as it uses one of the
round types of ROUND_KINDS:

    @register_policy("router")
    class RouterPolicy(HandoffPolicy):
        def decide(self, view: WindowView) -> WindowDecision:
            keep = my_router(view)  # e.g. a learned router on Q's views and P's KLs
            return WindowDecision(keep, hand_over=keep < view.n)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np

from handoff.edge.policy.budget import BudgetController
from handoff.edge.policy.checks import count
from handoff.edge.policy.triggers import CutKind, TokenScorer, WindowView, checked_scores, cut_checked
from handoff.shared.concepts import concept_map_for
from handoff.shared.errors import ShapeError
from handoff.shared.wire import pb

if TYPE_CHECKING:
    from handoff.edge.policy.config import PolicyConfig

__all__ = [
    "ROUND_KINDS",
    "CorrectionPolicy",
    "DivergenceCorrectionPolicy",
    "ExactPolicy",
    "HandBack",
    "HandoffPolicy",
    "RollbackPolicy",
    "RoundKind",
    "SeedPolicy",
    "WindowDecision",
    "make_policy",
    "policy_class",
    "policy_kinds",
    "register_policy",
]

# "window": the edge drafts windows of check_interval tokens, the cloud checks each (check points).
# "draft": speculative sampling, the cloud verifies drafts of gamma tokens (edge/exact.py).
# "gated": the edge commits each token at once unless the policy's gate() flags it for a check of that
# one position (edge/gated.py; a gated policy defines gate() and checks(), and decides as correction).
RoundKind = Literal["window", "draft", "gated"]
ROUND_KINDS: tuple[str, ...] = ("window", "draft", "gated")


@dataclass(frozen=True)
class WindowDecision:
    """What a checked window becomes.

    keep: its first `keep` tokens are committed as the edge's, 0 <= keep <= n.
    hand_over: the cloud generates next, from the window's position `keep` (a rollback when keep < n).
    token: with hand_over and keep < n, the token the edge itself places at position `keep` instead
        of asking the cloud to generate one (an ensembled token, edge/policy/ensemble.py); the edge
        then goes on drafting. None: the cloud generates.
    """

    keep: int
    hand_over: bool
    token: int | None = None

    def __post_init__(self) -> None:
        if count("keep", self.keep) < 0:
            raise ShapeError(f"keep: expected tokens >= 0, got {self.keep}")
        if self.token is not None and (count("token", self.token) < 0 or not self.hand_over):
            raise ShapeError(f"token: expected a token id >= 0 with hand_over, got {self.token!r}")

    def checked(self, n: int) -> WindowDecision:
        """self, after checking that it fits a window of n tokens (a policy may be anyone's code)."""
        if self.keep > n:
            raise ShapeError(f"keep: a window of {n} tokens cannot keep {self.keep}")
        if not self.hand_over and self.keep != n:
            raise ShapeError(
                f"keep: a window that is not handed over keeps all its {n} tokens, not {self.keep}"
            )
        if self.token is not None and self.keep >= n:
            raise ShapeError(f"token: a window of {n} tokens has no position {self.keep} to place it at")
        return self


class HandBack:
    """One cloud turn's hand-back rule: back to the edge once agree_tokens positions in a row agree.

    Args:
        policy: whose agrees() judges a position (tau now).
        agree_tokens: positions in a row, >= 0; 0 never hands back early.
    """

    def __init__(self, policy: HandoffPolicy, agree_tokens: int) -> None:
        if count("agree_tokens", agree_tokens) < 0:
            raise ShapeError(f"agree_tokens: expected >= 0, got {agree_tokens}")
        self.policy = policy
        self.agree_tokens = agree_tokens
        self.streak = 0

    def agreed(self, kl: float) -> bool:
        """Record one cloud position's KL(P || Q); True once the models agreed on enough in a row.

        Args:
            kl: nats at the position (NaN or +inf: no agreement).

        Returns:
            True when generation should return to the edge after this position.
        """
        if not self.agree_tokens:
            return False
        self.streak = self.streak + 1 if self.policy.agrees(kl) else 0
        return self.streak >= self.agree_tokens


class HandoffPolicy:
    """Every decision of a handoff policy. Subclass it and register the subclass to add a kind.

    The base class is the KL-threshold policy: a window hands over when its aggregated score is over
    tau, cut as `cut_kind` says; a cloud position agrees when its KL is <= tau. Override decide()
    (whole window view), decide_scores() (per-token scores) or agrees() to change a rule.

    Args:
        config: the constants (PolicyConfig); config.kind must be this class's kind.
        scorer: the per-token score of windows; default config.scorer() (KL, or Q's entropy).
    """

    kind: ClassVar[str] = ""  # set by register_policy
    round: ClassVar[RoundKind] = "window"  # the round type the driver runs (ROUND_KINDS)
    cut_kind: ClassVar[CutKind] = "rollback"  # where a window over tau is cut
    proto_kind: ClassVar[int] = pb.POLICY_KIND_UNSPECIFIED  # what OpenSession tells the cloud
    places_tokens: ClassVar[bool] = False  # decide() may return a token for the edge to place itself
    placed_source: ClassVar[str] = "ensembled"  # how such a token is recorded (TokenRecord.source)

    def __init__(self, config: PolicyConfig, *, scorer: TokenScorer | None = None) -> None:
        if config.kind != self.kind:
            raise ShapeError(
                f"{type(self).__name__} is policy kind {self.kind!r}, the config says {config.kind!r}"
            )
        self.config = config
        self.scorer: TokenScorer = scorer if scorer is not None else config.scorer()
        self.skip_gate = config.skip_gate()
        # Per generator: a budget is a share of all the tokens the generator produces.
        self.budget: BudgetController | None = config.budget_controller()
        # [V] concept ids for the divergence over concepts (set by attach); None: over tokens.
        self.concept_of: np.ndarray | None = None

    @property
    def threshold(self) -> float:
        """tau now, in nats: the config's, or where the budget controller has moved it."""
        return self.budget.tau if self.budget is not None else self.config.threshold

    def begin(self) -> None:
        """A generation starts: reset per-generation state (the built-in kinds have none)."""

    def attach(self, vocabulary: Any) -> None:
        """The edge's vocabulary is known (once per generator): the concept map of the policy's
        divergence is loaded; a policy with a model file checks it (overrides call this first).
        """
        self.concept_of = concept_map_for(self.config.divergence, vocabulary, self.config.concepts)

    @property
    def needs_hidden(self) -> bool:
        """True when the policy reads Q's last hidden state (the runner must return it with each step)."""
        return False

    # -- uploads ----------------------------------------------------------------------------------

    @property
    def skips_uploads(self) -> bool:
        """False when every position is uploaded with Q's distribution (the driver builds no arrays)."""
        return self.skip_gate.kind != "off"

    def skip(self, entropy: Any, top1_logprob: Any) -> np.ndarray:
        """Positions uploaded as a token id only (SkipGate.confident).

        Args:
            entropy: [n] Q's entropy in nats.
            top1_logprob: [n] Q's largest log-probability.

        Returns:
            [n] bool, True where Q's distribution is not uploaded.
        """
        return self.skip_gate.confident(entropy, top1_logprob)

    # -- windows ----------------------------------------------------------------------------------

    def decide(self, view: WindowView) -> WindowDecision:
        """What a checked window becomes: the scorer's scores judged by decide_scores.

        Args:
            view: the window (p_kls set once the cloud has answered).

        Returns:
            The decision; keep <= view.n.
        """
        return self.decide_scores(self.scorer.scores(view))

    def decide_scores(self, scores: Any) -> WindowDecision:
        """The threshold rule on a window's per-token scores (trigger_cut with tau now).

        Args:
            scores: [n] real, higher = more reason to hand over; NaN = not scored (never cut at, left
                out of the aggregate).

        Returns:
            Kept (keep = n) when the aggregated score is <= tau; else handed over, keeping n (seed) or
            the positions before the first score over tau (rollback).
        """
        arr = checked_scores(scores)  # [n]
        cut = cut_checked(arr, self.threshold, self.config.aggregation, self.cut_kind)
        n = int(arr.shape[0])
        return WindowDecision(n, False) if cut is None else WindowDecision(cut, True)

    # -- cloud turns ------------------------------------------------------------------------------

    def agrees(self, kl: float) -> bool:
        """The models agree at a cloud position: KL(P || Q) <= tau (nats, top-k lower bound)."""
        return kl <= self.threshold

    def turn_tokens(self) -> int:
        """Cloud tokens of a handoff after a window is handed over, at most (M, handback_tokens)."""
        return self.config.handback_tokens

    def hand_back(self, early: bool = True) -> HandBack:
        """A new cloud turn's hand-back rule.

        Args:
            early: False for turns that run their course (seed tokens, cloud-only generation).
        """
        return HandBack(self, self.config.agree_tokens if early else 0)

    # -- budget -----------------------------------------------------------------------------------

    def on_committed(self, n_tokens: int, n_cloud: int) -> float:
        """Tokens were committed (a checked window, or a cloud turn): the budget may move tau.

        Args:
            n_tokens: tokens committed, >= 0.
            n_cloud: how many of them the cloud produced, 0 <= n_cloud <= n_tokens.

        Returns:
            tau now, in nats.
        """
        if self.budget is not None:
            self.budget.update(n_tokens, n_cloud)
        return self.threshold


P = TypeVar("P", bound=type[HandoffPolicy])

_REGISTRY: dict[str, type[HandoffPolicy]] = {}


def register_policy(name: str) -> Callable[[P], P]:
    """Class decorator: make a HandoffPolicy subclass the policy of kind `name` (PolicyConfig.kind).

    Raises:
        ValueError: the name is taken by another class, or the class is not a HandoffPolicy with a
            round type of ROUND_KINDS.
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"a policy kind is a non-empty string, got {name!r}")

    def register(cls: P) -> P:
        if not (isinstance(cls, type) and issubclass(cls, HandoffPolicy)):
            raise ValueError(f"policy {name!r}: {cls!r} is not a HandoffPolicy subclass")
        if cls.round not in ROUND_KINDS:
            raise ValueError(f"policy {name!r}: round must be one of {ROUND_KINDS}, got {cls.round!r}")
        old = _REGISTRY.get(name)
        # The same class defined again (a reloaded module) replaces itself; another one is a clash.
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"policy kind {name!r} is already registered to {old.__qualname__}")
        cls.kind = name
        _REGISTRY[name] = cls
        return cls

    return register


def policy_kinds() -> tuple[str, ...]:
    """The registered policy kinds, in registration order."""
    return tuple(_REGISTRY)


def policy_class(kind: str) -> type[HandoffPolicy]:
    """The class registered for a kind; ShapeError when there is none."""
    try:
        return _REGISTRY[kind]
    except (KeyError, TypeError):
        raise ShapeError(f"kind: expected one of {policy_kinds()}, got {kind!r}") from None


def make_policy(config: PolicyConfig, *, scorer: TokenScorer | None = None) -> HandoffPolicy:
    """The policy object of config.kind, with its constants (and, optionally, another scorer)."""
    return policy_class(config.kind)(config, scorer=scorer)


@register_policy("seed")
class SeedPolicy(HandoffPolicy):
    """A window over tau stands; the cloud generates after it (docs/architecture.md, seed)."""

    cut_kind = "seed"
    proto_kind = pb.POLICY_KIND_SEED


@register_policy("rollback")
class RollbackPolicy(HandoffPolicy):
    """A window over tau is cut at its first position over tau; the cloud corrects it there."""

    cut_kind = "rollback"
    proto_kind = pb.POLICY_KIND_ROLLBACK


@register_policy("exact")
class ExactPolicy(RollbackPolicy):
    """Speculative sampling (Leviathan et al. 2023, arXiv 2211.17192): the output follows P exactly.

    Rounds are drafts of gamma tokens verified by the cloud (edge/exact.py). Windows only occur while
    the cloud is unreachable and when it comes back within an edge phase; they are judged as rollback.
    """

    round = "draft"
    proto_kind = pb.POLICY_KIND_EXACT


@register_policy("correction")
class CorrectionPolicy(HandoffPolicy):
    """Correction only: at a checked window, the first position where P's most likely token differs
    from Q's token is replaced by P's token (one cloud token), and the edge resumes at once.

    No hand-back phase and no threshold: the cloud writes exactly the tokens where the two models'
    choices differ, so under greedy decoding the output is P's greedy text token for token, with one
    cloud token per disagreement (the oracle of the evaluation's "exact" point; cf. the token-level
    routers of R2R, arXiv 2505.21600, and CITER, arXiv 2502.01976, which learn to predict these
    positions). Meant for greedy decoding: under sampling it pulls Q's samples towards P's argmax;
    use the exact policy there.
    """

    cut_kind = "rollback"
    proto_kind = pb.POLICY_KIND_ROLLBACK  # on the wire a rollback: cut, then the cloud generates

    def decide(self, view: WindowView) -> WindowDecision:
        """Keep the tokens before the first disagreement with P's argmax; hand that position to P.

        Args:
            view: the window, with p_top1_ids (the check point's answer).

        Returns:
            Kept when P's most likely token is Q's token everywhere; else handed over at the first
            position where it is not.
        """
        if view.p_top1_ids is None:
            raise ShapeError("the correction policy needs the cloud's answer (WindowView.p_top1_ids)")
        differs = np.flatnonzero(view.p_top1_ids != view.token_ids)  # [m] positions, ascending
        if differs.size == 0:
            return WindowDecision(view.n, False)
        return WindowDecision(int(differs[0]), True)

    def turn_tokens(self) -> int:
        """One: the correcting token itself."""
        return 1

    def agrees(self, kl: float) -> bool:
        """Never consulted for the one-token turn; a correction has no hand-back phase."""
        return False


@register_policy("correction-kl")
class DivergenceCorrectionPolicy(CorrectionPolicy):
    """Correction at the first disagreement with P's argmax, or earlier where the trigger fires.

    The trigger is the policy's scorer (the top-k KL by default, or Q's entropy) against tau: a
    position whose score is over tau is handed to P even where P's most likely token is Q's, so a
    correction also happens where the models' distributions part although their choices agree.
    """

    def decide(self, view: WindowView) -> WindowDecision:
        """The earlier of the first argmax disagreement and the first score over tau.

        Args:
            view: the window, with p_top1_ids (and p_kls for the KL trigger).

        Returns:
            Kept when neither happens; else handed over at the earlier position.
        """
        by_choice = super().decide(view)
        by_score = self.decide_scores(self.scorer.scores(view))
        return by_score if by_score.hand_over and by_score.keep < by_choice.keep else by_choice
