"""Handoff across tokenizers: Q and P with different vocabularies share the text, not the token ids.

The cloud session is text-aligned (cloud/text_session.py): the prompt goes as text, the edge appends
the text of its tokens, and every position on the wire is a byte offset into the completion. Q keeps
its own tokens of the same text (`_QText`): its own tokens as it drew them, P's text re-tokenised with
Q's tokenizer at the unsettled tail only (shared/retokenize.py), its KV cache following each change.

- Window rounds (seed, rollback and other KL-threshold kinds): the edge drafts N tokens, sends their
  text and a check point over their bytes; P answers with its views at its own token boundaries. Both
  are compared where both tokenizations start a token at the same byte (an aligned boundary), by the
  KL over the shared vocabulary with a rest bucket (shared/alignment.intersection_kl, a lower bound of
  any finer comparison); other positions are not scored (NaN: never cut at). The policy core decides
  as for one vocabulary. A handoff cuts both sides at the chosen boundary, P writes M tokens as text,
  Q re-tokenises it and takes over again at the end of that text.
- Draft rounds (exact): token-level intersection (TLI, Timor et al., "Accelerating LLM Inference with
  Lossless Speculative Decoding Algorithms for Heterogeneous Vocabularies", ICML 2025). Q drafts only
  tokens P also has (its top-k restricted to them, shared/alignment.intersection_draft), sent as P's
  ids; P verifies them with speculative sampling, so the output is distributed as P's own sampling and
  greedy drafts give P's greedy text (edge/cross_exact.py).
- Mode "cloud": P writes everything (the baseline of a pair).

Records: an edge token's token_id is Q's id, a cloud token's is P's id (its text is in the record).
Not available across tokenizers (refused at construction): early hand-back (agree_tokens), gated
and token-placing policies, skipped uploads, constraints, and resynchronising with a cloud that comes
back (a failed cloud leaves the edge generating alone, its tokens committed unchecked).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from handoff.edge.cross_exact import tli_rounds
from handoff.edge.exact import draft_sampling
from handoff.edge.link import LinkConfig, within
from handoff.edge.policy import HandoffPolicy, PolicyConfig, make_policy
from handoff.edge.records import GenerationResult, OnToken, TokenRecord
from handoff.edge.runner import EdgeRunner, EdgeStep
from handoff.edge.verifier_client import RemoteSession, VerifierClient
from handoff.edge.wire import sampling_to_proto
from handoff.shared.alignment import (
    VocabAlignment,
    char_concepts_across,
    intersection_kl,
    with_stops,
)
from handoff.shared.errors import ShapeError, VerifierError
from handoff.shared.llama_cpp_model import GGUFTokenizer, gguf_tokenizer
from handoff.shared.retokenize import Change, TextTokens, complete_utf8
from handoff.shared.sampling import SamplingSettings
from handoff.shared.vocab import Vocabulary
from handoff.shared.wire import pb, topk_from_proto

__all__ = ["CrossGenerator", "cross_generator"]

logger = logging.getLogger(__name__)


async def cross_generator(
    runner: EdgeRunner,
    client: VerifierClient,
    policy: PolicyConfig,
    *,
    mode: str = "hybrid",
    link: LinkConfig | None = None,
    cache_dir: Path,
) -> CrossGenerator:
    """A CrossGenerator for Q's runner and the cloud behind client (the alignment cached in cache_dir)."""
    from handoff.shared.model_info import load_model_info
    from handoff.shared.models import ModelRef

    path = Path(runner.model.path)
    vocabulary = load_model_info(ModelRef("gguf", path, path.name))[1]
    digest = vocabulary.fingerprint.digest.hex()
    info = await client.info()
    if not info.text_sessions:
        raise VerifierError(
            "FAILED_PRECONDITION", f"the cloud model {info.model_id} serves no text-aligned sessions"
        )
    q_tok = await asyncio.to_thread(gguf_tokenizer, path)  # loaded once per process, pieces read once
    alignment = await client.alignment(await asyncio.to_thread(q_tok.text_pieces), digest, cache_dir)
    both = with_stops(alignment, q_tok.stop_token_ids[0], int(info.stop_token_ids[0]))
    return CrossGenerator(runner, client, vocabulary, policy, both, mode=mode, link=link)


