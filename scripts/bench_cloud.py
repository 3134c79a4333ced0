#!/usr/bin/env python3
"""Verified tokens/s of the cloud verifier vs the raw batched forward pass of the same model.

For each concurrency N, in one run on one device:
  service: N sessions over real gRPC on loopback, each with a P-token prompt in its cache, stream
           R rounds of `append 16 tokens + check point over them`, concurrently;
  raw:     the backend's bare batched forward (`Backend.raw_forward`: the same N caches, N x 16 new
           tokens, logits of every new position, nothing else) for the same R rounds.
Prints tokens/s of both and their ratio. The target (docs/architecture.md): ratio >= 0.7 at 64
sessions, and service throughput growing with concurrency.

--deterministic on|off|both picks the backend's deterministic mode (docs/determinism.md; without it,
HANDOFF_CLOUD_DETERMINISTIC or the service's default, on); `both` measures each mode with its own
server in the same run and prints the service tokens/s of both and their ratio (on / off) at each
concurrency.

With --profile it measures latencies instead, for the latency/cost simulator
(edge/simulation/cloud_latency.py): opening a session by prompt length, one check point by new tokens
and concurrent sessions, handoff seconds per token and first token by concurrent sessions, and the
loopback round trip to subtract (docs/bench_cloud.md).

    python scripts/bench_cloud.py --model tiny                       # tiny Qwen2 (built here), llama.cpp
    python scripts/bench_cloud.py --model qwen2.5-coder-1.5b-instruct-q4_k_m --backend transformers --device cuda
    python scripts/bench_cloud.py --model tiny --backend transformers --deterministic both
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from handoff.cloud.backend import Backend, ForwardItem
from handoff.cloud.grpc_server import CloudServer
from handoff.cloud.loader import load_backend
from handoff.cloud.settings import CloudSettings
from handoff.edge.verifier_client import GrpcTransport, RemoteSession, VerifierClient
from handoff.shared.cli_options import positive_ints
from handoff.shared.wire import pb

CHUNK = 16


def tiny_model(workdir: Path) -> Path:
    from handoff.shared.models import ensure_model
    from handoff.shared.tiny_gguf import SEED_A, extract_tokenizer, write_tiny_qwen2_gguf

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


# ---------------------------------------------------------------------------------------------
# --profile: client-side latencies by size, the input of the latency/cost simulator
# (edge/simulation/cloud_latency.py).


def edge_tokens(ids: list[int], start: int, q_ids: list[np.ndarray], q_logprobs: list[float]) -> list:
    """EdgeTokens at positions start.. carrying k-id views of Q, as the edge sends them."""
    toks = []
    for j, t in enumerate(ids):
        tok = pb.EdgeToken(position=start + j, token_id=t, has_distribution=True)
        tok.topk.ids.extend(q_ids[t].tolist())
        tok.topk.logprobs.extend(q_logprobs)
        toks.append(tok)
    return toks


class Profiler:
    """Times open, check and handoff through a running CloudServer's gRPC port, one client on loopback."""

    def __init__(self, server: CloudServer, prompt_len: int, k: int) -> None:
        self.server = server
        self.prompt_len = prompt_len
        self.k = k
        self.vocab = server.backend.vocabulary
        self.limit = min(1000, server.backend.info.vocab_size)
        rng = np.random.default_rng(0)
        # Q's views: k distinct ids per position (their values do not matter to the cloud's cost).
        self.q_ids = [rng.choice(self.limit, size=k, replace=False) for _ in range(self.limit)]
        self.q_logprobs = (-np.arange(1.0, k + 1.0)).tolist()
        self.client = VerifierClient(GrpcTransport(f"127.0.0.1:{server.port}", max_message_bytes=64 << 20))
        self._seed = 0

    def _ids(self, n: int) -> list[int]:
        self._seed += 1
        return token_stream(n, self.limit, self._seed)

    async def _open(self, prompt_len: int) -> RemoteSession:
        return await self.client.open_session(self._ids(prompt_len), self.vocab, top_k=self.k)

    async def close(self) -> None:
        await self.client.close()

    async def rtt(self, n: int = 20) -> tuple[float, float]:
        """Median round trips of an empty append on an open session's stream, and of a GetInfo.

        The empty append takes the check point's own path (the session's bidirectional stream, the
        session loop, one reply) and never reaches the model: it is the part of a check's latency
        that is transport and not cloud.
        """
        session = await self._open(8)
        try:
            for _ in range(3):  # warm-up
                await session.append([])
                await self.client.info()
            appends, infos = [], []
            for _ in range(n):
                start = time.perf_counter()
                await session.append([])
                appends.append(time.perf_counter() - start)
                start = time.perf_counter()
                await self.client.info()
                infos.append(time.perf_counter() - start)
        finally:
            await session.close()
        return float(np.median(appends)), float(np.median(infos))

    async def open_latency(self, prompt_len: int, repeats: int) -> list[float]:
        """Seconds to open a session with a prompt_len-token prompt (its prefill), alone on the service."""
        times = []
        for _ in range(repeats):
            ids = self._ids(prompt_len)
            start = time.perf_counter()
            session = await self.client.open_session(ids, self.vocab, top_k=self.k)
            times.append(time.perf_counter() - start)
            await session.close()
        return times

    async def _check_round(self, sessions: list[RemoteSession], n: int) -> list[tuple[float, float]]:
        """Each session appends n tokens and checks them, all at once: (seconds, forward seconds) each."""
        pos = self.prompt_len

        async def one(session: RemoteSession) -> tuple[float, float]:
            toks = edge_tokens(self._ids(n), pos, self.q_ids, self.q_logprobs)  # ready before the clock
            start = time.perf_counter()
            await session.append_nowait(toks)
            result = await session.check(pos, pos + n - 1)
            return time.perf_counter() - start, result.forward_ms / 1000.0

        out = await asyncio.gather(*(one(s) for s in sessions))
        # Back to the prompt, after every session is done: each round sees the same cache length,
        # and no rollback competes with a check that is still being timed.
        await asyncio.gather(*(s.rollback(self.prompt_len) for s in sessions))
        return out

    async def _handoff_round(self, sessions: list[RemoteSession], g: int) -> list[tuple[float, list[float]]]:
        """Each session hands off for g tokens, all at once: (first-token seconds, inter-arrivals) each."""

        async def one(session: RemoteSession) -> tuple[float, list[float]]:
            start = time.perf_counter()
            arrivals = [time.perf_counter() async for _ in session.handoff(g)]
            if not arrivals:
                raise RuntimeError(f"the handoff produced no tokens ({session.last_handoff.done})")
            return arrivals[0] - start, np.diff(arrivals).tolist()

        out = await asyncio.gather(*(one(s) for s in sessions))
        await asyncio.gather(*(s.rollback(self.prompt_len) for s in sessions))
        return out

    async def batched(
        self, n_sessions: int, tokens: list[int], handoff_tokens: int, repeats: int
    ) -> tuple[list[dict], dict]:
        """Check rows for every n in tokens, and the decode row, with n_sessions sessions at once."""
        # Only these sessions are open: the scheduler's batch wait expects every open session to join.
        sessions = list(await asyncio.gather(*(self._open(self.prompt_len) for _ in range(n_sessions))))
        try:
            await self._check_round(sessions, max(tokens))  # warm-up: the largest batch's buffers
            rows = []
            for n in tokens:
                samples = [x for _ in range(repeats) for x in await self._check_round(sessions, n)]
                rows.append(
                    {
                        "sessions": n_sessions,
                        "tokens": n,
                        "seconds": float(np.median([s for s, _ in samples])),
                        "forward_s": float(np.median([f for _, f in samples])),
                        "samples": len(samples),
                    }
                )
            await self._handoff_round(sessions, 2)  # warm-up
            firsts, gaps = [], []
            for _ in range(repeats):
                for first, between in await self._handoff_round(sessions, handoff_tokens):
                    firsts.append(first)
                    gaps.extend(between)
            decode = {
                "sessions": n_sessions,
                "seconds_per_token": float(np.median(gaps)),
                "first_token_s": float(np.median(firsts)),
                "tokens": handoff_tokens,
                "samples": len(firsts),
            }
        finally:
            await asyncio.gather(*(s.close() for s in sessions))
        return rows, decode


