"""The override gate: which of P's disagreements the router policy corrects (edge/policy/override.py):
its features on hand-made arrays, its place in the router file, its training, the policy's decision,
gated runs on tiny models, and the commands on the default pair's committed traces and labels."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from handoff.edge.cloud_harness import generate_with_server
from handoff.edge.policy import PolicyConfig, RouterMismatch, RouterModel, make_policy
from handoff.edge.policy.features import SCALAR_FEATURES, TOKEN_CLASSES
from handoff.edge.policy.override import OVERRIDE_FEATURES, OverrideGate, override_features
from handoff.edge.policy.triggers import WindowView
from handoff.edge.routing.metrics import auc
from handoff.edge.routing.train import train_override
from handoff.shared.errors import ShapeError

G = len(OVERRIDE_FEATURES)
COL = {name: i for i, name in enumerate(OVERRIDE_FEATURES)}
CLS = {name: i for i, name in enumerate(TOKEN_CLASSES)}
REPO = Path(__file__).resolve().parents[1]


def one_feature_gate(feature: str, offset: float, threshold: float = 0.5) -> OverrideGate:
    """A gate whose logit is `feature - offset`: overrides where the feature is at or over offset."""
    w = np.zeros(G)
    w[COL[feature]] = 1.0
    return OverrideGate(np.zeros(G), np.ones(G), w, -offset, threshold)


def check_all_router(
    digest: str = "00" * 32, size: int = 10, gate: OverrideGate | None = None
) -> RouterModel:
    """A router that checks every position (its logit is huge), with an override gate."""
    f = len(SCALAR_FEATURES)
    w = np.zeros((f, 1))
    return RouterModel(np.zeros(f), np.ones(f), ((w, np.asarray([1e6])),), 0.5, digest, size, override=gate)


# -- features -----------------------------------------------------------------------------------


def test_override_features_on_hand_made_views() -> None:
    # vocabulary of 6: 0 "1", 1 "2", 2 " the", 3 " The", 4 "(", 5 "\n"
    classes = np.asarray(
        [CLS["digit"], CLS["digit"], CLS["word_start"], CLS["word_start"], CLS["symbol"], CLS["whitespace"]]
    )
    surface = np.asarray([0, 1, 2, 2, 3, 4])
    q_ids = np.asarray([[0, 1], [2, 4]])  # [2, 2]
    q_lp = np.log([[0.6, 0.3], [0.5, 0.2]])
    p_ids = np.asarray([[1, 0, 5], [3, 5, 4]])  # [2, 3]: row 1's Q token (2) is not in P's top-k
    p_lp = np.log([[0.7, 0.2, 0.05], [0.5, 0.3, 0.1]])
    x = override_features(
        np.asarray([0, 2]),
        q_ids,
        q_lp,
        np.asarray([0.9, 1.2]),
        p_ids,
        p_lp,
        np.asarray([0, 7]),
        classes,
        surface,
    )
    assert x.shape == (2, G)
    assert x[0, COL["p_margin"]] == pytest.approx(np.log(0.7 / 0.2))
    assert x[1, COL["p_margin"]] == pytest.approx(np.log(0.5 / 0.1))  # floored at P's k-th value
    assert x[0, COL["q_margin_to_p"]] == pytest.approx(np.log(0.6 / 0.3))
    assert x[1, COL["q_margin_to_p"]] == pytest.approx(np.log(0.5 / 0.2))  # floored at Q's k-th value
    assert x[0, COL["p_topk_entropy"]] == pytest.approx(
        -(0.7 * np.log(0.7) + 0.2 * np.log(0.2) + 0.05 * np.log(0.05))
    )
    assert x[1, COL["log_offset"]] == pytest.approx(np.log(8))
    assert x[0, COL["both_digit"]] == 1.0 and x[1, COL["both_digit"]] == 0.0
    assert (
        x[1, COL["both_word"]] == 1.0
        and x[1, COL["same_surface"]] == 1.0
        and x[0, COL["same_surface"]] == 0.0
    )
    with pytest.raises(ShapeError, match="P's view"):
        override_features(
            np.asarray([0, 2]), q_ids, q_lp, np.zeros(2), p_ids[:1], p_lp[:1], np.zeros(2), classes, surface
        )
    with pytest.raises(ShapeError, match="offsets"):
        override_features(
            np.asarray([0, 2]), q_ids, q_lp, np.zeros(2), p_ids, p_lp, np.zeros(3), classes, surface
        )


def test_window_view_checks_offsets() -> None:
    base = dict(
        token_ids=[1, 2], q_topk_ids=[[1], [2]], q_topk_logprobs=[[-0.1], [-0.2]], q_entropy=[0.1, 0.2]
    )
    assert WindowView(**base, offsets=[3, 4]).offsets.tolist() == [3, 4]
    with pytest.raises(ShapeError, match="offsets"):
        WindowView(**base, offsets=[3])
    with pytest.raises(ShapeError, match="offsets"):
        WindowView(**base, offsets=[-1, 0])


# -- the file -----------------------------------------------------------------------------------


def test_the_gate_round_trips_in_the_router_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gate = OverrideGate(rng.normal(size=G), rng.uniform(0.5, 2, G), rng.normal(size=G), 0.3, 0.25, {"n": 1})
    router = check_all_router(gate=gate)
    path = tmp_path / "r.json"
    router.save(path)
    back = RouterModel.from_json(json.loads(path.read_text()))
    rows = rng.normal(size=(7, G))
    np.testing.assert_allclose(back.override.probabilities(rows), gate.probabilities(rows), atol=1e-5)
    assert back.override.threshold == 0.25 and back.override.meta == {"n": 1}
    plain = json.loads(path.read_text())
    del plain["override"]
    assert RouterModel.from_json(plain).override is None  # a router file without a gate, as before
    bad = json.loads(path.read_text())
    bad["override"]["features"] = ["something", "else"]
    with pytest.raises(RouterMismatch, match="override gate"):
        RouterModel.from_json(bad)
    with pytest.raises(ShapeError, match="threshold"):
        replace(gate, threshold=1.5)
    with pytest.raises(ShapeError, match="rows"):
        gate.probabilities(np.zeros((2, G - 1)))


# -- training -----------------------------------------------------------------------------------


def test_training_recovers_a_planted_rule_and_meets_its_recall() -> None:
    rng = np.random.default_rng(0)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, G))
        x[:, COL["both_digit"]] = rng.random(n) < 0.3
        # divergent: both tokens digits, or P sure of its choice (a noisy rule)
        y = (x[:, COL["both_digit"]] == 1) | (x[:, COL["p_margin"]] + 0.3 * rng.normal(size=n) > 1.0)
        return x, y

    x, y = rows(3000)
    vx, vy = rows(1000)
    gate = train_override(x, y, vx, vy, 0.8)
    p = gate.probabilities(vx)
    assert auc(p, vy) > 0.95
    assert gate.overrides(vx)[vy].mean() == pytest.approx(0.8, abs=0.01)
    w = dict(zip(OVERRIDE_FEATURES, gate.weights, strict=True))
    assert w["both_digit"] > 1.0 and w["p_margin"] > 1.0
    assert max(abs(v) for k, v in w.items() if k not in ("both_digit", "p_margin")) < 0.3
    with pytest.raises(ShapeError, match="divergent and neutral"):
        train_override(x, np.ones(len(x), dtype=bool), vx, vy, 0.8)


# -- the policy's decision ------------------------------------------------------------------------


def _policy(tmp_path: Path, gate: OverrideGate | None, vocab, name: str):
    fp = vocab.fingerprint
    path = tmp_path / f"{name}.json"
    check_all_router(fp.digest.hex(), fp.vocab_size, gate).save(path)
    policy = make_policy(PolicyConfig(kind="router", router=str(path)))
    policy.attach(vocab)
    return policy


def test_the_router_corrects_the_first_disagreement_its_gate_takes(tmp_path: Path, tiny_gguf_a) -> None:
    from handoff.edge.cloud_harness import vocabulary_of

    vocab = vocabulary_of(tiny_gguf_a)
    # Three positions: P agrees at 0, differs at 1 (offset 5) and 2 (offset 6).
    view = dict(
        token_ids=[3, 4, 5], q_topk_ids=[[3, 7], [4, 8], [5, 9]], q_topk_logprobs=np.log([[0.6, 0.3]] * 3),
        q_entropy=[0.5, 0.5, 0.5], p_kls=[0.0, 0.1, 0.1], p_top1_ids=[3, 8, 9],
        p_topk_ids=[[3, 7], [8, 4], [9, 5]], p_topk_logprobs=np.log([[0.7, 0.2]] * 3),
    )  # fmt: skip
    ungated = _policy(tmp_path, None, vocab, "ungated").decide(WindowView(**view))
    assert (ungated.keep, ungated.hand_over) == (1, True)
    later = _policy(
        tmp_path, one_feature_gate("log_offset", np.log(6.5)), vocab, "later"
    )  # takes offsets >= 6
    d = later.decide(WindowView(**view, offsets=[4, 5, 6]))
    assert (d.keep, d.hand_over) == (2, True)
    never = _policy(tmp_path, one_feature_gate("log_offset", 1e6), vocab, "never")
    d = never.decide(WindowView(**view, offsets=[4, 5, 6]))
    assert (d.keep, d.hand_over) == (3, False)
    with pytest.raises(ShapeError, match="offsets"):
        never.decide(WindowView(**view))


def test_gated_runs_with_a_gate_that_takes_all_or_none(tmp_path: Path, tiny_gguf_a, tiny_gguf_b) -> None:
    from handoff.edge.cloud_harness import vocabulary_of

    fp = vocabulary_of(tiny_gguf_b).fingerprint
    runs = {}
    for name, gate in (
        ("all", one_feature_gate("log_offset", -1e6)),
        ("none", one_feature_gate("log_offset", 1e6)),
    ):
        path = tmp_path / f"{name}.json"
        check_all_router(fp.digest.hex(), fp.vocab_size, gate).save(path)
        runs[name] = generate_with_server(
            tiny_gguf_a, tiny_gguf_b, PolicyConfig(kind="router", router=str(path)), 60
        )
    cloud = generate_with_server(tiny_gguf_a, tiny_gguf_b, PolicyConfig(), 60, mode="cloud")
    edge = generate_with_server(tiny_gguf_a, tiny_gguf_b, PolicyConfig(), 60, mode="edge")
    # Taking every disagreement writes P's greedy text; taking none writes Q's, every position checked.
    assert runs["all"].tokens == cloud.tokens and runs["all"].counts()["corrected"] > 0
    assert runs["all"].kept_disagreements() == 0
    none = runs["none"]
    assert none.tokens == edge.tokens and none.counts()["corrected"] == 0
    assert all(rec.checked for rec in none.records)
    assert none.kept_disagreements() > 0 and none.summary()["kept_disagreements"] == none.kept_disagreements()
    assert none.kept_disagreements() == sum(1 for rec in none.records if rec.p_topk_ids[0] != rec.token_id)


# -- the commands on the default pair's committed traces ------------------------------------------


@pytest.mark.real_models
def test_router_override_and_evaluate_on_the_committed_labels(tmp_path: Path, capsys) -> None:
    from handoff.cli import main

    router = tmp_path / "ov.json"
    train = [
        "router",
        "override",
        str(REPO / "docs/router/router-t25.json"),
        str(REPO / "docs/router/train/large.jsonl.gz"),
    ]
    assert main([*train, "--labels", str(REPO / "docs/router/labels/train.jsonl"), "--target-recall", "0.7",
                 "--out", str(router)]) == 0  # fmt: skip
    gate = RouterModel.from_json(json.loads(router.read_text())).override
    assert gate is not None and gate.meta["train_disagreements"] + gate.meta["val_disagreements"] == 346
    report = tmp_path / "eval.json"
    test = ["router", "evaluate", str(router), str(REPO / "docs/router/eval/traces/large.jsonl.gz")]
    labels = [
        "--labels",
        str(REPO / "docs/router/labels/test.jsonl"),
        "--labels",
        str(REPO / "docs/router/labels/train.jsonl"),
    ]
    loso = ["--loso-train", str(REPO / "docs/router/train/large.jsonl.gz")]
    assert main([*test, *labels, *loso, "--json", str(report)]) == 0
    o = json.loads(report.read_text())["override"]
    # The 570 labelled test disagreements (572 before labels were keyed by task: a P-wrong Python task
    # sharing its text with a P-right one took that one's labels).
    assert o["disagreements"] == 570 and o["auc"] > 0.75  # held-out test labels (measured: 0.81)
    every = o["every_position"]
    assert every["checked"] == 1.0 and every["overrides"] < 0.05 and every["reproduced"] > 0.85
    assert set(o["loso"]) == {"algorithmic", "arithmetic", "python", "sorting", "word_problems"}
    assert sum(m["disagreements"] for m in o["loso"].values()) == 570
    assert "override gate" in capsys.readouterr().out


# -- a gate on Q's hidden state -------------------------------------------------------------------


def hidden_router(
    d: int, gate: OverrideGate | None, digest: str = "00" * 32, size: int = 10, r: int = 2
) -> RouterModel:
    """check_all_router with a hidden-state projection: the first r coordinates of Q's hidden state."""
    f = len(SCALAR_FEATURES) + r
    return RouterModel(
        np.zeros(f), np.ones(f), ((np.zeros((f, 1)), np.asarray([1e6])),), 0.5, digest, size,
        hidden_mean=np.zeros(d), hidden_proj=np.eye(d)[:, :r], override=gate,
    )  # fmt: skip


