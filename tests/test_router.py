"""The learned edge router: its features, its file, its training, its offline metrics, and the gated
rounds it drives (unchecked-by-design tokens committed at once, flagged positions checked by P)."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from handoff.edge.cloud_harness import generate_with_server
from handoff.edge.policy import PolicyConfig, RouterMismatch, RouterModel, make_policy
from handoff.edge.policy.features import SCALAR_FEATURES, TOKEN_CLASSES, scalar_features, token_classes
from handoff.edge.routing.data import read_generations, to_data
from handoff.edge.routing.metrics import at_threshold, auc, curve
from handoff.edge.routing.train import TrainConfig, fit_logistic, pca, train_router
from handoff.shared.errors import ShapeError

F = len(SCALAR_FEATURES)
COL = {name: i for i, name in enumerate(SCALAR_FEATURES)}


def one_feature_router(
    feature: str, offset: float, *, digest: str = "00" * 32, size: int = 10, threshold=0.5
):
    """A router whose logit is `feature - offset` (no standardisation): checks where feature >= offset."""
    w = np.zeros((F, 1))
    w[COL[feature], 0] = 1.0
    return RouterModel(np.zeros(F), np.ones(F), ((w, np.asarray([-offset])),), threshold, digest, size)


# -- features -----------------------------------------------------------------------------------


def test_token_classes_of_byte_level_strings() -> None:
    toks = [
        b"12",
        "\u0120the".encode(),
        b"ing",
        "\u010a".encode(),
        b"(",
        b"<|im_end|>",
        b" ",
        "\u0120x1".encode(),
    ]
    got = [TOKEN_CLASSES[c] for c in token_classes(toks)]
    assert got == [
        "digit",
        "word_start",
        "word_piece",
        "whitespace",
        "symbol",
        "special",
        "whitespace",
        "digit",
    ]


def test_scalar_features_shape_and_values() -> None:
    lp = np.log([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25]])
    x = scalar_features(
        lp, np.asarray([0.8, 1.1]), np.asarray([0, 4]), np.asarray([0, 5]), np.zeros(2), np.zeros(2)
    )
    assert x.shape == (2, F)
    assert x[0, COL["q_margin"]] == pytest.approx(np.log(0.7 / 0.2))
    assert x[1, COL["q_top1_prob"]] == pytest.approx(0.4)
    assert x[1, COL["q_logprob_7"]] == pytest.approx(np.log(0.25))  # k < 8: padded with the last value
    assert x[1, COL["class_symbol"]] == 1.0 and x[1, COL["class_digit"]] == 0.0
    assert x[1, COL["log_position"]] == pytest.approx(np.log(6))
    with pytest.raises(ShapeError, match="topk_logprobs"):
        scalar_features(lp[:, :1], np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2))
    with pytest.raises(ShapeError, match="entropy"):
        scalar_features(lp, np.zeros(3), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros(2))
    with pytest.raises(ShapeError, match="token_class"):
        scalar_features(lp, np.zeros(2), np.asarray([0, 9]), np.zeros(2), np.zeros(2), np.zeros(2))


# -- the file -----------------------------------------------------------------------------------


def test_router_file_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    layers = (
        (rng.normal(size=(F + 3, 4)), rng.normal(size=4)),
        (rng.normal(size=(4, 1)), rng.normal(size=1)),
    )
    router = RouterModel(
        rng.normal(size=F + 3), rng.uniform(0.5, 2, F + 3), layers, 0.3, "ab" * 32, 100,
        hidden_mean=rng.normal(size=6), hidden_proj=rng.normal(size=(6, 3)), meta={"note": "x"},
    )  # fmt: skip
    path = tmp_path / "router.json"
    router.save(path)
    back = RouterModel.from_json(json.loads(path.read_text()))
    rows = router.rows(rng.normal(size=(5, F)), rng.normal(size=(5, 6)))
    # Stored as float32: the probabilities agree to float32 precision.
    np.testing.assert_allclose(back.probabilities(rows), router.probabilities(rows), atol=1e-5)
    assert back.threshold == 0.3 and back.hidden_dims == 3 and back.meta == {"note": "x"}
    with pytest.raises(ShapeError, match="hidden state"):
        back.rows(np.zeros((1, F)), None)
    bad = json.loads(path.read_text()) | {"version": 99}
    with pytest.raises(RouterMismatch, match="version"):
        RouterModel.from_json(bad)
    with pytest.raises(RouterMismatch, match="not a handoff router"):
        RouterModel.from_json({"format": "other"})


def test_router_refuses_another_vocabulary(tmp_path: Path, tiny_gguf_a) -> None:
    from handoff.edge.cloud_harness import vocabulary_of

    vocab = vocabulary_of(tiny_gguf_a)
    fp = vocab.fingerprint
    good = one_feature_router("q_entropy", 1.0, digest=fp.digest.hex(), size=fp.vocab_size)
    good.check_vocabulary(vocab)  # no error
    bad = replace(good, vocab_digest="11" * 32)
    path = tmp_path / "bad.json"
    bad.save(path)
    policy = make_policy(PolicyConfig(kind="router", router=str(path)))
    with pytest.raises(RouterMismatch, match="trained for vocabulary"):
        policy.attach(vocab)


def test_the_gates_previous_position_is_the_one_before_even_after_redrafting(
    tmp_path: Path, tiny_gguf_a
) -> None:
    """Drafting ahead gates positions a correction then drops; the redrafted position must read its
    true predecessor's entropy (a feature), as along P's text in training."""
    from types import SimpleNamespace

    from handoff.edge.cloud_harness import vocabulary_of

    vocab = vocabulary_of(tiny_gguf_a)
    fp = vocab.fingerprint
    path = tmp_path / "prev.json"
    one_feature_router("prev_entropy", 1.0, digest=fp.digest.hex(), size=fp.vocab_size).save(path)
    policy = make_policy(PolicyConfig(kind="router", router=str(path)))
    policy.attach(vocab)
    policy.begin()

    def step(entropy: float):
        return SimpleNamespace(
            topk_logprobs=np.asarray([-0.1, -2.0]), entropy=entropy, token_id=5, hidden=None
        )

    first = [policy.gate(step(h), t) for t, h in enumerate([0.5, 3.0, 0.2, 4.0])]
    # Positions 2 and 3 were drafted behind a check at 1 that P corrected: 2 is drafted again.
    again = policy.gate(step(0.9), 2)
    assert again == pytest.approx(first[2])  # reads position 1's entropy (3.0), not 3's (4.0)
    assert policy.gate(step(0.9), 3) != pytest.approx(first[3])  # now 2's redrafted entropy (0.9)
    # A position gated with none before it (the first, or after a restart) reads zeros.
    policy.begin()
    assert policy.gate(step(3.0), 0) == pytest.approx(first[0])


def test_router_policy_needs_a_file() -> None:
    with pytest.raises(ShapeError, match="router file"):
        make_policy(PolicyConfig(kind="router"))
    with pytest.raises(ShapeError, match="gate_threshold"):
        PolicyConfig(kind="router", gate_threshold=1.5)


# -- training and metrics -----------------------------------------------------------------------


def test_auc_matches_pair_counting() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 6, 40).astype(float)  # ties on purpose
    labels = rng.random(40) < 0.3
    pos, neg = scores[labels], scores[~labels]
    ref = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auc(scores, labels) == pytest.approx(ref)
    assert auc(scores, np.zeros(40, dtype=bool)) is None


def test_at_threshold_counts_reproduced_generations() -> None:
    scores = np.asarray([0.9, 0.1, 0.8, 0.2, 0.7])
    labels = np.asarray([True, False, True, True, False])
    group = np.asarray([0, 0, 1, 1, 2])
    m = at_threshold(scores, labels, group, 0.5)
    assert m["checked"] == pytest.approx(3 / 5) and m["recall"] == pytest.approx(2 / 3)
    assert m["reproduced"] == pytest.approx(2 / 3)  # generation 1 misses its position 3
    assert [c["checked"] for c in curve(scores, labels, group, [0.2, 1.0])] == [0.2, 1.0]


def test_logistic_fit_matches_a_known_optimum() -> None:
    # Data drawn from a logistic model: the fit recovers its weights.
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20000, 3))
    true_w, true_b = np.asarray([2.0, -1.0, 0.0]), -1.5
    y = rng.random(20000) < 1 / (1 + np.exp(-(x @ true_w + true_b)))
    w, b = fit_logistic(x, y, l2=0.0)
    np.testing.assert_allclose(w, true_w, atol=0.1)
    assert b == pytest.approx(true_b, abs=0.1)


def test_pca_whitens_the_leading_directions() -> None:
    rng = np.random.default_rng(3)
    h = rng.normal(size=(500, 2)) @ np.asarray([[5.0, 0, 0, 0], [0, 0, 1.0, 0]]) + rng.normal(
        0, 0.01, (500, 4)
    )
    mean, proj = pca(h, 2)
    z = (h - mean) @ proj
    np.testing.assert_allclose(z.std(axis=0, ddof=1), [1, 1], atol=1e-6)
    assert abs(proj[0, 0]) > 10 * abs(proj[2, 0])  # the first direction is the big one


def _write_synthetic_traces(path: Path, n_gen: int, seed: int) -> None:
    """Cloud-only traces with a planted rule: P differs from Q exactly where Q's top-1 prob < 0.5."""
    rng = np.random.default_rng(seed)
    with gzip.open(path, "wt") as f:
        for g in range(n_gen):
            f.write(json.dumps({"record": "generation", "prompt_ids": [1, 2, g], "task_id": f"t{g}",
                                "suite": ["a", "b"][g % 2], "correct": True}) + "\n")  # fmt: skip
            for t in range(30):
                top1 = rng.uniform(0.2, 0.99)
                rest = (1 - top1) * np.asarray([0.6, 0.3, 0.1])
                probs = np.concatenate([[top1], rest])
                order = np.argsort(-probs)
                ids = [5, 6, 7, 8]
                q_ids = [ids[i] for i in order]
                token = q_ids[0] if top1 >= 0.5 else q_ids[1]
                f.write(json.dumps({
                    "record": "token", "position": 3 + t, "token_id": token, "source": "cloud",
                    "q_topk_ids": q_ids, "q_topk_logprobs": np.log(probs[order]).tolist(),
                    "q_entropy": float(-(probs * np.log(probs)).sum()),
                }) + "\n")  # fmt: skip
            f.write(json.dumps({"record": "summary", "mode": "cloud"}) + "\n")


