"""A mixture of small experts (seed note §0.9.2): experts selected or weighted by their divergence from P,
P only where every expert diverges. Math on hand-made arrays; tiny models with a planted specialist
per task type (the task type is which reference model checks the answer) through the real gRPC path."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import pytest

from handoff.edge.cloud_harness import llama_backend_factory, run, running_server, vocabulary_of
from handoff.edge.controller import HybridGenerator
from handoff.edge.evaluation.runner import row_key, variant_spec
from handoff.edge.mixture import PROMPTED_EXPERTS, ExpertSpec, MixtureRunner, expert_prompt, load_experts
from handoff.edge.policy import MixturePolicy, PolicyConfig, WindowView, make_policy
from handoff.edge.runner import EdgeRunner
from handoff.shared.divergence import topk_kl
from handoff.shared.ensemble import expert_divergences
from handoff.shared.errors import ShapeError
from handoff.shared.sampling import SamplingSettings
from handoff.shared.tiny_gguf import NEAR_SCALE, SEED_B, write_tiny_qwen2_gguf

# -- the math and the policy, on hand-made arrays ---------------------------------------------------


def test_expert_divergences_is_the_topk_kl_of_each_expert() -> None:
    rng = np.random.default_rng(0)
    n, e, k, v = 3, 2, 4, 10
    p = rng.dirichlet(np.ones(v), n)  # [n, V]
    q = rng.dirichlet(np.ones(v), (n, e))  # [n, E, V]
    p_ids = np.argsort(-p, axis=1)[:, :k]
    p_lp = np.log(np.take_along_axis(p, p_ids, 1))
    e_ids = np.argsort(-q, axis=2)[:, :, :k]
    e_lp = np.log(np.take_along_axis(q, e_ids, 2))
    e_at_p = np.log(np.take_along_axis(q, p_ids[:, None, :].repeat(e, 1), 2))
    got = expert_divergences(p_ids, p_lp, e_ids, e_lp, e_at_p)
    assert got.shape == (n, e)
    for j in range(n):
        for x in range(e):
            want = topk_kl(p_ids[j][None], p_lp[j][None], e_ids[j, x][None], e_lp[j, x][None],
                           q_logprobs_at_p_ids=e_at_p[j, x][None], rest_margin=1e-5)[0]  # fmt: skip
            full = float(np.sum(p[j] * np.log(p[j] / q[j, x])))
            assert got[j, x] == pytest.approx(want) and got[j, x] <= full + 1e-9  # a lower bound
    with pytest.raises(ShapeError, match="expert views"):
        expert_divergences(p_ids, p_lp, e_ids[:, 0], e_lp[:, 0], e_at_p)


def view(tokens, drafter_kls, expert_kls, expert_top1) -> WindowView:
    n = len(tokens)
    return WindowView(
        token_ids=np.asarray(tokens), q_topk_ids=np.tile([[1, 2]], (n, 1)), q_topk_logprobs=np.log([[0.6, 0.4]] * n),
        q_entropy=np.ones(n), p_kls=np.asarray(drafter_kls, float), p_top1_ids=np.asarray(tokens),
        expert_kls=np.asarray(expert_kls, float), expert_top1_ids=np.asarray(expert_top1),
    )  # fmt: skip


def test_keeps_what_the_drafter_agrees_on_switches_to_an_agreeing_expert_and_hands_over_when_all_diverge() -> (
    None
):
    policy = make_policy(PolicyConfig(kind="mixture", threshold=0.5))
    assert isinstance(policy, MixturePolicy) and policy.places_tokens and policy.placed_source == "edge"
    # Drafter fine everywhere: kept.
    d = policy.decide(view([5, 6], [0.1, 0.2], [[0.1, 2.0], [0.2, 3.0]], [[5, 9], [6, 9]]))
    assert (d.keep, d.hand_over) == (2, False)
    # Position 1 over tau for the drafter; expert 1 agrees with P there and picks 8: switch.
    d = policy.decide(
        view([5, 6, 7], [0.1, 0.9, 0.0], [[0.1, 0.3], [0.9, 0.2], [0.0, 0.1]], [[5, 5], [6, 8], [7, 7]])
    )
    assert (d.keep, d.hand_over, d.token) == (1, True, 8)
    assert int(np.argmax(policy.expert_weights(2))) == 1  # the expert switched to drafts next
    # An agreeing expert that picks the drafter's own token: the token stands.
    d = policy.decide(view([5, 6], [0.1, 0.9], [[0.1, 0.3], [0.9, 0.2]], [[5, 5], [6, 6]]))
    assert (d.keep, d.hand_over) == (2, False)
    # Every expert over tau at position 0: P takes over there (no token of the edge's).
    d = policy.decide(view([5, 6], [0.9, 0.0], [[0.9, 0.7], [0.0, 0.0]], [[5, 4], [6, 6]]))
    assert (d.keep, d.hand_over, d.token) == (0, True, None)


def test_recent_divergence_ranks_the_experts() -> None:
    policy = make_policy(PolicyConfig(kind="mixture", expert_decay=0.5, mixture_temperature=0.5))
    policy.begin()
    assert policy.expert_weights(3) == pytest.approx([1 / 3] * 3)  # no record yet: uniform
    policy.observe(np.array([[0.2, 1.0, np.inf], [0.4, 1.0, np.nan]]))  # means 0.3, 1.0, 50 (inf capped)
    assert policy.scores == pytest.approx([0.3, 1.0, 50.0])
    w = policy.expert_weights(3)
    assert w.sum() == pytest.approx(1) and w[0] / w[1] == pytest.approx(np.exp(0.7 / 0.5))
    policy.observe(np.array([[1.3, 0.0, 0.0]]))  # decay 0.5: halfway to the new means
    assert policy.scores == pytest.approx([0.8, 0.5, 25.0])
    assert int(np.argmax(policy.expert_weights(3))) == 1
    policy.begin()
    assert policy.scores is None


def test_settings_and_eval_variants() -> None:
    with pytest.raises(ShapeError, match="mixture"):
        PolicyConfig(kind="mixture", mixture="median")
    with pytest.raises(ShapeError, match="expert_decay"):
        PolicyConfig(kind="mixture", expert_decay=2.0)
    with pytest.raises(ShapeError, match="mixture_temperature"):
        PolicyConfig(kind="mixture", mixture_temperature=0.0)
    base = PolicyConfig()
    s = variant_spec("mixture-weighted:0.3", base)
    assert (s.name, s.mode, s.policy.kind, s.policy.mixture, s.policy.threshold) == (
        "mixture-weighted-tau0.3",
        "hybrid",
        "mixture",
        "weighted",
        0.3,
    )
    assert variant_spec("mixture:1", base).name == "mixture-select-tau1"
    alone = variant_spec("expert:math", base)
    assert (alone.name, alone.mode, alone.policy.use_experts) == ("expert-math", "small", "math")
    kl = variant_spec("expert:math:0.3", base)
    assert (kl.name, kl.mode, kl.policy.kind, kl.policy.use_experts) == (
        "expert-math-tau0.3",
        "hybrid",
        "rollback",
        "math",
    )
    small = variant_spec("expert:math", base)
    from handoff.edge.evaluation.runner import RunSpec
    from handoff.edge.evaluation.tasks import Task

    task = Task("t0", "arithmetic", "1+1?", "number", "2")
    assert row_key(small, task, {}) != row_key(RunSpec("small", "small", base), task, {})


def test_expert_prompts_and_files(tmp_path: Path) -> None:
    chat = (
        "<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert expert_prompt(chat, "") == chat
    assert expert_prompt(chat, "Be exact.") == chat.replace("You are Qwen.", "Be exact.")
    bare = "<|im_start|>user\nHi<|im_end|>\n"
    assert expert_prompt(bare, "Be exact.") == "<|im_start|>system\nBe exact.<|im_end|>\n" + bare
    with pytest.raises(ShapeError, match="ChatML"):
        expert_prompt("User: hi", "Be exact.")
    assert load_experts("prompted") == PROMPTED_EXPERTS and load_experts("") == ()
    f = tmp_path / "experts.json"
    f.write_text(json.dumps([{"name": "a", "model": "x.gguf"}, {"name": "b", "system": "S"}]))
    assert load_experts(str(f)) == (ExpertSpec("a", "x.gguf"), ExpertSpec("b", "", "S"))
    f.write_text(json.dumps([{"name": "a"}, {"name": "a"}]))
    with pytest.raises(ShapeError, match="distinct"):
        load_experts(str(f))
    with pytest.raises(ShapeError, match="JSON"):
        load_experts(str(tmp_path / "missing.json"))


# -- tiny models through the real gRPC path -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf_b_near(tiny_tokenizer, tiny_model_dir) -> Path:
    """B's weights plus a little noise: the specialist for tasks B checks."""
    return write_tiny_qwen2_gguf(tiny_model_dir / "tiny-b-near.gguf", tiny_tokenizer, 77,
                                 perturb_from_seed=SEED_B, perturb_scale=NEAR_SCALE)  # fmt: skip


