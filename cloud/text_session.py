"""Text-aligned sessions: an edge whose tokenizer is not P's writes text, P keeps its own tokens of it.

The edge opens with the prompt as text (`OpenSession.prompt_text`); the cloud tokenizes it with P's
tokenizer. The completion is then text (shared/retokenize.TextTokens): text the edge appends is
re-tokenised only at the unsettled tail, and each change (keep the first `keep` of P's completion
tokens, add these) is applied to the session's tokens and KV cache. Every length and position on the
wire is a byte offset into the completion's text, so the edge never needs P's tokenizer:

- a check point over bytes [from, through] settles the text and returns P's views at every P token
  that starts in that range (PositionScore.offset says where);
- a handoff settles the text and lets P write its own tokens, each sent with its bytes;
- a rollback cuts the text; P's tokens that lay wholly inside the kept text stay cached;
- a verify (token-level intersection drafts, Timor et al., ICML 2025) takes P's ids at byte offsets
  after the settled text and runs the service's speculative sampling unchanged, so the output is
  distributed exactly as P's own sampling.

The service (cloud/service.py) routes a text session's requests here; the functions reuse its
forward passes, rollbacks, handoff generation and verification.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from handoff.shared.errors import VerifierError
from handoff.shared.llama_cpp_model import GGUFTokenizer
from handoff.shared.retokenize import Change, TextTokens
from handoff.shared.wire import pb, topk_to_proto

if TYPE_CHECKING:
    from handoff.cloud.service import VerifierService, _Session, _Stop


@dataclass
class TextSide:
    """A text session's completion: P's tokens of its text (after the prompt's prompt_len tokens)."""

    tokens: TextTokens
    prompt_len: int
    tokenizer: GGUFTokenizer
    # Q's top-k ids in P's vocabulary at byte offsets where Q's tokens start: offset -> [m] ids.
    views: dict[int, list[int]] = field(default_factory=dict)

    def forget(self, length: int) -> None:
        """Drop Q's views at or past byte `length` (the text there is cut)."""
        for o in [o for o in self.views if o >= length]:
            del self.views[o]

    @property
    def length(self) -> int:
        """Bytes of completion text."""
        return len(self.tokens.text)


def text_side(tokenizer: GGUFTokenizer, prompt_len: int) -> TextSide:
    return TextSide(TextTokens(tokenizer.tokenize, tokenizer.detokenize), prompt_len, tokenizer)


def prompt_tokens(tokenizer: GGUFTokenizer, text: bytes) -> list[int]:
    """P's tokens of a text session's prompt (special markers read as their tokens).

    Raises:
        VerifierError: INVALID_ARGUMENT when the prompt is not UTF-8 text.
    """
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise VerifierError("INVALID_ARGUMENT", f"open: prompt_text is not UTF-8 ({e})") from None
    return tokenizer.tokenize(text, special=True)


async def _apply(svc: VerifierService, s: _Session, change: Change) -> None:
    """Make the session's tokens P's tokens of the text again after a TextTokens change."""
    side = s.text
    assert side is not None
    keep = side.prompt_len + change.keep
    if len(s.tokens) > keep:
        await svc._rollback(s, keep)
    if len(s.tokens) + len(change.added) > svc.max_context:
        raise VerifierError(
            "RESOURCE_EXHAUSTED",
            f"session would hold {len(s.tokens) + len(change.added)} tokens; the context limit is {svc.max_context}",
        )
    s.tokens.extend(change.added)
    s.next_unchecked = len(s.tokens)
    svc.metrics.tokens_appended.inc(len(change.added))


async def settle(svc: VerifierService, s: _Session, what: str, *, whole: bool = False) -> None:
    """Tokenise the pending tail too; `whole`: refuse text that ends inside a UTF-8 character."""
    assert s.text is not None
    await _apply(svc, s, s.text.tokens.extend(b"", settle=True))
    if whole and s.text.tokens.pending:
        raise VerifierError(
            "FAILED_PRECONDITION",
            f"{what}: the completion's text ends inside a UTF-8 character; send the rest of it first",
        )


async def append_text(svc: VerifierService, s: _Session, req: pb.AppendText) -> pb.Appended:
    side = s.text
    assert side is not None
    data = bytes(req.text)  # any bytes: what is not UTF-8 is tokenised as byte tokens
    before = len(side.tokens.text)
    views = {}
    for v in req.views:
        if not before <= v.position <= before + len(data) or len(v.topk.ids) > svc.settings.max_top_k:
            raise VerifierError(
                "INVALID_ARGUMENT",
                f"append_text: a view at byte {v.position} (at most {svc.settings.max_top_k} ids, within "
                f"[{before}, {before + len(data)}])",
            )
        svc._check_ids(v.topk.ids, f"append_text: view ids at byte {v.position}")
        views[v.position] = list(v.topk.ids)
    change = side.tokens.extend(data)
    try:
        await _apply(svc, s, change)
    except VerifierError:
        await _apply(svc, s, side.tokens.truncate(before))  # nothing of a refused append stays
        raise
    side.views.update(views)
    return pb.Appended(length=side.length)


async def check(svc: VerifierService, s: _Session, req: pb.CheckPoint) -> pb.CheckPointResult:
    """P's views at every P token that starts at a byte offset in [from, through] of the completion."""
    side = s.text
    assert side is not None
    lo, hi = req.from_position, req.through_position
    if not lo <= hi <= side.length:
        raise VerifierError(
            "INVALID_ARGUMENT",
            f"check point over bytes [{lo}, {hi}] is not within the completion's {side.length} bytes",
        )
    await settle(svc, s, "check point")
    starts = side.tokens.starts()  # [n + 1]: P's completion positions' offsets, then the end's
    chosen = [i for i, o in enumerate(starts) if lo <= o <= hi]
    if not chosen:
        return pb.CheckPointResult()
    first, last = side.prompt_len + chosen[0], side.prompt_len + chosen[-1]
    await svc._rows_from(s, first)
    positions = range(first, last + 1)
    # Per row: P at Q's ids (where Q's view starts at the same byte), then at P's own token.
    at = [side.views.get(starts[p - side.prompt_len], []) for p in positions]
    gather = [a + ([s.tokens[p]] if p < len(s.tokens) else []) for a, p in zip(at, positions, strict=True)]
    done = await svc._forward(s, s.tokens[s.fed : last], n_out=len(positions), gather=gather)
    out = done.output
    scores = []
    for j, p in enumerate(positions):
        g, m = out.gathered[j], len(at[j])
        assert g is not None
        scores.append(
            pb.PositionScore(
                position=p,
                topk=topk_to_proto(out.topk_ids[j], out.topk_logprobs[j]),
                logprobs_at_edge_topk=g[:m].astype(np.float32).tolist(),
                token_logprob=float(g[m]) if g.size > m else 0.0,
                offset=starts[p - side.prompt_len],
            )
        )
    s.scored += len(scores)
    svc.metrics.tokens_scored.inc(len(scores))
    return pb.CheckPointResult(
        scores=scores, forward_ms=done.seconds * 1000.0, batch_size=done.batch_items, compute_s=done.share_s
    )


async def handoff(svc: VerifierService, s: _Session, req: pb.Handoff, rid: int, stop: _Stop):
    """P writes its own tokens after the text (the service's handoff), each sent with its bytes."""
    side = s.text
    assert side is not None
    await settle(svc, s, "handoff", whole=True)
    async for reply in svc._handoff(s, req, rid, stop):
        if reply.HasField("token"):
            piece = side.tokenizer.piece(reply.token.token_id)
            side.tokens.append_tokens([reply.token.token_id], [piece])
            reply.token.text = piece
        elif reply.HasField("handoff_done"):
            reply.handoff_done.length = side.length
        yield reply


async def rollback(svc: VerifierService, s: _Session, length: int) -> pb.RolledBack:
    side = s.text
    assert side is not None
    if not 0 <= length <= side.length:
        raise VerifierError(
            "INVALID_ARGUMENT", f"rollback to {length} bytes: must be within [0, {side.length}]"
        )
    await _apply(svc, s, side.tokens.truncate(length))
    side.forget(length)
    return pb.RolledBack(length=side.length)


async def verify(svc: VerifierService, s: _Session, req: pb.VerifyDraft) -> pb.VerifyResult:
    """Speculative sampling over P's ids drafted after the settled text (TLI drafts)."""
    side = s.text
    assert side is not None
    await settle(svc, s, "verify", whole=True)
    offset, start = side.length, len(s.tokens)
    pieces = []
    draft = pb.VerifyDraft()
    draft.CopyFrom(req)
    for j, t in enumerate(draft.draft):
        if t.position != offset:
            raise VerifierError(
                "INVALID_ARGUMENT",
                f"verify: draft token {j} starts at byte {t.position}, expected {offset} (contiguous from the text's end)",
            )
        if not 0 <= t.token_id < svc.vocab_size:
            raise VerifierError(
                "INVALID_ARGUMENT", f"verify: draft token_id {t.token_id} is not a P token id"
            )
        pieces.append(side.tokenizer.piece(t.token_id))
        offset += len(pieces[-1])
        t.position = start + j  # P's positions, for the service's verification
    result = await svc._verify(s, draft)
    ids = s.tokens[start:]
    stood = pieces[: min(result.accepted, len(ids))]
    if result.HasField("next"):
        result.next.text = side.tokenizer.piece(result.next.token_id)
        stood.append(bytes(result.next.text))
    side.tokens.append_tokens(ids, stood)
    result.length = side.length
    return result
