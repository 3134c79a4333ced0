"""Speculative sampling (the exact policy): the verifier's math, and the service's VerifyDraft on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from handoff.shared.errors import ShapeError
from handoff.shared.sampling import SamplingSettings
from handoff.shared.speculative import draft_distribution, target_distribution, verify_draft


def rngs(seed: int, n: int) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, j]) for j in range(n)]


P = np.array([0.5, 0.3, 0.15, 0.05])
Q_IDS = np.array([[1, 0, 3]])  # Q's support: three of the four tokens
Q = np.array([[0.6, 0.3, 0.1]])


def sample_q(rng: np.random.Generator) -> int:
    return int(Q_IDS[0, rng.choice(3, p=Q[0])])


def test_output_is_distributed_as_p():
    """One draft token from q, verified against p: the token that comes out is distributed as p."""
    n = 20_000
    out = np.zeros(4, dtype=np.int64)
    accepted = 0
    rng = np.random.default_rng(0)
    for i in range(n):
        x = sample_q(rng)
        v = verify_draft(np.array([x]), Q_IDS, Q, np.stack([P, P]), rngs(i, 2))
        token = x if v.accepted == 1 else v.next_token
        accepted += v.accepted
        out[token] += 1
    assert chisquare(out, P * n).pvalue > 0.001
    # ...while Q's own draws are not (a test that can fail): token 2 is outside Q's support.
    q_full = np.array([0.3, 0.6, 0.0, 0.1])
    assert chisquare(out[[0, 1, 3]], q_full[[0, 1, 3]] * out[[0, 1, 3]].sum()).pvalue < 1e-6
    # Acceptance rate is 1 - TV(p, q) = sum(min(p, q)).
    assert accepted / n == pytest.approx(np.minimum(P, q_full).sum(), abs=0.015)


def test_all_accepted_draws_a_bonus_from_the_next_position():
    p1 = np.array([0.0, 0.0, 1.0, 0.0])
    v = verify_draft(np.array([1, 1]), np.array([[1], [1]]), np.array([[1.0], [1.0]]),
                     np.stack([np.eye(4)[1], np.eye(4)[1], p1]), rngs(1, 3))  # fmt: skip
    assert (v.accepted, v.next_token, v.bonus) == (2, 2, True)


def test_greedy_accepts_only_ps_argmax_and_corrects_to_it():
    settings = SamplingSettings()  # greedy
    p_rows = np.stack([target_distribution(np.log(P), settings)] * 3)
    q = draft_distribution(np.array([0, 1, 3]), np.log(np.array([0.5, 0.3, 0.05])), settings)
    assert q.tolist() == [1.0, 0.0, 0.0]
    ok = verify_draft(np.array([0, 0]), np.array([[0, 1, 3]] * 2), np.stack([q, q]), p_rows, rngs(0, 3))
    assert (ok.accepted, ok.next_token, ok.bonus) == (2, 0, True)
    q1 = draft_distribution(np.array([1, 0]), np.log(np.array([0.6, 0.3])), settings)  # Q's argmax is 1
    bad = verify_draft(np.array([1]), np.array([[1, 0]]), q1[None], p_rows[:2], rngs(0, 2))
    assert (bad.accepted, bad.next_token, bad.bonus) == (0, 0, False)


def test_sampling_distributions_follow_the_settings():
    lp = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    assert target_distribution(lp, SamplingSettings(temperature=1.0)) == pytest.approx([0.5, 0.3, 0.15, 0.05])
    assert target_distribution(lp, SamplingSettings(temperature=1.0, top_k=2)) == pytest.approx(
        [0.625, 0.375, 0, 0]
    )
    assert draft_distribution(
        np.array([3, 1]), lp[[0, 1]], SamplingSettings(temperature=1.0)
    ) == pytest.approx([0.625, 0.375])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((np.array([]), np.zeros((0, 1)), np.zeros((0, 1)), np.ones((1, 4)) / 4), "gamma"),
        ((np.array([2]), Q_IDS, Q, np.stack([P, P])), "probability 0"),
        ((np.array([1]), Q_IDS, Q * 2, np.stack([P, P])), "summing to 1"),
        ((np.array([1]), Q_IDS, Q, P[None]), "target"),
        ((np.array([9]), Q_IDS, Q, np.stack([P, P])), "outside"),
    ],
)
def test_bad_drafts_are_shape_errors(args, message):
    with pytest.raises(ShapeError, match=message):
        verify_draft(*args, rngs(0, 2))


# -- the service's VerifyDraft on the tiny models ---------------------------------------------------

K = 20


async def _with_service(cloud_path, body):
    from handoff.cloud.service import VerifierService
    from handoff.cloud.settings import CloudSettings
    from handoff.edge.cloud_harness import llama_backend_factory, vocabulary_of
    from handoff.edge.verifier_client import InProcessTransport, VerifierClient

    backend = llama_backend_factory(cloud_path)()
    service = VerifierService(backend, CloudSettings(batch_wait_s=0.0, max_sessions=4))
    await service.start()
    try:
        return await body(VerifierClient(InProcessTransport(service)), vocabulary_of(cloud_path))
    finally:
        await service.stop()
        backend.close()


def _proto_sampling(s: SamplingSettings, stops):
    from handoff.edge.wire import sampling_to_proto

    return sampling_to_proto(s, stops)


async def exact_continuations(cloud_path, edge_path, seeds, length, sampling, gamma=3):
    """Speculative sampling by hand: Q drafts from its top-k truncated distribution, P verifies."""
    from handoff.edge.runner import EdgeRunner
    from handoff.shared.wire import pb, topk_to_proto

    runner = EdgeRunner(edge_path, k=K, n_ctx=512, n_threads=1)
    prompt = runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": "Sort a list."}]))
    out, accepted, drafted = [], 0, 0

    async def body(client, vocab):
        nonlocal accepted, drafted
        for seed in seeds:
            s = (
                SamplingSettings(temperature=sampling.temperature, top_k=K, seed=seed)
                if not sampling.greedy
                else sampling
            )
            runner.start(prompt, s)
            session = await client.open_session(
                prompt, vocabulary=vocab, top_k=K, sampling=_proto_sampling(s, runner.stop_token_ids)
            )
            tokens: list[int] = []
            while len(tokens) < length:
                start = runner.length
                steps = [runner.step() for _ in range(min(gamma, length - len(tokens)))]
                q = [draft_distribution(st.topk_ids, st.topk_logprobs, s) for st in steps]
                draft = [pb.EdgeToken(position=st.position, token_id=st.token_id) for st in steps]
                dists = [
                    topk_to_proto(st.topk_ids, np.log(np.maximum(qq, 1e-300)))
                    for st, qq in zip(steps, q, strict=True)
                ]
                result = await session.verify(draft, dists)
                drafted += len(steps)
                accepted += result.accepted
                keep = [st.token_id for st in steps[: result.accepted]]
                runner.truncate(start + result.accepted)
                tokens += keep
                if result.HasField("next"):
                    tokens.append(result.next.token_id)
                    runner.append([result.next.token_id])
                else:
                    break
            await session.close()
            out.append(tuple(tokens[:length]))

    try:
        await _with_service(cloud_path, body)
    finally:
        runner.close()
    return out, accepted / max(1, drafted)


async def cloud_continuations(cloud_path, edge_path, seeds, length, sampling):
    """P's own sampling: a handoff of `length` tokens per seed."""
    from handoff.edge.runner import EdgeRunner

    runner = EdgeRunner(edge_path, k=K, n_ctx=512, n_threads=1)
    prompt = runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": "Sort a list."}]))
    stops = runner.stop_token_ids
    runner.close()
    out = []

    async def body(client, vocab):
        for seed in seeds:
            s = (
                SamplingSettings(temperature=sampling.temperature, seed=seed)
                if not sampling.greedy
                else sampling
            )
            session = await client.open_session(
                prompt, vocabulary=vocab, top_k=K, sampling=_proto_sampling(s, stops)
            )
            tokens = [t.token_id async for t in session.handoff(length)]
            await session.close()
            out.append(tuple(tokens[:length]))

    await _with_service(cloud_path, body)
    return out


