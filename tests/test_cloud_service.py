"""The verifier service over real gRPC on port 0, with the tiny models in the llama.cpp backend."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from handoff.edge.cloud_harness import (
    edge_tokens,
    llama_backend_factory,
    run,
    running_server,
    score_all,
    vocabulary_of,
)
from handoff.shared.divergence import kl_divergence, top_k
from handoff.shared.errors import VerifierError
from handoff.shared.llama_cpp_model import LlamaCppModel
from handoff.shared.wire import pb, topk_from_proto

V = 1022  # the tiny models' vocabulary


@pytest.fixture(scope="module")
def vocab_a(tiny_gguf_a):
    return vocabulary_of(tiny_gguf_a)


@pytest.fixture(scope="module")
def prompt_and_continuation(tiny_gguf_a):
    """A chat prompt and 20 tokens of model B's greedy continuation (so A disagrees with some)."""
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        prompt = m.tokenize(m.chat_prompt([{"role": "user", "content": "Write a sorting function."}]))
    rng = np.random.default_rng(0)
    continuation = rng.integers(0, 1000, size=20).tolist()
    return prompt, continuation


@pytest.fixture(scope="module")
def direct_logprobs(tiny_gguf_a, prompt_and_continuation):
    """P's full log-probabilities at every continuation position, one token at a time: [20, V]."""
    prompt, cont = prompt_and_continuation
    rows = []
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        m.eval(prompt)
        for t in cont:
            rows.append(m.next_logprobs())
            m.eval([t])
    return np.stack(rows)


def _full(score: pb.PositionScore) -> np.ndarray:
    """A k = V view as a dense [V] log-probability vector."""
    ids, lp = topk_from_proto(score.topk)
    dense = np.full(V, -np.inf)
    dense[ids] = lp
    return dense


def test_scoring_equals_a_direct_forward_pass(tiny_gguf_a, vocab_a, prompt_and_continuation, direct_logprobs):
    prompt, cont = prompt_and_continuation
    q_views = [top_k(direct_logprobs[j] + 0.01 * j, 8) for j in range(len(cont))]  # any ids will do

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a), max_top_k=V) as (_, client):
            session = await client.open_session(prompt, vocab_a, top_k=V)
            scores = await score_all(session, len(prompt), cont, [len(cont)], topk=q_views)
            await session.close()
            return scores

    scores = run(scenario())
    assert [s.position for s in scores] == list(range(len(prompt), len(prompt) + len(cont)))
    for j, s in enumerate(scores):
        full = _full(s)
        # float32 on the wire: renormalise before comparing the full distributions.
        full -= np.log(np.exp(full).sum())
        assert kl_divergence(full, direct_logprobs[j]) < 1e-4
        # As probabilities: a batch of 20 tokens and one token at a time round differently in
        # llama.cpp (F16 KV cache); 2e-3 is the scale a KL of 1e-4 allows.
        assert np.exp(s.token_logprob) == pytest.approx(np.exp(direct_logprobs[j][cont[j]]), abs=2e-3)
        np.testing.assert_allclose(
            np.exp(s.logprobs_at_edge_topk), np.exp(direct_logprobs[j][q_views[j][0]]), atol=2e-3
        )


def test_incremental_scoring_equals_scoring_from_scratch(tiny_gguf_a, vocab_a, prompt_and_continuation):
    prompt, cont = prompt_and_continuation

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
            a = await client.open_session(prompt, vocab_a, top_k=10)
            b = await client.open_session(prompt, vocab_a, top_k=10)
            at_once = await score_all(a, len(prompt), cont, [20])
            incremental = await score_all(b, len(prompt), cont, [1, 4, 7, 8])
            return at_once, incremental

    at_once, incremental = run(scenario())
    assert len(at_once) == len(incremental) == 20
    for x, y in zip(at_once, incremental, strict=True):
        assert list(x.topk.ids) == list(y.topk.ids)
        np.testing.assert_allclose(np.exp(x.topk.logprobs), np.exp(y.topk.logprobs), atol=2e-3)


