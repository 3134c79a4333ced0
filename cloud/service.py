"""The verifier: sessions with live KV caches of P, check points, handoff generation, rollback.

Transport-free: `VerifierService.session()` consumes EdgeMessages and yields CloudMessages, raising
VerifierError with a gRPC status code name on bad input. The gRPC servicer (cloud/grpc_server.py)
and the in-process transport (edge/verifier_client.py) both drive it.

Positions. The prompt occupies [0, prompt_len); P's distribution "at position p" is computed from
tokens [0, p). A session keeps its tokens and `fed`, the number of tokens in the backend's KV cache.
The row for position p comes out of the forward pass that feeds token p-1, so a check point over
[from, through] feeds tokens [fed, through) and keeps the last through-from+1 rows. Invariant:
fed <= next_unchecked - 1, so the rows a check point needs were never computed before; at open, all
prompt tokens but the last are prefilled. A gated policy's check point may start past next_unchecked
(CheckPoint.skip_unchecked): the positions in between are committed unchecked by design.

Compute. Every reply that follows forward passes (SessionOpened, CheckPointResult, HandoffDone,
VerifyResult) carries `compute_s`, this session's share of those passes (cloud/scheduler.py splits a
batched pass by the tokens each session fed), and Closed carries the session's total, so that the
edge can account for the cloud's compute without asking.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from handoff.cloud import text_session
from handoff.cloud.backend import Backend, ForwardItem
from handoff.cloud.metrics import CloudMetrics
from handoff.cloud.resume import RetainedSequences
from handoff.cloud.scheduler import BatchScheduler, Forwarded
from handoff.cloud.settings import CloudSettings
from handoff.cloud.text_session import TextSide
from handoff.shared.constraints import ConstraintError, ConstraintState, RowAdjust
from handoff.shared.errors import (
    CapacityError,
    HandoffError,
    ShapeError,
    VerifierError,
    VocabularyMismatch,
)
from handoff.shared.llama_cpp_model import GGUFTokenizer, gguf_tokenizer
from handoff.shared.sampling import SamplingSettings, sample_token
from handoff.shared.speculative import target_distribution, verify_draft
from handoff.shared.vocab import Vocabulary, check_compatible
from handoff.shared.wire import (
    PROTOCOL_VERSION,
    constraint_from_proto,
    fingerprint_from_proto,
    fingerprint_to_proto,
    pb,
    topk_to_proto,
)

logger = logging.getLogger(__name__)

# Largest token-hash range served by one GetInfo call.
MAX_TOKEN_HASHES = 4096
# Largest token-piece range served by one GetInfo call (~0.4 MB of Qwen2.5's pieces).
MAX_TOKEN_PIECES = 65536
SUPPORTED_POLICIES = (pb.POLICY_KIND_SEED, pb.POLICY_KIND_ROLLBACK, pb.POLICY_KIND_EXACT)


@dataclass
class _Session:
    id: str
    seq: object
    tokens: list[int]
    prompt_len: int
    k: int
    sampling: SamplingSettings
    rng: np.random.Generator
    stop_ids: frozenset[int]
    fed: int = 0
    next_unchecked: int = 0
    # Q's top-k ids at edge positions that carried a distribution: position -> [k] ids.
    edge_topk: dict[int, np.ndarray] = field(default_factory=dict)
    last_active: float = field(default_factory=time.monotonic)
    expired: bool = False  # set by the idle reaper
    inbox: asyncio.Queue | None = None  # the session loop's request queue, for the reaper to wake it
    scored: int = 0
    generated: int = 0
    compute_s: float = 0.0  # this session's share of every forward pass so far
    reused: int = 0  # prompt tokens taken from a broken session's kept cache
    # The completion's constraint (None: unconstrained), in step with tokens[completion_start:], and
    # the adjustment of each appended position not checked yet: position -> RowAdjust.
    constraint: ConstraintState | None = None
    completion_start: int = 0
    rows: dict[int, RowAdjust] = field(default_factory=dict)
    # A text-aligned session's completion (cloud/text_session.py); None: a session in token ids.
    text: TextSide | None = None

    def row(self) -> RowAdjust | None:
        """The constraint's adjustment of the next position (None when unconstrained)."""
        return None if self.constraint is None else self.constraint.row()


class _Stop:
    """StopGeneration bookkeeping: a stop applies to the last handoff read before it.

    The reader sees a stop as soon as it arrives, even while a handoff is generating; counting
    handoffs on both sides keeps a stop that arrives early from hitting a later handoff.
    """

    def __init__(self) -> None:
        self.handoffs_read = 0  # handoff requests the reader has seen
        self.stopped_through = 0  # the last handoff (by count) a stop was sent for
        self.handoffs_served = 0

    def requested(self) -> bool:
        return self.stopped_through >= self.handoffs_served