def edge_continuations(edge_path, seeds, length, sampling):
    from handoff.edge.runner import EdgeRunner

    runner = EdgeRunner(edge_path, k=K, n_ctx=512, n_threads=1)
    prompt = runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": "Sort a list."}]))
    out = []
    for seed in seeds:
        runner.start(prompt, SamplingSettings(temperature=sampling.temperature, seed=seed))
        out.append(tuple(runner.step().token_id for _ in range(length)))
    runner.close()
    return out


@pytest.mark.slow
def test_exact_mode_samples_ps_distribution(tiny_gguf_a, tiny_gguf_b, homogeneity_p):
    """Q (tiny B) drafts, P (tiny A) verifies: two-token continuations match P's own, not Q's."""
    from handoff.edge.cloud_harness import run

    sampling = SamplingSettings(temperature=0.5)
    n, length = 700, 2
    exact, acceptance = run(exact_continuations(tiny_gguf_a, tiny_gguf_b, range(n), length, sampling))
    own = run(cloud_continuations(tiny_gguf_a, tiny_gguf_b, range(10_000, 10_000 + n), length, sampling))
    edge = edge_continuations(tiny_gguf_b, range(20_000, 20_000 + n), length, sampling)
    assert homogeneity_p(exact, own) > 0.001  # does not reject: the exact mode samples P
    assert homogeneity_p(edge, own) < 1e-6  # Q alone is clearly another distribution
    assert 0.0 < acceptance < 1.0