def test_handoff_generation_is_reproducible_with_a_seed(tiny_gguf_a, vocab_a, prompt_and_continuation):
    prompt, _ = prompt_and_continuation

    async def generate(client, seed: int | None, temperature: float, n: int = 12):
        sampling = pb.SamplingParams(
            temperature=temperature, top_p=0.95, seed=seed or 0, has_seed=seed is not None
        )
        session = await client.open_session(prompt, vocab_a, sampling=sampling)
        tokens = [t.token_id async for t in session.handoff(n)]
        done = session.last_handoff.done
        await session.close()
        return tokens, done

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
            return (
                await generate(client, 7, 1.0),
                await generate(client, 7, 1.0),
                await generate(client, 8, 1.0),
                await generate(client, None, 0.0),
            )

    (a, done_a), (b, _), (c, _), (greedy, _) = run(scenario())
    assert a == b and len(a) == 12
    assert a != c
    assert done_a.reason == pb.HandoffDone.REASON_MAX_TOKENS and done_a.length == len(prompt) + 12
    # Greedy handoff is the model's own greedy generation.
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        m.eval(prompt)
        expected = []
        for _ in range(12):
            expected.append(int(np.argmax(m.next_logits())))
            m.eval([expected[-1]])
    assert greedy == expected


def test_rollback_then_reappend_gives_the_same_distributions(tiny_gguf_a, vocab_a, prompt_and_continuation):
    prompt, cont = prompt_and_continuation
    start = len(prompt)

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
            s = await client.open_session(prompt, vocab_a, top_k=10)
            first = await score_all(s, start, cont, [8, 12])
            assert await s.rollback(start + 5) == start + 5
            again = await score_all(s, start + 5, cont[5:], [6, 9])
            # A rollback into the prompt's end and a handoff from there also works.
            await s.rollback(start)
            tokens = [t async for t in s.handoff(3)]
            return first, again, tokens

    first, again, tokens = run(scenario())
    for x, y in zip(first[5:], again, strict=True):
        assert x.position == y.position
        assert list(x.topk.ids) == list(y.topk.ids)
        np.testing.assert_allclose(np.exp(x.topk.logprobs), np.exp(y.topk.logprobs), atol=2e-3)
    assert [t.position for t in tokens] == [start, start + 1, start + 2]


def test_stop_generation_ends_a_handoff_early(tiny_gguf_a, vocab_a, prompt_and_continuation):
    prompt, _ = prompt_and_continuation

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
            s = await client.open_session(prompt, vocab_a)
            got = []
            async for t in s.handoff(200):
                got.append(t)
                if len(got) == 3:
                    await s.stop_generation()
            done = s.last_handoff.done
            # The session goes on normally afterwards.
            more = [t async for t in s.handoff(2)]
            return got, done, more

    got, done, more = run(scenario())
    assert done.reason == pb.HandoffDone.REASON_STOPPED
    assert 3 <= len(got) < 200
    assert len(more) == 2 and more[0].position == got[-1].position + 1


def test_get_info_reports_model_vocabulary_and_limits(tiny_gguf_a, vocab_a):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a), max_sessions=5, max_context=300) as (
            _,
            client,
        ):
            info = await client.info()
            hashes = await client.info(token_hashes=(100, 110))
            await client.check_vocabulary(vocab_a)
            return info, hashes

    info, hashes = run(scenario())
    assert info.protocol_version == "handoff.v1"
    assert info.backend == "llama.cpp" and info.vocab_size == V and info.architecture == "qwen2"
    assert info.limits.max_sessions == 5 and info.limits.max_context == 300
    assert bytes(info.vocab.digest) == vocab_a.fingerprint.digest
    assert list(hashes.token_hashes) == vocab_a.token_hashes(100, 110).tolist()


