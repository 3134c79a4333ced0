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
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from handoff.edge.exact import Driver
from handoff.edge.in_place import place_in_place
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
    token: int | None = None  # the token the policy places at position `keep` itself (WindowDecision)


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
            # P's token is its view's top-1, the argmax it would generate (ties to the lower id as
            # in shared.sampling): placed without asking P to generate it.
            sc = w.answer.result().scores[0]  # type: ignore[union-attr]
            done = await place_in_place(gen, w, 0, int(sc.topk.ids[0]), "corrected", score)
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
