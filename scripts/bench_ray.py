#!/usr/bin/env python3
"""Scale-out of the cloud verifier on Ray Serve: 1 vs N replicas, with one plain serve-cloud beside them.

In one run, on one machine, each configuration in its own `handoff serve-cloud` process on 127.0.0.1:
  single:      `serve-cloud` (one process, one model);
  ray xR:      `serve-cloud --ray --replicas R` (R replicas behind Ray Serve's gRPC proxy).
The same load against each: S sessions at once (each its own routing key), each with a P-token
prompt, then `rounds` x (append 16 tokens + check point over them). Prints checked tokens/s, check
latency p50/p95 and the throughput ratio to Ray with one replica (docs/ray.md).

    python scripts/bench_ray.py --model tiny --replicas 1,2
    python scripts/bench_ray.py --model qwen2.5-coder-1.5b-instruct-q4_k_m --replicas 1,2 --sessions 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from handoff.edge.verifier_client import GrpcTransport, VerifierClient
from handoff.shared.cli_options import positive_ints
from handoff.shared.model_info import load_model_info
from handoff.shared.models import ensure_model, resolve
from handoff.shared.settings import get_settings
from handoff.shared.wire import pb

CHUNK = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    model: str, threads: int, sessions: int, ray_replicas: int | None, deterministic: bool
) -> tuple[subprocess.Popen, int]:
    """A serve-cloud process (with --ray when ray_replicas), once it listens; returns (process, port)."""
    port = free_port()
    cmd = [sys.executable, "-m", "handoff", "serve-cloud", "--model", model, "--port", str(port),
           "--threads", str(threads), "--max-sessions", str(sessions), "--max-context", "2048"]  # fmt: skip
    cmd.append("--deterministic" if deterministic else "--no-deterministic")
    if ray_replicas:
        cpus = min(threads, (os.cpu_count() or 1) / ray_replicas)  # what Ray reserves, so all replicas fit
        cmd += ["--ray", "--replicas", str(ray_replicas), "--cpus-per-replica", str(cpus)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "COLUMNS": "300"})  # fmt: skip
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if re.search(r"listening on 127\.0\.0\.1:\d+", line):
            return proc, port
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"serve-cloud did not start: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def load(
    port: int, vocab, sessions: int, prompt_len: int, rounds: int, k: int, vocab_limit: int
) -> dict:
    """S concurrent sessions of `rounds` append+check rounds; tokens/s, check latencies, replicas used."""
    client = VerifierClient(GrpcTransport(f"127.0.0.1:{port}", timeout_s=600))
    rng = np.random.default_rng(0)
    latencies: list[float] = []
    servers: set[str] = set()

    async def one(i: int) -> None:
        ids = rng.integers(0, vocab_limit, size=prompt_len + rounds * CHUNK).tolist()
        session = await client.open_session(ids[:prompt_len], vocab, top_k=k, routing_key=uuid.uuid4().hex)
        servers.add(session.server_id)
        pos = prompt_len
        for _ in range(rounds):
            toks = [pb.EdgeToken(position=pos + j, token_id=ids[pos + j]) for j in range(CHUNK)]
            t0 = time.perf_counter()
            await session.append(toks)
            await session.check(pos, pos + CHUNK - 1)
            latencies.append(time.perf_counter() - t0)
            pos += CHUNK
        await session.close()

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(sessions)))
    finally:
        await client.close()
    seconds = time.perf_counter() - t0
    return {
        "tokens_per_s": sessions * rounds * CHUNK / seconds,
        "seconds": seconds,
        "check_p50_ms": 1000 * float(np.percentile(latencies, 50)),
        "check_p95_ms": 1000 * float(np.percentile(latencies, 95)),
        "servers_used": len(servers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="registry name, GGUF path, or `tiny` (built here)")
    parser.add_argument(
        "--replicas", type=positive_ints, default=[1, 2], help="comma-separated replica counts"
    )
    parser.add_argument("--threads", type=int, default=1, help="model threads per replica (and of `single`)")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens per session")
    parser.add_argument("--rounds", type=int, default=8, help="check points per session")
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument(
        "--deterministic",
        choices=["on", "off"],
        default="on",
        help="the verifier's deterministic mode (docs/determinism.md); off batches sessions' tokens together",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    if args.model == "tiny":
        from handoff.shared.tiny_gguf import SEED_A, extract_tokenizer, write_tiny_qwen2_gguf

        tokenizer = extract_tokenizer(ensure_model("qwen2.5-coder-0.5b-instruct-q4_k_m"))
        model = str(write_tiny_qwen2_gguf(Path(tempfile.mkdtemp()) / "tiny-a.gguf", tokenizer, SEED_A))
    else:
        model = str(resolve(args.model, "cloud", get_settings()).path)
    ref = resolve(model, "cloud", get_settings())
    vocab = load_model_info(ref)[1]
    vocab_limit = min(len(vocab), 1000)
    configs = [("single", None)] + [(f"ray x{r}", r) for r in args.replicas]
    rows = []
    for name, replicas in configs:
        proc, port = start(model, args.threads, args.sessions, replicas, args.deterministic == "on")
        try:
            row = asyncio.run(
                load(port, vocab, args.sessions, args.prompt, args.rounds, args.top_k, vocab_limit)
            )
        finally:
            stop(proc)
        rows.append({"config": name, "replicas": replicas or 1, **row})
        print(f"{name}: {row['tokens_per_s']:.1f} tok/s", flush=True)
    base = next((r for r in rows if r["config"] == "ray x1"), rows[0])["tokens_per_s"]
    print(f"\nmodel {Path(model).name}, {args.sessions} sessions x {args.rounds} rounds of {CHUNK} tokens, "
          f"prompt {args.prompt}, {args.threads} thread(s) per replica, {os.cpu_count()} CPUs, "
          f"deterministic {args.deterministic}")  # fmt: skip
    print(
        f"{'config':<10} {'tok/s':>8} {'vs ray x1':>9} {'check p50 ms':>13} {'check p95 ms':>13} {'replicas used':>14}"
    )
    for r in rows:
        r["ratio_to_ray_x1"] = r["tokens_per_s"] / base
        print(f"{r['config']:<10} {r['tokens_per_s']:>8.1f} {r['ratio_to_ray_x1']:>9.2f} "
              f"{r['check_p50_ms']:>13.1f} {r['check_p95_ms']:>13.1f} {r['servers_used']:>14}")  # fmt: skip
    if args.json:
        meta = {
            k: getattr(args, k) for k in ("threads", "sessions", "prompt", "rounds", "top_k", "deterministic")
        }
        meta.update(model=Path(model).name, cpus=os.cpu_count(), chunk=CHUNK)
        args.json.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
