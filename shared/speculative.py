"""Speculative sampling: verify a draft so that the output is distributed exactly as the target model.

Leviathan, Kalman & Matias, "Fast Inference from Transformers via Speculative Decoding" (ICML 2023);
Chen et al., "Accelerating Large Language Model Decoding with Speculative Sampling" (2023).
Q drafts tokens x_1..x_γ, each drawn from its sampling distribution q_j; P, the target, accepts
x_j with probability min(1, p_j(x_j) / q_j(x_j)); at the first rejection it draws the next token
from norm(max(0, p_j − q_j)) and the draft ends there; when every draft token is accepted it draws
a bonus token from p_{γ+1}. Each output token is then distributed as p (the acceptance rate of a
position is 1 − TV(p, q)).

Here q is the edge's top-k truncated, renormalised sampling distribution, sent as k (id,
probability) pairs, so the cloud knows it exactly; p is P's sampling distribution under the
session's settings (temperature, top-p, top-k; one-hot at the argmax when greedy, which makes
acceptance "the draft token is P's argmax" and the output P's greedy text).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from handoff.shared.errors import ShapeError
from handoff.shared.sampling import SamplingSettings, sampling_distribution


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one draft."""

    accepted: int  # draft tokens that stand (a prefix of the draft)
    next_token: int  # the token after them: a resample at the first rejection, or the bonus token
    bonus: bool  # every draft token was accepted; next_token was drawn from P after the draft


def target_distribution(logprobs: np.ndarray, settings: SamplingSettings) -> np.ndarray:
    """P's sampling distribution at one position: what P alone would draw the token from.

    Args:
        logprobs: [V] P's log-probabilities (temperature 1).
        settings: the session's sampling settings.

    Returns:
        [V] probabilities; one-hot at the argmax (ties to the lower id) when greedy.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 1 or lp.size == 0:
        raise ShapeError(f"logprobs: expected shape [V], got {lp.shape}")
    if settings.greedy:
        out = np.zeros_like(lp)
        out[int(np.argmax(lp))] = 1.0
        return out
    return sampling_distribution(lp, settings)


def draft_distribution(
    topk_ids: np.ndarray, topk_logprobs: np.ndarray, settings: SamplingSettings
) -> np.ndarray:
    """Q's top-k truncated, renormalised sampling distribution over its top-k ids.

    Args:
        topk_ids: [k] Q's top-k ids, by descending log-probability.
        topk_logprobs: [k] their log-probabilities (temperature 1).
        settings: the edge's sampling settings (temperature, top-p, top-k within the k).

    Returns:
        [k] probabilities over topk_ids summing to 1 (one-hot on the first when greedy).
    """
    ids, lp = np.asarray(topk_ids), np.asarray(topk_logprobs, dtype=np.float64)
    if ids.ndim != 1 or ids.shape != lp.shape or ids.size == 0:
        raise ShapeError(f"top-k view: expected ids [k] and logprobs [k], got {ids.shape} and {lp.shape}")
    if settings.greedy:
        out = np.zeros(lp.size)
        out[0] = 1.0
        return out
    return sampling_distribution(lp, settings)


def _pick(probs: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from [V] probabilities by inverse CDF (one uniform)."""
    cdf = np.cumsum(probs)
    idx = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return min(idx, int(np.flatnonzero(probs)[-1]))


def verify_draft(
    draft: np.ndarray,
    q_ids: np.ndarray,
    q_probs: np.ndarray,
    p_probs: np.ndarray,
    rngs: list[np.random.Generator],
) -> Verdict:
    """Accept a prefix of the draft and pick the next token (Leviathan et al. 2023, Algorithm 1).

    Args:
        draft: [γ] the draft token ids.
        q_ids: [γ, k] the ids of Q's distribution at each draft position.
        q_probs: [γ, k] Q's probabilities there (each row sums to 1; the draft was drawn from it).
        p_probs: [γ + 1, V] P's sampling distribution at each draft position and the one after.
        rngs: [γ + 1] generators, one per position (the cloud's own streams, independent of the
            edge's draws): the acceptance uniform, then the resample or bonus draw.

    Returns:
        The verdict.

    Raises:
        ShapeError: inconsistent shapes, a draft token outside its distribution's support, or
            distributions that are not distributions.
    """
    draft = np.asarray(draft, dtype=np.int64)
    q_ids = np.asarray(q_ids, dtype=np.int64)
    q_probs = np.asarray(q_probs, dtype=np.float64)
    p_probs = np.asarray(p_probs, dtype=np.float64)
    gamma = draft.size
    if draft.ndim != 1 or gamma == 0:
        raise ShapeError(f"draft: expected [gamma >= 1] ids, got shape {draft.shape}")
    if q_ids.ndim != 2 or q_ids.shape[0] != gamma or q_probs.shape != q_ids.shape:
        raise ShapeError(
            f"draft distributions: expected [{gamma}, k] ids and probabilities, got {q_ids.shape}, {q_probs.shape}"
        )
    if p_probs.ndim != 2 or p_probs.shape[0] != gamma + 1:
        raise ShapeError(f"target: expected [{gamma + 1}, V] probabilities, got {p_probs.shape}")
    if len(rngs) != gamma + 1:
        raise ShapeError(f"rngs: expected {gamma + 1} generators, got {len(rngs)}")
    vocab = p_probs.shape[1]
    if (q_ids < 0).any() or (q_ids >= vocab).any() or (draft < 0).any() or (draft >= vocab).any():
        raise ShapeError(f"draft: token ids outside [0, {vocab})")
    if (q_probs < 0).any() or not np.allclose(q_probs.sum(axis=1), 1.0, atol=1e-4):
        raise ShapeError("draft distributions: each row must be probabilities summing to 1")
    for j in range(gamma):
        x = int(draft[j])
        where = np.flatnonzero(q_ids[j] == x)
        q_x = float(q_probs[j, where].sum()) if where.size else 0.0
        if q_x <= 0.0:
            raise ShapeError(
                f"draft token {x} at draft position {j} has probability 0 under its own distribution"
            )
        p_x = float(p_probs[j, x])
        if rngs[j].random() < min(1.0, p_x / q_x):
            continue
        q_full = np.zeros(vocab)
        np.add.at(q_full, q_ids[j], q_probs[j])
        residual = np.maximum(p_probs[j] - q_full, 0.0)
        if residual.sum() <= 0.0:  # p == q up to rounding: a rejection is then a measure-zero event
            residual = p_probs[j]
        return Verdict(j, _pick(residual, rngs[j]), False)
    return Verdict(gamma, _pick(p_probs[gamma], rngs[gamma]), True)
