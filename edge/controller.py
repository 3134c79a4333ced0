"""The handoff controller: the async driver that runs the policy core against the edge model and the cloud.

Every decision (a window stands or the cloud takes over, hand-back, the budget's tau) is the policy
core's (edge/policy, a HandoffPolicy); this module moves tokens and messages accordingly. Policies and
words: docs/architecture.md.

- Window rounds (seed, rollback, any kind with round "window"): the edge drafts windows of N tokens;
  at each check point the policy keeps the window or hands over (keeping n of its tokens); the cloud
  then generates until M tokens or the policy's hand-back. Tokens are committed only once checked.
- Draft rounds (exact): speculative sampling, edge/exact.py. Gated rounds (router): edge/gated.py.

Check points are pipelined: a window is uploaded and checked while the edge drafts the next one
(`lookahead_windows`). A window drafted behind a check point that hands over is thrown away on both
sides, so the output is token for token what the synchronous policy gives (seeded draws are keyed
by position, see shared.sampling).

When the cloud is unreachable or slower than `check_timeout_s`, the edge keeps generating alone: its
tokens are committed at once, marked unchecked, and edge/link.py probes and resynchronises.

Modes share this one path: "hybrid" (the policy), "edge" (no cloud at all) and "cloud" (one handoff
for the whole answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np

from handoff.edge.exact import DraftLength, draft_sampling, exact_round
from handoff.edge.gated import CheckWindow, gated_round
from handoff.edge.in_place import place_in_place
from handoff.edge.link import CloudLink, LinkConfig, within
from handoff.edge.policy import (
    BudgetController,
    HandoffPolicy,
    PolicyConfig,
    TokenScorer,
    make_policy,
)
from handoff.edge.records import GenerationResult, OnToken, TokenRecord
from handoff.edge.runner import EdgeRunner, EdgeStep
from handoff.edge.verifier_client import VerifierClient
from handoff.edge.wire import cloud_token_kl, edge_token, sampling_to_proto, window_kl, window_view
from handoff.shared.constraints import Constraint
from handoff.shared.errors import ShapeError, VerifierError
from handoff.shared.sampling import SamplingSettings
from handoff.shared.vocab import Vocabulary
from handoff.shared.wire import constraint_to_proto, topk_from_proto

__all__ = ["MODES", "HybridGenerator", "Mode"]

Mode = Literal["hybrid", "edge", "cloud"]
MODES: tuple[str, ...] = ("hybrid", "edge", "cloud")


class HybridGenerator:
    """Generates with Q on the edge and P in the cloud under a PolicyConfig.

    Args:
        runner: Q's llama.cpp context.
        client: the cloud verifier (None only in mode "edge").
        vocabulary: the edge's, checked against the cloud's when a session opens.
        policy: the policy's constants; the policy core (self.core) is built from them once, so its
            per-generator state (the budget) holds across generate() calls.
        mode: "hybrid", "edge" or "cloud".
        link: timeouts and retry of the link to the cloud.
        scorer: what judges a window, instead of policy.trigger's (e.g. a CallableScorer).
    """

    def __init__(
        self,
        runner: EdgeRunner,
        client: VerifierClient | None,
        vocabulary: Vocabulary,
        policy: PolicyConfig,
        *,
        mode: Mode = "hybrid",
        link: LinkConfig | None = None,
        scorer: TokenScorer | None = None,
    ) -> None:
        if mode not in MODES:
            raise ShapeError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "edge" and client is None:
            raise ShapeError(f"mode {mode!r} needs a cloud verifier client")
        self.runner = runner
        self.client = client
        self.vocabulary = vocabulary
        self.policy = policy
        self.mode = mode
        self.link_config = link or LinkConfig()
        self.core: HandoffPolicy = make_policy(policy, scorer=scorer)
        self.core.attach(vocabulary)  # a policy with a model file refuses another vocabulary here

    @property
    def budget(self) -> BudgetController | None:
        """The budget controller (a share of all the tokens this generator produces), None when off."""
        return self.core.budget

    @property
    def threshold(self) -> float:
        """tau now: the policy's, or where the budget controller has moved it."""
        return self.core.threshold

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        *,
        sampling: SamplingSettings | None = None,
        on_token: OnToken | None = None,
        routing_key: str | None = None,
        constraint: Constraint | None = None,
    ) -> GenerationResult:
        """Generate up to max_tokens tokens after the prompt; stops at an end-of-turn token.

        Args:
            prompt_ids: [n] the prompt's token ids (chat template applied by the caller).
            max_tokens: tokens to generate at most (also bounded by the edge's context).
            sampling: sampling settings for this generation (default: the runner's).
            on_token: called with each token as it is committed, in order (may be async); returning
                True stops the generation there (stop_reason "stopped").
            routing_key: keeps the generation's cloud sessions, resyncs included, on one replica of a
                scaled-out cloud (Ray Serve); default: a fresh random key.
            constraint: what the completion must respect, on both sides (shared/constraints.py).

        Returns:
            The committed tokens with their trace records and the generation's counters.

        Raises:
            VerifierError: mode "cloud" and the cloud cannot be reached, or the cloud refused the
                session for a reason retrying cannot fix (a different vocabulary, a bad argument).
        """
        gen = _Generation(self, list(prompt_ids), max_tokens, on_token)
        return await gen.run(sampling, routing_key, constraint)


