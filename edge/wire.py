"""The edge's side of the wire: what it sends (its tokens, drafts, sampling) and the KL it reads back.

The cloud's views arrive as float32 top-k lists; the divergence computed from them is the top-k
KL(P || Q) of shared.divergence.topk_kl, a lower bound of the full-vocabulary KL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from handoff.edge.policy.triggers import WindowView
from handoff.edge.runner import EdgeStep
from handoff.shared.divergence import topk_kl
from handoff.shared.ensemble import expert_divergences
from handoff.shared.errors import ShapeError
from handoff.shared.sampling import SamplingSettings
from handoff.shared.wire import pb, topk_from_proto, topk_to_proto

__all__ = [
    "WIRE_REST_MARGIN",
    "cloud_token_kl",
    "draft_to_proto",
    "edge_token",
    "sampling_to_proto",
    "window_kl",
    "window_view",
]

# Float32 views on the wire are exact to ~1e-7: see topk_kl's rest_margin.
WIRE_REST_MARGIN = 1e-5


def edge_token(step: EdgeStep, skip: bool = False) -> pb.EdgeToken:
    """One drafted token as uploaded at a check point: with Q's top-k view, or its id alone (skip)."""
    if skip:  # Q is confident here: the token id alone (U-HLM's uncertainty-aware skipping)
        return pb.EdgeToken(
            position=step.position, token_id=step.token_id, sampled_logprob=step.sampled_logprob
        )
    return pb.EdgeToken(
        position=step.position,
        token_id=step.token_id,
        topk=topk_to_proto(step.topk_ids, step.topk_logprobs),
        has_distribution=True,
        sampled_logprob=step.sampled_logprob,
    )


def draft_to_proto(steps: Sequence[EdgeStep]) -> tuple[list[pb.EdgeToken], list[pb.TopK]]:
    """A draft for VerifyDraft: its tokens, and the distribution each was drawn from (k values, log)."""
    draft = [pb.EdgeToken(position=s.position, token_id=s.token_id) for s in steps]
    dists = [topk_to_proto(s.topk_ids, np.log(np.maximum(s.draft_probs, 1e-300))) for s in steps]
    return draft, dists


def sampling_to_proto(s: SamplingSettings, stop_ids: Sequence[int]) -> pb.SamplingParams:
    """The sampling settings as OpenSession carries them (the cloud draws its tokens with them)."""
    return pb.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=(s.seed or 0) & 0xFFFF_FFFF_FFFF_FFFF,  # the same 64 bits rng_for keys the draws with
        has_seed=s.seed is not None,
        stop_token_ids=sorted(stop_ids),
    )


def window_kl(
    steps: Sequence[EdgeStep], scores: Sequence[pb.PositionScore], concept_of: np.ndarray | None = None
) -> np.ndarray:
    """Top-k KL(P || Q) at each position of a window, from Q's views and the cloud's answer.

    Args:
        steps: [n] the window's edge tokens with Q's views.
        scores: [n] the check point's answer, at the same positions.
        concept_of: [V] concept ids: the KL over concepts (shared.concepts); None: over tokens.

    Returns:
        [n] nats, each a lower bound of the full-vocabulary KL; NaN where no distribution was uploaded.
    """
    if len(steps) != len(scores) or any(
        s.position != sc.position for s, sc in zip(steps, scores, strict=True)
    ):
        raise ShapeError("the check point's answer does not cover the window's positions")
    out = np.empty(len(steps))
    for j, (st, sc) in enumerate(zip(steps, scores, strict=True)):
        p_ids, p_lp = topk_from_proto(sc.topk)
        p_at_q = np.asarray(sc.logprobs_at_edge_topk, dtype=np.float64)
        if p_at_q.size == 0:  # the edge skipped this position's upload: no divergence there
            out[j] = np.nan
            continue
        out[j] = topk_kl(
            p_ids[None],
            p_lp[None],
            st.topk_ids[None],
            st.topk_logprobs[None],
            p_at_q[None],
            rest_margin=WIRE_REST_MARGIN,
            concept_of=concept_of,
        )[0]
    return out


