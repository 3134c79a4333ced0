"""`handoff router budget`: the (router, override gate) operating point for an override budget."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from handoff.edge.policy import RouterModel
from handoff.edge.policy.features import SCALAR_FEATURES
from handoff.edge.policy.override import OVERRIDE_FEATURES, OverrideGate
from handoff.edge.routing.budget import best_within, operating_points
from handoff.edge.routing.data import Generation, p_wrong_rows, to_data, wrong_rows
from handoff.edge.routing.report import corrected_stats
from handoff.shared.errors import ShapeError

REPO = Path(__file__).resolve().parents[1]
G = len(OVERRIDE_FEATURES)
F = len(SCALAR_FEATURES)


def _data(seed: int = 0, gens: int = 12, n: int = 30):
    """Hand-made labelled generations: Q unsure at random positions, P disagreeing at some of them,
    every third disagreement divergent."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(gens):
        top1 = rng.uniform(0.2, 0.99, size=n)  # [n]
        tokens = np.where(rng.uniform(size=n) < 1.2 - top1, 6, 5)  # P's token; Q's top-1 is 5
        q_probs = np.stack([top1, (1 - top1) * 0.7, (1 - top1) * 0.3], axis=1)  # [n, 3]
        p_first = rng.uniform(0.3, 0.95, size=n)
        dis = tokens != 5
        divergent = dis & (np.cumsum(dis) % 3 == 0)
        out.append(Generation(
            task_id=f"t{i}", suite="s", correct=True, prompt_ids=(1, 2, i), tokens=tokens,
            q_topk_ids=np.tile([5, 6, 7], (n, 1)), q_topk_logprobs=np.log(q_probs),
            q_entropy=-(q_probs * np.log(q_probs)).sum(axis=1), source="hand-made", divergent=divergent,
            p_topk_ids=np.stack([tokens, np.full(n, 7)], axis=1),
            p_topk_logprobs=np.log(np.stack([p_first, (1 - p_first) / 2], axis=1)),
        ))  # fmt: skip
    return to_data(out, np.zeros(16, dtype=np.int64))


def _router() -> RouterModel:
    """Scores 1 - Q's top-1 probability (higher: check); the gate overrides where P is sure of its token."""
    w = np.zeros((F, 1))
    w[SCALAR_FEATURES.index("q_top1_prob"), 0] = -8.0
    gw = np.zeros(G)
    gw[OVERRIDE_FEATURES.index("p_top1_logprob")] = 3.0
    gate = OverrideGate(np.zeros(G), np.ones(G), gw, 1.0, 0.5)
    return RouterModel(np.zeros(F), np.ones(F), ((w, np.asarray([4.0])),), 0.5, "00" * 32, 16, override=gate)


FRACTIONS, RECALLS = (0.1, 0.2, 0.4, 1.0), (0.5, 0.8, 1.0)


def test_every_point_is_counted_on_the_corrected_positions() -> None:
    data = _data()
    points = operating_points(
        _router(), data, np.zeros(16, dtype=np.int64), np.arange(16), FRACTIONS, RECALLS
    )
    assert len(points) == len(FRACTIONS) * len(RECALLS)
    by = {(p["fraction"], p["recall_target"]): p for p in points}
    # Everything checked, every divergent disagreement taken: every answer kept.
    full = by[(1.0, 1.0)]
    assert full["checked"] == 1.0 and full["recall"] == 1.0 and full["reproduced"] == 1.0
    assert full["overrides"] == pytest.approx(data.disagreements.mean() * full["taken"])
    assert 0.0 < full["taken"] < 1.0  # the gate declines some neutral ones
    for r in RECALLS:  # more checks, more overrides and no fewer answers kept
        row = [by[(f, r)] for f in FRACTIONS]
        assert all(a["overrides"] <= b["overrides"] for a, b in pairwise(row))
        assert all(a["reproduced"] <= b["reproduced"] for a, b in pairwise(row))
        assert all(abs(p["checked"] - p["fraction"]) < 0.05 for p in row)
    for f in FRACTIONS:  # a gate keeping more of the divergent disagreements takes more of them
        col = [by[(f, r)] for r in RECALLS]
        assert all(a["overrides"] <= b["overrides"] for a, b in pairwise(col))
        assert all(a["taken"] <= b["taken"] for a, b in pairwise(col))
    for r in RECALLS:  # alone (every position checked) the gate keeps its target recall
        assert by[(1.0, r)]["recall"] >= r


