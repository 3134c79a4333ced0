"""Recorded generations, as `handoff generate --trace` and `handoff eval` write them, turned into events.

A trace file is JSONL: per generation a "generation" record (its settings), one "token" record per
committed token (edge/controller.py TokenRecord), and a "summary" record. The simulator needs the
generation's structure, not its clock: which windows the edge drafted and how many of their tokens
were kept, where the cloud took over and for how many tokens. `events()` recovers that structure;
`window_bytes()` and its siblings rebuild the protocol messages of each event to size them exactly.

Gated (router) policies commit most edge tokens unchecked by design (`unchecked: "by_design"`,
still uploaded so that P's cache follows) and send single positions for checking (a checked record
with its own upload time); P's disagreement there shows as a "corrected" record in the checked
token's place. `events()` turns a run of by-design tokens into a Window with `by_design` set, and a
checked position into a one-token window. Under greedy decoding the edge commits P's top-1 there in
place (no handoff: no cloud token received, so the record's `t_received` is None): a one-token
window with `in_place` set; a correction with `t_received` was a rollback and a one-token handoff.
The safe policy (selective ensembling) cuts a window where the ensemble of P's and Q's views picks
another token, and the edge places that token itself ("ensembled" records): a cut window with
`placed` set, followed by no cloud turn (the Rollback and the token go up without waiting).
Records unchecked because the cloud was unreachable
(`unchecked: "unreachable"`, or older traces' unchecked records) keep their meaning.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from handoff.shared.wire import pb


@dataclass(frozen=True)
class Generation:
    """One recorded generation: its settings, its token records, its summary."""

    meta: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any]
    source: str = ""  # file:line, for messages

    @property
    def mode(self) -> str:
        return str(self.summary.get("mode", "hybrid"))

    @property
    def policy(self) -> dict[str, Any]:
        return dict(self.meta.get("policy") or {})

    @property
    def prompt_len(self) -> int:
        return len(self.meta.get("prompt_ids") or [])

    @property
    def max_tokens(self) -> int | None:
        value = self.meta.get("max_tokens")
        return int(value) if value is not None else None

    @property
    def run(self) -> str:
        """The eval run it belongs to ("small", "large", "hybrid-tau0.3-n8"), else its mode."""
        return str(self.meta.get("run") or self.mode)

    @property
    def greedy(self) -> bool:
        return float((self.meta.get("sampling") or {}).get("temperature") or 0.0) == 0.0

    @property
    def gated(self) -> bool:
        """A hybrid generation with edge tokens left unchecked by design (a gating policy)."""
        return self.mode == "hybrid" and any(r.get("unchecked") == "by_design" for r in self.records)

    @property
    def full(self) -> bool:
        """Both models' views at every position: the policy can be replayed offline on it."""
        return bool(self.records) and all(
            r.get("q_topk_ids") and r.get("p_topk_ids") and r.get("kl") is not None for r in self.records
        )


def read_traces(path: Path) -> list[Generation]:
    """Every generation in a trace file (JSONL, or JSONL.gz).

    Raises:
        ValueError: a file that is not a trace, naming the file and line.
    """
    out: list[Generation] = []
    meta: dict[str, Any] | None = None
    records: list[dict[str, Any]] = []
    start = 0
    opener = gzip.open if path.suffix == ".gz" else open  # traces kept in docs/ are gzipped
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: not JSON") from None
            kind = rec.get("record") if isinstance(rec, dict) else None
            if kind == "generation":
                meta, records, start = rec, [], n
            elif kind == "token":
                if meta is None:
                    raise ValueError(f"{path}:{n}: a token record before any generation record")
                records.append(rec)
            elif kind == "summary":
                if meta is None:
                    raise ValueError(f"{path}:{n}: a summary record before any generation record")
                out.append(Generation(meta, records, rec, f"{path}:{start}"))
                meta = None
            else:
                raise ValueError(f"{path}:{n}: not a trace record (no 'record': generation|token|summary)")
    if meta is not None:
        raise ValueError(f"{path}:{start}: a generation without its summary record (cut short?)")
    return out


# -- structure ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """Edge tokens drafted, uploaded and checked together."""

    first: int  # the position of its first token
    drafted: int  # tokens the edge drafted (and uploaded) for it
    kept: int  # tokens committed from it
    cut: bool  # the cloud took over at position first + kept (a handover)
    checked: bool = True  # False: committed unchecked (the cloud was unreachable, or by design)
    records: tuple[dict[str, Any], ...] = field(default=(), repr=False)
    # The record at the cut position (the cloud's correction, with Q's view there): it sizes the
    # uploaded tokens that were dropped and are not in the trace.
    dropped: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    # Unchecked by design (a gating policy): uploaded, never waited for, committed as drafted.
    by_design: bool = False
    # Its one token is P's top-1, committed in place of the edge's (gated, greedy): no handoff; the
    # edge sends a Rollback and the token without waiting (records[0] is the corrected record).
    in_place: bool = False
    # The token the edge placed at the cut itself (safe: an "ensembled" record), sent like in_place.
    placed: dict[str, Any] | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class CloudTurn:
    """Tokens the cloud generated in one handoff (the first corrects the edge after a cut)."""

    first: int
    tokens: int
    corrected: bool
    records: tuple[dict[str, Any], ...] = field(default=(), repr=False)


