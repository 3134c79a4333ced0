"""The evaluation report: per-run, per-suite figures from result rows, as JSON, Markdown and plots.

Input is one row per (run, task) as the eval runner writes it:

    {"run": "hybrid-tau0.2-n8", "mode": "small"|"large"|"hybrid", "threshold": 0.2, "check_interval": 8,
     "suite": "arithmetic", "task_id": "arithmetic-0003", "correct": true, "answer": "42", "expected": "42",
     "tokens": 23, "cloud_tokens": 4, "corrected_tokens": 1, "unchecked_tokens": 0, "handoffs": 1,
     "check_points": 3, "bytes_sent": 3000, "bytes_received": 2000, "seconds": 2.1, "first_token_s": 0.3,
     "stop_reason": "stop_token", "oracle_positions": 3}

There is at most one run of mode "small" and one of mode "large" (the baselines); RPI pairs every
run with them task by task. `oracle_positions` is set only on rows of the large run: the positions
along P's greedy answer where Q's greedy token differs (shared.quality.oracle_positions).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handoff.shared.errors import HandoffError
from handoff.shared.quality import accuracy_ci, bootstrap_rpi

__all__ = [
    "ALL_SUITES",
    "markdown",
    "plot_frontier",
    "plot_rpi_vs_threshold",
    "summarize",
    "write_report",
]

logger = logging.getLogger(__name__)

ALL_SUITES = "all"  # the pseudo-suite pooling every task
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
        if len(names) > 1:
            raise HandoffError(f"expected at most one {mode} run, got {', '.join(names)}")
    return checked, runs


def _run_order(runs: Iterable[_Run]) -> list[_Run]:
    """Display order: small, hybrid runs by threshold then check interval, large."""

    def key(r: _Run) -> tuple:
        rank = {"small": 0, "hybrid": 1, "large": 2}[r.mode]
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
        "n_tasks": n_tasks,
    }


def _rpi(small: list[bool], large: list[bool], hybrid: list[bool]) -> dict[str, Any]:
    """Paired bootstrap RPI of outcome lists of the same tasks in the same order."""
    if not small:
        return _no_rpi()
    ci = bootstrap_rpi(
        np.asarray(small, dtype=bool),
        np.asarray(large, dtype=bool),
        np.asarray(hybrid, dtype=bool),
        n_resamples=N_RESAMPLES,
        confidence=CONFIDENCE,
        seed=SEED,
    )
    return {**asdict(ci), "n_tasks": len(small)}


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
# Markdown
# --------------------------------------------------------------------------------------------------

NA = "n/a"
DASH = "—"


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
            cells = [NA] * 4
        else:
            acc, rpi_ = _accuracy_cell(o["accuracy"]), _rpi_cell(o["rpi"])
            cells = [str(o["n"]), acc, rpi_, _pct(o["cloud_fraction"])]
        # An oracle has no threshold, check interval, handoffs, bytes or time of its own.
        lines.append(_row([label, DASH, DASH, *cells, *[DASH] * 4]))
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
        f"its interval is a paired bootstrap over tasks ({b.get('n_resamples', N_RESAMPLES)} resamples, "
        "percentile). Accuracy intervals are Wilson score intervals. Cloud fraction = (cloud + corrected "
        "tokens) / output tokens. τ: KL threshold (nats); N: check interval (tokens). Oracle rows: the "
        "fewest cloud-produced tokens that give P's answer on the chosen tasks (positions where Q's greedy "
        "token differs from P's along P's text).",
        "",
    ]
    for suite in suites:
        lines += [f"## {_suite_title(suite)}", "", *_run_table(summary, suite), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------

LINE_STYLES = ("-", "--", ":", "-.")


def _pyplot() -> Any:
    """pyplot on the Agg backend: imported here so that the rest of the CLI starts without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_suites(summary: Mapping[str, Any], what: str) -> list[str]:
    """Suites with a defined RPI; the others are logged and left out."""
    keep = []
    for suite in summary["suites"]:
        tie = summary["by_suite"][suite]["tie"]
        if tie is None or tie:
            why = "small and large tie" if tie else "no small/large pair"
            logger.warning("suite %s: RPI undefined (%s); left out of the %s plot", suite, why, what)
            continue
        keep.append(suite)
    return keep


