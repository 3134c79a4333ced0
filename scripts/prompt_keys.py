"""Add prompt keys to result rows written before `handoff eval` recorded them.

The report groups tasks that share a prompt (one greedy generation per run, however many unit tests
check it): its bootstrap draws whole prompts, and it prints RPI per prompt. Rows written before
the `prompt_key` field take it here from a trace of the same tasks: the traces' generation headers
hold each task's prompt token ids, hashed as the runner hashes them (runner.prompt_key).

    python scripts/prompt_keys.py runs/router_test/results.jsonl --traces docs/router/eval/traces/large.jsonl.gz
    handoff eval --out runs/router_test --report-only

Rows whose task no trace covers are left as they are (the report then takes all tasks as
independent); a task whose traces disagree on its prompt is an error.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

from handoff.edge.evaluation.runner import prompt_key


def task_prompts(traces: list[Path]) -> dict[str, str]:
    """task id -> prompt key, from the generation headers of the traces."""
    keys: dict[str, str] = {}
    for path in traces:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if '"record": "generation"' not in line[:40]:
                    continue
                head = json.loads(line)
                key = prompt_key(head["prompt_ids"])
                if keys.setdefault(head["task_id"], key) != key:
                    raise SystemExit(f"{path}: task {head['task_id']} has two prompts in the traces")
    return keys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, nargs="+", help="results.jsonl files, rewritten in place")
    ap.add_argument("--traces", type=Path, nargs="+", required=True, help="traces covering their tasks")
    args = ap.parse_args(argv)
    keys = task_prompts(args.traces)
    for path in args.results:
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(x) for x in lines if x.strip()]
        added = missing = 0
        for r in rows:
            key = keys.get(r["task_id"])
            if key is None:
                missing += 1
            elif r.get("prompt_key") not in (None, key):
                raise SystemExit(f"{path}: task {r['task_id']} already has another prompt key")
            elif r.get("prompt_key") is None:
                r["prompt_key"], added = key, added + 1
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        distinct = len({r["prompt_key"] for r in rows if r.get("prompt_key")})
        print(f"{path}: {added} rows keyed, {missing} without a trace; {distinct} distinct prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
