"""Gated (router) policies in the simulator: tokens unchecked by design commit as drafted; gated ones wait.

A correction is modelled two ways: in place (greedy: no cloud token received, t_received None) at the
cost of its check alone, or (sampling: t_received set) as a rollback and a one-token handoff.
"""

from __future__ import annotations

import numpy as np
import pytest

from handoff.edge.simulation.cloud_latency import CloudLatencyModel
from handoff.edge.simulation.run import edge_model_from_traces, measure, recorded_configs
from handoff.edge.simulation.simulate import CostModel, EdgeModel, NetworkModel, simulate
from handoff.edge.simulation.traces import (
    CloudTurn,
    Generation,
    Window,
    append_bytes,
    control_bytes,
    events,
    in_place_bytes,
    window_bytes,
)

# Flat cloud latencies: open 0.5 s, any check 0.3 s, handoff first token 0.2 s, then 0.1 s per token.
CLOUD = CloudLatencyModel.from_bench(
    {
        "rtt_s": 0.0,
        "open": [{"prompt_tokens": 16, "seconds": 0.5}],
        "check": [{"sessions": 1, "tokens": 1, "seconds": 0.3}],
        "decode": [{"sessions": 1, "seconds_per_token": 0.1, "first_token_s": 0.2}],
    }
)
EDGE = EdgeModel(token_s=0.1)


def rec(position: int, source: str, unchecked: str | None = None, uploaded: float | None = None) -> dict:
    """A token record as the controller writes it (unchecked: None, "by_design" or "unreachable")."""
    return {
        "position": position, "token_id": 5, "source": source, "checked": unchecked is None,
        "unchecked": unchecked, "kl": None, "q_topk_ids": [5, 7],
        "q_topk_logprobs": [-0.1, -2.5], "p_logprob": -0.2, "p_topk_ids": [5, 9] if unchecked is None else None,
        "p_topk_logprobs": [-0.2, -1.9] if unchecked is None else None, "t_generated": None,
        "t_uploaded": uploaded, "t_answered": uploaded,
    }  # fmt: skip


def generation(records: list[dict], lookahead: int = 0) -> Generation:
    # lookahead_windows 0: the driver waits for each check point before it drafts on.
    policy = {
        "check_interval": 4, "handback_tokens": 1, "lookahead_windows": lookahead, "top_k": 2, "kind": "router",
    }  # fmt: skip
    meta = {
        "prompt_ids": list(range(16)),
        "policy": policy,
        "max_tokens": 64,
        "sampling": {"temperature": 0.0},
    }
    summary = {"mode": "hybrid", "bytes_sent": 0, "bytes_received": 0, "open_bytes": [100, 50]}
    return Generation(meta, records, summary, "hand-made")


def gated_records(in_place: bool = False) -> list[dict]:
    """16-18 unchecked by design; 19 checked alone (P agrees); 20-21 by design; 22 checked, and P
    replaced the edge's token there; 23 by design.

    Args:
        in_place: the correction at 22 was committed in place (greedy: the check's answer, no cloud
            token received); otherwise it came from a one-token handoff (t_received set).
    """
    bd = "by_design"
    fix = rec(22, "corrected", uploaded=2.0) if in_place else rec(22, "corrected") | {"t_received": 2.9}
    fix["replaced_token_id"] = 6
    return [
        rec(16, "edge", bd), rec(17, "edge", bd), rec(18, "edge", bd), rec(19, "edge", uploaded=1.0),
        rec(20, "edge", bd), rec(21, "edge", bd), fix, rec(23, "edge", bd),
    ]  # fmt: skip


def test_gated_trace_structure():
    gen = generation(gated_records())
    r = gen.records
    assert gen.gated
    assert events(gen) == [
        Window(16, 3, 3, False, False, tuple(r[0:3]), by_design=True),
        Window(19, 1, 1, False, True, (r[3],)),
        Window(20, 2, 2, False, False, tuple(r[4:6]), by_design=True),
        Window(22, 1, 0, True, True, (), r[6]),  # the gated token P replaced: one drafted, none kept
        CloudTurn(22, 1, True, (r[6],)),
        Window(23, 1, 1, False, False, (r[7],), by_design=True),
    ]


