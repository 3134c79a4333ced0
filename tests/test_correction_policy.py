"""The correction policy: P's token replaces Q's at the first disagreement of a checked window, and the
edge resumes at once; under greedy decoding the output is P's greedy text token for token."""

from __future__ import annotations

import numpy as np
import pytest

from handoff.edge.cloud_harness import generate_with_server
from handoff.edge.policy import CorrectionPolicy, PolicyConfig, WindowView, make_policy
from handoff.shared.errors import ShapeError


def view(tokens, p_top1, kls=None) -> WindowView:
    n = len(tokens)
    return WindowView(
        token_ids=np.asarray(tokens),
        q_topk_ids=np.tile(np.arange(3), (n, 1)),
        q_topk_logprobs=np.log(np.tile([0.5, 0.3, 0.2], (n, 1))),
        q_entropy=np.full(n, 1.0),
        p_kls=np.zeros(n) if kls is None else np.asarray(kls, dtype=float),
        p_top1_ids=None if p_top1 is None else np.asarray(p_top1),
    )


def test_cuts_at_the_first_disagreement_with_ps_argmax() -> None:
    policy = make_policy(PolicyConfig(kind="correction"))
    assert isinstance(policy, CorrectionPolicy) and policy.turn_tokens() == 1
    d = policy.decide(view([5, 6, 7, 8], [5, 6, 9, 1])).checked(4)
    assert (d.keep, d.hand_over) == (2, True)
    assert policy.decide(view([5, 6, 7], [9, 6, 7])).keep == 0


def test_keeps_a_window_where_p_agrees_however_large_the_kl() -> None:
    policy = make_policy(PolicyConfig(kind="correction", threshold=0.0))
    d = policy.decide(view([5, 6, 7], [5, 6, 7], kls=[3.0, 9.0, 0.5]))
    assert (d.keep, d.hand_over) == (3, False)  # no threshold: only P's choice counts


def test_the_divergence_variant_also_corrects_where_the_trigger_fires() -> None:
    from handoff.edge.policy import DivergenceCorrectionPolicy

    policy = make_policy(PolicyConfig(kind="correction-kl", threshold=0.5))
    assert isinstance(policy, DivergenceCorrectionPolicy) and policy.turn_tokens() == 1
    # P agrees everywhere, but position 1's KL is over tau: corrected there.
    d = policy.decide(view([5, 6, 7], [5, 6, 7], kls=[0.1, 0.9, 0.0]))
    assert (d.keep, d.hand_over) == (1, True)
    # A disagreement before the first KL over tau wins.
    assert policy.decide(view([5, 6, 7], [9, 6, 7], kls=[0.1, 0.9, 0.0])).keep == 0
    # Neither: kept.
    d = policy.decide(view([5, 6, 7], [5, 6, 7], kls=[0.1, 0.2, 0.0]))
    assert (d.keep, d.hand_over) == (3, False)


def test_needs_the_clouds_answer() -> None:
    with pytest.raises(ShapeError, match="p_top1_ids"):
        make_policy(PolicyConfig(kind="correction")).decide(view([5, 6], None))
    with pytest.raises(ShapeError, match="p_top1_ids"):
        view([5, 6], [5])  # one per position


@pytest.mark.parametrize("prompt", ["Sort a list.", "Write a poem about the sea.", "Explain recursion."])
def test_greedy_correction_reproduces_cloud_only_text_with_one_cloud_token_per_disagreement(
    tiny_gguf_a, tiny_gguf_a_near, prompt
) -> None:
    # P = A, Q = A with a little noise: they mostly agree, and disagree now and then.
    policy = PolicyConfig(kind="correction", check_interval=8)
    cloud = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, policy, 200, mode="cloud", prompt=prompt)
    r = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, policy, 200, prompt=prompt)
    assert r.tokens == cloud.tokens
    counts = r.counts()
    acc = r.summary()["accounting"]
    assert acc["override_tokens"] == counts["corrected"] and acc["other_cloud_tokens"] == 0
    assert acc["checked_positions"] >= counts["edge"] + counts["corrected"]  # every position checked
    assert acc["round_trips"] == 1 + r.check_points + r.handoffs + r.rollbacks
    # Every cloud token is a correction of a disagreement: no hand-back phase, no other cloud tokens.
    assert counts["cloud"] == 0 and counts["corrected"] == r.handoffs > 0 and counts["edge"] > 0
    for rec in r.records:
        if rec.source == "corrected":
            assert rec.replaced_token_id != rec.token_id  # a real disagreement, not a formality
        else:
            assert rec.p_topk_ids is not None and rec.p_topk_ids[0] == rec.token_id  # P agreed


def test_correction_uses_fewer_cloud_tokens_than_rollback_at_the_same_text(
    tiny_gguf_a, tiny_gguf_a_near
) -> None:
    rollback = PolicyConfig(kind="rollback", threshold=0.0, handback_tokens=4)  # every window handed over
    correction = PolicyConfig(kind="correction")
    cloud = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, correction, 120, mode="cloud")
    a = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, rollback, 120)
    b = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, correction, 120)
    assert a.tokens == b.tokens == cloud.tokens  # both give P's greedy text here
    cloud_a = a.counts()["cloud"] + a.counts()["corrected"]
    cloud_b = b.counts()["cloud"] + b.counts()["corrected"]
    assert cloud_b < cloud_a / 4


@pytest.mark.real_models
@pytest.mark.slow
def test_default_pair_greedy_correction_equals_cloud_only(run_handoff) -> None:
    args = ["generate", "--max-tokens", "160", "--json"]
    cloud = run_handoff(*args, "--cloud-only")
    corr = run_handoff(*args, "--policy", "correction")
    assert cloud.returncode == 0, cloud.stderr[-2000:]
    assert corr.returncode == 0, corr.stderr[-2000:]
    import json

    c, r = json.loads(cloud.stdout), json.loads(corr.stdout)
    assert r["text"] == c["text"] and r["tokens"] == c["tokens"] >= 100
    assert r["by_source"]["cloud"] == 0 and 0 < r["by_source"]["corrected"] < r["tokens"] // 4
