#!/usr/bin/env python3
"""Batch invariance of the cloud verifier: does a session get the same answers alone and among N others?

Each session does what the edge does: open with a prompt, append 8 tokens, a check point over them,
a handoff of 4 tokens (greedy), close. For every prompt set, in this order:
  alone:    each of the N sessions on its own, one after the other;
  together: all N at once, concurrently (the scheduler batches their forward passes);
  again:    the first session on its own once more (alone vs alone: nondeterminism without batching).
Per session it compares together with alone: the largest |difference| of P's top-1 log-probability
at the checked positions, at how many of them the top-1 token changed, whether every top-k view
(ids, log-probabilities, the appended tokens' log-probabilities, the generated tokens' views) is
bit-identical, and whether the generated tokens are the same. A table per run, then a verdict line.

Exit status: 0 when nothing differs, or only where deterministic mode is off; 1 when deterministic
mode is on and anything differs; 2 on an error (a model that does not load, a timeout).

    python scripts/batch_invariance.py --model tiny --sessions 4               # tiny Qwen2 (built here), llama.cpp
    python scripts/batch_invariance.py --model qwen2.5-coder-1.5b-instruct-q4_k_m --backend transformers \\
        --device cuda --dtype bfloat16 --sessions 16,64 --json-out out.json
    python scripts/batch_invariance.py --cloud 127.0.0.1:50051 --deterministic on  # a running serve-cloud
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from handoff.cloud.grpc_server import CloudServer
from handoff.cloud.loader import load_backend
from handoff.cloud.settings import CloudSettings
from handoff.edge.cloud_harness import edge_tokens
from handoff.edge.verifier_client import GrpcTransport, VerifierClient
from handoff.shared.cli_options import positive_ints
from handoff.shared.errors import HandoffError
from handoff.shared.logs import setup_logging
from handoff.shared.vocab import Vocabulary
from handoff.shared.wire import pb

logger = logging.getLogger("batch_invariance")

APPEND_TOKENS = 8
HANDOFF_TOKENS = 4

# Varied on purpose: lengths, languages, code, lists, arithmetic; what an edge actually sends.
NATURAL_PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain in two sentences why the sky is blue.",
    "What is 17 times 23? Show your steps.",
    "Sort these words alphabetically: pear, apple, fig, banana, cherry.",
    "Translate to French: The weather is lovely today, let's go for a walk.",
    "Give me three tips for writing clear commit messages.",
    "Summarise the plot of Romeo and Juliet in one paragraph.",
    "Write a haiku about a cat sleeping in the sun.",
    "What is the difference between a list and a tuple in Python?",
    "Write a SQL query that returns the ten most recent orders per customer.",
    "A train leaves at 9:40 and arrives at 13:15. How long is the journey?",
    "Reverse the string 'handoff' and count its vowels.",
    "Explain what a hash table is to a ten-year-old.",
    "Write a bash one-liner that counts the lines of every .py file in a directory.",
    "List the planets of the solar system in order from the sun.",
    "Why does ice float on water?",
    "Write a JavaScript function that debounces another function.",
    "What are the main causes of inflation? Answer briefly.",
    "Convert 72 degrees Fahrenheit to Celsius.",
    "Write a short, polite email declining a meeting invitation.",
    "Describe the rules of tic-tac-toe.",
    "Implement binary search in C and explain its complexity.",
    "Name five animals that live in the Arctic and one fact about each.",
    "What does the `yield` keyword do in Python? Give an example.",
]
# The edge's first tokens of an answer: what is appended and checked after a natural prompt.
OPENERS = [
    "Sure! Here is a clear and simple answer to your question.",
    "Here is a short explanation, step by step, with an example.",
    "Of course. Let me walk you through it in a few lines.",
    "The answer depends on a few things, so let us look at each.",
]


# ---------------------------------------------------------------------------------------------
# Prompts


@dataclass
class Prompt:
    """One session's input: the prompt's token ids and the 8 tokens the edge appends after it."""

    ids: list[int]
    append: list[int]
    text: str = ""


def tiny_model(workdir: Path) -> Path:
    """The tests' tiny Qwen2 GGUF (seed A), written into workdir (its tokenizer is read from the edge model)."""
    from handoff.shared.models import ensure_model
    from handoff.shared.tiny_gguf import SEED_A, extract_tokenizer, write_tiny_qwen2_gguf

    tokenizer = extract_tokenizer(ensure_model("qwen2.5-coder-0.5b-instruct-q4_k_m"))
    return write_tiny_qwen2_gguf(workdir / "tiny-a.gguf", tokenizer, SEED_A)


