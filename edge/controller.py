"""The handoff controller: Q drafts on the edge, P checks at check points, generation moves between them.

Policies (DESIGN.md):
- seed: the cloud generates the first N0 tokens; then the edge generates windows of N tokens; at
  each check point, when the window's divergence (max or mean of the per-position top-k KL) exceeds
  tau, the window is kept and the cloud generates the next tokens (handoff) until it has produced
  M of them or the two models have agreed on the last `agree_tokens` positions (hand-back).
- rollback: as seed, but the window is cut at its first position over tau: the edge's tokens from
  there are dropped and the cloud generates from that position (its first token there "corrects"
  the edge). Tokens are committed to the caller only once checked.

Check points are pipelined: a window is uploaded and checked while the edge drafts the next one
(`lookahead_windows`). A window drafted behind a check point that hands over is thrown away on both
sides, so the output is token for token what the synchronous policy gives (seeded draws are keyed
by position, see shared.sampling).

When the cloud is unreachable or slower than `check_timeout_s`, the edge keeps generating alone: its
tokens are committed at once, marked unchecked; a background task probes the cloud with exponential
backoff, and once it answers a new session is opened with the prompt and every committed token
(resynchronisation), after which check points resume.

Modes share this one path: "hybrid" (the policy), "edge" (no cloud at all) and "cloud" (one handoff
for the whole answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any, Literal

import numpy as np

from handoff.edge.link import LinkConfig
from handoff.edge.policies import (
    TokenScorer,
    WindowView,
    trigger_cut,
)
from handoff.edge.policy import PolicyConfig
from handoff.edge.runner import EdgeRunner, EdgeStep
from handoff.edge.verifier_client import RemoteSession, VerifierClient
from handoff.shared.divergence import topk_kl
from handoff.shared.errors import ShapeError, VerifierError
from handoff.shared.sampling import SamplingSettings
from handoff.shared.vocab import Vocabulary
from handoff.shared.wire import pb, topk_from_proto, topk_to_proto

logger = logging.getLogger(__name__)

Source = Literal["edge", "cloud", "corrected"]
Mode = Literal["hybrid", "edge", "cloud"]
MODES: tuple[str, ...] = ("hybrid", "edge", "cloud")
# Float32 views on the wire are exact to ~1e-7: see topk_kl's rest_margin.
WIRE_REST_MARGIN = 1e-5
TRACE_VERSION = 1


@dataclass
class TokenRecord:
    """One committed token, as the trace records it. Times are seconds since the generation started."""

    position: int
    token_id: int
    source: Source
    text: str = ""  # the token's text (a token cut inside a UTF-8 character shows U+FFFD)
    checked: bool = False  # P scored this position before it was committed (always true for P's own)
    kl: float | None = None  # top-k KL(P || Q) at this position (a lower bound of the full KL)
    q_entropy: float | None = None  # nats, Q's full distribution at this position
    q_topk_ids: list[int] | None = None
    q_topk_logprobs: list[float] | None = None
    q_logprob: float | None = None  # Q's log-probability of the token (temperature 1)
    p_logprob: float | None = None  # P's log-probability of the token (temperature 1), when P saw it
    p_topk_ids: list[int] | None = None  # P's top-k at this position, when P saw it
    p_topk_logprobs: list[float] | None = None
    replaced_token_id: int | None = None  # corrected: the edge's token P replaced here
    t_generated: float = 0.0  # the edge drafted it, or its cloud token arrived
    t_uploaded: float | None = None  # its window was sent to the cloud
    t_answered: float | None = None  # the check point's answer arrived
    t_received: float | None = None  # a cloud token reached the edge
    t_committed: float | None = None  # handed to the caller (the edge's own costs: t_committed - t_*)
    draft_len: int | None = None  # exact: on the token after a verified draft, how long the draft was


@dataclass
class GenerationResult:
    """What generate() produced."""

    prompt_ids: list[int]
    mode: str = "hybrid"
    records: list[TokenRecord] = field(default_factory=list)
    check_points: int = 0
    handoffs: int = 0
    handbacks_early: int = 0  # handoffs that ended because the models agreed again
    discarded_drafts: int = 0  # edge tokens drafted behind a check point that handed over
    cloud_failures: int = 0  # times the cloud was found unreachable or too slow
    resyncs: int = 0  # sessions reopened with the committed text
    stop_reason: str = ""
    seconds: float = 0.0
    first_token_s: float | None = None  # time to the first committed token
    bytes_sent: int = 0
    bytes_received: int = 0
    open_bytes: tuple[int, int] | None = None  # the first session's OpenSession, SessionOpened sizes
    skipped_uploads: int = 0  # skip: positions uploaded without Q's distribution
    drafts: int = 0  # exact: drafts verified
    draft_tokens: int = 0  # exact: draft tokens sent
    draft_accepted: int = 0  # exact: draft tokens the cloud accepted

    def acceptance(self) -> dict[str, float | None]:
        """Exact policy: the per-token acceptance rate and the mean accepted length per draft."""
        if not self.drafts:
            return {"acceptance_rate": None, "mean_accepted_length": None}
        return {
            "acceptance_rate": self.draft_accepted / self.draft_tokens,
            "mean_accepted_length": self.draft_accepted / self.drafts,
        }

    @property
    def tokens(self) -> list[int]:
        return [r.token_id for r in self.records]

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.records)

    def counts(self) -> dict[str, int]:
        """Committed tokens by source, plus how many edge tokens P never checked."""
        out = {"edge": 0, "cloud": 0, "corrected": 0, "unchecked": 0}
        for r in self.records:
            out[r.source] += 1
            out["unchecked"] += r.source == "edge" and not r.checked
        return out

    def mean_kl(self) -> float | None:
        """Mean top-k KL over the positions where both views were known."""
        kls = [r.kl for r in self.records if r.kl is not None]
        return float(np.mean(kls)) if kls else None

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "tokens": len(self.records),
            "by_source": self.counts(),
            "check_points": self.check_points,
            "handoffs": self.handoffs,
            "handbacks_early": self.handbacks_early,
            "discarded_drafts": self.discarded_drafts,
            "cloud_failures": self.cloud_failures,
            "resyncs": self.resyncs,
            "mean_kl": self.mean_kl(),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "open_bytes": self.open_bytes,
            "skipped_uploads": self.skipped_uploads,
            "drafts": self.drafts,
            **self.acceptance(),
            "seconds": self.seconds,
            "first_token_s": self.first_token_s,
            "stop_reason": self.stop_reason,
        }

    def trace(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    def write_trace(self, f: IO[str], meta: dict[str, Any] | None = None) -> None:
        """JSONL: a "generation" record (settings), one "token" record per token, a "summary" record."""
        header = {"record": "generation", "version": TRACE_VERSION, "prompt_ids": self.prompt_ids}
        f.write(json.dumps(header | (meta or {})) + "\n")
        for r in self.trace():
            f.write(json.dumps({"record": "token"} | r) + "\n")
        f.write(json.dumps({"record": "summary"} | self.summary()) + "\n")


def window_kl(steps: Sequence[EdgeStep], scores: Sequence[pb.PositionScore]) -> np.ndarray:
    """Top-k KL(P || Q) at each position of a window, from Q's views and the cloud's answer.

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
        )[0]
    return out


