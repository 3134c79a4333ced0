"""The router threshold that checks a target share of positions in real runs on validation prompts.

A router's file holds the threshold that checks a target share of P's text on held-out training
prompts. Generating, the router follows the text it writes, and checks a different share (docs/router.md:
18.5 % of P's test text, 22.2 % generating). This reads a real gated run (`handoff eval ... --policies
router`) on the training task seeds, keeps the generations whose prompt `router train` held out (every
`--val-every`-th distinct prompt of the training traces: edge.routing.data.held_out_prompts), and
prints the gate-score quantile that checks `--target` of their positions. Use it as `router:G`, or
write it into a copy of the router file with `--router FILE --out FILE` (how the router the edge ships
for the default pair, edge/routers/default_pair.json, got its threshold).

The target is a share of all the positions, as the evaluation counts checked positions. In a run with
a longer turn (`--router-turn M`) P writes some of them, and those have no router score: the
threshold then checks target x positions / scored positions of the scored ones. The copy records the
run's turn (the file's `turn`), so `--router FILE` alone runs at the turn it was calibrated for.

    python scripts/router_calibrate.py docs/router/train/large.jsonl.gz docs/router/train2/large.jsonl.gz \
        --run runs/router_val2/traces/router-router2-h64-ov80-ahead1-defer.jsonl --target 0.2
"""

from __future__ import annotations

import argparse
import gzip
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from handoff.edge.policy.router import load_router
from handoff.edge.routing.data import held_out_prompts


def _records(path: Path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def validation_prompts(train_traces: list[Path], every: int) -> set[tuple[int, ...]]:
    """The prompts `router train` held out for its threshold (edge.routing.data.held_out_prompts)."""
    prompts = (
        tuple(r["prompt_ids"]) for p in train_traces for r in _records(p) if r.get("record") == "generation"
    )
    return held_out_prompts(prompts, every)


def gate_scores(
    run_trace: Path, prompts: set[tuple[int, ...]]
) -> tuple[np.ndarray, np.ndarray, int, int, int | None]:
    """The run's positions under those prompts.

    Returns:
        ([n] router scores of the scored positions, [n] checked, generations, positions: all of them,
        P's turn tokens included, the run's router_turn from its generation headers or None).
    """
    scores, checked, generations, positions, turn, keep = [], [], 0, 0, None, False
    for r in _records(run_trace):
        if r.get("record") == "generation":
            keep = tuple(r["prompt_ids"]) in prompts
            generations += keep
            turn = (r.get("policy") or {}).get("router_turn", turn)
        elif r.get("record") == "token" and keep:
            positions += 1
            if r.get("gate_score") is not None:
                scores.append(float(r["gate_score"]))
                checked.append(bool(r["checked"]))
    return np.asarray(scores), np.asarray(checked, dtype=bool), generations, positions, turn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train_traces", nargs="+", type=Path, help="the traces the router was trained on")
    ap.add_argument("--run", type=Path, required=True, help="a real router run's trace on those task seeds")
    ap.add_argument("--target", type=float, default=0.2, help="share of positions to check")
    ap.add_argument("--val-every", type=int, default=4)
    ap.add_argument("--router", type=Path, help="the router file the run used: write the threshold into it")
    ap.add_argument("--out", type=Path, help="with --router: the calibrated router file to write")
    ap.add_argument(
        "--turn", type=int, help="the turn the copy runs (default: the run's): for a router whose gate "
        "was chosen for another turn than the run's (handoff router budget --turn)",
    )  # fmt: skip
    args = ap.parse_args()
    if (args.router is None) != (args.out is None):
        ap.error("--router and --out go together")
    if not 0.0 < args.target < 1.0:
        ap.error("--target: expected a share in (0, 1)")
    if args.turn is not None and (args.router is None or args.turn < 1):
        ap.error("--turn: expected an integer >= 1, with --router")
    scores, checked, generations, positions, turn = gate_scores(
        args.run, validation_prompts(args.train_traces, args.val_every)
    )
    if not scores.size:
        ap.error(f"{args.run}: no gated positions under the held-out prompts")
    share = args.target * positions / scores.size  # of the scored positions: P's turn tokens have no score
    if share >= 1.0:
        ap.error(f"--target {args.target:g}: more than the {scores.size} scored of {positions} positions")
    threshold = float(np.quantile(scores, 1.0 - share, method="higher"))
    checked_in_run = float(checked.sum() / positions)
    print(
        f"{generations} validation generations, {positions} positions ({scores.size} scored); "
        f"checked in the run: {checked_in_run:.4f}"
    )
    print(
        f"threshold for {args.target:g}: {threshold:.5f} "
        f"(checks {np.sum(scores >= threshold) / positions:.4f} of the positions)"
    )
    if args.router is not None:
        router = load_router(args.router)
        calibration = {
            "run": str(args.run), "target_checked": args.target, "generations": generations,
            "positions": positions, "scored_positions": int(scores.size),
            "checked_in_run": checked_in_run, "file_threshold": router.threshold,
            "run_turn": turn,
            "turn": args.turn or (router.turn if turn is None else int(turn)),
        }  # fmt: skip
        out = replace(
            router,
            threshold=threshold,
            turn=calibration["turn"],
            meta=router.meta | {"calibration": calibration},
        )
        out.save(args.out)
        print(f"wrote {args.out} (threshold {threshold:.5f}, turn {out.turn})")


if __name__ == "__main__":
    main()
