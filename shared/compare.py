"""Position-by-position comparison of P and Q on one continuation: the divergence report.

P (the large model) generates greedily; at every position both models' next-token distributions
are read from the same prefix, so the figures are exactly what a check point at that position
would see. The top-k estimate uses the views the wire carries: Q's top-k, P's top-k, and P's
log-probabilities at Q's ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from handoff.shared.divergence import entropy, kl_divergence, log_softmax, top_k, topk_kl
from handoff.shared.llama_cpp_model import LlamaCppModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PositionRow:
    """P and Q at one position of the continuation."""

    position: int
    token_id: int  # P's greedy token
    text: str
    kl: float  # full-vocabulary KL(P || Q), nats
    kl_topk: float  # coarse-grained estimate from top-k views (a lower bound of kl)
    q_entropy: float
    p_top1: int
    q_top1: int


@dataclass(frozen=True)
class Comparison:
    """The report of compare(): per-position rows and their summary."""

    prompt_tokens: int
    top_k: int
    threshold: float
    rows: tuple[PositionRow, ...]
    seconds: float
    summary: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "top_k": self.top_k,
            "threshold": self.threshold,
            "seconds": self.seconds,
            "summary": self.summary,
            "positions": [asdict(r) for r in self.rows],
        }


def summarize(rows: Sequence[PositionRow], threshold: float) -> dict:
    """Aggregate figures over the rows; empty rows give an empty summary."""
    if not rows:
        return {}
    kl = np.array([r.kl for r in rows])
    est = np.array([r.kl_topk for r in rows])
    ent = np.array([r.q_entropy for r in rows])
    agree = np.array([r.p_top1 == r.q_top1 for r in rows])
    flagged = est > threshold
    disagree = ~agree
    return {
        "positions": len(rows),
        "kl_mean": float(kl.mean()),
        "kl_median": float(np.median(kl)),
        "kl_p90": float(np.quantile(kl, 0.9)),
        "kl_max": float(kl.max()),
        "kl_topk_mean": float(est.mean()),
        # How much of the full KL the wire's top-k view recovers.
        "kl_topk_fraction": float(est.sum() / kl.sum()) if kl.sum() > 0 else 1.0,
        "q_entropy_mean": float(ent.mean()),
        "top1_agreement": float(agree.mean()),
        "flagged_fraction": float(flagged.mean()),
        "disagreements": int(disagree.sum()),
        "disagreements_flagged": int((disagree & flagged).sum()),
    }


def compare(
    p_model: LlamaCppModel,
    q_model: LlamaCppModel,
    prompt_ids: Sequence[int],
    *,
    max_tokens: int = 48,
    k: int = 20,
    threshold: float = 0.5,
) -> Comparison:
    """Let P continue `prompt_ids` greedily and measure KL(P || Q) at every generated position.

    Args:
        p_model: the large model (reference).
        q_model: the small model.
        prompt_ids: the prompt's token ids, shared by both models' vocabularies.
        max_tokens: continuation length limit (stops earlier at P's end-of-turn token).
        k: top-k of the wire views used for the estimate.
        threshold: tau in nats, for the flagged fraction in the summary.

    Returns:
        A Comparison with one row per generated position.
    """
    start = time.perf_counter()
    n_shared = min(p_model.n_vocab, q_model.n_vocab)
    if p_model.n_vocab != q_model.n_vocab:
        logger.info(
            "vocab sizes differ (%d vs %d): comparing on the shared %d ids, renormalised",
            p_model.n_vocab,
            q_model.n_vocab,
            n_shared,
        )
    for m in (p_model, q_model):
        m.reset()
        m.eval(prompt_ids)
    stops = p_model.stop_token_ids()
    rows: list[PositionRow] = []
    position = len(prompt_ids)
    for _ in range(max_tokens):
        lp = _shared_logprobs(p_model, n_shared)  # [V]
        lq = _shared_logprobs(q_model, n_shared)  # [V]
        p_ids, p_vals = top_k(lp, k)
        q_ids, q_vals = top_k(lq, k)
        est = topk_kl(
            p_ids[None], p_vals[None], q_ids[None], q_vals[None], p_logprobs_at_q_ids=lp[q_ids][None]
        )[0]
        token = int(p_ids[0])
        rows.append(
            PositionRow(
                position=position,
                token_id=token,
                text=p_model.detokenize([token]).decode("utf-8", errors="replace"),
                kl=float(kl_divergence(lp, lq)),
                kl_topk=float(est),
                q_entropy=float(entropy(lq)),
                p_top1=token,
                q_top1=int(q_ids[0]),
            )
        )
        if token in stops:
            break
        p_model.eval([token])
        q_model.eval([token])
        position += 1
    seconds = time.perf_counter() - start
    return Comparison(len(prompt_ids), k, threshold, tuple(rows), seconds, summarize(rows, threshold))


def _shared_logprobs(model: LlamaCppModel, n_shared: int) -> np.ndarray:
    """Q's or P's next-token log-probabilities over the ids both vocabularies have. Returns: [n_shared]."""
    return log_softmax(model.next_logits()[:n_shared])
