"""A cloud that dies, is slow, or is not there: the edge finishes the text, marks it, and resynchronises."""

from __future__ import annotations

import asyncio
import signal
import socket

import numpy as np
import pytest

from handoff.cloud.service import VerifierService
from handoff.cloud.settings import CloudSettings
from handoff.edge.cloud_harness import llama_backend_factory, run, start_server, vocabulary_of
from handoff.edge.controller import HybridGenerator
from handoff.edge.link import LinkConfig
from handoff.edge.policy import PolicyConfig
from handoff.edge.runner import EdgeRunner
from handoff.edge.verifier_client import GrpcTransport, InProcessTransport, VerifierClient
from handoff.shared.errors import VerifierError
from handoff.shared.llama_cpp_model import LlamaCppModel

FAST_RETRY = LinkConfig(
    check_timeout_s=5.0, token_timeout_s=5.0, open_timeout_s=10.0, retry_initial_s=0.05, retry_max_s=0.3
)


@pytest.fixture(scope="module")
def prompt(tiny_gguf_a):
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        return m.tokenize(m.chat_prompt([{"role": "user", "content": "Sort a list of numbers in Python."}]))


def own_greedy(path, prompt, n):
    """The model's own greedy continuation: what an identical edge and cloud must produce together."""
    with LlamaCppModel(path, n_ctx=512, n_threads=1) as m:
        m.eval(prompt)
        out = []
        for _ in range(n):
            out.append(int(np.argmax(m.next_logits())))
            m.eval([out[-1]])
    return out


async def generate(
    edge_path, client, prompt, policy, max_tokens, *, link=FAST_RETRY, on_token=None, mode="hybrid"
):
    runner = EdgeRunner(edge_path, k=policy.top_k, n_ctx=512, n_threads=1)
    try:
        gen = HybridGenerator(runner, client, vocabulary_of(edge_path), policy, mode=mode, link=link)
        return await gen.generate(prompt, max_tokens, on_token=on_token)
    finally:
        runner.close()


def assert_contiguous(result, prompt):
    assert [r.position for r in result.records] == list(range(len(prompt), len(prompt) + len(result.records)))


def probing() -> bool:
    """The edge is probing a lost cloud: its background probe (the task "cloud-probe") still runs."""
    return any(t.get_name() == "cloud-probe" and not t.done() for t in asyncio.all_tasks())


def hold_while_probing(async_wait_until):
    """An on_token that holds the generation while the edge probes, until the probe reaches the cloud.

    Tiny models generate faster than any retry: without it the text could end before the probe sees
    the cloud again, and the resynchronisation under test would not happen. The edge's tokens before
    the hold are still committed unchecked, as the fallback does.
    """

    async def on_token(record):
        if probing():
            await async_wait_until(
                lambda: not probing(), timeout=60, what="the edge's probe to reach the cloud"
            )

    return on_token


@pytest.mark.e2e  # a real serve-cloud process, started by the harness
def test_killed_cloud_edge_finishes_unchecked_then_restarted_cloud_is_resynchronised(
    tiny_gguf_a, prompt, async_wait_until
):
    """SIGKILL the serve-cloud process mid-generation, restart it on the same port later."""
    proc, port = start_server(tiny_gguf_a)
    state = {"proc": proc, "killed_at": None, "restarted_at": None}

    async def on_token(record):
        n = record.position - len(prompt) + 1
        if n == 24:
            state["proc"].send_signal(signal.SIGKILL)
            state["proc"].wait(timeout=30)
            state["killed_at"] = n
        elif n == 80:
            # Restart on the same port; hold the generation until the edge's probe has reached it.
            state["proc"], _ = await asyncio.to_thread(start_server, tiny_gguf_a, port=port)
            assert probing(), "the edge is not probing the killed cloud"
            await async_wait_until(
                lambda: not probing(), timeout=60, what="the edge's probe to reach the cloud"
            )
            state["restarted_at"] = n

    async def scenario():
        client = VerifierClient(GrpcTransport(f"127.0.0.1:{port}"))
        try:
            return await generate(
                tiny_gguf_a, client, prompt, PolicyConfig(check_interval=4), 160, on_token=on_token
            )
        finally:
            await client.close()

    try:
        result = run(scenario())
    finally:
        state["proc"].kill()
        state["proc"].wait(timeout=30)
    assert state["restarted_at"] == 80, "the generation ended before the restart"
    # No text lost or repeated: identical models, greedy, so the output is the model's own.
    assert result.tokens == own_greedy(tiny_gguf_a, prompt, len(result.tokens))
    assert_contiguous(result, prompt)
    assert result.cloud_failures >= 1 and result.resyncs >= 1
    checked = [r.checked for r in result.records]
    assert all(checked[:20])  # before the kill (the window in flight at the kill may go unchecked)
    assert not all(checked[24:80])  # after the kill: unchecked, yet generated
    assert result.counts()["unchecked"] == checked.count(False) > 0
    assert all(checked[-40:])  # after the restart: checked again...
    # ...by a cloud whose context is the edge's: identical models agree to rounding at every position.
    assert max(r.kl for r in result.records[-40:]) < 1e-3
    assert result.handoffs == 0


