"""The escalating override gate (a per-response override budget): after K corrections in a generation
the gate keeps only disagreements over a stricter threshold. The offline walk against a plain loop,
the file, the policy's count, the budget grid, and a gated run on tiny models."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.edge.cloud_harness import generate_with_server
from handoff.edge.policy import PolicyConfig, RouterModel, make_policy
from handoff.edge.policy.override import OverrideGate, escalated_corrections
from handoff.edge.policy.triggers import WindowView
from handoff.edge.routing.budget import operating_points
from handoff.shared.errors import ShapeError
from tests.test_override_gate import G, check_all_router, one_feature_gate
from tests.test_router_budget import FRACTIONS, RECALLS, _data, _router


def walk(cand, probs, group, threshold, k, after, turn=1) -> tuple[np.ndarray, np.ndarray]:
    """The policy's rule one position at a time: the reference for escalated_corrections and, with a
    turn (P writes the turn - 1 tokens after a correction), for turn_corrections.

    Returns:
        ([N] corrected, [N] covered by a turn).
    """
    n = len(cand)
    corrected, covered = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    count, last, left = 0, None, 0  # left: P's tokens still to write in the current turn
    for i in range(n):
        if group[i] != last:
            count, last, left = 0, group[i], 0
        if left:
            covered[i], left = True, left - 1
            continue
        t = threshold if k is None or count < k else after
        if cand[i] and probs[i] >= t:
            corrected[i], count, left = True, count + 1, turn - 1
    return corrected, covered


# (candidate, gate probability, generation) rows, and the arrays of a walk over them
WALK_ROWS = st.lists(st.tuples(st.booleans(), st.floats(0, 1), st.integers(0, 3)), min_size=0, max_size=40)


def walk_arrays(rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N] candidates, probabilities and generations, a generation's positions together and in order."""
    rows = sorted(rows, key=lambda r: r[2])
    cand = np.asarray([r[0] for r in rows], dtype=bool)
    probs = np.asarray([r[1] for r in rows], dtype=np.float64)
    group = np.asarray([r[2] for r in rows], dtype=np.int64)
    return cand, probs, group


@settings(max_examples=200, deadline=None)
@given(
    WALK_ROWS,
    st.floats(0, 1),
    st.floats(0, 1),
    st.one_of(st.none(), st.integers(0, 5)),
)
def test_escalated_corrections_walk_each_generation_in_order(rows, t0, extra, k) -> None:
    cand, probs, group = walk_arrays(rows)
    after = t0 + (1 - t0) * extra  # in [t0, 1]
    got = escalated_corrections(cand, probs, group, t0, k, None if k is None else after)
    np.testing.assert_array_equal(got, walk(cand, probs, group, t0, k, after)[0])


def test_escalation_refuses_a_looser_threshold_and_bad_shapes() -> None:
    cand, probs, group = np.ones(3, dtype=bool), np.full(3, 0.5), np.zeros(3, dtype=np.int64)
    with pytest.raises(ShapeError, match="threshold_after"):
        escalated_corrections(cand, probs, group, 0.5, 1, 0.4)
    with pytest.raises(ShapeError, match=r"\[N\]"):
        escalated_corrections(cand, probs[:2], group, 0.5)
    # K = 0 with a threshold over every probability: nothing; K past every take: the plain gate.
    assert not escalated_corrections(cand, probs, group, 0.5, 0, 1.0).any()
    assert escalated_corrections(cand, probs, group, 0.5, 3, 1.0).all()


