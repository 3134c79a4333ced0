"""The handoff controller on the tiny models, against an independent reference of each policy."""

from __future__ import annotations

import numpy as np
import pytest

from handoff.cloud.service import VerifierService
from handoff.cloud.settings import CloudSettings
from handoff.edge.cloud_harness import llama_backend_factory, run, running_server, vocabulary_of
from handoff.edge.controller import HybridGenerator
from handoff.edge.policy import PolicyConfig
from handoff.edge.runner import EdgeRunner
from handoff.edge.verifier_client import InProcessTransport, VerifierClient
from handoff.edge.wire import WIRE_REST_MARGIN
from handoff.shared.divergence import top_k, topk_kl
from handoff.shared.llama_cpp_model import LlamaCppModel
from handoff.shared.sampling import SamplingSettings, sample_token

MAX_TOKENS = 40


@pytest.fixture(scope="module")
def prompt(tiny_gguf_a):
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        return m.tokenize(m.chat_prompt([{"role": "user", "content": "Sort a list of numbers in Python."}]))


async def _generate(
    cloud_path, edge_path, prompt, policy, over_grpc=False, *, mode="hybrid", sampling=None, on_token=None,
    max_tokens=MAX_TOKENS,
):  # fmt: skip
    vocab = vocabulary_of(edge_path)
    runner = EdgeRunner(edge_path, k=policy.top_k, n_ctx=512, n_threads=1)

    async def go(client):
        gen = HybridGenerator(runner, client, vocab, policy, mode=mode)
        return await gen.generate(prompt, max_tokens, sampling=sampling, on_token=on_token)

    try:
        if mode == "edge":
            return await go(None)
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
            streak = 0
            for j in range(min(policy.handback_tokens, max_tokens - len(out))):
                lp = self.dist(self.p, ctx)
                t = int(np.argmax(lp))
                out.append((t, "corrected" if j == 0 and keep < len(window) else "cloud"))
                if t in self.stops:
                    return out
                if policy.agree_tokens:  # hand back once the models agree again
                    lq = self.dist(self.q, ctx)
                    p_ids, p_vals = top_k(lp, k)
                    q_ids, q_vals = top_k(lq, k)
                    kl = topk_kl(p_ids[None], p_vals[None], q_ids[None], q_vals[None],
                                 q_logprobs_at_p_ids=lq[p_ids][None], rest_margin=WIRE_REST_MARGIN)[0]  # fmt: skip
                    streak = streak + 1 if kl <= policy.threshold else 0
                ctx.append(t)
                if policy.agree_tokens and streak >= policy.agree_tokens and len(out) < max_tokens:
                    break
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


@pytest.mark.parametrize(
    ("kind", "agree", "lookahead"), [("rollback", 0, 1), ("seed", 0, 1), ("rollback", 2, 0), ("seed", 2, 2)]
)
def test_policies_match_the_reference_token_by_token(
    tiny_gguf_a, tiny_gguf_a_near, prompt, reference, kind, agree, lookahead
):
    # A vs near-A: per-position KL 0.004-0.05 nats, so tau = 0.02 flags some windows and not others.
    policy = PolicyConfig(
        kind=kind, check_interval=6, threshold=0.02, handback_tokens=3 if not agree else 12, top_k=20,
        agree_tokens=agree, lookahead_windows=lookahead,
    )  # fmt: skip
    result = run(_generate(tiny_gguf_a, tiny_gguf_a_near, prompt, policy))
    expected = reference.run(prompt, policy, MAX_TOKENS)
    assert [(r.token_id, r.source) for r in result.records] == expected
    counts = result.counts()
    assert result.handoffs >= 1 and counts["edge"] >= 1 and counts["unchecked"] == 0
    if agree:  # some handoffs ended early, before M = 12 cloud tokens
        assert result.handbacks_early >= 1
    if kind == "rollback":
        assert counts["corrected"] >= 1
        assert all(r.kl <= policy.threshold for r in result.records if r.source == "edge")
    assert [r.position for r in result.records] == list(range(len(prompt), len(prompt) + len(result.records)))


