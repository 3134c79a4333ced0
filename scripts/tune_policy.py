"""Measure the handoff policy's parameters on a model pair, to choose PolicyConfig's defaults.

For a few prompts it runs, greedy, in one process with one embedded verifier:
- cloud-only: P's own text, with Q's view at every position (a full trace), so the per-position KL
  distribution is known without any policy in the way;
- edge-only: Q's own text;
- hybrid for a grid of (tau, N) and of (M, agree_tokens).

Quality proxy until `handoff eval` (issue 6): how many tokens the output shares with P's own greedy
text before the first difference, as a fraction of P's text (1.0 = P's answer exactly). Cost: the
fraction of tokens the cloud produced, check points and uplink bytes per token, wall time.

    .venv/bin/python scripts/tune_policy.py --max-tokens 64 --out docs/policy_defaults.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from handoff.edge.assistant import Assistant
from handoff.edge.controller import HybridGenerator
from handoff.edge.policy import PolicyConfig
from handoff.edge.settings import EdgeSettings
from handoff.shared.settings import get_settings

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "A train travels 120 km in 1.5 hours. What is its average speed in km/h? Explain briefly.",
    "Explain what a hash table is in two sentences.",
    "Write a SQL query that returns the ten customers with the highest total order amount.",
    "Write a bash command that counts the lines of all .py files in a directory tree.",
]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def measure(args: argparse.Namespace) -> dict:
    settings = get_settings()
    rows: list[dict] = []
    async with Assistant(settings, EdgeSettings()) as assistant:
        base = assistant.generator
        assert base is not None

        async def one(mode: str, policy: PolicyConfig, ids: list[int]):
            gen = HybridGenerator(base.runner, base.client, base.vocabulary, policy, mode=mode)
            return await gen.generate(ids, args.max_tokens)

        prompts = [
            assistant.chat_prompt_ids([{"role": "user", "content": p}]) for p in PROMPTS[: args.prompts]
        ]
        default = PolicyConfig()
        refs, kls = [], []
        for ids in prompts:
            r = await one("cloud", default, ids)
            refs.append(r.tokens)
            kls.extend(rec.kl for rec in r.records if rec.kl is not None)
            print(f"cloud-only: {len(r.tokens)} tokens in {r.seconds:.1f} s", flush=True)
        kls_a = np.asarray(kls)
        kl_stats = {
            "positions": int(kls_a.size),
            "mean": float(kls_a.mean()),
            **{f"p{q}": float(np.percentile(kls_a, q)) for q in (50, 75, 90, 95, 99)},
            "over": {str(t): float((kls_a > t).mean()) for t in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)},
        }
        print("per-position top-k KL on P's own text:", json.dumps(kl_stats), flush=True)

        configs: list[tuple[str, PolicyConfig]] = [("edge", default), ("cloud", default)]
        if args.grid:  # explicit points "tau:N:M:agree"
            for point in args.grid:
                tau, n, m, agree = point.split(":")
                configs.append(("hybrid", replace(default, threshold=float(tau), check_interval=int(n),
                                                  handback_tokens=int(m), agree_tokens=int(agree))))  # fmt: skip
        else:
            for tau in args.thresholds:
                for n in args.intervals:
                    configs.append(("hybrid", replace(default, threshold=tau, check_interval=n)))
            for m, agree in ((4, 0), (8, 0), (16, 0), (16, 4), (32, 4), (16, 2)):
                configs.append(("hybrid", replace(default, handback_tokens=m, agree_tokens=agree)))
            configs.append(("hybrid", replace(default, kind="seed")))
            configs.append(("hybrid", replace(default, aggregation="mean")))
        for mode, policy in configs:
            t0 = time.perf_counter()
            agg = {"tokens": 0, "cloud": 0, "check_points": 0, "handoffs": 0, "bytes_up": 0, "prefix": 0.0}
            for ids, ref in zip(prompts, refs, strict=True):
                r = await one(mode, policy, ids)
                c = r.counts()
                agg["tokens"] += len(r.records)
                agg["cloud"] += c["cloud"] + c["corrected"]
                agg["check_points"] += r.check_points
                agg["handoffs"] += r.handoffs
                agg["bytes_up"] += r.bytes_sent
                agg["prefix"] += common_prefix(r.tokens, ref) / max(1, len(ref))
            row = {
                "mode": mode,
                "policy": asdict(policy) if mode == "hybrid" else None,
                "cloud_fraction": agg["cloud"] / agg["tokens"],
                "p_prefix": agg["prefix"] / len(prompts),
                "check_points_per_100": 100 * agg["check_points"] / agg["tokens"],
                "handoffs_per_100": 100 * agg["handoffs"] / agg["tokens"],
                "bytes_up_per_token": agg["bytes_up"] / agg["tokens"],
                "seconds": time.perf_counter() - t0,
            }
            rows.append(row)
            p = policy
            label = mode if mode != "hybrid" else (
                f"{p.kind} tau={p.threshold} N={p.check_interval} M={p.handback_tokens} agree={p.agree_tokens} {p.aggregation}"
            )  # fmt: skip
            print(
                f"{label:55s} cloud {row['cloud_fraction']:.2f}  P-prefix {row['p_prefix']:.2f}  "
                f"checks/100 {row['check_points_per_100']:.1f}  handoffs/100 {row['handoffs_per_100']:.1f}  "
                f"up {row['bytes_up_per_token']:.0f} B/tok  {row['seconds']:.0f} s",
                flush=True,
            )
    return {"prompts": PROMPTS[: args.prompts], "max_tokens": args.max_tokens, "kl": kl_stats, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.1, 0.3, 0.5, 1.0])
    ap.add_argument("--intervals", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--grid", nargs="+", default=None, help="Only these hybrid points, as tau:N:M:agree.")
    ap.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    args = ap.parse_args()
    result = asyncio.run(measure(args))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
