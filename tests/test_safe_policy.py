"""Selective ensembling (SAFE, arXiv 2510.15346): the ensemble math, the policy's decisions, the edge placing
its own token through the real gRPC path, and the simulator reading those traces."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.edge.cloud_harness import generate_with_server
from handoff.edge.evaluation.runner import variant_spec
from handoff.edge.policy import PolicyConfig, SafePolicy, WindowDecision, WindowView, make_policy
from handoff.edge.simulation.cloud_latency import CloudLatencyModel
from handoff.edge.simulation.simulate import EdgeModel, NetworkModel, simulate
from handoff.edge.simulation.traces import CloudTurn, Generation, Window, events
from handoff.shared.ensemble import ensemble_choice, ensemble_view, sharpen
from handoff.shared.errors import ShapeError

# -- the math, on hand-made arrays ---------------------------------------------------------------


def test_ensemble_view_is_the_weighted_average_on_the_union_with_unknowns_as_zero() -> None:
    ids, probs = ensemble_view(
        p_ids=[3, 1], p_logprobs=np.log([0.6, 0.3]), q_ids=[1, 7], q_logprobs=np.log([0.5, 0.4]),
        p_logprobs_at_q_ids=[np.nan, np.log(0.05)], weight=0.25,
    )  # fmt: skip
    assert ids.tolist() == [1, 3, 7]
    # 1: both known (P's own top-k value); 3: Q unknown -> 0; 7: P's value from the check point.
    assert probs == pytest.approx([0.25 * 0.3 + 0.75 * 0.5, 0.25 * 0.6, 0.25 * 0.05 + 0.75 * 0.4])
    ids, probs = ensemble_view([3], np.log([0.6]), [7], np.log([0.4]), None, 1.0)
    assert probs == pytest.approx([0.6, 0.0])  # weight 1: P alone; Q's id unknown to P counts 0


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(weight=1.5), "weight"),
        (dict(p_logprobs=[0.2, -1.0]), "p_logprobs"),
        (dict(q_ids=[[1, 2]]), "q_ids"),
        (dict(p_logprobs_at_q_ids=[-1.0]), "p_logprobs_at_q_ids"),
    ],
)
def test_ensemble_view_refuses_bad_input(bad, match) -> None:
    args = dict(p_ids=[1, 2], p_logprobs=[-0.5, -1.0], q_ids=[1, 2], q_logprobs=[-0.5, -1.0],
                p_logprobs_at_q_ids=None, weight=0.5) | bad  # fmt: skip
    with pytest.raises(ShapeError, match=match):
        ensemble_view(**args)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(2, 12).flatmap(
        lambda v: st.tuples(
            st.lists(st.floats(0.01, 1.0), min_size=v, max_size=v),
            st.lists(st.floats(0.01, 1.0), min_size=v, max_size=v),
            st.floats(0.0, 1.0),
        )
    )
)
def test_with_full_views_the_choice_is_the_argmax_of_the_full_average(case) -> None:
    p, q, w = (np.asarray(case[0]), np.asarray(case[1]), case[2])
    p, q = p / p.sum(), q / q.sum()
    mix = w * p + (1 - w) * q
    gap = np.sort(mix)[-1] - np.sort(mix)[-2]
    order_p, order_q = np.argsort(-p, kind="stable"), np.argsort(-q, kind="stable")
    got = ensemble_choice(
        ensemble_view(order_p, np.log(p[order_p]), order_q, np.log(q[order_q]), np.log(p[order_q]), w)
    )
    if gap > 1e-12:  # an exact tie may go either way in floating point
        assert got == int(np.argmax(mix))


def test_sharpen_moves_a_words_prefix_onto_its_representative() -> None:
    ids = [10, 11, 12, 13, 14]
    texts = [" comp", " computer", " co", " cat", "  "]
    probs = np.asarray([0.3, 0.25, 0.1, 0.28, 0.07])
    out = sharpen(ids, probs, texts, below=0.5)
    # " co" and " comp" both extend to " computer" (the only candidate that prefixes none): all theirs.
    assert out == pytest.approx([0.0, 0.65, 0.0, 0.28, 0.07])
    assert out.sum() == pytest.approx(probs.sum())
    assert sharpen(ids, probs, texts, below=0.3) == pytest.approx(probs)  # not smooth enough: unchanged
    assert sharpen(ids, probs, [None, " computer", None, " cat", "  "], 0.5) == pytest.approx(probs)
    # The choice follows: without sharpening " comp" wins, with it " computer".
    p_ids, p_lp = np.asarray(ids), np.log(probs)
    average = ensemble_view(p_ids, p_lp, p_ids, p_lp, None, 0.5)
    assert ensemble_choice(average) == 10
    assert ensemble_choice(average, dict(zip(ids, texts, strict=True)).get, 0.5) == 11


def test_a_placed_token_must_be_a_handover_inside_the_window() -> None:
    assert WindowDecision(2, True, token=7).checked(4).token == 7
    with pytest.raises(ShapeError, match="token"):
        WindowDecision(4, True, token=7).checked(4)
    with pytest.raises(ShapeError, match="token"):
        WindowDecision(4, False, token=7)


# -- the policy's decisions -------------------------------------------------------------------------


def window(tokens, p_top, p_probs, q_probs, kls=None) -> WindowView:
    """Q's top-2 is (token, 9) at each position; P's top-2 is (p_top, other)."""
    n = len(tokens)
    q_ids = np.stack([[t, 9] for t in tokens])
    p_ids = np.stack([[a, t if a != t else 9] for a, t in zip(p_top, tokens, strict=True)])
    return WindowView(
        token_ids=np.asarray(tokens), q_topk_ids=q_ids, q_topk_logprobs=np.log(np.asarray(q_probs)),
        q_entropy=np.ones(n), p_kls=np.zeros(n) if kls is None else np.asarray(kls, dtype=float),
        p_top1_ids=np.asarray(p_top), p_topk_ids=p_ids, p_topk_logprobs=np.log(np.asarray(p_probs)),
    )  # fmt: skip


def test_safe_keeps_consensus_and_places_the_ensembles_token_where_it_differs() -> None:
    # Position 1: P prefers 8 (0.55) to Q's 6 (0.35); Q prefers 6 (0.7) to 9 (0.2), P's 8 unknown to Q.
    w = window(
        [5, 6, 7], [5, 8, 7], [[0.9, 0.05], [0.55, 0.35], [0.8, 0.1]], [[0.9, 0.05], [0.7, 0.2], [0.8, 0.1]]
    )
    low = make_policy(PolicyConfig(kind="safe", ensemble_weight=0.3, sharpen_below=0.0))
    assert isinstance(low, SafePolicy)
    d = low.decide(w).checked(3)
    assert (d.keep, d.hand_over, d.token) == (3, False, None)  # 0.3*0.35+0.7*0.7 > 0.3*0.55: Q's token
    high = make_policy(PolicyConfig(kind="safe", ensemble_weight=0.9, sharpen_below=0.0))
    d = high.decide(w).checked(3)
    assert (d.keep, d.hand_over, d.token) == (1, True, 8)  # 0.9*0.55 > 0.9*0.35+0.1*0.7
    assert high.turn_tokens() == 1 and not high.agrees(0.0)


def test_safe_ensembles_where_the_kl_is_over_tau_even_when_the_choices_agree() -> None:
    # Both models' top-1 is 5, but the KL is over tau: ensembled; the average still picks 5 unless
    # sharpening merges 5's text into a longer candidate.
    w = window([5], [5], [[0.35, 0.3]], [[0.4, 0.3]], kls=[0.5])
    texts = {5: " comp", 9: " computer"}
    policy = make_policy(PolicyConfig(kind="safe", threshold=0.3, ensemble_weight=0.5, sharpen_below=0.5))
    assert policy.lacks_consensus(w).tolist() == [True]
    assert policy.decide(w).keep == 1  # no vocabulary attached: no texts, no sharpening
    policy._text = texts.get  # the texts attach() would give
    d = policy.decide(w)
    assert (d.keep, d.token) == (0, 9)
    calm = make_policy(PolicyConfig(kind="safe", threshold=1.0, ensemble_weight=0.5, sharpen_below=0.5))
    calm._text = texts.get
    assert calm.decide(w).keep == 1  # consensus: never ensembled


def test_safe_needs_the_clouds_views_and_valid_settings() -> None:
    n = 2
    bare = WindowView(token_ids=[1, 2], q_topk_ids=[[1, 2], [2, 1]], q_topk_logprobs=np.log([[0.6, 0.4]] * n),
                      q_entropy=[0.5, 0.5], p_kls=[0.0, 0.0], p_top1_ids=[1, 2])  # fmt: skip
    with pytest.raises(ShapeError, match="top-k views"):
        make_policy(PolicyConfig(kind="safe")).decide(bare)
    with pytest.raises(ShapeError, match="ensemble_weight"):
        PolicyConfig(kind="safe", ensemble_weight=1.2)
    with pytest.raises(ShapeError, match="sharpen_below"):
        PolicyConfig(kind="safe", sharpen_below=-0.1)
    with pytest.raises(ShapeError, match="p_topk_logprobs"):
        WindowView(token_ids=[1], q_topk_ids=[[1]], q_topk_logprobs=[[0.0]], q_entropy=[0.0],
                   p_topk_ids=[[1, 2]], p_topk_logprobs=[[0.1, -1.0]])  # fmt: skip


def test_eval_variant_names_the_settings() -> None:
    spec = variant_spec("safe:0.6:0.4", PolicyConfig())
    assert (spec.name, spec.policy.kind, spec.policy.ensemble_weight, spec.policy.sharpen_below) == (
        "safe-w0.6-s0.4",
        "safe",
        0.6,
        0.4,
    )
    assert variant_spec("safe:0.5", PolicyConfig()).name == "safe-w0.5-s0.5"
    with pytest.raises(ValueError, match="safe:W"):
        variant_spec("safe:2", PolicyConfig())


# -- tiny models through the real gRPC path ---------------------------------------------------------


@pytest.mark.parametrize("prompt", ["Sort a list.", "Write a poem about the sea."])
def test_weight_one_reproduces_cloud_only_with_the_edge_placing_every_correction(
    tiny_gguf_a, tiny_gguf_a_near, prompt
) -> None:
    # With all the weight on P and no sharpening the ensemble's argmax is P's: under greedy decoding the
    # text is P's, token for token, and P generates none of it. That holds only if P's cache follows
    # the tokens the edge placed (a stale cache would change P's later views).
    policy = PolicyConfig(kind="safe", ensemble_weight=1.0, sharpen_below=0.0, check_interval=8)
    cloud = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, policy, 160, mode="cloud", prompt=prompt)
    r = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, policy, 160, prompt=prompt)
    assert r.tokens == cloud.tokens
    counts, acc = r.counts(), r.summary()["accounting"]
    assert counts["cloud"] == counts["corrected"] == 0 and r.handoffs == 0
    assert counts["ensembled"] == acc["ensembled_tokens"] > 0 and counts["edge"] > 0
    assert acc["override_tokens"] == acc["other_cloud_tokens"] == 0
    assert acc["round_trips"] == 1 + r.check_points + r.rollbacks  # placed tokens cost no round trip
    for rec in r.records:
        if rec.source == "ensembled":
            assert rec.replaced_token_id != rec.token_id == rec.p_topk_ids[0] and rec.checked


def test_weight_zero_is_the_edges_own_text(tiny_gguf_a, tiny_gguf_a_near) -> None:
    policy = PolicyConfig(kind="safe", ensemble_weight=0.0, sharpen_below=0.0)
    edge = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, policy, 120, mode="edge")
    r = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, policy, 120)
    assert r.tokens == edge.tokens and r.counts()["ensembled"] == 0 and r.check_points > 0


def test_each_placed_token_is_the_ensembles_choice_from_the_recorded_views(tiny_gguf_a, tiny_gguf_b) -> None:
    # Two unrelated tiny models disagree often; with equal weights the ensemble sides with either.
    policy = PolicyConfig(kind="safe", ensemble_weight=0.5, sharpen_below=0.0, threshold=0.2)
    r = generate_with_server(tiny_gguf_a, tiny_gguf_b, policy, 120)
    placed = [rec for rec in r.records if rec.source == "ensembled"]
    assert placed and len(r.records) == 120
    exact = 0
    for rec in placed:
        assert rec.token_id != rec.replaced_token_id
        # The record keeps both top-k views but not P's values at Q's ids beyond P's top-k: with
        # those as 0 the reference is the live choice, unless the live one won on such a value.
        ref = ensemble_choice(
            ensemble_view(rec.p_topk_ids, rec.p_topk_logprobs, rec.q_topk_ids, rec.q_topk_logprobs, None, 0.5)
        )
        won_on_unrecorded = rec.token_id in rec.q_topk_ids and rec.token_id not in rec.p_topk_ids
        assert ref == rec.token_id or won_on_unrecorded
        exact += ref == rec.token_id
    assert exact >= 1


# -- the simulator reads the placed tokens ----------------------------------------------------------

CLOUD = CloudLatencyModel.from_bench(
    {
        "rtt_s": 0.0,
        "open": [{"prompt_tokens": 16, "seconds": 0.5}],
        "check": [{"sessions": 1, "tokens": 1, "seconds": 0.3}],
        "decode": [{"sessions": 1, "seconds_per_token": 0.1, "first_token_s": 0.2}],
    }
)


def test_a_placed_token_is_a_cut_window_without_a_cloud_turn() -> None:
    def rec(pos, source, up):
        return {"position": pos, "token_id": 5, "source": source, "checked": True, "kl": 0.1,
                "q_topk_ids": [5, 7], "q_topk_logprobs": [-0.1, -2.5], "p_logprob": -0.2,
                "p_topk_ids": [5, 9], "p_topk_logprobs": [-0.2, -1.9], "t_generated": None,
                "t_uploaded": up, "t_answered": up}  # fmt: skip

    records = [rec(16, "edge", 1.0), rec(17, "edge", 1.0), rec(18, "ensembled", 1.0) | {"replaced_token_id": 6},
               rec(19, "edge", 2.0), rec(20, "edge", 2.0), rec(21, "edge", 2.0), rec(22, "edge", 2.0)]  # fmt: skip
    meta = {"prompt_ids": list(range(16)), "max_tokens": 7, "sampling": {"temperature": 0.0},
            "policy": {"check_interval": 4, "handback_tokens": 1, "lookahead_windows": 0, "top_k": 2, "kind": "safe"}}  # fmt: skip
    gen = Generation(meta, records, {"mode": "hybrid", "open_bytes": [100, 50]}, "hand-made")
    evs = events(gen)
    assert not any(isinstance(e, CloudTurn) for e in evs)
    assert [(e.first, e.drafted, e.kept, e.cut, e.placed is not None) for e in evs if isinstance(e, Window)] == [
        (16, 4, 2, True, True), (19, 4, 4, False, False),
    ]  # fmt: skip
    t = simulate(gen, NetworkModel(rtt_s=0.2), EdgeModel(token_s=0.1), CLOUD)
    assert len(t.commits) == len(records) and t.handoffs == 0 and t.rollbacks == 0 and t.check_points == 2