def generate_mixture(cloud: Path, experts: list[tuple[str, Path]], policy: PolicyConfig, prompt: str, max_tokens=96,
                     mode="hybrid"):  # fmt: skip
    """One greedy generation with a MixtureRunner of the experts; returns (result, tokens drafted per expert)."""

    async def go():
        mixture = MixtureRunner([(ExpertSpec(name), EdgeRunner(path, k=policy.top_k, n_ctx=1024, n_threads=1))
                                 for name, path in experts])  # fmt: skip
        try:
            model = mixture.model
            ids = model.tokenize(model.chat_prompt([{"role": "user", "content": prompt}]))
            async with running_server(llama_backend_factory(cloud)) as (_, client):
                g = HybridGenerator(mixture, client, vocabulary_of(experts[0][1]), policy, mode=mode)
                return await g.generate(ids, max_tokens, sampling=SamplingSettings()), dict(mixture.drafted)
        finally:
            mixture.close()

    return run(go())


PROMPTS = ["Sort a list.", "Write a poem about the sea."]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_planted_specialist_of_each_task_type_drafts(tiny_gguf_a, tiny_gguf_b, tiny_gguf_a_near,
                                                         tiny_gguf_b_near, prompt) -> None:  # fmt: skip
    experts = [("a-near", tiny_gguf_a_near), ("b-near", tiny_gguf_b_near)]
    policy = PolicyConfig(kind="mixture", threshold=0.5)
    # Task type A (A checks): a-near drafts; task type B: b-near. The first window is the first
    # expert's; after it the ranking follows the divergence.
    r_a, drafted_a = generate_mixture(tiny_gguf_a, experts, policy, prompt)
    r_b, drafted_b = generate_mixture(tiny_gguf_b, experts, policy, prompt)
    assert drafted_a.get("a-near", 0) > 4 * drafted_a.get("b-near", 0)
    kept = collections.Counter(rec.expert for rec in r_a.records if rec.source == "edge")
    assert kept["a-near"] > 4 * kept["b-near"]  # the trace says who drafted each kept token
    assert drafted_b.get("b-near", 0) > 4 * drafted_b.get("a-near", 0)
    for r in (r_a, r_b):
        counts = r.counts()
        assert r.records and counts["edge"] > 0.8 * len(r.records)  # the specialist rarely diverges


