"""The skip gate, the entropy trigger and the budget-holding threshold, through the controller on tiny models."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from handoff.edge.cloud_harness import llama_backend_factory, run, running_server, vocabulary_of
from handoff.edge.controller import HybridGenerator
from handoff.edge.policy import PolicyConfig
from handoff.edge.runner import EdgeRunner

BASE = PolicyConfig(check_interval=4, handback_tokens=3, lookahead_windows=0)


async def generate_many(cloud_path, edge_path, policy, n_prompts=1, max_tokens=24):
    runner = EdgeRunner(edge_path, k=policy.top_k, n_ctx=512, n_threads=1)
    try:
        async with running_server(llama_backend_factory(cloud_path)) as (_, client):
            gen = HybridGenerator(runner, client, vocabulary_of(edge_path), policy)
            out, taus = [], []
            for i in range(n_prompts):
                msg = f"Sort list number {i} of numbers in Python."
                prompt = runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": msg}]))
                out.append(await gen.generate(prompt, max_tokens))
                taus.append(gen.threshold)
            return out, taus
    finally:
        runner.close()


def test_skip_gate_uploads_ids_only_where_q_is_confident(tiny_gguf_a, tiny_gguf_b):
    (full,), _ = run(generate_many(tiny_gguf_a, tiny_gguf_b, replace(BASE, threshold=1e6)))
    everywhere = replace(BASE, threshold=1e6, skip="top1", skip_top1_min=1e-9)  # every position "confident"
    (skipped,), _ = run(generate_many(tiny_gguf_a, tiny_gguf_b, everywhere))
    assert skipped.tokens == full.tokens  # the same text: nothing was handed over either way
    assert full.skipped_uploads == 0 and skipped.skipped_uploads == len(skipped.tokens)
    assert skipped.bytes_sent < 0.5 * full.bytes_sent  # ids only: no top-20 views
    assert all(r.kl is None for r in skipped.records) and all(r.kl is not None for r in full.records)
    # A window without any distribution is never handed over, even at tau 0.
    (none,), _ = run(generate_many(tiny_gguf_a, tiny_gguf_b, replace(everywhere, threshold=0.0)))
    assert none.handoffs == 0
    # Entropy gate with a bound above every entropy: the same as skipping everywhere.
    (ent,), _ = run(generate_many(tiny_gguf_a, tiny_gguf_b, replace(BASE, threshold=1e6, skip="entropy",
                                                                    skip_entropy_max=1e6)))  # fmt: skip
    assert ent.skipped_uploads == len(ent.tokens)


def test_entropy_trigger_cuts_where_q_is_uncertain(tiny_gguf_a, tiny_gguf_b):
    """With trigger=entropy the cut is at the first position whose entropy exceeds tau."""
    (never,), _ = run(
        generate_many(tiny_gguf_a, tiny_gguf_b, replace(BASE, trigger="entropy", threshold=1e6))
    )
    assert never.handoffs == 0
    entropies = [r.q_entropy for r in never.records]
    tau = float(np.median(entropies))
    (cut,), _ = run(generate_many(tiny_gguf_a, tiny_gguf_b, replace(BASE, trigger="entropy", threshold=tau)))
    assert cut.handoffs >= 1
    first = next(i for i, e in enumerate(entropies) if e > tau)
    # Up to the first uncertain position both runs wrote Q's tokens; there the cloud corrects.
    assert cut.tokens[:first] == never.tokens[:first]
    assert cut.records[first].source == "corrected"
    assert all(r.source == "edge" for r in cut.records[:first])


def test_budget_moves_tau_toward_the_target(tiny_gguf_a, tiny_gguf_a_near):
    # Far too little cloud (tau high): tau comes down; far too much (tau tiny): tau goes up.
    low = replace(BASE, threshold=5.0, budget=0.5, budget_window=32, budget_gain=2.0)
    _, taus = run(generate_many(tiny_gguf_a, tiny_gguf_a_near, low, n_prompts=3))
    assert taus[-1] < 5.0 and taus == sorted(taus, reverse=True)
    high = replace(BASE, threshold=0.01, budget=0.05, budget_window=32, budget_gain=2.0)
    results, taus = run(generate_many(tiny_gguf_a, tiny_gguf_a_near, high, n_prompts=3))
    assert taus[-1] > 0.01
    assert sum(r.counts()["cloud"] + r.counts()["corrected"] for r in results) > 0


def test_an_external_score_function_decides_the_handoff(tiny_gguf_a, tiny_gguf_a_near):
    """HybridGenerator(scorer=CallableScorer(fn)): fn's per-token scores, not KL, pick where the cloud takes over."""
    from handoff.edge.policy import CallableScorer

    seen = []

    def third_token_is_risky(view):  # e.g. a reward model's score: high = hand over
        seen.append(view.p_kls is not None)
        scores = np.zeros(view.n)
        scores[min(2, view.n - 1)] = 10.0
        return scores

    async def go():
        runner = EdgeRunner(tiny_gguf_a_near, k=20, n_ctx=512, n_threads=1)
        try:
            async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
                policy = replace(BASE, threshold=1.0)
                gen = HybridGenerator(runner, client, vocabulary_of(tiny_gguf_a_near), policy,
                                      scorer=CallableScorer(third_token_is_risky))  # fmt: skip
                prompt = runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": "Hi"}]))
                return await gen.generate(prompt, 20)
        finally:
            runner.close()

    r = run(go())
    sources = [rec.source for rec in r.records]
    # Each window keeps 2 edge tokens, the cloud corrects the third and writes M - 1 = 2 more: e e c c c ...
    assert sources[:5] == ["edge", "edge", "corrected", "cloud", "cloud"]
    assert seen and all(seen)  # the score function saw P's KLs too (it may use them or not)