class CrossGenerator:
    """Generates with Q on the edge and P in the cloud when their tokenizers differ.

    Args:
        runner: Q's llama.cpp context.
        client: the cloud verifier (a text-aligned session per generation).
        vocabulary: Q's (OpenSession carries its fingerprint; a text session does not compare it).
        policy: the policy's constants (a window kind judged on per-token KL, or exact).
        alignment: Q's and P's vocabularies aligned, end-of-turn tokens included (with_stops).
        mode: "hybrid" or "cloud".
        link: timeouts.
    """

    def __init__(
        self,
        runner: EdgeRunner,
        client: VerifierClient,
        vocabulary: Vocabulary,
        policy: PolicyConfig,
        alignment: VocabAlignment,
        *,
        mode: str = "hybrid",
        link: LinkConfig | None = None,
    ) -> None:
        if mode not in ("hybrid", "cloud"):
            raise ShapeError(f"mode across tokenizers: expected 'hybrid' or 'cloud', got {mode!r}")
        core = make_policy(policy)
        plain_window = core.round == "window" and type(core).decide is HandoffPolicy.decide
        if not (core.round == "draft" or plain_window) or core.places_tokens or core.skips_uploads:
            raise ShapeError(
                f"policy {policy.kind!r} is not available across tokenizers (seed, rollback, adaptive and "
                "exact are; docs/tokenizers.md)"
            )
        if policy.agree_tokens:
            raise ShapeError("early hand-back (agree_tokens) is not available across tokenizers")
        if policy.divergence not in ("token", "char"):
            raise ShapeError(
                f"divergence {policy.divergence!r} is not available across tokenizers (token, char are)"
            )
        if alignment.q_to_p.size != runner.n_vocab:
            raise ShapeError(
                f"the alignment is for a vocabulary of {alignment.q_to_p.size} tokens, Q has {runner.n_vocab}"
            )
        self.runner, self.client, self.policy, self.core = runner, client, policy, core
        self.vocabulary, self.alignment, self.mode = vocabulary, alignment, mode
        self.link_config = link or LinkConfig()
        self.tokenizer = gguf_tokenizer(runner.model.path)
        # The next-character divergence's concepts over intersection_kl's ids; None: over tokens.
        self.concept_of = None
        if policy.divergence == "char":
            self.concept_of = char_concepts_across(alignment, self.tokenizer.text_pieces())

    @property
    def threshold(self) -> float:
        return self.core.threshold

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        *,
        sampling: SamplingSettings | None = None,
        on_token: OnToken | None = None,
        routing_key: str | None = None,
        constraint: object = None,
    ) -> GenerationResult:
        """Generate up to max_tokens tokens (Q's and P's together) after the prompt; as HybridGenerator.generate.

        Args:
            prompt_ids: [n] the prompt in Q's tokens (chat template applied); P gets its text.
            max_tokens: tokens to commit at most.
            sampling: the settings P's output follows (default: the runner's).
            on_token: called with each committed record; True stops the generation.
            routing_key: keeps the session on one replica of a scaled-out cloud.
            constraint: must be None (constraints are not served across tokenizers).
        """
        if constraint is not None and getattr(constraint, "active", True):
            raise ShapeError("constraints are not available across tokenizers")
        run = _Run(self, list(prompt_ids), max_tokens, on_token)
        return await run.run(sampling, routing_key)


class _Stop(Exception):
    """on_token asked to stop."""


