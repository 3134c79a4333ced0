"""The evaluation report's Markdown: accuracy per suite, a table of runs per suite, the cloud's share.

Input is the dict report.summarize() returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from handoff.edge.evaluation.frontier import dominance_lines
from handoff.edge.evaluation.plots import ALL_SUITES, DASH

__all__ = ["markdown"]

NA = "n/a"


def _num(x: float | None, digits: int = 2) -> str:
    return NA if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    return NA if x is None else f"{100.0 * x:.1f}%"


def _with_ci(value: float | None, low: float | None, high: float | None, digits: int = 2) -> str:
    if value is None:
        return NA
    if low is None or high is None:
        return f"{value:.{digits}f} [{NA}]"
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _accuracy_cell(acc: Mapping[str, Any]) -> str:
    return f"{_with_ci(acc['value'], acc['low'], acc['high'])} ({acc['correct']}/{acc['n']})"


def _rpi_cell(r: Mapping[str, Any]) -> str:
    return _with_ci(r["estimate"], r["low"], r["high"])


def _per_prompt(r: Mapping[str, Any]) -> str:
    """RPI with each prompt counted once; "—" where rows record no prompt keys."""
    x = r.get("per_prompt")
    return DASH if x is None else f"{x:.2f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _suite_title(suite: str) -> str:
    return "all suites (pooled)" if suite == ALL_SUITES else suite


ORACLE_LABELS: tuple[tuple[str, str], ...] = (
    ("oracle", "oracle (P's answer where only P is right)"),
    ("oracle_exact", "oracle, exact (P's answer wherever it differs)"),
)
RUN_COLUMNS = (
    "run",
    "τ",
    "N",
    "tasks",
    "accuracy [95% CI]",
    "RPI [95% CI]",
    "RPI per prompt",
    "cloud fraction",
    "handoffs/task",
    "up B/tok",
    "down B/tok",
    "s/task",
)


def _run_table(summary: Mapping[str, Any], suite: str) -> list[str]:
    group = summary["by_suite"][suite]
    lines = [_row(RUN_COLUMNS), _row(["---"] * len(RUN_COLUMNS))]
    for info in summary["runs"]:
        m = group["runs"].get(info["run"])
        if m is None:
            continue
        lines.append(
            _row(
                [
                    info["run"],
                    DASH if info["threshold"] is None else f"{info['threshold']:g}",
                    DASH if info["check_interval"] is None else str(info["check_interval"]),
                    str(m["n"]),
                    _accuracy_cell(m["accuracy"]),
                    _rpi_cell(m["rpi"]),
                    _per_prompt(m["rpi"]),
                    _pct(m["cloud_fraction"]),
                    _num(m["handoffs_per_task"]),
                    _num(m["up_bytes_per_token"], 0),
                    _num(m["down_bytes_per_token"], 0),
                    _num(m["mean_seconds"]),
                ]
            )
        )
    for key, label in ORACLE_LABELS:
        o = group[key]
        if o is None:
            cells = [NA] * 5
        else:
            acc, rpi_ = _accuracy_cell(o["accuracy"]), _rpi_cell(o["rpi"])
            cells = [str(o["n"]), acc, rpi_, _per_prompt(o["rpi"]), _pct(o["cloud_fraction"])]
        # An oracle has no threshold, check interval, handoffs, bytes or time of its own.
        lines.append(_row([label, DASH, DASH, *cells, *[DASH] * 4]))
    return lines


ACCOUNTING_COLUMNS = (
    "run",
    "override tokens",
    "other cloud tokens",
    "ensembled tokens",
    "checked positions",
    "round trips/task",
    "up B/tok",
    "down B/tok",
    "cloud s/1k tok",
)


def _known(x: float | None, cell: str) -> str:
    return DASH if x is None else cell


def _accounting_table(summary: Mapping[str, Any], suite: str) -> list[str]:
    """The cloud's share per run, each part on its own; "—" where the rows did not record it."""
    group = summary["by_suite"][suite]
    lines = [_row(ACCOUNTING_COLUMNS), _row(["---"] * len(ACCOUNTING_COLUMNS))]
    for info in summary["runs"]:
        m = group["runs"].get(info["run"])
        if m is None:
            continue
        a = m["accounting"]
        lines.append(
            _row(
                [
                    info["run"],
                    _pct(a["override_fraction"]),
                    _pct(a["other_cloud_fraction"]),
                    _pct(a["ensembled_fraction"]),
                    _known(a["checked_fraction"], _pct(a["checked_fraction"])),
                    _known(a["round_trips_per_task"], _num(a["round_trips_per_task"], 1)),
                    _num(m["up_bytes_per_token"], 0),
                    _num(m["down_bytes_per_token"], 0),
                    _known(a["gpu_seconds_per_1k_tokens"], _num(a["gpu_seconds_per_1k_tokens"], 1)),
                ]
            )
        )
    for key, label in ORACLE_LABELS:
        o = group[key]
        if o is not None:
            a = o["accounting"]
            gpu = a["gpu_seconds_per_1k_tokens"]
            cells = [
                _pct(a["override_fraction"]),
                _pct(a["other_cloud_fraction"]),
                _pct(a["ensembled_fraction"]),
            ]
            cells += [DASH] * 4
            lines.append(_row([label, *cells, DASH if gpu is None else f"≥ {gpu:.1f}"]))
    return lines


