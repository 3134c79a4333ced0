"""`handoff serve-cloud --ray`: replicas on Ray Serve behind its gRPC proxy, in real processes on 127.0.0.1.

Two replicas of the tiny model: the edge gets the same tokens as from one server; sessions spread over
the replicas and a routing key sticks to one; a broken session's edge comes back to its replica and
skips the re-prefill; a replica killed mid-generation costs no text (the edge resyncs to the other);
under load the deployment autoscales from one replica to two. Nothing listens or talks outside
127.0.0.0/8.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import signal
import socket
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from handoff.edge.cloud_harness import run, score_all, start_server, vocabulary_of
from handoff.edge.controller import HybridGenerator
from handoff.edge.link import LinkConfig
from handoff.edge.policy import PolicyConfig
from handoff.edge.runner import EdgeRunner
from handoff.edge.verifier_client import GrpcTransport, VerifierClient
from handoff.shared.errors import VerifierError
from handoff.shared.llama_cpp_model import LlamaCppModel
from handoff.shared.models import ensure_model
from handoff.shared.settings import DEFAULT_CLOUD_MODEL

pytest.importorskip("ray", reason="Ray Serve is the `ray` extra (make test installs it)")
psutil = pytest.importorskip("psutil", reason="the `ray` extra installs it")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

FAST_RETRY = LinkConfig(
    check_timeout_s=10.0, token_timeout_s=10.0, open_timeout_s=20.0, retry_initial_s=0.1, retry_max_s=0.5
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc) -> None:
    """SIGTERM: the command drains and shuts Ray down; its processes must all be gone after."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    except Exception:
        proc.kill()
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=30)
    for p in alive:
        p.kill()


def ray_cloud(model, *flags: str, env: dict[str, str] | None = None):
    return start_server(model, "--ray", "--cpus-per-replica", "0.5", *flags, port=free_port(), env=env)


METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def two_replicas(tiny_gguf_a):
    proc, port = ray_cloud(tiny_gguf_a, "--replicas", "2", "--metrics-port", str(METRICS_PORT))
    yield proc, port
    stop(proc)


@pytest.fixture(scope="module")
def prompt(tiny_gguf_a):
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        return m.tokenize(m.chat_prompt([{"role": "user", "content": "Sort a list of numbers in Python."}]))


async def server_of(port: int, vocab, key: str, prompt=(1, 2, 3, 4), token: str | None = None) -> str:
    """The server_id of the replica a session with routing key `key` lands on (opened, then closed)."""
    client = VerifierClient(GrpcTransport(f"127.0.0.1:{port}", auth_token=token))
    try:
        session = await client.open_session(list(prompt), vocab, top_k=4, routing_key=key)
        await session.close()
        return session.server_id
    finally:
        await client.close()


async def generate(edge_path, port, prompt, max_tokens, **kw):
    runner = EdgeRunner(edge_path, k=8, n_ctx=512, n_threads=1)
    client = VerifierClient(GrpcTransport(f"127.0.0.1:{port}"))
    try:
        gen = HybridGenerator(
            runner, client, vocabulary_of(edge_path), PolicyConfig(check_interval=4), link=FAST_RETRY
        )
        return await gen.generate(prompt, max_tokens, **kw)
    finally:
        await client.close()
        runner.close()


def test_same_tokens_as_a_single_server(two_replicas, tiny_gguf_a, tiny_gguf_b, prompt):
    """Greedy, Q = tiny B, P = tiny A (they disagree: checks, corrections, handoffs): Ray = one server."""
    _, port = two_replicas
    single, single_port = start_server(tiny_gguf_a)
    try:
        alone = run(generate(tiny_gguf_b, single_port, prompt, 48))
    finally:
        stop(single)
    on_ray = run(generate(tiny_gguf_b, port, prompt, 48))
    assert on_ray.tokens == alone.tokens
    assert [r.source for r in on_ray.records] == [r.source for r in alone.records]
    assert on_ray.handoffs > 0 and on_ray.counts()["cloud"] > 0
    assert on_ray.servers and on_ray.servers[0].startswith("ray-replica-")


def test_sessions_spread_over_replicas_and_a_key_sticks_to_one(two_replicas, tiny_gguf_a):
    _, port = two_replicas
    vocab = vocabulary_of(tiny_gguf_a)

    async def scenario():
        spread = {await server_of(port, vocab, uuid.uuid4().hex) for _ in range(20)}
        key = uuid.uuid4().hex
        stuck = {await server_of(port, vocab, key) for _ in range(5)}
        return spread, stuck

    spread, stuck = run(scenario())
    assert len(spread) == 2  # 20 random keys on a ring of two: all on one has probability 2e-6
    assert len(stuck) == 1