def tokenizer_path(args: argparse.Namespace, model: str) -> Path:
    """The GGUF whose tokenizer makes the natural prompts: --tokenizer, else the model, else the edge model.

    Args:
        args: the parsed options (`tokenizer`, `cloud`).
        model: the cloud model in use (a path or registry name); ignored with --cloud.

    Returns:
        A local GGUF file.
    """
    from handoff.shared.models import resolve
    from handoff.shared.settings import get_settings

    if args.tokenizer:
        return resolve(args.tokenizer, "edge").path
    if not args.cloud:
        ref = resolve(model, "cloud")
        if ref.kind == "gguf":
            return ref.path
    # The edge tokenizes in the real system, and its model shares P's vocabulary (checked at open).
    return resolve(get_settings().edge_model, "edge").path


def natural_prompts(tokenizer: Path, n: int, template: str) -> list[Prompt]:
    """N prompts from NATURAL_PROMPTS (cycled; later rounds get a system line so no two are the same).

    Args:
        tokenizer: a GGUF whose tokenizer (and chat template, for template="chat") is used.
        n: how many.
        template: "chat" renders each prompt with the model's chat template; "raw" tokenizes the text.

    Returns:
        The prompts, each with 8 tokens of an opener to append.
    """
    from handoff.shared.llama_cpp_model import LlamaCppModel

    prompts = []
    with LlamaCppModel(tokenizer, n_ctx=256, n_threads=1) as model:
        for i in range(n):
            question = NATURAL_PROMPTS[i % len(NATURAL_PROMPTS)]
            rounds = i // len(NATURAL_PROMPTS)
            if template == "chat":
                messages = [{"role": "user", "content": question}]
                if rounds:
                    messages.insert(
                        0, {"role": "system", "content": f"You are helpful assistant number {rounds}."}
                    )
                text = model.chat_prompt(messages)
            else:
                text = question if not rounds else f"Question {rounds}: {question}"
            opener = OPENERS[i % len(OPENERS)]
            append = model.tokenize((" " if template == "raw" else "") + opener)[:APPEND_TOKENS]
            if len(append) < APPEND_TOKENS:
                raise HandoffError(f"the opener {opener!r} is fewer than {APPEND_TOKENS} tokens")
            prompts.append(Prompt(model.tokenize(text), append, text))
    return prompts


def random_prompts(n: int, limit: int, seed: int) -> list[Prompt]:
    """N prompts of uniformly random token ids in [0, limit), 16-96 tokens long, and 8 random tokens each."""
    prompts = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        length = int(rng.integers(16, 97))
        prompts.append(
            Prompt(
                rng.integers(0, limit, size=length).tolist(),
                rng.integers(0, limit, size=APPEND_TOKENS).tolist(),
            )
        )
    return prompts


# ---------------------------------------------------------------------------------------------
# One session, and comparing two of its runs


@dataclass
class Outcome:
    """What P said to one session: the check point's views and the handoff's tokens and views."""

    check_ids: list[list[int]]  # [8][k] P's top-k ids at the checked positions
    check_logprobs: list[list[float]]
    token_logprobs: list[float]  # P's log-probability of each appended token
    generated: list[int]
    generated_ids: list[list[int]]
    generated_logprobs: list[list[float]]
    batch_size: int  # sessions that shared the check point's forward pass
    done: str