def markdown(summary: Mapping[str, Any]) -> str:
    """Render a summary as Markdown: accuracy per suite, then one table of runs per suite.

    Args:
        summary: the dict summarize() returns.

    Returns:
        Markdown text, ending with a newline.
    """
    suites: list[str] = list(summary["suites"])
    lines = [
        "## Accuracy per suite",
        "",
        _row(["suite", "tasks (paired)", "small", "large", "large − small", "note"]),
        _row(["---"] * 6),
    ]
    ties: list[str] = []
    for suite in suites:
        g = summary["by_suite"][suite]
        gap = None if g["small_accuracy"] is None else g["large_accuracy"] - g["small_accuracy"]
        if g["tie"]:
            note = "tie: RPI undefined"
            ties.append(suite)
        elif g["tie"] is None:
            note = "no small/large pair"
        else:
            note = ""
        lines.append(
            _row(
                [
                    _suite_title(suite),
                    str(g["n_paired"]),
                    _num(g["small_accuracy"]),
                    _num(g["large_accuracy"]),
                    _num(gap),
                    note,
                ]
            )
        )
    lines.append("")
    if ties:
        names = ", ".join(f"`{s}`" for s in ties)
        lines += [
            f"**Tie** on {names}: small and large are equally accurate, so RPI is undefined there. A suite "
            "that both models solve, or both fail, tells nothing about the hybrid; change its difficulty.",
            "",
        ]
    b = summary.get("bootstrap", {})
    lines += [
        "RPI = (acc_hybrid − acc_small) / (acc_large − acc_small) on the tasks all three runs answered; "
        f"its interval is a paired bootstrap over tasks ({b.get('n_resamples', NA)} resamples, "
        "percentile) that draws whole prompts where the rows record them (prompt_key): tasks that share a "
        "prompt share one greedy generation per run, so they are not independent. RPI per prompt counts "
        "each distinct prompt once, at its tasks' mean outcome (— where rows predate prompt keys). "
        "Accuracy intervals are Wilson score intervals. Cloud fraction = (cloud + corrected "
        "tokens) / output tokens. τ: KL threshold (nats); N: check interval (tokens). Oracle rows: the "
        "fewest cloud-produced tokens that give P's answer on the chosen tasks (positions where Q's greedy "
        "token differs from P's along P's text).",
        "",
    ]
    for suite in suites:
        lines += [f"## {_suite_title(suite)}", "", *_run_table(summary, suite), ""]
        if suite == ALL_SUITES:
            lines += [
                "### Cloud accounting (all suites pooled)",
                "",
                "Each part of the cloud's share on its own, per output token: override tokens (P's token "
                "replaced Q's), other cloud tokens (handoff runs, seed and bonus tokens), ensembled tokens (the "
                "edge placed the argmax of P's and Q's ensemble: safe), checked positions "
                "(edge positions P scored, drafts a cut dropped included); round trips per task (opens, "
                "check points, handoffs, rollbacks, drafts); bytes per output token each way; the cloud's "
                "compute seconds per 1,000 output tokens (GPU-seconds on a GPU cloud; on this report's "
                "cloud device, see `cloud` above). —: not recorded (rows older than the field) or not "
                "applicable. The oracles' compute is a lower bound: their cloud tokens at the large run's "
                "seconds per token, without keeping P's cache in step with the edge.",
                "",
                *_accounting_table(summary, suite),
                "",
                *dominance_lines(summary),
            ]
    return "\n".join(lines)