def window_cut(kls: np.ndarray, policy: PolicyConfig, threshold: float | None = None) -> int | None:
    """Where a checked window hands over: None to keep going on the edge, else how many tokens to keep.

    Args:
        kls: [n] per-position scores of the window (KL by default; NaN where not scored).
        threshold: tau now (a budget moves it); default the policy's.

    Returns:
        None when the aggregated divergence is <= tau; otherwise n (seed: keep the window) or the
        index of the first position over tau (rollback).
    """
    tau = policy.threshold if threshold is None else threshold
    return trigger_cut(kls, tau, policy.aggregation, "seed" if policy.kind == "seed" else "rollback")


def _edge_token(step: EdgeStep, skip: bool = False) -> pb.EdgeToken:
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


def sampling_to_proto(s: SamplingSettings, stop_ids: Sequence[int]) -> pb.SamplingParams:
    return pb.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        seed=(s.seed or 0) & 0xFFFF_FFFF_FFFF_FFFF,  # the same 64 bits rng_for keys the draws with
        has_seed=s.seed is not None,
        stop_token_ids=sorted(stop_ids),
    )


def _draft_sampling(sampling: SamplingSettings | None, policy: PolicyConfig) -> SamplingSettings | None:
    """The exact policy drafts from Q's top-k truncated distribution: the k values the cloud gets are all of it."""
    if policy.kind != "exact" or sampling is None or sampling.greedy:
        return sampling
    return replace(sampling, top_k=min(sampling.top_k or policy.top_k, policy.top_k))