async def run_session(client: VerifierClient, vocab: Vocabulary, prompt: Prompt, top_k: int) -> Outcome:
    """Open → append 8 tokens → check point over them → handoff of 4 tokens (greedy) → close."""
    session = await client.open_session(prompt.ids, vocab, top_k=top_k, client="batch-invariance")
    try:
        start = len(prompt.ids)
        await session.append(edge_tokens(start, prompt.append))
        result = await session.check(start, start + len(prompt.append) - 1)
        tokens = [t async for t in session.handoff(HANDOFF_TOKENS)]
        done = pb.HandoffDone.Reason.Name(session.last_handoff.done.reason)
    finally:
        await session.close()
    return Outcome(
        check_ids=[list(s.topk.ids) for s in result.scores],
        check_logprobs=[list(s.topk.logprobs) for s in result.scores],
        token_logprobs=[s.token_logprob for s in result.scores],
        generated=[t.token_id for t in tokens],
        generated_ids=[list(t.topk.ids) for t in tokens],
        generated_logprobs=[list(t.topk.logprobs) for t in tokens],
        batch_size=result.batch_size,
        done=done,
    )


@dataclass
class Comparison:
    """How one session's second run differs from its first (alone)."""

    session: int
    prompt_tokens: int
    max_top1_diff: float  # nats, over the checked positions
    top1_changes: int  # checked positions whose top-1 token differs
    views_equal: bool  # every top-k view (checked and generated) and token log-prob, bit for bit
    tokens_equal: bool  # the generated tokens
    batch_alone: int
    batch_other: int
    tokens_alone: list[int] = field(default_factory=list)
    tokens_other: list[int] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return self.views_equal and self.tokens_equal


def compare(index: int, prompt: Prompt, alone: Outcome, other: Outcome) -> Comparison:
    """Compare two runs of the same session (float32 values from the wire, compared exactly)."""
    top1_a = np.array([lp[0] for lp in alone.check_logprobs], dtype=np.float64)
    top1_b = np.array([lp[0] for lp in other.check_logprobs], dtype=np.float64)
    views_equal = (
        alone.check_ids == other.check_ids
        and alone.check_logprobs == other.check_logprobs
        and alone.token_logprobs == other.token_logprobs
        and alone.generated_ids == other.generated_ids
        and alone.generated_logprobs == other.generated_logprobs
    )
    return Comparison(
        session=index,
        prompt_tokens=len(prompt.ids),
        max_top1_diff=float(np.max(np.abs(top1_a - top1_b))) if len(top1_a) else 0.0,
        top1_changes=sum(a[0] != b[0] for a, b in zip(alone.check_ids, other.check_ids, strict=True)),
        views_equal=views_equal,
        tokens_equal=alone.generated == other.generated,
        batch_alone=alone.batch_size,
        batch_other=other.batch_size,
        tokens_alone=alone.generated,
        tokens_other=other.generated,
    )


# ---------------------------------------------------------------------------------------------
# A run: one prompt set, N sessions, alone / together / again


async def run_set(
    client: VerifierClient, vocab: Vocabulary, prompts: list[Prompt], top_k: int, timeout_s: float
) -> dict:
    """The three phases over `prompts`; per-session comparisons, the repeat's, and timings."""

    async def bounded(coro, what: str):
        try:
            return await asyncio.wait_for(coro, timeout_s)
        except TimeoutError:
            raise HandoffError(f"{what} took longer than {timeout_s:g} s (--timeout)") from None

    t0 = time.perf_counter()

    async def sequential() -> list[Outcome]:
        return [await run_session(client, vocab, p, top_k) for p in prompts]

    alone = await bounded(sequential(), f"{len(prompts)} sessions one after the other")
    t1 = time.perf_counter()
    together = await bounded(
        asyncio.gather(*(run_session(client, vocab, p, top_k) for p in prompts)),
        f"{len(prompts)} concurrent sessions",
    )
    t2 = time.perf_counter()
    again = await bounded(run_session(client, vocab, prompts[0], top_k), "the repeated session")
    rows = [compare(i, p, a, b) for i, (p, a, b) in enumerate(zip(prompts, alone, together, strict=True))]
    repeat = compare(0, prompts[0], alone[0], again)
    return {
        "rows": rows,
        "repeat": repeat,
        "alone_s": t1 - t0,
        "together_s": t2 - t1,
        "max_batch_together": max(o.batch_size for o in together),
    }


