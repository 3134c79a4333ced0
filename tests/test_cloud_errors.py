"""Bad input gets a clear status and the service keeps serving a concurrent healthy session."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import grpc
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
from handoff.edge.verifier_client import GrpcTransport, VerifierClient
from handoff.shared.errors import VerifierError, VocabularyMismatch
from handoff.shared.vocab import Vocabulary
from handoff.shared.wire import fingerprint_to_proto, pb

PROMPT = [1001, 872, 198, 9, 10, 11, 1002, 198, 1001, 77, 198]  # a chat-shaped prompt in the tiny vocab
CONT = list(range(300, 330))


@pytest.fixture(scope="module")
def vocab_a(tiny_gguf_a):
    return vocabulary_of(tiny_gguf_a)


async def healthy(client, vocab, rounds: int = 3) -> list[list[int]]:
    """A well-behaved session running alongside the bad ones."""
    s = await client.open_session(PROMPT, vocab, top_k=5)
    out = []
    for r in range(rounds):
        scores = await score_all(s, len(PROMPT) + 10 * r, CONT[10 * r : 10 * r + 10], [10])
        out.extend(list(x.topk.ids) for x in scores)
        await asyncio.sleep(0.01)  # part of the scenario: lets the bad sessions' requests interleave
    await s.close()
    return out


async def expect_status(coro, code: str, match: str) -> str:
    with pytest.raises(VerifierError) as e:
        await coro
    assert e.value.code == code, (e.value.code, str(e.value))
    assert match in str(e.value), str(e.value)
    return str(e.value)


def _mismatched(vocab: Vocabulary) -> Vocabulary:
    tokens = list(vocab.tokens)
    tokens[500] = b"<not-the-same>"
    return Vocabulary(tuple(tokens), name="other")


async def bad_sessions(client, vocab):
    start = len(PROMPT)
    # Wrong vocabulary: FAILED_PRECONDITION naming the difference.
    await expect_status(
        client.open_session(PROMPT, _mismatched(vocab)), "FAILED_PRECONDITION", "vocabulary mismatch"
    )
    # Token ids out of range, in the prompt and in an append.
    await expect_status(
        client.open_session([5, 99999], vocab), "INVALID_ARGUMENT", "outside [0, 1022): [99999]"
    )
    s = await client.open_session(PROMPT, vocab)
    await expect_status(s.append(edge_tokens(start, [3, -4])), "INVALID_ARGUMENT", "[-4]")
    # Positions out of order.
    s = await client.open_session(PROMPT, vocab)
    await expect_status(s.append(edge_tokens(start + 3, [3, 4])), "INVALID_ARGUMENT", "expected 11")
    s = await client.open_session(PROMPT, vocab)
    await s.append(edge_tokens(start, [3, 4, 5]))
    await expect_status(s.check(start + 1, start + 2), "INVALID_ARGUMENT", "checked in order, the next is 11")
    s = await client.open_session(PROMPT, vocab)
    await s.append(edge_tokens(start, [3, 4, 5]))
    await expect_status(s.check(start, start + 9), "INVALID_ARGUMENT", "not within the appended positions")
    # Rollback outside the session.
    s = await client.open_session(PROMPT, vocab)
    await expect_status(s.rollback(2), "INVALID_ARGUMENT", "rollback to 2 tokens")
    # Handoff with unchecked tokens pending.
    s = await client.open_session(PROMPT, vocab)
    await s.append(edge_tokens(start, [3]))
    await expect_status(s.handoff(4).__anext__(), "FAILED_PRECONDITION", "unchecked edge tokens")
    # A malformed top-k view.
    s = await client.open_session(PROMPT, vocab)
    bad = edge_tokens(start, [3])
    bad[0].has_distribution = True
    bad[0].topk.ids.extend([1, 2])
    bad[0].topk.logprobs.extend([-0.1])
    await expect_status(s.append(bad), "INVALID_ARGUMENT", "malformed top-k view")
    # Empty prompt.
    await expect_status(client.open_session([], vocab), "INVALID_ARGUMENT", "the prompt is empty")


def test_bad_requests_get_clear_statuses_and_others_are_unaffected(tiny_gguf_a, vocab_a, async_wait_until):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, client):
            alone = await healthy(client, vocab_a)
            together, _ = await asyncio.gather(healthy(client, vocab_a), bad_sessions(client, vocab_a))
            # Every failed session is freed (the server does it once each stream has ended).
            await async_wait_until(lambda: server.service.session_count == 0, what="the sessions to be freed")
            return alone, together

    alone, together = run(scenario())
    assert together == alone


def test_first_message_must_open_the_session(tiny_gguf_a):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, _):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                from handoff.shared.wire import pb_grpc

                call = pb_grpc.VerifierStub(ch).Session()
                await call.write(pb.EdgeMessage(request_id=1, check=pb.CheckPoint()))
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await call.read()
                return e.value.code(), e.value.details()

    code, details = run(scenario())
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "must be `open`" in details


def test_limits_sessions_and_context(tiny_gguf_a, vocab_a):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a), max_sessions=2, max_context=40) as (
            _,
            client,
        ):
            a = await client.open_session(PROMPT, vocab_a)
            b = await client.open_session(PROMPT, vocab_a)
            await expect_status(
                client.open_session(PROMPT, vocab_a), "RESOURCE_EXHAUSTED", "full (2 sessions)"
            )
            await b.close()
            c = await client.open_session(PROMPT, vocab_a)  # room again after a close
            await expect_status(
                a.append(edge_tokens(len(PROMPT), list(range(30)))),
                "RESOURCE_EXHAUSTED",
                "context limit is 40",
            )
            await expect_status(
                client.open_session(list(range(50)), vocab_a), "RESOURCE_EXHAUSTED", "context limit"
            )
            # Generation stops at the context limit instead of failing.
            toks = [t async for t in c.handoff(100)]
            done = c.last_handoff.done
            await c.close()
            return len(toks), done

    n, done = run(scenario())
    assert done.reason == pb.HandoffDone.REASON_CONTEXT_FULL and n == 40 - len(PROMPT)


def test_oversize_message_is_resource_exhausted(tiny_gguf_a, vocab_a):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a), max_message_bytes=4096) as (
            _,
            client,
        ):
            s = await client.open_session(PROMPT, vocab_a)
            big = edge_tokens(len(PROMPT), [5] * 200, [(np.arange(20), -np.arange(20.0)) for _ in range(200)])
            await expect_status(s.append(big), "RESOURCE_EXHAUSTED", "")
            return await healthy(client, vocab_a, rounds=1)

    assert len(run(scenario())) == 10


def test_a_vanished_client_frees_its_session(tiny_gguf_a, vocab_a, async_wait_until):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, client):
            s = await client.open_session(PROMPT, vocab_a)
            await s.append(edge_tokens(len(PROMPT), CONT[:5]))
            assert server.service.session_count == 1
            s.abort()  # like a process that died: no close
            await async_wait_until(lambda: server.service.session_count == 0, what="the session to be freed")
            closed = {
                reason: server.metrics.registry.get_sample_value(
                    "handoff_cloud_sessions_closed_total", {"reason": reason}
                )
                for reason in ("cancelled", "half-closed", "error", "closed", "expired")
            }
            return closed, await healthy(client, vocab_a, rounds=1)

    closed, ok = run(scenario())
    assert closed["cancelled"] == 1, closed  # the session ended without a Close, from the client's side
    assert len(ok) == 10


def test_idle_sessions_expire(tiny_gguf_a, vocab_a, async_wait_until):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a), session_idle_timeout_s=0.3) as (
            server,
            client,
        ):
            s = await client.open_session(PROMPT, vocab_a)
            # Idle from here: the reaper ends the session, the server frees it and the stream says so.
            await async_wait_until(
                lambda: server.service.session_count == 0 and s.failed is not None,
                what="the idle session to expire",
            )
            await expect_status(s.append(edge_tokens(len(PROMPT), [5])), "DEADLINE_EXCEEDED", "idle")

    run(scenario())


def test_client_deadline_is_honoured(tiny_gguf_a, vocab_a, async_wait_until):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, _):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                from handoff.shared.wire import pb_grpc

                call = pb_grpc.VerifierStub(ch).Session(timeout=0.5)
                await call.write(
                    pb.EdgeMessage(
                        request_id=1,
                        open=pb.OpenSession(
                            prompt_token_ids=PROMPT, vocab=fingerprint_to_proto(vocab_a.fingerprint)
                        ),
                    )
                )
                await call.read()
                code = await call.code()  # the call ends when its 0.5 s deadline passes, idle since the open
            await async_wait_until(lambda: server.service.session_count == 0, what="the session to be freed")
            return code

    assert run(scenario()) == grpc.StatusCode.DEADLINE_EXCEEDED


def test_bearer_token_is_required(tiny_gguf_a, vocab_a):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a), auth_token="s3cret") as (
            server,
            client,
        ):
            info = await client.info()  # the harness's client sends the token
            s = await client.open_session(PROMPT, vocab_a)
            await s.close()
            anonymous = VerifierClient(GrpcTransport(f"127.0.0.1:{server.port}"))
            wrong = VerifierClient(GrpcTransport(f"127.0.0.1:{server.port}", auth_token="guess"))
            try:
                await expect_status(anonymous.info(), "UNAUTHENTICATED", "bearer token")
                await expect_status(wrong.open_session(PROMPT, vocab_a), "UNAUTHENTICATED", "bearer token")
                # Health checks stay open for load balancers.
                from grpc_health.v1 import health_pb2, health_pb2_grpc

                health = health_pb2_grpc.HealthStub(anonymous.transport.channel)
                status = (await health.Check(health_pb2.HealthCheckRequest())).status
            finally:
                await anonymous.close()
                await wrong.close()
            return info.model_name, status

    name, status = run(scenario())
    assert name and status == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(tiny_gguf_a, vocab_a, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a), tls_cert=cert, tls_key=key) as (
            server,
            _,
        ):
            secure = VerifierClient(
                GrpcTransport(f"localhost:{server.port}", root_certificates=cert.read_bytes())
            )
            plain = VerifierClient(GrpcTransport(f"127.0.0.1:{server.port}", timeout_s=2))
            try:
                s = await secure.open_session(PROMPT, vocab_a)
                scores = await score_all(s, len(PROMPT), CONT[:4], [4])
                await s.close()
                await expect_status(plain.info(), "UNAVAILABLE", "")
            finally:
                await secure.close()
                await plain.close()
            return len(scores)

    assert run(scenario()) == 4


def test_client_names_the_differing_ids(tiny_gguf_a, vocab_a):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
            await client.check_vocabulary(vocab_a)
            with pytest.raises(
                VocabularyMismatch, match=r"first differing ids: 500 \(local '<not-the-same>'\)"
            ):
                await client.check_vocabulary(_mismatched(vocab_a))
            shorter = Vocabulary(vocab_a.tokens[:700])
            await client.check_vocabulary(shorter)  # a prefix of the cloud's vocabulary is compatible

    run(scenario())


def test_a_full_kv_pool_is_resource_exhausted(tiny_gguf_a, vocab_a):
    """llama.cpp's shared KV pool (kv_cache_tokens) running out fails that request, not the service.

    The pool is the fast mode's (deterministic mode gives every session its own stream up front).
    """

    async def scenario():
        factory = llama_backend_factory(
            tiny_gguf_a, max_sequences=4, max_context=256, kv_cache_tokens=256, deterministic=False
        )
        async with running_server(factory, max_context=256) as (_, client):
            a = await client.open_session(PROMPT, vocab_a)
            await score_all(a, len(PROMPT), list(range(200)), [100, 100])  # 210 of the 256 cells
            b = await client.open_session(PROMPT, vocab_a)
            await expect_status(
                score_all(b, len(PROMPT), list(range(100)), [100]), "RESOURCE_EXHAUSTED", "cache is full"
            )
            await a.close()
            return await healthy(client, vocab_a, rounds=1)  # cells are free again

    assert len(run(scenario())) == 10


def test_raw_forward_advances_the_cache_like_forward(tiny_gguf_a):
    from handoff.cloud.backend import ForwardItem

    backend = llama_backend_factory(tiny_gguf_a)()
    try:
        a, b = backend.new_sequence(), backend.new_sequence()
        backend.raw_forward([ForwardItem(a, PROMPT, 0, 1)])
        backend.forward([ForwardItem(b, PROMPT, 0, 1)])
        assert backend.sequence_length(a) == backend.sequence_length(b) == len(PROMPT)
        out_a, out_b = backend.forward([ForwardItem(a, CONT[:3], 3, 5), ForwardItem(b, CONT[:3], 3, 5)])
        np.testing.assert_array_equal(out_a.topk_ids, out_b.topk_ids)
    finally:
        backend.close()


def test_verifier_errors_survive_pickling_with_their_code():
    """Errors cross process boundaries whole (Ray Serve pickles a replica's exception to its proxy)."""
    import pickle

    e = pickle.loads(pickle.dumps(VerifierError("RESOURCE_EXHAUSTED", "full")))
    assert isinstance(e, VerifierError) and e.code == "RESOURCE_EXHAUSTED" and str(e) == "full"
