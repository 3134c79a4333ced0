#!/usr/bin/env python3
"""How much of the token-level divergence between the default pair is over surface forms or concepts.

Reads full traces (cloud-only runs of `handoff eval`: both models' top-k at every position of P's
text) and, with the concept maps of the default pair's vocabulary (surface forms; k-means clusters
of P's output embeddings), reports:
  - argmax disagreements (Q's top-1 is not P's token) and how many are within one concept;
  - positions over tau for the KL over tokens, surface forms and concepts (all three recomputed from
    the same top-k views, so comparable with each other);
  - windows that would hand over (max over N positions > tau) under each, and how many token-KL
    handoffs the surface and concept KLs would not make;
  - the cloud share of an offline replay of the rollback policy under each (edge.simulation.replay).

    python scripts/concept_analysis.py docs/router/eval/traces/large.jsonl.gz --json docs/concepts.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from handoff.edge.policy import PolicyConfig
from handoff.edge.simulation.replay import record_kls, replay_policy
from handoff.edge.simulation.traces import iter_generations
from handoff.shared.concepts import concept_map_for
from handoff.shared.model_info import load_model_info
from handoff.shared.models import resolve
from handoff.shared.settings import DEFAULT_EDGE_MODEL, get_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--thresholds", default="0.1,0.3,1.0")
    parser.add_argument("--interval", type=int, default=8)
    parser.add_argument("--concepts", type=int, default=1024)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    taus = [float(t) for t in args.thresholds.split(",")]

    vocabulary = load_model_info(resolve(DEFAULT_EDGE_MODEL, "edge", get_settings()))[1]
    maps = {
        "token": None,
        "surface": concept_map_for("surface", vocabulary),
        "concept": concept_map_for("concept", vocabulary, args.concepts),
    }
    gens = [g for g in iter_generations(args.traces) if g.full and g.mode == "cloud"]
    if not gens:
        raise SystemExit("no full cloud-only traces")
    kls = {name: [record_kls(g.records, m) for g in gens] for name, m in maps.items()}

    positions = sum(len(g.records) for g in gens)
    p_tok = np.concatenate([[int(r["token_id"]) for r in g.records] for g in gens])
    q_top = np.concatenate([[int(r["q_topk_ids"][0]) for r in g.records] for g in gens])
    disagree = p_tok != q_top
    out: dict = {
        "traces": [str(t) for t in args.traces],
        "generations": len(gens),
        "positions": positions,
        "concepts_k": args.concepts,
        "argmax_disagreements": int(disagree.sum()),
        "disagreements_within_one": {
            name: int((disagree & (m[p_tok] == m[q_top])).sum()) for name, m in maps.items() if m is not None
        },
        "thresholds": {},
    }
    for tau in taus:
        row: dict = {}
        windows: dict[str, np.ndarray] = {}
        for name in maps:
            flat = np.concatenate(kls[name])
            row[f"positions_over_{name}"] = int((flat > tau).sum())
            w = []
            for per_gen in kls[name]:
                for s in range(0, len(per_gen), args.interval):
                    w.append(per_gen[s : s + args.interval].max() > tau)
            windows[name] = np.asarray(w)
            row[f"windows_over_{name}"] = int(windows[name].sum())
            policy = replace(PolicyConfig(), threshold=tau, check_interval=args.interval, divergence=name)
            replays = [replay_policy(g, policy, maps[name])[0] for g in gens]
            cloud = sum(r["source"] != "edge" for g in replays for r in g.records)
            row[f"replay_cloud_share_{name}"] = cloud / positions
        for name in ("surface", "concept"):
            row[f"token_handoffs_not_made_by_{name}"] = int((windows["token"] & ~windows[name]).sum())
        row["windows"] = int(windows["token"].size)
        out["thresholds"][f"{tau:g}"] = row

    print(f"{len(gens)} generations, {positions} positions of P's text; concepts k={args.concepts}")
    print(f"argmax disagreements: {out['argmax_disagreements']} "
          f"({out['argmax_disagreements'] / positions:.1%} of positions); within one surface form: "
          f"{out['disagreements_within_one']['surface']}, within one concept: "
          f"{out['disagreements_within_one']['concept']}")  # fmt: skip
    print(f"{'tau':>5} {'windows':>8} | over tau: {'token':>6} {'surface':>8} {'concept':>8} | "
          f"token handoffs not made: {'surface':>8} {'concept':>8} | replay cloud share: "
          f"{'token':>6} {'surface':>8} {'concept':>8}")  # fmt: skip
    for tau, row in out["thresholds"].items():
        print(f"{tau:>5} {row['windows']:>8} | windows   {row['windows_over_token']:>6} "
              f"{row['windows_over_surface']:>8} {row['windows_over_concept']:>8} | "
              f"{'':>24}{row['token_handoffs_not_made_by_surface']:>8} "
              f"{row['token_handoffs_not_made_by_concept']:>8} | {'':>20}"
              f"{row['replay_cloud_share_token']:>6.1%} {row['replay_cloud_share_surface']:>8.1%} "
              f"{row['replay_cloud_share_concept']:>8.1%}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
