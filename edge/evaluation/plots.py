"""The evaluation report's plots (matplotlib, Agg): RPI against τ, and RPI against what the cloud costs.

- rpi_vs_threshold: RPI per suite against the KL threshold;
- frontier: RPI against the cloud-token fraction, per suite, with the oracles;
- frontier_override, frontier_gpu: the pooled suite's RPI against the override-token fraction (P's
  token replaced Q's) and against the cloud's compute seconds per 1,000 tokens, with the oracles.

Input is the dict report.summarize() returns.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ALL_SUITES",
    "DASH",
    "plot_frontier",
    "plot_frontier_accounting",
    "plot_rpi_vs_threshold",
]

logger = logging.getLogger(__name__)

ALL_SUITES = "all"  # the pseudo-suite pooling every task (the summary's name for it)
DASH = "—"


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


POLICY_MARKERS = {
    "exact": "D", "correction": "P", "skip": "s", "budget": "^", "entropy": "v", "surface": "<", "char": "h", "concept": ">", "safe": "*", "mixture": "X", "expert": "x",
}  # fmt: skip


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


ACCOUNTING_AXES = {
    "override_fraction": "override tokens (P's token replaced Q's; fraction of output tokens)",
    "gpu_seconds_per_1k_tokens": "cloud compute seconds per 1,000 output tokens (GPU-s on a GPU cloud)",
}


def _accounting_point(m: Mapping[str, Any], x_key: str, mode: str) -> tuple[float, float, Any, Any] | None:
    """(x, RPI, low, high) of a run, or None where x or RPI is unknown."""
    x = m["accounting"][x_key]
    if x is None and mode == "small":
        x = 0.0  # edge-only never reaches the cloud: no override, no cloud compute
    r = m["rpi"]
    if x is None or r["estimate"] is None:
        return None
    return (float(x), r["estimate"], r["low"], r["high"])


def plot_frontier_accounting(summary: Mapping[str, Any], path: Path | str, x_key: str) -> None:
    """Plot the pooled suite's RPI against one part of the cloud's cost, with the oracles.

    Args:
        summary: the dict summarize() returns.
        path: the PNG file to write.
        x_key: "override_fraction" or "gpu_seconds_per_1k_tokens" (a key of each run's "accounting").
    """
    if x_key not in ACCOUNTING_AXES:
        raise ValueError(f"x_key must be one of {', '.join(ACCOUNTING_AXES)}, got {x_key!r}")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    group = summary["by_suite"][ALL_SUITES]
    plotted = False
    why = "the pooled suite has no defined RPI (small and large tie, or one is missing)"
    if group["tie"] is False:
        points = {}
        for info in summary["runs"]:
            m = group["runs"].get(info["run"])
            p = None if m is None else _accounting_point(m, x_key, info["mode"])
            if p is not None:
                points[info["run"]] = (info, p)
        if not any(info["mode"] != "small" for info, _ in points.values()):
            why = "no run recorded the cloud's compute seconds (rows older than the field)"
        else:
            kl = sorted((p for info, p in points.values() if info["mode"] == "hybrid"
                         and info.get("policy", "kl") == "kl"), key=lambda p: p[0])  # fmt: skip
            if kl:
                ax.errorbar([p[0] for p in kl], [p[1] for p in kl], yerr=_yerr(kl), color="tab:blue",
                            marker="o", capsize=3, label="KL threshold sweep")  # fmt: skip
            for name, (info, p) in points.items():
                family = info.get("policy", "kl") if info["mode"] == "hybrid" else info["mode"]
                if family != "kl":
                    marker = {"small": "o", "large": "o"}.get(family, POLICY_MARKERS.get(family, "X"))
                    ax.errorbar([p[0]], [p[1]], yerr=_yerr([p]), marker=marker, markersize=8, capsize=3,
                                linestyle="none", markeredgecolor="black", label=name)  # fmt: skip
                other = group["runs"][name]["accounting"]["other_cloud_fraction"]
                if x_key == "override_fraction" and other:  # the cloud's other tokens, off this axis
                    name = f"{name} (+{100 * other:.0f}%)"
                ax.annotate(name, (p[0], p[1]), fontsize=7, xytext=(4, 4), textcoords="offset points")
            for key, face, label in (("oracle", "gold", "oracle"), ("oracle_exact", "none", "oracle, exact")):
                o = group[key]
                x = None if o is None else o["accounting"][x_key]
                if x is None or o["rpi"]["estimate"] is None:
                    continue
                bound = " (lower bound)" if x_key == "gpu_seconds_per_1k_tokens" else ""
                ax.plot([x], [o["rpi"]["estimate"]], linestyle="none", marker="*", markersize=15,
                        color="black", markerfacecolor=face, label=f"{label}{bound}")  # fmt: skip
            plotted = True
    ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel(ACCOUNTING_AXES[x_key])
    ax.set_ylabel("RPI (0 = small model, 1 = large model), all suites pooled")
    ax.set_title(
        "Quality vs override tokens (+N%: the run's other cloud tokens, off this axis)"
        if x_key == "override_fraction"
        else "Quality vs the cloud's compute"
    )
    if not plotted:
        ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True, transform=ax.transAxes, fontsize=9)
        ax.grid(True, alpha=0.3)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
        return
    _finish(plt, fig, ax, path, plotted)