OnToken = Callable[[TokenRecord], "Awaitable[bool | None] | bool | None"]


class _Stop(Exception):
    """Raised inside generate() when on_token asks to stop."""


@dataclass
class _Window:
    """Edge tokens uploaded together and checked by one check point."""

    steps: list[EdgeStep]
    times: list[float]
    answer: asyncio.Future | None = None  # of pb.CheckPointResult; None: not sent (cloud unreachable)
    t_uploaded: float | None = None
    t_answered: float | None = None
    deadline: float = 0.0  # loop.time() after which the cloud counts as gone
    kls: np.ndarray | None = None  # [n] once answered
    keep: int = 0  # tokens the policy keeps once answered


class _Link:
    """The edge's connection to the cloud: the live session, failure, probing and resynchronisation."""

    def __init__(
        self,
        client: VerifierClient,
        open_kwargs: dict[str, Any],
        config: LinkConfig,
        result: GenerationResult,
    ) -> None:
        self.client = client
        self.open_kwargs = open_kwargs
        self.config = config
        self.result = result
        self.session: RemoteSession | None = None
        self.reachable = asyncio.Event()
        self._prober: asyncio.Task | None = None
        self._sessions: list[RemoteSession] = []

    def alive(self) -> bool:
        """True while the session is usable; a session found broken starts the fallback."""
        if self.session is not None and self.session.failed is not None:
            self.fail(self.session.failed)
        return self.session is not None

    async def open(self, context: Sequence[int], *, first: bool) -> bool:
        """Open a session whose prompt is `context` (prompt + committed tokens); False if that failed."""
        try:
            session = await _within(
                self.client.open_session(context, **self.open_kwargs), self.config.open_timeout_s
            )
        except (VerifierError, TimeoutError, OSError) as e:
            if not isinstance(e, VerifierError) or e.code in _TRANSIENT:
                self.fail(e)
                return False
            raise  # a refusal retrying cannot fix: a different vocabulary, a bad argument
        self.session = session
        self._sessions.append(session)
        if first:  # for the latency simulator: the open carries the vocabulary fingerprint
            self.result.open_bytes = (session.bytes_sent, session.bytes_received)
        self.reachable.clear()
        if not first:
            self.result.resyncs += 1
            logger.info("cloud back: session resynchronised at %d tokens", len(context))
        return True

    def fail(self, error: BaseException) -> None:
        """The cloud is gone or too slow: drop the session and probe in the background until it answers."""
        self.result.cloud_failures += 1
        logger.warning("cloud unavailable (%s): the edge continues alone, unchecked", _describe(error))
        if self.session is not None:
            self.session.abort()
            self.session = None
        if self._prober is None or self._prober.done():
            self.reachable.clear()
            self._prober = asyncio.get_running_loop().create_task(self._probe(), name="cloud-probe")

    async def _probe(self) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(self.config.backoff(attempt))
            try:
                await _within(self.client.info(), self.config.open_timeout_s)
            except (VerifierError, TimeoutError, OSError) as e:
                logger.debug("cloud probe %d failed: %s", attempt, _describe(e))
                attempt += 1
                continue
            self.reachable.set()
            return

    def totals(self) -> tuple[int, int]:
        return (sum(s.bytes_sent for s in self._sessions), sum(s.bytes_received for s in self._sessions))

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)
        if self.session is not None:
            try:
                await _within(self.session.close(), self.config.open_timeout_s)
            except TimeoutError:
                self.session.abort()
            self.session = None


