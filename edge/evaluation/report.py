"""The evaluation report: per-run, per-suite figures from result rows, as JSON, Markdown and plots.

Input is one row per (run, task) as the eval runner writes it:

    {"run": "hybrid-tau0.2-n8", "mode": "small"|"large"|"hybrid", "threshold": 0.2, "check_interval": 8,
     "suite": "arithmetic", "task_id": "arithmetic-0003", "correct": true, "answer": "42", "expected": "42",
     "tokens": 23, "cloud_tokens": 4, "corrected_tokens": 1, "unchecked_tokens": 0, "handoffs": 1,
     "check_points": 3, "bytes_sent": 3000, "bytes_received": 2000, "seconds": 2.1, "first_token_s": 0.3,
     "stop_reason": "stop_token", "oracle_positions": 3,
     "override_tokens": 1, "other_cloud_tokens": 4, "checked_positions": 24, "round_trips": 5,
     "cloud_seconds": 0.8}

The last five (the cloud's share, edge/evaluation/accounting.py) are newer than the rest: a row
without them still loads, and the figures that need them are unknown (None, "—").

There is at most one run of mode "small" and one of mode "large" (the baselines), except that other
edge-only runs (an expert of a mixture alone) may come with a baseline named "small"; RPI pairs every
run with them task by task. `oracle_positions` is set only on rows of the large run: the positions
along P's greedy answer where Q's greedy token differs (shared.quality.oracle_positions).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handoff.edge.evaluation.accounting import oracle_cloud_seconds, run_accounting
from handoff.edge.evaluation.markdown import markdown
from handoff.edge.evaluation.plots import (
    ALL_SUITES,
    plot_frontier,
    plot_frontier_accounting,
    plot_rpi_vs_threshold,
)
from handoff.shared.errors import HandoffError
from handoff.shared.quality import accuracy_ci, bootstrap_rpi, cluster_rpi

__all__ = [
    "ALL_SUITES",
    "markdown",
    "plot_frontier",
    "plot_frontier_accounting",
    "plot_rpi_vs_threshold",
    "summarize",
    "write_report",
]

logger = logging.getLogger(__name__)

MODES: tuple[str, ...] = ("small", "large", "hybrid")
REQUIRED_KEYS: tuple[str, ...] = (
    "run",
    "mode",
    "suite",
    "task_id",
    "correct",
    "tokens",
    "cloud_tokens",
    "corrected_tokens",
    "handoffs",
    "check_points",
    "bytes_sent",
    "bytes_received",
    "seconds",
)
N_RESAMPLES = 2000
CONFIDENCE = 0.95
SEED = 0  # one seed for every run: runs of the same tasks get the same resamples, so they compare fairly

TaskKey = tuple[str, str]  # (suite, task_id): task ids need only be unique within a suite


@dataclass(frozen=True)
class _Run:
    """A run's identity: the same on all of its rows."""

    run: str
    mode: str
    threshold: float | None
    check_interval: int | None
    policy: str = "kl"  # hybrid runs: the policy family (kl, exact, skip, budget, entropy)


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def _check_rows(rows: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], dict[str, _Run]]:
    """Validate the rows; return them and the runs by name (in order of first appearance)."""
    checked: list[Mapping[str, Any]] = []
    runs: dict[str, _Run] = {}
    seen: set[tuple[str, str, str]] = set()
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise HandoffError(f"result row {i}: missing {', '.join(missing)}")
        if row["mode"] not in MODES:
            raise HandoffError(f"result row {i}: mode must be one of {', '.join(MODES)}, got {row['mode']!r}")
        if row["suite"] == ALL_SUITES:
            raise HandoffError(f"result row {i}: suite name {ALL_SUITES!r} is reserved for pooled figures")
        for k in ("tokens", "cloud_tokens", "corrected_tokens", "handoffs", "check_points"):
            if row[k] < 0:
                raise HandoffError(f"result row {i}: {k} must be >= 0, got {row[k]}")
        policy = str(row.get("policy") or "kl") if row["mode"] == "hybrid" else row["mode"]
        info = _Run(str(row["run"]), row["mode"], row.get("threshold"), row.get("check_interval"), policy)
        known = runs.setdefault(info.run, info)
        if known != info:
            raise HandoffError(
                f"result row {i}: run {info.run!r} has mode/threshold/check_interval {info.mode}/"
                f"{info.threshold}/{info.check_interval}, earlier rows {known.mode}/{known.threshold}/"
                f"{known.check_interval}"
            )
        key = (info.run, str(row["suite"]), str(row["task_id"]))
        if key in seen:
            raise HandoffError(f"result row {i}: task {key[2]!r} of suite {key[1]!r} twice in run {key[0]!r}")
        seen.add(key)
        checked.append(row)
    for mode in ("small", "large"):
        names = [r.run for r in runs.values() if r.mode == mode]
        # Other edge-only runs (one expert of a mixture alone) may join a baseline named "small".
        if len(names) > 1 and not (mode == "small" and "small" in names):
            raise HandoffError(f"expected at most one {mode} run, got {', '.join(names)}")
    return checked, runs