def test_exact_mode_greedy_is_ps_greedy_text(tiny_gguf_a, tiny_gguf_a_near):
    from handoff.edge.cloud_harness import run

    greedy = SamplingSettings()
    exact, acceptance = run(exact_continuations(tiny_gguf_a, tiny_gguf_a_near, [0], 24, greedy, gamma=4))
    own = run(cloud_continuations(tiny_gguf_a, tiny_gguf_a_near, [0], 24, greedy))
    assert exact == own and len(exact[0]) == 24
    assert acceptance > 0.5  # A-near agrees with A on most greedy tokens


def test_verify_rejects_bad_drafts(tiny_gguf_a):
    from handoff.edge.cloud_harness import run
    from handoff.shared.errors import VerifierError
    from handoff.shared.wire import pb, topk_to_proto

    async def body(client, vocab):
        one = topk_to_proto(np.array([5]), np.array([0.0]))
        cases = [
            ([pb.EdgeToken(position=7, token_id=5)], [one], "position"),
            ([pb.EdgeToken(position=3, token_id=5)], [], "distributions"),
            ([pb.EdgeToken(position=3, token_id=6)], [one], "probability 0"),
            ([pb.EdgeToken(position=3, token_id=99_999)], [one], "outside"),
        ]
        for draft, dists, message in cases:  # a refused request ends its session: one each
            session = await client.open_session([1, 2, 3], vocabulary=vocab, top_k=K)
            with pytest.raises(VerifierError, match=message) as e:
                await session.verify(draft, dists)
            assert e.value.code == "INVALID_ARGUMENT"
            session.abort()
        session = await client.open_session([1, 2, 3], vocabulary=vocab, top_k=K)
        result = await session.verify([pb.EdgeToken(position=3, token_id=5)], [one])
        assert result.length == 3 + result.accepted + 1 and result.next.position == 3 + result.accepted
        await session.close()

    run(_with_service(tiny_gguf_a, body))


# -- the exact policy through the controller (HybridGenerator) ------------------------------------


async def _generate(cloud_path, edge_path, policy, sampling, max_tokens, mode="hybrid"):
    from handoff.edge.cloud_harness import llama_backend_factory, running_server, vocabulary_of
    from handoff.edge.controller import HybridGenerator
    from handoff.edge.runner import EdgeRunner

    runner = EdgeRunner(edge_path, k=policy.top_k, n_ctx=512, n_threads=1)
    try:
        prompt = runner.model.tokenize(
            runner.model.chat_prompt([{"role": "user", "content": "Sort a list."}])
        )
        async with running_server(llama_backend_factory(cloud_path)) as (_, client):
            gen = HybridGenerator(runner, client, vocabulary_of(edge_path), policy, mode=mode)
            return await gen.generate(prompt, max_tokens, sampling=sampling)
    finally:
        runner.close()