# A cloud that answers with these is busy or gone, not refusing us: retry later.
_TRANSIENT = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED"})


async def _within(request: Awaitable, seconds: float):
    """Await with a time limit (TimeoutError); unlike 3.11's wait_for, never swallows a cancellation."""
    async with asyncio.timeout(seconds):
        return await request


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


class HybridGenerator:
    """Generates with Q on the edge and P in the cloud under a PolicyConfig."""

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
        self.scorer = scorer or policy.scorer()
        self.skip_gate = policy.skip_gate()
        # Across generate() calls: a budget is a share of all the tokens this generator produces.
        self.budget = policy.budget_controller()

    @property
    def threshold(self) -> float:
        """tau now: the policy's, or where the budget controller has moved it."""
        return self.budget.tau if self.budget is not None else self.policy.threshold

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        *,
        sampling: SamplingSettings | None = None,
        on_token: OnToken | None = None,
    ) -> GenerationResult:
        """Generate up to max_tokens tokens after the prompt; stops at an end-of-turn token.

        Args:
            prompt_ids: [n] the prompt's token ids (chat template applied by the caller).
            max_tokens: tokens to generate at most (also bounded by the edge's context).
            sampling: sampling settings for this generation (default: the runner's).
            on_token: called with each token as it is committed, in order (may be async); returning
                True stops the generation there (stop_reason "stopped").

        Returns:
            The committed tokens with their trace records and the generation's counters.

        Raises:
            VerifierError: mode "cloud" and the cloud cannot be reached, or the cloud refused the
                session for a reason retrying cannot fix (a different vocabulary, a bad argument).
        """
        gen = _Generation(self, list(prompt_ids), max_tokens, on_token)
        return await gen.run(sampling)