def test_unchecked_by_design_commits_at_the_edges_pace_and_a_gated_token_pays_the_round_trip():
    gen = generation(gated_records())
    t = simulate(gen, NetworkModel(rtt_s=0.2), EDGE, CLOUD, CostModel())
    # open 0 -> 0.1 -> 0.6 -> 0.7. 16, 17, 18 drafted and committed at 0.8, 0.9, 1.0 (their upload
    # waits for nothing). 19 drafted at 1.1 and checked: 1.2 -> 1.5 (the check also feeds P the three
    # unchecked tokens) -> 1.6. 20, 21 at 1.7, 1.8. 22 drafted 1.9, checked 2.0 -> 2.3 -> 2.4: P
    # replaces it. Rollback 2.4 -> 2.6; the correction is made 2.7 -> 2.9, reaches 3.0, scored: 3.1.
    # 23 at 3.2. Close -> 3.4.
    assert t.commits == pytest.approx([0.8, 0.9, 1.0, 1.6, 1.7, 1.8, 3.1, 3.2])
    gaps = np.diff(t.commits)
    assert gaps[[0, 1, 3, 4, 6]] == pytest.approx([0.1] * 5)  # by design: the edge's step only
    assert gaps[2] == pytest.approx(0.1 + 0.2 + 0.3)  # gated: step + RTT + the cloud's check
    assert t.seconds == pytest.approx(3.4)
    assert (t.check_points, t.handoffs, t.rollbacks, t.checked_positions) == (2, 1, 1, 2)
    assert t.round_trips == 5  # open, two check points, the rollback, the correction
    # Open, two checks, one correction; the last by-design token is never fed (the session ends).
    assert t.gpu_seconds == pytest.approx(0.5 + 2 * 0.3 + 0.1)
    # Every by-design token's upload crossed the uplink (ids only), without being waited for.
    uploads = sum(append_bytes(gen.records[a:b]).up for a, b in ((0, 3), (4, 6), (7, 8)))
    assert t.bytes_up > 100 + uploads
    # Without a round trip the gated token waits only for its check.
    fast = simulate(gen, NetworkModel(rtt_s=0.0), EDGE, CLOUD, CostModel())
    assert np.diff(fast.commits)[2] == pytest.approx(0.1 + 0.3)
    assert np.diff(fast.commits)[0] == pytest.approx(0.1)


def test_measured_row_has_each_part_of_the_clouds_share():
    gen = generation(gated_records())
    row = measure(recorded_configs([gen])[0], NetworkModel(rtt_s=0.2), EDGE, CLOUD, CostModel())
    assert row["override_fraction"] == pytest.approx(1 / 8) and row["other_cloud_fraction"] == 0
    assert row["checked_fraction"] == pytest.approx(2 / 8) and row["round_trips_per_generation"] == 5
    assert row["gpu_s_per_1k_tokens"] == pytest.approx(1.2 / 8 * 1000) and row["gpu_estimated"] is False


def test_unreachable_keeps_its_meaning():
    """Tokens unchecked because the cloud was gone: no upload, committed when their window is drafted."""
    gen = generation([rec(16 + i, "edge", "unreachable") for i in range(4)])
    assert not gen.gated and events(gen) == [Window(16, 4, 4, False, False, tuple(gen.records))]
    t = simulate(gen, NetworkModel(rtt_s=0.2), EDGE, CLOUD, CostModel())
    assert t.commits == pytest.approx([1.1] * 4) and t.check_points == 0 and t.checked_positions == 0


def test_in_place_correction_is_its_check_points_window():
    gen = generation(gated_records(in_place=True))
    r = gen.records
    assert events(gen) == [
        Window(16, 3, 3, False, False, tuple(r[0:3]), by_design=True),
        Window(19, 1, 1, False, True, (r[3],)),
        Window(20, 2, 2, False, False, tuple(r[4:6]), by_design=True),
        Window(22, 1, 1, False, True, (r[6],), in_place=True),  # kept: P's token, no handoff
        Window(23, 1, 1, False, False, (r[7],), by_design=True),
    ]
    # Right after a kept check point it is a check point of its own, not a cut of the one before.
    two = generation([rec(16, "edge", "by_design"), rec(17, "edge", uploaded=1.0), r[6] | {"position": 18}])
    assert [(type(e), e.first, e.drafted, e.kept, e.cut, e.in_place) for e in events(two)][1:] == [
        (Window, 17, 1, 1, False, False),
        (Window, 18, 1, 1, False, True),
    ]


