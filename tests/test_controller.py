"""The handoff controller on the tiny models, against an independent reference of each policy."""

from __future__ import annotations

import numpy as np
import pytest
from cloud_harness import llama_backend_factory, run, running_server, vocabulary_of

from cloud.service import VerifierService
from cloud.settings import CloudSettings
from edge.controller import WIRE_REST_MARGIN, HybridGenerator, PolicyConfig
from edge.runner import EdgeRunner
from edge.verifier_client import InProcessTransport, VerifierClient
from shared.divergence import top_k, topk_kl
from shared.llama_cpp_model import LlamaCppModel

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def prompt(tiny_gguf_a):
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        return m.tokenize(m.chat_prompt([{"role": "user", "content": "Sort a list of numbers in Python."}]))


async def _generate(cloud_path, edge_path, prompt, policy, over_grpc=False):
    vocab = vocabulary_of(edge_path)
    runner = EdgeRunner(edge_path, k=policy.top_k, n_ctx=512, n_threads=1)
    try:
        if over_grpc:
            async with running_server(llama_backend_factory(cloud_path)) as (_, client):
                return await HybridGenerator(runner, client, vocab, policy).generate(prompt, MAX_TOKENS)
        backend = llama_backend_factory(cloud_path)()
        service = VerifierService(backend, CloudSettings(batch_wait_s=0.0))
        await service.start()
        try:
            client = VerifierClient(InProcessTransport(service))
            return await HybridGenerator(runner, client, vocab, policy).generate(prompt, MAX_TOKENS)
        finally:
            await service.stop()
            backend.close()
    finally:
        runner.close()


class _Reference:
    """The policies written out directly on two llama.cpp models, re-evaluating every prefix."""

    def __init__(self, p_path, q_path):
        self.p = LlamaCppModel(p_path, n_ctx=512, n_threads=1)
        self.q = LlamaCppModel(q_path, n_ctx=512, n_threads=1)
        self.stops = self.q.stop_token_ids()

    def close(self):
        self.p.close()
        self.q.close()

    @staticmethod
    def dist(model, ids):
        model.reset()
        model.eval(ids)
        return model.next_logprobs()

    def run(self, prompt, policy: PolicyConfig, max_tokens: int):
        out: list[tuple[int, str]] = []
        ctx = list(prompt)
        k = policy.top_k
        while len(out) < max_tokens:
            window, q_rows = [], []
            for _ in range(min(policy.check_interval, max_tokens - len(out))):
                lq = self.dist(self.q, ctx + window)
                q_rows.append(lq)
                window.append(int(np.argmax(lq)))
                if window[-1] in self.stops:
                    break
            kls = []
            for j, lq in enumerate(q_rows):
                lp = self.dist(self.p, ctx + window[:j])
                p_ids, p_vals = top_k(lp, k)
                q_ids, q_vals = top_k(lq, k)
                kls.append(topk_kl(p_ids[None], p_vals[None], q_ids[None], q_vals[None], lp[q_ids][None],
                                   rest_margin=WIRE_REST_MARGIN)[0])  # fmt: skip
            kls = np.array(kls)
            agg = kls.max() if policy.aggregation == "max" else kls.mean()
            keep = len(window)
            if agg > policy.threshold and policy.kind == "rollback":
                over = np.flatnonzero(kls > policy.threshold)
                keep = int(over[0]) if over.size else 0
            out += [(t, "edge") for t in window[:keep]]
            ctx += window[:keep]
            if keep == len(window) and window[-1] in self.stops:
                return out
            if agg <= policy.threshold:
                continue
            for j in range(min(policy.handback_tokens, max_tokens - len(out))):
                t = int(np.argmax(self.dist(self.p, ctx)))
                out.append((t, "corrected" if j == 0 and keep < len(window) else "cloud"))
                ctx.append(t)
                if t in self.stops:
                    return out
        return out


@pytest.fixture(scope="module")
def reference(tiny_gguf_a, tiny_gguf_a_near):
    ref = _Reference(tiny_gguf_a, tiny_gguf_a_near)
    yield ref
    ref.close()