class _Generation:
    """The state of one generate() call."""

    def __init__(self, g: HybridGenerator, prompt: list[int], max_tokens: int, on_token: OnToken | None):
        self.g = g
        self.runner = g.runner
        self.policy = g.policy
        self.prompt = prompt
        self.on_token = on_token
        self.result = GenerationResult(prompt_ids=prompt, mode=g.mode)
        room = self.runner.n_ctx - len(prompt)
        self.max_tokens = max(0, min(max_tokens, room))
        self.context_bound = max_tokens > room
        self.stops = self.runner.stop_token_ids
        self.link: _Link | None = None
        self.gamma = self.policy.draft_tokens  # exact: the next draft's length
        self._exact_acceptance: list[tuple[int, int]] = []  # exact: (accepted, drafted) per draft
        self._start = time.perf_counter()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-runner")

    def clock(self) -> float:
        return time.perf_counter() - self._start

    async def _bounded(self, request: Awaitable):
        """A request to the cloud that must not hang the edge: TimeoutError after check_timeout_s."""
        return await _within(request, self.g.link_config.check_timeout_s)

    async def _in_pool(self, fn, *args):
        """Run a blocking llama.cpp call on the runner's thread: the event loop keeps serving the cloud."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    @property
    def committed(self) -> int:
        return len(self.result.records)

    async def run(self, sampling: SamplingSettings | None) -> GenerationResult:
        result, g = self.result, self.g
        try:
            self.runner.keep_draft_probs = g.mode == "hybrid" and self.policy.kind == "exact"
            chosen = sampling or self.runner.sampling  # what P's output must follow, whatever Q drafts from
            await self._in_pool(self.runner.start, self.prompt, _draft_sampling(chosen, self.policy))
            if g.mode != "edge":
                assert g.client is not None
                self.link = _Link(
                    g.client,
                    dict(
                        vocabulary=g.vocabulary,
                        top_k=self.policy.top_k,
                        sampling=sampling_to_proto(chosen, self.stops),
                        policy=self.policy.to_proto(),
                    ),
                    g.link_config,
                    result,
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
        exact = g.mode == "hybrid" and self.policy.kind == "exact"
        while not done and self.committed < self.max_tokens:
            if exact and link is not None and link.alive():
                done = await self._exact_round()
            else:  # no cloud: the edge goes on alone, its tokens unchecked
                done = await self._edge_phase()
        return "stop_token" if done else ended

    # -- committing ----------------------------------------------------------------------------

    async def _commit(self, record: TokenRecord) -> None:
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

    async def _commit_edge(self, w: _Window, n: int) -> bool:
        """Commit the first n tokens of a window (checked if it has an answer); True at a stop token."""
        scores = None
        if w.kls is not None:
            assert w.answer is not None
            scores = w.answer.result().scores
        for j in range(n):
            s = w.steps[j]
            await self._commit(
                TokenRecord(
                    position=s.position,
                    token_id=s.token_id,
                    source="edge",
                    checked=scores is not None,
                    kl=None if w.kls is None or np.isnan(w.kls[j]) else float(w.kls[j]),
                    q_entropy=s.entropy,
                    q_topk_ids=s.topk_ids.tolist(),
                    q_topk_logprobs=s.topk_logprobs.tolist(),
                    q_logprob=s.token_logprob,
                    p_logprob=None if scores is None else float(scores[j].token_logprob),
                    p_topk_ids=None if scores is None else list(scores[j].topk.ids),
                    p_topk_logprobs=None if scores is None else [float(v) for v in scores[j].topk.logprobs],
                    t_generated=w.times[j],
                    t_uploaded=w.t_uploaded,
                    t_answered=w.t_answered,
                )
            )
        return n > 0 and w.steps[n - 1].token_id in self.stops

    # -- the edge's turn -----------------------------------------------------------------------

    async def _upload(self, w: _Window, may_resync: bool) -> None:
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
            gate = self.g.skip_gate
            skip = (
                np.zeros(len(w.steps), dtype=bool)
                if gate.kind == "off"  # the default: no per-window arrays to build
                else gate.confident(
                    np.asarray([s.entropy for s in w.steps]),
                    np.asarray([s.topk_logprobs[0] for s in w.steps]),
                )
            )
            self.result.skipped_uploads += int(skip.sum())
            await self._bounded(
                link.session.append_nowait(
                    [_edge_token(s, bool(k)) for s, k in zip(w.steps, skip, strict=True)]
                )
            )
            w.answer = await self._bounded(link.session.send_check(w.steps[0].position, w.steps[-1].position))
        except (VerifierError, TimeoutError) as e:
            link.fail(e)
            w.answer = None
            return
        w.t_uploaded = self.clock()
        w.deadline = asyncio.get_running_loop().time() + self.g.link_config.check_timeout_s
        self.result.check_points += 1
        w.answer.add_done_callback(lambda _f, w=w: self._answered(w))

    def _answered(self, w: _Window) -> None:
        """Stamp the answer's arrival once: by its done-callback, or by _settle if that runs first."""
        if w.t_answered is None:
            w.t_answered = self.clock()

    async def _edge_phase(self) -> bool:
        """Draft and check windows until a handoff (run here too), a stop token or max_tokens.

        Returns:
            True when a stop token was committed.
        """
        pending: list[_Window] = []  # uploaded, answers outstanding, in order
        current = _Window([], [])
        drafted_stop = False
        while True:
            # Settle every answered window in order; the first that hands over ends the phase.
            while pending and (pending[0].answer is None or pending[0].answer.done()):
                w = pending.pop(0)
                outcome = await self._settle(w)
                if outcome == "stop":
                    return True
                if outcome == "handover":
                    return await self._hand_over(w, pending, current)
            in_flight = sum(len(w.steps) for w in pending) + len(current.steps)
            may_draft = (
                not drafted_stop
                and self.committed + in_flight < self.max_tokens
                and len(pending) <= self.policy.lookahead_windows
            )
            if may_draft:
                step = await self._in_pool(self.runner.step)
                current.steps.append(step)
                current.times.append(self.clock())
                drafted_stop = step.token_id in self.stops
                full = len(current.steps) >= self.policy.check_interval
                if full or drafted_stop or self.committed + in_flight + 1 >= self.max_tokens:
                    w, current = current, _Window([], [])
                    await self._upload(w, may_resync=not pending)
                    pending.append(w)  # without an answer (no cloud) it is committed unchecked, in order
                continue
            if not pending:
                return False  # max_tokens reached, everything committed
            await self._wait_answer(pending)

    async def _wait_answer(self, pending: list[_Window]) -> None:
        """Wait for the oldest check point; past its deadline the cloud counts as gone."""
        w = pending[0]
        assert w.answer is not None
        timeout = max(0.0, w.deadline - asyncio.get_running_loop().time())
        with contextlib.suppress(Exception):
            await _within(asyncio.shield(w.answer), timeout)
        if not w.answer.done():
            assert self.link is not None
            limit = self.g.link_config.check_timeout_s
            self.link.fail(TimeoutError(f"no answer to a check point in {limit:g} s"))
            for p in pending:  # each is committed unchecked when settled
                if p.answer is not None and not p.answer.done():
                    p.answer.cancel()

    async def _settle(self, w: _Window) -> str:
        """Commit what a window's answer allows: "continue", "stop" (a stop token) or "handover"."""
        answer = w.answer
        if answer is None or answer.cancelled() or answer.exception() is not None:
            if answer is not None and not answer.cancelled() and self.link is not None:
                self.link.alive()  # a broken session starts the fallback
            return "stop" if await self._commit_edge(w, len(w.steps)) else "continue"
        # A done-callback runs one loop turn after the answer is set; settling may come first.
        self._answered(w)
        w.kls = window_kl(w.steps, answer.result().scores)
        view = WindowView(
            token_ids=np.asarray([s.token_id for s in w.steps]),
            q_topk_ids=np.stack([s.topk_ids for s in w.steps]),
            q_topk_logprobs=np.stack([s.topk_logprobs for s in w.steps]),
            q_entropy=np.asarray([s.entropy for s in w.steps]),
            p_kls=w.kls,
        )
        cut = window_cut(self.g.scorer.scores(view), self.policy, self.g.threshold)
        w.keep = len(w.steps) if cut is None else cut
        if self.g.budget is not None:
            self.g.budget.update(w.keep, 0)
        if await self._commit_edge(w, w.keep) and w.keep == len(w.steps):
            return "stop"
        return "continue" if cut is None else "handover"

    async def _hand_over(self, w: _Window, pending: list[_Window], current: _Window) -> bool:
        """Throw away everything drafted after the cut, on both sides, and let the cloud generate."""
        assert w.kls is not None
        keep = w.keep
        cut = w.steps[keep].position if keep < len(w.steps) else w.steps[-1].position + 1
        self.result.discarded_drafts += sum(len(p.steps) for p in pending) + len(current.steps)
        uploaded_beyond = keep < len(w.steps) or bool(pending)
        for p in pending:
            if p.answer is not None and not p.answer.done():
                p.answer.cancel()  # its reply still comes, and is ignored
        if self.runner.length > cut:
            await self._in_pool(self.runner.truncate, cut)
        link = self.link
        assert link is not None
        if link.alive() and uploaded_beyond:
            try:
                await self._bounded(link.session.rollback(cut))  # type: ignore[union-attr]
            except (VerifierError, TimeoutError) as e:
                link.fail(e)
        room = self.max_tokens - self.committed
        if room <= 0 or not link.alive():
            return False
        corrected = (w.steps[keep].token_id, float(w.kls[keep])) if keep < len(w.steps) else None
        return await self._cloud_turn(min(self.policy.handback_tokens, room), corrected, early_handback=True)

    # -- the exact policy --------------------------------------------------------------------

    async def _exact_round(self) -> bool:
        """Draft gamma tokens, let the cloud verify them (speculative sampling); True at a stop token.

        The tokens that stand are distributed exactly as P's own sampling (shared/speculative.py);
        gamma follows the acceptance rate: drafting past the expected run of acceptances only
        spends edge time and uplink on tokens the cloud will throw away.
        """
        link = self.link
        assert link is not None and link.session is not None
        result = self.result
        start = self.runner.length
        steps: list[EdgeStep] = []
        times: list[float] = []  # when each draft token was generated
        while len(steps) < min(self.gamma, self.max_tokens - self.committed):
            step = await self._in_pool(self.runner.step)
            steps.append(step)
            times.append(self.clock())
            if step.token_id in self.stops:
                break
        draft = [pb.EdgeToken(position=s.position, token_id=s.token_id) for s in steps]
        dists = [topk_to_proto(s.topk_ids, np.log(np.maximum(s.draft_probs, 1e-300))) for s in steps]
        t_uploaded = self.clock()
        try:
            verdict = await self._bounded(link.session.verify(draft, dists))
        except (VerifierError, TimeoutError) as e:
            link.fail(e)
            return await self._commit_edge(_Window(steps, times), len(steps))  # unchecked: the cloud is gone
        t_answered = self.clock()
        accepted = min(verdict.accepted, len(steps))
        result.drafts += 1
        result.draft_tokens += len(steps)
        result.draft_accepted += accepted
        self._exact_acceptance.append((accepted, len(steps)))
        for j in range(accepted):
            s = steps[j]
            await self._commit(
                TokenRecord(
                    position=s.position, token_id=s.token_id, source="edge", checked=True, kl=None,
                    q_entropy=s.entropy, q_topk_ids=s.topk_ids.tolist(), q_topk_logprobs=s.topk_logprobs.tolist(),
                    q_logprob=s.token_logprob, t_generated=times[j], t_uploaded=t_uploaded, t_answered=t_answered,
                )
            )  # fmt: skip
            if s.token_id in self.stops:
                return True
        if accepted < len(steps):
            await self._in_pool(self.runner.truncate, start + accepted)
        self.gamma = self._next_gamma()
        if not verdict.HasField("next") or self.committed >= self.max_tokens:
            return False
        tok = verdict.next
        p_ids, p_lp = topk_from_proto(tok.topk)
        await self._in_pool(self.runner.append, [tok.token_id])
        rejected = accepted < len(steps)
        await self._commit(
            TokenRecord(
                position=tok.position, token_id=tok.token_id, source="corrected" if rejected else "cloud",
                checked=True, p_logprob=float(tok.token_logprob), p_topk_ids=p_ids.tolist(),
                p_topk_logprobs=p_lp.tolist(), replaced_token_id=steps[accepted].token_id if rejected else None,
                t_generated=t_answered, t_received=t_answered, draft_len=len(steps),
            )
        )  # fmt: skip
        return tok.token_id in self.stops

    def _next_gamma(self) -> int:
        """The next draft's length: the expected run of acceptances plus one, from recent drafts.

        With a per-token acceptance rate a, a draft of g tokens yields (1 - a^(g+1)) / (1 - a) tokens
        (Leviathan et al. 2023); the marginal token is worth drafting while a^g stays above ~1/4.
        """
        recent = self._exact_acceptance[-8:]
        drafted = sum(n for _, n in recent)
        rate = sum(a for a, _ in recent) / drafted if drafted else 0.5
        if rate >= 0.999:
            return self.policy.draft_tokens_max
        if rate <= 0.0:
            return 1
        best = int(np.floor(np.log(0.25) / np.log(rate)))
        return int(np.clip(best, 1, self.policy.draft_tokens_max))

    # -- the cloud's turn ----------------------------------------------------------------------

    async def _cloud_turn(self, n: int, corrected: tuple[int, float] | None, early_handback: bool) -> bool:
        """The cloud generates up to n tokens, streamed into the edge's context; True at a stop token.

        With early_handback, each cloud position is compared with Q's view there; once agree_tokens
        positions in a row have KL <= tau the cloud is asked to stop, and tokens it made past that
        point are rolled back, so where generation returns to the edge does not depend on timing.

        Args:
            n: tokens at most, >= 1.
            corrected: (the edge token P replaces, its KL) when the first cloud token is a correction.
        """
        link = self.link
        assert link is not None and link.session is not None
        session = link.session
        self.result.handoffs += 1
        before = self.committed
        streak, stopping, extra, last = 0, False, 0, None
        agree = self.policy.agree_tokens if early_handback else 0
        tokens = session.handoff(n)
        try:
            while True:
                try:
                    tok = await _within(anext(tokens), self.g.link_config.token_timeout_s)
                except StopAsyncIteration:
                    break
                t_received = self.clock()
                if stopping:
                    extra += 1  # generated before the cloud saw StopGeneration
                    continue
                p_ids, p_lp = topk_from_proto(tok.topk)
                at = np.append(p_ids, tok.token_id)  # P's top-k, and the token itself
                q_ids, q_lp, ent, q_at = await self._in_pool(self.runner.append_scored, tok.token_id, at)
                q_at_p, q_tok = q_at[:-1], q_at[-1]
                # Q is known everywhere on the edge: P's top-k with Q's values there gives the bound.
                kl = float(
                    topk_kl(p_ids[None], p_lp[None], q_ids[None], q_lp[None],
                            q_logprobs_at_p_ids=q_at_p[None], rest_margin=WIRE_REST_MARGIN)[0]
                )  # fmt: skip
                record = TokenRecord(
                    position=tok.position,
                    token_id=tok.token_id,
                    source="corrected" if last is None and corrected is not None else "cloud",
                    checked=True,
                    kl=kl,
                    q_entropy=ent,
                    q_topk_ids=q_ids.tolist(),
                    q_topk_logprobs=q_lp.tolist(),
                    q_logprob=float(q_tok),
                    p_logprob=float(tok.token_logprob),
                    p_topk_ids=p_ids.tolist(),
                    p_topk_logprobs=p_lp.tolist(),
                    replaced_token_id=corrected[0] if last is None and corrected is not None else None,
                    t_generated=self.clock(),
                    t_received=t_received,
                )
                last = tok.token_id
                await self._commit(record)
                if agree and tok.token_id not in self.stops:
                    streak = streak + 1 if kl <= self.g.threshold else 0
                    if streak >= agree and self.committed < self.max_tokens:
                        stopping = True
                        await self._bounded(session.stop_generation())
            if extra:
                await self._bounded(session.rollback(self.runner.length))
            if stopping:
                self.result.handbacks_early += 1
        except (VerifierError, TimeoutError) as e:
            link.fail(e)
        finally:
            await tokens.aclose()
            if self.g.budget is not None and self.g.mode == "hybrid":
                self.g.budget.update(self.committed - before, self.committed - before)
        return last is not None and last in self.stops