def test_an_escalating_gate_round_trips_and_checks_its_fields(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    gate = OverrideGate(
        rng.normal(size=G), np.ones(G), rng.normal(size=G), 0.1, 0.3, escalate_after=2, threshold_after=0.8
    )
    path = tmp_path / "r.json"
    check_all_router(gate=gate).save(path)
    back = RouterModel.from_json(json.loads(path.read_text())).override
    assert (back.escalate_after, back.threshold_after) == (2, 0.8)
    assert [back.threshold_at(c) for c in (0, 1, 2, 5)] == [0.3, 0.3, 0.8, 0.8]
    plain = replace(gate, escalate_after=None, threshold_after=None)
    assert "escalate_after" not in plain.to_json(lambda a: a.tolist())  # old files stay as they were
    assert plain.threshold_at(10) == 0.3
    with pytest.raises(ShapeError, match="go together"):
        replace(gate, threshold_after=None)
    with pytest.raises(ShapeError, match="threshold_after"):
        replace(gate, threshold_after=0.2)  # looser than the threshold
    with pytest.raises(ShapeError, match="escalate_after"):
        replace(gate, escalate_after=-1)


def test_the_policy_counts_its_corrections_per_generation(tmp_path: Path, tiny_gguf_a) -> None:
    from handoff.edge.cloud_harness import vocabulary_of

    vocab = vocabulary_of(tiny_gguf_a)
    fp = vocab.fingerprint
    # Probability sigmoid(log(1 + offset) + 3), in (0.95, 1): over 0.5 always, never 1.
    gate = replace(one_feature_gate("log_offset", -3.0), escalate_after=1, threshold_after=1.0)
    path = tmp_path / "esc.json"
    check_all_router(fp.digest.hex(), fp.vocab_size, gate).save(path)
    policy = make_policy(PolicyConfig(kind="router", router=str(path)))
    policy.attach(vocab)
    view = WindowView(
        token_ids=[4], q_topk_ids=[[4, 8]], q_topk_logprobs=np.log([[0.6, 0.3]]), q_entropy=[0.5],
        p_kls=[0.1], p_top1_ids=[8], p_topk_ids=[[8, 4]], p_topk_logprobs=np.log([[0.7, 0.2]]), offsets=[5],
    )  # fmt: skip
    policy.begin()
    assert policy.decide(view).hand_over  # the first correction of the generation
    assert not policy.decide(view).hand_over  # past its budget: Q's token stays
    policy.begin()
    assert policy.decide(view).hand_over  # a new generation, a new budget


def test_a_gated_run_corrects_once_with_a_budget_of_one(tmp_path: Path, tiny_gguf_a, tiny_gguf_b) -> None:
    from handoff.edge.cloud_harness import vocabulary_of

    fp = vocabulary_of(tiny_gguf_b).fingerprint
    runs = {}
    base = one_feature_gate("log_offset", -3.0)
    for name, gate in (("all", base), ("one", replace(base, escalate_after=1, threshold_after=1.0))):
        path = tmp_path / f"{name}.json"
        check_all_router(fp.digest.hex(), fp.vocab_size, gate).save(path)
        runs[name] = generate_with_server(
            tiny_gguf_a, tiny_gguf_b, PolicyConfig(kind="router", router=str(path)), 60
        )
    every, once = runs["all"], runs["one"]
    assert every.counts()["corrected"] > 1 and once.counts()["corrected"] == 1
    first = next(i for i, r in enumerate(once.records) if r.source == "corrected")
    assert once.tokens[: first + 1] == every.tokens[: first + 1]  # the same first correction
    assert once.kept_disagreements() > 0  # later disagreements keep Q's token


def test_the_budget_grid_adds_escalated_points() -> None:
    data, router = _data(gens=16, n=40), _router()
    classes, surface = np.zeros(16, dtype=np.int64), np.arange(16)
    esc = ((0, 1.0), (1, 0.5), (100, 0.5))
    points = operating_points(router, data, classes, surface, FRACTIONS, RECALLS, esc)
    plain = {(p["fraction"], p["recall_target"]): p for p in points if p["escalate_after"] is None}
    assert len(plain) == len(FRACTIONS) * len(RECALLS)
    for p in points:
        if p["escalate_after"] is None:
            continue
        assert p["recall_after"] <= p["recall_target"] and p["threshold_after"] >= p["gate_threshold"]
        ref = plain[(p["fraction"], p["recall_target"])]
        assert p["overrides"] <= ref["overrides"] + 1e-12  # a budget never corrects more
        if p["escalate_after"] == 100 or (
            p["escalate_after"] == 0 and p["recall_after"] == p["recall_target"]
        ):
            assert p["overrides"] == ref["overrides"] and p["reproduced"] == ref["reproduced"]
    assert any(
        p["escalate_after"] == 1 and p["overrides"] < plain[(p["fraction"], p["recall_target"])]["overrides"]
        for p in points
    )
    assert not any(p["recall_after"] is not None and p["recall_after"] > p["recall_target"] for p in points)
    with pytest.raises(ShapeError, match="escalations"):
        operating_points(router, data, classes, surface, FRACTIONS, RECALLS, ((-1, 0.5),))