def test_metrics_count_sessions_tokens_and_batches(
    tiny_gguf_a, vocab_a, prompt_and_continuation, async_wait_until
):
    prompt, cont = prompt_and_continuation

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, client):
            sessions = [await client.open_session(prompt, vocab_a) for _ in range(4)]
            await asyncio.gather(*(score_all(s, len(prompt), cont, [16]) for s in sessions))

            async def check(s):
                await s.append(edge_tokens(len(prompt) + 16, cont[16:20]))
                return (await s.check(len(prompt) + 16, len(prompt) + 19)).batch_size

            sizes = await asyncio.gather(*(check(s) for s in sessions))
            await asyncio.gather(*(s.close() for s in sessions))
            # A close is answered before the server releases the session (when its stream ends).
            await async_wait_until(
                lambda: server.service.session_count == 0, what="the sessions to be released"
            )
            return server.metrics.registry, sizes

    registry, sizes = run(scenario())
    assert max(sizes) > 1  # concurrent check points shared a forward pass, and the reply says so
    value = registry.get_sample_value
    assert value("handoff_cloud_sessions_opened_total") == 4
    assert value("handoff_cloud_sessions") == 0
    assert value("handoff_cloud_tokens_scored_total") == 80
    assert value("handoff_cloud_tokens_appended_total") == 80
    # 4 prefills + 8 check points went through at most 12 forward passes, some batched together.
    passes = value("handoff_cloud_forward_seconds_count")
    assert 3 <= passes < 12
    assert value("handoff_cloud_batch_items_sum") == 12


def test_health_is_not_serving_until_the_model_is_loaded(tiny_gguf_a, async_wait_until):
    import threading

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from handoff.cloud.grpc_server import CloudServer
    from handoff.cloud.settings import CloudSettings
    from handoff.edge.verifier_client import GrpcTransport, VerifierClient

    release = threading.Event()  # the model "loads" only once the test has looked
    factory = llama_backend_factory(tiny_gguf_a)

    def gated_load():
        release.wait(timeout=60)
        return factory()

    async def scenario():
        server = CloudServer(CloudSettings(port=0, grace_s=0.1), gated_load)
        starting = asyncio.create_task(server.start())
        await async_wait_until(lambda: server.server is not None and server.port, what="a port")
        request = health_pb2.HealthCheckRequest(service="handoff.v1.Verifier")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)

            async def answer():
                try:
                    return await health.Check(request)
                except grpc.aio.AioRpcError:
                    return None  # the server starts listening inside start()

            before = (await async_wait_until(answer, what="the health service to answer")).status
            client = VerifierClient(GrpcTransport(f"127.0.0.1:{server.port}"))
            with pytest.raises(VerifierError) as e:
                await client.info()
            release.set()
            await starting
            after = (await health.Check(request)).status
            await client.close()
        await server.stop(grace=0.1)
        return before, e.value.code, after

    before, code, after = run(scenario())
    assert before == health_pb2.HealthCheckResponse.NOT_SERVING
    assert code == "UNAVAILABLE"
    assert after == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(tiny_gguf_a):
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, _):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                stub = reflection_pb2_grpc.ServerReflectionStub(ch)

                async def requests():
                    yield reflection_pb2.ServerReflectionRequest(list_services="")

                async for reply in stub.ServerReflectionInfo(requests()):
                    return [s.name for s in reply.list_services_response.service]

    names = run(scenario())
    assert "handoff.v1.Verifier" in names and "grpc.health.v1.Health" in names


def test_many_sessions_share_the_model_concurrently(tiny_gguf_a, vocab_a, prompt_and_continuation):
    prompt, cont = prompt_and_continuation

    async def one(client, seed):
        s = await client.open_session(prompt, vocab_a, top_k=5)
        scores = await score_all(s, len(prompt), cont, [5, 5, 10])
        await s.close()
        return [list(x.topk.ids) for x in scores]

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a, max_sequences=8), max_sessions=8) as (
            _,
            client,
        ):
            return await asyncio.gather(*(one(client, i) for i in range(8)))

    results = run(scenario())
    assert all(r == results[0] for r in results)  # batching does not change anybody's answer


