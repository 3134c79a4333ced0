"""The exact policy's round: speculative sampling between Q on the edge and P in the cloud.

The edge drafts gamma tokens from Q, the cloud verifies them against P (VerifyDraft) and returns how
many stand plus one token of its own; the tokens that stand are distributed exactly as P's own
sampling (Leviathan et al. 2023, arXiv 2211.17192; shared/speculative.py). gamma follows the
acceptance rate (DraftLength).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from handoff.edge.link import CloudLink
from handoff.edge.records import GenerationResult, TokenRecord
from handoff.edge.runner import EdgeRunner, EdgeStep
from handoff.edge.wire import draft_to_proto
from handoff.shared.errors import ShapeError, VerifierError
from handoff.shared.sampling import SamplingSettings
from handoff.shared.wire import topk_from_proto

__all__ = ["DraftLength", "Driver", "draft_sampling", "exact_round"]


def draft_sampling(sampling: SamplingSettings | None, top_k: int) -> SamplingSettings | None:
    """Q drafts from its top-k truncated distribution: the k values the cloud gets are all of it.

    Args:
        sampling: the generation's settings (None: the runner's).
        top_k: the k of the views sent to the cloud, >= 1.
    """
    if sampling is None or sampling.greedy:
        return sampling
    return replace(sampling, top_k=min(sampling.top_k or top_k, top_k))


class DraftLength:
    """The next draft's length gamma, from the acceptance of recent drafts (per generation).

    With a per-token acceptance rate a, a draft of g tokens yields (1 - a^(g+1)) / (1 - a) tokens
    (Leviathan et al. 2023, arXiv 2211.17192); the marginal token is worth drafting while a^g stays
    above ~1/4, so gamma = floor(log(1/4) / log(a)), within [1, longest].

    Args:
        first: the first draft's length, 1 <= first <= longest.
        longest: the longest draft.
    """

    RECENT = 8  # drafts the rate is measured over

    def __init__(self, first: int, longest: int) -> None:
        if not 1 <= first <= longest:
            raise ShapeError(f"expected 1 <= first <= longest draft lengths, got {first}, {longest}")
        self.gamma = first
        self.longest = longest
        self._history: list[tuple[int, int]] = []  # (accepted, drafted) per draft

    def record(self, accepted: int, drafted: int) -> int:
        """A draft of `drafted` tokens had `accepted` stand; returns the next gamma."""
        if not 0 <= accepted <= drafted:
            raise ShapeError(f"expected 0 <= accepted <= drafted, got {accepted}, {drafted}")
        self._history.append((accepted, drafted))
        recent = self._history[-self.RECENT :]
        total = sum(n for _, n in recent)
        rate = sum(a for a, _ in recent) / total if total else 0.5
        if rate >= 0.999:
            self.gamma = self.longest
        elif rate <= 0.0:
            self.gamma = 1
        else:
            best = int(np.floor(np.log(0.25) / np.log(rate)))
            self.gamma = int(np.clip(best, 1, self.longest))
        return self.gamma


class Driver(Protocol):
    """What exact_round needs of the controller's generation (edge/controller.py)."""

    runner: EdgeRunner
    link: CloudLink | None
    result: GenerationResult
    stops: frozenset[int]
    max_tokens: int
    draft_length: DraftLength

    @property
    def committed(self) -> int: ...

    def clock(self) -> float: ...

    async def bounded(self, request: Awaitable) -> Any: ...

    async def in_pool(self, fn: Callable, *args: Any) -> Any: ...

    async def commit(self, record: TokenRecord) -> None: ...

    async def commit_unchecked(self, steps: list[EdgeStep], times: list[float]) -> bool: ...


async def exact_round(gen: Driver) -> bool:
    """Draft gamma tokens, let the cloud verify them (speculative sampling); True at a stop token.

    Drafting past the expected run of acceptances only spends edge time and uplink on tokens the
    cloud will throw away, hence gamma from DraftLength.
    """
    link = gen.link
    assert link is not None and link.session is not None
    result, runner = gen.result, gen.runner
    start = runner.length
    steps: list[EdgeStep] = []
    times: list[float] = []  # when each draft token was generated
    while len(steps) < min(gen.draft_length.gamma, gen.max_tokens - gen.committed):
        step = await gen.in_pool(runner.step)
        steps.append(step)
        times.append(gen.clock())
        if step.token_id in gen.stops:
            break
    draft, dists = draft_to_proto(steps)
    t_uploaded = gen.clock()
    try:
        verdict = await gen.bounded(link.session.verify(draft, dists))
    except (VerifierError, TimeoutError) as e:
        link.fail(e)
        return await gen.commit_unchecked(steps, times)  # the cloud is gone
    t_answered = gen.clock()
    accepted = min(verdict.accepted, len(steps))
    result.drafts += 1
    result.draft_tokens += len(steps)
    result.checked_positions += len(steps)
    result.draft_accepted += accepted
    gen.draft_length.record(accepted, len(steps))
    for j in range(accepted):
        s = steps[j]
        await gen.commit(
            TokenRecord(
                position=s.position, token_id=s.token_id, source="edge", checked=True, kl=None,
                q_entropy=s.entropy, q_topk_ids=s.topk_ids.tolist(), q_topk_logprobs=s.topk_logprobs.tolist(),
                q_logprob=s.token_logprob, t_generated=times[j], t_uploaded=t_uploaded, t_answered=t_answered,
            )
        )  # fmt: skip
        if s.token_id in gen.stops:
            return True
    if not verdict.HasField("next") or gen.committed >= gen.max_tokens:
        if accepted < len(steps):
            await gen.in_pool(runner.truncate, start + accepted)
        return False
    tok = verdict.next
    p_ids, p_lp = topk_from_proto(tok.topk)
    # The rejected drafts go and P's token takes their place in one forward pass.
    await gen.in_pool(runner.replace_tail, start + accepted, [tok.token_id])
    rejected = accepted < len(steps)
    await gen.commit(
        TokenRecord(
            position=tok.position, token_id=tok.token_id, source="corrected" if rejected else "cloud",
            checked=True, p_logprob=float(tok.token_logprob), p_topk_ids=p_ids.tolist(),
            p_topk_logprobs=p_lp.tolist(), replaced_token_id=steps[accepted].token_id if rejected else None,
            t_generated=t_answered, t_received=t_answered, draft_len=len(steps),
        )
    )  # fmt: skip
    return tok.token_id in gen.stops