def test_exact_policy_greedy_reproduces_cloud_only_text(tiny_gguf_a, tiny_gguf_a_near, tiny_gguf_b):
    """Over real gRPC: greedy exact mode writes P's own greedy text, token for token, for either edge."""
    from handoff.edge.cloud_harness import run
    from handoff.edge.policy import PolicyConfig

    policy = PolicyConfig(kind="exact", draft_tokens=3)
    cloud = run(_generate(tiny_gguf_a, tiny_gguf_a_near, policy, SamplingSettings(), 40, mode="cloud"))
    for edge in (tiny_gguf_a_near, tiny_gguf_b):
        r = run(_generate(tiny_gguf_a, edge, policy, SamplingSettings(), 40))
        assert r.tokens == cloud.tokens, edge.name
        s = r.summary()
        assert s["drafts"] >= 1 and 0.0 <= s["acceptance_rate"] <= 1.0
        assert r.counts()["edge"] == r.draft_accepted
        acc = s["accounting"]
        assert acc["checked_positions"] == r.draft_tokens and acc["round_trips"] == 1 + r.drafts
        assert (
            acc["override_tokens"] + acc["other_cloud_tokens"]
            == r.counts()["corrected"] + r.counts()["cloud"]
        )
    near = run(_generate(tiny_gguf_a, tiny_gguf_a_near, policy, SamplingSettings(), 40))
    far = run(_generate(tiny_gguf_a, tiny_gguf_b, policy, SamplingSettings(), 40))
    # A-near agrees with A far more often than B does: more accepted, longer drafts.
    assert near.acceptance()["acceptance_rate"] > far.acceptance()["acceptance_rate"]
    assert near.acceptance()["mean_accepted_length"] > far.acceptance()["mean_accepted_length"]


@pytest.mark.slow
def test_exact_policy_samples_ps_distribution_through_the_controller(tiny_gguf_a, tiny_gguf_b, homogeneity_p):
    """Seeded sampling through HybridGenerator: first two tokens match P's own sampling (chi-square)."""
    from handoff.edge.cloud_harness import llama_backend_factory, run, running_server, vocabulary_of
    from handoff.edge.controller import HybridGenerator
    from handoff.edge.policy import PolicyConfig
    from handoff.edge.runner import EdgeRunner

    n = 400

    async def go():
        runner = EdgeRunner(tiny_gguf_b, k=K, n_ctx=512, n_threads=1)
        prompt = runner.model.tokenize(
            runner.model.chat_prompt([{"role": "user", "content": "Sort a list."}])
        )
        out = {"exact": [], "cloud": []}
        try:
            async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
                for mode, base in (("exact", 0), ("cloud", 50_000)):
                    policy = PolicyConfig(kind="exact", draft_tokens=2)
                    gen = HybridGenerator(runner, client, vocabulary_of(tiny_gguf_b), policy,
                                          mode="hybrid" if mode == "exact" else "cloud")  # fmt: skip
                    for seed in range(base, base + n):
                        r = await gen.generate(
                            prompt, 2, sampling=SamplingSettings(temperature=0.5, seed=seed)
                        )
                        out[mode].append(tuple(r.tokens))
        finally:
            runner.close()
        return out

    out = run(go())
    assert homogeneity_p(out["exact"], out["cloud"]) > 0.001


@pytest.mark.real_models
@pytest.mark.slow
def test_exact_policy_on_the_default_pair(run_handoff):
    """The default pair, greedy: `generate --policy exact` writes exactly `generate --cloud-only`'s text."""
    import json

    from handoff.shared.models import ensure_model
    from handoff.shared.settings import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL

    ensure_model(DEFAULT_EDGE_MODEL), ensure_model(DEFAULT_CLOUD_MODEL)
    out = {}
    for flag in ("--cloud-only", "--policy=exact"):
        proc = run_handoff("generate", "--max-tokens", "32", "--json", flag, timeout=900)
        assert proc.returncode == 0, proc.stderr
        out[flag] = json.loads(proc.stdout)
    exact, cloud = out["--policy=exact"], out["--cloud-only"]
    assert exact["text"] == cloud["text"] and exact["tokens"] == cloud["tokens"] == 32
    assert exact["drafts"] >= 1 and exact["acceptance_rate"] > 0.5  # the 0.5B mostly agrees with the 1.5B