def test_training_on_synthetic_traces_recovers_a_planted_rule(tmp_path: Path) -> None:
    _write_synthetic_traces(tmp_path / "train.jsonl.gz", 40, 0)
    _write_synthetic_traces(tmp_path / "val.jsonl.gz", 20, 1)
    _write_synthetic_traces(tmp_path / "test.jsonl.gz", 20, 2)
    classes = np.zeros(10, dtype=np.int8)
    train, val, test = (
        to_data(read_generations([tmp_path / f"{n}.jsonl.gz"]), classes) for n in ("train", "val", "test")
    )
    assert len(train.generations) == 40 and train.labels.mean() == pytest.approx(0.38, abs=0.1)
    router = train_router(
        train,
        val,
        TrainConfig(hidden_dims=0, l2=1e-4, target_checked=0.4),
        vocab_digest="00" * 32,
        vocab_size=10,
    )
    scores = router.probabilities(router.rows(test.scalars, None))
    assert auc(scores, test.labels) > 0.99
    m = at_threshold(scores, test.labels, test.group, router.threshold)
    assert m["recall"] > 0.95 and m["checked"] < 0.5
    # The rule is on the top-1 probability: the largest weight (standardised features) is there, negative.
    w = router.layers[0][0][:, 0]
    top1_like = {COL["q_top1_prob"], COL["q_logprob_0"], COL["q_margin"]}
    assert int(np.argmax(np.abs(w))) in top1_like and w[COL["q_top1_prob"]] < 0
    # The MLP learns it too.
    mlp = train_router(train, val, TrainConfig(model="mlp", hidden_dims=0, target_checked=0.4),
                       vocab_digest="00" * 32, vocab_size=10)  # fmt: skip
    assert auc(mlp.probabilities(mlp.rows(test.scalars, None)), test.labels) > 0.97