def summarize(result: dict) -> dict:
    """The run's counts: sessions that differ, the largest top-1 difference, changed tokens."""
    rows: list[Comparison] = result["rows"]
    return {
        "sessions": len(rows),
        "sessions_differing": sum(not r.identical for r in rows),
        "max_top1_diff": max(r.max_top1_diff for r in rows),
        "top1_changes": sum(r.top1_changes for r in rows),
        "sessions_with_top1_changes": sum(r.top1_changes > 0 for r in rows),
        "views_differing": sum(not r.views_equal for r in rows),
        "tokens_differing": sum(not r.tokens_equal for r in rows),
        "repeat_identical": result["repeat"].identical,
        "repeat_max_top1_diff": result["repeat"].max_top1_diff,
        "max_batch_together": result["max_batch_together"],
        "alone_s": result["alone_s"],
        "together_s": result["together_s"],
        "identical": all(r.identical for r in rows) and result["repeat"].identical,
    }


def print_run(title: str, result: dict) -> None:
    print(f"\n{title}")
    print(
        f"{'session':>7} {'prompt':>6} {'max|Δ top-1|':>13} {'top-1 changed':>13} {'views':>5} {'tokens':>6} "
        f"{'batch':>7}  generated alone → together"
    )
    for r in result["rows"]:
        generated = "same" if r.tokens_equal else f"{r.tokens_alone} → {r.tokens_other}"
        print(
            f"{r.session:>7} {r.prompt_tokens:>6} {r.max_top1_diff:>13.6f} {r.top1_changes:>13} "
            f"{'same' if r.views_equal else 'DIFF':>5} {'same' if r.tokens_equal else 'DIFF':>6} "
            f"{r.batch_alone:>3}/{r.batch_other:<3}  {generated}"
        )
    s = summarize(result)
    rep = result["repeat"]
    print(
        f"repeat (session 0 alone again): {'identical' if rep.identical else 'DIFFERS'}"
        f" (max |Δ top-1| {rep.max_top1_diff:.6f})"
    )
    print(
        f"→ {s['sessions_differing']}/{s['sessions']} sessions differ; max |Δ top-1| {s['max_top1_diff']:.6f} nats; "
        f"top-1 changed at {s['top1_changes']} positions in {s['sessions_with_top1_changes']} sessions; "
        f"generated tokens changed in {s['tokens_differing']}; largest batch together {s['max_batch_together']}; "
        f"alone {s['alone_s']:.2f} s, together {s['together_s']:.2f} s",
        flush=True,
    )


# ---------------------------------------------------------------------------------------------
# Servers and the whole measurement


def prompt_sets(
    args: argparse.Namespace, n: int, natural: list[Prompt], limit: int
) -> dict[str, list[Prompt]]:
    """The prompt sets of one run of n sessions: the first n natural prompts and/or n random ones."""
    sets = {}
    if args.prompts in ("natural", "both"):
        sets["natural"] = natural[:n]
    if args.prompts in ("random", "both"):
        sets["random"] = random_prompts(n, limit, args.seed)
    return sets


async def measure(
    client: VerifierClient, vocab: Vocabulary, info: pb.ServiceInfo, args: argparse.Namespace, mode: str,
    natural: list[Prompt],
) -> list[dict]:  # fmt: skip
    """Every (sessions, prompt set) run against one server; printed as it goes."""
    # Random ids stay within both vocabularies (the model's may be padded past its tokenizer's).
    limit = min(len(vocab), info.vocab_size)
    runs = []
    for n in args.sessions:
        for name, prompts in prompt_sets(args, n, natural, limit).items():
            title = (
                f"deterministic {mode} · {name} prompts"
                + (f" ({args.template})" if name == "natural" else "")
                + f" · {n} sessions · {info.backend} on {info.device}, {info.dtype}"
            )
            result = await run_set(client, vocab, prompts, args.top_k, args.timeout)
            print_run(title, result)
            runs.append(
                {
                    "deterministic": mode,
                    "prompts": name,
                    "template": args.template if name == "natural" else None,
                    "sessions": n,
                    "summary": summarize(result),
                    "rows": [asdict(r) | {"identical": r.identical} for r in result["rows"]],
                    "repeat": asdict(result["repeat"]) | {"identical": result["repeat"].identical},
                }
            )
    return runs


def context_needed(natural: list[Prompt]) -> int:
    """Tokens per session the in-process server must allow: the longest prompt, 8 appended, 4 generated."""
    longest = max([96, *(len(p.ids) for p in natural)])  # 96: the longest random prompt
    return longest + APPEND_TOKENS + HANDOFF_TOKENS + 16