@pytest.mark.parametrize("lookahead", [0, 1])
def test_different_models_hand_off_where_the_kl_says(tiny_gguf_a, tiny_gguf_b, prompt, lookahead):
    """A vs B disagree by several nats everywhere: every window is cut at once; the text is P's own."""
    policy = PolicyConfig(
        kind="rollback", check_interval=4, threshold=0.5, handback_tokens=4, lookahead_windows=lookahead
    )
    result = run(_generate(tiny_gguf_a, tiny_gguf_b, prompt, policy, over_grpc=True))
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        m.eval(prompt)
        cloud_greedy = []
        for _ in range(len(result.records)):
            cloud_greedy.append(int(np.argmax(m.next_logits())))
            m.eval([cloud_greedy[-1]])
    assert result.tokens == cloud_greedy
    assert result.counts()["edge"] == 0
    if lookahead:  # a window drafted behind each check point is thrown away, its check point too
        assert result.check_points >= result.handoffs and result.discarded_drafts > 0
    else:
        assert result.check_points == result.handoffs and result.discarded_drafts == 0
    assert result.bytes_sent > 0 and result.bytes_received > 0


def test_seed_tokens_come_from_the_cloud(tiny_gguf_a, tiny_gguf_a_near, prompt):
    policy = PolicyConfig(kind="seed", seed_tokens=5, check_interval=8, threshold=10.0)
    result = run(_generate(tiny_gguf_a, tiny_gguf_a_near, prompt, policy))
    assert [r.source for r in result.records[:5]] == ["cloud"] * 5
    assert all(r.source == "edge" for r in result.records[5:])
    assert result.handoffs == 1


