"""Re-run a handoff policy offline on a full trace: other thresholds and check intervals without models.

A full trace has both models' views at every position (a cloud-only generation: the edge scores
every cloud token with Q, so each record carries P's and Q's top-k and their KL). The replay walks
P's text with the policy: windows of N positions, the window's KL against τ, a cut, M cloud tokens,
and so on. The decisions are made by the same policy core the live controller calls
(edge.policy.HandoffPolicy: decide_scores on each window's KLs, hand_back on each cloud token's), on
the same per-position KLs. tau stays at the configured threshold (a budget is not replayed).

What is exact and what is not: the replay keeps P's text. Where the policy keeps an edge token,
the real edge would have written Q's own token there; when Q's greedy token is P's token at every
kept position, the real greedy run writes exactly this text and the replay is exact. Otherwise the
real text departs from P's at the first such position and everything after it is an approximation
(`ReplayInfo.first_departure`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np

from handoff.edge.policy import PolicyConfig, make_policy
from handoff.edge.simulation.traces import Generation, open_bytes
from handoff.shared.divergence import topk_kl


@dataclass(frozen=True)
class ReplayInfo:
    """How faithful a replayed generation is."""

    exact: bool  # greedy, and Q's greedy token is P's at every position the edge keeps
    departures: int  # kept positions where Q's greedy token differs from P's
    first_departure: int | None  # index (in the output) of the first one


def record_kls(recs: list[dict], concept_of: np.ndarray | None) -> np.ndarray:
    """[n] top-k KL(P || Q) recomputed from each record's two top-k views (over concepts when given).

    Without P's log-probabilities at Q's ids (traces do not keep them) this is a looser lower bound
    than the live one; use it to compare divergences with each other, each from the same views.
    """
    p_ids = np.asarray([r["p_topk_ids"] for r in recs], dtype=np.int64)  # [n, k]
    p_lp = np.asarray([r["p_topk_logprobs"] for r in recs], dtype=np.float64)  # [n, k]
    q_ids = np.asarray([r["q_topk_ids"] for r in recs], dtype=np.int64)  # [n, k]
    q_lp = np.asarray([r["q_topk_logprobs"] for r in recs], dtype=np.float64)  # [n, k]
    return topk_kl(p_ids, p_lp, q_ids, q_lp, rest_margin=1e-5, concept_of=concept_of)


def replay_policy(
    gen: Generation, policy: PolicyConfig, concept_of: np.ndarray | None = None
) -> tuple[Generation, ReplayInfo]:
    """A hybrid generation under `policy`, built from a full trace of P's text.

    Args:
        gen: a full trace (Generation.full), normally of a cloud-only run.
        policy: the policy to replay (kind, threshold, check_interval, handback_tokens,
            agree_tokens, aggregation, seed_tokens are used).
        concept_of: [V] concept ids when policy.divergence is not "token": the KLs are then recomputed
            from the records' views (record_kls) instead of read from them.

    Returns:
        The synthetic generation (records re-labelled edge / corrected / cloud, with the policy in
        its meta) and how faithful it is.

    Raises:
        ValueError: the trace lacks a view at some position.
    """
    if policy.kind == "safe":
        raise ValueError(
            "the safe policy places tokens neither model wrote along the trace, so a replay of P's text "
            "cannot show where it goes: run it live (handoff eval --policies safe:W) and simulate its traces"
        )
    if not gen.full:
        raise ValueError(f"{gen.source}: not a full trace (a position lacks P's or Q's view, or its KL)")
    recs = gen.records
    if policy.divergence == "token":
        kls = np.asarray([float(r["kl"]) for r in recs])  # [n]
    else:
        if concept_of is None:
            raise ValueError(f"replaying divergence {policy.divergence!r} needs its concept map")
        kls = record_kls(recs, concept_of)  # [n]
    # The live controller's policy object; without a budget, so tau is the threshold throughout.
    core = make_policy(replace(policy, budget=0.0))
    core.begin()
    out: list[dict] = []
    departures, first_departure = 0, None
    window_id = 0

    def cloud(i: int, corrected: bool) -> dict:
        r = recs[i]
        return r | {
            "source": "corrected" if corrected else "cloud",
            "checked": True,
            "replaced_token_id": int(r["q_topk_ids"][0]) if corrected else None,
            "t_uploaded": None,
        }

    def cloud_turn(i: int, n: int, corrected: bool, early: bool = True) -> int:
        """Up to n cloud tokens from i (the policy may hand back early); the next i."""
        hand_back, start = core.hand_back(early), i
        while i < len(recs) and i - start < n:
            out.append(cloud(i, corrected and i == start))
            i += 1
            if hand_back.agreed(float(kls[i - 1])):
                break
        return i

    i = 0
    if policy.seed_tokens:
        # As in the live controller, the seed tokens run their course (no early hand-back).
        i = cloud_turn(0, policy.seed_tokens, corrected=False, early=False)
    while i < len(recs):
        window = kls[i : i + policy.check_interval]  # [<= N]
        decision = core.decide_scores(window).checked(len(window))
        keep = decision.keep
        window_id += 1
        for j in range(i, i + keep):
            r = recs[j]
            if int(r["q_topk_ids"][0]) != int(r["token_id"]):
                departures += 1
                if first_departure is None:
                    first_departure = len(out)
            out.append(
                r | {"source": "edge", "checked": True, "replaced_token_id": None, "t_uploaded": window_id}
            )
        i += keep
        if decision.hand_over and i < len(recs):
            i = cloud_turn(i, policy.handback_tokens, corrected=keep < len(window))
    meta = gen.meta | {"policy": asdict(policy), "replayed_from": gen.source,
                       "open_bytes": list(open_bytes(gen))}  # fmt: skip
    counts = {s: sum(r["source"] == s for r in out) for s in ("edge", "cloud", "corrected")}
    summary = gen.summary | {"mode": "hybrid", "by_source": counts | {"unchecked": 0}, "bytes_sent": 0,
                             "bytes_received": 0}  # fmt: skip
    info = ReplayInfo(gen.greedy and departures == 0, departures, first_departure)
    return Generation(meta, out, summary, gen.source), info