async def profile_main(args: argparse.Namespace) -> None:
    """--profile: open, check and decode latencies by size, printed and written to --json."""
    if args.profile_handoff < 2:
        raise SystemExit("--profile-handoff must be at least 2 (seconds per token come from inter-arrivals)")
    if args.repeats < 1:
        raise SystemExit("--repeats must be at least 1")
    if args.deterministic == "both":
        raise SystemExit("--profile measures one mode: --deterministic on or off")
    levels = args.profile_sessions
    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny_model(Path(tmp))) if args.model == "tiny" else args.model
        context = max(
            max(args.profile_prompts), args.prompt + max(max(args.profile_tokens), args.profile_handoff)
        )
        settings = CloudSettings(
            model=model, backend=args.backend, device=args.device, dtype=args.dtype, threads=args.threads,
            port=0, max_sessions=max(levels), max_context=context + 16, max_message_bytes=64 << 20,
            max_batch_items=max(levels), grace_s=1.0, deterministic=args.deterministic == "on",
        )  # fmt: skip
        server = CloudServer(settings, lambda: load_backend(settings))
        await server.start()
        info = server.backend.info
        print(f"model {info.model_name} ({info.model_id}), {info.backend} on {info.device}, {info.dtype}, "
              f"deterministic {args.deterministic}")  # fmt: skip
        print(f"latency profile over gRPC on loopback, median of {args.repeats} repeat(s), k={args.top_k}")
        profiler = Profiler(server, args.prompt, args.top_k)
        try:
            rtt, getinfo = await profiler.rtt()
            print(f"round trip: empty append {rtt * 1000:.2f} ms, GetInfo {getinfo * 1000:.2f} ms")

            await profiler.open_latency(min(args.profile_prompts), 1)  # warm-up
            opens = []
            print(f"\n{'open: prompt tokens':>20} {'seconds':>9}")
            for length in args.profile_prompts:
                seconds = float(np.median(await profiler.open_latency(length, args.repeats)))
                opens.append({"prompt_tokens": length, "seconds": seconds})
                print(f"{length:>20} {seconds:>9.4f}", flush=True)

            checks, decodes = [], []
            print(f"\ncheck points and handoffs on {args.prompt}-token caches")
            print(f"{'sessions':>8} {'tokens':>6} {'check s':>9} {'forward s':>9}")
            for s in levels:
                rows, decode = await profiler.batched(
                    s, args.profile_tokens, args.profile_handoff, args.repeats
                )
                for row in rows:
                    print(
                        f"{s:>8} {row['tokens']:>6} {row['seconds']:>9.4f} {row['forward_s']:>9.4f}",
                        flush=True,
                    )
                checks.extend(rows)
                decodes.append(decode)
            print(f"\nhandoffs of {args.profile_handoff} tokens")
            print(f"{'sessions':>8} {'s/token':>9} {'first token s':>13}")
            for d in decodes:
                print(f"{d['sessions']:>8} {d['seconds_per_token']:>9.4f} {d['first_token_s']:>13.4f}")
        finally:
            await profiler.close()
            await server.stop(grace=0.5)
    if args.json:
        result = {
            "model": info.model_id, "backend": info.backend, "device": info.device, "dtype": info.dtype,
            "threads": args.threads,
            "settings": {"context_tokens": args.prompt, "top_k": args.top_k, "repeats": args.repeats,
                         "handoff_tokens": args.profile_handoff},
            "profile": {"rtt_s": rtt, "getinfo_s": getinfo, "open": opens, "check": checks,
                        "decode": decodes},
        }  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2))


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
    parser.add_argument(
        "--deterministic", choices=["on", "off", "both"],
        help="the backend's deterministic mode (default: HANDOFF_CLOUD_DETERMINISTIC, else on); "
        "both: measure each and compare their service tok/s",
    )  # fmt: skip
    profile = parser.add_argument_group("latency profile (--profile; --prompt sizes the caches checked)")
    profile.add_argument(
        "--profile", action="store_true", help="measure open/check/handoff latencies instead of throughput"
    )
    profile.add_argument(
        "--profile-prompts", type=positive_ints, default="32,128,512", help="open: prompt tokens"
    )
    profile.add_argument(
        "--profile-tokens", type=positive_ints, default="1,2,4,8,16,32", help="check: new tokens"
    )
    profile.add_argument(
        "--profile-sessions", type=positive_ints, default="1,4,16", help="concurrent sessions"
    )
    profile.add_argument("--profile-handoff", type=int, default=16, help="tokens per timed handoff (>= 2)")
    profile.add_argument("--repeats", type=int, default=3, help="measurements per point (median)")
    args = parser.parse_args()
    if args.deterministic is None:  # as the service would run: the variable, else the default
        args.deterministic = "on" if CloudSettings().deterministic else "off"
    if args.profile:
        await profile_main(args)
        return
    levels = [int(x) for x in args.sessions.split(",")]
    modes = ["on", "off"] if args.deterministic == "both" else [args.deterministic]
    runs: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(tiny_model(Path(tmp))) if args.model == "tiny" else args.model
        for mode in modes:
            info, runs[mode] = await throughput(args, model, levels, mode)
    comparison = []
    if len(runs) == 2:
        print("\nservice tok/s by deterministic mode (ratio = on / off)")
        print(f"{'sessions':>8} {'on tok/s':>10} {'off tok/s':>10} {'ratio':>7}")
        for on, off in zip(runs["on"], runs["off"], strict=True):
            row = {"sessions": on["sessions"], "on_tok_s": on["service_tok_s"], "off_tok_s": off["service_tok_s"],
                   "ratio": on["service_tok_s"] / off["service_tok_s"]}  # fmt: skip
            comparison.append(row)
            print(
                f"{row['sessions']:>8} {row['on_tok_s']:>10.1f} {row['off_tok_s']:>10.1f} {row['ratio']:>7.2f}"
            )
    if args.json:
        results = [row for mode in modes for row in runs[mode]]
        args.json.write_text(json.dumps({"model": info.model_id, "backend": info.backend, "device": info.device,
                                         "dtype": info.dtype, "results": results, "deterministic_comparison":
                                         comparison}, indent=2))  # fmt: skip