def test_generate_command_on_tiny_models(tiny_gguf_a, tiny_gguf_a_near, tmp_path, run_handoff):
    """`handoff generate` end to end: an embedded verifier on a loopback port, JSON summary, a trace file."""
    import json

    trace = tmp_path / "trace.jsonl"
    proc = run_handoff(
        "generate", "--edge", tiny_gguf_a_near, "--cloud-model", tiny_gguf_a,
        "--max-tokens", "24", "--threshold", "0.02", "--check-interval", "6", "--handback-tokens", "3",
        "--trace", trace, "--json", env={"HANDOFF_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["tokens"] == sum(summary["by_source"].values()) > 0
    assert summary["check_points"] >= 1 and summary["bytes_sent"] > 0
    assert summary["cloud"]["backend"] == "llama.cpp"
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    header, records, footer = lines[0], lines[1:-1], lines[-1]
    assert header["record"] == "generation" and header["policy"]["check_interval"] == 6
    assert footer["record"] == "summary" and footer["tokens"] == summary["tokens"] == len(records)
    keys = {"position", "token_id", "text", "source", "checked", "kl", "q_entropy", "q_topk_ids",
            "t_generated", "t_uploaded", "t_answered"}  # fmt: skip
    assert all(r["record"] == "token" and keys <= set(r) for r in records)
    assert "".join(r["text"] for r in records) == summary["text"]
    for r in records:
        assert r["kl"] is not None and r["checked"]
        if r["source"] == "edge":
            assert r["t_generated"] <= r["t_uploaded"] <= r["t_answered"]


# --------------------------------------------------------------------------------------------------
# Modes, sampling, streaming


SAMPLED = SamplingSettings(temperature=0.9, top_p=0.95, seed=7)


def test_cloud_only_equals_the_cloud_models_own_generation(tiny_gguf_a, tiny_gguf_a_near, prompt):
    """--cloud-only with a seed is P's own sampled generation: P's backend run alone gives the same tokens."""
    from handoff.cloud.backend import ForwardItem

    policy = PolicyConfig()
    cloud = run(_generate(tiny_gguf_a, tiny_gguf_a_near, prompt, policy, mode="cloud", sampling=SAMPLED))
    assert {r.source for r in cloud.records} == {"cloud"} and cloud.check_points == 0 and cloud.tokens
    # P's own generation: the same backend driven directly, one forward pass and one draw per token.
    backend = llama_backend_factory(tiny_gguf_a)()
    try:
        seq, feed, own = backend.new_sequence(), list(prompt), []
        while len(own) < len(cloud.tokens):
            (out,) = backend.forward([ForwardItem(seq, feed, n_out=1, k=20, full_last=True)])
            position = len(prompt) + len(own)
            own.append(sample_token(out.last_logprobs, SAMPLED, SAMPLED.rng_for(position)))
            feed = [own[-1]]
    finally:
        backend.close()
    assert cloud.tokens == own
    # Q's view was recorded at every cloud position: a full trace.
    assert all(r.kl is not None and r.q_topk_ids for r in cloud.records)
    greedy = run(_generate(tiny_gguf_a, tiny_gguf_a_near, prompt, policy, mode="cloud"))
    assert greedy.tokens != cloud.tokens  # the seed mattered
    # Greedy, across runtimes: cloud-only on P = P on the edge's runner, edge-only.
    edge_on_p = run(_generate(None, tiny_gguf_a, prompt, policy, mode="edge"))
    assert greedy.tokens == edge_on_p.tokens
    assert edge_on_p.counts()["unchecked"] == len(edge_on_p.records) and edge_on_p.bytes_sent == 0


def test_identical_models_sampled_hybrid_is_edge_only(tiny_gguf_a, prompt):
    policy = PolicyConfig(check_interval=5, threshold=0.01)
    hybrid = run(_generate(tiny_gguf_a, tiny_gguf_a, prompt, policy, over_grpc=True, sampling=SAMPLED))
    edge = run(_generate(None, tiny_gguf_a, prompt, policy, mode="edge", sampling=SAMPLED))
    assert hybrid.tokens == edge.tokens and hybrid.handoffs == 0
    assert hybrid.counts()["edge"] == len(hybrid.records) and hybrid.counts()["unchecked"] == 0
    assert edge.counts()["unchecked"] == len(edge.records)  # nothing checked them


@pytest.mark.parametrize("kind", ["rollback", "seed"])
def test_lookahead_does_not_change_sampled_output(tiny_gguf_a, tiny_gguf_a_near, prompt, kind):
    """Drafts thrown away behind a handover do not shift later draws: seeded output is lookahead-free."""
    outs = []
    for lookahead in (0, 1, 3):
        policy = PolicyConfig(kind=kind, check_interval=4, threshold=0.02, handback_tokens=3,
                              lookahead_windows=lookahead)  # fmt: skip
        result = run(_generate(tiny_gguf_a, tiny_gguf_a_near, prompt, policy, sampling=SAMPLED))
        outs.append([(r.token_id, r.source) for r in result.records])
        assert result.handoffs >= 1
    assert outs[0] == outs[1] == outs[2]


def test_on_token_streams_in_order_and_can_stop(tiny_gguf_a, tiny_gguf_a_near, prompt):
    seen = []

    async def on_token(record):
        seen.append(record.position)
        return len(seen) == 10  # stop after the 10th token

    policy = PolicyConfig(check_interval=4, threshold=0.02, handback_tokens=3)
    result = run(_generate(tiny_gguf_a, tiny_gguf_a_near, prompt, policy, on_token=on_token))
    assert result.stop_reason == "stopped" and len(result.records) == 10
    assert seen == [r.position for r in result.records] == list(range(len(prompt), len(prompt) + 10))
    assert result.first_token_s is not None and 0 < result.first_token_s <= result.seconds


def test_max_tokens_is_bounded_by_the_edge_context(tiny_gguf_a, prompt):
    policy = PolicyConfig(check_interval=8)
    room = 512 - len(prompt)
    result = run(_generate(tiny_gguf_a, tiny_gguf_a, prompt, policy, mode="edge", max_tokens=room + 50))
    assert len(result.records) <= room
    assert result.stop_reason in ("context_full", "stop_token")


def test_generate_baselines_and_chat_commands(tiny_gguf_a, tiny_gguf_a_near, tmp_path, run_handoff):
    """`generate --edge-only/--cloud-only` and an interactive `chat` session through real processes."""
    import json

    models = ["--edge", str(tiny_gguf_a_near), "--cloud-model", str(tiny_gguf_a)]

    def handoff(*args, stdin=None):
        return run_handoff(*args, stdin=stdin, env={"HANDOFF_THREADS": "1"})

    summaries = {}
    for flag in ("--edge-only", "--cloud-only"):
        proc = handoff("generate", *models, "--max-tokens", "12", "--json", flag)
        assert proc.returncode == 0, proc.stderr
        summaries[flag] = json.loads(proc.stdout)
    edge, cloud = summaries["--edge-only"], summaries["--cloud-only"]
    assert edge["mode"] == "edge" and edge["by_source"]["edge"] == edge["tokens"] > 0
    assert edge["check_points"] == 0 and edge["bytes_sent"] == 0
    assert cloud["mode"] == "cloud" and cloud["by_source"]["cloud"] == cloud["tokens"] > 0
    assert handoff("generate", *models, "--edge-only", "--cloud-only").returncode == 2

    proc = handoff("chat", *models, "--max-tokens", "10", "--threshold", "0.02", "--check-interval", "4",
                   stdin="Hello there\n/reset\nSort a list\n/exit\n")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("you>") == 4  # three lines read, the fourth one exits
    stats = [line for line in proc.stderr.splitlines() if "tokens (hybrid)" in line]
    assert len(stats) == 2 and all("check points" in s and "tok/s" in s for s in stats)
    assert "conversation forgotten" in proc.stderr