class _SlowFirstSession(VerifierService):
    """Answers the first session's check points late (a cloud that is slow, not gone: the sleep is the
    behaviour under test)."""

    delay_s = 1.5
    slow_sessions = 1

    async def _check(self, s, req):
        if self.slow_sessions and s.id == getattr(self, "_slow_id", s.id):
            self._slow_id = s.id
            await asyncio.sleep(self.delay_s)
        return await super()._check(s, req)

    async def _release(self, session, reason):
        if session.id == getattr(self, "_slow_id", None):
            self.slow_sessions = 0
        await super()._release(session, reason)


class _DiesDuringHandoff(VerifierService):
    """The first session's first handoff streams two tokens, then the session breaks."""

    broken = False

    async def _handoff(self, s, req, rid, stop):
        n = 0
        async for msg in super()._handoff(s, req, rid, stop):
            yield msg
            n += msg.WhichOneof("body") == "token"
            if n == 2 and not self.broken:
                self.broken = True
                raise VerifierError("UNAVAILABLE", "the cloud fell over")


async def _with_service(cls, cloud_path, fn):
    backend = llama_backend_factory(cloud_path)()
    service = cls(backend, CloudSettings(batch_wait_s=0.0))
    await service.start()
    try:
        return await fn(VerifierClient(InProcessTransport(service)))
    finally:
        await service.stop()
        backend.close()


def test_slow_cloud_times_out_then_session_resumes(tiny_gguf_a, prompt, async_wait_until):
    link = LinkConfig(check_timeout_s=0.3, open_timeout_s=5.0, retry_initial_s=0.05, retry_max_s=0.1)
    policy = PolicyConfig(check_interval=4)

    async def fn(client):
        on_token = hold_while_probing(async_wait_until)
        return await generate(tiny_gguf_a, client, prompt, policy, 120, link=link, on_token=on_token)

    result = run(_with_service(_SlowFirstSession, tiny_gguf_a, fn))
    assert result.tokens == own_greedy(tiny_gguf_a, prompt, len(result.tokens))
    assert_contiguous(result, prompt)
    assert result.cloud_failures >= 1 and result.resyncs >= 1
    checked = [r.checked for r in result.records]
    assert not checked[0]  # the first windows waited past the timeout: committed unchecked
    assert checked[-1] and max(r.kl for r in result.records if r.checked) < 1e-3


def test_cloud_dies_during_a_handoff(tiny_gguf_a, tiny_gguf_b, prompt, async_wait_until):
    """Cloud tokens already streamed are kept; the edge goes on from there, unchecked, then resyncs."""
    policy = PolicyConfig(check_interval=4, threshold=0.5, handback_tokens=4, agree_tokens=0)

    async def fn(client):
        return await generate(
            tiny_gguf_b, client, prompt, policy, 60, on_token=hold_while_probing(async_wait_until)
        )

    result = run(_with_service(_DiesDuringHandoff, tiny_gguf_a, fn))
    assert_contiguous(result, prompt)
    sources = [r.source for r in result.records]
    assert sources[:2] == ["corrected", "cloud"]  # A and B disagree at once; two tokens, then the crash
    assert sources[2] == "edge" and not result.records[2].checked
    assert result.cloud_failures >= 1 and result.resyncs >= 1
    assert result.handoffs >= 2  # the resynchronised cloud takes over again where B disagrees
    assert result.records[-1].checked


