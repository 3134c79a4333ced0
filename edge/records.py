"""What a generation leaves behind: one TokenRecord per committed token, the GenerationResult, the trace.

A trace file is JSONL (write_trace): a "generation" record (settings, TRACE_VERSION), one "token"
record per TokenRecord, a "summary" record. edge/simulation/traces.py reads it back.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Literal

import numpy as np

__all__ = ["TRACE_VERSION", "GenerationResult", "OnToken", "Source", "TokenRecord", "Unchecked"]

# "ensembled": a token the edge placed itself, the argmax of an ensemble of P's and Q's views where
# they lacked consensus (the safe policy); P generated nothing for it.
Source = Literal["edge", "cloud", "corrected", "ensembled"]
# Why an edge token was committed without P's check: "by_design" (a gating policy did not send it for
# checking; P still received it) or "unreachable" (the cloud was gone or too slow).
Unchecked = Literal["by_design", "unreachable"]
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
    unchecked: Unchecked | None = None  # an edge token committed without P's check: why (None: checked)
    gate_score: float | None = None  # gated policies: the router's score of this position (higher: check)
    expert: str | None = None  # a mixture of experts: the expert that drafted it ("mixture": weighted)
    # The token's bytes when token_id is not one of Q's (P's own tokens across tokenizers,
    # edge/cross.py); None: Q's vocabulary spells it. Not in traces (`text` is).
    raw: bytes | None = None


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
    unsent_checks: int = 0  # defer_checks: flagged drafts dropped before their check was sent
    cloud_failures: int = 0  # times the cloud was found unreachable or too slow
    resyncs: int = 0  # sessions reopened with the committed text
    servers: list[str] = field(default_factory=list)  # server_id of each session opened, in order
    resync_reused_tokens: int = 0  # of those sessions' prompts, tokens the cloud kept cached (no re-prefill)
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
    checked_positions: int = 0  # edge positions P scored: answered check-point windows, verified drafts
    rollbacks: int = 0  # Rollback requests sent to the cloud
    # The cloud's compute for this generation, as its replies reported it (compute_s, summed by
    # edge/link.py): seconds of forward passes, a batched pass shared by tokens fed. 0 for edge-only.
    cloud_compute_s: float = 0.0

    def accounting(self) -> dict[str, Any]:
        """The cloud's share, each part on its own (what a cloud bill and a latency budget depend on).

        Returns:
            override_tokens: P's token replaced Q's (source "corrected");
            other_cloud_tokens: every other token P generated (handoff runs, seed and bonus tokens);
            ensembled_tokens: the edge replaced Q's token by the ensemble's argmax (safe; P's views
                decided it, P generated nothing);
            checked_positions: edge positions P scored (they cost P a forward each, kept or not);
            round_trips: requests that waited for the cloud's reply (session opens and resyncs,
                check points, handoffs, rollbacks, drafts);
            bytes_up, bytes_down: on the wire, both ways;
            cloud_seconds: the cloud's compute seconds for this generation (its forward passes);
            gpu_seconds_per_1k_tokens: cloud_seconds per 1,000 committed tokens (None without
                tokens). The name says GPU because that is where the cloud runs; the figure is the
                cloud's compute seconds whatever its device (a CPU cloud's, in the CPU evaluation).
        """
        counts = self.counts()
        opens = (self.open_bytes is not None) + self.resyncs
        tokens = len(self.records)
        return {
            "override_tokens": counts["corrected"],
            "other_cloud_tokens": counts["cloud"],
            "ensembled_tokens": counts["ensembled"],
            "checked_positions": self.checked_positions,
            "round_trips": opens + self.check_points + self.handoffs + self.rollbacks + self.drafts,
            "bytes_up": self.bytes_sent,
            "bytes_down": self.bytes_received,
            "cloud_seconds": self.cloud_compute_s,
            "gpu_seconds_per_1k_tokens": 1000 * self.cloud_compute_s / tokens if tokens else None,
        }

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
        """Committed tokens by source, plus how many edge tokens P never checked, and why.

        unchecked = unchecked_by_design (a gating policy left them unchecked) + unchecked_unreachable.
        """
        out = {
            "edge": 0,
            "cloud": 0,
            "corrected": 0,
            "ensembled": 0,
            "unchecked": 0,
            "unchecked_by_design": 0,
        }
        for r in self.records:
            out[r.source] += 1
            if r.source == "edge" and not r.checked:
                out["unchecked"] += 1
                out["unchecked_by_design"] += r.unchecked == "by_design"
        out["unchecked_unreachable"] = out["unchecked"] - out["unchecked_by_design"]
        return out

    def mean_kl(self) -> float | None:
        """Mean top-k KL over the positions where both views were known."""
        kls = [r.kl for r in self.records if r.kl is not None]
        return float(np.mean(kls)) if kls else None

    def kept_disagreements(self) -> int:
        """Edge tokens P checked and would not have chosen (P's most likely token differed), kept all
        the same (a threshold under tau, or the router's override gate)."""
        return sum(
            1 for r in self.records
            if r.source == "edge" and r.checked and r.p_topk_ids and r.p_topk_ids[0] != r.token_id
        )  # fmt: skip

    def summary(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "tokens": len(self.records),
            "by_source": self.counts(),
            "check_points": self.check_points,
            "handoffs": self.handoffs,
            "handbacks_early": self.handbacks_early,
            "discarded_drafts": self.discarded_drafts,
            "unsent_checks": self.unsent_checks,
            "cloud_failures": self.cloud_failures,
            "resyncs": self.resyncs,
            "resync_reused_tokens": self.resync_reused_tokens,
            "servers": self.servers,
            "mean_kl": self.mean_kl(),
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "cloud_compute_s": self.cloud_compute_s,
            "open_bytes": self.open_bytes,
            "skipped_uploads": self.skipped_uploads,
            "kept_disagreements": self.kept_disagreements(),
            "drafts": self.drafts,
            **self.acceptance(),
            "accounting": self.accounting(),
            "seconds": self.seconds,
            "first_token_s": self.first_token_s,
            "stop_reason": self.stop_reason,
        }

    def answer_text(self, stop_ids: Iterable[int]) -> str:
        """The answer's text without the end-of-turn token ("<|im_end|>" is not part of an answer).

        Args:
            stop_ids: Q's end-of-generation ids. Only records without `raw` carry Q's ids: across
                tokenizers a P token's id may equal a Q stop id (P's "#" is SmolLM2's <|im_end|>).
        """
        stops = set(stop_ids)
        return "".join(r.text for r in self.records if not (r.raw is None and r.token_id in stops))

    def trace(self) -> list[dict]:
        return [{k: v for k, v in asdict(r).items() if k != "raw"} for r in self.records]

    def write_trace(self, f: IO[str], meta: dict[str, Any] | None = None) -> None:
        """JSONL: a "generation" record (settings), one "token" record per token, a "summary" record."""
        header = {"record": "generation", "version": TRACE_VERSION, "prompt_ids": self.prompt_ids}
        f.write(json.dumps(header | (meta or {})) + "\n")
        for r in self.trace():
            f.write(json.dumps({"record": "token"} | r) + "\n")
        f.write(json.dumps({"record": "summary"} | self.summary()) + "\n")


# Called with each token as it is committed, in order (may be async); returning True stops the generation.
OnToken = Callable[[TokenRecord], "Awaitable[bool | None] | bool | None"]