def test_identical_models_never_hand_off(tiny_gguf_a, prompt):
    policy = PolicyConfig(kind="rollback", check_interval=8, threshold=0.05)
    result = run(_generate(tiny_gguf_a, tiny_gguf_a, prompt, policy))
    assert result.handoffs == 0 and result.counts()["edge"] == len(result.records) > 0
    assert max(r.kl for r in result.records) < 1e-3
    # The output is the edge model's own greedy text.
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        m.eval(prompt)
        expected = []
        for _ in range(len(result.records)):
            expected.append(int(np.argmax(m.next_logits())))
            m.eval([expected[-1]])
    assert result.tokens == expected


@pytest.mark.parametrize("kind", ["rollback", "seed"])
def test_policies_match_the_reference_token_by_token(tiny_gguf_a, tiny_gguf_a_near, prompt, reference, kind):
    # A vs near-A: per-position KL 0.004-0.05 nats, so tau = 0.02 flags some windows and not others.
    policy = PolicyConfig(kind=kind, check_interval=6, threshold=0.02, handback_tokens=3, top_k=20)
    result = run(_generate(tiny_gguf_a, tiny_gguf_a_near, prompt, policy))
    expected = reference.run(prompt, policy, MAX_TOKENS)
    assert [(r.token_id, r.source) for r in result.records] == expected
    counts = result.counts()
    assert result.handoffs >= 1 and counts["edge"] >= 1
    if kind == "rollback":
        assert counts["corrected"] >= 1
        assert all(r.kl <= policy.threshold for r in result.records if r.source == "edge")
    assert [r.position for r in result.records] == list(range(len(prompt), len(prompt) + len(result.records)))


def test_different_models_hand_off_where_the_kl_says(tiny_gguf_a, tiny_gguf_b, prompt):
    """A vs B disagree by several nats everywhere: every window is cut at once; the text is P's own."""
    policy = PolicyConfig(kind="rollback", check_interval=4, threshold=0.5, handback_tokens=4)
    result = run(_generate(tiny_gguf_a, tiny_gguf_b, prompt, policy, over_grpc=True))
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        m.eval(prompt)
        cloud_greedy = []
        for _ in range(len(result.records)):
            cloud_greedy.append(int(np.argmax(m.next_logits())))
            m.eval([cloud_greedy[-1]])
    assert result.tokens == cloud_greedy
    assert result.counts()["edge"] == 0 and result.check_points == result.handoffs
    assert result.bytes_sent > 0 and result.bytes_received > 0


def test_seed_tokens_come_from_the_cloud(tiny_gguf_a, tiny_gguf_a_near, prompt):
    policy = PolicyConfig(kind="seed", seed_tokens=5, check_interval=8, threshold=10.0)
    result = run(_generate(tiny_gguf_a, tiny_gguf_a_near, prompt, policy))
    assert [r.source for r in result.records[:5]] == ["cloud"] * 5
    assert all(r.source == "edge" for r in result.records[5:])
    assert result.handoffs == 1


def test_generate_command_on_tiny_models(tiny_gguf_a, tiny_gguf_a_near, tmp_path):
    """`handoff generate` end to end: an embedded verifier on a loopback port, JSON summary, a trace file."""
    import json
    import os
    import subprocess
    import sys

    trace = tmp_path / "trace.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "generate", "--edge", str(tiny_gguf_a_near), "--cloud-model", str(tiny_gguf_a),
         "--max-tokens", "24", "--threshold", "0.02", "--check-interval", "6", "--handback-tokens", "3",
         "--trace", str(trace), "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HANDOFF_THREADS": "1", "COLUMNS": "300"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["tokens"] == sum(summary["by_source"].values()) > 0
    assert summary["check_points"] >= 1 and summary["bytes_sent"] > 0
    assert summary["cloud"]["backend"] == "llama.cpp"
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(records) == summary["tokens"]
    assert {"position", "token_id", "text", "source", "kl", "q_entropy", "t_generated"} <= set(records[0])
    assert all(r["kl"] is not None for r in records if r["source"] == "edge")