def _run_order(runs: Iterable[_Run]) -> list[_Run]:
    """Display order: small, hybrid runs by threshold then check interval, large."""

    def key(r: _Run) -> tuple:
        rank = {"small": 0, "hybrid": 1, "large": 2}[r.mode] + 0.5 * (r.mode == "small" and r.run != "small")
        return (
            rank,
            r.policy != "kl",  # the KL threshold sweep first, then the other policies
            r.policy,
            r.threshold is None,
            r.threshold if r.threshold is not None else 0.0,
            r.check_interval is None,
            r.check_interval if r.check_interval is not None else 0,
            r.run,
        )

    return sorted(runs, key=key)


def _ratio(num: float, den: float, scale: float = 1.0) -> float | None:
    return scale * num / den if den else None


def _accuracy(correct: Sequence[bool]) -> dict[str, Any]:
    value, low, high = accuracy_ci(np.asarray(correct, dtype=bool), confidence=CONFIDENCE)
    return {"value": value, "low": low, "high": high, "correct": int(sum(correct)), "n": len(correct)}


def _no_rpi(n_tasks: int = 0) -> dict[str, Any]:
    return {
        "estimate": None,
        "low": None,
        "high": None,
        "undefined_fraction": None,
        "n_resamples": 0,
        "n_clusters": None,
        "n_tasks": n_tasks,
        "per_prompt": None,
    }


def _rpi(
    small: list[bool], large: list[bool], hybrid: list[bool], prompts: list[str] | None = None
) -> dict[str, Any]:
    """Paired bootstrap RPI of outcome lists of the same tasks in the same order.

    With the tasks' prompt keys (rows' prompt_key), the bootstrap draws whole prompts (tasks sharing a
    prompt share one greedy generation), and "per_prompt" is the RPI with each prompt counted once.
    """
    if not small:
        return _no_rpi()
    outcomes = [np.asarray(x, dtype=bool) for x in (small, large, hybrid)]
    ci = bootstrap_rpi(*outcomes, clusters=prompts, n_resamples=N_RESAMPLES, confidence=CONFIDENCE, seed=SEED)
    per_prompt = None if prompts is None else cluster_rpi(*outcomes, prompts)
    return {**asdict(ci), "n_tasks": len(small), "per_prompt": per_prompt}


def _prompt_keys(keys: Sequence[TaskKey], *runs: Mapping[TaskKey, Mapping[str, Any]]) -> list[str] | None:
    """Each task's prompt key (the first of the runs' rows that has one), or None if a task has none."""
    out = []
    for k in keys:
        key = next((r[k].get("prompt_key") for r in runs if k in r and r[k].get("prompt_key")), None)
        if key is None:
            return None  # rows written before prompt keys: tasks taken as independent
        out.append(str(key))
    return out