class _Stop(Exception):
    """Raised inside generate() when on_token asks to stop."""


class _Generation:
    """The state of one generate() call."""

    def __init__(self, g: HybridGenerator, prompt: list[int], max_tokens: int, on_token: OnToken | None):
        self.g = g
        self.runner = g.runner
        self.policy = g.policy  # the constants
        self.core = g.core  # the decisions
        self.prompt = prompt
        self.on_token = on_token
        self.result = GenerationResult(prompt_ids=prompt, mode=g.mode)
        room = self.runner.n_ctx - len(prompt)
        self.max_tokens = max(0, min(max_tokens, room))
        self.context_bound = max_tokens > room
        self.stops = self.runner.stop_token_ids
        self.link: CloudLink | None = None
        self.drafts = g.mode == "hybrid" and self.core.round == "draft"  # rounds are speculative drafts
        self.gated = g.mode == "hybrid" and self.core.round == "gated"  # tokens wait only where flagged
        self.skips = self.gated or self.core.places_tokens  # checks may skip tokens sent without one
        self.draft_length = DraftLength(self.policy.draft_tokens, self.policy.draft_tokens_max)
        self._start = time.perf_counter()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-runner")

    def clock(self) -> float:
        return time.perf_counter() - self._start

    async def bounded(self, request: Awaitable):
        """A request to the cloud that must not hang the edge: TimeoutError after check_timeout_s."""
        return await within(request, self.g.link_config.check_timeout_s)

    async def in_pool(self, fn, *args):
        """Run a blocking llama.cpp call on the runner's thread: the event loop keeps serving the cloud."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @property
    def committed(self) -> int:
        return len(self.result.records)

    async def run(self, sampling: SamplingSettings | None, key: str | None, constraint) -> GenerationResult:
        result, g = self.result, self.g
        try:
            self.core.begin()
            self.runner.follow(self.core)
            self.runner.keep_draft_probs = self.drafts
            self.runner.hidden = self.core.needs_hidden  # the router's feature; no cost when off
            chosen = sampling or self.runner.sampling  # what P's output must follow, whatever Q drafts from
            edge_sampling = draft_sampling(chosen, self.policy.top_k) if self.drafts else chosen
            await self.in_pool(self.runner.start, self.prompt, edge_sampling, constraint)
            if g.mode != "edge":
                assert g.client is not None
                self.link = CloudLink(
                    g.client,
                    dict(
                        vocabulary=g.vocabulary,
                        top_k=self.policy.top_k,
                        sampling=sampling_to_proto(chosen, self.stops),
                        policy=self.policy.to_proto(),
                        constraint=constraint_to_proto(constraint, len(self.prompt)),
                    ),
                    g.link_config,
                    result,
                    routing_key=key,
                )
                if not await self.link.open(self.prompt, first=True) and g.mode == "cloud":
                    raise VerifierError("UNAVAILABLE", "cloud-only generation: the cloud cannot be reached")
            try:
                result.stop_reason = await self._loop()
            except _Stop:
                result.stop_reason = "stopped"
        finally:
            try:
                if self.link is not None:
                    await asyncio.shield(self.link.close())  # a second cancel must not cut the goodbye short
                    result.bytes_sent, result.bytes_received = self.link.totals()
            finally:
                # Always: the runner's thread must be idle before anyone frees the model under it.
                self._pool.shutdown(wait=True)
                result.seconds = self.clock()
        return result

    async def _loop(self) -> str:
        g, link = self.g, self.link
        ended = "context_full" if self.context_bound else "max_tokens"
        if g.mode == "cloud":
            assert link is not None
            # A service caps one handoff (max_handoff_tokens): ask again until done.
            while self.committed < self.max_tokens:
                before = self.committed
                if await self._cloud_turn(self.max_tokens - self.committed, None, early_handback=False):
                    return "stop_token"
                if not link.alive():
                    return "cloud_unavailable"
                if self.committed == before:
                    return "context_full"  # the cloud's context
            return ended
        done = False
        if g.mode == "hybrid" and self.policy.seed_tokens and link is not None and link.alive():
            done = await self._cloud_turn(
                min(self.policy.seed_tokens, self.max_tokens), None, early_handback=False
            )
        while not done and self.committed < self.max_tokens:
            if (self.drafts or self.gated) and link is not None and link.alive():
                done = await (exact_round(self) if self.drafts else gated_round(self))
            else:  # window rounds; without a cloud the edge goes on alone, its tokens unchecked
                done = await self._edge_phase()
        return "stop_token" if done else ended

    # -- committing ----------------------------------------------------------------------------

    async def commit(self, record: TokenRecord) -> None:
        record.text = self.runner.detokenize([record.token_id]).decode("utf-8", errors="replace")
        record.t_committed = self.clock()
        if self.result.first_token_s is None:
            self.result.first_token_s = record.t_committed
        self.result.records.append(record)
        if self.on_token is not None:
            answer = self.on_token(record)
            if inspect.isawaitable(answer):
                answer = await answer
            if answer is True:
                raise _Stop

    async def commit_unchecked(self, steps: list[EdgeStep], times: list[float]) -> bool:
        """Commit edge tokens the cloud never checked (it is gone); True at a stop token."""
        return await self._commit_edge(CheckWindow(steps, times), len(steps))

    async def _commit_edge(self, w: CheckWindow, n: int) -> bool:
        """Commit the first n tokens of a window (checked if it has an answer); True at a stop token."""
        scores = None
        if w.kls is not None:
            assert w.answer is not None
            scores = w.answer.result().scores
        for j in range(n):
            s, sc = w.steps[j], None if scores is None else scores[j]
            await self.commit(
                TokenRecord(
                    position=s.position, token_id=s.token_id, source="edge", checked=sc is not None,
                    kl=None if w.kls is None or np.isnan(w.kls[j]) else float(w.kls[j]), q_entropy=s.entropy,
                    q_topk_ids=s.topk_ids.tolist(), q_topk_logprobs=s.topk_logprobs.tolist(),
                    q_logprob=s.token_logprob, p_logprob=None if sc is None else float(sc.token_logprob), expert=s.expert,
                    p_topk_ids=None if sc is None else list(sc.topk.ids),
                    p_topk_logprobs=None if sc is None else [float(v) for v in sc.topk.logprobs],
                    t_generated=w.times[j], t_uploaded=w.t_uploaded, t_answered=w.t_answered, unchecked=None
                    if sc is not None else "unreachable" if self.g.mode == "hybrid" else "by_design",
                )
            )  # fmt: skip
        return n > 0 and w.steps[n - 1].token_id in self.stops

    # -- the edge's turn -----------------------------------------------------------------------

    async def upload(self, w: CheckWindow, may_resync: bool) -> None:
        """Send a finished window and its check point; leaves w.answer None if there is no cloud."""
        link = self.link
        if link is None or self.g.mode != "hybrid":
            return
        if link.session is None and link.reachable.is_set() and may_resync:
            # The cloud answers probes again: resynchronise with everything committed so far. Nothing
            # is waiting to be committed, so the new session ends exactly where the window starts.
            await link.open(self.prompt + self.result.tokens, first=False)
        if not link.alive():
            return
        assert link.session is not None
        try:
            skip = np.zeros(len(w.steps), dtype=bool)  # the default: no per-window arrays to build
            if self.core.skips_uploads:
                skip = self.core.skip([s.entropy for s in w.steps], [s.topk_logprobs[0] for s in w.steps])
            self.result.skipped_uploads += int(skip.sum())
            tokens = [edge_token(s, bool(k)) for s, k in zip(w.steps, skip, strict=True)]
            await self.bounded(link.session.append_nowait(tokens))
            first, last = w.steps[0].position, w.steps[-1].position
            w.answer = await self.bounded(link.session.send_check(first, last, skip_unchecked=self.skips))
        except (VerifierError, TimeoutError) as e:
            link.fail(e)
            w.answer = None
            return
        w.t_uploaded = self.clock()
        w.deadline = asyncio.get_running_loop().time() + self.g.link_config.check_timeout_s
        self.result.check_points += 1
        w.answer.add_done_callback(lambda _f, w=w: self._answered(w))

    def _answered(self, w: CheckWindow) -> None:
        """Stamp the answer's arrival once: by its done-callback, or by settle if that runs first."""
        if w.t_answered is None:
            w.t_answered = self.clock()

    async def _edge_phase(self) -> bool:
        """Draft and check windows until a handoff (run here too), a stop token or max_tokens.

        Returns:
            True when a stop token was committed.
        """
        pending: list[CheckWindow] = []  # uploaded, answers outstanding, in order
        current = CheckWindow([], [])
        drafted_stop = False
        while True:
            # Settle every answered window in order; the first that hands over ends the phase.
            while pending and (pending[0].answer is None or pending[0].answer.done()):
                w = pending.pop(0)
                outcome = await self.settle(w)
                if outcome == "stop":
                    return True
                if outcome == "handover":
                    return await self.hand_over(w, pending, current)
            back = self.gated and self.link is not None and self.link.session is not None  # resynchronised
            if back and not pending and not current.steps:
                return False  # gated rounds resume
            in_flight = sum(len(w.steps) for w in pending) + len(current.steps)
            may_draft = (
                not back
                and not drafted_stop
                and self.committed + in_flight < self.max_tokens
                and len(pending) <= self.policy.lookahead_windows
            )
            if may_draft or (back and current.steps):  # a gated policy's cloud is back: check what is drafted
                if may_draft:
                    step = await self.in_pool(self.runner.step)
                    current.steps.append(step)
                    current.times.append(self.clock())
                    drafted_stop = step.token_id in self.stops
                full = back or len(current.steps) >= self.policy.check_interval
                if full or drafted_stop or self.committed + in_flight + 1 >= self.max_tokens:
                    w, current = current, CheckWindow([], [])
                    await self.upload(w, may_resync=not pending)
                    pending.append(w)  # without an answer (no cloud) it is committed unchecked, in order
                continue
            if not pending:
                return False  # max_tokens reached, everything committed
            await self.wait_answer(pending)

    async def wait_answer(self, pending: list[CheckWindow]) -> None:
        """Wait for the oldest check point; past its deadline the cloud counts as gone."""
        w = pending[0]
        assert w.answer is not None
        timeout = max(0.0, w.deadline - asyncio.get_running_loop().time())
        with contextlib.suppress(Exception):
            await within(asyncio.shield(w.answer), timeout)
        if not w.answer.done():
            assert self.link is not None
            limit = self.g.link_config.check_timeout_s
            self.link.fail(TimeoutError(f"no answer to a check point in {limit:g} s"))
            for p in pending:  # each is committed unchecked when settled
                if p.answer is not None and not p.answer.done():
                    p.answer.cancel()

    async def settle(self, w: CheckWindow) -> str:
        """Commit what a window's answer allows: "continue", "stop" (a stop token) or "handover"."""
        answer = w.answer
        if answer is None or answer.cancelled() or answer.exception() is not None:
            if answer is not None and not answer.cancelled() and self.link is not None:
                self.link.alive()  # a broken session starts the fallback
            return "stop" if await self._commit_edge(w, len(w.steps)) else "continue"
        self._answered(w)  # the done-callback runs a loop turn after the answer: settling may come first
        scores = answer.result().scores
        w.kls = window_kl(w.steps, scores, self.core.concept_of)
        self.result.checked_positions += len(w.steps)
        decision = self.core.decide(
            window_view(w.steps, w.kls, scores, self.runner, len(self.prompt))
        ).checked(len(w.steps))
        if decision.token is not None and not self.core.places_tokens:
            raise ShapeError(
                f"policy {self.core.kind!r} returned a token to place but has places_tokens False"
            )
        w.keep, w.token = decision.keep, decision.token
        self.core.on_committed(w.keep, 0)
        if await self._commit_edge(w, w.keep) and w.keep == len(w.steps):
            return "stop"
        return "handover" if decision.hand_over else "continue"

    async def hand_over(self, w: CheckWindow, pending: list[CheckWindow], current: CheckWindow) -> bool:
        """Throw away everything drafted after the cut, on both sides, and let the cloud generate."""
        assert w.kls is not None
        keep = w.keep
        cut = w.steps[keep].position if keep < len(w.steps) else w.steps[-1].position + 1
        self.result.discarded_drafts += sum(len(p.steps) for p in pending) + len(current.steps)
        uploaded_beyond = keep < len(w.steps) or bool(pending)
        for p in pending:
            if p.answer is not None and not p.answer.done():
                p.answer.cancel()  # its reply still comes, and is ignored
        if w.token is not None:  # the policy's own token (an ensemble's): no cloud turn
            return await place_in_place(self, w, keep, w.token, self.core.placed_source)
        if self.runner.length > cut:
            await self.in_pool(self.runner.truncate, cut)
        link = self.link
        assert link is not None
        if link.alive() and uploaded_beyond:
            try:
                self.result.rollbacks += 1
                await self.bounded(link.session.rollback(cut))  # type: ignore[union-attr]
            except (VerifierError, TimeoutError) as e:
                link.fail(e)
        room = self.max_tokens - self.committed
        if room <= 0 or not link.alive():
            return False
        corrected = (w.steps[keep].token_id, float(w.kls[keep])) if keep < len(w.steps) else None
        return await self._cloud_turn(min(self.core.turn_tokens(), room), corrected, early_handback=True)

    # -- the cloud's turn ----------------------------------------------------------------------

    async def _cloud_turn(self, n: int, corrected: tuple[int, float] | None, early_handback: bool) -> bool:
        """The cloud generates up to n tokens, streamed into the edge's context; True at a stop token.

        With early_handback, each cloud position's KL goes to the policy's hand-back rule; once it
        says so the cloud is asked to stop, and tokens it made past that point are rolled back, so
        where generation returns to the edge does not depend on timing.

        Args:
            n: tokens at most, >= 1.
            corrected: (the edge token P replaces, its KL) when the first cloud token is a correction.
        """
        link = self.link
        assert link is not None and link.session is not None
        session = link.session
        self.result.handoffs += 1
        before = self.committed
        stopping, extra, last = False, 0, None
        hand_back = self.core.hand_back(early_handback)
        tokens = session.handoff(n)
        try:
            while True:
                try:
                    tok = await within(anext(tokens), self.g.link_config.token_timeout_s)
                except StopAsyncIteration:
                    break
                t_received = self.clock()
                if stopping:
                    extra += 1  # generated before the cloud saw StopGeneration
                    continue
                p_ids, p_lp = topk_from_proto(tok.topk)
                at = np.append(p_ids, tok.token_id)  # P's top-k, and the token itself
                q_ids, q_lp, ent, q_at = await self.in_pool(self.runner.append_scored, tok.token_id, at)
                kl = cloud_token_kl(p_ids, p_lp, q_ids, q_lp, q_at[:-1], self.core.concept_of)
                first = last is None and corrected is not None
                await self.commit(TokenRecord(
                    position=tok.position, token_id=tok.token_id, source="corrected" if first else "cloud",
                    checked=True, kl=kl, q_entropy=ent, q_topk_ids=q_ids.tolist(),
                    q_topk_logprobs=q_lp.tolist(), q_logprob=float(q_at[-1]), p_topk_ids=p_ids.tolist(),
                    p_logprob=float(tok.token_logprob), p_topk_logprobs=p_lp.tolist(),
                    replaced_token_id=corrected[0] if first else None,  # type: ignore[index]
                    t_generated=self.clock(), t_received=t_received,
                ))  # fmt: skip
                last = tok.token_id
                # A stop token ends the turn anyway; the policy judges the others.
                back = tok.token_id not in self.stops and hand_back.agreed(kl)
                if back and self.committed < self.max_tokens:
                    stopping = True
                    await self.bounded(session.stop_generation())
            if extra:
                self.result.rollbacks += 1
                await self.bounded(session.rollback(self.runner.length))
            if stopping:
                self.result.handbacks_early += 1
        except (VerifierError, TimeoutError) as e:
            link.fail(e)
        finally:
            await tokens.aclose()
            if self.g.mode == "hybrid":
                self.core.on_committed(self.committed - before, self.committed - before)
        return last is not None and last in self.stops
