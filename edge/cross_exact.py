"""Exact handoff across tokenizers: token-level intersection drafts (TLI) verified by P.

Timor et al., "Accelerating LLM Inference with Lossless Speculative Decoding Algorithms for
Heterogeneous Vocabularies" (ICML 2025). Q drafts only tokens P also has: its top-k restricted to
the shared tokens and renormalised (shared/alignment.intersection_draft), the end of turn mapped to
P's. The draft goes out as P's ids at byte offsets; the cloud verifies it with its unchanged
speculative sampling (cloud/text_session.verify), so what stands is distributed exactly as P's own
sampling, and greedy drafts give P's greedy text. P's next token comes back as text, which Q
re-tokenises (edge/cross.py _QText). The rounds run on edge/cross.py's generation (_Run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from handoff.edge.exact import DraftLength
from handoff.edge.runner import EdgeStep
from handoff.shared.alignment import intersection_draft
from handoff.shared.errors import VerifierError
from handoff.shared.sampling import SamplingSettings
from handoff.shared.wire import pb, topk_to_proto

if TYPE_CHECKING:
    from handoff.edge.cross import _Run


async def tli_rounds(run: _Run, sampling: SamplingSettings) -> bool:
    """Draft rounds until a stop token or max_tokens; True at a stop token (see the module docstring)."""
    length = DraftLength(run.policy.draft_tokens, run.policy.draft_tokens_max)
    rng = sampling.rng()
    while run.committed < run.max_tokens:
        if run.session is None:
            return await run._windows()  # the cloud is gone: the edge alone, unchecked
        if not run.text.ready:
            if await run._cloud_turn(1):
                return True
            continue
        base = run.text.length
        steps, pieces, dists = [], [], []
        while len(steps) < min(length.gamma, run.max_tokens - run.committed):
            draft = await run.in_pool(_draft_one, run, sampling, rng)
            if draft is None:
                break
            step, piece, dist = draft
            steps.append(step)
            pieces.append(piece)
            dists.append(dist)
            if step.token_id in run.stops:
                break
        if not steps:  # nothing Q could draft is P's: P writes the token
            if await run._cloud_turn(1):
                return True
            continue
        n_text = len(steps) - (1 if steps[-1].token_id in run.stops else 0)
        run.text.own([s.token_id for s in steps[:n_text]], pieces[:n_text])
        offsets = base + np.concatenate([[0], np.cumsum([len(p) for p in pieces])])
        draft_msg = [
            pb.EdgeToken(position=int(offsets[j]), token_id=int(run.g.alignment.q_to_p[s.token_id]))
            for j, s in enumerate(steps)
        ]
        t_up = run.clock()
        try:
            verdict = await run.bounded(run.session.verify(draft_msg, dists))
        except (VerifierError, TimeoutError) as e:
            run._fail(e)
            for s, piece in zip(steps, pieces, strict=True):
                if await run._edge(s, piece, unchecked="unreachable", t=t_up):
                    return True
            continue
        accepted = min(verdict.accepted, len(steps))
        run.result.drafts += 1
        run.result.draft_tokens += len(steps)
        run.result.checked_positions += len(steps)
        run.result.draft_accepted += accepted
        length.record(accepted, len(steps))
        for j in range(accepted):
            if await run._edge(steps[j], pieces[j], checked=True, t=t_up):
                return True
        if accepted < len(steps):
            await run.in_pool(run.text.cut, int(offsets[accepted]))
        if not verdict.HasField("next") or run.committed >= run.max_tokens:
            continue
        replaced = steps[accepted].token_id if accepted < len(steps) else None
        if await run._cloud_token(verdict.next, replaced):
            return True
    return False


def _draft_one(run: _Run, sampling: SamplingSettings, rng: np.random.Generator):
    """One TLI draft token: Q's top-k restricted to P's tokens; (step, piece, its distribution) or None."""
    ids, lp, ent = run.runner.peek()
    p_ids, probs = intersection_draft(ids, lp, sampling, run.g.alignment)  # [m], [m]
    if p_ids.size == 0:
        return None
    position = run.runner.length  # the draw is keyed by (seed, Q's position): timing cannot change it
    j = (
        int(np.argmax(probs))
        if sampling.greedy
        else int(sampling.rng_for(position, rng, stream=2).choice(probs.size, p=probs))
    )
    p_id = int(p_ids[j])
    q_id = int(run.g.alignment.p_to_q[p_id])
    run.runner.append([q_id])
    q_lp = float(lp[list(ids).index(q_id)])
    step = EdgeStep(
        position=position, token_id=q_id, topk_ids=ids, topk_logprobs=lp, entropy=ent,
        sampled_logprob=float(np.log(probs[j])), token_logprob=q_lp, seconds=0.0,
    )  # fmt: skip
    piece = b"" if q_id in run.stops else run.g.tokenizer.piece(q_id)
    live = probs > 0  # a greedy draft's distribution is its one token
    dist = topk_to_proto(p_ids[live], np.log(probs[live]))
    return step, piece, dist