def test_p_takes_over_when_every_expert_diverges(tiny_gguf_a, tiny_gguf_b, tiny_gguf_b_near) -> None:
    experts = [("b", tiny_gguf_b), ("b-near", tiny_gguf_b_near)]  # both far from A
    r, _ = generate_mixture(tiny_gguf_a, experts, PolicyConfig(kind="mixture", threshold=0.5), PROMPTS[0])
    assert r.handoffs > 0 and r.counts()["cloud"] + r.counts()["corrected"] > 0


def test_one_expert_alone_is_plain_q(tiny_gguf_a, tiny_gguf_a_near, tiny_gguf_b) -> None:
    # Under another policy the mixture drafts with its first expert: the same tokens as that Q alone.
    policy = PolicyConfig(kind="rollback", threshold=0.3, use_experts="a-near")
    r, drafted = generate_mixture(
        tiny_gguf_a, [("b", tiny_gguf_b), ("a-near", tiny_gguf_a_near)], policy, PROMPTS[1]
    )
    from handoff.edge.cloud_harness import generate_with_server

    alone = generate_with_server(tiny_gguf_a, tiny_gguf_a_near, PolicyConfig(kind="rollback", threshold=0.3), 96,
                                 prompt=PROMPTS[1])  # fmt: skip
    assert r.tokens == alone.tokens and set(drafted) == {"a-near"}
    with pytest.raises(ShapeError, match="unknown expert"):
        generate_mixture(tiny_gguf_a, [("b", tiny_gguf_b)], PolicyConfig(use_experts="c"), PROMPTS[0])