def limits_proto(s: CloudSettings, max_context: int) -> pb.Limits:
    """The limits a verifier announces in GetInfo, from its settings and its effective context."""
    return pb.Limits(
        max_sessions=s.max_sessions,
        max_context=max_context,
        max_message_bytes=s.max_message_bytes,
        max_top_k=s.max_top_k,
        max_tokens_per_append=s.max_tokens_per_append,
        max_handoff_tokens=s.max_handoff_tokens,
        session_idle_timeout_s=int(s.session_idle_timeout_s),
    )


class VerifierService:
    """Sessions over one backend; many run concurrently and share batched forward passes."""

    def __init__(
        self, backend: Backend, settings: CloudSettings, metrics: CloudMetrics | None = None
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = metrics or CloudMetrics()
        self.scheduler = BatchScheduler(
            backend,
            self.metrics,
            max_queue=settings.max_queue,
            max_batch_items=settings.max_batch_items,
            max_batch_tokens=settings.max_batch_tokens,
            batch_wait_s=settings.batch_wait_s,
            open_sessions=lambda: len(self._sessions),
        )
        self.vocabulary: Vocabulary = backend.vocabulary
        self.vocab_size = backend.info.vocab_size
        self.max_context = min(settings.max_context, backend.info.context_length or settings.max_context)
        self._sessions: dict[str, _Session] = {}
        self._reaper: asyncio.Task | None = None
        self._retained = RetainedSequences(settings.resume_sessions, settings.resume_ttl_s)
        self._tokenizers: dict[tuple[int, ...], object] = {}  # the grammar engine's, by stop ids
        self.server_id = settings.server_id or f"{socket.gethostname()}/{os.getpid()}"

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        # P's tokenizer (text sessions, token pieces) is loaded now, off the event loop, not at the
        # first GetInfo on it.
        await asyncio.to_thread(self._text_tokenizer)
        self.scheduler.start()
        self._reaper = asyncio.get_running_loop().create_task(self._reap_idle(), name="session-reaper")

    async def stop(self) -> None:
        if self._reaper:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        await self._free(self._retained.drain())
        await self.scheduler.stop()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    async def _reap_idle(self) -> None:
        timeout = self.settings.session_idle_timeout_s
        while True:
            await asyncio.sleep(min(timeout / 4, 5.0))
            now = time.monotonic()
            await self._free(self._retained.expired(now))
            for s in list(self._sessions.values()):
                if now - s.last_active > timeout and not s.expired:
                    logger.info("session %s idle for %.0f s: closing it", s.id, now - s.last_active)
                    s.expired = True
                    if s.inbox is not None:
                        s.inbox.put_nowait(None)  # wakes the session's loop, which ends it

    # -- GetInfo -------------------------------------------------------------------------------

    def limits(self) -> pb.Limits:
        return limits_proto(self.settings, self.max_context)

    def get_info(self, request: pb.GetInfoRequest | None = None) -> pb.ServiceInfo:
        info = self.backend.info
        reply = pb.ServiceInfo(
            protocol_version=PROTOCOL_VERSION,
            model_id=info.model_id,
            model_name=info.model_name,
            architecture=info.architecture,
            parameter_count=info.parameter_count,
            quantization=info.quantization,
            context_length=info.context_length,
            vocab_size=info.vocab_size,
            vocab=fingerprint_to_proto(self.vocabulary.fingerprint),
            limits=self.limits(),
            backend=info.backend,
            device=info.device,
            dtype=info.dtype,
            policies=list(SUPPORTED_POLICIES),
            deterministic=bool(getattr(self.backend, "deterministic", False)),
            constraints=True,
        )
        tokenizer = self._text_tokenizer()
        if tokenizer is not None:
            reply.text_sessions = True
            reply.stop_token_ids.extend(tokenizer.stop_token_ids)
        if request is not None and request.HasField("token_hashes"):
            start, end = request.token_hashes.start, request.token_hashes.end
            if not 0 <= start <= end <= len(self.vocabulary) or end - start > MAX_TOKEN_HASHES:
                raise VerifierError(
                    "INVALID_ARGUMENT",
                    f"token hash range [{start}, {end}) must lie in [0, {len(self.vocabulary)}) "
                    f"and span at most {MAX_TOKEN_HASHES} ids",
                )
            reply.token_hash_start = start
            reply.token_hashes.extend(self.vocabulary.token_hashes(start, end).tolist())
        if request is not None and request.HasField("token_pieces"):
            start, end = request.token_pieces.start, request.token_pieces.end
            pieces = self._token_pieces()
            if not 0 <= start <= end <= len(pieces) or end - start > MAX_TOKEN_PIECES:
                raise VerifierError(
                    "INVALID_ARGUMENT",
                    f"token piece range [{start}, {end}) must lie in [0, {len(pieces)}) "
                    f"and span at most {MAX_TOKEN_PIECES} ids",
                )
            reply.token_piece_start = start
            reply.token_pieces.extend(p or b"" for p in pieces[start:end])
        return reply

    def _text_tokenizer(self) -> GGUFTokenizer | None:
        """P's tokenizer for text-aligned sessions (loaded once), None when the backend has no GGUF."""
        ref = self.backend.model_ref
        if ref is None or ref.kind != "gguf":
            return None
        return gguf_tokenizer(ref.path)

    def _token_pieces(self) -> list[bytes | None]:
        """Each token's bytes (None: special), read once from the model's GGUF (its tokenizer's)."""
        tokenizer = self._text_tokenizer()
        if tokenizer is None:
            raise VerifierError("FAILED_PRECONDITION", "this backend has no GGUF vocabulary to serve")
        return tokenizer.text_pieces()

    # -- sessions ------------------------------------------------------------------------------

    async def session(self, inbox: AsyncIterator[pb.EdgeMessage]) -> AsyncIterator[pb.CloudMessage]:
        """Serve one session: read requests in order, answer each; the session dies with the stream.

        Raises:
            VerifierError: a request was invalid or a limit was reached; the session is closed.
        """
        queue: asyncio.Queue = asyncio.Queue()
        stop = _Stop()
        reader = asyncio.create_task(self._read(inbox, queue, stop))
        session: _Session | None = None
        reason = "error"
        try:
            while True:
                msg = await queue.get()
                if msg is None:  # the edge half-closed, or the reaper expired the session
                    if session is not None and session.expired:
                        reason = "expired"
                        raise VerifierError(
                            "DEADLINE_EXCEEDED",
                            f"session {session.id} was idle for more than {self.settings.session_idle_timeout_s:g} s",
                        )
                    reason = "half-closed"
                    return
                if isinstance(msg, BaseException):
                    # Reading failed: the connection broke or the client cancelled. Which of this and the
                    # handler's own cancellation comes first is a race; both mean the client went away.
                    # A VerifierError here is a message the transport could not parse: the client's error.
                    reason = "error" if isinstance(msg, VerifierError) else "cancelled"
                    raise msg
                kind = msg.WhichOneof("body")
                if session is None and kind != "open":
                    raise VerifierError(
                        "FAILED_PRECONDITION", f"the first message must be `open`, got `{kind}`"
                    )
                try:
                    if kind == "open":
                        if session is not None:
                            raise VerifierError("FAILED_PRECONDITION", "the session is already open")
                        session = await self._open(msg.open)
                        session.inbox = queue
                        yield pb.CloudMessage(
                            request_id=msg.request_id,
                            opened=pb.SessionOpened(
                                session_id=session.id,
                                length=len(session.tokens),
                                info=self.get_info(),
                                compute_s=session.compute_s,  # the prefill: nothing else ran yet
                                reused_tokens=session.reused,
                                server_id=self.server_id,
                            ),
                        )
                    elif kind == "close":
                        reason = "closed"
                        yield pb.CloudMessage(
                            request_id=msg.request_id,
                            closed=pb.Closed(
                                tokens_scored=session.scored,
                                tokens_generated=session.generated,
                                compute_s=session.compute_s,
                            ),
                        )
                        return
                    else:
                        session.last_active = time.monotonic()
                        async for reply in self._dispatch(session, kind, msg, stop):
                            yield reply
                        session.last_active = time.monotonic()
                    self.metrics.requests.labels(kind, "OK").inc()
                except VerifierError as e:
                    self.metrics.requests.labels(kind, e.code).inc()
                    raise
        except (asyncio.CancelledError, GeneratorExit):
            # The client went away: cancelled while awaiting its next message, or closed (aclose)
            # while this generator waited at a yield for the transport to take a reply.
            reason = "cancelled"
            raise
        finally:
            reader.cancel()
            if session is not None:
                await self._release(session, reason)

    async def _read(self, inbox: AsyncIterator[pb.EdgeMessage], queue: asyncio.Queue, stop: _Stop) -> None:
        try:
            async for msg in inbox:
                kind = msg.WhichOneof("body")
                if kind == "handoff":
                    stop.handoffs_read += 1
                elif kind == "stop":
                    stop.stopped_through = stop.handoffs_read  # seen at once, even mid-handoff
                queue.put_nowait(msg)
            queue.put_nowait(None)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # transport error: hand it to the session loop
            queue.put_nowait(e)

    async def _release(self, session: _Session, reason: str) -> None:
        self._sessions.pop(session.id, None)
        self.metrics.sessions.set(len(self._sessions))
        self.metrics.sessions_closed.labels(reason).inc()
        if reason in ("cancelled", "half-closed"):  # ended without a Close: its edge may resynchronise
            await self._free(self._retained.put(session.seq, session.tokens[: session.fed]))
        else:
            await self._free([session.seq])
        logger.info(
            "session %s ended (%s): %d scored, %d generated",
            session.id,
            reason,
            session.scored,
            session.generated,
        )

    async def _free(self, seqs: list[object]) -> None:
        for seq in seqs:
            try:
                await asyncio.shield(self.scheduler.call(self.backend.release, seq))
            except Exception as e:  # the service is stopping; nothing to keep
                logger.debug("release of a sequence: %s", e)

    async def _new_sequence(self, prompt: list[int]) -> tuple[object, int]:
        """A sequence for a new session: a broken session's kept cache sharing the prompt's longest
        prefix (cut to it; returns how many tokens it holds), else a new one, evicting kept caches for room.
        """
        hit = self._retained.take(prompt[:-1])  # the open prefills all but the prompt's last token
        if hit is not None:
            seq, matched = hit
            try:
                await self.scheduler.call(self.backend.truncate, seq, matched)
                return seq, matched
            except Exception as e:
                logger.info("a kept cache could not be reused (%s): prefilling", e)
                await self._free([seq])
        try:
            return await self._making_room(lambda: self.scheduler.call(self.backend.new_sequence)), 0
        except CapacityError as e:
            raise VerifierError("RESOURCE_EXHAUSTED", str(e)) from None

    async def _making_room(self, attempt):
        """await attempt(); while the backend is full, kept caches give way (oldest first) and it is retried.

        Raises:
            CapacityError: still full with no kept cache left.
        """
        while True:
            try:
                return await attempt()
            except CapacityError:
                oldest = self._retained.pop_oldest()
                if oldest is None:
                    raise
                await self._free([oldest])

    async def _open(self, req: pb.OpenSession) -> _Session:
        if req.protocol_version and req.protocol_version != PROTOCOL_VERSION:
            raise VerifierError(
                "FAILED_PRECONDITION",
                f"protocol {req.protocol_version!r} is not served here ({PROTOCOL_VERSION})",
            )
        if not req.HasField("vocab"):
            raise VerifierError("INVALID_ARGUMENT", "open: the edge's vocabulary fingerprint is missing")
        side, prompt = await self._text_open(req) if req.prompt_text else (None, list(req.prompt_token_ids))
        if side is None:
            try:
                check_compatible(
                    self.vocabulary, fingerprint_from_proto(req.vocab), remote_name="the edge model"
                )
            except VocabularyMismatch as e:
                raise VerifierError("FAILED_PRECONDITION", f"vocabulary mismatch: {e}") from None
        if not prompt:
            raise VerifierError("INVALID_ARGUMENT", "open: the prompt is empty")
        self._check_ids(prompt, "prompt_token_ids")
        if len(prompt) >= self.max_context:
            raise VerifierError(
                "RESOURCE_EXHAUSTED",
                f"the prompt has {len(prompt)} tokens; the context limit is {self.max_context}",
            )
        k = req.top_k or 20
        if not 1 <= k <= min(self.settings.max_top_k, self.vocab_size):
            raise VerifierError("INVALID_ARGUMENT", f"top_k={k} is outside [1, {self.settings.max_top_k}]")
        sampling = self._sampling(req.sampling)
        if req.policy.kind not in (pb.POLICY_KIND_UNSPECIFIED, *SUPPORTED_POLICIES):
            raise VerifierError(
                "FAILED_PRECONDITION",
                f"policy {pb.PolicyKind.Name(req.policy.kind)} is not supported by this server",
            )
        if len(self._sessions) >= self.settings.max_sessions:
            raise VerifierError(
                "RESOURCE_EXHAUSTED",
                f"the service is full ({self.settings.max_sessions} sessions); retry later",
            )
        constraint = await self._constraint(req, prompt)
        seq, reused = await self._new_sequence(prompt)
        session = _Session(
            id=uuid.uuid4().hex[:16],
            seq=seq,
            tokens=prompt,
            prompt_len=len(prompt),
            k=k,
            sampling=sampling,
            rng=sampling.rng(),
            stop_ids=frozenset(
                req.sampling.stop_token_ids if side is None else side.tokenizer.stop_token_ids
            ),
            next_unchecked=len(prompt),
            fed=reused,
            reused=reused,
            constraint=constraint,
            completion_start=req.constraint.completion_start if constraint is not None else 0,
            text=side,
        )
        self._sessions[session.id] = session
        self.metrics.sessions.set(len(self._sessions))
        self.metrics.sessions_opened.inc()
        try:
            await self._forward(session, session.tokens[reused : session.prompt_len - 1], n_out=0)
        except BaseException:
            await self._release(session, "error")
            raise
        self.metrics.resumed_tokens.inc(reused)
        logger.info(
            "session %s opened: %d prompt tokens (%d from a kept cache), k=%d",
            session.id,
            session.prompt_len,
            reused,
            k,
        )
        return session

    async def _text_open(self, req: pb.OpenSession) -> tuple[TextSide, list[int]]:
        """A text-aligned session's completion and P's tokens of its prompt text."""
        tokenizer = self._text_tokenizer()
        if tokenizer is None:
            raise VerifierError("FAILED_PRECONDITION", "this backend serves no text-aligned sessions")
        if req.prompt_token_ids:
            raise VerifierError("INVALID_ARGUMENT", "open: give prompt_text or prompt_token_ids, not both")
        if req.HasField("constraint"):
            raise VerifierError("FAILED_PRECONDITION", "constraints are not served in text-aligned sessions")
        prompt = await asyncio.to_thread(text_session.prompt_tokens, tokenizer, bytes(req.prompt_text))
        return text_session.text_side(tokenizer, len(prompt)), prompt

    async def _constraint(self, req: pb.OpenSession, prompt: list[int]) -> ConstraintState | None:
        """The session's constraint, with the completion's tokens already in the prompt replayed into it."""
        if not req.HasField("constraint"):
            return None
        try:
            constraint, start = constraint_from_proto(req.constraint)
            constraint.check_ids(self.vocab_size)
        except ConstraintError as e:
            raise VerifierError("INVALID_ARGUMENT", f"constraint: {e}") from None
        if not constraint.active:
            return None
        if not 1 <= start <= len(prompt):
            raise VerifierError(
                "INVALID_ARGUMENT",
                f"constraint: completion_start={start} must be within the prompt [1, {len(prompt)}]",
            )
        stops = tuple(sorted(req.sampling.stop_token_ids))

        def build() -> ConstraintState:  # compiling a grammar may take a while: off the event loop
            tokenizer = None
            if constraint.grammar:
                if stops not in self._tokenizers:
                    self._tokenizers[stops] = self.backend.grammar_tokenizer(stops)
                tokenizer = self._tokenizers[stops]
            state = ConstraintState(constraint, tokenizer)
            state.extend(prompt[start:])
            return state

        try:
            return await asyncio.to_thread(build)
        except (ConstraintError, HandoffError) as e:
            raise VerifierError("INVALID_ARGUMENT", f"constraint: {e}") from None

    def _sampling(self, msg: pb.SamplingParams) -> SamplingSettings:
        try:
            return SamplingSettings(
                temperature=msg.temperature,
                top_p=msg.top_p if 0.0 < msg.top_p <= 1.0 else 1.0,
                top_k=msg.top_k,
                seed=msg.seed if msg.has_seed else None,
            )
        except ShapeError as e:
            raise VerifierError("INVALID_ARGUMENT", f"sampling: {e}") from None

    def _check_ids(self, ids, what: str) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise VerifierError(
                "INVALID_ARGUMENT", f"{what}: token ids outside [0, {self.vocab_size}): {bad[:5].tolist()}"
            )

    async def _forward(self, session: _Session, tokens: list[int], n_out: int, **kw) -> Forwarded:
        """Feed tokens to the session's cache through the batch scheduler."""
        item = ForwardItem(session.seq, tokens, n_out=n_out, k=session.k, **kw)
        try:
            result = await self._making_room(lambda: self.scheduler.forward(item))
        except CapacityError as e:
            raise VerifierError("RESOURCE_EXHAUSTED", str(e)) from None
        except ShapeError as e:
            raise VerifierError("INVALID_ARGUMENT", str(e)) from None
        session.fed += len(tokens)
        session.compute_s += result.share_s
        self.metrics.compute_seconds.inc(result.share_s)
        return result

    # -- requests ------------------------------------------------------------------------------

    async def _dispatch(self, s: _Session, kind: str, msg: pb.EdgeMessage, stop: _Stop):
        rid = msg.request_id
        if s.text is not None:
            async for reply in self._dispatch_text(s, kind, msg, stop):
                yield reply
            return
        if kind == "append_text":
            raise VerifierError("FAILED_PRECONDITION", "append_text: this session is in token ids, not text")
        if kind == "append":
            self._append(s, msg.append)
            yield pb.CloudMessage(request_id=rid, appended=pb.Appended(length=len(s.tokens)))
        elif kind == "check":
            yield pb.CloudMessage(request_id=rid, check=await self._check(s, msg.check))
        elif kind == "handoff":
            stop.handoffs_served += 1
            async for reply in self._handoff(s, msg.handoff, rid, stop):
                yield reply
        elif kind == "stop":
            pass  # acted on by the reader; after the handoff it was for, nothing is left to do
        elif kind == "rollback":
            await self._rollback(s, msg.rollback.length)
            yield pb.CloudMessage(request_id=rid, rolled_back=pb.RolledBack(length=len(s.tokens)))
        elif kind == "verify":
            yield pb.CloudMessage(request_id=rid, verified=await self._verify(s, msg.verify))
        else:
            raise VerifierError("INVALID_ARGUMENT", f"unknown request `{kind}`")

    async def _dispatch_text(self, s: _Session, kind: str, msg: pb.EdgeMessage, stop: _Stop):
        """A text-aligned session's requests (cloud/text_session.py)."""
        rid = msg.request_id
        if kind == "append_text":
            yield pb.CloudMessage(
                request_id=rid, appended=await text_session.append_text(self, s, msg.append_text)
            )
        elif kind == "check":
            yield pb.CloudMessage(request_id=rid, check=await text_session.check(self, s, msg.check))
        elif kind == "handoff":
            stop.handoffs_served += 1
            async for reply in text_session.handoff(self, s, msg.handoff, rid, stop):
                yield reply
        elif kind == "stop":
            pass
        elif kind == "rollback":
            reply = await text_session.rollback(self, s, msg.rollback.length)
            yield pb.CloudMessage(request_id=rid, rolled_back=reply)
        elif kind == "verify":
            yield pb.CloudMessage(request_id=rid, verified=await text_session.verify(self, s, msg.verify))
        else:
            raise VerifierError("INVALID_ARGUMENT", f"`{kind}` is not a request of a text-aligned session")

    def _append(self, s: _Session, req: pb.AppendTokens) -> None:
        n = len(req.tokens)
        if n == 0:
            return
        if n > self.settings.max_tokens_per_append:
            raise VerifierError(
                "INVALID_ARGUMENT",
                f"append of {n} tokens exceeds max_tokens_per_append={self.settings.max_tokens_per_append}",
            )
        if len(s.tokens) + n > self.max_context:
            raise VerifierError(
                "RESOURCE_EXHAUSTED",
                f"session would hold {len(s.tokens) + n} tokens; the context limit is {self.max_context}",
            )
        ids, topks = [], {}
        for j, t in enumerate(req.tokens):
            expected = len(s.tokens) + j
            if t.position != expected:
                raise VerifierError(
                    "INVALID_ARGUMENT",
                    f"append: token {j} is at position {t.position}, expected {expected} (positions are contiguous)",
                )
            ids.append(t.token_id)
            if t.has_distribution:
                q_ids = np.asarray(t.topk.ids, dtype=np.int64)
                if (
                    q_ids.size == 0
                    or q_ids.size != len(t.topk.logprobs)
                    or q_ids.size > self.settings.max_top_k
                ):
                    raise VerifierError(
                        "INVALID_ARGUMENT",
                        f"append: position {t.position} has a malformed top-k view ({q_ids.size} ids, "
                        f"{len(t.topk.logprobs)} log-probabilities, at most {self.settings.max_top_k})",
                    )
                self._check_ids(q_ids, f"append: top-k ids at position {t.position}")
                topks[t.position] = q_ids
        self._check_ids(ids, "append: token_id")
        s.rows.update(self._constrain(s, ids, "append"))
        s.tokens.extend(ids)
        s.edge_topk.update(topks)
        self.metrics.tokens_appended.inc(n)

    def _constrain(self, s: _Session, ids: list[int], what: str) -> dict[int, RowAdjust]:
        """Feed tokens about to follow the session's end to its constraint; their positions' rows.

        Raises:
            VerifierError: INVALID_ARGUMENT if the constraint forbids one (nothing is fed then).
        """
        if s.constraint is None:
            return {}
        try:
            rows = s.constraint.extend(ids)
        except ConstraintError as e:
            raise VerifierError("INVALID_ARGUMENT", f"{what}: {e}") from None
        return dict(enumerate(rows, start=len(s.tokens)))

    async def _check(self, s: _Session, req: pb.CheckPoint) -> pb.CheckPointResult:
        first, last = req.from_position, req.through_position
        if first != s.next_unchecked and not (req.skip_unchecked and first > s.next_unchecked):
            raise VerifierError(
                "INVALID_ARGUMENT",
                f"check point from position {first}: positions are checked in order, the next is {s.next_unchecked}",
            )
        if not first <= last < len(s.tokens):
            raise VerifierError(
                "INVALID_ARGUMENT",
                f"check point [{first}, {last}] is not within the appended positions [{first}, {len(s.tokens)})",
            )
        positions = range(first, last + 1)
        gather = [[s.tokens[p], *s.edge_topk.get(p, ())] for p in positions]
        adjust = [s.rows.get(p) for p in positions] if s.constraint is not None else None
        for p in [p for p in s.rows if p <= last]:  # checked now, or skipped unchecked by design
            del s.rows[p]
        done = await self._forward(
            s, s.tokens[s.fed : last], n_out=len(positions), gather=gather, adjust=adjust
        )
        out = done.output
        scores = []
        for j, p in enumerate(positions):
            g = out.gathered[j]
            scores.append(
                pb.PositionScore(
                    position=p,
                    topk=topk_to_proto(out.topk_ids[j], out.topk_logprobs[j]),
                    logprobs_at_edge_topk=g[1:].astype(np.float32).tolist(),
                    token_logprob=float(g[0]),
                )
            )
            s.edge_topk.pop(p, None)
        s.next_unchecked = last + 1
        s.scored += len(scores)
        self.metrics.tokens_scored.inc(len(scores))
        return pb.CheckPointResult(
            scores=scores,
            forward_ms=done.seconds * 1000.0,
            batch_size=done.batch_items,
            compute_s=done.share_s,
        )

    async def _handoff(self, s: _Session, req: pb.Handoff, rid: int, stop: _Stop):
        limit = min(req.max_tokens or self.settings.max_handoff_tokens, self.settings.max_handoff_tokens)
        if s.next_unchecked != len(s.tokens):
            raise VerifierError(
                "FAILED_PRECONDITION",
                f"handoff with unchecked edge tokens at [{s.next_unchecked}, {len(s.tokens)}): check or roll them back first",
            )
        # A text session's check point over the text's end fed every token: the first row needs the last.
        await self._rows_from(s, len(s.tokens))
        reason = pb.HandoffDone.REASON_MAX_TOKENS
        compute = 0.0
        for _ in range(limit):
            if stop.requested():
                reason = pb.HandoffDone.REASON_STOPPED
                break
            if len(s.tokens) >= self.max_context:
                reason = pb.HandoffDone.REASON_CONTEXT_FULL
                break
            row = s.row()
            done = await self._forward(
                s, s.tokens[s.fed :], n_out=1, full_last=True, adjust=None if row is None else [row]
            )
            compute += done.share_s
            out, lp = done.output, done.output.last_logprobs
            token = sample_token(lp, s.sampling, s.sampling.rng_for(len(s.tokens), s.rng))
            position = len(s.tokens)
            self._constrain(s, [token], "handoff")
            s.tokens.append(token)
            s.next_unchecked = len(s.tokens)
            s.generated += 1
            s.last_active = time.monotonic()
            self.metrics.tokens_generated.inc()
            yield pb.CloudMessage(
                request_id=rid,
                token=pb.CloudToken(
                    position=position,
                    token_id=token,
                    topk=topk_to_proto(out.topk_ids[0], out.topk_logprobs[0]),
                    token_logprob=float(lp[token]),
                ),
            )
            if token in s.stop_ids:
                reason = pb.HandoffDone.REASON_STOP_TOKEN
                break
        yield pb.CloudMessage(
            request_id=rid,
            handoff_done=pb.HandoffDone(reason=reason, length=len(s.tokens), compute_s=compute),
        )

    async def _verify(self, s: _Session, req: pb.VerifyDraft) -> pb.VerifyResult:
        """Speculative sampling over the network: accept a prefix of the edge's draft, add one token.

        Leviathan et al. 2023 / Chen et al. 2023 (shared/speculative.py): the tokens that stand are
        distributed exactly as P's own sampling under the session's settings.
        """
        gamma = len(req.draft)
        start = len(s.tokens)
        if gamma == 0 or gamma > self.settings.max_tokens_per_append:
            raise VerifierError(
                "INVALID_ARGUMENT",
                f"verify: a draft of {gamma} tokens (1 to max_tokens_per_append={self.settings.max_tokens_per_append})",
            )
        if len(req.draft_distributions) != gamma:
            raise VerifierError(
                "INVALID_ARGUMENT",
                f"verify: {gamma} draft tokens but {len(req.draft_distributions)} distributions",
            )
        if s.next_unchecked != start:
            raise VerifierError(
                "FAILED_PRECONDITION",
                f"verify with unchecked edge tokens at [{s.next_unchecked}, {start}): check or roll them back first",
            )
        if start + gamma + 1 > self.max_context:
            raise VerifierError(
                "RESOURCE_EXHAUSTED",
                f"session would hold {start + gamma + 1} tokens; the context limit is {self.max_context}",
            )
        draft = []
        for j, t in enumerate(req.draft):
            if t.position != start + j:
                raise VerifierError(
                    "INVALID_ARGUMENT",
                    f"verify: draft token {j} is at position {t.position}, expected {start + j} (contiguous from the end)",
                )
            draft.append(t.token_id)
        self._check_ids(draft, "verify: draft token_id")
        k = max(len(d.ids) for d in req.draft_distributions)
        if (
            k == 0
            or k > self.settings.max_top_k
            or any(len(d.ids) != len(d.logprobs) for d in req.draft_distributions)
        ):
            raise VerifierError("INVALID_ARGUMENT", "verify: malformed draft distributions")
        q_ids = np.zeros((gamma, k), dtype=np.int64)
        q_probs = np.zeros((gamma, k))
        for j, d in enumerate(req.draft_distributions):
            self._check_ids(d.ids, f"verify: distribution ids at draft position {j}")
            q_ids[j, : len(d.ids)] = d.ids
            q_probs[j, : len(d.ids)] = np.exp(np.asarray(d.logprobs, dtype=np.float64))
        rows = self._constrain(s, draft, "verify")
        adjust = None if s.constraint is None else [*rows.values(), s.row()]
        await self._rows_from(s, start)
        s.tokens.extend(draft)
        try:
            done = await self._forward(s, s.tokens[s.fed :], n_out=gamma + 1, full_rows=True, adjust=adjust)
            out = done.output
            assert out.full_logprobs is not None
            p_probs = np.stack([target_distribution(row, s.sampling) for row in out.full_logprobs])
            rngs = [s.sampling.rng_for(start + j, s.rng, stream=1) for j in range(gamma + 1)]
            verdict = verify_draft(np.asarray(draft), q_ids, q_probs, p_probs, rngs)
        except ShapeError as e:
            await self._rollback(s, start)
            raise VerifierError("INVALID_ARGUMENT", f"verify: {e}") from None
        except BaseException:
            await self._rollback(s, start)
            raise
        accepted = verdict.accepted
        # A stop token the edge drafted and P accepted ends the generation there.
        stop_at = next((j for j in range(accepted) if draft[j] in s.stop_ids), None)
        await self._rollback(s, start + (accepted if stop_at is None else stop_at + 1))
        s.scored += gamma
        self.metrics.tokens_scored.inc(gamma)
        s.last_active = time.monotonic()
        if stop_at is not None:
            s.next_unchecked = len(s.tokens)
            return pb.VerifyResult(
                accepted=stop_at + 1, bonus=False, length=len(s.tokens), compute_s=done.share_s
            )
        token = verdict.next_token
        self._constrain(s, [token], "verify")
        s.tokens.append(token)
        s.next_unchecked = len(s.tokens)
        s.generated += 1
        self.metrics.tokens_generated.inc()
        return pb.VerifyResult(
            accepted=accepted,
            next=pb.CloudToken(
                position=start + accepted,
                token_id=token,
                topk=topk_to_proto(out.topk_ids[accepted], out.topk_logprobs[accepted]),
                token_logprob=float(out.full_logprobs[accepted][token]),
            ),
            bonus=verdict.bonus,
            length=len(s.tokens),
            compute_s=done.share_s,
        )

    async def _rollback(self, s: _Session, length: int) -> None:
        if not s.prompt_len <= length <= len(s.tokens):
            raise VerifierError(
                "INVALID_ARGUMENT",
                f"rollback to {length} tokens: must be within [{s.prompt_len}, {len(s.tokens)}]",
            )
        del s.tokens[length:]
        for p in [p for p in s.edge_topk if p >= length]:
            del s.edge_topk[p]
        for p in [p for p in s.rows if p >= length]:
            del s.rows[p]
        if s.constraint is not None:
            s.constraint.truncate(length - s.completion_start)
        s.next_unchecked = min(s.next_unchecked, length)
        await self._rows_from(s, length)

    async def _rows_from(self, s: _Session, position: int) -> None:
        """Let the next forward pass compute P's row at `position`: the row comes out of the pass that
        feeds token position-1, so a cache that holds it already forgets it (it is fed again)."""
        if s.fed > position - 1:
            await self.scheduler.call(self.backend.truncate, s.seq, position - 1)
            s.fed = position - 1
