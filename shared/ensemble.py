"""Ensembles from top-k views: SAFE's ensemble of P and Q at one position, and experts' divergences from P.

SAFE (Yun et al., "When to Ensemble: Identifying Token-Level Points for Stable and Fast LLM
Ensembling", arXiv 2510.15346) drafts with one model, verifies with the others and ensembles only
where the models lack consensus: the next token there is the argmax of a weighted average of the
models' next-token distributions, sharpened when that average is too smooth by consolidating the
probability spread over sub-word tokens of one word into a single representative token.

Here the two views are top-k lists, so each side's probability is known only at some ids: P's at its
top-k (and at Q's top-k when the check point carried P's values there), Q's at its top-k. An id where
a side's value is unknown gets 0 from that side: a lower bound of the true average (the unknown value
is at most that side's k-th probability). The candidates are the union of the two top-k lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from handoff.shared.divergence import real_1d, topk_kl
from handoff.shared.errors import ShapeError

__all__ = ["ensemble_choice", "ensemble_view", "expert_divergences", "sharpen"]


def _ids(name: str, ids: Any) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu") or (arr.size and arr.min() < 0):
        raise ShapeError(
            f"{name}: expected non-negative integer ids of shape [k], got {arr.shape} {arr.dtype}"
        )
    return arr.astype(np.int64)


def _logprobs(name: str, values: Any, k: int, allow_nan: bool = False) -> np.ndarray:
    arr = real_1d(name, values, allow_nan=allow_nan)  # [k]
    if arr.shape[0] != k:
        raise ShapeError(f"{name}: expected shape [{k}] (one per id), got {arr.shape}")
    if (arr[~np.isnan(arr)] > 1e-6).any():
        raise ShapeError(f"{name}: expected log-probabilities <= 0")
    return np.minimum(arr, 0.0)


def ensemble_view(
    p_ids: Any,
    p_logprobs: Any,
    q_ids: Any,
    q_logprobs: Any,
    p_logprobs_at_q_ids: Any | None,
    weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The weighted average w * P + (1 - w) * Q over the union of the two top-k lists.

    Args:
        p_ids: [kp] P's top-k ids.
        p_logprobs: [kp] P's log-probabilities there.
        q_ids: [kq] Q's top-k ids.
        q_logprobs: [kq] Q's log-probabilities there.
        p_logprobs_at_q_ids: [kq] P's log-probabilities at Q's ids (NaN or None: unknown).
        weight: P's weight w in [0, 1].

    Returns:
        (ids [m] int64 ascending, probs [m] float64): the union of the ids and the average's
        probability at each (unknown values count 0, so sum(probs) <= 1).
    """
    pi, qi = _ids("p_ids", p_ids), _ids("q_ids", q_ids)
    plp = _logprobs("p_logprobs", p_logprobs, pi.shape[0])  # [kp]
    qlp = _logprobs("q_logprobs", q_logprobs, qi.shape[0])  # [kq]
    if not (0.0 <= float(weight) <= 1.0):
        raise ShapeError(f"weight: expected P's weight in [0, 1], got {weight!r}")
    ids = np.union1d(pi, qi)  # [m]
    p = np.zeros(ids.shape[0])  # [m]
    q = np.zeros(ids.shape[0])  # [m]
    if p_logprobs_at_q_ids is not None:
        at = _logprobs("p_logprobs_at_q_ids", p_logprobs_at_q_ids, qi.shape[0], allow_nan=True)  # [kq]
        known = ~np.isnan(at)
        p[np.searchsorted(ids, qi[known])] = np.exp(at[known])
    p[np.searchsorted(ids, pi)] = np.exp(plp)  # P's own top-k wins where both give a value
    q[np.searchsorted(ids, qi)] = np.exp(qlp)
    return ids, weight * p + (1.0 - weight) * q


