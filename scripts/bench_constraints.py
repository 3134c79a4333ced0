#!/usr/bin/env python3
"""What a constraint (shared/constraints.py) costs per token on the edge and in the cloud, side by side.

One run, on the default models, everything greedy:

  one-time:  the grammar engine's tokenizer of each GGUF (grammar_tokenizer, first call) and, per
             grammar, building its text, compiling it (ConstraintState construction) and the first mask;
  edge:      EdgeRunner.step() on the 0.5B (n_threads 2) for up to --tokens tokens of a chat prompt that
             asks for JSON: unconstrained, then under (a) JSON mode (json_object_grammar), (b) a JSON
             schema, (c) frequency/presence penalties and a logit bias only, (d) the tool-call grammar
             plan_tools builds (tool_choice auto; its own prompt, with the tools rendered, and its own
             unconstrained baseline). Rounds alternate the cases; ms/token is the median over rounds of
             the steps' own wall time (EdgeStep.seconds, prefill excluded). Then the overhead split:
             each constrained run's tokens are replayed through a fresh ConstraintState with the real
             float32 [V] logits Q had at each position (recorded in an untimed first round), timing
             per token row() (the grammar's mask, its unpacking to bool [V], the sparse bias),
             adjust_logits(), accept(), and what the -inf entries add to logits_view (its masked-row
             fallback), as % of the unconstrained decode step;
  cloud:     the 1.5B on the llama.cpp backend (the service's defaults: deterministic, "single" path,
             2 threads). For the same completions: the real [n, V] logits of a one-token decode (a cloud
             token, full_last) and of 8-token check windows (gather: the token and Q's top-k), from the
             backend's decode; views_from_logits(logits, item) timed with and without item.adjust; the
             service's per-token ConstraintState.row() + accept() (VerifierService._constrain) on the
             cloud's own grammar tokenizer; against the measured forward time per token (the median
             decode over every case's positions, plus the views). The 8-token window is also measured
             with deterministic off (one batched llama_decode per window), where a forward is cheaper
             per token. Other processes' share of the CPU is recorded per phase (contention).

    .venv/bin/python scripts/bench_constraints.py                       # ~5 min on 2 cores
    .venv/bin/python scripts/bench_constraints.py --tokens 96 --rounds 3 --json-out docs/bench_constraints_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_grammar import machine  # scripts/ is on the path when a script in it runs

ROOT = Path(__file__).resolve().parent.parent
MODELS = Path.home() / ".cache/handoff/models"
EDGE_GGUF = MODELS / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
CLOUD_GGUF = MODELS / "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
TARGET_PCT = 5.0
K = 20  # the top-k of the views (the edge's default k and the policy's default top_k)
WINDOW = 8

BOOK_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "author": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "born": {"type": "integer"}},
            "required": ["name", "born"],
            "additionalProperties": False,
        },
        "year": {"type": "integer", "minimum": 1450, "maximum": 2100},
        "genres": {
            "type": "array",
            "items": {"enum": ["fiction", "science fiction", "fantasy", "mystery", "history", "biography"]},
            "minItems": 1,
            "maxItems": 3,
        },
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
        "available": {"type": "boolean"},
    },
    "required": ["title", "author", "year", "genres", "rating", "available"],
    "additionalProperties": False,
}

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city, e.g. Paris"},
                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                },
                "required": ["city", "unit"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_flights",
            "description": "Search flights between two airports on a date.",
            "parameters": {
                "type": "object",
                "properties": {
                    "origin": {"type": "string", "description": "IATA code"},
                    "destination": {"type": "string", "description": "IATA code"},
                    "date": {"type": "string", "description": "YYYY-MM-DD"},
                    "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["origin", "destination", "date"],
            },
        },
    },
]

JSON_MESSAGES = [
    {
        "role": "system",
        "content": "You are a helpful assistant. Answer with a single JSON object and nothing else.",
    },
    {
        "role": "user",
        "content": "Describe a classic science fiction novel as a JSON object with the fields title, "
        "author (name, born), year, genres (a list), rating (0 to 5) and available (true or false).",
    },
]
TOOL_MESSAGES = [{"role": "user", "content": "What is the weather in Paris right now, in celsius?"}]


def _ms(seconds: list[float]) -> dict[str, float]:
    """mean, p50, p99 and max of per-token times, in ms."""
    a = np.asarray(seconds, dtype=np.float64) * 1e3
    if not a.size:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {
        "mean": round(float(a.mean()), 4),
        "p50": round(float(np.percentile(a, 50)), 4),
        "p99": round(float(np.percentile(a, 99)), 4),
        "max": round(float(a.max()), 4),
    }


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _pct(part_ms: float, whole_ms: float) -> float:
    return round(100.0 * part_ms / whole_ms, 2)


def _cpu() -> tuple[float, float, float]:
    """(the machine's busy CPU seconds, this process's CPU seconds, wall seconds), for others_cpu_pct."""
    busy = 0.0
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return busy, t.user + t.system, time.perf_counter()


def _others_cpu_pct(before: tuple[float, float, float]) -> float:
    """Share of the machine's CPU that other processes used since `before` (contention), in %."""
    busy, own, wall = _cpu()
    return round(
        100.0
        * max(0.0, (busy - before[0]) - (own - before[1]))
        / ((wall - before[2]) * (os.cpu_count() or 1)),
        1,
    )