def hidden_gate(offset: float, hidden_dims: int = 1) -> OverrideGate:
    """Overrides where the first projected hidden coordinate is at or over offset."""
    f = G + hidden_dims
    w = np.zeros(f)
    w[G] = 1.0
    return OverrideGate(np.zeros(f), np.ones(f), w, -offset, 0.5, hidden_dims=hidden_dims)


def test_a_hidden_state_gate_round_trips_and_needs_the_routers_projection(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    f = G + 2
    gate = OverrideGate(
        rng.normal(size=f), rng.uniform(0.5, 2, f), rng.normal(size=f), 0.1, 0.4, {"n": 2}, hidden_dims=2
    )
    path = tmp_path / "r.json"
    hidden_router(6, gate).save(path)
    data = json.loads(path.read_text())
    assert data["override"]["hidden_dims"] == 2 and data["override"]["features"][-1] == "hidden_pc_1"
    back = RouterModel.from_json(data).override
    rows = rng.normal(size=(5, f))
    np.testing.assert_allclose(back.probabilities(rows), gate.probabilities(rows), atol=1e-5)
    assert back.hidden_dims == 2 and back.threshold == 0.4
    with pytest.raises(ShapeError, match="rows"):
        gate.probabilities(np.zeros((5, G)))  # the override features without the hidden columns
    data["override"]["hidden_dims"] = 1  # the features list no longer matches
    with pytest.raises(RouterMismatch, match="override gate"):
        RouterModel.from_json(data)
    with pytest.raises(ShapeError, match="projects 2"):
        hidden_router(6, replace(gate, mean=np.zeros(G + 3), scale=np.ones(G + 3), weights=np.zeros(G + 3),
                                 hidden_dims=3))  # fmt: skip
    with pytest.raises(ShapeError, match="projects 0"):
        check_all_router(gate=gate)  # a router without Q's hidden state


def test_training_recovers_a_rule_planted_in_the_hidden_columns() -> None:
    rng = np.random.default_rng(3)

    def rows(n: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.normal(size=(n, G + 3))
        return x, x[:, G + 1] + 0.2 * rng.normal(size=n) > 0.5  # divergent: the second hidden column

    x, y = rows(3000)
    vx, vy = rows(1000)
    gate = train_override(x, y, vx, vy, 0.9, hidden_dims=3)
    assert gate.hidden_dims == 3 and auc(gate.probabilities(vx), vy) > 0.95
    assert gate.weights[G + 1] > 2.0 and np.abs(np.delete(gate.weights, G + 1)).max() < 0.3
    assert gate.overrides(vx)[vy].mean() == pytest.approx(0.9, abs=0.01)


def test_the_gate_reads_the_windows_hidden_state(tmp_path: Path, tiny_gguf_a) -> None:
    from handoff.edge.cloud_harness import vocabulary_of

    fp = vocabulary_of(tiny_gguf_a).fingerprint
    path = tmp_path / "h.json"
    hidden_router(4, hidden_gate(0.0), fp.digest.hex(), fp.vocab_size).save(path)
    policy = make_policy(PolicyConfig(kind="router", router=str(path)))
    policy.attach(vocabulary_of(tiny_gguf_a))
    assert policy.needs_hidden
    # P differs at all three positions; only the last has a hidden state the gate takes.
    view = dict(
        token_ids=[3, 4, 5], q_topk_ids=[[3, 7], [4, 8], [5, 9]], q_topk_logprobs=np.log([[0.6, 0.3]] * 3),
        q_entropy=[0.5, 0.5, 0.5], p_kls=[0.1, 0.1, 0.1], p_top1_ids=[7, 8, 9],
        p_topk_ids=[[7, 3], [8, 4], [9, 5]], p_topk_logprobs=np.log([[0.7, 0.2]] * 3), offsets=[4, 5, 6],
    )  # fmt: skip
    hidden = np.asarray([[-1.0, 0, 0, 0], [-0.5, 9, 9, 9], [0.5, 0, 0, 0]])  # [n, d]
    d = policy.decide(WindowView(**view, q_hidden=hidden))
    assert (d.keep, d.hand_over) == (2, True)
    d = policy.decide(WindowView(**view, q_hidden=-np.abs(hidden)))
    assert (d.keep, d.hand_over) == (3, False)
    with pytest.raises(ShapeError, match="hidden"):
        policy.decide(WindowView(**view))
    with pytest.raises(ShapeError, match="hidden"):
        policy.decide(WindowView(**view, q_hidden=hidden[:, :3]))  # another hidden size
    with pytest.raises(ShapeError, match="q_hidden"):
        WindowView(**view, q_hidden=hidden[:2])


def test_gated_runs_with_a_hidden_state_gate_that_takes_all_or_none(
    tmp_path: Path, tiny_gguf_a, tiny_gguf_b
) -> None:
    from handoff.edge.cloud_harness import vocabulary_of

    fp = vocabulary_of(tiny_gguf_b).fingerprint
    runs = {}
    for name, offset in (("all", -1e6), ("none", 1e6)):
        path = tmp_path / f"{name}.json"
        hidden_router(64, hidden_gate(offset), fp.digest.hex(), fp.vocab_size).save(path)  # tiny n_embd 64
        runs[name] = generate_with_server(
            tiny_gguf_a, tiny_gguf_b, PolicyConfig(kind="router", router=str(path)), 60
        )
    cloud = generate_with_server(tiny_gguf_a, tiny_gguf_b, PolicyConfig(), 60, mode="cloud")
    edge = generate_with_server(tiny_gguf_a, tiny_gguf_b, PolicyConfig(), 60, mode="edge")
    assert runs["all"].tokens == cloud.tokens and runs["all"].counts()["corrected"] > 0
    assert runs["none"].tokens == edge.tokens and runs["none"].counts()["corrected"] == 0
    assert runs["none"].kept_disagreements() > 0


def test_gate_rows_append_the_projected_hidden_state_at_each_disagreement() -> None:
    from handoff.edge.routing.data import Generation, gate_rows, override_rows

    rng = np.random.default_rng(4)
    gens, states = [], []
    for i, tokens in enumerate(([3, 4, 5, 6], [7, 8, 9])):
        n = len(tokens)
        q_ids = np.stack([np.asarray(tokens) + (np.arange(n) % 2), np.full(n, 1)], axis=1)  # [n, 2]
        gens.append(Generation(
            task_id=f"t{i}", suite="s", correct=True, prompt_ids=(1, 2), tokens=np.asarray(tokens),
            q_topk_ids=q_ids, q_topk_logprobs=np.log(np.tile([0.6, 0.3], (n, 1))), q_entropy=np.full(n, 0.4),
            source="x", p_topk_ids=np.stack([tokens, np.full(n, 2)], axis=1),
            p_topk_logprobs=np.log(np.tile([0.7, 0.2], (n, 1))),
        ))  # fmt: skip
        states.append(rng.normal(size=(n, 5)).astype(np.float32))
    from handoff.edge.routing.data import to_data

    classes = np.zeros(16, dtype=np.int64)
    data = to_data(gens, classes, states)
    surface = np.arange(16)
    plain, y, group = override_rows(data.generations, classes, surface)
    rows, y2, group2 = gate_rows(data, classes, surface, lambda h: 2.0 * h[:, :2])
    want = (
        np.concatenate([states[0][[1, 3]], states[1][[1]]])[:, :2] * 2.0
    )  # positions where Q's top-1 differs
    np.testing.assert_allclose(rows[:, :G], plain)
    np.testing.assert_allclose(rows[:, G:], want, rtol=1e-6)
    assert (y2 == y).all() and (group2 == group).all() and group.tolist() == [0, 0, 1]
    with pytest.raises(ShapeError, match="hidden"):
        gate_rows(to_data(gens, classes), classes, surface, lambda h: h)


def test_router_override_reads_the_hidden_state_through_the_commands(tmp_path: Path, tiny_gguf_a) -> None:
    """router train --hidden-dims, router override --hidden-dims, router evaluate (with leave one suite
    out) on synthetic full traces and labels, on a tiny model's hidden states."""
    import gzip

    from handoff.cli import main
    from handoff.edge.routing.data import GenerationLabels, read_generations, write_labels

    rng = np.random.default_rng(5)
    traces = tmp_path / "train.jsonl.gz"
    with gzip.open(traces, "wt") as f:
        for g in range(24):
            f.write(json.dumps({"record": "generation", "prompt_ids": [1, 2, 10 + g], "task_id": f"t{g}",
                                "suite": ["a", "b"][g % 2], "correct": True}) + "\n")  # fmt: skip
            for t in range(20):
                top1 = rng.uniform(0.2, 0.99)
                probs = np.asarray([top1, (1 - top1) * 0.7, (1 - top1) * 0.3])
                token = 5 if top1 >= 0.5 else 6  # P differs from Q's top-1 (5) where Q is unsure
                f.write(json.dumps({
                    "record": "token", "position": 3 + t, "token_id": token, "source": "cloud",
                    "q_topk_ids": [5, 6, 7], "q_topk_logprobs": np.log(probs).tolist(),
                    "q_entropy": float(-(probs * np.log(probs)).sum()),
                    "p_topk_ids": [token, 7], "p_topk_logprobs": np.log([0.8, 0.1]).tolist(),
                }) + "\n")  # fmt: skip
            f.write(json.dumps({"record": "summary", "mode": "cloud"}) + "\n")
    labels = []
    for i, gen in enumerate(read_generations([traces])):
        at = np.flatnonzero(gen.disagreements)
        divergent = tuple(bool((i + j) % 3 == 0) for j in range(len(at)))
        labels.append(
            GenerationLabels(gen.task_id, gen.digest, tuple(at.tolist()), divergent, (1,) * len(at))
        )
    write_labels(tmp_path / "labels.jsonl", labels, {"traces": [str(traces)]})
    edge = ["--edge", str(tiny_gguf_a)]
    router, gated = tmp_path / "r.json", tmp_path / "g.json"
    assert main(["router", "train", str(traces), "--hidden-dims", "2", "--out", str(router), *edge]) == 0
    args = ["router", "override", str(router), str(traces), "--labels", str(tmp_path / "labels.jsonl")]
    assert main([*args, "--hidden-dims", "2", "--target-recall", "0.8", "--out", str(gated), *edge]) == 0
    gate = RouterModel.from_json(json.loads(gated.read_text())).override
    assert gate is not None and gate.hidden_dims == 2 and gate.meta["extract_batch"] == 256
    assert main([*args, "--hidden-dims", "3", "--out", str(tmp_path / "x.json"), *edge]) != 0  # router has 2
    report = tmp_path / "eval.json"
    evaluate = ["router", "evaluate", str(gated), str(traces), "--labels", str(tmp_path / "labels.jsonl")]
    assert main([*evaluate, "--loso-train", str(traces), "--json", str(report), *edge]) == 0
    o = json.loads(report.read_text())["override"]
    assert o["disagreements"] == sum(len(lab.positions) for lab in labels) and set(o["loso"]) == {"a", "b"}
