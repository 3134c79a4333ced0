#!/usr/bin/env python3
"""Verified tokens/s of the cloud verifier vs the raw batched forward pass of the same model.

For each concurrency N, in one run on one device:
  service: N sessions over real gRPC on loopback, each with a P-token prompt in its cache, stream
           R rounds of `append 16 tokens + check point over them`, concurrently;
  raw:     the backend's bare batched forward (`Backend.raw_forward`: the same N caches, N x 16 new
           tokens, logits of every new position, nothing else) for the same R rounds.
Prints tokens/s of both and their ratio. The target (DESIGN.md): ratio >= 0.5 at 64 sessions, and
service throughput growing with concurrency.

    python scripts/bench_cloud.py --model tiny                       # tiny Qwen2 (built here), llama.cpp
    python scripts/bench_cloud.py --model qwen2.5-coder-1.5b-instruct-q4_k_m --backend transformers --device cuda
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # tiny_gguf: the tiny test models

from cloud.backend import Backend, ForwardItem  # noqa: E402
from cloud.grpc_server import CloudServer  # noqa: E402
from cloud.loader import load_backend  # noqa: E402
from cloud.settings import CloudSettings  # noqa: E402
from edge.verifier_client import GrpcTransport, VerifierClient  # noqa: E402
from shared.wire import pb  # noqa: E402

CHUNK = 16


def tiny_model(workdir: Path) -> Path:
    from shared.models import ensure_model
    from tiny_gguf import SEED_A, extract_tokenizer, write_tiny_qwen2_gguf

    tokenizer = extract_tokenizer(ensure_model("qwen2.5-coder-0.5b-instruct-q4_k_m"))
    return write_tiny_qwen2_gguf(workdir / "tiny-a.gguf", tokenizer, SEED_A)


def token_stream(n_tokens: int, vocab_limit: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab_limit, size=n_tokens).tolist()


async def service_run(server: CloudServer, n_sessions: int, prompt_len: int, rounds: int, k: int) -> float:
    """Seconds for n_sessions concurrent sessions to stream and check rounds x CHUNK tokens each."""
    vocab = server.backend.vocabulary
    limit = min(1000, server.backend.info.vocab_size)
    client = VerifierClient(GrpcTransport(f"127.0.0.1:{server.port}", max_message_bytes=64 << 20))
    sessions = []
    for i in range(n_sessions):
        sessions.append(await client.open_session(token_stream(prompt_len, limit, i), vocab, top_k=k))

    # Q's views as the edge would send them: k distinct ids per position (values do not matter here).
    rng = np.random.default_rng(0)
    q_ids = [rng.choice(limit, size=k, replace=False) for _ in range(limit)]
    q_logprobs = -np.arange(1.0, k + 1.0)

    async def stream(i: int, session) -> None:
        ids = token_stream(rounds * CHUNK, limit, 10_000 + i)
        pos = prompt_len
        for r in range(rounds):
            chunk = ids[r * CHUNK : (r + 1) * CHUNK]
            toks = []
            for j, t in enumerate(chunk):
                tok = pb.EdgeToken(position=pos + j, token_id=t, has_distribution=True)
                tok.topk.ids.extend(q_ids[t].tolist())
                tok.topk.logprobs.extend(q_logprobs.tolist())
                toks.append(tok)
            await session.append_nowait(toks)
            await session.check(pos, pos + CHUNK - 1)
            pos += CHUNK

    start = time.perf_counter()
    await asyncio.gather(*(stream(i, s) for i, s in enumerate(sessions)))
    seconds = time.perf_counter() - start
    await asyncio.gather(*(s.close() for s in sessions))
    await client.close()
    return seconds


def raw_run(backend: Backend, n_sessions: int, prompt_len: int, rounds: int) -> float:
    """Seconds for the bare batched forward of the same work."""
    limit = min(1000, backend.info.vocab_size)
    seqs = [backend.new_sequence() for _ in range(n_sessions)]
    try:
        backend.raw_forward(
            [ForwardItem(s, token_stream(prompt_len, limit, i), 0, 1) for i, s in enumerate(seqs)]
        )
        streams = [token_stream(rounds * CHUNK, limit, 10_000 + i) for i in range(n_sessions)]
        start = time.perf_counter()
        for r in range(rounds):
            backend.raw_forward(
                [
                    ForwardItem(s, streams[i][r * CHUNK : (r + 1) * CHUNK], CHUNK, 1)
                    for i, s in enumerate(seqs)
                ]
            )
        return time.perf_counter() - start
    finally:
        for s in seqs:
            backend.release(s)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny", help="`tiny`, a registry name, a GGUF path or a HF directory"
    )
    parser.add_argument("--backend", default="auto", choices=["auto", "transformers", "llama.cpp"])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sessions", default="1,4,16,64", help="comma-separated concurrency levels")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens in each session's cache")
    parser.add_argument("--rounds", type=int, default=8, help="check points per session")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    levels = [int(x) for x in args.sessions.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny_model(Path(tmp))) if args.model == "tiny" else args.model
        settings = CloudSettings(
            model=model, backend=args.backend, device=args.device, dtype=args.dtype, threads=args.threads,
            port=0, max_sessions=max(levels), max_context=args.prompt + args.rounds * CHUNK + 16,
            max_message_bytes=64 << 20, max_batch_items=max(levels), grace_s=1.0,
        )  # fmt: skip
        server = CloudServer(settings, lambda: load_backend(settings))
        await server.start()
        backend = server.backend
        info = backend.info
        print(f"model {info.model_name} ({info.model_id}), {info.backend} on {info.device}, {info.dtype}")
        print(
            f"{args.prompt}-token caches, {args.rounds} check points of {CHUNK} tokens per session, k={args.top_k}"
        )
        print(
            f"{'sessions':>8} {'service tok/s':>14} {'raw tok/s':>11} {'ratio':>7} {'service s':>10} {'raw s':>8}"
        )
        results = []
        for n in levels:
            await service_run(server, n, args.prompt, 1, args.top_k)  # warm-up: allocations, JIT paths
            svc = await service_run(server, n, args.prompt, args.rounds, args.top_k)
            raw = await server.service.scheduler.call(raw_run, backend, n, args.prompt, args.rounds)
            tokens = n * args.rounds * CHUNK
            row = {
                "sessions": n, "tokens": tokens, "service_s": svc, "raw_s": raw,
                "service_tok_s": tokens / svc, "raw_tok_s": tokens / raw, "ratio": raw / svc,
            }  # fmt: skip
            results.append(row)
            print(
                f"{n:>8} {row['service_tok_s']:>14.1f} {row['raw_tok_s']:>11.1f} {row['ratio']:>7.2f} "
                f"{svc:>10.3f} {raw:>8.3f}",
                flush=True,
            )
        await server.stop(grace=0.5)
    if args.json:
        args.json.write_text(json.dumps({"model": info.model_id, "backend": info.backend, "device": info.device,
                                         "dtype": info.dtype, "results": results}, indent=2))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