def _machine() -> dict[str, Any]:
    import importlib.metadata as md

    return {
        **machine(),  # scripts/bench_grammar.py's: the CPU, cores, OS, Python, numpy
        "gpu": None,
        "llguidance": md.version("llguidance"),
        "llama_cpp_python": md.version("llama-cpp-python"),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# ---------------------------------------------------------------------------------------------
# Edge


def _generate(runner, prompt: list[int], constraint, n: int, record: bool) -> dict[str, Any]:
    """Greedy steps until a stop token or n tokens; with `record`, Q's raw logits and top-k per position."""
    from handoff.shared.sampling import SamplingSettings

    runner.start(prompt, SamplingSettings(), constraint)
    tokens, secs, logits, topk = [], [], [], []
    for _ in range(n):
        if record:
            logits.append(runner.model.next_logits())  # raw float32 [V] (a copy), before the constraint
        s = runner.step()
        tokens.append(s.token_id)
        secs.append(s.seconds)
        if record:
            topk.append(np.asarray(s.topk_ids).copy())
        if s.token_id in runner.stop_token_ids:
            break
    return {"tokens": tokens, "seconds": secs, "logits": logits, "topk": topk}


def _replay_edge(
    constraint, tokenizer, tokens: list[int], logits: list[np.ndarray]
) -> dict[str, list[float]]:
    """Per-token times of what the runner adds under a constraint, on the tokens of a constrained run."""
    from handoff.shared.constraints import ConstraintState, adjust_logits
    from handoff.shared.divergence import logits_view

    state = ConstraintState(constraint, tokenizer)
    out: dict[str, list[float]] = {"row": [], "adjust": [], "accept": [], "view_raw": [], "view_adjusted": []}
    out["allowed"] = []
    for tok, x in zip(tokens, logits, strict=True):
        t0 = time.perf_counter()
        row = state.row()
        out["allowed"].append(x.size if row.allowed is None else int(row.allowed[: x.size].sum()))
        t1 = time.perf_counter()
        y = adjust_logits(x, row)
        t2 = time.perf_counter()
        state.accept(tok)
        t3 = time.perf_counter()
        logits_view(x, K)
        t4 = time.perf_counter()
        logits_view(y, K)
        t5 = time.perf_counter()
        for name, dt in zip(list(out)[:5], (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            out[name].append(dt)
    return out


def _text(runner, tokens: list[int]) -> str:
    body = [t for t in tokens if t not in runner.stop_token_ids]
    return runner.detokenize(body).decode("utf-8", errors="replace")


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def bench_edge(args, cases: dict[str, dict[str, Any]], one_time: dict[str, Any]) -> dict[str, Any]:
    from handoff.edge.runner import EdgeRunner
    from handoff.edge.tools import CALL_CLOSE, CALL_OPEN, parse_tool_calls, plan_tools
    from handoff.shared.constraints import (
        Constraint,
        ConstraintState,
        grammar_tokenizer,
        json_object_grammar,
        json_schema_grammar,
        unpack_mask,
    )

    runner = EdgeRunner(args.edge_model, n_threads=args.threads, k=K)
    stops = sorted(runner.stop_token_ids)
    tokenizer, dt = _timed(lambda: grammar_tokenizer(runner.model.path, stops))
    _, dt2 = _timed(lambda: grammar_tokenizer(runner.model.path, stops))
    one_time["grammar_tokenizer_edge_first_ms"] = round(dt * 1e3, 1)
    one_time["grammar_tokenizer_edge_cached_ms"] = round(dt2 * 1e3, 4)
    one_time["mask_width"] = int(tokenizer.vocab_size)
    words = np.full(-(-int(tokenizer.vocab_size) // 32), -1, dtype=np.int32)
    unpack = [_timed(lambda: unpack_mask(words, int(tokenizer.vocab_size)))[1] for _ in range(200)]
    one_time["unpack_mask_alone_ms_p50"] = round(float(np.median(unpack)) * 1e3, 4)

    markers = (runner.model.token_id(CALL_OPEN), runner.model.token_id(CALL_CLOSE))
    json_prompt = runner.model.tokenize(runner.model.chat_prompt(JSON_MESSAGES))
    ban = sorted({t for s in ("```", "```json", " ```") for t in runner.model.tokenize(s)[:1]})
    grammars: dict[str, tuple[Callable[[], str], list[int]]] = {
        "json_object": (json_object_grammar, json_prompt),
        "json_schema": (lambda: json_schema_grammar(BOOK_SCHEMA), json_prompt),
    }
    plan = plan_tools(TOOLS, "auto", None, markers)
    assert plan is not None and plan.tools is not None
    tool_prompt = runner.model.tokenize(runner.model.chat_prompt(TOOL_MESSAGES, tools=plan.tools))
    for choice in ("auto", "required"):
        grammars[f"tool_call_{choice}"] = (
            lambda c=choice: plan_tools(TOOLS, c, None, markers).grammar,
            tool_prompt,
        )

    # One-time, per grammar: its text, compiling it (ConstraintState), the first mask.
    compile_costs = {}
    built: dict[str, str] = {}
    for name, (make, _) in grammars.items():
        texts, t_build, t_compile, t_first = [], [], [], []
        for _ in range(args.compile_repeats):
            g, dt = _timed(make)
            texts.append(g)
            t_build.append(dt)
            state, dt = _timed(lambda g=g: ConstraintState(Constraint(grammar=g), tokenizer))
            t_compile.append(dt)
            _, dt = _timed(state.row)
            t_first.append(dt)
        built[name] = texts[0]
        compile_costs[name] = {
            "grammar_chars": len(texts[0]),
            "build_grammar_ms": {
                "first": round(t_build[0] * 1e3, 3),
                "median": round(np.median(t_build) * 1e3, 3),
            },
            "compile_ms": {
                "first": round(t_compile[0] * 1e3, 3),
                "median": round(np.median(t_compile) * 1e3, 3),
            },
            "first_mask_ms": {
                "first": round(t_first[0] * 1e3, 3),
                "median": round(np.median(t_first) * 1e3, 3),
            },
        }
    one_time["per_grammar_edge_tokenizer"] = compile_costs

    brace = runner.model.tokenize("{")[0]
    penalties = Constraint.build(
        frequency_penalty=0.5, presence_penalty=0.3, logit_bias={t: -100.0 for t in ban} | {brace: 1.0}
    )
    specs: dict[str, tuple[list[int], Constraint | None, str]] = {
        "unconstrained": (json_prompt, None, "unconstrained"),
        "json_object": (json_prompt, Constraint(grammar=built["json_object"]), "unconstrained"),
        "json_schema": (json_prompt, Constraint(grammar=built["json_schema"]), "unconstrained"),
        "penalties_logit_bias": (json_prompt, penalties, "unconstrained"),
        "unconstrained_tools_prompt": (tool_prompt, None, "unconstrained_tools_prompt"),
        "tool_call_auto": (
            tool_prompt,
            Constraint(grammar=built["tool_call_auto"]),
            "unconstrained_tools_prompt",
        ),
        "tool_call_required": (
            tool_prompt,
            Constraint(grammar=built["tool_call_required"]),
            "unconstrained_tools_prompt",
        ),
    }
    cases["_specs"], cases["_stops"] = specs, stops
    print(f"edge: {len(json_prompt)}-token JSON prompt, {len(tool_prompt)}-token tools prompt; banned {ban}")

    # Round 0: untimed, records Q's raw logits for the replay. Then timed rounds, cases alternating.
    per_round: dict[str, list[float]] = {name: [] for name in specs}
    steps: dict[str, list[float]] = {name: [] for name in specs}
    others = []
    for rnd in range(args.rounds + 1):
        before = _cpu()
        for name, (prompt, constraint, _) in specs.items():
            r = _generate(runner, prompt, constraint, args.tokens, record=rnd == 0)
            if rnd == 0:
                cases[name] = {"prompt_tokens": len(prompt), "first": r}
            else:
                if r["tokens"] != cases[name]["first"]["tokens"]:
                    cases[name]["tokens_differ_between_rounds"] = True
                per_round[name].append(float(np.mean(r["seconds"])) * 1e3)
                steps[name].extend(r["seconds"])
            print(
                f"  round {rnd} {name:28s} {len(r['tokens']):3d} tokens {np.mean(r['seconds']) * 1e3:7.2f} ms/token"
            )
        others.append(_others_cpu_pct(before))
        print(f"  round {rnd}: other processes used {others[-1]:.0f} % of the CPU")

    result: dict[str, Any] = {
        "model": Path(args.edge_model).name,
        "n_threads": args.threads,
        "k": K,
        "others_cpu_pct_per_round": others,
        "cases": {},
    }
    for name, (_, constraint, base) in specs.items():
        first = cases[name]["first"]
        text = _text(runner, first["tokens"])
        ms = statistics.median(per_round[name])
        base_ms = statistics.median(per_round[base])
        entry: dict[str, Any] = {
            "prompt_tokens": cases[name]["prompt_tokens"],
            "tokens": len(first["tokens"]),
            "ended_with_stop_token": bool(first["tokens"]) and first["tokens"][-1] in runner.stop_token_ids,
            "ms_per_token_rounds": [round(x, 3) for x in per_round[name]],
            "ms_per_token": round(ms, 3),
            "step_ms_p50": round(float(np.median(steps[name])) * 1e3, 3),
            "baseline": base,
            "end_to_end_overhead_pct": _pct(ms - base_ms, base_ms),
            "text": text,
            "parses_as_json": _parses(text),
        }
        if name.startswith("unconstrained_tools") or name.startswith("tool_call"):
            entry["tool_calls"] = [c["function"] for c in parse_tool_calls(text)[1]]
        if cases[name].get("tokens_differ_between_rounds"):
            entry["tokens_differ_between_rounds"] = True
        if constraint is not None:
            reps = [
                _replay_edge(
                    constraint, tokenizer if constraint.grammar else None, first["tokens"], first["logits"]
                )
                for _ in range(args.replays)
            ]
            split = {}
            for part in ("row", "adjust", "accept", "view_raw", "view_adjusted"):
                means = [float(np.mean(rep[part])) * 1e3 for rep in reps]
                best = reps[int(np.argsort(means)[len(means) // 2])][part]  # the median replay's distribution
                split[part] = _ms(best) | {"mean": round(statistics.median(means), 4)}
            allowed = np.asarray(reps[0]["allowed"])
            few = allowed < K  # the top-k of logits_view then searches the whole row (-inf ties)
            extra = np.median([np.subtract(r["view_adjusted"], r["view_raw"]) for r in reps], axis=0) * 1e3
            entry["allowed_ids"] = {
                "p50": int(np.median(allowed)),
                "min": int(allowed.min()),
                f"positions_below_k_{K}": int(few.sum()),
                "view_extra_ms_below_k": round(float(extra[few].mean()), 4) if few.any() else None,
                "view_extra_ms_at_least_k": round(float(extra[~few].mean()), 4) if (~few).any() else None,
            }
            view_extra = max(0.0, split["view_adjusted"]["mean"] - split["view_raw"]["mean"])
            total = split["row"]["mean"] + split["adjust"]["mean"] + split["accept"]["mean"] + view_extra
            entry["replay_ms_per_token"] = split
            entry["overhead_pct_of_unconstrained_step"] = {
                "baseline_ms": round(base_ms, 3),
                "row": _pct(split["row"]["mean"], base_ms),
                "adjust_logits": _pct(split["adjust"]["mean"], base_ms),
                "accept": _pct(split["accept"]["mean"], base_ms),
                "view_extra": _pct(view_extra, base_ms),
                "total": _pct(total, base_ms),
                "total_ms": round(total, 4),
                "row_p99": _pct(split["row"]["p99"], base_ms),
                "meets_target": _pct(total, base_ms) <= TARGET_PCT,
            }
        result["cases"][name] = entry
    runner.close()
    return result


# ---------------------------------------------------------------------------------------------
# Cloud


def _cloud_logits(backend, seq, prompt: list[int], completion: list[int], window: int):
    """Real logits and decode times: one token per decode, then `window` tokens per decode.

    Row j of either predicts completion[j]. The sequence holds prompt[:-1] on entry and on exit.
    Returns ([logits [1, V] per token], [seconds per token decode], [logits [w, V] per full window],
    [seconds per window]).
    """
    from handoff.cloud.backend import ForwardItem

    feed = [prompt[-1], *completion[:-1]]
    base = len(prompt) - 1
    singles, single_s = [], []
    for tok in feed:
        (lg,), dt = _timed(
            lambda tok=tok: backend._decode_items([ForwardItem(seq, [tok], 1, K)], read_logits=True)
        )
        singles.append(lg)
        single_s.append(dt)
    backend.truncate(seq, base)
    windows, window_s = [], []
    for start in range(0, len(feed) - window + 1, window):
        chunk = feed[start : start + window]
        (lg,), dt = _timed(
            lambda c=chunk: backend._decode_items([ForwardItem(seq, c, len(c), K)], read_logits=True)
        )
        windows.append(lg)
        window_s.append(dt)
    backend.truncate(seq, base)
    return singles, single_s, windows, window_s


def _time_views(logits: np.ndarray, item_plain, item_adjusted, repeats: int) -> dict[str, float]:
    """Median seconds of views_from_logits without and with the item's adjust, and the parts of the latter.

    "adjust_rows": the adjustment alone (shared.constraints.adjust_rows); "views_of_adjusted": the views
    (log-softmax, top-k, gathers) of the already adjusted logits, which have -inf at the masked ids.
    """
    from handoff.cloud.backend import views_from_logits
    from handoff.shared.constraints import adjust_rows

    adjusted_logits = adjust_rows(logits, item_adjusted.adjust)
    t: dict[str, list[float]] = {"plain": [], "adjusted": [], "adjust_rows": [], "views_of_adjusted": []}
    for _ in range(repeats):
        t["plain"].append(_timed(lambda: views_from_logits(logits, item_plain))[1])
        t["adjusted"].append(_timed(lambda: views_from_logits(logits, item_adjusted))[1])
        t["adjust_rows"].append(_timed(lambda: adjust_rows(logits, item_adjusted.adjust))[1])
        t["views_of_adjusted"].append(_timed(lambda: views_from_logits(adjusted_logits, item_plain))[1])
    return {name: float(np.median(v)) for name, v in t.items()}


def _views_summary(timings: list[dict[str, float]], n_rows: int, few: np.ndarray) -> dict[str, Any]:
    """Mean ms per call of each timing, the adjustment's extra per call and per row, split by mask density."""
    mean = {name: float(np.mean([t[name] for t in timings])) * 1e3 for name in timings[0]}
    extra = np.array([t["adjusted"] - t["plain"] for t in timings]) * 1e3
    return {
        "views_ms": round(mean["plain"], 4),
        "views_adjusted_ms": round(mean["adjusted"], 4),
        "adjust_rows_ms": round(mean["adjust_rows"], 4),
        "views_of_adjusted_logits_ms": round(mean["views_of_adjusted"], 4),
        "adjust_extra_ms": round(mean["adjusted"] - mean["plain"], 4),
        "adjust_extra_ms_per_row": round((mean["adjusted"] - mean["plain"]) / n_rows, 4),
        f"adjust_extra_ms_with_a_row_below_k_{K}_allowed": round(float(extra[few].mean()), 4)
        if few.any()
        else None,
        "adjust_extra_ms_otherwise": round(float(extra[~few].mean()), 4) if (~few).any() else None,
    }


def bench_cloud(
    args, edge_cases: dict[str, dict[str, Any]], specs, one_time: dict[str, Any]
) -> dict[str, Any]:
    from handoff.cloud.backend import ForwardItem
    from handoff.cloud.backends.llama_backend import LlamaCppBackend
    from handoff.shared.constraints import ConstraintState
    from handoff.shared.models import ModelRef

    path = Path(args.cloud_model)
    ref = ModelRef("gguf", path, path.name)
    before = _cpu()
    backend, dt = _timed(
        lambda: LlamaCppBackend(ref, threads=args.threads, max_sequences=2, max_context=2048)
    )
    print(f"cloud: {path.name} loaded in {dt:.1f} s (deterministic, single path, {args.threads} threads)")
    stops = edge_cases["_stops"]
    tokenizer, dt = _timed(lambda: backend.grammar_tokenizer(stops))
    one_time["grammar_tokenizer_cloud_first_ms"] = round(dt * 1e3, 1)
    compile_costs = {}
    for name, (_, constraint, _) in specs.items():
        if constraint is None or not constraint.grammar:
            continue
        t_compile = [
            _timed(lambda c=constraint: ConstraintState(c, tokenizer))[1] for _ in range(args.compile_repeats)
        ]
        compile_costs[name] = {
            "first": round(t_compile[0] * 1e3, 3),
            "median": round(float(np.median(t_compile)) * 1e3, 3),
        }
    one_time["compile_ms_cloud_tokenizer"] = compile_costs

    seq = backend.new_sequence()
    current_prompt: list[int] = []
    result: dict[str, Any] = {
        "model": path.name,
        "backend": f"llama.cpp, deterministic (single path), threads {args.threads}",
        "k": K,
        "window": WINDOW,
        "cases": {},
    }
    all_single, all_window = [], []  # decode seconds, every case: the forward time does not depend on it
    for name, (prompt, constraint, _) in specs.items():
        if constraint is None:
            continue
        completion = edge_cases[name]["first"]["tokens"]
        topk = edge_cases[name]["first"]["topk"]
        if prompt != current_prompt:  # prefill once per prompt (all but its last token)
            backend.truncate(seq, 0)
            backend._decode_items([ForwardItem(seq, prompt[:-1], 0, K)], read_logits=False)
            current_prompt = prompt
        singles, single_s, windows, window_s = _cloud_logits(backend, seq, prompt, completion, WINDOW)
        all_single.extend(single_s)
        all_window.extend(window_s)

        # The service's per-token work: ConstraintState.row() then accept() (VerifierService._constrain).
        reps_row, reps_acc, rows = [], [], []
        for rep in range(args.replays):
            state = ConstraintState(constraint, tokenizer if constraint.grammar else None)
            t_row, t_acc = [], []
            for tok in completion:
                row, dt = _timed(state.row)
                t_row.append(dt)
                if rep == 0:
                    rows.append(row)
                t_acc.append(_timed(lambda tok=tok, state=state: state.accept(tok))[1])
            reps_row.append(t_row)
            reps_acc.append(t_acc)
        row_ms = statistics.median(float(np.mean(r)) * 1e3 for r in reps_row)
        acc_ms = statistics.median(float(np.mean(r)) * 1e3 for r in reps_acc)
        row_p99 = statistics.median(float(np.percentile(r, 99)) * 1e3 for r in reps_row)
        n_allowed = np.array([r.allowed.sum() if r.allowed is not None else 1 << 30 for r in rows])

        # views_from_logits with and without the adjustment, on the real logits.
        t1 = []
        for j, lg in enumerate(singles):
            plain = ForwardItem(seq, [0], 1, K, full_last=True)
            adjusted = ForwardItem(seq, [0], 1, K, full_last=True, adjust=[rows[j]])
            t1.append(_time_views(lg, plain, adjusted, args.view_repeats))
        t8, few8 = [], []
        for w, lg in enumerate(windows):
            pos = range(w * WINDOW, (w + 1) * WINDOW)
            gather = [[completion[p], *map(int, topk[p])] for p in pos]
            plain = ForwardItem(seq, [0] * WINDOW, WINDOW, K, gather=gather)
            adjusted = ForwardItem(seq, [0] * WINDOW, WINDOW, K, gather=gather, adjust=[rows[p] for p in pos])
            t8.append(_time_views(lg, plain, adjusted, args.view_repeats))
            few8.append(bool((n_allowed[list(pos)] < K).any()))
        entry: dict[str, Any] = {
            "tokens": len(completion),
            "row_ms": round(row_ms, 4),
            "row_p99_ms": round(row_p99, 4),
            "accept_ms": round(acc_ms, 4),
            f"positions_below_k_{K}_allowed": int((n_allowed < K).sum()),
            "one_token": {"decode_ms_mean": round(float(np.mean(single_s)) * 1e3, 3)}
            | _views_summary(t1, 1, n_allowed[: len(t1)] < K),
        }
        if windows:
            entry["window_8"] = {
                "windows": len(windows),
                "decode_ms_per_window_mean": round(float(np.mean(window_s)) * 1e3, 3),
            } | _views_summary(t8, WINDOW, np.array(few8))
        result["cases"][name] = entry
    backend.release(seq)
    backend.close()

    # The forward time per token, pooled over every case (median decode + the case's own views).
    dec1 = float(np.median(all_single)) * 1e3
    dec8 = float(np.median(all_window)) * 1e3
    result["decode_ms_one_token_p50"] = round(dec1, 3)
    result["decode_ms_per_window_8_p50"] = round(dec8, 3)
    for name, entry in result["cases"].items():
        one = entry["one_token"]
        fwd = dec1 + one["views_ms"]
        over = entry["row_ms"] + entry["accept_ms"] + one["adjust_extra_ms"]
        one |= {
            "forward_ms_per_token": round(fwd, 3),
            "overhead_ms_per_token": round(over, 4),
            "overhead_pct": _pct(over, fwd),
        }
        w = entry.get("window_8")
        if w:
            fwd8 = (dec8 + w["views_ms"]) / WINDOW
            over8 = entry["row_ms"] + entry["accept_ms"] + w["adjust_extra_ms_per_row"]
            w |= {
                "forward_ms_per_token": round(fwd8, 3),
                "overhead_ms_per_token": round(over8, 4),
                "overhead_pct": _pct(over8, fwd8),
            }
        print(
            f"  {name:22s} row {entry['row_ms']:.3f} accept {entry['accept_ms']:.3f} adjust(1) "
            f"{one['adjust_extra_ms']:.3f} ms; {one['overhead_pct']:.2f} % of a {fwd:.1f} ms token, "
            f"{(w or {}).get('overhead_pct', float('nan')):.2f} % of an 8-window token"
        )

    # The same 8-token windows with deterministic off: one batched llama_decode per window.
    name = "json_schema"
    prompt, _, _ = specs[name]
    completion = edge_cases[name]["first"]["tokens"]
    fast = LlamaCppBackend(ref, threads=args.threads, max_sequences=2, max_context=2048, deterministic=False)
    seq = fast.new_sequence()
    fast._decode_items([ForwardItem(seq, prompt[:-1], 0, K)], read_logits=False)
    _, single_fast, _, window_fast = _cloud_logits(fast, seq, prompt, completion, WINDOW)
    fast.release(seq)
    fast.close()
    c = result["cases"][name]
    w = c["window_8"]
    per_tok = (float(np.median(window_fast)) * 1e3 + w["views_ms"]) / WINDOW
    over = c["row_ms"] + c["accept_ms"] + w["adjust_extra_ms_per_row"]
    result["fast_mode_window_8"] = {
        "case": name,
        "decode_ms_per_window_p50": round(float(np.median(window_fast)) * 1e3, 3),
        "decode_ms_one_token_p50": round(float(np.median(single_fast)) * 1e3, 3),
        "forward_ms_per_token": round(per_tok, 3),
        "overhead_ms_per_token": round(over, 4),
        "overhead_pct": _pct(over, per_tok),
    }
    result["others_cpu_pct"] = _others_cpu_pct(before)
    print(
        f"  fast mode, 8-token windows: {per_tok:.2f} ms/token forward; the overhead is {_pct(over, per_tok):.2f} %"
    )
    return result


# ---------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edge-model", default=str(EDGE_GGUF))
    p.add_argument("--cloud-model", default=str(CLOUD_GGUF))
    p.add_argument("--tokens", type=int, default=96, help="tokens per edge generation at most")
    p.add_argument("--rounds", type=int, default=5, help="timed edge rounds (after one untimed)")
    p.add_argument("--replays", type=int, default=3, help="replays of each constrained run's tokens")
    p.add_argument("--view-repeats", type=int, default=3, help="timings of each views_from_logits call")
    p.add_argument("--compile-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-cloud", action="store_true")
    p.add_argument("--json-out", default=str(ROOT / "docs/bench_constraints_cpu.json"))
    args = p.parse_args()

    one_time: dict[str, Any] = {}
    t0 = time.perf_counter()
    _, dt = _timed(lambda: __import__("llguidance"))
    one_time["import_llguidance_ms"] = round(dt * 1e3, 1)
    machine = _machine()
    from handoff.shared.logs import show_native_logs

    show_native_logs(False)

    edge_cases: dict[str, Any] = {}
    edge = bench_edge(args, edge_cases, one_time)
    cloud = None
    if not args.no_cloud:
        # The same prompts, constraints, stop tokens and completions as the edge's.
        cloud = bench_cloud(args, edge_cases, edge_cases["_specs"], one_time)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    out = {
        "command": "python scripts/bench_constraints.py "
        + f"--tokens {args.tokens} --rounds {args.rounds} --replays {args.replays} --threads {args.threads}",
        "target_pct_of_decode_step": TARGET_PCT,
        "machine": machine,
        "seconds": round(time.perf_counter() - t0, 1),
        "one_time": one_time,
        "edge": edge,
        "cloud": cloud,
    }
    Path(args.json_out).write_text(json.dumps(out, indent=1) + "\n")
    _print_tables(out)
    print(f"wrote {args.json_out} ({out['seconds']:.0f} s)")


def _print_tables(out: dict[str, Any]) -> None:
    edge = out["edge"]["cases"]
    print("\nedge (0.5B, EdgeRunner.step): ms/token and the replayed overhead, % of the unconstrained step")
    print(
        f"{'case':28s} {'tokens':>6s} {'ms/tok':>7s} {'e2e %':>6s} {'row':>6s} {'adjust':>6s} {'accept':>6s} {'view':>6s} {'total':>6s}"
    )
    for name, c in edge.items():
        o = c.get("overhead_pct_of_unconstrained_step")
        cols = (
            f"{o['row']:6.2f} {o['adjust_logits']:6.2f} {o['accept']:6.2f} {o['view_extra']:6.2f} {o['total']:6.2f}"
            if o
            else ""
        )
        print(
            f"{name:28s} {c['tokens']:6d} {c['ms_per_token']:7.2f} {c['end_to_end_overhead_pct']:6.1f} {cols}"
        )
    if out["cloud"]:
        print("\ncloud (1.5B, llama.cpp backend): the service's per-token cost, % of a forward per token")
        print(
            f"{'case':22s} {'row ms':>7s} {'acc ms':>7s} {'adj1 ms':>7s} {'1-tok %':>7s} {'adj8/tok':>8s} {'8-win %':>7s}"
        )
        for name, c in out["cloud"]["cases"].items():
            w = c.get("window_8", {})
            print(
                f"{name:22s} {c['row_ms']:7.3f} {c['accept_ms']:7.3f} {c['one_token']['adjust_extra_ms']:7.3f} "
                f"{c['one_token']['overhead_pct']:7.2f} {w.get('adjust_extra_ms_per_row', float('nan')):8.3f} "
                f"{w.get('overhead_pct', float('nan')):7.2f}"
            )


if __name__ == "__main__":
    main()