def test_in_place_correction_costs_its_check_alone():
    """One RTT and a check, not the three round trips of a rollback and a handoff; no handoff pass."""
    old = simulate(generation(gated_records()), NetworkModel(rtt_s=0.2), EDGE, CLOUD, CostModel())
    gen = generation(gated_records(in_place=True))
    t = simulate(gen, NetworkModel(rtt_s=0.2), EDGE, CLOUD, CostModel())
    # As in the test above up to 21 (1.8). 22 drafted 1.9, checked 2.0 -> 2.3 -> 2.4: P replaces it,
    # committed at once (settle 0); the Rollback and the token go up unawaited. 23 at 2.5. Close -> 2.7.
    assert t.commits == pytest.approx([0.8, 0.9, 1.0, 1.6, 1.7, 1.8, 2.4, 2.5])
    assert np.diff(t.commits)[5] == pytest.approx(0.1 + 0.2 + 0.3)  # step + one RTT + the check
    assert np.diff(old.commits)[5] == pytest.approx(0.1 + 3 * 0.2 + 0.3 + 0.2 + 0.1)  # as it was
    assert t.seconds == pytest.approx(2.7) and old.seconds == pytest.approx(3.4)
    assert (t.check_points, t.handoffs, t.rollbacks, t.checked_positions, t.round_trips) == (2, 0, 0, 2, 3)
    assert (old.check_points, old.handoffs, old.rollbacks, old.round_trips) == (2, 1, 1, 5)
    # Open and two checks; P feeds the corrected token (and 23) at a next forward the session never has.
    assert t.gpu_seconds == pytest.approx(0.5 + 2 * 0.3)
    assert old.gpu_seconds == pytest.approx(0.5 + 2 * 0.3 + 0.1)  # + the handoff's token
    # Bytes: the open, by-design uploads, two check points (22's carries the edge's token), the
    # Rollback and P's token as a bare id with their acks, the Close. No cloud token comes down.
    r = gen.records
    by_design = [append_bytes(r[a:b]) for a, b in ((0, 3), (4, 6), (7, 8))]
    checks = [window_bytes([r[3]], 2), window_bytes([r[6] | {"token_id": 6}], 2)]
    fix, close = in_place_bytes(r[6]), control_bytes(16 + 8)
    assert t.bytes_up == 100 + sum(b.up for b in by_design + checks + [fix]) + close["close_up"]
    assert t.bytes_down == 50 + sum(b.down for b in by_design + checks + [fix]) + close["close_down"]
    # The edge's settle cost is paid as by a kept checked token; a measured correction cost replaces it.
    slow = simulate(gen, NetworkModel(rtt_s=0.2), EdgeModel(token_s=0.1, settle_s=0.05), CLOUD)
    assert np.diff(slow.commits)[5] == pytest.approx(0.1 + 0.2 + 0.3 + 0.05)
    own = simulate(gen, NetworkModel(rtt_s=0.2), EdgeModel(token_s=0.1, settle_s=0.05, correct_s=0.08), CLOUD)
    assert np.diff(own.commits)[5] == pytest.approx(0.1 + 0.2 + 0.3 + 0.08)


def test_correction_cost_measured_from_traces():
    recs = gated_records(in_place=True)
    for i, r in enumerate(recs[:3]):
        r["t_generated"] = 0.1 * i
    recs[6] |= {"t_answered": 2.0, "t_committed": 2.03}
    assert edge_model_from_traces([generation(recs)]).correct_s == pytest.approx(0.03)
    assert edge_model_from_traces([generation(recs[:3])]).correct_s is None  # none to measure: settle_s


def test_drafting_ahead_overlaps_the_round_trip_and_a_correction_drops_what_was_drafted_behind_it():
    """lookahead_windows 1 (edge/gated.py drafts on behind one unanswered check point)."""
    gen = generation(gated_records(in_place=True), lookahead=1)
    t = simulate(gen, NetworkModel(rtt_s=0.2), EDGE, CLOUD, CostModel())
    # 16-18 at 0.8-1.0; 19 drafted 1.1, checked 1.2 -> 1.5 -> 1.6. Meanwhile 20 and 21 are drafted at
    # 1.2 and 1.3 (held) and 22 at 1.4 (uploaded with its check: 1.5 -> 1.8 -> 1.9), so 19-21 commit
    # together at 1.6. The edge drafts on behind 22 (1.5 ... 1.9); the answer replaces 22 at 1.9 and
    # drops those drafts: 23 is drafted again, 2.0. Close -> 2.2.
    assert t.commits == pytest.approx([0.8, 0.9, 1.0, 1.6, 1.6, 1.6, 1.9, 2.0])
    assert t.seconds == pytest.approx(2.2)
    assert (t.check_points, t.handoffs, t.rollbacks, t.round_trips) == (2, 0, 0, 3)
    waited = simulate(generation(gated_records(in_place=True)), NetworkModel(rtt_s=0.2), EDGE, CLOUD)
    assert waited.seconds == pytest.approx(2.7) and all(
        a <= b + 1e-9 for a, b in zip(t.commits, waited.commits, strict=True)
    )
    # A correction by a handoff (sampling) is a cut as before, reached sooner: 22's answer at 1.9.
    cut = simulate(generation(gated_records(), lookahead=1), NetworkModel(rtt_s=0.2), EDGE, CLOUD)
    assert cut.commits == pytest.approx([0.8, 0.9, 1.0, 1.6, 1.6, 1.6, 2.6, 2.7])
    assert (cut.handoffs, cut.rollbacks) == (1, 1)