def test_each_replica_serves_its_metrics(two_replicas):
    """--metrics-port P: replica i (its rank on the node) serves Prometheus metrics on P + i."""
    import urllib.request

    texts = [
        urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT + i}/metrics", timeout=10).read().decode()
        for i in range(2)
    ]
    assert all("handoff_cloud_sessions_opened_total" in t for t in texts)


def test_a_full_replica_passes_new_sessions_to_the_next_one(two_replicas, tiny_gguf_a):
    """Five sessions with one key on replicas of --max-sessions 4: the fifth goes to the other replica."""
    _, port = two_replicas
    vocab = vocabulary_of(tiny_gguf_a)
    key = uuid.uuid4().hex

    async def scenario():
        client = VerifierClient(GrpcTransport(f"127.0.0.1:{port}"))
        try:
            held = [await client.open_session([7] * 8, vocab, top_k=4, routing_key=key) for _ in range(5)]
            servers = [s.server_id for s in held]
            for s in held:
                await s.close()
            return servers
        finally:
            await client.close()

    servers = run(scenario())
    assert len(set(servers[:4])) == 1 and servers[4] != servers[0]


def test_broken_session_comes_back_to_its_replica_and_keeps_its_cache(two_replicas, tiny_gguf_a):
    _, port = two_replicas
    vocab = vocabulary_of(tiny_gguf_a)
    prompt, tokens, key = list(range(10, 30)), list(range(100, 132)), uuid.uuid4().hex

    async def scenario():
        client = VerifierClient(GrpcTransport(f"127.0.0.1:{port}"))
        try:
            first = await client.open_session(prompt, vocab, top_k=8, routing_key=key)
            await score_all(first, len(prompt), tokens, [8] * 4)
            first.abort()  # the connection breaks: no Close
            await asyncio.sleep(0.5)
            again = await client.open_session(prompt + tokens, vocab, top_k=8, routing_key=key)
            await again.close()
            return first, again
        finally:
            await client.close()

    first, again = run(scenario())
    assert again.server_id == first.server_id
    assert again.reused_tokens >= len(prompt) + len(tokens) - 8  # the last window may not be fed yet


def test_killed_replica_edge_finishes_and_resyncs_to_the_other(
    two_replicas, tiny_gguf_a, prompt, async_wait_until
):
    """SIGKILL the replica holding the session mid-generation: no token lost or repeated, later
    windows checked by the other replica (identical models: the text is the model's own greedy one)."""
    _, port = two_replicas
    vocab = vocabulary_of(tiny_gguf_a)
    key = uuid.uuid4().hex
    victim = run(server_of(port, vocab, key))
    state = {"killed": False}

    def probing() -> bool:
        return any(t.get_name() == "cloud-probe" and not t.done() for t in asyncio.all_tasks())

    async def on_token(record):
        n = record.position - len(prompt) + 1
        if n == 24:
            os.kill(int(victim.rsplit("/", 1)[1]), signal.SIGKILL)
            state["killed"] = True
        elif probing():
            await async_wait_until(
                lambda: not probing(), timeout=90, what="the edge's probe to reach the cloud"
            )

    result = run(generate(tiny_gguf_a, port, prompt, 160, on_token=on_token, routing_key=key))
    assert state["killed"]
    with LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=1) as m:
        m.eval(prompt)
        own = []
        for _ in range(len(result.tokens)):
            own.append(int(m.next_logits().argmax()))
            m.eval([own[-1]])
    assert result.tokens == own
    assert [r.position for r in result.records] == list(range(len(prompt), len(prompt) + len(result.records)))
    assert result.cloud_failures >= 1 and result.resyncs >= 1
    assert result.servers[0] == victim and result.servers[-1] != victim
    assert all(r.checked for r in result.records[:20])
    assert all(r.checked for r in result.records[-40:])


def test_nothing_listens_or_talks_outside_loopback(two_replicas):
    proc, _ = two_replicas
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    assert len(tree) > 5  # gcs, raylet, agents, controller, proxy, replicas
    seen = 0
    for p in tree:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            for addr in (c.laddr, c.raddr):
                if addr:
                    seen += 1
                    assert ipaddress.ip_address(addr.ip.removeprefix("::ffff:")).is_loopback, (p.name(), c)
    assert seen > 10


def test_health_and_reflection_through_the_proxy(two_replicas):
    _, port = two_replicas

    async def scenario():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=30
            )
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=30)
            await stream.write(reflection_pb2.ServerReflectionRequest(list_services=""))
            services = await stream.read()
            await stream.done_writing()
            return health.status, {s.name for s in services.list_services_response.service}

    status, services = run(scenario())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert {"handoff.v1.Verifier", "grpc.health.v1.Health"} <= services