async def throughput(args: argparse.Namespace, model: str, levels: list[int], mode: str):
    """Service vs raw tokens/s at each concurrency with one server in deterministic mode `mode` (on, off).

    Returns:
        (the backend's BackendInfo, one row per concurrency level).
    """
    settings = CloudSettings(
        model=model, backend=args.backend, device=args.device, dtype=args.dtype, threads=args.threads,
        port=0, max_sessions=max(levels), max_context=args.prompt + args.rounds * CHUNK + 16,
        max_message_bytes=64 << 20, max_batch_items=max(levels), grace_s=1.0, deterministic=mode == "on",
    )  # fmt: skip
    server = CloudServer(settings, lambda: load_backend(settings))
    await server.start()
    backend = server.backend
    info = backend.info
    print(f"model {info.model_name} ({info.model_id}), {info.backend} on {info.device}, {info.dtype}, "
          f"deterministic {mode}")  # fmt: skip
    print(
        f"{args.prompt}-token caches, {args.rounds} check points of {CHUNK} tokens per session, k={args.top_k}"
    )
    print(
        f"{'sessions':>8} {'service tok/s':>14} {'raw tok/s':>11} {'ratio':>7} {'service s':>10} {'raw s':>8}"
    )
    results = []
    try:
        for n in levels:
            await service_run(server, n, args.prompt, 1, args.top_k)  # warm-up: allocations, JIT paths
            svc = await service_run(server, n, args.prompt, args.rounds, args.top_k)
            raw = await server.service.scheduler.call(raw_run, backend, n, args.prompt, args.rounds)
            tokens = n * args.rounds * CHUNK
            row = {
                "sessions": n, "deterministic": mode, "tokens": tokens, "service_s": svc, "raw_s": raw,
                "service_tok_s": tokens / svc, "raw_tok_s": tokens / raw, "ratio": raw / svc,
            }  # fmt: skip
            results.append(row)
            print(
                f"{n:>8} {row['service_tok_s']:>14.1f} {row['raw_tok_s']:>11.1f} {row['ratio']:>7.2f} "
                f"{svc:>10.3f} {raw:>8.3f}",
                flush=True,
            )
    finally:
        await server.stop(grace=0.5)
    return info, results


if __name__ == "__main__":
    asyncio.run(main())