def _hybrid_by_interval(summary: Mapping[str, Any]) -> dict[int | None, list[Mapping[str, Any]]]:
    """Hybrid runs grouped by check interval (display order inside each group)."""
    groups: dict[int | None, list[Mapping[str, Any]]] = {}
    for info in summary["runs"]:
        if info["mode"] == "hybrid" and info.get("policy", "kl") == "kl":
            groups.setdefault(info["check_interval"], []).append(info)
    return groups


POLICY_MARKERS = {"exact": "D", "correction": "P", "skip": "s", "budget": "^", "entropy": "v"}


def _other_policies(summary: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Hybrid runs of the policies other than the KL threshold sweep (points, not lines)."""
    return [i for i in summary["runs"] if i["mode"] == "hybrid" and i.get("policy", "kl") != "kl"]


def _yerr(points: Sequence[tuple[float, float, float | None, float | None]]) -> np.ndarray:
    """Asymmetric error bars [2, n] from (x, y, low, high); 0 where the interval is undefined."""
    lower = [y - lo if lo is not None else 0.0 for _, y, lo, _ in points]
    upper = [hi - y if hi is not None else 0.0 for _, y, _, hi in points]
    return np.maximum(np.array([lower, upper], dtype=np.float64), 0.0)


def _plot_title(suite: str) -> str:
    return "all suites" if suite == ALL_SUITES else suite


def _line_label(suite: str, interval: int | None, n_intervals: int) -> str:
    title = _plot_title(suite)
    return title if n_intervals == 1 else f"{title}, N={interval if interval is not None else DASH}"


def _finish(plt: Any, fig: Any, ax: Any, path: Path | str, plotted: bool) -> None:
    if plotted:
        # Outside the axes: with several suites the legend would hide the points.
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no suite with a defined RPI", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_rpi_vs_threshold(summary: Mapping[str, Any], path: Path | str) -> None:
    """Plot RPI against the KL threshold: one line per suite (and line style per check interval).

    Args:
        summary: the dict summarize() returns.
        path: the PNG file to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10")
    groups = _hybrid_by_interval(summary)
    plotted = False
    thresholds: list[float] = []
    suites = _plot_suites(summary, "RPI-vs-threshold")
    n_lines = len(suites) * len(groups)
    for i, suite in enumerate(suites):
        runs = summary["by_suite"][suite]["runs"]
        for j, (interval, infos) in enumerate(groups.items()):
            # Lines share their thresholds: shift each a little (relatively, so a log axis works too)
            # so that their error bars do not hide each other.
            dodge = 1.0 + 0.012 * (i * len(groups) + j - (n_lines - 1) / 2)
            points = []
            for info in infos:
                r = runs.get(info["run"], {}).get("rpi")
                if info["threshold"] is None or r is None or r["estimate"] is None:
                    continue
                points.append((float(info["threshold"]), r["estimate"], r["low"], r["high"]))
            if not points:
                continue
            points.sort(key=lambda p: (p[0], p[1]))
            thresholds += [p[0] for p in points]
            ax.errorbar(
                [p[0] * dodge for p in points],
                [p[1] for p in points],
                yerr=_yerr(points),
                color=colors(i % 10),
                linestyle=LINE_STYLES[j % len(LINE_STYLES)],
                marker="o",
                capsize=3,
                label=_line_label(suite, interval, len(groups)),
            )
            plotted = True
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    # Thresholds are usually spaced geometrically (0.05, 0.1, 0.2, ...).
    if thresholds and min(thresholds) > 0 and max(thresholds) / min(thresholds) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("KL threshold τ (nats, top-k lower bound of KL(P‖Q))")
    ax.set_ylabel("RPI (0 = small model, 1 = large model)")
    ax.set_title("Relative performance improvement vs KL threshold")
    _finish(plt, fig, ax, path, plotted)


def plot_frontier(summary: Mapping[str, Any], path: Path | str) -> None:
    """Plot RPI against the cloud-token fraction, from the small model (x, 0) to the large one (1, 1).

    Args:
        summary: the dict summarize() returns.
        path: the PNG file to write.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.get_cmap("tab10")
    groups = _hybrid_by_interval(summary) or {None: []}
    small_run = next((r["run"] for r in summary["runs"] if r["mode"] == "small"), None)
    plotted = False
    for i, suite in enumerate(_plot_suites(summary, "frontier")):
        color = colors(i % 10)
        runs = summary["by_suite"][suite]["runs"]
        small = runs.get(small_run) if small_run else None
        small_x = small["cloud_fraction"] if small and small["cloud_fraction"] is not None else 0.0
        for j, (interval, infos) in enumerate(groups.items()):
            # The small model is RPI 0 at its own cloud share (0 unless mislabelled), the large one 1 at 1.
            points: list[tuple[float, float, float | None, float | None]] = [
                (small_x, 0.0, None, None),
                (1.0, 1.0, None, None),
            ]
            for info in infos:
                m = runs.get(info["run"])
                if m is None or m["cloud_fraction"] is None or m["rpi"]["estimate"] is None:
                    continue
                r = m["rpi"]
                points.append((m["cloud_fraction"], r["estimate"], r["low"], r["high"]))
            points.sort(key=lambda p: (p[0], p[1]))
            ax.errorbar(
                [p[0] for p in points],
                [p[1] for p in points],
                yerr=_yerr(points),
                color=color,
                linestyle=LINE_STYLES[j % len(LINE_STYLES)],
                marker="o",
                capsize=3,
                label=_line_label(suite, interval, len(groups)),
            )
            plotted = True
        for info in _other_policies(summary):
            m = runs.get(info["run"])
            if m is None or m["cloud_fraction"] is None or m["rpi"]["estimate"] is None:
                continue
            family = info.get("policy", "kl")
            ax.plot(
                [m["cloud_fraction"]],
                [m["rpi"]["estimate"]],
                linestyle="none",
                marker=POLICY_MARKERS.get(family, "X"),
                markersize=9,
                color=color,
                markeredgecolor="black",
                label=f"{info['run']} ({_plot_title(suite)})",
            )
            plotted = True
        for key, face, label in (("oracle", color, "oracle"), ("oracle_exact", "none", "oracle, exact")):
            o = summary["by_suite"][suite][key]
            if o is None or o["cloud_fraction"] is None or o["rpi"]["estimate"] is None:
                continue
            ax.plot(
                [o["cloud_fraction"]],
                [o["rpi"]["estimate"]],
                linestyle="none",
                marker="*",
                markersize=14,
                color=color,
                markerfacecolor=face,
                label=f"{label} ({_plot_title(suite)})",
            )
    ax.set_xlabel("cloud-produced tokens (fraction of output tokens)")
    ax.set_ylabel("RPI (0 = small model, 1 = large model)")
    ax.set_title("Quality vs cloud share: hybrid runs between the small and the large model")
    _finish(plt, fig, ax, path, plotted)


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
    """Write summary.json, report.md, rpi_vs_threshold.png and frontier.png into out_dir.

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
    header = ["# Handoff evaluation", ""]
    header += [f"- **{key}:** {_meta_value(key, value)}" for key, value in meta.items()]
    header += ["", "![RPI vs threshold](rpi_vs_threshold.png)", "", "![Frontier](frontier.png)", ""]
    (out / "report.md").write_text("\n".join(header) + "\n" + markdown(summary))
    logger.info("report written to %s", out)
    return summary
