"""Helpers to run a real verifier server on port 0 inside a test, and talk to it over real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import numpy as np

from handoff.cloud.backend import Backend
from handoff.cloud.grpc_server import CloudServer
from handoff.cloud.settings import CloudSettings
from handoff.edge.verifier_client import GrpcTransport, RemoteSession, VerifierClient
from handoff.shared.model_info import load_model_info
from handoff.shared.models import ModelRef
from handoff.shared.vocab import Vocabulary
from handoff.shared.wire import pb, topk_to_proto


def llama_backend_factory(path: Path, **kw) -> Callable[[], Backend]:
    def load() -> Backend:
        from handoff.cloud.backends.llama_backend import LlamaCppBackend

        return LlamaCppBackend(ModelRef("gguf", path, path.name), threads=1, **kw)

    return load


def vocabulary_of(path: Path) -> Vocabulary:
    return load_model_info(ModelRef("gguf", path, path.name))[1]


@contextlib.asynccontextmanager
async def running_server(
    load: Callable[[], Backend], **settings_kw
) -> AsyncIterator[tuple[CloudServer, VerifierClient]]:
    """A started CloudServer on 127.0.0.1:<free port> and a gRPC client connected to it."""
    settings = CloudSettings(host="127.0.0.1", port=0, grace_s=1.0, **settings_kw)
    server = CloudServer(settings, load)
    await server.start()
    client = VerifierClient(
        GrpcTransport(f"127.0.0.1:{server.port}", auth_token=settings_kw.get("auth_token"))
    )
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop(grace=0.5)


def edge_tokens(
    start: int, ids: list[int], topk: list[tuple[np.ndarray, np.ndarray]] | None = None
) -> list[pb.EdgeToken]:
    """EdgeTokens at contiguous positions from `start`, with Q's top-k views when given."""
    out = []
    for j, t in enumerate(ids):
        tok = pb.EdgeToken(position=start + j, token_id=int(t))
        if topk is not None:
            tok.topk.CopyFrom(topk_to_proto(*topk[j]))
            tok.has_distribution = True
        out.append(tok)
    return out


async def score_all(
    session: RemoteSession, start: int, ids: list[int], chunks: list[int], topk=None
) -> list[pb.PositionScore]:
    """Append `ids` from `start` in chunks, one check point per chunk; all the scores in order."""
    scores: list[pb.PositionScore] = []
    pos = start
    for n in chunks:
        part = ids[pos - start : pos - start + n]
        views = topk[pos - start : pos - start + n] if topk is not None else None
        await session.append(edge_tokens(pos, part, views))
        result = await session.check(pos, pos + n - 1)
        scores.extend(result.scores)
        pos += n
    return scores


def run(coro):
    """Run a test scenario in a fresh event loop."""
    return asyncio.run(coro)


def generate_with_server(cloud_path: Path, edge_path: Path, policy, max_tokens: int, *, mode: str = "hybrid",
                         prompt: str = "Sort a list.", constraint=None, sampling=None):  # fmt: skip
    """One generation (greedy by default): Q (edge_path) under `policy`, P (cloud_path) in a server on port 0.

    Args:
        policy: the PolicyConfig; prompt: the user message (the edge model's chat template applied).
        constraint: the completion's Constraint; sampling: SamplingSettings (default greedy).

    Returns:
        The GenerationResult.
    """
    from handoff.edge.controller import HybridGenerator
    from handoff.edge.runner import EdgeRunner
    from handoff.shared.sampling import SamplingSettings

    async def go():
        runner = EdgeRunner(edge_path, k=policy.top_k, n_ctx=1024, n_threads=1)
        try:
            ids = runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": prompt}]))
            async with running_server(llama_backend_factory(cloud_path)) as (_, client):
                gen = HybridGenerator(runner, client, vocabulary_of(edge_path), policy, mode=mode)
                return await gen.generate(
                    ids, max_tokens, sampling=sampling or SamplingSettings(), constraint=constraint
                )
        finally:
            runner.close()

    return run(go())


def start_server(
    model, *extra: str, env: dict[str, str] | None = None, port: int = 0
) -> tuple[subprocess.Popen, int]:
    """`handoff serve-cloud` in its own process on 127.0.0.1:port (0: a free one); returns (process, port)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "handoff", "--log-level", "INFO", "--log-format", "json", "serve-cloud",
         "--model", str(model), "--port", str(port), "--threads", "1", "--max-sessions", "4", "--max-context", "512",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "300", **(env or {})},
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line):
            return proc, int(m.group(1))
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"server did not start: {proc.stderr.read()}")


def wait_for_line(
    proc: subprocess.Popen, pattern: str, timeout: float, *, echo: bool = False
) -> re.Match | None:
    """Read the process's stdout until a line matches `pattern` (None: it ended or `timeout` s passed).

    Args:
        proc: a process started with stdout=PIPE, text=True.
        pattern: a regular expression searched in each line.
        timeout: seconds to wait at most.
        echo: print each line read (a script showing a server's startup).
    """
    found: list[re.Match] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if echo:
                print(line, end="", flush=True)
            if m := re.search(pattern, line):
                found.append(m)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else None


class ServerThread:
    """`edge.openai_server.serve` on a free port, in a thread with its own event loop."""

    def __init__(self, edge_model: Path, cloud_model: Path, edge: dict | None = None, **serve_kwargs) -> None:
        """Describe it; `with` starts it. edge: EdgeSettings fields (default: tau 0.02, N 6, M 3)."""
        from handoff.edge.openai_server import ServeSettings
        from handoff.edge.settings import EdgeSettings
        from handoff.shared.settings import HandoffSettings

        self.settings = HandoffSettings(threads=1)
        # tau = 0.02 nats on a pair whose mean KL is ~0.02: both models produce tokens.
        self.edge = EdgeSettings(
            **({"threshold": 0.02, "check_interval": 6, "handback_tokens": 3} | (edge or {}))
        )
        self.serve = ServeSettings(host="127.0.0.1", port=0, **serve_kwargs)
        self.models = (str(edge_model), str(cloud_model))
        self.server = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="serve-edge", daemon=True)

    def _run(self) -> None:
        from handoff.edge.openai_server import serve

        def ready(server) -> None:
            self.server = server
            self._ready.set()

        try:
            asyncio.run(
                serve(self.settings, self.edge, self.serve, edge_model=self.models[0],
                      cloud_model=self.models[1], on_ready=ready)
            )  # fmt: skip
        except BaseException as e:
            self.error = e
        finally:
            self._ready.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(180)
        if self.server is None:
            raise RuntimeError(f"serve-edge did not start: {self.error!r}")
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()
        self._thread.join(60)
        assert not self._thread.is_alive(), "serve-edge did not shut down"
        assert self.error is None, self.error

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def api(self):
        return self.server.api

    def url(self, path: str) -> str:
        return self.base_url.removesuffix("/v1") + path
