"""Handoff across tokenizers on tiny models (edge/cross.py, cloud/text_session.py).

P is tiny A. Q is tiny A with shuffled ids (the same model over texts, another vocabulary) or a tiny
model with a 600-token tokenizer (other weights, shorter tokens, other special ids), so token
boundaries and ids differ from P's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from handoff.edge.cloud_harness import llama_backend_factory
from handoff.edge.cross import CrossGenerator, cross_generator
from handoff.edge.policy import PolicyConfig
from handoff.edge.runner import EdgeRunner
from handoff.edge.verifier_client import InProcessTransport, VerifierClient
from handoff.shared.errors import VerifierError
from handoff.shared.sampling import SamplingSettings
from handoff.shared.wire import pb

PROMPT = "Sort a list."


async def _with(cloud: Path, edge: Path, tmp: Path, body, **settings):
    from handoff.cloud.service import VerifierService
    from handoff.cloud.settings import CloudSettings

    backend = llama_backend_factory(cloud)()
    service = VerifierService(backend, CloudSettings(batch_wait_s=0.0, max_sessions=4, **settings))
    await service.start()
    runner = EdgeRunner(edge, k=20, n_ctx=1024, n_threads=1)
    try:
        client = VerifierClient(InProcessTransport(service))
        return await body(runner, client)
    finally:
        runner.close()
        await service.stop()
        backend.close()


def _prompt(runner: EdgeRunner) -> list[int]:
    return runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": PROMPT}]))


def generate(cloud, edge, tmp, policy: PolicyConfig, n: int, *, mode="hybrid", samplings=(None,)):
    """One generation per sampling setting (greedy by default) through a cross-tokenizer generator."""

    async def body(runner, client):
        gen = await cross_generator(runner, client, policy, mode=mode, cache_dir=tmp / "align")
        return [await gen.generate(_prompt(runner), n, sampling=s or SamplingSettings()) for s in samplings]

    return asyncio.run(_with(cloud, edge, tmp, body))


def cloud_text(cloud, n: int) -> str:
    """P alone (greedy, one tokenizer end to end: the direct path's cloud-only generation), its text."""
    from handoff.edge.cloud_harness import generate_with_server

    return generate_with_server(cloud, cloud, PolicyConfig(), n, mode="cloud", prompt=PROMPT).text


@pytest.mark.parametrize("divergence", ["token", "char"])
def test_identical_text_models_never_hand_off(
    divergence, tiny_gguf_a, tiny_gguf_a_permuted, tmp_path
) -> None:
    """Q is P with other ids: every position aligns and the divergence over shared tokens (or over the
    next character) is ~0."""
    policy = PolicyConfig(kind="rollback", threshold=0.01, divergence=divergence)
    (r,) = generate(tiny_gguf_a, tiny_gguf_a_permuted, tmp_path, policy, 48)
    assert r.handoffs == 0 and r.counts()["edge"] == 48 and r.check_points >= 5
    kls = [t.kl for t in r.records]
    assert sum(k is not None for k in kls) >= 40  # aligned and scored
    assert max(k for k in kls if k is not None) < 1e-3


@pytest.mark.parametrize(
    ("kind", "divergence"), [("rollback", "token"), ("seed", "token"), ("rollback", "char")]
)
def test_a_different_model_hands_over_at_aligned_boundaries(
    kind, divergence, tiny_gguf_a, tiny_gguf_small_vocab, tmp_path
) -> None:
    """Rollback cuts windows where both tokenizations start a token; seed hands over after a whole
    window (the check point over the text's end fed P's last token: the handoff feeds it again)."""
    policy = PolicyConfig(kind=kind, threshold=1.5 if divergence == "token" else 1.2, divergence=divergence)
    (r,) = generate(tiny_gguf_a, tiny_gguf_small_vocab, tmp_path, policy, 40)
    counts = r.counts()
    assert r.cloud_failures == 0 and r.handoffs >= 1 and counts["edge"] >= 1
    if kind == "rollback":
        assert r.rollbacks >= 1 and counts["corrected"] >= 1
    else:
        assert r.rollbacks == 0 and counts["corrected"] == 0 and counts["cloud"] >= 4
    # Edge tokens are scored where both tokenizations start a token at the same byte: most of them here.
    kls = [t.kl for t in r.records if t.source == "edge"]
    assert sum(k is not None and np.isfinite(k) for k in kls) >= len(kls) / 2


@pytest.mark.parametrize("edge_fixture", ["tiny_gguf_a_permuted", "tiny_gguf_small_vocab"])
def test_greedy_exact_across_tokenizers_is_cloud_only_text(
    tiny_gguf_a, edge_fixture, request, tmp_path
) -> None:
    """TLI drafts verified by P: greedy output is P's greedy text, token for token in P's ids."""
    edge = request.getfixturevalue(edge_fixture)
    (hybrid,) = generate(tiny_gguf_a, edge, tmp_path, PolicyConfig(kind="exact"), 48)
    (alone,) = generate(tiny_gguf_a, edge, tmp_path, PolicyConfig(kind="exact"), 48, mode="cloud")
    assert alone.counts()["cloud"] == 48
    assert hybrid.text == alone.text
    assert cloud_text(tiny_gguf_a, 48).startswith(hybrid.text)
    if edge_fixture == "tiny_gguf_a_permuted":
        assert hybrid.draft_accepted == hybrid.draft_tokens > 0  # the same model: every draft stands


def test_exact_across_tokenizers_samples_ps_distribution(
    tiny_gguf_a, tiny_gguf_small_vocab, homogeneity_p, tmp_path
) -> None:
    """The first two characters of the answer under TLI (seeded) against P alone (other seeds): one
    distribution (chi-square); Q's own answers fail the same test."""
    runs = 200
    seeds = [SamplingSettings(temperature=1.0, seed=s) for s in range(runs)]
    others = [SamplingSettings(temperature=1.0, seed=10_000 + s) for s in range(runs)]

    async def body(runner, client):
        tli = await cross_generator(runner, client, PolicyConfig(kind="exact"), cache_dir=tmp_path / "al")
        alone = CrossGenerator(
            runner, client, tli.vocabulary, PolicyConfig(kind="exact"), tli.alignment, mode="cloud"
        )
        ids = _prompt(runner)
        a = [(await tli.generate(ids, 3, sampling=s)).text[:2] for s in seeds]
        b = [(await alone.generate(ids, 3, sampling=s)).text[:2] for s in others]
        c = []
        for s in others:  # Q alone
            runner.start(ids, s)
            c.append(
                runner.detokenize([runner.step().token_id for _ in range(3)]).decode(errors="replace")[:2]
            )
        return a, b, c

    a, b, c = asyncio.run(_with(tiny_gguf_a, tiny_gguf_small_vocab, tmp_path, body))
    assert len(set(a)) >= 5  # P's answers vary: a test with room to fail
    assert homogeneity_p([(x,) for x in a], [(x,) for x in b]) > 0.001
    assert homogeneity_p([(x,) for x in c], [(x,) for x in b]) < 1e-4


@pytest.mark.parametrize("seed", [None, 3, 4])
def test_rollback_across_misaligned_boundaries_loses_and_repeats_no_text(
    seed, tiny_gguf_a, tiny_gguf_small_vocab, tmp_path, monkeypatch
) -> None:
    """After cuts at aligned boundaries and P's text re-tokenised for Q: the committed tokens' bytes are
    exactly the text both sides hold (Q's context plus any unfinished character, P's session text)."""
    import handoff.edge.cross as cross

    seen: list[dict] = []
    commit, run = cross._Run.commit, cross._Run.run

    async def spy_commit(self, record, piece):
        self.pieces = [*getattr(self, "pieces", []), piece]
        return await commit(self, record, piece)

    async def spy_run(self, *args):
        result = await run(self, *args)
        tt = self.text.tt
        seen.append({"committed": b"".join(self.pieces), "text": tt.text, "pending": tt.pending,
                     "q": self.runner.detokenize(self.runner.tokens[len(self.prompt) :]),
                     "p_length": self.session.length})  # fmt: skip
        return result

    monkeypatch.setattr(cross._Run, "commit", spy_commit)
    monkeypatch.setattr(cross._Run, "run", spy_run)
    sampling = SamplingSettings() if seed is None else SamplingSettings(temperature=1.0, seed=seed)

    async def body(runner, client):
        policy = PolicyConfig(kind="rollback", threshold=1.5, check_interval=5)
        gen = await cross_generator(runner, client, policy, cache_dir=tmp_path / "al")
        return await gen.generate(_prompt(runner), 60, sampling=sampling)

    r = asyncio.run(_with(tiny_gguf_a, tiny_gguf_small_vocab, tmp_path, body))
    assert r.rollbacks >= 2 and r.counts()["corrected"] >= 2 and r.cloud_failures == 0
    (s,) = seen
    assert s["committed"] == s["text"] == s["q"] + s["pending"]
    assert s["p_length"] == len(s["committed"])


def test_text_sessions_refuse_bad_requests(tiny_gguf_a, tiny_gguf_small_vocab, tmp_path) -> None:
    async def body(runner, client):
        vocab = (await cross_generator(runner, client, PolicyConfig(), cache_dir=tmp_path / "al")).vocabulary
        s = await client.open_session([], vocab, prompt_text=b"Hello")
        errors = []
        for bad in ("check", "rollback"):
            with pytest.raises(VerifierError) as e:
                await (s.check(0, 99) if bad == "check" else s.rollback(5))  # past the text
            errors.append(e.value.code)
            s = await client.open_session([], vocab, prompt_text=b"Hello")
        assert await s.append_text(b" world", [pb.EdgeToken(position=0)]) == 6
        with pytest.raises(VerifierError) as e:  # a view outside the appended bytes
            await s.append_text(b"!", [pb.EdgeToken(position=99)])
        errors.append(e.value.code)
        s = await client.open_session([], vocab, prompt_text=b"Hello")
        await s.append_text("é".encode()[:1])  # half a character: P cannot go on from there
        with pytest.raises(VerifierError) as e:
            async for _ in s.handoff(2):
                pass
        errors.append(e.value.code)
        with pytest.raises(VerifierError) as e:
            await client.open_session([1, 2], vocab, prompt_text=b"Hello")
        errors.append(e.value.code)
        return errors

    codes = asyncio.run(_with(tiny_gguf_a, tiny_gguf_small_vocab, tmp_path, body))
    assert codes == [
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "INVALID_ARGUMENT",
        "FAILED_PRECONDITION",
        "INVALID_ARGUMENT",
    ]


def test_unsupported_policies_are_refused(tiny_gguf_a, tiny_gguf_small_vocab, tmp_path) -> None:
    from handoff.shared.errors import ShapeError

    async def body(runner, client):
        gen = await cross_generator(runner, client, PolicyConfig(), cache_dir=tmp_path / "al")
        for policy in (PolicyConfig(kind="correction"), PolicyConfig(agree_tokens=2)):
            with pytest.raises(ShapeError, match="across tokenizers"):
                CrossGenerator(runner, client, gen.vocabulary, policy, gen.alignment)

    asyncio.run(_with(tiny_gguf_a, tiny_gguf_small_vocab, tmp_path, body))


@pytest.mark.real_models
@pytest.mark.slow
def test_generate_with_smollm2_on_the_edge_and_the_default_cloud(run_handoff) -> None:
    """`handoff generate --edge smollm2-135m-instruct-q4_1`: SmolLM2's tokenizer on the edge, the default
    1.5B Qwen in the embedded cloud (over gRPC), under the rollback and exact policies."""
    import json

    from handoff.shared.models import ensure_model
    from handoff.shared.settings import DEFAULT_CLOUD_MODEL

    ensure_model("smollm2-135m-instruct-q4_1")
    ensure_model(DEFAULT_CLOUD_MODEL)
    for policy in ("rollback", "exact"):
        done = run_handoff(
            "generate", "--edge", "smollm2-135m-instruct-q4_1", "--policy", policy, "--json", "--max-tokens", "48",
            "--prompt", "What is 17 times 23? Answer with the number only.",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout)
        assert "391" in out["text"], out["text"]
        assert out["stop_reason"] == "stop_token" and out["cloud_failures"] == 0
        assert out["by_source"]["cloud"] + out["by_source"]["corrected"] >= 1  # SmolLM2 alone says 381


def test_a_cloud_that_fails_mid_generation_leaves_the_edge_generating_alone(
    tiny_gguf_a, tiny_gguf_small_vocab, tmp_path, monkeypatch
) -> None:
    """The third check point fails (the session ends with an error): the edge commits its own tokens
    from there, unchecked and marked unreachable, up to max_tokens."""
    from handoff.cloud import text_session

    check, calls = text_session.check, []

    async def failing(svc, s, req):
        calls.append(req.from_position)
        if len(calls) == 3:
            raise VerifierError("UNAVAILABLE", "the GPU fell off the bus")
        return await check(svc, s, req)

    monkeypatch.setattr(text_session, "check", failing)
    (r,) = generate(
        tiny_gguf_a, tiny_gguf_small_vocab, tmp_path, PolicyConfig(kind="rollback", threshold=50.0), 40
    )
    counts = r.counts()
    assert r.cloud_failures == 1 and len(calls) == 3 and len(r.records) == 40
    assert (
        counts["unchecked_unreachable"] == 40 - 16 and counts["edge"] == 40
    )  # two windows of 8 were checked
    assert r.stop_reason == "max_tokens"
