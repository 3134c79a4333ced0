"""The handoff controller: Q drafts on the edge, P checks at check points, generation moves between them.

Policies (DESIGN.md):
- seed: the cloud generates the first N0 tokens; then the edge generates windows of N tokens; at
  each check point, when the window's divergence (max or mean of the per-position top-k KL) exceeds
  tau, the window is kept and the cloud generates the next M tokens (handoff), then the edge takes
  over again (hand-back).
- rollback: as seed, but the window is cut at its first position over tau: the edge's tokens from
  there are dropped and the cloud generates from that position (its first token there "corrects"
  the edge). Tokens are committed to the caller only once checked.

This first version checks synchronously (the edge waits for each check point's answer). Still to
come (issue 4): drafting while a check point is in flight, the cloud-unreachable fallback with
resynchronisation, hand-back once the models agree again, and the CLI.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np

from edge.runner import EdgeRunner, EdgeStep
from edge.verifier_client import RemoteSession, VerifierClient
from shared.divergence import AGGREGATIONS, aggregate, first_over, topk_kl
from shared.errors import ShapeError
from shared.sampling import SamplingSettings
from shared.vocab import Vocabulary
from shared.wire import pb, topk_from_proto, topk_to_proto

logger = logging.getLogger(__name__)

Source = Literal["edge", "cloud", "corrected"]
# Float32 views on the wire are exact to ~1e-7: see topk_kl's rest_margin.
WIRE_REST_MARGIN = 1e-5


@dataclass(frozen=True)
class PolicyConfig:
    """Constants of a handoff policy."""

    kind: Literal["seed", "rollback"] = "rollback"
    seed_tokens: int = 0  # N0: tokens the cloud generates first
    check_interval: int = 8  # N: edge tokens per check point
    threshold: float = 0.5  # tau, nats, on the top-k KL (a lower bound of the full KL)
    aggregation: str = "max"  # over a window: "max" or "mean"
    handback_tokens: int = 8  # M: cloud tokens per handoff
    top_k: int = 20

    def __post_init__(self) -> None:
        if self.kind not in ("seed", "rollback"):
            raise ShapeError(f"policy kind must be seed or rollback, got {self.kind!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ShapeError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if self.check_interval < 1 or self.handback_tokens < 1 or self.top_k < 1 or self.seed_tokens < 0:
            raise ShapeError("check_interval, handback_tokens and top_k must be >= 1, seed_tokens >= 0")

    def to_proto(self) -> pb.Policy:
        kind = pb.POLICY_KIND_SEED if self.kind == "seed" else pb.POLICY_KIND_ROLLBACK
        return pb.Policy(
            kind=kind,
            check_interval=self.check_interval,
            threshold=self.threshold,
            aggregation=self.aggregation,
            handback_tokens=self.handback_tokens,
            seed_tokens=self.seed_tokens,
        )


@dataclass
class TokenRecord:
    """One committed token, as the trace records it."""

    position: int
    token_id: int
    source: Source
    kl: float | None = None  # top-k KL(P || Q) at this position, when checked with Q's view
    q_entropy: float | None = None
    q_topk_ids: list[int] | None = None
    q_topk_logprobs: list[float] | None = None
    t_generated: float = 0.0  # seconds since the start of the generation
    t_checked: float | None = None


@dataclass
class GenerationResult:
    """What generate() produced."""

    prompt_ids: list[int]
    records: list[TokenRecord] = field(default_factory=list)
    check_points: int = 0
    handoffs: int = 0
    stop_reason: str = ""
    seconds: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def tokens(self) -> list[int]:
        return [r.token_id for r in self.records]

    def counts(self) -> dict[str, int]:
        out = {"edge": 0, "cloud": 0, "corrected": 0}
        for r in self.records:
            out[r.source] += 1
        return out

    def mean_kl(self) -> float | None:
        kls = [r.kl for r in self.records if r.kl is not None]
        return float(np.mean(kls)) if kls else None

    def trace(self) -> list[dict]:
        return [asdict(r) for r in self.records]


def window_kl(steps: Sequence[EdgeStep], scores: Sequence[pb.PositionScore]) -> np.ndarray:
    """Top-k KL(P || Q) at each position of a window, from Q's views and the cloud's answer.

    Returns:
        [n] nats, each a lower bound of the full-vocabulary KL.
    """
    if len(steps) != len(scores) or any(
        s.position != sc.position for s, sc in zip(steps, scores, strict=True)
    ):
        raise ShapeError("the check point's answer does not cover the window's positions")
    out = np.empty(len(steps))
    for j, (st, sc) in enumerate(zip(steps, scores, strict=True)):
        p_ids, p_lp = topk_from_proto(sc.topk)
        p_at_q = np.asarray(sc.logprobs_at_edge_topk, dtype=np.float64)
        out[j] = topk_kl(
            p_ids[None],
            p_lp[None],
            st.topk_ids[None],
            st.topk_logprobs[None],
            p_at_q[None],
            rest_margin=WIRE_REST_MARGIN,
        )[0]
    return out


def _edge_token(step: EdgeStep) -> pb.EdgeToken:
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
        seed=s.seed or 0,
        has_seed=s.seed is not None,
        stop_token_ids=sorted(stop_ids),
    )


class HybridGenerator:
    """Generates with Q on the edge and P in the cloud under a PolicyConfig."""

    def __init__(
        self, runner: EdgeRunner, client: VerifierClient, vocabulary: Vocabulary, policy: PolicyConfig
    ) -> None:
        self.runner = runner
        self.client = client
        self.vocabulary = vocabulary
        self.policy = policy

    async def generate(self, prompt_ids: Sequence[int], max_tokens: int) -> GenerationResult:
        """Generate up to max_tokens tokens after the prompt; stops at an end-of-turn token."""
        start = time.perf_counter()
        clock = lambda: time.perf_counter() - start  # noqa: E731 - a tiny local timer
        result = GenerationResult(prompt_ids=list(prompt_ids))
        stops = self.runner.stop_token_ids
        session = await self.client.open_session(
            prompt_ids,
            self.vocabulary,
            top_k=self.policy.top_k,
            sampling=sampling_to_proto(self.runner.sampling, stops),
            policy=self.policy.to_proto(),
        )
        try:
            self.runner.start(list(prompt_ids))
            done = False
            if self.policy.seed_tokens:
                done = await self._cloud_turn(
                    session, min(self.policy.seed_tokens, max_tokens), result, clock, None
                )
            while not done and len(result.records) < max_tokens:
                done = await self._edge_window(session, max_tokens, result, clock)
            result.stop_reason = result.stop_reason or ("stop_token" if done else "max_tokens")
        finally:
            result.bytes_sent, result.bytes_received = session.bytes_sent, session.bytes_received
            await session.close()
        result.seconds = clock()
        return result

    async def _edge_window(
        self, session: RemoteSession, max_tokens: int, result: GenerationResult, clock
    ) -> bool:
        """Draft up to N tokens with Q, check them, commit or hand over. Returns True at a stop token."""
        policy, stops = self.policy, self.runner.stop_token_ids
        steps: list[EdgeStep] = []
        times: list[float] = []
        for _ in range(min(policy.check_interval, max_tokens - len(result.records))):
            steps.append(self.runner.step())
            times.append(clock())
            if steps[-1].token_id in stops:
                break
        await session.append_nowait([_edge_token(s) for s in steps])
        answer = await session.check(steps[0].position, steps[-1].position)
        checked = clock()
        result.check_points += 1
        kls = window_kl(steps, answer.scores)
        over = aggregate(kls, policy.aggregation) > policy.threshold
        keep = len(steps)
        if over and policy.kind == "rollback":
            keep = first_over(kls, policy.threshold)
            keep = 0 if keep is None else keep  # mean over tau with no single position over: cut the window
        for j in range(keep):
            s = steps[j]
            result.records.append(
                TokenRecord(
                    position=s.position,
                    token_id=s.token_id,
                    source="edge",
                    kl=float(kls[j]),
                    q_entropy=s.entropy,
                    q_topk_ids=s.topk_ids.tolist(),
                    q_topk_logprobs=s.topk_logprobs.tolist(),
                    t_generated=times[j],
                    t_checked=checked,
                )
            )
        if keep < len(steps):  # rollback: forget the edge's tokens from the first offending one
            cut = steps[keep].position
            await session.rollback(cut)
            self.runner.truncate(cut)
        elif steps[-1].token_id in stops:
            return True
        if not over:
            return False
        room = max_tokens - len(result.records)
        if room <= 0:
            return False
        corrected = steps[keep] if keep < len(steps) else None
        return await self._cloud_turn(session, min(policy.handback_tokens, room), result, clock, corrected)

    async def _cloud_turn(
        self, session: RemoteSession, n: int, result: GenerationResult, clock, corrected: EdgeStep | None
    ) -> bool:
        """The cloud generates n tokens; the edge appends them to its context. True at a stop token."""
        result.handoffs += 1
        tokens: list[pb.CloudToken] = [t async for t in session.handoff(n)]
        ids = [t.token_id for t in tokens]
        if ids:
            self.runner.append(ids)
        for j, t in enumerate(tokens):
            source: Source = "corrected" if (j == 0 and corrected is not None) else "cloud"
            result.records.append(
                TokenRecord(position=t.position, token_id=t.token_id, source=source, t_generated=clock())
            )
        done = session.last_handoff.done
        return bool(ids) and (
            ids[-1] in self.runner.stop_token_ids or done.reason == pb.HandoffDone.REASON_STOP_TOKEN
        )