def cloud_token_kl(
    p_ids: np.ndarray,
    p_lp: np.ndarray,
    q_ids: np.ndarray,
    q_lp: np.ndarray,
    q_at_p: np.ndarray,
    concept_of: np.ndarray | None = None,
) -> float:
    """Top-k KL(P || Q) at a cloud token's position; Q is known everywhere on the edge.

    Args:
        p_ids: [k] P's top-k ids (from the cloud token).
        p_lp: [k] P's log-probabilities there.
        q_ids: [k] Q's top-k ids.
        q_lp: [k] Q's log-probabilities there.
        q_at_p: [k] Q's log-probabilities at p_ids (P's top-k with Q's values there gives the bound).
        concept_of: [V] concept ids: the KL over concepts; None: over tokens.

    Returns:
        nats, a lower bound of the full-vocabulary KL.
    """
    return float(
        topk_kl(p_ids[None], p_lp[None], q_ids[None], q_lp[None],
                q_logprobs_at_p_ids=q_at_p[None], rest_margin=WIRE_REST_MARGIN, concept_of=concept_of)[0]
    )  # fmt: skip


def window_view(
    steps: Sequence[EdgeStep],
    kls: np.ndarray,
    scores: Sequence[pb.PositionScore],
    runner: Any,
    prompt_len: int | None = None,
) -> WindowView:
    """What the policy judges an answered window on: Q's views, the KLs and P's views.

    Args:
        steps: [n] the window's edge tokens with Q's top-k views (k each).
        kls: [n] window_kl's KLs.
        scores: [n] the check point's answer, at the same positions.
        runner: the edge's runner (EdgeRunner or MixtureRunner); a mixture of experts adds each
            expert's KL and top-1 (expert_views).
        prompt_len: the prompt's tokens, for the view's offsets (None: no offsets).

    Returns:
        The WindowView, with P's top-1 [n], top-k [n, kp] and P's values at Q's ids [n, k] (NaN rows
        where the edge skipped the upload).
    """
    q_ids = np.stack([s.topk_ids for s in steps])  # [n, k]
    k = q_ids.shape[1]
    ids = np.stack([np.asarray(sc.topk.ids, dtype=np.int64) for sc in scores])  # [n, kp]
    lps = np.minimum(
        np.stack([np.asarray(sc.topk.logprobs, dtype=np.float64) for sc in scores]), 0.0
    )  # [n, kp]
    at_q = np.full((len(scores), k), np.nan)  # [n, k]
    for j, sc in enumerate(scores):
        if len(sc.logprobs_at_edge_topk) == k:
            at_q[j] = sc.logprobs_at_edge_topk
    experts = runner.expert_views([s.position for s in steps], ids)
    e_kls = e_top1 = None
    if experts is not None:  # [n, E, k] ids, logprobs; [n, E, kp] at P's ids
        e_kls, e_top1 = expert_divergences(ids, lps, *experts), experts[0][:, :, 0]
    return WindowView(
        token_ids=np.asarray([s.token_id for s in steps]),
        q_topk_ids=q_ids,
        q_topk_logprobs=np.stack([s.topk_logprobs for s in steps]),
        q_entropy=np.asarray([s.entropy for s in steps]),
        p_kls=kls,
        p_top1_ids=ids[:, 0],
        p_topk_ids=ids,
        p_topk_logprobs=lps,
        p_logprobs_at_q=np.minimum(at_q, 0.0),
        expert_kls=e_kls,
        expert_top1_ids=e_top1,
        offsets=None if prompt_len is None else np.asarray([s.position - prompt_len for s in steps]),
        q_hidden=None
        if any(getattr(s, "hidden", None) is None for s in steps)
        else np.stack([s.hidden for s in steps]),
    )
