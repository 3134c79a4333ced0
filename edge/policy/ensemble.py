"""Selective ensembling (SAFE) as a handoff policy: Q drafts, P verifies, the edge ensembles where needed.

SAFE (Yun et al., "When to Ensemble: Identifying Token-Level Points for Stable and Fast LLM
Ensembling", arXiv 2510.15346) runs generate-verify-ensemble: a drafter writes a chunk, the verifiers
score it, and at the first position where the models lack consensus the token is replaced by the
argmax of their (sharpened) ensemble distribution; generation goes on from there. Here Q drafts the
check point's window and P verifies it; the ensemble is computed on the edge from the two top-k views
it already holds, so an ensembled token costs no cloud generation and no extra round trip: the edge
places it in its own context and sends it to P (a rollback and the token, unawaited) so both KV caches
hold the same text.

Consensus at a position: P's most likely token is Q's token, and the top-k KL(P || Q) is at most tau
(over the policy's divergence). Where it is missing the ensemble decides; when its argmax is Q's token
the token stands (the ensemble agreed with the draft) and checking goes on.

SAFE's second criterion, that the ensembled token must not leave a verifier in an "OOV-like" state (a
token its tokenizer would never produce at that text boundary), holds trivially here: P and Q share
one vocabulary and tokenizer, so every id is both models' token. With different tokenizers it would
need the cross-tokenizer alignment, which does not exist yet.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from handoff.edge.policy.core import HandoffPolicy, WindowDecision, register_policy
from handoff.edge.policy.triggers import WindowView
from handoff.shared.concepts import token_text
from handoff.shared.ensemble import ensemble_choice, ensemble_view
from handoff.shared.errors import ShapeError
from handoff.shared.wire import pb

__all__ = ["SafePolicy"]


@register_policy("safe")
class SafePolicy(HandoffPolicy):
    """SAFE: at the first position of a window without consensus whose ensemble argmax differs from
    Q's token, the edge places that argmax (an "ensembled" token) and drafts on; no cloud turn.

    Constants (PolicyConfig): ensemble_weight (P's weight in the average), sharpen_below (sharpen
    when the average's top probability is below it; 0: never), threshold (tau of the consensus KL).
    """

    cut_kind = "rollback"
    proto_kind = pb.POLICY_KIND_ROLLBACK  # on the wire: a cut, then the edge's token
    places_tokens = True

    def __init__(self, config: Any, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self._text = lru_cache(maxsize=65536)(lambda i: None)

    def attach(self, vocabulary: Any) -> None:
        """Token texts for the sharpening (a token's text is a prefix of another's)."""
        super().attach(vocabulary)
        tokens = vocabulary.tokens
        self._text = lru_cache(maxsize=65536)(
            lambda i: token_text(tokens[i]) if 0 <= i < len(tokens) else None
        )

    def lacks_consensus(self, view: WindowView) -> np.ndarray:
        """[n] bool: P's top-1 is not Q's token, or the KL is over tau (NaN KL: only the first test)."""
        assert view.p_top1_ids is not None
        kls = view.p_kls if view.p_kls is not None else np.full(view.n, np.nan)
        return (view.p_top1_ids != view.token_ids) | (kls > self.threshold)

    def decide(self, view: WindowView) -> WindowDecision:
        """Keep the window up to the first position whose ensemble argmax is not Q's token; place it.

        Args:
            view: the window with P's views (p_top1_ids, p_topk_ids, p_topk_logprobs; p_kls and
                p_logprobs_at_q where uploaded).

        Returns:
            Kept when every position has consensus or the ensemble picks Q's token; else handed over at
            the first position where it does not, with the ensemble's token to place there.
        """
        if view.p_top1_ids is None or view.p_topk_ids is None or view.p_topk_logprobs is None:
            raise ShapeError("the SAFE policy needs the cloud's top-k views (WindowView.p_topk_ids/logprobs)")
        cfg = self.config
        for j in np.flatnonzero(self.lacks_consensus(view)):
            at_q = None if view.p_logprobs_at_q is None else view.p_logprobs_at_q[j]
            average = ensemble_view(view.p_topk_ids[j], view.p_topk_logprobs[j], view.q_topk_ids[j],
                                    view.q_topk_logprobs[j], at_q, cfg.ensemble_weight)  # fmt: skip
            token = ensemble_choice(average, self._text, cfg.sharpen_below)
            if token != int(view.token_ids[j]):
                return WindowDecision(int(j), True, token=token)
        return WindowDecision(view.n, False)

    def turn_tokens(self) -> int:
        """One, were the cloud ever asked (a window cut without a token of the edge's)."""
        return 1

    def agrees(self, kl: float) -> bool:
        """No hand-back phase: SAFE never hands generation to the cloud."""
        return False
