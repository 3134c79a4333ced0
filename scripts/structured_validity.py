#!/usr/bin/env python3
"""Structured output on the default pair through `handoff serve-edge`, with the official client.

For each policy (a serve-edge process each, embedded verifier, 127.0.0.1 only) it asks for JSON with
`response_format` json_object and json_schema over several schemas and prompts, sampled with seeds,
and checks every answer: it parses (json_object) and validates (jsonschema). Prints a table and
writes the counts, the token sources and the finish reasons as JSON.

    .venv/bin/python scripts/structured_validity.py --runs 5 --out docs/structured_validity_default_pair.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import jsonschema
import openai

from handoff.edge.cloud_harness import wait_for_line

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 130}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
LANGUAGE = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "year": {"type": "integer"},
        "paradigms": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
        "typed": {"enum": ["static", "dynamic"]},
    },
    "required": ["name", "year", "paradigms", "typed"],
    "additionalProperties": False,
}
FUNCTION = {
    "type": "object",
    "properties": {
        "signature": {"type": "string"},
        "returns": {"type": "string"},
        "complexity": {"enum": ["O(1)", "O(log n)", "O(n)", "O(n log n)", "O(n^2)"]},
        "tests": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"input": {"type": "string"}, "expected": {"type": "string"}},
                "required": ["input", "expected"],
                "additionalProperties": False,
            },
            "maxItems": 3,
        },
    },
    "required": ["signature", "returns", "complexity", "tests"],
    "additionalProperties": False,
}
CASES = [
    ("json_object", None, "Describe the planet Mars as a JSON object."),
    ("json_schema", PERSON, "Give a famous scientist as JSON."),
    ("json_schema", LANGUAGE, "Describe the Python language as JSON."),
    ("json_schema", FUNCTION, "Describe a Python function that reverses a list, as JSON."),
    ("json_object", None, "List three fruits and their colours as a JSON object."),
]


def start(policy: str, threads: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, COLUMNS="300", HANDOFF_THREADS=str(threads))
    argv = [
        sys.executable,
        "-m",
        "handoff",
        "serve-edge",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--policy",
        policy,
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    found = wait_for_line(proc, r"at (http://\S+/v1) ", 900)
    if found is None:
        proc.kill()
        sys.exit(f"serve-edge --policy {policy} did not start")
    return proc, found.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policies", default="rollback,exact")
    parser.add_argument("--runs", type=int, default=5, help="seeds per case and policy")
    parser.add_argument("--max-tokens", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    results = []
    for policy in args.policies.split(","):
        proc, base_url = start(policy, args.threads)
        try:
            with openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=900) as client:
                model = client.models.list().data[0].id
                for i, (kind, schema, prompt) in enumerate(CASES):
                    fmt = {"type": kind}
                    if schema is not None:
                        fmt["json_schema"] = {"name": f"case{i}", "schema": schema, "strict": True}
                    for seed in range(args.runs):
                        t0 = time.perf_counter()
                        r = client.chat.completions.create(
                            model=model, messages=[{"role": "user", "content": prompt}], response_format=fmt,
                            max_tokens=args.max_tokens, temperature=0.7, seed=seed,
                        )  # fmt: skip
                        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
                        try:
                            value = json.loads(text)
                            if schema is not None:
                                jsonschema.validate(value, schema)
                            elif not isinstance(value, dict):
                                raise ValueError("not an object")
                            valid = True
                        except (ValueError, jsonschema.ValidationError):
                            valid = False
                        ext = r.model_extra["handoff"]
                        results.append({
                            "policy": policy, "case": i, "kind": kind, "seed": seed, "valid": valid,
                            "finish": finish, "tokens": r.usage.completion_tokens,
                            "by_source": ext["by_source"], "seconds": round(time.perf_counter() - t0, 2),
                        })  # fmt: skip
                        print(f"{policy:8} case {i} seed {seed}: {'valid' if valid else 'INVALID'} "
                              f"({finish}, {r.usage.completion_tokens} tokens, {ext['by_source']})", flush=True)  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)

    print()
    print(f"{'policy':10}{'answers':>8}{'valid':>7}{'stop':>6}{'edge':>7}{'cloud':>7}{'corrected':>11}")
    summary = {}
    for policy in args.policies.split(","):
        rows = [r for r in results if r["policy"] == policy]
        sources = Counter()
        for r in rows:
            sources.update(r["by_source"])
        summary[policy] = {
            "answers": len(rows),
            "valid": sum(r["valid"] for r in rows),
            "finished": sum(r["finish"] == "stop" for r in rows),
            "tokens_by_source": dict(sources),
        }
        s = summary[policy]
        print(f"{policy:10}{s['answers']:>8}{s['valid']:>7}{s['finished']:>6}{sources['edge']:>7}"
              f"{sources['cloud']:>7}{sources['corrected']:>11}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "results": results, "cases": [
            {"kind": k, "schema": s, "prompt": p} for k, s, p in CASES]}, indent=1) + "\n")  # fmt: skip
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