Event = Window | CloudTurn


def _check_state(r: dict[str, Any]) -> tuple[bool, bool]:
    """(checked, unchecked by design): records in one window share it."""
    return bool(r.get("checked")), r.get("unchecked") == "by_design"


def in_place(r: dict[str, Any] | None, gated: bool) -> bool:
    """Whether a record is a gated correction committed in place (no cloud token was received).

    Args:
        r: a token record, or None.
        gated: the record belongs to a gated generation.

    Returns:
        True for a "corrected" record without `t_received` in a gated generation.
    """
    return gated and r is not None and r["source"] == "corrected" and r.get("t_received") is None


def events(gen: Generation) -> list[Event]:
    """The windows and cloud turns of a recorded generation, in order.

    A window's drafted size is not recorded when it was cut (only its kept tokens are committed):
    it is the check interval, bounded by max_tokens, as the controller drafts it. In a gated
    generation a check point covers the positions the policy chose (a cut one drafted to its cut),
    and a run of tokens unchecked by design is never cut: a correction after it answers a one-token
    check point whose token P replaced (corrected in place: that check point's window keeps it).
    """
    recs = gen.records
    n_check = int(gen.policy.get("check_interval") or 8)
    budget = gen.max_tokens
    gated = gen.gated
    out: list[Event] = []
    i = 0
    while i < len(recs):
        r = recs[i]
        if r["source"] == "edge":
            j = i + 1
            while (
                j < len(recs)
                and recs[j]["source"] == "edge"
                and j - i < n_check
                and recs[j].get("t_uploaded") == r.get("t_uploaded")
                and _check_state(recs[j]) == _check_state(r)
            ):
                j += 1
            nxt = recs[j] if j < len(recs) else None
            # A correction in place is a check point of its own, not a cut of this window.
            following = None if nxt is None or in_place(nxt, gated) else nxt["source"]
            by_design = gated and _check_state(r)[1]
            drafted = j - i
            if following == "ensembled":
                out.append(_placed_window(r["position"], j - i, tuple(recs[i:j]), nxt, n_check, budget, i))
                i = j + 1
                continue
            if following == "corrected" and not by_design:
                if gated:  # the gated check point ended at the position P replaced
                    drafted = j - i + 1
                else:  # rollback: the window went on past the cut
                    drafted = n_check if budget is None else max(j - i + 1, min(n_check, budget - i))
            # Followed by cloud tokens: a handover (seed policy: the whole window is kept).
            cut = following in ("corrected", "cloud") and not by_design
            dropped = recs[j] if following == "corrected" and not by_design else None
            out.append(
                Window(r["position"], drafted, j - i, cut, bool(r.get("checked")), tuple(recs[i:j]), dropped,
                       by_design=by_design)
            )  # fmt: skip
            i = j
            continue
        if in_place(r, gated):
            out.append(Window(r["position"], 1, 1, False, True, (r,), in_place=True))
            i += 1
            continue
        if r["source"] == "ensembled":  # placed at a window's first position: none of it was kept
            out.append(_placed_window(r["position"], 0, (), r, n_check, budget, i))
            i += 1
            continue
        corrected = r["source"] == "corrected"
        if corrected and not (out and isinstance(out[-1], Window) and out[-1].cut):
            # Cut at the window's first position: nothing of it was kept (gated: a one-token check).
            drafted = 1 if gated else n_check if budget is None else max(1, min(n_check, budget - i))
            out.append(Window(r["position"], drafted, 0, True, True, (), r))
        j = i + 1
        while j < len(recs) and recs[j]["source"] == "cloud":
            j += 1
        out.append(CloudTurn(r["position"], j - i, corrected, tuple(recs[i:j])))
        i = j
    return out


def _placed_window(
    first: int, kept: int, records: tuple, placed: dict[str, Any], n_check: int, budget: int | None, i: int
) -> Window:
    """A window cut where the edge placed its own token (records: the kept ones; i: the first's index)."""
    drafted = n_check if budget is None else max(kept + 1, min(n_check, budget - i))
    return Window(first, drafted, kept, True, True, records, placed, placed=placed)


# -- message sizes -------------------------------------------------------------------------------


def _topk(ids: Any, logprobs: Any) -> pb.TopK:
    return pb.TopK(ids=[int(x) for x in ids or []], logprobs=[float(x) for x in logprobs or []])