def sharpen(ids: Any, probs: Any, texts: Sequence[str | None], below: float) -> np.ndarray:
    """SAFE's probability sharpening, for one tokenizer: when the average is too smooth (its largest
    probability < below), a token whose text is a proper prefix of other candidates' texts (" comp"
    of " computer") gives its mass to the most probable of them that is itself no candidate's prefix
    (the word's representative token); whitespace-only, empty and control tokens (None) never merge.

    Args:
        ids: [m] candidate ids.
        probs: [m] their probabilities (>= 0).
        texts: [m] each candidate's text (None: a control token).
        below: sharpen only when max(probs) < below; 0 never sharpens.

    Returns:
        [m] probabilities with the same total: a prefix's mass moved onto its representative.
    """
    i = _ids("ids", ids)
    p = real_1d("probs", probs)  # [m]
    if p.shape != i.shape or len(texts) != i.shape[0]:
        raise ShapeError(
            f"probs, texts: expected {i.shape[0]} of each (one per id), got {p.shape}, {len(texts)}"
        )
    if (p < 0).any():
        raise ShapeError("probs: expected probabilities >= 0")
    out = p.copy()
    if p.size == 0 or float(p.max()) >= below:
        return out
    words = [t if t is not None and t.strip() else None for t in texts]

    def extends(a: int, b: int) -> bool:  # b's text strictly extends a's
        ta, tb = words[a], words[b]
        return ta is not None and tb is not None and len(tb) > len(ta) and tb.startswith(ta)

    m = len(words)
    longer = [[b for b in range(m) if extends(a, b)] for a in range(m)]
    for a in range(m):
        heads = [b for b in longer[a] if not longer[b]]  # representatives: prefixes of no candidate
        if heads:
            rep = max(heads, key=lambda b: (p[b], -i[b]))
            out[rep] += p[a]
            out[a] -= p[a]
    return out


def ensemble_choice(
    view: tuple[np.ndarray, np.ndarray], texts_of: Any = None, sharpen_below: float = 0.0
) -> int:
    """The token SAFE ensembles to at a position: argmax of the (sharpened) weighted average.

    Args:
        view: (ids [m], probs [m]) from ensemble_view.
        texts_of: a function from an id to its text (None: a control token); needed to sharpen.
        sharpen_below: sharpen when the average's largest probability is below this (0: never).

    Returns:
        The id with the largest probability; ties go to the lower id (as shared.sampling's argmax).
    """
    ids, probs = view
    if sharpen_below > 0.0 and texts_of is not None:
        probs = sharpen(ids, probs, [texts_of(int(t)) for t in ids], sharpen_below)
    return int(ids[int(np.argmax(probs))])  # ids ascend, argmax takes the first maximum


def expert_divergences(p_ids: Any, p_logprobs: Any, e_ids: Any, e_logprobs: Any, e_at_p: Any) -> np.ndarray:
    """Each expert's top-k KL(P || expert) at each position, the edge's estimate for its own tokens.

    Args:
        p_ids: [n, kp] P's top-k ids at the positions.
        p_logprobs: [n, kp] P's log-probabilities there.
        e_ids: [n, E, k] each expert's top-k ids.
        e_logprobs: [n, E, k] each expert's log-probabilities there.
        e_at_p: [n, E, kp] each expert's log-probabilities at P's ids.

    Returns:
        [n, E] nats, lower bounds of the full KL (shared.divergence.topk_kl with the expert's values at
        P's top-k, as for a cloud token: P's top-k and the expert's top-k are compared, the rest is one
        bucket).
    """
    ids, lps, at = np.asarray(e_ids), np.asarray(e_logprobs), np.asarray(e_at_p)
    pi, pl = np.asarray(p_ids), np.asarray(p_logprobs)
    if (ids.ndim != 3 or lps.shape != ids.shape or pi.ndim != 2 or pl.shape != pi.shape
            or pi.shape[0] != ids.shape[0] or at.shape != (*ids.shape[:2], pi.shape[1])):  # fmt: skip
        raise ShapeError(
            f"expert views: expected [n, kp] for P, [n, E, k] and [n, E, kp] for the experts, got {pi.shape}, "
            f"{ids.shape}, {at.shape}"
        )
    n, e, k = ids.shape
    rep = np.repeat(np.arange(n), e)  # [n * E]: P's row for each (position, expert)
    kls = topk_kl(pi[rep], pl[rep], ids.reshape(n * e, k), lps.reshape(n * e, k),
                  q_logprobs_at_p_ids=at.reshape(n * e, -1), rest_margin=1e-5)  # fmt: skip
    return kls.reshape(n, e)