def test_check_points_sent_for_drafts_a_correction_dropped_are_charged():
    """Drafting ahead may send check points for positions a correction then drops: the summary counts
    them, the records do not; their device time and bytes are charged, their wait is not."""
    plain = generation(gated_records(in_place=True), lookahead=1)
    extra = generation(gated_records(in_place=True), lookahead=1)
    extra.summary["check_points"] = 2 + 3
    a = simulate(plain, NetworkModel(rtt_s=0.2), EDGE, CLOUD, CostModel())
    b = simulate(extra, NetworkModel(rtt_s=0.2), EDGE, CLOUD, CostModel())
    assert b.commits == a.commits and b.seconds == a.seconds
    assert (b.check_points, b.checked_positions) == (a.check_points + 3, a.checked_positions + 3)
    assert b.gpu_seconds == pytest.approx(a.gpu_seconds + 3 * 0.3)
    assert b.bytes_up > a.bytes_up and b.bytes_down > a.bytes_down


def test_a_deferred_check_goes_up_when_the_check_ahead_of_it_is_settled():
    """defer_checks (edge/gated.py): 22, flagged while 19's check is in flight, is sent when 19's answer
    is settled, and the edge waits with it; the checks sent are the same two."""
    gen = generation(gated_records(in_place=True), lookahead=1)
    gen.meta["policy"]["defer_checks"] = True
    t = simulate(gen, NetworkModel(rtt_s=0.2), EDGE, CLOUD, CostModel())
    # As drafting ahead up to 1.6 (19-21 commit). 22 was drafted at 1.4 and held unsent: it goes up at
    # 1.6 -> 1.7 -> 2.0 -> 2.1 and replaces itself in place; 23 is drafted at 2.2. Close -> 2.4.
    assert t.commits == pytest.approx([0.8, 0.9, 1.0, 1.6, 1.6, 1.6, 2.1, 2.2])
    assert t.seconds == pytest.approx(2.4)
    ahead = simulate(
        generation(gated_records(in_place=True), lookahead=1), NetworkModel(rtt_s=0.2), EDGE, CLOUD
    )
    assert (t.check_points, t.gpu_seconds) == (ahead.check_points, pytest.approx(ahead.gpu_seconds))
    # A run that waits for every check (lookahead 0) is never deferred.
    waited = generation(gated_records(in_place=True))
    waited.meta["policy"]["defer_checks"] = True
    assert simulate(waited, NetworkModel(rtt_s=0.2), EDGE, CLOUD).seconds == pytest.approx(2.7)


def test_a_deferred_checks_wait_is_not_counted_as_the_edges_upload_time():
    recs = [rec(18, "edge", "by_design"), rec(19, "edge", uploaded=1.0), rec(20, "edge", "by_design"),
            rec(21, "edge", "by_design"), rec(22, "edge", uploaded=1.5)]  # fmt: skip
    recs[0] |= {"t_generated": 0.89, "t_committed": 0.89}
    recs[1] |= {"t_generated": 0.99, "t_answered": 1.5, "t_committed": 1.51}
    recs[2] |= {"t_generated": 1.1, "t_committed": 1.51}
    recs[3] |= {"t_generated": 1.2, "t_committed": 1.51}  # steps of 0.1 s
    recs[4] |= {"t_generated": 1.3, "t_answered": 2.0, "t_committed": 2.01}  # drafted 1.3, sent at 1.5
    plain = generation(recs, lookahead=1)
    deferred = generation(recs, lookahead=1)
    deferred.meta["policy"]["defer_checks"] = True
    assert edge_model_from_traces([plain]).upload_s == pytest.approx((0.01 + 0.2) / 2)
    assert edge_model_from_traces([deferred]).upload_s == pytest.approx(0.01)