async def in_process(
    args: argparse.Namespace, model: str, mode: str, natural: list[Prompt]
) -> tuple[dict, list]:
    """Start a verifier on 127.0.0.1:<free port> with deterministic on or off, measure, stop it."""
    settings = CloudSettings(
        model=model, backend=args.backend, device=args.device, dtype=args.dtype, threads=args.threads,
        host="127.0.0.1", port=0, max_sessions=max(args.sessions), max_batch_items=max(args.sessions),
        max_context=context_needed(natural), max_message_bytes=64 << 20, grace_s=1.0,
        deterministic=mode == "on",
    )  # fmt: skip
    server = CloudServer(settings, lambda: load_backend(settings))
    try:
        try:
            await asyncio.wait_for(server.start(), args.load_timeout)
        except TimeoutError:
            raise HandoffError(
                f"the model did not load within {args.load_timeout:g} s (--load-timeout)"
            ) from None
        client = VerifierClient(
            GrpcTransport(f"127.0.0.1:{server.port}", max_message_bytes=64 << 20, timeout_s=30)
        )
        try:
            info = server.service.get_info()
            backend = server.backend
            meta = {
                "model": info.model_id, "backend": info.backend, "device": info.device, "dtype": info.dtype,
                "deterministic_requested": mode == "on",
                "deterministic_backend": getattr(backend, "deterministic", None),
            }  # fmt: skip
            print(f"\nserver: {info.model_name} ({info.model_id}), {info.backend} on {info.device}, {info.dtype}, "
                  f"deterministic {mode} (backend reports {meta['deterministic_backend']})", flush=True)  # fmt: skip
            runs = await measure(client, backend.vocabulary, info, args, mode, natural)
        finally:
            await client.close()
    finally:
        await server.stop(grace=0.5)
    return meta, runs


async def remote(
    args: argparse.Namespace, mode: str, tokenizer: Path, natural: list[Prompt]
) -> tuple[dict, list]:
    """Measure a running verifier at --cloud; `mode` is what the user says it runs (it is not reported)."""
    from handoff.edge.cloud_harness import vocabulary_of

    vocab = vocabulary_of(tokenizer)
    token = args.auth_token or os.environ.get("HANDOFF_CLOUD_AUTH_TOKEN")
    client = VerifierClient(
        GrpcTransport(args.cloud, auth_token=token, max_message_bytes=64 << 20, timeout_s=30)
    )
    try:
        info = await asyncio.wait_for(client.check_vocabulary(vocab), 60)
        meta = {"model": info.model_id, "backend": info.backend, "device": info.device, "dtype": info.dtype,
                "cloud": args.cloud, "deterministic_requested": mode == "on",
                "deterministic_backend": info.deterministic}  # fmt: skip
        if info.deterministic != (mode == "on"):  # GetInfo says which mode the server runs
            raise HandoffError(
                f"the server at {args.cloud} runs deterministic {'on' if info.deterministic else 'off'}, "
                f"but --deterministic {mode} was asked for"
            )
        print(f"\nserver at {args.cloud}: {info.model_name} ({info.model_id}), {info.backend} on {info.device}, "
              f"{info.dtype}; deterministic {mode} (as the server reports)", flush=True)  # fmt: skip
        if info.limits.max_sessions and info.limits.max_sessions < max(args.sessions):
            raise HandoffError(
                f"the server allows {info.limits.max_sessions} sessions; --sessions asks for {max(args.sessions)}"
            )
        runs = await measure(client, vocab, info, args, mode, natural)
    finally:
        await client.close()
    return meta, runs