def test_a_generation_without_qs_view_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(
        "\n".join(json.dumps(r) for r in [
            {"record": "generation", "prompt_ids": [1]},
            {"record": "token", "position": 1, "token_id": 3, "source": "cloud"},
            {"record": "summary", "mode": "cloud"},
        ]) + "\n"
    )  # fmt: skip
    with pytest.raises(ShapeError, match="full cloud-only traces"):
        read_generations([path])


# -- gated rounds on tiny models ----------------------------------------------------------------


def _router_file(tmp_path: Path, edge_path, feature: str, offset: float, name: str) -> str:
    from handoff.edge.cloud_harness import vocabulary_of

    fp = vocabulary_of(edge_path).fingerprint
    path = tmp_path / name
    one_feature_router(feature, offset, digest=fp.digest.hex(), size=fp.vocab_size).save(path)
    return str(path)


def test_a_router_that_checks_everything_writes_ps_greedy_text(
    tmp_path, tiny_gguf_a, tiny_gguf_a_near
) -> None:
    router = _router_file(
        tmp_path, tiny_gguf_a_near, "q_top1_prob", -1e6, "all.json"
    )  # logit huge: check all
    policy = PolicyConfig(kind="router", router=router)
    cloud = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, policy, 120, mode="cloud")
    r = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, policy, 120)
    assert r.tokens == cloud.tokens
    counts = r.counts()
    assert counts["unchecked"] == 0 and counts["cloud"] == 0 and counts["corrected"] > 0
    acc = r.accounting()
    assert acc["checked_positions"] == counts["edge"] + counts["corrected"]  # one check per position
    assert all(rec.gate_score is not None and rec.checked for rec in r.records)


