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
    gate_score: float | None = None  # a gated round's check: the gate's score of its one position
    deferred: bool = False  # defer_checks: not uploaded yet, waiting for the checks ahead of it


class GatedDriver(Driver, Protocol):
    """What gated_round needs of the controller's generation (edge/controller.py), beyond exact_round's."""

    core: Any  # a HandoffPolicy with gate(step, offset) -> float and checks(score) -> bool
    prompt: list[int]

    async def upload(self, w: CheckWindow, may_resync: bool) -> None: ...

    async def wait_answer(self, pending: list[CheckWindow]) -> None: ...

    async def settle(self, w: CheckWindow) -> str: ...

    async def hand_over(self, w: CheckWindow, pending: list[CheckWindow], current: CheckWindow) -> bool: ...


@dataclass
class _Held:
    """A token under the gate drafted behind an unanswered check point: committed once every check
    before it keeps its token, dropped if one of them is corrected."""

    step: EdgeStep
    t: float
    score: float


async def gated_round(gen: GatedDriver) -> bool:
    """Generate until a correction, a stop token, max_tokens or a lost cloud; True at a stop token.

    Q drafts on behind a flagged position while its check point is in flight (up to the policy's
    lookahead_windows unanswered check points; 0 = wait for each): tokens drafted behind it are held,
    and committed the moment every check before them keeps its token. A correction drops them (on
    both sides: the edge's context is truncated, the cloud's rolled back). With defer_checks, a flagged
    draft behind an unanswered check is uploaded only when every check before it has kept its token,
    and Q waits with it: a correction ahead drops it unsent, so P never scores a position thrown away.

    Returns:
        True when a stop token was committed; False otherwise (the caller loops while tokens remain
        and the cloud is alive, and runs its window phase when it is not).
    """
    link, core, runner = gen.link, gen.core, gen.runner
    assert link is not None
    interval = core.config.check_interval
    lookahead = core.config.lookahead_windows
    defer = core.config.defer_checks
    unsent: list[EdgeStep] = []  # drafted under the gate, not uploaded yet
    # Drafted since the oldest unanswered check point, in order: one token per entry.
    queue: list[CheckWindow | _Held] = []
    drafted_stop = False

    async def flush() -> None:
        if unsent and link.alive() and link.session is not None:
            try:
                await gen.bounded(link.session.append_nowait([edge_token(s, True) for s in unsent]))
            except (VerifierError, TimeoutError) as e:
                link.fail(e)  # a resync reopens the session with everything committed, these too
        unsent.clear()

    async def commit_free(step: EdgeStep, t: float, score: float) -> bool:
        await gen.commit(
            TokenRecord(
                position=step.position, token_id=step.token_id, source="edge", checked=False,
                unchecked="by_design", gate_score=score, q_entropy=step.entropy,
                q_topk_ids=step.topk_ids.tolist(), q_topk_logprobs=step.topk_logprobs.tolist(),
                q_logprob=step.token_logprob, t_generated=t,
            )
        )  # fmt: skip
        return step.token_id in gen.stops

    async def release_held() -> bool:
        """Commit the held tokens up to the next unanswered check; True at a stop token."""
        while queue and isinstance(queue[0], _Held):
            h = queue.pop(0)
            if await commit_free(h.step, h.t, h.score):
                return True
        return False

    def windows() -> list[CheckWindow]:
        return [x for x in queue if isinstance(x, CheckWindow)]

    while True:
        # Settle answered check points in order (unreachable ones commit their token unchecked).
        while queue and isinstance(queue[0], CheckWindow):
            w = queue[0]
            if w.deferred:  # every check before it kept its token: its turn to go up
                # Nothing is unsent: the tokens before it went up when it was deferred, and Q waited.
                w.deferred = False
                await gen.upload(w, may_resync=False)
            if w.answer is not None and not w.answer.done() and link.alive():
                break
            if w.answer is not None and not w.answer.done():
                w.answer.cancel()  # the cloud is gone: committed unchecked
            queue.pop(0)
            outcome = await gen.settle(w)
            step, score = w.steps[0], w.gate_score
            if outcome == "handover":
                rest, queue[:] = list(queue), []
                gen.result.unsent_checks += sum(isinstance(x, CheckWindow) and x.deferred for x in rest)
                for x in rest:
                    if isinstance(x, CheckWindow) and x.answer is not None and not x.answer.done():
                        x.answer.cancel()  # its reply still comes, and is ignored
                unsent.clear()  # dropped with the rest: the edge's context and the cloud's are cut back
                if runner.sampling.greedy and core.turn_tokens() == 1:
                    # P's token is its view's top-1, the argmax it would generate (ties to the lower id
                    # as in shared.sampling): placed without asking P to generate it. A longer turn
                    # (router_turn) is a handoff: P generates on from there.
                    gen.result.discarded_drafts += len(rest)
                    sc = w.answer.result().scores[0]  # type: ignore[union-attr]
                    done = await place_in_place(gen, w, 0, int(sc.topk.ids[0]), "corrected", score)
                else:
                    held = CheckWindow([x.step for x in rest if isinstance(x, _Held)], [])
                    done = await gen.hand_over(w, [x for x in rest if isinstance(x, CheckWindow)], held)
            _mark_gate_score(gen, step.position, score)
            if outcome == "stop":
                return True
            if outcome == "handover":
                return done  # the controller's loop starts the next round
            if await release_held():
                await flush()
                return True
        if not link.alive() and not queue:
            unsent.clear()  # a resync sends the committed text
            return False
        may_draft = (
            link.alive()
            and not drafted_stop
            and gen.committed + len(queue) < gen.max_tokens
            and len(windows()) <= lookahead
            and not (queue and isinstance(queue[-1], CheckWindow) and queue[-1].deferred)
        )
        if not may_draft:
            if not queue:
                await flush()
                return False  # max_tokens reached, everything committed
            await gen.wait_answer(windows())
            continue
        step: EdgeStep = await gen.in_pool(runner.step)
        t = gen.clock()
        score = core.gate(step, step.position - len(gen.prompt))
        drafted_stop = step.token_id in gen.stops
        if not core.checks(score):
            unsent.append(step)
            if queue:
                queue.append(_Held(step, t, score))
            elif await commit_free(step, t, score):
                await flush()
                return True
            if len(unsent) >= interval or drafted_stop:
                await flush()
            continue
        await flush()
        w = CheckWindow([step], [t], gate_score=score, deferred=defer and bool(windows()))
        if not w.deferred:
            await gen.upload(w, may_resync=False)
        queue.append(w)


def _mark_gate_score(gen: GatedDriver, position: int, score: float | None) -> None:
    """The trace keeps the gate score of a checked position (its record was committed by settle)."""
    for r in reversed(gen.result.records):
        if r.position == position:
            r.gate_score = score
        if r.position <= position:
            break