def _run_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy and cost figures of one run's rows in one suite."""
    n = len(rows)
    tokens = sum(int(r["tokens"]) for r in rows)
    cloud = sum(int(r["cloud_tokens"]) + int(r["corrected_tokens"]) for r in rows)
    handoffs = sum(int(r["handoffs"]) for r in rows)
    check_points = sum(int(r["check_points"]) for r in rows)
    seconds = sum(float(r["seconds"]) for r in rows)
    first = [float(r["first_token_s"]) for r in rows if r.get("first_token_s") is not None]
    return {
        "n": n,
        "accuracy": _accuracy([bool(r["correct"]) for r in rows]),
        "tokens": tokens,
        "cloud_tokens": cloud,
        # Corrected tokens were produced by the cloud too (it replaced the edge's draft there).
        "cloud_fraction": _ratio(cloud, tokens),
        "handoffs_per_task": _ratio(handoffs, n),
        "handoffs_per_100_tokens": _ratio(handoffs, tokens, 100.0),
        "check_points_per_100_tokens": _ratio(check_points, tokens, 100.0),
        "up_bytes_per_token": _ratio(sum(float(r["bytes_sent"]) for r in rows), tokens),
        "down_bytes_per_token": _ratio(sum(float(r["bytes_received"]) for r in rows), tokens),
        "mean_tokens": _ratio(tokens, n),
        "total_seconds": seconds,
        "mean_seconds": _ratio(seconds, n),
        "mean_first_token_s": _ratio(sum(first), len(first)),
        "unchecked_tokens": sum(int(r.get("unchecked_tokens") or 0) for r in rows),
        "stop_reasons": dict(sorted(Counter(str(r.get("stop_reason")) for r in rows).items())),
        "accounting": run_accounting(rows),
    }


def _same_answer(a: Any, b: Any) -> bool:
    norm = [None if x is None else str(x).strip() for x in (a, b)]
    return norm[0] == norm[1]


def _oracle(
    small: Mapping[TaskKey, Mapping[str, Any]], large: Mapping[TaskKey, Mapping[str, Any]], *, exact: bool
) -> dict[str, Any] | None:
    """The oracle hybrid of a suite: the large model's answer where it helps, the small one's elsewhere.

    Plain oracle: takes P's answer where large is correct and small wrong. Exact oracle: reproduces
    P's answer wherever the small answer differs from it. Taking P's answer costs the oracle positions
    of that task (the tokens the cloud must produce for greedy hybrid to follow P's text); the output
    tokens are those of the answer it outputs.
    """
    keys = sorted(set(small) & set(large))
    if not keys or any(large[k].get("oracle_positions") is None for k in keys):
        return None
    correct: list[bool] = []
    cloud = tokens = handed = 0
    taken: list[Mapping[str, Any]] = []  # the large rows whose answer the oracle takes
    for k in keys:
        s, lg = small[k], large[k]
        if exact:
            take_large = not _same_answer(s.get("answer"), lg.get("answer"))
        else:
            take_large = bool(lg["correct"]) and not bool(s["correct"])
        src = lg if take_large else s
        correct.append(bool(src["correct"]))
        tokens += int(src["tokens"])
        if take_large:
            cloud += int(lg["oracle_positions"])
            handed += 1
            taken.append(lg)
    seconds = oracle_cloud_seconds(taken, cloud) if taken else 0.0
    return {
        "n": len(keys),
        "accuracy": _accuracy(correct),
        "rpi": _rpi(
            [bool(small[k]["correct"]) for k in keys], [bool(large[k]["correct"]) for k in keys], correct
        ),
        "cloud_tokens": cloud,
        "tokens": tokens,
        "cloud_fraction": _ratio(cloud, tokens),
        "tasks_from_large": handed,
        # Every oracle cloud token replaces Q's (a position where Q's greedy token differs from P's).
        "accounting": {
            "override_fraction": _ratio(cloud, tokens),
            "other_cloud_fraction": 0.0 if tokens else None,
            "ensembled_fraction": 0.0 if tokens else None,
            "gpu_seconds_per_1k_tokens": None if seconds is None else _ratio(seconds, tokens, 1000.0),
        },
    }