class _QText:
    """Q's tokens of the completion's text, kept in step with Q's context (the runner)."""

    def __init__(self, runner: EdgeRunner, tokenizer: GGUFTokenizer, prompt_len: int) -> None:
        self.runner, self.prompt_len = runner, prompt_len
        self.tt = TextTokens(tokenizer.tokenize, tokenizer.detokenize)

    @property
    def length(self) -> int:
        return len(self.tt.text)

    def _apply(self, change: Change) -> None:
        keep = self.prompt_len + change.keep
        if self.runner.length > keep:
            self.runner.truncate(keep)
        if change.added:
            self.runner.append(change.added)

    def own(self, ids: Sequence[int], pieces: Sequence[bytes]) -> None:
        """Q's own tokens, already in its context."""
        self.tt.append_tokens(ids, pieces)

    def foreign(self, data: bytes) -> None:
        """P's text: re-tokenised with Q's tokenizer, then settled so that Q can go on after it."""
        self._apply(self.tt.extend(data, settle=True))

    def cut(self, length: int) -> None:
        """Cut the text to `length` bytes, at a boundary of Q's own tokens."""
        self._apply(self.tt.truncate(length))
        if self.tt.pending:
            raise ShapeError(f"cut: byte {length} is not a boundary of Q's tokens")

    def force(self) -> None:
        """Settle even an unfinished character at the end (as byte tokens): Q goes on from raw bytes."""
        self._apply(self.tt.extend(b"", settle=True, raw=True))

    @property
    def ready(self) -> bool:
        """Q's context holds all the text: Q can draw the next token (no unfinished character pending)."""
        return not self.tt.pending


