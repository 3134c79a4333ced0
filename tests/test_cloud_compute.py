"""The cloud's compute seconds: reported with each reply (compute_s), summed by the edge per generation."""

from __future__ import annotations

import pytest

from handoff.cloud.backend import ForwardItem
from handoff.cloud.scheduler import split_seconds
from handoff.edge.policy import PolicyConfig
from handoff.edge.records import GenerationResult, TokenRecord


def test_a_batched_pass_is_split_by_the_tokens_each_item_fed():
    items = [ForwardItem(None, [1, 2, 3], n_out=1, k=1), ForwardItem(None, [4], n_out=1, k=1)]
    assert split_seconds(0.8, items) == pytest.approx([0.6, 0.2])
    assert split_seconds(0.8, [ForwardItem(None, [], n_out=0, k=1)] * 2) == pytest.approx([0.4, 0.4])


def test_accounting_reports_cloud_seconds_per_1k_tokens():
    r = GenerationResult(prompt_ids=[1], records=[TokenRecord(i, 5, "edge") for i in range(4)])
    r.cloud_compute_s = 0.02
    acc = r.summary()["accounting"]
    assert acc["cloud_seconds"] == 0.02 and acc["gpu_seconds_per_1k_tokens"] == pytest.approx(5.0)
    assert GenerationResult(prompt_ids=[1]).accounting()["gpu_seconds_per_1k_tokens"] is None


def _generate(cloud_path, edge_path, runs, *, over_grpc):
    """One generation per (mode, policy, max_tokens) in runs, against one cloud; their results."""
    from handoff.cloud.service import VerifierService
    from handoff.cloud.settings import CloudSettings
    from handoff.edge.cloud_harness import llama_backend_factory, run, running_server, vocabulary_of
    from handoff.edge.controller import HybridGenerator
    from handoff.edge.runner import EdgeRunner
    from handoff.edge.verifier_client import InProcessTransport, VerifierClient

    async def go(client):
        runner = EdgeRunner(edge_path, k=20, n_ctx=512, n_threads=1)
        try:
            prompt = runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": "Sort."}]))
            out = []
            for mode, policy, max_tokens in runs:
                gen = HybridGenerator(runner, client, vocabulary_of(edge_path), policy, mode=mode)
                out.append(await gen.generate(prompt, max_tokens))
            return out
        finally:
            runner.close()

    async def main():
        if over_grpc:
            async with running_server(llama_backend_factory(cloud_path)) as (_, client):
                return await go(client)
        backend = llama_backend_factory(cloud_path)()
        service = VerifierService(backend, CloudSettings(batch_wait_s=0.0))
        await service.start()
        try:
            return await go(VerifierClient(InProcessTransport(service)))
        finally:
            await service.stop()
            backend.close()

    return run(main())


@pytest.mark.parametrize("over_grpc", [False, True], ids=["in-process", "grpc"])
def test_compute_seconds_by_mode_and_growing_with_checked_positions(tiny_gguf_a, tiny_gguf_a_near, over_grpc):
    # A threshold nothing reaches: the hybrid only checks, so its cloud work is its checked positions.
    checks = PolicyConfig(check_interval=4, threshold=1e6, lookahead_windows=0)
    handing = PolicyConfig(check_interval=4, threshold=0.0, handback_tokens=2, lookahead_windows=0)
    edge, cloud, short, long, hybrid = _generate(
        tiny_gguf_a,
        tiny_gguf_a_near,
        [
            ("edge", checks, 32),
            ("cloud", checks, 32),
            ("hybrid", checks, 8),
            ("hybrid", checks, 64),
            ("hybrid", handing, 32),
        ],
        over_grpc=over_grpc,
    )
    assert edge.cloud_compute_s == 0 and edge.accounting()["cloud_seconds"] == 0
    for r in (cloud, short, long, hybrid):
        assert r.cloud_compute_s > 0 and r.summary()["accounting"]["cloud_seconds"] == r.cloud_compute_s
    assert hybrid.handoffs > 0 and cloud.handoffs > 0
    # Only check points after the open: more checked positions, more compute.
    assert short.handoffs == long.handoffs == 0
    assert long.checked_positions >= 4 * short.checked_positions > 0
    assert long.cloud_compute_s > short.cloud_compute_s


def test_closed_reports_the_sum_of_the_replies_compute(tiny_gguf_a):
    """The session's total (Closed.compute_s) is what the edge summed from its replies."""
    from handoff.edge.cloud_harness import (
        edge_tokens,
        llama_backend_factory,
        run,
        running_server,
        vocabulary_of,
    )

    async def go():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
            session = await client.open_session(list(range(10, 30)), vocabulary_of(tiny_gguf_a))
            opened = session.compute_s
            await session.append(edge_tokens(20, [5, 6, 7, 8]))
            check = await session.check(20, 23)
            async for _ in session.handoff(3):
                pass
            done = session.last_handoff.done
            closed = await session.close()
            return opened, check.compute_s, done.compute_s, session.compute_s, closed.compute_s

    opened, check, handoff, summed, closed = run(go())
    assert opened > 0 and check > 0 and handoff > 0  # the prefill, the check's forward, three decodes
    assert summed == pytest.approx(opened + check + handoff) and closed == pytest.approx(summed)
