"""Check the latency simulator against real runs: predicted vs measured wall time at injected RTTs.

For each model pair it measures the cloud's latency profile (scripts/bench_cloud.py --profile),
starts `handoff serve-cloud` in its own process, and runs real generations from this process over
loopback gRPC with the delay injector adding 0, 20 and 100 ms of round trip (edge-only, cloud-only
and hybrid, a few prompts each). Each recorded generation is then replayed by the simulator
(edge/simulation) with the measured profile, the edge's speed measured in the edge-only runs and
the injected RTT, and the predicted wall time is set beside the measured one.

Both models share this machine's cores: each gets one thread (`--threads 1`) so that they do not
compete, and the hybrid runs draft no window ahead (lookahead 0), which on separate machines would
overlap drafting with checking but here would only slow both down.

    .venv/bin/python scripts/validate_simulator.py --out docs/simulator_validation.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from handoff.edge.cloud_harness import start_server, vocabulary_of
from handoff.edge.controller import HybridGenerator
from handoff.edge.policy import PolicyConfig
from handoff.edge.runner import EdgeRunner
from handoff.edge.simulation.cloud_latency import CloudLatencyModel
from handoff.edge.simulation.run import edge_model_from_traces
from handoff.edge.simulation.simulate import EdgeModel, NetworkModel, simulate
from handoff.edge.simulation.traces import Generation
from handoff.edge.verifier_client import GrpcTransport, NetworkDelay, VerifierClient

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain in two sentences what a linked list is.",
    "Sort these numbers in ascending order: 42, 7, 19, 3, 88. Give only the list.",
]


def tiny_pair(workdir: Path) -> tuple[Path, Path]:
    from handoff.shared.models import ensure_model
    from handoff.shared.settings import DEFAULT_EDGE_MODEL
    from handoff.shared.tiny_gguf import (
        NEAR_SCALE,
        SEED_A,
        SEED_NEAR,
        extract_tokenizer,
        write_tiny_qwen2_gguf,
    )

    tok = extract_tokenizer(ensure_model(DEFAULT_EDGE_MODEL), keep=1000)
    cloud = write_tiny_qwen2_gguf(workdir / "tiny-a.gguf", tok, SEED_A)
    edge = write_tiny_qwen2_gguf(
        workdir / "tiny-a-near.gguf", tok, SEED_NEAR, perturb_from_seed=SEED_A, perturb_scale=NEAR_SCALE
    )
    return edge, cloud


def default_pair() -> tuple[Path, Path]:
    from handoff.shared.models import ensure_model
    from handoff.shared.settings import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL

    return ensure_model(DEFAULT_EDGE_MODEL), ensure_model(DEFAULT_CLOUD_MODEL)


def measure_profile(cloud: Path, out: Path, max_prompt: int) -> None:
    prompts = ",".join(str(p) for p in (16, 64, 128, 256) if p <= max_prompt)
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_cloud.py"), "--model", str(cloud), "--backend", "llama.cpp",
           "--threads", "1", "--profile", "--profile-prompts", prompts, "--profile-tokens", "1,2,4,8,16",
           "--profile-sessions", "1", "--profile-handoff", "16", "--prompt", "64", "--repeats", "3",
           "--json", str(out)]  # fmt: skip
    print("measuring the cloud's latency profile:", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


async def record(
    edge: Path, port: int, rtts_ms: list[float], max_tokens: int, policy: PolicyConfig, repeats: int
):
    """Real generations at each RTT: (rtt, mode, Generation, measured seconds)."""
    vocab = vocabulary_of(edge)
    runner = EdgeRunner(edge, k=policy.top_k, n_ctx=1024, n_threads=1)
    out = []
    try:
        prompts = [
            runner.model.tokenize(runner.model.chat_prompt([{"role": "user", "content": p}])) for p in PROMPTS
        ]
        warm = VerifierClient(GrpcTransport(f"127.0.0.1:{port}"))
        for mode in ("edge", "cloud", "hybrid"):  # untimed: first calls pay one-off costs
            await HybridGenerator(runner, warm, vocab, policy, mode=mode).generate(prompts[0], 8)
        await warm.close()
        for rtt in rtts_ms:
            delay = NetworkDelay(rtt_s=rtt / 1000) if rtt else None
            client = VerifierClient(GrpcTransport(f"127.0.0.1:{port}", delay=delay))
            try:
                for mode in ("edge", "cloud", "hybrid"):
                    gen = HybridGenerator(runner, client, vocab, policy, mode=mode)
                    for ids in prompts * repeats:
                        result = await gen.generate(ids, max_tokens)
                        meta = {"prompt_ids": list(ids), "policy": asdict(policy), "max_tokens": max_tokens,
                                "sampling": {"temperature": 0.0}}  # fmt: skip
                        g = Generation(meta, result.trace(), result.summary(), f"rtt{rtt:g}/{mode}")
                        out.append((rtt, mode, g, result.seconds))
                        print(f"  rtt {rtt:5.0f} ms  {mode:6s}  {len(result.records):3d} tokens  {result.seconds:6.2f} s",
                              flush=True)  # fmt: skip
            finally:
                await client.close()
    finally:
        runner.close()
    return out


def edge_model(runs) -> EdgeModel:
    """The edge's costs measured in the runs without injected delay (edge_model_from_traces)."""
    return edge_model_from_traces([g for rtt, _, g, _ in runs if not rtt])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="tiny,default", help="tiny and/or default, comma-separated")
    ap.add_argument("--rtt-ms", default="0,20,100")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="Generations per prompt, mode and RTT.")
    ap.add_argument("--tolerance", type=float, default=0.15)
    ap.add_argument("--out", type=Path, default=None, help="Write the comparison here (JSON; .md beside it).")
    args = ap.parse_args()
    rtts = [float(x) for x in args.rtt_ms.split(",")]
    policy = replace(PolicyConfig(), lookahead_windows=0)
    report: dict = {"policy": asdict(policy), "rtts_ms": rtts, "max_tokens": args.max_tokens, "pairs": {}}
    lines = []
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for pair in args.pairs.split(","):
            edge, cloud = tiny_pair(Path(tmp)) if pair == "tiny" else default_pair()
            profile_path = Path(tmp) / f"profile-{pair}.json"
            measure_profile(cloud, profile_path, max_prompt=256)
            profile = CloudLatencyModel.from_bench(profile_path)
            proc, port = start_server(cloud, "--max-context", "1024")
            try:
                t0 = time.perf_counter()
                runs = asyncio.run(record(edge, port, rtts, args.max_tokens, policy, args.repeats))
                print(
                    f"{pair}: recorded {len(runs)} generations in {time.perf_counter() - t0:.0f} s",
                    flush=True,
                )
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            em = edge_model(runs)
            rows = []
            for rtt in rtts:
                for mode in ("edge", "cloud", "hybrid"):
                    sel = [(g, s) for r, m, g, s in runs if r == rtt and m == mode]
                    measured = sum(s for _, s in sel)
                    # The real link is loopback (its round trip measured with the profile) plus the injection.
                    link = NetworkModel(rtt_s=rtt / 1000 + profile.rtt_s)
                    predicted = sum(simulate(g, link, em, profile).seconds for g, _ in sel)
                    err = predicted / measured - 1
                    worst = max(worst, abs(err))
                    rows.append({"rtt_ms": rtt, "mode": mode, "generations": len(sel),
                                 "tokens": sum(len(g.records) for g, _ in sel), "measured_s": measured,
                                 "predicted_s": predicted, "error": err})  # fmt: skip
            report["pairs"][pair] = {
                "edge": str(edge.name), "cloud": str(cloud.name), "edge_model": asdict(em),
                "profile": json.loads(profile_path.read_text()), "rows": rows,
            }  # fmt: skip
            lines.append(
                f"\n{pair} pair: edge {edge.name}, cloud {cloud.name}; edge {1 / em.token_s:.1f} tok/s"
            )
            lines.append(
                f"{'RTT ms':>7} {'mode':>7} {'gens':>5} {'tokens':>7} {'measured s':>11} {'predicted s':>12} {'error':>7}"
            )
            for r in rows:
                lines.append(f"{r['rtt_ms']:7.0f} {r['mode']:>7} {r['generations']:5d} {r['tokens']:7d} "
                             f"{r['measured_s']:11.2f} {r['predicted_s']:12.2f} {100 * r['error']:6.1f}%")  # fmt: skip
    lines.append(f"\nworst error {100 * worst:.1f}% (tolerance {100 * args.tolerance:.0f}%): "
                 f"{'PASS' if worst <= args.tolerance else 'FAIL'}")  # fmt: skip
    text = "\n".join(lines)
    print(text)
    if args.out:
        report["worst_error"] = worst
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".txt").write_text(text.lstrip() + "\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.txt')}")
    sys.exit(0 if worst <= args.tolerance else 1)


if __name__ == "__main__":
    main()
