"""What a mixture of small experts costs the edge: memory and time per token, side by side with one Q.

Loads the edge model as one EdgeRunner, then as a MixtureRunner of the prompted experts (the same GGUF
with its own system prompt each, edge/mixture.py), and drafts the same number of greedy tokens with
each: one Q, the mixture in select mode (one expert drafts, all evaluate), and in weighted mode (the
experts' distributions mixed). Memory is the process's proportional set size added by loading
(llama.cpp's KV caches and compute buffers included; a page of the GGUF that several contexts map
counts once).

    python scripts/bench_mixture.py --tokens 64 --out docs/bench_mixture_0.5b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from handoff.edge.mixture import PROMPTED_EXPERTS, MixtureRunner
from handoff.edge.policy import PolicyConfig, make_policy
from handoff.edge.runner import EdgeRunner
from handoff.shared.models import ensure_model
from handoff.shared.settings import HandoffSettings


def pss_mb() -> float:
    """This process's proportional set size (Linux /proc/self/smaps_rollup), MiB: a page mapped several
    times (one GGUF mapped by several llama.cpp contexts) counts once, unlike the resident set."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no Pss in /proc/self/smaps_rollup")


def per_token_ms(runner, prompt_ids: list[int], tokens: int) -> float:
    runner.start(prompt_ids)
    runner.step()  # warm-up: the first decode allocates llama.cpp's buffers
    t0 = time.perf_counter()
    for _ in range(tokens):
        runner.step()
    return 1000 * (time.perf_counter() - t0) / tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="Greedy tokens timed per configuration.")
    ap.add_argument(
        "--n-ctx", type=int, default=4096, help="Each context's length (the KV cache it reserves)."
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="Write the figures as JSON here.")
    ap.add_argument("--model", type=Path, default=None, help="A GGUF instead of the default edge model.")
    args = ap.parse_args()
    path = args.model or ensure_model(HandoffSettings().edge_model)
    kw = dict(k=20, n_ctx=args.n_ctx, n_threads=args.threads)

    base = pss_mb()
    single = EdgeRunner(path, **kw)
    one_mb = pss_mb() - base
    prompt = single.model.tokenize(
        single.model.chat_prompt(
            [{"role": "user", "content": "Sort the list [5, 3, 9, 1] and explain each step."}]
        )
    )
    rows = {
        "one Q": {"experts": 1, "pss_mb": one_mb, "ms_per_token": per_token_ms(single, prompt, args.tokens)}
    }
    single.close()

    base = pss_mb()
    mixture = MixtureRunner([(s, EdgeRunner(path, **kw)) for s in PROMPTED_EXPERTS])
    mix_mb = pss_mb() - base
    for mode in ("select", "weighted"):
        mixture.follow(make_policy(PolicyConfig(kind="mixture", mixture=mode)))
        rows[f"mixture {mode}"] = {
            "experts": len(PROMPTED_EXPERTS),
            "pss_mb": mix_mb,
            "ms_per_token": per_token_ms(mixture, prompt, args.tokens),
        }
    mixture.close()

    ref = rows["one Q"]
    print(f"{'edge':<18} {'experts':>7} {'PSS MB':>8} {'x one Q':>8} {'ms/token':>9} {'x one Q':>8}")
    for name, r in rows.items():
        print(f"{name:<18} {r['experts']:>7} {r['pss_mb']:>8.0f} {r['pss_mb'] / ref['pss_mb']:>8.2f} "
              f"{r['ms_per_token']:>9.1f} {r['ms_per_token'] / ref['ms_per_token']:>8.2f}")  # fmt: skip
    if args.out:
        meta = {"model": path.name, "n_ctx": args.n_ctx, "threads": args.threads, "tokens": args.tokens,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}  # fmt: skip
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
