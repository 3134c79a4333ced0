"""edge.evaluation.frontier: does the router's frontier dominate the triggers, per cost axis."""

from __future__ import annotations

from typing import Any

import pytest

from handoff.edge.evaluation.frontier import dominance, dominance_lines
from handoff.edge.evaluation.plots import ALL_SUITES


def _summary(points: dict[str, tuple[str, int, float | None, float, float, float | None]]) -> dict[str, Any]:
    """A hand-made summary: run -> (policy, tasks, RPI, override, other cloud fraction, cloud s / 1k)."""
    runs = [{"run": n, "mode": "hybrid", "policy": p[0]} for n, p in points.items()]
    group = {
        n: {
            "n": tasks,
            "rpi": {"estimate": rpi},
            "accounting": {
                "override_fraction": ov,
                "other_cloud_fraction": other,
                "gpu_seconds_per_1k_tokens": gpu,
            },
        }
        for n, (_, tasks, rpi, ov, other, gpu) in points.items()
    }
    return {"runs": [{"run": "small", "mode": "small"}, *runs], "by_suite": {ALL_SUITES: {"runs": group}}}


def _rows(summary: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["rival"], r["axis"]): r for r in dominance(summary)}


def test_the_best_router_run_within_each_rivals_cost() -> None:
    s = _summary({
        "kl-hi": ("kl", 300, 1.04, 0.081, 0.234, 142.9),
        "kl-lo": ("kl", 300, 0.78, 0.028, 0.079, 80.7),
        "ent": ("entropy", 300, 0.72, 0.067, 0.194, None),
        "r-default": ("router", 300, 1.01, 0.047, 0.0, 51.3),
        "r-high": ("router", 300, 1.06, 0.070, 0.0, 60.0),
        "r-low": ("router", 300, 0.70, 0.020, 0.0, 45.0),
        "r-100": ("router", 100, 1.50, 0.010, 0.0, 10.0),  # other tasks: never compared
    })  # fmt: skip
    rows = _rows(s)
    hi = rows[("kl-hi", "override_fraction")]
    assert hi["best"] == "r-high" and hi["best_rpi"] == 1.06 and hi["dominated"] is True
    lo = rows[("kl-lo", "override_fraction")]
    assert lo["best"] == "r-low" and lo["dominated"] is False  # 0.70 < 0.78 within 2.8 %
    assert rows[("kl-lo", "cloud_token_fraction")]["best"] == "r-high"  # 7.0 % <= 2.8 + 7.9 %
    assert rows[("kl-lo", "gpu_seconds_per_1k_tokens")]["dominated"] is True
    assert rows[("ent", "gpu_seconds_per_1k_tokens")]["dominated"] is None  # its cost not recorded
    assert all(r["best"] != "r-100" for r in rows.values())
    text = "\n".join(dominance_lines(s))
    assert "| kl-lo | override tokens | 2.8% | 0.78 | r-low | 2.0% | 0.70 | **no** |" in text


def test_no_router_run_within_a_budget_is_not_dominance() -> None:
    s = _summary({"kl": ("kl", 50, 0.5, 0.01, 0.02, 5.0), "r": ("router", 50, 0.9, 0.05, 0.0, 50.0)})
    rows = _rows(s)
    assert rows[("kl", "override_fraction")]["best"] is None
    assert rows[("kl", "override_fraction")]["dominated"] is False
    assert rows[("kl", "cloud_token_fraction")]["dominated"] is False  # 5 % > 3 %
    assert dominance_lines(_summary({"kl": ("kl", 50, 0.5, 0.01, 0.02, 5.0)})) == []


def test_per_prompt_rpi_is_a_second_view() -> None:
    s = _summary({
        "kl-lo": ("kl", 300, 0.78, 0.028, 0.079, 80.7),
        "r-low": ("router", 300, 0.57, 0.021, 0.0, 51.1),
    })  # fmt: skip
    assert "per prompt" not in "\n".join(dominance_lines(s))  # rows without prompt keys: one table
    group = s["by_suite"][ALL_SUITES]["runs"]
    group["kl-lo"]["rpi"]["per_prompt"], group["r-low"]["rpi"]["per_prompt"] = 0.57, 0.60
    by_task = {r["axis"]: r for r in dominance(s)}
    per_prompt = {r["axis"]: r for r in dominance(s, measure="per_prompt")}
    assert by_task["override_fraction"]["dominated"] is False
    assert (
        per_prompt["override_fraction"]["dominated"] is True
        and per_prompt["override_fraction"]["best_rpi"] == 0.60
    )
    text = "\n".join(dominance_lines(s))
    assert (
        "RPI per prompt" in text
        and "| kl-lo | override tokens | 2.8% | 0.57 | r-low | 2.1% | 0.60 | yes |" in text
    )
    with pytest.raises(ValueError, match="measure"):
        dominance(s, measure="median")