class _Run:
    """One generate() call across tokenizers."""

    def __init__(
        self, g: CrossGenerator, prompt: list[int], max_tokens: int, on_token: OnToken | None
    ) -> None:
        self.g, self.runner, self.core, self.policy = g, g.runner, g.core, g.policy
        self.prompt, self.on_token = prompt, on_token
        self.result = GenerationResult(prompt_ids=prompt, mode=g.mode)
        self.max_tokens = max(0, min(max_tokens, self.runner.n_ctx - len(prompt)))
        self.stops = set(self.runner.stop_token_ids)
        self.text = _QText(self.runner, g.tokenizer, len(prompt))
        self.session: RemoteSession | None = None
        self.p_stops: frozenset[int] = frozenset()  # P's end-of-generation ids, from the session's info
        self._start = time.perf_counter()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edge-runner")

    def clock(self) -> float:
        return time.perf_counter() - self._start

    async def in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def bounded(self, request):
        return await within(request, self.g.link_config.check_timeout_s)

    @property
    def committed(self) -> int:
        return len(self.result.records)

    async def run(self, sampling: SamplingSettings | None, key: str | None) -> GenerationResult:
        g, result = self.g, self.result
        drafts = g.mode == "hybrid" and self.core.round == "draft"
        chosen = sampling or self.runner.sampling
        try:
            self.core.begin()
            await self.in_pool(
                self.runner.start,
                self.prompt,
                draft_sampling(chosen, self.policy.top_k) if drafts else chosen,
            )
            prompt_text = self.runner.detokenize(self.prompt)
            try:
                self.session = await self.bounded(g.client.open_session(
                    [], g.vocabulary, top_k=self.policy.top_k, sampling=sampling_to_proto(chosen, []),
                    policy=self.policy.to_proto(), routing_key=key, prompt_text=prompt_text,
                ))  # fmt: skip
                result.servers.append(self.session.server_id)
                result.open_bytes = (self.session.bytes_sent, self.session.bytes_received)
                if self.session.info is not None:
                    self.p_stops = frozenset(self.session.info.stop_token_ids)
            except (VerifierError, TimeoutError) as e:
                if g.mode == "cloud":
                    raise VerifierError("UNAVAILABLE", f"cloud-only generation: {e}") from None
                self._fail(e)
            try:
                done = await (
                    self._cloud_only()
                    if g.mode == "cloud"
                    else tli_rounds(self, draft_sampling(chosen, self.policy.top_k) or chosen)
                    if drafts
                    else self._windows()
                )
                result.stop_reason = "stop_token" if done else "max_tokens"
            except _Stop:
                result.stop_reason = "stopped"
        finally:
            try:
                if self.session is not None:
                    await asyncio.shield(self.session.close())
            finally:
                if self.session is not None:
                    result.bytes_sent, result.bytes_received = (
                        self.session.bytes_sent,
                        self.session.bytes_received,
                    )
                    result.cloud_compute_s = self.session.compute_s
                self._pool.shutdown(wait=True)
                result.seconds = self.clock()
        return result

    def _fail(self, e: BaseException) -> None:
        """The cloud is gone: the edge goes on alone (no resynchronisation across tokenizers)."""
        logger.warning("the cloud failed (%s): the edge goes on alone", e)
        self.result.cloud_failures += 1
        if self.session is not None:
            self.session.abort()
            self.session = None

    async def commit(self, record: TokenRecord, piece: bytes) -> None:
        record.text = piece.decode("utf-8", errors="replace")
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

    async def _edge(self, step: EdgeStep, piece: bytes, *, kl: float | None = None, checked: bool = False,
                    unchecked: str | None = None, t: float = 0.0) -> bool:  # fmt: skip
        await self.commit(TokenRecord(
            position=step.position, token_id=step.token_id, source="edge", checked=checked, kl=kl,
            q_entropy=step.entropy, q_topk_ids=step.topk_ids.tolist(), q_topk_logprobs=step.topk_logprobs.tolist(),
            q_logprob=step.token_logprob, t_generated=t, unchecked=unchecked,  # type: ignore[arg-type]
        ), piece)  # fmt: skip
        return step.token_id in self.stops

    async def _cloud_token(self, tok: pb.CloudToken, replaced: int | None) -> bool:
        """Commit one P token and give its text to Q; True when it is P's end of turn."""
        p_ids, p_lp = topk_from_proto(tok.topk)
        piece = bytes(tok.text)
        await self.in_pool(self.text.foreign, piece)
        await self.commit(TokenRecord(
            position=tok.position, token_id=tok.token_id, source="corrected" if replaced is not None else "cloud",
            checked=True, p_logprob=float(tok.token_logprob), p_topk_ids=p_ids.tolist(),
            p_topk_logprobs=p_lp.tolist(), replaced_token_id=replaced, t_generated=self.clock(),
            t_received=self.clock(), raw=piece,
        ), piece)  # fmt: skip
        return not piece and int(tok.token_id) in self.p_stops

    async def _cloud_turn(self, n: int, replaced: int | None = None) -> bool:
        """P writes up to n tokens (more while its text ends inside a character); True at its end of turn."""
        assert self.session is not None
        self.result.handoffs += 1
        before = self.committed
        try:
            while self.committed - before < n or not self.text.ready:
                if self.committed >= self.max_tokens:
                    return False
                tokens = self.session.handoff(n - (self.committed - before) if self.text.ready else 1)
                got = False
                try:
                    async for tok in tokens:
                        got = True
                        first = replaced if self.committed == before else None
                        if await self._cloud_token(tok, first):
                            return True
                finally:
                    await tokens.aclose()
                if not got:
                    return False  # the cloud's context is full
        except (VerifierError, TimeoutError) as e:
            self._fail(e)
        finally:
            self.core.on_committed(self.committed - before, self.committed - before)
        return False

    async def _cloud_only(self) -> bool:
        while self.committed < self.max_tokens and self.session is not None:
            before = self.committed
            if await self._cloud_turn(self.max_tokens - self.committed):
                return True
            if self.committed == before:
                return False
        return False

    # -- window rounds -------------------------------------------------------------------------

    async def _draft_window(self) -> tuple[list[EdgeStep], list[bytes], list[float]]:
        """Q's next window: N tokens, more while its text ends inside a character, fewer at a stop."""
        steps: list[EdgeStep] = []
        pieces: list[bytes] = []
        times: list[float] = []
        while self.committed + len(steps) < self.max_tokens:
            text = b"".join(pieces)
            if len(steps) >= self.policy.check_interval and complete_utf8(text) == len(text):
                break
            step = await self.in_pool(self.runner.step)
            steps.append(step)
            times.append(self.clock())
            if step.token_id in self.stops:
                pieces.append(b"")
                break
            pieces.append(self.g.tokenizer.piece(step.token_id))
        n_text = len(steps) - (1 if steps and steps[-1].token_id in self.stops else 0)
        self.text.own([s.token_id for s in steps[:n_text]], pieces[:n_text])
        return steps, pieces, times

    async def _windows(self) -> bool:
        while self.committed < self.max_tokens:
            if not self.text.ready:  # P's last token ended inside a character and P is gone
                await self.in_pool(self.text.force)  # Q takes those bytes as they are
            base = self.text.length
            steps, pieces, times = await self._draft_window()
            if not steps:
                return False
            offsets = base + np.concatenate([[0], np.cumsum([len(p) for p in pieces])])  # [n + 1]
            scores = None
            if self.session is not None:
                try:
                    views = [self._view(s, int(o)) for s, o in zip(steps, offsets, strict=False)]
                    await self.bounded(self.session.append_text_nowait(b"".join(pieces), views))
                    answer = await self.bounded(self.session.check(base, int(offsets[-1])))
                    scores = {int(sc.offset): sc for sc in answer.scores}
                    self.result.check_points += 1
                    self.result.checked_positions += len(steps)
                except (VerifierError, TimeoutError) as e:
                    self._fail(e)
            if scores is None:
                for s, piece, t in zip(steps, pieces, times, strict=True):
                    if await self._edge(s, piece, unchecked="unreachable", t=t):
                        return True
                continue
            kls = self._aligned_kls(steps, offsets, scores)  # [n], NaN where not aligned
            decision = self.core.decide_scores(kls).checked(len(steps))
            keep = decision.keep
            # A cut must leave whole characters to both sides' tokenizers.
            while decision.hand_over and keep > 0 and not _whole(b"".join(pieces[:keep])):
                keep -= 1
            self.core.on_committed(keep, 0)
            for j in range(keep):
                kl = None if np.isnan(kls[j]) else float(kls[j])
                if await self._edge(steps[j], pieces[j], kl=kl, checked=True, t=times[j]):
                    return True
            if not decision.hand_over:
                continue
            cut = int(offsets[keep])
            if keep < len(steps):
                await self.in_pool(self.text.cut, cut)
                try:
                    self.result.rollbacks += 1
                    await self.bounded(self.session.rollback(cut))  # type: ignore[union-attr]
                except (VerifierError, TimeoutError) as e:
                    self._fail(e)
                    continue
            if self.committed >= self.max_tokens:
                return False
            replaced = steps[keep].token_id if keep < len(steps) else None
            if await self._cloud_turn(self.core.turn_tokens(), replaced):
                return True
            if self.session is None:
                continue
        return False

    def _aligned_kls(
        self, steps: list[EdgeStep], offsets: np.ndarray, scores: dict[int, pb.PositionScore]
    ) -> np.ndarray:
        """KL over the shared vocabulary at each window position where P's tokens start at the same byte.

        Returns:
            [n] nats (a lower bound of KL(P_S || Q_S)), NaN where P has no token starting there.
        """
        kls = np.full(len(steps), np.nan)
        for j, s in enumerate(steps):
            sc = scores.get(int(offsets[j]))
            if sc is None:
                continue
            p_ids, p_lp = topk_from_proto(sc.topk)
            shared = self.g.alignment.q_to_p[s.topk_ids] >= 0  # [k]: the ids _view sent, in order
            p_at_q = np.full(s.topk_ids.size, -np.inf)  # [k]
            if len(sc.logprobs_at_edge_topk) == int(shared.sum()):
                p_at_q[shared] = sc.logprobs_at_edge_topk
            kls[j] = intersection_kl(
                p_ids[None], p_lp[None], s.topk_ids[None], s.topk_logprobs[None], self.g.alignment,
                p_logprobs_at_q_ids=p_at_q[None], concept_of=self.g.concept_of,
            )[0]  # fmt: skip
        return kls

    def _view(self, step: EdgeStep, offset: int) -> pb.EdgeToken:
        """Q's top-k at a byte offset, the ids P also has, in P's vocabulary (AppendText.views)."""
        ids = self.g.alignment.q_to_p[step.topk_ids]
        view = pb.EdgeToken(position=offset, has_distribution=True)
        view.topk.ids.extend(int(i) for i in ids[ids >= 0])
        return view


def _whole(data: bytes) -> bool:
    return complete_utf8(data) == len(data)