def _summarize_group(rows: Sequence[Mapping[str, Any]], order: Sequence[_Run]) -> dict[str, Any]:
    """Figures of one suite (or of all suites pooled)."""
    by_run: dict[str, dict[TaskKey, Mapping[str, Any]]] = {r.run: {} for r in order}
    for row in rows:
        by_run[str(row["run"])][(str(row["suite"]), str(row["task_id"]))] = row
    small_run = next((r.run for r in order if r.mode == "small"), None)
    large_run = next((r.run for r in order if r.mode == "large"), None)
    small = by_run.get(small_run, {}) if small_run else {}
    large = by_run.get(large_run, {}) if large_run else {}

    paired = sorted(set(small) & set(large))
    small_acc = large_acc = None
    tie: bool | None = None
    if paired:
        small_ok = sum(bool(small[k]["correct"]) for k in paired)
        large_ok = sum(bool(large[k]["correct"]) for k in paired)
        small_acc, large_acc = small_ok / len(paired), large_ok / len(paired)
        tie = small_ok == large_ok

    runs: dict[str, Any] = {}
    for info in order:
        mine = by_run[info.run]
        if not mine:
            continue
        metrics = _run_metrics([mine[k] for k in sorted(mine)])
        keys = [k for k in paired if k in mine]
        metrics["rpi"] = _rpi(
            [bool(small[k]["correct"]) for k in keys],
            [bool(large[k]["correct"]) for k in keys],
            [bool(mine[k]["correct"]) for k in keys],
            _prompt_keys(keys, large, small, mine),
        )
        runs[info.run] = metrics
    return {
        "n_tasks": len({(str(r["suite"]), str(r["task_id"])) for r in rows}),
        "n_paired": len(paired),
        "small_accuracy": small_acc,
        "large_accuracy": large_acc,
        "tie": tie,
        "runs": runs,
        "oracle": _oracle(small, large, exact=False),
        "oracle_exact": _oracle(small, large, exact=True),
    }


def summarize(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate result rows per run and per suite, plus the pooled "all" pseudo-suite.

    RPI pairs each run with the small and large runs by task: only tasks present in all three
    count. The small and large runs get RPI 0 and 1 (when defined) by the same computation.

    Args:
        rows: one dict per (run, task), in the schema of this module's docstring.

    Returns:
        A JSON-ready dict: "runs" (identity of each run, in display order), "suites" ("all" first,
        then the suites sorted), "by_suite" (per suite: n_tasks, n_paired, small_accuracy,
        large_accuracy, tie, "runs" {run: metrics}, "oracle", "oracle_exact"), "bootstrap" (its settings).
    """
    checked, runs = _check_rows(rows)
    order = _run_order(runs.values())
    suites = sorted({str(r["suite"]) for r in checked})
    by_suite = {ALL_SUITES: _summarize_group(checked, order)}
    for suite in suites:
        by_suite[suite] = _summarize_group([r for r in checked if str(r["suite"]) == suite], order)
    return {
        "runs": [asdict(r) for r in order],
        "suites": [ALL_SUITES, *suites],
        "by_suite": by_suite,
        "bootstrap": {"n_resamples": N_RESAMPLES, "confidence": CONFIDENCE, "seed": SEED},
    }


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def _meta_value(key: str, value: Any) -> str:
    if isinstance(value, list | tuple):
        text = ", ".join(str(v) for v in value)
    elif isinstance(value, Mapping):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return f"`{text}`" if key == "command" else text


def write_report(
    rows: Iterable[Mapping[str, Any]], out_dir: Path | str, meta: Mapping[str, Any]
) -> dict[str, Any]:
    """Write summary.json, report.md and the plots (plots.py) into out_dir.

    Args:
        rows: one dict per (run, task), in the schema of this module's docstring.
        out_dir: the folder to write (created if missing).
        meta: what produced the results (command, models, date, ...): stored under "meta" in
            summary.json and listed at the top of report.md.

    Returns:
        The summary (summarize(rows)).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    document = {"meta": dict(meta), **summary}
    # allow_nan=False: the summary uses None for undefined figures; a NaN here would be a bug.
    (out / "summary.json").write_text(json.dumps(document, indent=2, default=str, allow_nan=False) + "\n")
    plot_rpi_vs_threshold(summary, out / "rpi_vs_threshold.png")
    plot_frontier(summary, out / "frontier.png")
    plot_frontier_accounting(summary, out / "frontier_override.png", "override_fraction")
    plot_frontier_accounting(summary, out / "frontier_gpu.png", "gpu_seconds_per_1k_tokens")
    header = ["# Handoff evaluation", ""]
    header += [f"- **{key}:** {_meta_value(key, value)}" for key, value in meta.items()]
    header += ["", "![RPI vs threshold](rpi_vs_threshold.png)", "", "![Frontier](frontier.png)", ""]
    header += ["![RPI vs override tokens](frontier_override.png)", "",
               "![RPI vs cloud compute](frontier_gpu.png)", ""]  # fmt: skip
    (out / "report.md").write_text("\n".join(header) + "\n" + markdown(summary))
    logger.info("report written to %s", out)
    return summary