def _skipped(r: dict[str, Any]) -> bool:
    """P scored the position but no KL exists: the edge uploaded the id without its view (skip policy)."""
    return r.get("source") == "edge" and r.get("p_topk_ids") is not None and r.get("kl") is None


def _edge_token(r: dict[str, Any], greedy: bool) -> pb.EdgeToken:
    if _skipped(r):
        return pb.EdgeToken(position=int(r["position"]), token_id=int(r["token_id"]))
    return pb.EdgeToken(
        position=int(r["position"]),
        token_id=int(r["token_id"]),
        topk=_topk(r.get("q_topk_ids"), r.get("q_topk_logprobs")),
        has_distribution=True,
        # Greedy: the token has probability 1 under the distribution it was drawn from (log 0, not
        # serialized); sampled: a nonzero float, whose size does not depend on its value.
        sampled_logprob=0.0 if greedy else -1.0,
    )


def _score(r: dict[str, Any], k: int) -> pb.PositionScore:
    return pb.PositionScore(
        position=int(r["position"]),
        topk=_topk(r.get("p_topk_ids"), r.get("p_topk_logprobs")),
        logprobs_at_edge_topk=[]
        if _skipped(r)
        else [-1.0] * k,  # fixed32 each: values do not change the size
        token_logprob=float(r.get("p_logprob") or -1.0),
    )


# A typical nonzero compute_s: a double is 8 bytes on the wire whatever its value (0 is not sent).
COMPUTE_S = 0.0125


@dataclass(frozen=True)
class WindowBytes:
    up: int  # AppendTokens + CheckPoint
    down: int  # Appended + CheckPointResult


def window_bytes(
    records: list[dict[str, Any]], k: int, request_id: int = 1000, *, greedy: bool = True
) -> WindowBytes:
    """The serialized sizes of one window's messages, each way, built from its token records.

    Args:
        records: the window's tokens (position, token_id, Q's and P's top-k views).
        k: the top-k size (P's scores carry P's log-probabilities at Q's k ids).
        request_id: a typical request id (a varint: its size depends on the value).
        greedy: the tokens were picked greedily (their sampled log-probability is 0: not sent).
    """
    if not records:
        return WindowBytes(0, 0)
    first, last = int(records[0]["position"]), int(records[-1]["position"])
    append = pb.EdgeMessage(
        request_id=request_id, append=pb.AppendTokens(tokens=[_edge_token(r, greedy) for r in records])
    )
    check = pb.EdgeMessage(
        request_id=request_id + 1, check=pb.CheckPoint(from_position=first, through_position=last)
    )
    appended = pb.CloudMessage(request_id=request_id, appended=pb.Appended(length=last + 1))
    result = pb.CloudMessage(
        request_id=request_id + 1,
        check=pb.CheckPointResult(
            scores=[_score(r, k) for r in records], forward_ms=12.5, batch_size=1, compute_s=COMPUTE_S
        ),
    )
    return WindowBytes(append.ByteSize() + check.ByteSize(), appended.ByteSize() + result.ByteSize())


def append_bytes(records: list[dict[str, Any]], request_id: int = 1000) -> WindowBytes:
    """An upload that asks for no check (tokens unchecked by design) and its acknowledgement.

    The tokens are sized as ids only: P never scores them, so Q's view has no use there.
    """
    if not records:
        return WindowBytes(0, 0)
    tokens = [pb.EdgeToken(position=int(r["position"]), token_id=int(r["token_id"])) for r in records]
    append = pb.EdgeMessage(request_id=request_id, append=pb.AppendTokens(tokens=tokens))
    appended = pb.CloudMessage(
        request_id=request_id, appended=pb.Appended(length=int(records[-1]["position"]) + 1)
    )
    return WindowBytes(append.ByteSize(), appended.ByteSize())


def cloud_token_bytes(r: dict[str, Any], request_id: int = 1000) -> int:
    """One streamed CloudToken message."""
    return pb.CloudMessage(
        request_id=request_id,
        token=pb.CloudToken(
            position=int(r["position"]),
            token_id=int(r["token_id"]),
            topk=_topk(r.get("p_topk_ids"), r.get("p_topk_logprobs")),
            token_logprob=float(r.get("p_logprob") or -1.0),
        ),
    ).ByteSize()


