"""A token the edge places itself at a checked position, instead of asking the cloud to generate it.

Two policies do this: a gated correction under greedy decoding (P's token is its view's top-1, the
argmax P would generate; edge/gated.py) and selective ensembling (the ensemble's argmax,
edge/policy/ensemble.py). Either saves the handoff's forward pass and its round trips: the edge rolls
its own context back to the position and evaluates the token there, and sends the cloud a Rollback
and the token without waiting (in order on the session's stream), so both KV caches hold the same text.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np

from handoff.edge.records import Source, TokenRecord
from handoff.edge.runner import EdgeStep
from handoff.edge.wire import edge_token
from handoff.shared.errors import VerifierError

if TYPE_CHECKING:
    from handoff.edge.exact import Driver
    from handoff.edge.gated import CheckWindow

__all__ = ["place_in_place", "q_logprob"]


async def place_in_place(
    gen: Driver, w: CheckWindow, j: int, token: int, source: Source, gate_score: float | None = None
) -> bool:
    """Commit `token` at the position of the answered window's j-th token, in place of the edge's.

    Everything after that position (the rest of the window, drafts behind it) is dropped on both
    sides. Returns True at a stop token.

    Args:
        gen: the generation (its runner, link, commit).
        w: an answered check window (w.answer done, w.kls set).
        j: the index in the window of the position replaced, 0 <= j < len(w.steps).
        token: the token placed there.
        source: how the record is labelled ("corrected": P's token; "ensembled": SAFE's).
        gate_score: the gated policy's score of the position, for the trace.
    """
    link, runner, step = gen.link, gen.runner, w.steps[j]
    assert link is not None and w.answer is not None and w.kls is not None
    sc = w.answer.result().scores[j]
    await gen.in_pool(runner.replace_tail, step.position, [token])
    if link.alive() and link.session is not None:
        try:
            await gen.bounded(link.session.rollback_nowait(step.position))
            await gen.bounded(link.session.append_nowait([edge_token(replace(step, token_id=token), True)]))
        except (VerifierError, TimeoutError) as e:
            link.fail(e)  # a resync sends the committed text, this token too
    p_ids = np.asarray(sc.topk.ids)
    at_q = np.asarray(sc.logprobs_at_edge_topk)
    p_logprob = _logprob_of(token, p_ids, np.asarray(sc.topk.logprobs))
    if p_logprob is None and at_q.size == step.topk_ids.size:
        p_logprob = _logprob_of(token, step.topk_ids, at_q)
    await gen.commit(
        TokenRecord(
            position=step.position, token_id=token, source=source, checked=True,
            kl=None if np.isnan(w.kls[j]) else float(w.kls[j]), q_entropy=step.entropy,
            q_topk_ids=step.topk_ids.tolist(), q_topk_logprobs=step.topk_logprobs.tolist(),
            q_logprob=q_logprob(step, token), p_logprob=p_logprob,
            p_topk_ids=list(sc.topk.ids), p_topk_logprobs=[float(v) for v in sc.topk.logprobs],
            replaced_token_id=step.token_id, gate_score=gate_score, t_generated=w.times[j],
            t_uploaded=w.t_uploaded, t_answered=w.t_answered,
        )
    )  # fmt: skip
    return token in gen.stops


def _logprob_of(token: int, ids: np.ndarray, logprobs: np.ndarray) -> float | None:
    hit = np.flatnonzero(ids == token)
    return float(logprobs[hit[0]]) if hit.size else None


def q_logprob(step: EdgeStep, token: int) -> float | None:
    """Q's log-probability of a token at the step's position, when it is in Q's top-k."""
    return _logprob_of(token, step.topk_ids, step.topk_logprobs)