def verdict(runs: list[dict]) -> tuple[str, bool]:
    """The verdict line, and whether it fails (deterministic on and anything different)."""
    parts, failed = [], False
    for mode in ("on", "off"):
        mine = [r["summary"] for r in runs if r["deterministic"] == mode]
        if not mine:
            continue
        sessions = sum(s["sessions"] for s in mine)
        differing = sum(s["sessions_differing"] for s in mine)
        repeats_ok = all(s["repeat_identical"] for s in mine)
        if differing == 0 and repeats_ok:
            parts.append(f"deterministic {mode}: identical in all {sessions} sessions and the repeats")
            continue
        failed |= mode == "on"
        parts.append(
            f"deterministic {mode}: {differing}/{sessions} sessions differ "
            f"(max |Δ top-1| {max(s['max_top1_diff'] for s in mine):.3g} nats, "
            f"top-1 changed in {sum(s['sessions_with_top1_changes'] for s in mine)}, "
            f"generated tokens changed in {sum(s['tokens_differing'] for s in mine)}"
            + ("" if repeats_ok else "; even a session alone twice differs")
            + ")"
        )
    return ("FAIL — " if failed else "OK — ") + "; ".join(parts), failed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_argument_group("the verifier: started here (default), or a running one")
    where.add_argument(
        "--model", default="tiny", help="`tiny` (built here), a registry name, a GGUF path or a HF directory"
    )
    where.add_argument("--backend", default="auto", choices=["auto", "transformers", "llama.cpp"])
    where.add_argument("--device", default="auto", help="transformers: auto, cpu, cuda, cuda:N")
    where.add_argument("--dtype", default="auto", help="transformers: auto, float32, bfloat16, float16")
    where.add_argument("--threads", type=int, default=2, help="CPU threads for the model")
    where.add_argument(
        "--deterministic", choices=["on", "off", "both"],
        help="the server's deterministic mode (default: both here; with --cloud, on, checked against GetInfo)",
    )  # fmt: skip
    where.add_argument("--cloud", metavar="HOST:PORT", help="measure a running `handoff serve-cloud` instead")
    where.add_argument("--auth-token", help="with --cloud: bearer token (default: $HANDOFF_CLOUD_AUTH_TOKEN)")
    what = parser.add_argument_group("the measurement")
    what.add_argument(
        "--sessions", type=positive_ints, default=[16], help="sessions at once, e.g. 16 or 16,64"
    )
    what.add_argument("--prompts", choices=["natural", "random", "both"], default="both")
    what.add_argument(
        "--template",
        choices=["chat", "raw"],
        default="chat",
        help="natural prompts: chat-templated or raw text",
    )
    what.add_argument(
        "--tokenizer",
        help="GGUF (path or registry name) for natural prompts (default: the model, else the edge model)",
    )
    what.add_argument("--top-k", type=int, default=20, help="k of P's views")
    what.add_argument("--seed", type=int, default=0, help="of the random-token prompts")
    what.add_argument(
        "--timeout", type=float, default=600, help="seconds each phase (alone, together, again) may take"
    )
    what.add_argument("--load-timeout", type=float, default=900, help="seconds the model may take to load")
    what.add_argument("--json-out", type=Path, help="also write everything here")
    args = parser.parse_args(argv)
    if args.cloud:
        if args.deterministic == "both":
            parser.error("--deterministic both needs a server started here: a running one has one mode")
        args.deterministic = args.deterministic or "on"
    else:
        args.deterministic = args.deterministic or "both"
    return args


async def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    modes = ["on", "off"] if args.deterministic == "both" else [args.deterministic]
    results: dict = {"sessions": args.sessions, "prompts": args.prompts, "template": args.template,
                     "append_tokens": APPEND_TOKENS, "handoff_tokens": HANDOFF_TOKENS, "top_k": args.top_k,
                     "servers": [], "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        model = "" if args.cloud else str(tiny_model(Path(tmp))) if args.model == "tiny" else args.model
        needs_tokenizer = args.cloud or args.prompts != "random"  # --cloud: its vocabulary comes from it
        tokenizer = tokenizer_path(args, model) if needs_tokenizer else None
        natural = []
        if args.prompts != "random":
            natural = natural_prompts(tokenizer, max(args.sessions), args.template)
        if args.cloud:
            meta, runs = await remote(args, args.deterministic, tokenizer, natural)
            results["servers"].append(meta)
            results["runs"].extend(runs)
        else:
            for mode in modes:
                meta, runs = await in_process(args, model, mode, natural)
                results["servers"].append(meta)
                results["runs"].extend(runs)
    line, failed = verdict(results["runs"])
    results["verdict"] = line
    results["failed"] = failed
    print(f"\nverdict: {line}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    setup_logging("WARNING")
    try:
        sys.exit(asyncio.run(main()))
    except HandoffError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # exit 1 means "deterministic and different": anything unexpected is 2
        traceback.print_exc()
        sys.exit(2)
