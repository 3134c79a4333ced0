"""Does one policy's frontier dominate another's? Per rival run and per cost axis, the best run of the
challenger within the rival's cost.

A frontier dominates a rival run on an axis when some challenger run on as many tasks (an eval's runs
draw the same task list, so equal counts are the same tasks) costs no more there and scores at least
the rival's RPI (pooled over all suites). Costs, per output token, each on its own (never
summed into one number the reader cannot take apart):

- override_fraction: P's token replaced Q's;
- cloud_token_fraction: every token P wrote (override + other cloud tokens: handoff runs, bonus tokens);
- gpu_seconds_per_1k_tokens: the cloud's compute (None where rows predate the field: not compared).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from handoff.edge.evaluation.plots import ALL_SUITES

__all__ = ["FRONTIER_AXES", "dominance", "dominance_lines"]

FRONTIER_AXES: dict[str, str] = {
    "override_fraction": "override tokens",
    "cloud_token_fraction": "all cloud tokens",
    "gpu_seconds_per_1k_tokens": "cloud s / 1k tokens",
}


def _cost(accounting: Mapping[str, Any], axis: str) -> float | None:
    if axis == "cloud_token_fraction":
        o, c = accounting["override_fraction"], accounting["other_cloud_fraction"]
        return None if o is None or c is None else o + c
    x = accounting[axis]
    return None if x is None else float(x)


def dominance(
    summary: Mapping[str, Any],
    challenger: str = "router",
    rivals: Sequence[str] = ("kl", "entropy"),
    measure: str = "estimate",
) -> list[dict[str, Any]]:
    """For each hybrid run of a rival policy and each axis: the challenger's best run within its cost.

    Args:
        summary: the dict report.summarize() returns.
        challenger: the policy family whose frontier is tested ("router").
        rivals: the policy families it must dominate.
        measure: "estimate" (RPI per task, the project's RPI) or "per_prompt" (each distinct prompt
            counted once; None where rows record no prompt keys).

    Returns:
        rows {rival, axis, rival_cost, rival_rpi, best (run name or None), best_cost, best_rpi,
        dominated (bool, or None where the rival's cost or RPI is unknown)}, rivals in run order.
    """
    group = summary["by_suite"][ALL_SUITES]
    family = {i["run"]: i.get("policy", "kl") for i in summary["runs"] if i["mode"] == "hybrid"}
    points = {name: group["runs"][name] for name in family if name in group["runs"]}
    if measure not in ("estimate", "per_prompt"):
        raise ValueError(f"measure: expected 'estimate' or 'per_prompt', got {measure!r}")

    def score(name: str) -> float | None:
        return points[name]["rpi"].get(measure)

    ours = [n for n in points if family[n] == challenger and score(n) is not None]
    out = []
    for rival in (n for n in points if family[n] in rivals):
        rpi = score(rival)
        for axis in FRONTIER_AXES:
            cost = _cost(points[rival]["accounting"], axis)
            fit = [] if cost is None or rpi is None else [
                n for n in ours
                if points[n]["n"] == points[rival]["n"]
                and (c := _cost(points[n]["accounting"], axis)) is not None and c <= cost + 1e-12
            ]  # fmt: skip
            best = max(fit, key=score, default=None)  # type: ignore[arg-type]
            best_rpi = None if best is None else score(best)
            out.append({
                "rival": rival, "axis": axis, "rival_cost": cost, "rival_rpi": rpi, "best": best,
                "best_cost": None if best is None else _cost(points[best]["accounting"], axis),
                "best_rpi": best_rpi,
                "dominated": None if cost is None or rpi is None else best_rpi is not None and best_rpi >= rpi,
            })  # fmt: skip
    return out


def _fmt(axis: str, x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.1f}" if axis == "gpu_seconds_per_1k_tokens" else f"{100.0 * x:.1f}%"


def dominance_lines(summary: Mapping[str, Any], challenger: str = "router") -> list[str]:
    """The dominance rows as Markdown tables, per task and, where rows record prompt keys, per prompt
    (empty when there is no challenger or no rival run)."""
    rows = dominance(summary, challenger)
    if not rows or not any(r["best"] for r in rows):
        return []
    lines = [
        f"### Frontier: {challenger} runs against the triggers (all suites pooled)",
        "",
        f"For each trigger run and each cost, the {challenger} run on the same tasks with the best RPI "
        "that costs no more. —: the rows do not record that cost.",
        "",
        *_table(rows),
    ]
    per_prompt = dominance(summary, challenger, measure="per_prompt")
    if any(r["rival_rpi"] is not None for r in per_prompt):
        lines += [
            "",
            "The same with RPI per prompt (each distinct prompt counted once: tasks that share a prompt "
            "share one greedy generation):",
            "",
            *_table(per_prompt),
        ]
    return [*lines, ""]


def _table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = [
        "| trigger run | cost | its cost | its RPI | best within it | cost | RPI | dominated |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rpi = "—" if r["best_rpi"] is None else f"{r['best_rpi']:.2f}"
        its = "—" if r["rival_rpi"] is None else f"{r['rival_rpi']:.2f}"
        verdict = {None: "—", True: "yes", False: "**no**"}[r["dominated"]]
        lines.append(
            f"| {r['rival']} | {FRONTIER_AXES[r['axis']]} | {_fmt(r['axis'], r['rival_cost'])} | "
            f"{its} | {r['best'] or '—'} | {_fmt(r['axis'], r['best_cost'])} | {rpi} | {verdict} |"
        )
    return lines
