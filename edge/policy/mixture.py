"""The mixture of small experts as a handoff policy (seed note §0.9.2): experts are selected, or weighted,
by their recent divergence from P at check points, and P takes over only where every expert diverges.

The edge runs a MixtureRunner (edge/mixture.py): every expert evaluates every token, so at a check
point each expert's top-k KL from P is known at each position (WindowView.expert_kls). The policy
keeps a score per expert, an exponential moving average of its mean KL per checked window
(expert_decay), and gives the runner either the drafter (select: the lowest score) or weights
softmax(-score / mixture_temperature) for a mixture of the experts' distributions (weighted).

At a checked window, the drafted token at a position stands when the drafter's KL is <= tau. Where it
is over tau, an expert whose KL there is <= tau is asked instead: the edge places that expert's most
likely token (a switch, no cloud turn; that expert drafts on); only when every
expert is over tau does P take over, as the rollback policy does (M tokens, hand-back once agreeing).
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from handoff.edge.policy.core import RollbackPolicy, WindowDecision, register_policy
from handoff.edge.policy.triggers import WindowView
from handoff.shared.errors import ShapeError
from handoff.shared.wire import pb

__all__ = ["MIXTURES", "MixturePolicy"]

MIXTURES: tuple[str, ...] = ("select", "weighted")
INF_KL = 50.0  # nats: an infinite top-k KL (P's token outside the expert's support) in a mean


@register_policy("mixture")
class MixturePolicy(RollbackPolicy):
    """Experts selected or weighted by their divergence from P; P where all diverge.

    Constants (PolicyConfig): mixture ("select" or "weighted"), expert_decay (the score's memory, 0:
    the last window only), mixture_temperature (nats: the weighted mixture's sharpness), threshold.
    """

    proto_kind = pb.POLICY_KIND_ROLLBACK
    places_tokens = True
    placed_source = "edge"  # a switch places another expert's token: an edge token P checked

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.scores: np.ndarray | None = None  # [E] recent mean KL of each expert, nats

    def begin(self) -> None:
        """A new generation: no expert has a record yet (a new prompt may want another expert)."""
        self.scores = None

    def expert_weights(self, n_experts: int) -> np.ndarray:
        """[E] weights of the experts (sum 1): softmax(-score / temperature); uniform before any check.

        In select mode the runner drafts with the argmax (the lowest score; ties to the first expert).
        """
        if self.scores is None or self.scores.shape[0] != n_experts:
            return np.full(n_experts, 1.0 / n_experts)
        z = -(self.scores - self.scores.min()) / max(self.config.mixture_temperature, 1e-9)
        w = np.exp(z)
        return w / w.sum()

    def observe(self, expert_kls: np.ndarray) -> None:
        """Fold one window's [n, E] expert KLs into the scores (positions without a value are left out)."""
        kls = np.minimum(np.asarray(expert_kls, dtype=np.float64), INF_KL)  # +inf counts as INF_KL nats
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an expert without values: NaN, left out
            mean = np.nanmean(kls, axis=0)  # [E]
        if np.isnan(mean).all():
            return
        if self.scores is None or self.scores.shape != mean.shape:
            self.scores = np.nan_to_num(mean, nan=np.nanmax(mean))
            return
        d = self.config.expert_decay
        self.scores = np.where(np.isnan(mean), self.scores, d * self.scores + (1 - d) * np.nan_to_num(mean))

    def decide(self, view: WindowView) -> WindowDecision:
        """Keep positions the drafter agrees on; switch to an agreeing expert's token; else P takes over.

        Args:
            view: the window with p_kls and the experts' KLs and top-1 ids.

        Returns:
            Kept when the drafted tokens stand; handed over at the first position where they do not,
            with the token of the closest agreeing expert to place there, or none (P generates).
        """
        if view.expert_kls is None or view.expert_top1_ids is None or view.p_kls is None:
            raise ShapeError(
                "the mixture policy needs several experts on the edge (--experts) and the cloud's KLs"
            )
        self.observe(view.expert_kls)
        tau = self.threshold
        for j in range(view.n):
            kl = view.p_kls[j]
            if np.isnan(kl) or kl <= tau:
                continue
            row = view.expert_kls[j]  # [E]
            best = int(np.argmin(np.where(np.isnan(row), np.inf, row)))
            if not row[best] <= tau:
                return WindowDecision(j, True)  # every expert diverges: P takes over here
            token = int(view.expert_top1_ids[j, best])
            if token != int(view.token_ids[j]):
                if self.scores is not None:  # the expert switched to drafts next
                    self.scores[best] = min(self.scores[best], float(self.scores.min()) - 1e-6)
                return WindowDecision(j, True, token=token)
        return WindowDecision(view.n, False)
