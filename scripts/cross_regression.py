"""The same-tokenizer pair through the text-aligned path against the direct path: the same tokens?

A regression check of the alignment and the text sessions (docs/tokenizers.md): Q and P share one
tokenizer, so every boundary aligns and the text path should reproduce the direct path's output,
greedy, under the same policy. Prints one line per prompt and a summary; writes JSON with --out.

    python scripts/cross_regression.py --tasks 2 --max-tokens 96 --out docs/cross_regression.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from handoff.edge.cloud_harness import llama_backend_factory, running_server, vocabulary_of
from handoff.edge.controller import HybridGenerator
from handoff.edge.cross import cross_generator
from handoff.edge.evaluation.tasks import SUITES, generate_suite
from handoff.edge.policy import PolicyConfig
from handoff.edge.runner import EdgeRunner
from handoff.shared.models import ensure_model
from handoff.shared.sampling import SamplingSettings
from handoff.shared.settings import HandoffSettings


async def main(args: argparse.Namespace) -> dict:
    settings = HandoffSettings()
    edge, cloud = ensure_model(settings.edge_model), ensure_model(settings.cloud_model)
    policy = PolicyConfig(kind=args.policy, threshold=args.threshold, lookahead_windows=0)
    runner = EdgeRunner(edge, k=policy.top_k, n_ctx=2048, n_threads=settings.threads)
    rows = []
    try:
        async with running_server(llama_backend_factory(cloud)) as (_, client):
            direct = HybridGenerator(runner, client, vocabulary_of(edge), policy)
            text = await cross_generator(runner, client, policy, cache_dir=settings.cache_dir / "alignments")
            for suite in SUITES:
                for task in generate_suite(suite, args.tasks, seed=args.seed):
                    ids = runner.model.tokenize(
                        runner.model.chat_prompt([{"role": "user", "content": task.prompt}])
                    )
                    t0 = time.perf_counter()
                    a = await direct.generate(ids, args.max_tokens, sampling=SamplingSettings())
                    t1 = time.perf_counter()
                    b = await text.generate(ids, args.max_tokens, sampling=SamplingSettings())
                    t2 = time.perf_counter()
                    same_text = a.text.replace("<|im_end|>", "") == b.text
                    q_ids = [r.token_id for r in a.records]
                    b_ids = [r.token_id for r in b.records]
                    row = {
                        "task": task.task_id, "same_text": same_text, "same_tokens": q_ids[: len(b_ids)] == b_ids,
                        "direct": {"tokens": len(a.records), "by_source": a.counts(), "check_points": a.check_points,
                                   "handoffs": a.handoffs, "bytes_up": a.bytes_sent, "seconds": round(t1 - t0, 2)},
                        "text": {"tokens": len(b.records), "by_source": b.counts(), "check_points": b.check_points,
                                 "handoffs": b.handoffs, "bytes_up": b.bytes_sent, "seconds": round(t2 - t1, 2)},
                    }  # fmt: skip
                    if not same_text:
                        n = next(
                            (i for i, (x, y) in enumerate(zip(a.text, b.text, strict=False)) if x != y), None
                        )
                        row["first_difference_at_char"] = n
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        runner.close()
    summary = {
        "prompts": len(rows),
        "same_text": sum(r["same_text"] for r in rows),
        "policy": f"{args.policy} tau={args.threshold} N={policy.check_interval} M={policy.handback_tokens}",
        "max_tokens": args.max_tokens,
        "rows": rows,
    }
    print(f"same text: {summary['same_text']} of {summary['prompts']} prompts")
    return summary


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=2, help="tasks per suite")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--policy", default="rollback")
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    out = asyncio.run(main(args))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