def test_the_budgets_point_keeps_the_most_answers_within_it() -> None:
    data = _data(1)
    points = operating_points(
        _router(), data, np.zeros(16, dtype=np.int64), np.arange(16), FRACTIONS, RECALLS
    )
    budget = sorted(p["overrides"] for p in points)[len(points) // 2]
    best = best_within(points, budget)
    fit = [p for p in points if p["overrides"] <= budget]
    assert best is not None and best["overrides"] <= budget
    assert best["reproduced"] == max(p["reproduced"] for p in fit)
    capped = best_within(points, 1.0, max_checked=0.25)
    assert capped is not None and capped["checked"] <= 0.25
    assert best_within(points, -1.0) is None


def _hand(tokens, divergent=None, rescuing=None) -> Generation:
    """A generation with Q's top-1 = 5 everywhere: a disagreement wherever P's token is not 5."""
    tokens = np.asarray(tokens)
    n = len(tokens)
    lp = np.log(np.tile([0.6, 0.3, 0.1], (n, 1)))
    return Generation(
        task_id="h", suite="s", correct=rescuing is None, prompt_ids=(len(tokens),), tokens=tokens,
        q_topk_ids=np.tile([5, 6, 7], (n, 1)), q_topk_logprobs=lp, q_entropy=np.full(n, 0.9),
        source="hand-made", max_tokens=n,
        divergent=np.zeros(n, dtype=bool) if divergent is None else np.asarray(divergent, dtype=bool),
        rescuing=None if rescuing is None else np.asarray(rescuing, dtype=bool),
    )  # fmt: skip


def test_p_wrong_generations_count_as_answered_when_q_rescues_them() -> None:
    """corrected_stats along P's text: a P-right generation is kept when its divergent disagreements
    are all corrected; a P-wrong one is answered when its first uncorrected disagreement is rescuing."""
    gens = [
        _hand([6, 5, 6, 5], divergent=[1, 0, 0, 0]),  # P right: needs position 0 corrected
        _hand([5, 6, 6, 5], divergent=[0, 0, 0, 0]),  # P right: nothing matters
        _hand([6, 6, 5, 5], rescuing=[0, 1, 0, 0]),  # P wrong: Q's token at 1 rescues it
        _hand([6, 5, 5, 6], rescuing=[0, 0, 0, 0]),  # P wrong: nothing rescues it
    ]
    data = to_data(gens, np.zeros(16, dtype=np.int64))
    assert not data.labels[8:].any()  # P-wrong generations: never a position to override
    n = len(data.labels)
    everything = corrected_stats(data, np.ones(n, dtype=bool), np.ones(n, dtype=bool))
    # Correct every disagreement: both P-right answers kept, P's wrong answers kept wrong.
    assert everything["reproduced"] == 1.0 and everything["rescued"] == 0.0 and everything["answers"] == 0.5
    take = np.zeros(n, dtype=bool)
    take[[0, 8]] = True  # correct generation 0's position 0 and generation 2's position 0, nothing else
    some = corrected_stats(data, np.ones(n, dtype=bool), take)
    assert some["reproduced"] == 1.0 and some["rescued"] == 0.5 and some["answers"] == 0.75
    assert some["overrides"] == pytest.approx(2 / n)
    take[8] = False  # generation 2's first uncorrected disagreement is now position 0: not rescuing
    assert corrected_stats(data, np.ones(n, dtype=bool), take)["answers"] == 0.5
    none = corrected_stats(data, np.zeros(n, dtype=bool), take)  # nothing checked
    assert none["reproduced"] == 0.5 and none["rescued"] == 0.0 and none["overrides"] == 0.0
    # Without P-wrong labels "answers" is "reproduced", as before.
    plain = corrected_stats(data.subset(np.asarray([True, True, False, False])), np.ones(8, dtype=bool),
                            np.ones(8, dtype=bool))  # fmt: skip
    assert plain["rescued"] is None and plain["answers"] == plain["reproduced"] == 1.0


def test_the_gate_learns_p_wrong_rows_as_asked() -> None:
    gens = [
        _hand([6, 5, 6, 5], divergent=[1, 0, 0, 0]),
        _hand([6, 6, 5, 5], rescuing=[0, 1, 0, 0]),
        _hand([6, 5, 5, 6], rescuing=[0, 0, 0, 0]),
    ]
    data = to_data(gens, np.zeros(16, dtype=np.int64))
    wrong, rescuing = wrong_rows(data)  # rows: the 2 + 2 + 2 disagreements, in order
    assert wrong.tolist() == [False, False, True, True, True, True]
    assert rescuing.tolist() == [False, False, False, True, False, False]
    assert p_wrong_rows(wrong, rescuing, "all").all()
    assert p_wrong_rows(wrong, rescuing, "rescuing").tolist() == [True, True, False, True, False, False]
    assert p_wrong_rows(wrong, rescuing, "none").tolist() == [True, True, False, False, False, False]
    with pytest.raises(ValueError, match="all, rescuing or none"):
        p_wrong_rows(wrong, rescuing, "some")
    with pytest.raises(ShapeError, match="wrong"):
        p_wrong_rows(wrong, rescuing[:-1], "all")


def test_the_budget_prefers_answers_to_kept_p_answers() -> None:
    """A point that keeps fewer of P's right answers but rescues more of its wrong ones wins when it
    answers more in all."""
    a = {"overrides": 0.02, "checked": 0.2, "recall": 1.0, "reproduced": 1.0, "answers": 0.5}
    b = {"overrides": 0.01, "checked": 0.2, "recall": 0.5, "reproduced": 0.8, "answers": 0.6}
    assert best_within([a, b], 0.05) is b
    assert best_within([a, {**b, "answers": 0.5}], 0.05)["overrides"] == 0.01  # a tie: the cheaper


def test_bad_grids_and_a_router_without_a_gate_are_refused() -> None:
    data, router = _data(), _router()
    classes, surface = np.zeros(16, dtype=np.int64), np.arange(16)
    with pytest.raises(ShapeError, match="fractions"):
        operating_points(router, data, classes, surface, (0.0, 0.5), RECALLS)
    with pytest.raises(ShapeError, match="recalls"):
        operating_points(router, data, classes, surface, FRACTIONS, ())
    from dataclasses import replace

    with pytest.raises(ValueError, match="no override gate"):
        operating_points(replace(router, override=None), data, classes, surface, FRACTIONS, RECALLS)


def test_router_budget_writes_the_chosen_thresholds(tmp_path: Path, capsys) -> None:
    """The command on the committed training traces and labels, with the committed scalar-gate router."""
    from handoff.cli import main
    from handoff.edge.policy.router import load_router

    out, points = tmp_path / "budget.json", tmp_path / "points.json"
    args = ["router", "budget", str(REPO / "docs/router/router-t25-ov70.json"),
            str(REPO / "docs/router/train/large.jsonl.gz"), "--labels", str(REPO / "docs/router/labels/train.jsonl"),
            "--fractions", "0.1,0.2,0.3", "--recalls", "0.6,0.9"]  # fmt: skip
    assert main([*args, "--max-overrides", "0.03", "--escalate", "1:0.3,2:0.7", "--out", str(out),
                 "--json", str(points)]) == 0  # fmt: skip
    result = json.loads(points.read_text())
    best = result["best"]
    # 3 fractions x (2 recalls + (1, 0.3) after each + (2, 0.7) after 0.9 only: never looser)
    assert len(result["points"]) == 3 * 5 and best["overrides"] <= 0.03
    router = load_router(out)
    assert router.threshold == best["router_threshold"]
    assert router.override is not None and router.override.threshold == best["gate_threshold"]
    assert router.override.escalate_after == best["escalate_after"]
    assert router.override.threshold_after == best["threshold_after"]
    assert router.meta["operating_point"]["max_overrides"] == 0.03
    assert "best within" in capsys.readouterr().out
    assert main([*args, "--max-overrides", "0"]) != 0  # nothing fits
    assert main([*args, "--max-overrides", "0.03", "--escalate", "2"]) != 0  # K:RECALL