def test_weighted_mixture_leans_on_the_closer_expert(tiny_gguf_a, tiny_gguf_b, tiny_gguf_a_near) -> None:
    policy = PolicyConfig(kind="mixture", mixture="weighted", threshold=0.5, mixture_temperature=0.1)
    r, drafted = generate_mixture(
        tiny_gguf_a, [("b", tiny_gguf_b), ("a-near", tiny_gguf_a_near)], policy, PROMPTS[0]
    )
    assert set(drafted) == {"mixture"} and r.records
    # A's near copy is weighted up: the mixture's tokens are mostly checked as within tau of A.
    assert r.counts()["edge"] > 0.8 * len(r.records)


def test_bench_mixture_script_prints_the_costs_side_by_side(tiny_gguf_a, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "scripts/bench_mixture.py", "--model", str(tiny_gguf_a), "--tokens", "4", "--n-ctx", "256",
         "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"one Q", "mixture select", "mixture weighted"}
    assert rows["mixture select"]["experts"] == len(PROMPTED_EXPERTS) and rows["one Q"]["ms_per_token"] > 0
    assert rows["mixture select"]["pss_mb"] > 0
    assert "x one Q" in proc.stdout


def test_safe_and_mixture_from_the_command_line(
    tiny_gguf_a, tiny_gguf_a_near, tiny_gguf_b, tmp_path, run_handoff
):
    env = {"HANDOFF_THREADS": "1", "COLUMNS": "300"}
    models = ("--edge", str(tiny_gguf_a_near), "--cloud-model", str(tiny_gguf_a))
    safe = run_handoff("generate", *models, "--policy", "safe", "--ensemble-weight", "1", "--sharpen-below", "0",
                       "--max-tokens", "48", "--json", env=env)  # fmt: skip
    assert safe.returncode == 0, safe.stderr[-2000:]
    s = json.loads(safe.stdout)
    assert (
        s["by_source"]["cloud"] == s["by_source"]["corrected"] == 0 and "ensembled_tokens" in s["accounting"]
    )
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps([{"name": "far", "model": str(tiny_gguf_b)}, {"name": "near"}]))
    args = ("--experts", str(experts), "--policy", "mixture", "--max-tokens", "48")
    mix = run_handoff("generate", *models, *args, "--json", env=env)
    assert mix.returncode == 0, mix.stderr[-2000:]
    m = json.loads(mix.stdout)
    assert m["tokens"] > 0 and m["check_points"] > 0
    chat = run_handoff("chat", *models, *args, stdin="Sort a list\n/exit\n", env=env)
    assert chat.returncode == 0 and "tokens (hybrid)" in chat.stderr, chat.stderr[-2000:]
    bad = run_handoff(
        "generate", *models, "--experts", str(tmp_path / "none.json"), "--max-tokens", "4", env=env
    )
    assert bad.returncode != 0 and "experts" in bad.stderr and "Traceback" not in bad.stderr
    alone = run_handoff("generate", *models, "--policy", "mixture", "--max-tokens", "4", env=env)
    assert alone.returncode != 0 and "--experts" in alone.stderr and "Traceback" not in alone.stderr