def test_a_router_that_checks_nothing_streams_qs_text_unchecked_by_design(
    tmp_path, tiny_gguf_a, tiny_gguf_a_near
) -> None:
    router = _router_file(tmp_path, tiny_gguf_a_near, "q_top1_prob", 1e6, "none.json")  # never checks
    policy = PolicyConfig(kind="router", router=router)
    edge = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, policy, 80, mode="edge")
    r = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, policy, 80)
    assert r.tokens == edge.tokens  # Q's own greedy text
    assert r.check_points == 0 and r.accounting()["checked_positions"] == 0
    assert r.bytes_sent > 0  # P still received every token
    counts = r.counts()
    assert counts["unchecked_by_design"] == counts["unchecked"] == len(r.records)
    assert all(rec.unchecked == "by_design" and rec.t_uploaded is None for rec in r.records)


def test_a_partial_gate_checks_only_flagged_positions_against_ps_own_prefix(
    tmp_path, tiny_gguf_a, tiny_gguf_b
) -> None:
    # Q = B, P = A: they disagree often. Check where Q's entropy is in its upper half.
    edge = generate_with_server(tiny_gguf_a, tiny_gguf_b, PolicyConfig(), 60, mode="edge")
    median = float(np.median([rec.q_entropy for rec in edge.records]))
    router = _router_file(tmp_path, tiny_gguf_b, "q_entropy", median, "half.json")
    # Waiting for each check point (lookahead 0), then drafting on behind one (lookahead 1).
    r = generate_with_server(
        tiny_gguf_a, tiny_gguf_b, PolicyConfig(kind="router", router=router, lookahead_windows=0), 60
    )
    ahead = generate_with_server(
        tiny_gguf_a, tiny_gguf_b, PolicyConfig(kind="router", router=router, lookahead_windows=1), 60
    )
    checked = [rec for rec in r.records if rec.checked]
    unchecked = [rec for rec in r.records if not rec.checked]
    assert checked and unchecked
    assert all(rec.unchecked == "by_design" and rec.gate_score < 0.5 for rec in unchecked)
    assert all(rec.gate_score >= 0.5 for rec in checked)
    # P judged each flagged position on the committed prefix (so it had every unchecked token too):
    # its choice there is what P alone picks after that prefix.
    from handoff.shared.llama_cpp_model import LlamaCppModel

    with LlamaCppModel(tiny_gguf_a, n_ctx=1024, n_threads=1) as p:
        for rec in checked:
            prefix = r.prompt_ids + [x.token_id for x in r.records if x.position < rec.position]
            p.reset()
            p.eval(prefix)
            p_choice = int(np.argmax(p.next_logits()))
            assert (rec.token_id == p_choice) and (rec.source in ("edge", "corrected"))
    assert r.check_points == len([rec for rec in checked if rec.source == "edge"]) + r.counts()["corrected"]
    assert r.discarded_drafts == 0
    # Drafting ahead changes when tokens are committed, never which: the same text, checks and sources;
    # what was drafted behind a correction was dropped (its check points were sent all the same).
    assert ahead.tokens == r.tokens and ahead.counts() == r.counts()
    assert [(x.position, x.checked, x.source, x.unchecked) for x in ahead.records] == [
        (x.position, x.checked, x.source, x.unchecked) for x in r.records
    ]
    assert ahead.accounting()["checked_positions"] == r.accounting()["checked_positions"]
    assert ahead.discarded_drafts > 0 and ahead.check_points >= r.check_points
    # Deferred checks: a flagged draft behind a check goes up only once that check keeps its token, so
    # every check sent is of a position committed: the waiting run's check points, whatever the timing.
    deferred = generate_with_server(
        tiny_gguf_a, tiny_gguf_b,
        PolicyConfig(kind="router", router=router, lookahead_windows=1, defer_checks=True), 60,
    )  # fmt: skip
    assert deferred.tokens == r.tokens
    assert [(x.position, x.checked, x.source) for x in deferred.records] == [
        (x.position, x.checked, x.source) for x in r.records
    ]
    assert deferred.check_points == r.check_points
    assert deferred.unsent_checks <= deferred.discarded_drafts
    assert deferred.summary()["unsent_checks"] == deferred.unsent_checks