def test_malformed_bytes_through_the_proxy_are_invalid_argument(two_replicas, tiny_gguf_a):
    _, port = two_replicas

    def raw(data: bytes) -> bytes:
        return data

    async def scenario():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_stream(
                "/handoff.v1.Verifier/Session", request_serializer=raw, response_deserializer=raw
            )()
            await call.write(b"\xff\xff\xff\xff\x0f")  # no protobuf message parses this
            with pytest.raises(grpc.aio.AioRpcError):
                while await asyncio.wait_for(call.read(), 30) is not grpc.aio.EOF:
                    pass
            return await call.code(), await call.details()

    code, details = run(scenario())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid handoff.v1.EdgeMessage" in details
    # The replicas serve on.
    assert run(server_of(port, vocabulary_of(tiny_gguf_a), uuid.uuid4().hex)).startswith("ray-replica-")


def test_autoscales_up_under_load_and_drains_on_the_way_down_with_a_bearer_token(tiny_gguf_a):
    """1 -> 2 replicas under 5 sessions (target 2 per replica); with 2 sessions left, one on each
    replica, Ray removes one: it takes no new sessions but serves its open one until it closes."""
    token = "secret"
    proc, port = ray_cloud(
        tiny_gguf_a, "--min-replicas", "1", "--max-replicas", "2", "--target-sessions", "2",
        "--upscale-delay-s", "0", "--downscale-delay-s", "1", "--grace-s", "60",
        env={"HANDOFF_CLOUD_AUTH_TOKEN": token},
    )  # fmt: skip
    vocab = vocabulary_of(tiny_gguf_a)

    async def sample(n: int) -> set[str]:
        return {await server_of(port, vocab, uuid.uuid4().hex, token=token) for _ in range(n)}

    async def until(what, timeout: float = 120.0):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not (result := await what()) and loop.time() < deadline:
            await asyncio.sleep(1.0)
        return result

    async def scenario():
        with pytest.raises(VerifierError) as refused:
            await server_of(port, vocab, "no-token")
        assert refused.value.code == "UNAUTHENTICATED"
        out = {"before": await sample(4)}
        client = VerifierClient(GrpcTransport(f"127.0.0.1:{port}", auth_token=token))
        try:
            # 4 sessions fill the one replica (--max-sessions 4); the fifth waits for the second.
            load = [
                await client.open_session([5 + i] * 8, vocab, top_k=4, routing_key=f"load-{i}")
                for i in range(5)
            ]
            out["load"] = [s.server_id for s in load]
            # Keep one session on each replica: 2 sessions at a target of 2 per replica: Ray removes
            # one replica, and new sessions then all land on the other.
            held = [load[0], load[4]]
            for s in load[1:4]:
                await s.close()
            out["down"] = await until(lambda: _one(sample(6)))
            # The removed replica drains: its session still answers check points, then closes cleanly.
            for session in held:
                await score_all(session, 8, [11, 12, 13, 14], [4])
                assert (await session.close()) is not None
            return out
        finally:
            await client.close()

    try:
        out = run(scenario())
    finally:
        stop(proc)
    assert len(out["before"]) == 1  # one replica before the load
    assert len(set(out["load"][:4])) == 1 and out["load"][4] != out["load"][0]  # a second came up under it
    assert out["down"] is not None and len(out["down"]) == 1  # then one was removed: both sessions finished


async def _one(servers) -> set[str] | None:
    found = await servers
    return found if len(found) == 1 else None


@pytest.mark.real_models
def test_default_pair_through_two_replicas_gives_the_single_servers_tokens(run_handoff):
    """`handoff generate --cloud` (greedy, default pair) against `serve-cloud --ray` = against `serve-cloud`."""
    cloud = ensure_model(DEFAULT_CLOUD_MODEL)
    args = ("generate", "--prompt", "Write a Python function that checks whether a number is prime.",
            "--max-tokens", "64", "--json")  # fmt: skip

    def generate_against(proc, port) -> dict:
        try:
            done = run_handoff(*args, "--cloud", f"127.0.0.1:{port}")
        finally:
            stop(proc)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    alone = generate_against(*start_server(cloud))
    on_ray = generate_against(*ray_cloud(cloud, "--replicas", "2"))
    assert on_ray["text"] == alone["text"] and on_ray["tokens"] == alone["tokens"]
    # check_points also counts windows uploaded behind a check point that handed over (then thrown
    # away): how many depends on when answers arrive. The positions P's answers decided do not.
    assert on_ray["by_source"] == alone["by_source"] and on_ray["handoffs"] == alone["handoffs"]
    assert on_ray["accounting"]["checked_positions"] == alone["accounting"]["checked_positions"]
    assert on_ray["servers"][0].startswith("ray-replica-") and not alone["servers"][0].startswith("ray-")