def test_edge_tokens_helper_positions():
    toks = edge_tokens(10, [1, 2, 3])
    assert [t.position for t in toks] == [10, 11, 12] and not toks[0].has_distribution


def test_in_process_and_grpc_transports_give_the_same_answers(tiny_gguf_a, vocab_a, prompt_and_continuation):
    """The edge-cloud boundary: one client API, two transports, identical results."""
    from handoff.cloud.service import VerifierService
    from handoff.cloud.settings import CloudSettings
    from handoff.edge.verifier_client import InProcessTransport, VerifierClient

    prompt, cont = prompt_and_continuation

    async def exercise(client):
        s = await client.open_session(
            prompt, vocab_a, top_k=6, sampling=pb.SamplingParams(temperature=0.8, seed=3, has_seed=True)
        )
        scores = await score_all(s, len(prompt), cont, [7, 13])
        await s.rollback(len(prompt) + 10)
        generated = [t.token_id async for t in s.handoff(5)]
        closed = await s.close()
        return [list(x.topk.ids) for x in scores], generated, closed.tokens_scored, closed.tokens_generated

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, grpc_client):
            over_grpc = await exercise(grpc_client)
        backend = llama_backend_factory(tiny_gguf_a)()
        service = VerifierService(backend, CloudSettings())
        await service.start()
        try:
            in_process = await exercise(VerifierClient(InProcessTransport(service)))
        finally:
            await service.stop()
            backend.close()
        return over_grpc, in_process

    over_grpc, in_process = run(scenario())
    assert over_grpc == in_process
    assert over_grpc[2] == 20 and over_grpc[3] == 5


def test_transformers_backend_through_the_service_equals_a_direct_forward(
    tiny_gguf_a, vocab_a, prompt_and_continuation
):
    """The same scoring path with the transformers backend (CPU, fp32) against a plain HF forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    from handoff.cloud.backends.transformers_backend import TransformersBackend
    from handoff.shared.models import ModelRef

    prompt, cont = prompt_and_continuation
    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf_a.parent), gguf_file=tiny_gguf_a.name, dtype=torch.float32
    )
    with torch.no_grad():
        logits = model(torch.tensor([prompt + cont])).logits[0].double()
    direct = torch.log_softmax(logits, -1).numpy()[len(prompt) - 1 : len(prompt) - 1 + len(cont)]  # [20, V]

    def load():
        return TransformersBackend(
            ModelRef("gguf", tiny_gguf_a, "tiny-a"), device="cpu", dtype="float32", threads=1
        )

    async def scenario():
        async with running_server(load, max_top_k=V) as (_, client):
            info = await client.info()
            s = await client.open_session(
                prompt, vocab_a, top_k=V, sampling=pb.SamplingParams(temperature=0.0)
            )
            scores = await score_all(s, len(prompt), cont, [3, 17])
            await s.rollback(len(prompt))
            greedy = [t.token_id async for t in s.handoff(6)]
            await s.close()
            return info, scores, greedy

    info, scores, greedy = run(scenario())
    assert info.backend == "transformers" and info.dtype == "float32"
    for j, s in enumerate(scores):
        full = _full(s)
        full -= np.log(np.exp(full).sum())
        assert kl_divergence(full, direct[j]) < 1e-4
    assert greedy[0] == int(np.argmax(direct[0]))


def test_metrics_listen_on_the_servers_host_only(tiny_gguf_a):
    """--metrics-port serves Prometheus text on --host (127.0.0.1 here), not on every interface."""
    import socket
    import urllib.request

    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a), metrics_port=port):
            text = await asyncio.to_thread(
                lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
            )
            bound = {c.laddr.ip for c in psutil.Process().net_connections("inet") if c.laddr.port == port}
            return text, bound

    text, bound = run(scenario())
    assert "handoff_cloud_sessions" in text
    assert bound == {"127.0.0.1"}
    # Stopping the server closes its metrics port too.
    listening = psutil.Process().net_connections("inet")
    assert not any(c.laddr.port == port and c.status == psutil.CONN_LISTEN for c in listening)