def test_router_choices_pairs_are_distinct() -> None:
    # The frontier's fractions give increasing checked shares (sanity of curve()).
    rng = np.random.default_rng(4)
    s, y, g = rng.random(200), rng.random(200) < 0.2, np.repeat(np.arange(20), 10)
    pts = curve(s, y, g, [0.1, 0.2, 0.4])
    for a, b in combinations(pts, 2):
        assert a["checked"] < b["checked"] and a["recall"] <= b["recall"]


def test_a_one_feature_router_weighs_only_that_feature(tmp_path: Path) -> None:
    _write_synthetic_traces(tmp_path / "train.jsonl.gz", 20, 0)
    data = to_data(read_generations([tmp_path / "train.jsonl.gz"]), np.zeros(10, dtype=np.int8))
    router = train_router(
        data, data, TrainConfig(hidden_dims=0, only=("q_entropy",)), vocab_digest="00" * 32, vocab_size=10
    )
    w = router.layers[0][0][:, 0]
    assert w[COL["q_entropy"]] > 0 and np.count_nonzero(w) == 1
    with pytest.raises(ShapeError, match="unknown features"):
        TrainConfig(only=("nope",))


def test_eval_runs_the_router_policy_by_its_file() -> None:
    from handoff.edge.evaluation.runner import variant_spec

    with pytest.raises(ValueError, match="--router"):
        variant_spec("router", PolicyConfig())
    spec = variant_spec("router", PolicyConfig(router="/x/gate-entropy.json", lookahead_windows=0))
    assert (
        spec.name == "router-gate-entropy"
        and spec.policy.kind == "router"
        and spec.policy.gate_threshold is None
    )
    spec = variant_spec("router:0.25", PolicyConfig(router="/x/router.json", lookahead_windows=0))
    assert spec.name == "router-router-g0.25" and spec.policy.gate_threshold == 0.25
    # Drafting on behind unanswered checks is another run (its tokens are the same, its timing not).
    spec = variant_spec("router", PolicyConfig(router="/x/router.json", lookahead_windows=2))
    assert spec.name == "router-router-ahead2" and spec.policy.lookahead_windows == 2
    spec = variant_spec("router", PolicyConfig(router="/x/router.json", defer_checks=True))
    assert spec.name == "router-router-ahead1-defer" and spec.policy.defer_checks
    with pytest.raises(ValueError, match="probability"):
        variant_spec("router:high", PolicyConfig(router="/x/router.json"))


def test_router_commands_train_and_evaluate(tmp_path: Path, tiny_gguf_a, capsys) -> None:
    from handoff.cli import main

    _write_synthetic_traces(tmp_path / "train.jsonl.gz", 24, 0)
    _write_synthetic_traces(tmp_path / "test.jsonl.gz", 10, 2)
    out = tmp_path / "r.json"
    args = ["router", "train", str(tmp_path / "train.jsonl.gz"), "--out", str(out), "--hidden-dims", "0"]
    assert main([*args, "--target-checked", "0.4", "--edge", str(tiny_gguf_a)]) == 0
    router = RouterModel.from_json(json.loads(out.read_text()))
    assert router.meta["validation"]["auc"] > 0.95 and router.meta["val_every"] == 4
    report = tmp_path / "eval.json"
    args = ["router", "evaluate", str(out), str(tmp_path / "test.jsonl.gz"), "--json", str(report)]
    assert main([*args, "--loso-train", str(tmp_path / "train.jsonl.gz"), "--edge", str(tiny_gguf_a)]) == 0
    result = json.loads(report.read_text())
    assert result["generations"] == 10 and set(result["gates"]) == {"router", "entropy", "top1", "margin"}
    assert result["gates"]["router"]["auc"] > 0.95 and set(result["loso"]) == {"a", "b"}
    assert "leave one suite out" in capsys.readouterr().out
