"""The gRPC layer's edge cases: bytes that are not a valid message get INVALID_ARGUMENT and one log
line while other sessions go on; a stream's end is told apart as a half-close or a vanished client."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from handoff.edge.cloud_harness import (
    edge_tokens,
    llama_backend_factory,
    run,
    running_server,
    score_all,
    vocabulary_of,
)
from handoff.shared.wire import fingerprint_to_proto, pb

PROMPT = [1001, 872, 198, 9, 10, 11, 1002, 198, 1001, 77, 198]  # a chat-shaped prompt in the tiny vocab
CONT = list(range(300, 330))
GARBAGE = b"\xff\xff\xff\xff\x0f"  # a field tag with an invalid wire type: no protobuf message parses it


def _identity(data: bytes) -> bytes:
    return data


def raw_session(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamCall:
    """The Session method with bytes in and out, so that anything can be written to the stream."""
    return channel.stream_stream(
        "/handoff.v1.Verifier/Session", request_serializer=_identity, response_deserializer=_identity
    )()


async def status_of(call: grpc.aio.StreamStreamCall) -> tuple[grpc.StatusCode, str]:
    """Read the call to its end; its status code and details."""
    with pytest.raises(grpc.aio.AioRpcError):
        while True:
            if await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF:
                break
    return await call.code(), await call.details()


async def checked_views(client, vocab, rounds: int) -> list[list[int]]:
    """A well-behaved session: P's top-k ids over `rounds` check points of 10 tokens."""
    s = await client.open_session(PROMPT, vocab, top_k=5)
    out = []
    for r in range(rounds):
        scores = await score_all(s, len(PROMPT) + 10 * r, CONT[10 * r : 10 * r + 10], [10])
        out.extend(list(x.topk.ids) for x in scores)
        await asyncio.sleep(0.01)  # part of the scenario: lets the bad streams' messages interleave
    await s.close()
    return out


def _open_bytes(vocab) -> bytes:
    msg = pb.EdgeMessage(
        request_id=1,
        open=pb.OpenSession(prompt_token_ids=PROMPT, vocab=fingerprint_to_proto(vocab.fingerprint)),
    )
    return msg.SerializeToString()


def test_malformed_bytes_are_invalid_argument_without_a_traceback(tiny_gguf_a, caplog, async_wait_until):
    vocab = vocabulary_of(tiny_gguf_a)
    caplog.set_level(logging.INFO)

    async def bad_streams(port: int) -> list[tuple[grpc.StatusCode, str]]:
        out = []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            # Garbage as the very first message.
            call = raw_session(ch)
            await call.write(GARBAGE)
            out.append(await status_of(call))
            # Garbage once the session is open and has tokens in its cache.
            call = raw_session(ch)
            await call.write(_open_bytes(vocab))
            opened = pb.CloudMessage.FromString(await asyncio.wait_for(call.read(), 10))
            assert opened.WhichOneof("body") == "opened"
            append = pb.EdgeMessage(
                request_id=2, append=pb.AppendTokens(tokens=edge_tokens(len(PROMPT), [5, 6]))
            )
            await call.write(append.SerializeToString())
            await call.write(GARBAGE)
            out.append(await status_of(call))
            # A unary call with bytes that are not a GetInfoRequest.
            get_info = ch.unary_unary(
                "/handoff.v1.Verifier/GetInfo", request_serializer=_identity, response_deserializer=_identity
            )
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await asyncio.wait_for(get_info(GARBAGE), 10)
            out.append((e.value.code(), e.value.details()))
        return out

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, client):
            alone = await checked_views(client, vocab, rounds=3)
            together, statuses = await asyncio.gather(
                checked_views(client, vocab, rounds=3), bad_streams(server.port)
            )
            after = await checked_views(client, vocab, rounds=1)
            await async_wait_until(lambda: server.service.session_count == 0, what="the sessions to be freed")
            errors = server.metrics.registry.get_sample_value(
                "handoff_cloud_sessions_closed_total", {"reason": "error"}
            )
            return alone, together, after, statuses, errors

    alone, together, after, statuses, errors = run(scenario())
    assert together == alone and after == alone[:10]
    first, mid_session, unary = statuses
    assert first[0] == grpc.StatusCode.INVALID_ARGUMENT, first
    assert "message 1 on the stream" in first[1] and "not a valid handoff.v1.EdgeMessage" in first[1]
    assert mid_session[0] == grpc.StatusCode.INVALID_ARGUMENT and "message 3 on the stream" in mid_session[1]
    assert (
        unary[0] == grpc.StatusCode.INVALID_ARGUMENT and "not a valid handoff.v1.GetInfoRequest" in unary[1]
    )
    assert errors == 1  # the open session was freed as the client's error, not as a vanished client
    # One log line per bad message, and no traceback anywhere.
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    refused = [r.getMessage() for r in caplog.records if "not a valid" in r.getMessage()]
    assert len(refused) == 3 and all("\n" not in m for m in refused), refused


def test_half_close_and_vanished_clients_are_told_apart(tiny_gguf_a, async_wait_until):
    """grpc.aio ends a cancelled call's request stream like a half-close; the server waits for the
    cancellation that follows, so that a vanished client is counted as one (it was a race)."""
    vocab = vocabulary_of(tiny_gguf_a)

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, client):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
                call = raw_session(ch)
                await call.write(_open_bytes(vocab))
                await asyncio.wait_for(call.read(), 10)
                await call.done_writing()  # half-close without a Close message
                assert await asyncio.wait_for(call.read(), 10) is grpc.aio.EOF
                code = await call.code()
            for _ in range(20):
                s = await client.open_session(PROMPT, vocab)
                await s.append(edge_tokens(len(PROMPT), CONT[:3]))
                s.abort()  # like a process that died
                await async_wait_until(lambda: server.service.session_count == 0, what="the session's end")
            closed = {
                reason: server.metrics.registry.get_sample_value(
                    "handoff_cloud_sessions_closed_total", {"reason": reason}
                )
                for reason in ("half-closed", "cancelled")
            }
            return code, closed

    code, closed = run(scenario())
    assert code == grpc.StatusCode.OK
    assert closed == {"half-closed": 1, "cancelled": 20}