def test_unreachable_cloud_hybrid_runs_on_the_edge_and_cloud_only_fails(tiny_gguf_a, prompt):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def scenario(mode):
        client = VerifierClient(GrpcTransport(f"127.0.0.1:{port}"))
        try:
            return await generate(tiny_gguf_a, client, prompt, PolicyConfig(), 24, mode=mode)
        finally:
            await client.close()

    result = run(scenario("hybrid"))
    assert result.tokens == own_greedy(tiny_gguf_a, prompt, 24)
    assert result.counts()["unchecked"] == 24 and result.check_points == 0 and result.cloud_failures >= 1
    with pytest.raises(VerifierError) as e:
        run(scenario("cloud"))
    assert e.value.code == "UNAVAILABLE"


def test_a_vocabulary_mismatch_is_not_retried(tiny_gguf_a, prompt):
    """A refusal retrying cannot fix surfaces as an error instead of a silent edge-only run."""

    async def fn(client):
        runner = EdgeRunner(tiny_gguf_a, k=20, n_ctx=512, n_threads=1)
        try:
            vocab = vocabulary_of(tiny_gguf_a)
            wrong = type(vocab)((*vocab.tokens[:500], b"not-the-same", *vocab.tokens[501:]))
            return await HybridGenerator(runner, client, wrong, PolicyConfig()).generate(prompt, 8)
        finally:
            runner.close()

    with pytest.raises(VerifierError) as e:
        run(_with_service(VerifierService, tiny_gguf_a, fn))
    assert e.value.code in ("INVALID_ARGUMENT", "FAILED_PRECONDITION")


def test_gated_router_slow_cloud_marks_unreachable_apart_from_by_design(
    tiny_gguf_a, prompt, async_wait_until, tmp_path
):
    """A gated policy (the router): tokens it leaves unchecked are "by_design"; those committed while the
    cloud was too slow are "unreachable"; after the resync, flagged positions are checked again."""
    from handoff.edge.policy import RouterModel
    from handoff.edge.policy.features import SCALAR_FEATURES

    # A router that flags positions where Q's entropy is at or over its median along the text.
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        m.eval(prompt)
        ents = []
        for t in own_greedy(tiny_gguf_a, prompt, 60):
            lp = m.next_logprobs()
            ents.append(float(-(np.exp(lp) * lp).sum()))
            m.eval([t])
    f = len(SCALAR_FEATURES)
    w = np.zeros((f, 1))
    w[SCALAR_FEATURES.index("q_entropy"), 0] = 1.0
    fp = vocabulary_of(tiny_gguf_a).fingerprint
    router = RouterModel(
        np.zeros(f),
        np.ones(f),
        ((w, np.asarray([-float(np.median(ents))])),),
        0.5,
        fp.digest.hex(),
        fp.vocab_size,
    )
    router.save(tmp_path / "router.json")
    link = LinkConfig(check_timeout_s=0.3, open_timeout_s=5.0, retry_initial_s=0.05, retry_max_s=0.1)
    policy = PolicyConfig(kind="router", router=str(tmp_path / "router.json"), check_interval=4)

    async def fn(client):
        on_token = hold_while_probing(async_wait_until)
        return await generate(tiny_gguf_a, client, prompt, policy, 120, link=link, on_token=on_token)

    result = run(_with_service(_SlowFirstSession, tiny_gguf_a, fn))
    assert result.tokens == own_greedy(tiny_gguf_a, prompt, len(result.tokens))  # nothing lost or repeated
    assert_contiguous(result, prompt)
    assert result.cloud_failures >= 1 and result.resyncs >= 1
    why = [r.unchecked for r in result.records]
    counts = result.counts()
    assert "unreachable" in why and "by_design" in why
    assert counts["unchecked_by_design"] == why.count("by_design")
    assert counts["unchecked_unreachable"] == why.count("unreachable")
    assert all(r.checked == (r.unchecked is None) for r in result.records)
    last_unreachable = max(i for i, u in enumerate(why) if u == "unreachable")
    assert any(r.checked for r in result.records[last_unreachable + 1 :])  # checked again after the resync
