"""The budget grid walked with turns (`handoff router budget --turn M`): after a correction P writes the
next M - 1 tokens, which are neither checked nor override tokens and settle any disagreement there.
The walk against a plain loop, the counts on hand-made generations, and the command's file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.edge.policy.override import escalated_corrections, turn_corrections
from handoff.edge.routing.budget import operating_points
from handoff.edge.routing.data import to_data
from handoff.edge.routing.report import corrected_stats
from handoff.shared.errors import ShapeError
from tests.test_override_escalation import WALK_ROWS, walk, walk_arrays
from tests.test_router_budget import FRACTIONS, RECALLS, REPO, _data, _hand, _router


@settings(max_examples=300, deadline=None)
@given(
    WALK_ROWS,
    st.floats(0, 1),
    st.floats(0, 1),
    st.one_of(st.none(), st.integers(0, 4)),
    st.integers(1, 6),
)
def test_turn_corrections_walk_each_generation_in_order(rows, t0, extra, k, turn) -> None:
    cand, probs, group = walk_arrays(rows)
    after = None if k is None else t0 + (1 - t0) * extra  # in [t0, 1]
    corrected, covered = turn_corrections(cand, probs, group, t0, k, after, turn=turn)
    want_corrected, want_covered = walk(cand, probs, group, t0, k, after, turn)
    np.testing.assert_array_equal(corrected, want_corrected)
    np.testing.assert_array_equal(covered, want_covered)
    assert not (corrected & covered).any()
    if turn == 1:
        np.testing.assert_array_equal(corrected, escalated_corrections(cand, probs, group, t0, k, after))


def test_turn_corrections_refuse_bad_turns_and_shapes() -> None:
    cand, probs, group = np.ones(3, dtype=bool), np.full(3, 0.5), np.zeros(3, dtype=np.int64)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ShapeError, match="turn"):
            turn_corrections(cand, probs, group, 0.5, turn=bad)
    with pytest.raises(ShapeError, match=r"\[N\]"):
        turn_corrections(cand, probs[:2], group, 0.5, turn=2)
    with pytest.raises(ShapeError, match="threshold_after"):
        turn_corrections(cand, probs, group, 0.5, 1, 0.4, turn=2)


def test_a_turn_settles_the_disagreements_it_writes() -> None:
    """One generation: disagreements at 0, 1 and 3, the divergent one at 1. Corrected one token at a
    time, all three are override tokens; with a turn of 2, position 1 is P's turn token (settled, no
    override, not checked) and 3 starts the next turn."""
    data = to_data([_hand([6, 6, 5, 6, 5], divergent=[0, 1, 0, 0, 0])], np.zeros(16, dtype=np.int64))
    flagged = np.ones(5, dtype=bool)
    probs = np.ones(5)
    one, cover1 = turn_corrections(flagged & data.disagreements, probs, data.group, 0.5, turn=1)
    two, cover2 = turn_corrections(flagged & data.disagreements, probs, data.group, 0.5, turn=2)
    assert one.tolist() == [True, True, False, True, False] and not cover1.any()
    assert two.tolist() == [True, False, False, True, False]
    assert cover2.tolist() == [False, True, False, False, True]  # the turn of 3 ends with the generation
    s1 = corrected_stats(data, flagged, one, cover1)
    s2 = corrected_stats(data, flagged, two, cover2)
    assert s1["overrides"] == pytest.approx(3 / 5) and s1["other"] == 0.0 and s1["checked"] == 1.0
    assert s2["overrides"] == pytest.approx(2 / 5) and s2["other"] == pytest.approx(2 / 5)
    assert s2["checked"] == pytest.approx(3 / 5)  # P's turn tokens are not checked
    assert s1["reproduced"] == s2["reproduced"] == 1.0 and s2["recall"] == 1.0
    assert s2["precision"] == 0.0  # the divergent position is a turn token, not an override
    # Declining the first disagreement leaves the divergent one to be corrected itself.
    probs[0] = 0.0
    two, cover2 = turn_corrections(flagged & data.disagreements, probs, data.group, 0.5, turn=2)
    assert two.tolist() == [False, True, False, True, False]
    assert corrected_stats(data, flagged, two, cover2)["precision"] == 0.5


def test_turns_never_override_more_nor_keep_fewer_answers_without_escalation() -> None:
    """Without a per-response budget every correction a turn walk skips is a turn token: the turn
    keeps every answer the one-token corrections keep, at no more override tokens."""
    data, router = _data(seed=3), _router()
    classes, surface = np.zeros(16, dtype=np.int64), np.arange(16)
    base = operating_points(router, data, classes, surface, FRACTIONS, RECALLS)
    for turn in (2, 4, 8):
        walked = operating_points(router, data, classes, surface, FRACTIONS, RECALLS, turn=turn)
        assert [p["turn"] for p in walked] == [turn] * len(base)
        for a, b in zip(base, walked, strict=True):
            assert (a["fraction"], a["recall_target"]) == (b["fraction"], b["recall_target"])
            assert b["overrides"] <= a["overrides"] + 1e-12
            assert b["reproduced"] >= a["reproduced"] - 1e-12 and b["checked"] <= a["checked"] + 1e-12
            assert a["other"] == 0.0 and (b["other"] > 0) == (b["overrides"] > 0)
    assert any(b["overrides"] < a["overrides"] for a, b in zip(base, walked, strict=True))


def test_router_budget_turn_writes_the_turn(tmp_path: Path) -> None:
    """`--turn 4` walks the points with turns and writes turn 4 into the chosen file."""
    from handoff.cli import main
    from handoff.edge.policy.router import load_router

    out, points = tmp_path / "budget.json", tmp_path / "points.json"
    args = ["router", "budget", str(REPO / "docs/router/router-t25-ov70.json"),
            str(REPO / "docs/router/train/large.jsonl.gz"), "--labels", str(REPO / "docs/router/labels/train.jsonl"),
            "--fractions", "0.1,0.2", "--recalls", "0.6,0.9", "--max-overrides", "0.05"]  # fmt: skip
    assert main([*args, "--turn", "4", "--out", str(out), "--json", str(points)]) == 0
    result = json.loads(points.read_text())
    assert {p["turn"] for p in result["points"]} == {4}
    assert all(p["other"] > 0 for p in result["points"])
    assert load_router(out).turn == 4
    assert main([*args, "--json", str(points)]) == 0  # the file's turn: 1
    assert {p["turn"] for p in json.loads(points.read_text())["points"]} == {1}


def test_a_cloud_budget_counts_the_turns_tokens() -> None:
    """best_within's max_cloud bounds overrides + other: a long turn that answers more is refused
    when its turn tokens do not fit."""
    from handoff.edge.routing.budget import best_within

    short = {"overrides": 0.02, "other": 0.04, "checked": 0.2, "recall": 0.5, "answers": 0.7}
    long = {"overrides": 0.015, "other": 0.12, "checked": 0.15, "recall": 0.6, "answers": 0.8}
    assert best_within([short, long], 0.025) is long
    assert best_within([short, long], 0.025, max_cloud=0.1) is short
    assert best_within([short, long], 0.025, max_cloud=0.05) is None
    assert best_within([{k: v for k, v in short.items() if k != "other"}], 0.025, max_cloud=0.03) is not None