def control_bytes(position: int, request_id: int = 1000) -> dict[str, int]:
    """The small control messages: handoff/done, rollback/rolled back, close/closed."""
    m = pb.EdgeMessage
    c = pb.CloudMessage
    return {
        "handoff_up": m(request_id=request_id, handoff=pb.Handoff(max_tokens=16)).ByteSize(),
        "handoff_down": c(
            request_id=request_id,
            handoff_done=pb.HandoffDone(
                reason=pb.HandoffDone.REASON_MAX_TOKENS, length=position, compute_s=COMPUTE_S
            ),
        ).ByteSize(),
        "rollback_up": m(request_id=request_id, rollback=pb.Rollback(length=position)).ByteSize(),
        "rollback_down": c(request_id=request_id, rolled_back=pb.RolledBack(length=position)).ByteSize(),
        "close_up": m(request_id=request_id, close=pb.Close()).ByteSize(),
        "close_down": c(
            request_id=request_id, closed=pb.Closed(tokens_scored=position, compute_s=COMPUTE_S)
        ).ByteSize(),
    }


def in_place_bytes(r: dict[str, Any], request_id: int = 1000) -> WindowBytes:
    """A correction in place: the Rollback and the AppendTokens of P's token (a bare id), and their acks.

    Args:
        r: the corrected record (its position and P's token).
        request_id: a typical request id.

    Returns:
        Both messages' sizes up, and the RolledBack and Appended replies' down.
    """
    position = int(r["position"])
    c = control_bytes(position, request_id)
    b = append_bytes([r], request_id + 1)
    return WindowBytes(c["rollback_up"] + b.up, c["rollback_down"] + b.down)


def padded(w: Window) -> list[dict[str, Any]]:
    """A window's uploaded tokens: the kept ones, then the dropped ones (not recorded) sized like the last."""
    if w.in_place:  # the check point uploaded the edge's token, which P's replaced
        r = w.records[0]
        replaced = r.get("replaced_token_id")
        return [r | {"token_id": r["token_id"] if replaced is None else replaced}]
    recs = list(w.records)
    if len(recs) < w.drafted:
        pad = w.dropped or (recs[-1] if recs else {"position": w.first, "token_id": 0})
        recs += [pad] * (w.drafted - len(recs))
    return recs


def open_bytes(gen: Generation) -> tuple[int, int]:
    """The session's OpenSession and SessionOpened sizes (they carry the vocabulary fingerprint).

    Recorded in the summary (or, replayed, in meta); for older traces, what the summary's byte
    counts leave over once every other message is rebuilt from the records.
    """
    for recorded in (gen.meta.get("open_bytes"), gen.summary.get("open_bytes")):
        if recorded:
            return int(recorded[0]), int(recorded[1])
    sent, received = int(gen.summary.get("bytes_sent") or 0), int(gen.summary.get("bytes_received") or 0)
    if not sent:
        return 0, 0
    k = int(gen.policy.get("top_k") or 20)
    up = down = 0
    for ev in events(gen):
        if isinstance(ev, Window):
            if ev.by_design or ev.checked:
                b = (
                    append_bytes(list(ev.records))
                    if ev.by_design
                    else window_bytes(padded(ev), k, greedy=gen.greedy)
                )
                up, down = up + b.up, down + b.down
            if ev.in_place:
                b = in_place_bytes(ev.records[0])
                up, down = up + b.up, down + b.down
        else:
            c = control_bytes(ev.first)
            up += c["handoff_up"]
            down += sum(cloud_token_bytes(r) for r in ev.records) + c["handoff_down"]
    c = control_bytes(0)
    return max(0, sent - up - c["close_up"]), max(0, received - down - c["close_down"])


def verify_bytes(
    records: list[dict[str, Any]], drafted: int, k: int, next_rec: dict[str, Any] | None
) -> tuple[int, int]:
    """The exact policy's VerifyDraft (drafted tokens and their distributions) and VerifyResult sizes."""
    pad = records[-1] if records else (next_rec or {"position": 0, "token_id": 0})
    recs = (records + [pad] * drafted)[:drafted]
    draft = [pb.EdgeToken(position=int(r["position"]), token_id=int(r["token_id"])) for r in recs]
    dists = [
        _topk(r.get("q_topk_ids") or [0] * k, [-1.0] * len(r.get("q_topk_ids") or [0] * k)) for r in recs
    ]
    up = pb.EdgeMessage(
        request_id=1000, verify=pb.VerifyDraft(draft=draft, draft_distributions=dists)
    ).ByteSize()
    result = pb.VerifyResult(
        accepted=len(records), length=int(pad["position"]) + 1, bonus=True, compute_s=COMPUTE_S
    )
    if next_rec is not None:
        result.next.CopyFrom(
            pb.CloudToken(
                position=int(next_rec["position"]), token_id=int(next_rec["token_id"]),
                topk=_topk(next_rec.get("p_topk_ids"), next_rec.get("p_topk_logprobs")),
                token_logprob=float(next_rec.get("p_logprob") or -1.0),
            )
        )  # fmt: skip
    return up, pb.CloudMessage(request_id=1000, verified=result).ByteSize()


def iter_generations(paths: list[Path]) -> Iterator[Generation]:
    for path in paths:
        yield from read_traces(path)
