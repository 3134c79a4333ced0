"""The loopback network delay injector (GrpcTransport(delay=NetworkDelay)) against a real server."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from handoff.cloud.grpc_server import CloudServer
from handoff.cloud.settings import CloudSettings
from handoff.edge.cloud_harness import edge_tokens, llama_backend_factory, running_server, vocabulary_of
from handoff.edge.controller import HybridGenerator
from handoff.edge.policy import PolicyConfig
from handoff.edge.runner import EdgeRunner
from handoff.edge.settings import EdgeSettings
from handoff.edge.verifier_client import (
    GrpcTransport,
    NetworkDelay,
    RemoteSession,
    VerifierClient,
    _GrpcStream,
)
from handoff.shared.errors import VerifierError
from handoff.shared.llama_cpp_model import LlamaCppModel
from handoff.shared.vocab import Vocabulary

EPS = 2e-3  # timer granularity: a sleep may end this much before its deadline on the clock we read


@pytest.fixture(scope="module")
def prompt(tiny_gguf_a) -> list[int]:
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        return m.tokenize(m.chat_prompt([{"role": "user", "content": "Sort a list of numbers in Python."}]))


@pytest.fixture(scope="module")
def vocab(tiny_gguf_a) -> Vocabulary:
    return vocabulary_of(tiny_gguf_a)


# What untidy tasks look like to asyncio; anything else a loop reports (gRPC's own noise) is only logged.
_LEAKS = ("Task was destroyed but it is pending", "exception was never retrieved")


def run_clean(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a scenario in a fresh loop; fail if it leaves delay tasks pending or errors nobody retrieved."""
    problems: list[str] = []

    def handler(loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        message = str(ctx.get("message"))
        if any(leak in message for leak in _LEAKS):
            problems.append(f"{message}: {ctx.get('task') or ctx.get('future') or ctx.get('exception')!r}")
        else:
            loop.default_exception_handler(ctx)

    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        loop.set_exception_handler(handler)
        result = runner.run(coro)
        # Ours only: the gRPC server may still be winding down its handlers' tasks after stop().
        pending = [t.get_name() for t in asyncio.all_tasks(loop) if t.get_name().startswith("delay-")]
    gc.collect()
    assert not pending, f"tasks left pending: {pending}"
    assert not problems, problems
    return result


def _client(port: int, delay: NetworkDelay | None) -> VerifierClient:
    return VerifierClient(GrpcTransport(f"127.0.0.1:{port}", delay=delay))


def _now() -> float:
    return asyncio.get_running_loop().time()


def _views(n: int, k: int = 20, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """n top-k views with arbitrary distinct ids (what the edge would send)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.choice(1000, size=k, replace=False)
        lp = np.sort(rng.uniform(-8.0, -0.1, size=k))[::-1].astype(np.float32)
        out.append((ids, lp))
    return out


def test_get_info_takes_the_round_trip(tiny_gguf_a):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, plain):
            await plain.info()  # connect first: the channel's setup is not what is measured
            t0 = _now()
            await plain.info()
            direct = _now() - t0
            delayed = _client(server.port, NetworkDelay(rtt_s=0.2))
            try:
                await delayed.info()
                t0 = _now()
                info = await delayed.info()
                slow = _now() - t0
            finally:
                await delayed.close()
            return direct, slow, info

    direct, slow, info = run_clean(scenario())
    assert info.model_id
    assert 0.2 - EPS <= slow < 0.2 + 0.5, slow
    assert direct < 0.1, direct


def test_session_round_trips_are_delayed_but_sends_do_not_block(tiny_gguf_a, prompt, vocab):
    rtt = 0.1
    ids = np.random.default_rng(1).integers(0, 1000, size=12).tolist()

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, _):
            client = _client(server.port, NetworkDelay(rtt_s=rtt))
            try:
                t0 = _now()
                session = await client.open_session(prompt, vocab)
                times = {"open": _now() - t0}
                pos = len(prompt)
                t0 = _now()
                length = await session.append(edge_tokens(pos, ids[:4]))
                times["append"] = _now() - t0
                # Two appends without waiting, then a check point over both right behind them.
                nowait = []
                for start in (4, 8):
                    t0 = _now()
                    await session.append_nowait(edge_tokens(pos + start, ids[start : start + 4]))
                    nowait.append(_now() - t0)
                t0 = _now()
                result = await session.check(pos, pos + len(ids) - 1)
                times["check"] = _now() - t0
                closed = await session.close()
                return times, nowait, length, result, closed
            finally:
                await client.close()

    times, nowait, length, result, closed = run_clean(scenario())
    assert all(t >= rtt - EPS for t in times.values()), times
    assert max(nowait) < 0.02, nowait
    assert length == len(prompt) + 4
    # In order: the check point saw both appends (it would be refused past the session's end).
    assert [s.position for s in result.scores] == list(range(len(prompt), len(prompt) + len(ids)))
    assert closed is not None


def test_bandwidth_serialises_transmissions(tiny_gguf_a, prompt, vocab):
    bw = 1000.0  # 8 kbit/s

    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, _):
            client = _client(server.port, NetworkDelay(uplink_bytes_per_s=bw))
            try:
                session = await client.open_session(prompt, vocab)
                pos = len(prompt)
                first = edge_tokens(pos, list(range(100, 116)), _views(16, seed=2))
                second = edge_tokens(pos + 16, list(range(200, 216)), _views(16, seed=3))
                sizes = []
                t0 = _now()
                before = session.bytes_sent
                await session.append(first)
                one = _now() - t0
                sizes.append(session.bytes_sent - before)
                t0 = _now()
                before = session.bytes_sent
                await session.append_nowait(second[:8])
                await session.append(second[8:])
                two = _now() - t0
                sizes.append(session.bytes_sent - before)
                await session.close()
                return one, two, sizes
            finally:
                await client.close()

    one, two, sizes = run_clean(scenario())
    assert 1500 < sizes[0] < 3000  # a ~2 KB AppendTokens
    assert sizes[0] / bw - EPS <= one < sizes[0] / bw + 1.5, (one, sizes)
    # The second append starts transmitting only once the first has gone out.
    assert sizes[1] / bw - EPS <= two < sizes[1] / bw + 1.5, (two, sizes)


def test_generation_is_the_same_only_slower(tiny_gguf_a, tiny_gguf_b, prompt):
    rtt = 0.05
    # No lookahead: every check point's round trip is on the critical path.
    policy = PolicyConfig(
        kind="rollback", check_interval=4, threshold=0.5, handback_tokens=4, lookahead_windows=0
    )
    vocab = vocabulary_of(tiny_gguf_b)

    async def scenario():
        runner = EdgeRunner(tiny_gguf_b, k=policy.top_k, n_ctx=512, n_threads=1)
        try:
            async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, plain):
                results = []
                for client in (plain, _client(server.port, NetworkDelay(rtt_s=rtt))):
                    gen = HybridGenerator(runner, client, vocab, policy, mode="hybrid")
                    results.append(await gen.generate(prompt, 12))
                    if client is not plain:
                        await client.close()
                return results
        finally:
            runner.close()

    plain, delayed = run_clean(scenario())
    assert delayed.tokens == plain.tokens and len(plain.tokens) == 12
    assert [r.source for r in delayed.records] == [r.source for r in plain.records]
    assert delayed.check_points == plain.check_points >= 1
    assert delayed.cloud_failures == 0
    assert delayed.seconds - plain.seconds >= delayed.check_points * rtt, (plain.seconds, delayed.seconds)


def test_a_dying_server_surfaces_an_error_without_hanging(tiny_gguf_a, prompt, vocab):
    async def scenario():
        server = CloudServer(CloudSettings(host="127.0.0.1", port=0), llama_backend_factory(tiny_gguf_a))
        await server.start()
        client = _client(server.port, NetworkDelay(rtt_s=0.2))
        session: RemoteSession | None = None
        running = True
        try:
            session = await client.open_session(prompt, vocab)
            pos = len(prompt)
            for start in (0, 4, 8):  # still on their way when the server goes
                await session.append_nowait(edge_tokens(pos + start, [1, 2, 3, 4]))
            running = False
            await server.stop(grace=0.0)
            with pytest.raises(VerifierError) as first:
                await asyncio.wait_for(session.check(pos, pos + 11), timeout=5)
            with pytest.raises(VerifierError) as second:
                await asyncio.wait_for(session.append_nowait(edge_tokens(pos + 12, [5])), timeout=5)
            return first.value.code, second.value.code
        finally:
            if session is not None:
                await asyncio.wait_for(session.close(), timeout=5)
            await asyncio.wait_for(client.close(), timeout=5)
            if running:
                await server.stop(grace=0.0)

    codes = run_clean(scenario())
    assert set(codes) <= {"UNAVAILABLE", "CANCELLED"}, codes


def test_cancel_stops_the_background_tasks(tiny_gguf_a, prompt, vocab, async_wait_until):
    async def scenario():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (server, _):
            client = _client(server.port, NetworkDelay(rtt_s=0.2))
            try:
                session = await client.open_session(prompt, vocab)
                await session.append_nowait(edge_tokens(len(prompt), [1, 2, 3]))
                check = await session.send_check(len(prompt), len(prompt) + 2)
                session.abort()
                with pytest.raises(VerifierError):
                    await asyncio.wait_for(check, timeout=1)

                def delay_tasks() -> list[str]:
                    return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("delay-")]

                # The cancelled tasks wind down without anyone awaiting them.
                await async_wait_until(lambda: not delay_tasks(), timeout=5, what="the delay tasks to end")
            finally:
                await client.close()

    run_clean(scenario())


def test_without_a_delay_the_stream_is_not_wrapped():
    async def scenario():
        transport = GrpcTransport("127.0.0.1:1")  # nothing listens: no call is made
        stream = transport.open_stream()
        try:
            return type(stream)
        finally:
            stream.cancel()
            await transport.close()

    assert run_clean(scenario()) is _GrpcStream


def test_edge_settings_network_delay():
    assert EdgeSettings().network_delay() is None
    delay = EdgeSettings(inject_rtt_ms=20).network_delay()
    assert delay is not None and delay.rtt_s == pytest.approx(0.02) and delay.uplink_bytes_per_s is None
    bw = EdgeSettings(inject_uplink_kbps=8, inject_downlink_kbps=80).network_delay()
    assert bw is not None and bw.rtt_s == 0
    assert (bw.uplink_bytes_per_s, bw.downlink_bytes_per_s) == (1000.0, 10000.0)
    for bad in ({"inject_rtt_ms": -1}, {"inject_uplink_kbps": 0}, {"inject_downlink_kbps": -5}):
        with pytest.raises(ValidationError):
            EdgeSettings(**bad)
    for bad_delay in ({"rtt_s": -0.1}, {"rtt_s": float("nan")}, {"uplink_bytes_per_s": 0}):
        with pytest.raises(ValueError):
            NetworkDelay(**bad_delay)
