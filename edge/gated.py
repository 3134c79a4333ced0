"""Gated rounds: the edge commits its tokens at once, and only the positions its policy flags wait for P.

A gated policy (HandoffPolicy.round == "gated", e.g. the learned router, edge/policy/router.py) scores
every token Q draws before anything is sent (gate()). A token under the gate is committed and streamed
to the caller immediately, unchecked by design (TokenRecord.unchecked == "by_design"), and uploaded to
the cloud as a bare id, so P's context stays the committed text (uploads are batched, check_interval
at a time, or sent with the next check point). A flagged token is uploaded with a check point of that
one position and waits for P's answer; the policy then keeps it or hands that position over (a
correction: P's token replaces Q's). Under greedy decoding P's token is its view's top-1, committed in
place (no handoff: the rollback and the token go up without waiting); under sampling P draws it
(edge/controller.py hand_over).

When the cloud is gone the round ends; the controller's window phase (edge/controller.py) goes on
alone, probes and resynchronises with the committed text, and gated rounds resume after it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from handoff.edge.exact import Driver
from handoff.edge.records import TokenRecord
from handoff.edge.runner import EdgeStep
from handoff.edge.wire import edge_token
from handoff.shared.errors import VerifierError

__all__ = ["CheckWindow", "GatedDriver", "gated_round"]


@dataclass
class CheckWindow:
    """Edge tokens uploaded together and checked by one check point."""

    steps: list[EdgeStep]
    times: list[float]
    answer: asyncio.Future | None = None  # of pb.CheckPointResult; None: not sent (cloud unreachable)
    t_uploaded: float | None = None
    t_answered: float | None = None
    deadline: float = 0.0  # loop.time() after which the cloud counts as gone
    kls: np.ndarray | None = None  # [n] once answered
    keep: int = 0  # tokens the policy keeps once answered


class GatedDriver(Driver, Protocol):
    """What gated_round needs of the controller's generation (edge/controller.py), beyond exact_round's."""

    core: Any  # a HandoffPolicy with gate(step, offset) -> float and checks(score) -> bool
    prompt: list[int]

    async def upload(self, w: CheckWindow, may_resync: bool) -> None: ...

    async def wait_answer(self, pending: list[CheckWindow]) -> None: ...

    async def settle(self, w: CheckWindow) -> str: ...

    async def hand_over(self, w: CheckWindow, pending: list[CheckWindow], current: CheckWindow) -> bool: ...


async def gated_round(gen: GatedDriver) -> bool:
    """Generate until a correction, a stop token, max_tokens or a lost cloud; True at a stop token.

    Returns:
        True when a stop token was committed; False otherwise (the caller loops while tokens remain
        and the cloud is alive, and runs its window phase when it is not).
    """
    link, core, runner = gen.link, gen.core, gen.runner
    assert link is not None
    interval = core.config.check_interval
    unsent: list[EdgeStep] = []  # committed by design, not uploaded yet

    async def flush() -> None:
        if unsent and link.alive() and link.session is not None:
            try:
                await gen.bounded(link.session.append_nowait([edge_token(s, True) for s in unsent]))
            except (VerifierError, TimeoutError) as e:
                link.fail(e)  # a resync reopens the session with everything committed, these too
        unsent.clear()

    while gen.committed < gen.max_tokens:
        if not link.alive():
            unsent.clear()  # a resync sends the committed text
            return False
        step: EdgeStep = await gen.in_pool(runner.step)
        t = gen.clock()
        score = core.gate(step, step.position - len(gen.prompt))
        if not core.checks(score):
            await gen.commit(
                TokenRecord(
                    position=step.position, token_id=step.token_id, source="edge", checked=False,
                    unchecked="by_design", gate_score=score, q_entropy=step.entropy,
                    q_topk_ids=step.topk_ids.tolist(), q_topk_logprobs=step.topk_logprobs.tolist(),
                    q_logprob=step.token_logprob, t_generated=t,
                )
            )  # fmt: skip
            unsent.append(step)
            if step.token_id in gen.stops:
                await flush()
                return True
            if len(unsent) >= interval:
                await flush()
            continue
        await flush()
        w = CheckWindow([step], [t])
        await gen.upload(w, may_resync=False)
        if w.answer is not None:
            await gen.wait_answer([w])
        outcome = await gen.settle(w)
        done = outcome == "stop"
        if outcome == "handover" and runner.sampling.greedy:
            done = await _correct_in_place(gen, w, score)
        elif outcome == "handover":
            done = await gen.hand_over(w, [], CheckWindow([], []))
        for r in reversed(gen.result.records):  # the trace keeps the score of the checked position
            if r.position == step.position:
                r.gate_score = score
            if r.position <= step.position:
                break
        if done:
            return True
        if outcome == "handover":
            return False  # the controller's loop starts the next round
    await flush()
    return False


async def _correct_in_place(gen: GatedDriver, w: CheckWindow, score: float) -> bool:
    """Greedy: P's token at the checked position is its view's top-1 (the argmax P would generate,
    ties to the lower id as in shared.sampling); commit it without asking P to generate it.

    Saves the handoff's forward pass and two round trips (rollback, handoff): the rollback and the
    token are sent without waiting, in order on the session's stream. Returns True at a stop token.
    """
    link, runner, step = gen.link, gen.runner, w.steps[0]
    assert link is not None and link.session is not None and w.answer is not None and w.kls is not None
    sc = w.answer.result().scores[0]
    token = int(sc.topk.ids[0])
    await gen.in_pool(runner.truncate, step.position)
    await gen.in_pool(runner.append, [token])
    try:
        await gen.bounded(link.session.rollback_nowait(step.position))
        await gen.bounded(link.session.append_nowait([edge_token(replace(step, token_id=token), True)]))
    except (VerifierError, TimeoutError) as e:
        link.fail(e)  # a resync sends the committed text, this token too
    await gen.commit(
        TokenRecord(
            position=step.position, token_id=token, source="corrected", checked=True,
            kl=None if np.isnan(w.kls[0]) else float(w.kls[0]), q_entropy=step.entropy,
            q_topk_ids=step.topk_ids.tolist(), q_topk_logprobs=step.topk_logprobs.tolist(),
            q_logprob=_q_logprob(step, token), p_logprob=float(sc.topk.logprobs[0]),
            p_topk_ids=list(sc.topk.ids), p_topk_logprobs=[float(v) for v in sc.topk.logprobs],
            replaced_token_id=step.token_id, gate_score=score, t_generated=w.times[0],
            t_uploaded=w.t_uploaded, t_answered=w.t_answered,
        )
    )  # fmt: skip
    return token in gen.stops


def _q_logprob(step: EdgeStep, token: int) -> float | None:
    """Q's log-probability of a token at the step's position, when it is in Q's top-k."""
    hit = np.flatnonzero(step.topk_ids == token)
    return float(step.topk_logprobs[hit[0]]) if hit.size else None
