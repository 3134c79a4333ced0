"""Greedy `--policy exact` writes P's cloud-only text token for token, alone and on a busy server.

Over 25 prompts, at least 20 of them answered with 300 tokens. The exact policy's verdicts come from
P's rows at draft positions (γ tokens per pass), cloud-only generation from one-token passes: only a
batch-invariant cloud (deterministic mode) makes the two agree at every near-tie. P is the tiny Q4_K_M model (the real models' quantized kernels), Q the tiny
F32 one with other weights, so drafts are often rejected and corrected.
"""

from __future__ import annotations

import asyncio

import pytest

from handoff.shared.sampling import SamplingSettings

PROMPTS = [
    "Sort a list.", "Write a poem about the sea.", "What is 17 times 23?", "Explain recursion.",
    "Name three rivers.", "Reverse a string in Python.", "Describe a cat.", "Count to twenty.",
    "Why is the sky blue?", "Write a haiku.", "List prime numbers.", "Summarise a story.",
    "Tell me a joke.", "Define entropy.", "How do magnets work?", "Translate hello.",
    "Write a function that adds.", "What is a tree?", "Plan a trip.", "Describe the moon.",
    "Write a long story about a lighthouse.", "Explain how a compiler works.", "Describe a busy market.",
    "Teach me chess openings.", "Write an essay on rivers.",
]  # fmt: skip
MAX_TOKENS = 300


def test_greedy_exact_equals_cloud_only_alone_and_under_load(tiny_gguf_q4k, tiny_gguf_a) -> None:
    from handoff.edge.cloud_harness import llama_backend_factory, run, running_server, vocabulary_of
    from handoff.edge.controller import HybridGenerator
    from handoff.edge.policy import PolicyConfig
    from handoff.edge.runner import EdgeRunner

    policy = PolicyConfig(kind="exact", draft_tokens=4)
    greedy = SamplingSettings()

    async def go():
        runner = EdgeRunner(tiny_gguf_a, k=policy.top_k, n_ctx=1024, n_threads=1)
        load_runner = EdgeRunner(tiny_gguf_a, k=policy.top_k, n_ctx=1024, n_threads=1)
        vocab = vocabulary_of(tiny_gguf_a)
        try:
            prompts = [runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": p}]))
                       for p in PROMPTS]  # fmt: skip
            factory = llama_backend_factory(tiny_gguf_q4k, deterministic=True)
            async with running_server(factory, max_sessions=8, batch_wait_s=0.005) as (_, client):
                cloud = HybridGenerator(runner, client, vocab, policy, mode="cloud")
                exact = HybridGenerator(runner, client, vocab, policy)
                reference = [(await cloud.generate(p, MAX_TOKENS, sampling=greedy)).tokens for p in prompts]
                alone = [(await exact.generate(p, MAX_TOKENS, sampling=greedy)) for p in prompts]

                # Other sessions keep the server busy: their tokens share the scheduler's passes.
                stop = asyncio.Event()
                loaded = HybridGenerator(load_runner, client, vocab, policy, mode="cloud")

                async def load() -> int:
                    n = 0
                    while not stop.is_set():
                        n += len((await loaded.generate(prompts[n % 5], 64, sampling=greedy)).tokens)
                    return n

                background = asyncio.create_task(load())
                try:
                    busy = [(await exact.generate(p, MAX_TOKENS, sampling=greedy)) for p in prompts]
                finally:
                    stop.set()
                    load_tokens = await background
        finally:
            runner.close()
            load_runner.close()
        return reference, alone, busy, load_tokens

    reference, alone, busy, load_tokens = run(go())
    assert load_tokens > 0
    # At least 20 answers run the full 300 tokens (the tiny model ends a few early with a stop token).
    assert sum(len(t) >= MAX_TOKENS for t in reference) >= 20, [len(t) for t in reference]
    for i, (ref, a, b) in enumerate(zip(reference, alone, busy, strict=True)):
        assert a.tokens == ref, f"prompt {i}: exact alone departs from cloud-only"
        assert b.tokens == ref, f"prompt {i}: exact under load departs from cloud-only"
    # The drafts were really verified: some rejected (corrections), most of the text from drafts.
    assert sum(r.counts()["corrected"] for r in alone) > 0
    assert sum(r.draft_accepted for r in alone) > 0


@pytest.mark.real_models
@pytest.mark.slow
def test_default_pair_greedy_exact_equals_cloud_only_on_long_answers() -> None:
    """The default pair through the embedded verifier: exact = cloud-only over long answers."""
    from handoff.edge.assistant import Assistant
    from handoff.edge.cloud_harness import run
    from handoff.edge.settings import EdgeSettings
    from handoff.shared.settings import get_settings

    prompts = [
        "Write a Python function that merges two sorted lists, with a docstring and three doctests.",
        "Explain, step by step, how binary search works and when it fails.",
        "Write a Python class for a stack with push, pop, peek and size, and explain each method.",
    ]

    async def go():
        out = []
        for mode in ("cloud", "hybrid"):
            edge = EdgeSettings(mode=mode, policy="exact")
            async with Assistant(get_settings(), edge) as assistant:
                for p in prompts:
                    ids = assistant.chat_prompt_ids([{"role": "user", "content": p}])
                    out.append(
                        (mode, (await assistant.generate(ids, 320, sampling=SamplingSettings())).tokens)
                    )
        return out

    results = run(go())
    cloud = [t for m, t in results if m == "cloud"]
    exact = [t for m, t in results if m == "hybrid"]
    assert min(len(t) for t in cloud) >= 200
    assert exact == cloud
