"""The cloud's share in the evaluation report: figures from new rows, "unknown" for rows recorded before."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from handoff.edge.evaluation.accounting import run_accounting
from handoff.edge.evaluation.report import ALL_SUITES, markdown, summarize, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODES = {"small": "small", "large": "large", "h": "hybrid"}


def row(run: str, i: int, correct: bool, tokens: int = 10, **kw: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "run": run, "mode": MODES[run], "threshold": 0.3 if run == "h" else None,
        "check_interval": 8 if run == "h" else None, "suite": "s", "task_id": f"t{i}", "correct": correct,
        "answer": str(correct), "tokens": tokens, "cloud_tokens": 0, "corrected_tokens": 0, "handoffs": 0,
        "check_points": 0, "bytes_sent": 0, "bytes_received": 0, "seconds": 1.0, "oracle_positions": None,
    }  # fmt: skip
    return r | kw


def new_fields(override: int, other: int, checked: int, trips: int, seconds: float) -> dict[str, Any]:
    return {"override_tokens": override, "corrected_tokens": override, "other_cloud_tokens": other,
            "cloud_tokens": other, "checked_positions": checked, "round_trips": trips, "cloud_seconds": seconds}  # fmt: skip


def rows(new: bool) -> list[dict[str, Any]]:
    """Two tasks: small wrong on both, large right on both, the hybrid right on one (RPI 0.5)."""
    out = []
    for i in range(2):
        large_cost = new_fields(0, 10, 0, 2, 0.5) if new else {"cloud_tokens": 10}
        hybrid_cost = new_fields(1, 2, 12, 4, 0.2) if new else {"cloud_tokens": 2, "corrected_tokens": 1}
        out += [
            row("small", i, False, **(new_fields(0, 0, 0, 0, 0.0) if new else {})),
            row("large", i, True, oracle_positions=2, **large_cost),
            row("h", i, i == 0, **hybrid_cost),
        ]
    return out


def test_new_rows_give_each_part_of_the_clouds_share():
    s = summarize(rows(new=True))
    a = s["by_suite"][ALL_SUITES]["runs"]["h"]["accounting"]
    assert a["override_fraction"] == pytest.approx(0.1) and a["other_cloud_fraction"] == pytest.approx(0.2)
    assert a["checked_fraction"] == pytest.approx(1.2) and a["round_trips_per_task"] == pytest.approx(4)
    assert a["gpu_seconds_per_1k_tokens"] == pytest.approx(1000 * 0.4 / 20)
    # The oracle takes P's answer on both tasks: 2 override tokens each, priced at the large run's
    # 0.05 s per token (a lower bound).
    o = s["by_suite"][ALL_SUITES]["oracle"]["accounting"]
    assert o["override_fraction"] == pytest.approx(0.2) and o["other_cloud_fraction"] == 0
    assert o["gpu_seconds_per_1k_tokens"] == pytest.approx(1000 * 4 * 0.05 / 20)
    text = markdown(s)
    assert "### Cloud accounting (all suites pooled)" in text
    assert "| h | 10.0% | 20.0% | 0.0% | 120.0% | 4.0 | 0 | 0 | 20.0 |" in text
    assert (
        "| oracle (P's answer where only P is right) | 20.0% | 0.0% | 0.0% | — | — | — | — | ≥ 10.0 |" in text
    )


def test_rows_recorded_before_the_fields_still_load_with_unknowns(tmp_path: Path):
    old = rows(new=False)
    a = run_accounting([r for r in old if r["run"] == "h"])
    assert a["override_fraction"] == pytest.approx(0.1)  # corrected_tokens, its old name
    assert a["checked_fraction"] is None and a["round_trips_per_task"] is None
    assert a["gpu_seconds_per_1k_tokens"] is None and a["cloud_seconds"] is None
    # One new row among old ones: still unknown (a sum over some rows would be a guess).
    assert (
        run_accounting([old[2], row("h", 9, True, **new_fields(0, 0, 8, 2, 0.1))])["checked_positions"]
        is None
    )
    s = write_report(old, tmp_path, {"command": "test"})
    assert "| h | 10.0% | 20.0% | 0.0% | — | — | 0 | 0 | — |" in (tmp_path / "report.md").read_text()
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["by_suite"][ALL_SUITES]["oracle"]["accounting"]["gpu_seconds_per_1k_tokens"] is None
    for name in ("frontier_override.png", "frontier_gpu.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC)
    assert s["by_suite"][ALL_SUITES]["runs"]["large"]["accounting"]["other_cloud_fraction"] == 1.0


def test_the_accounting_plots_with_recorded_compute(tmp_path: Path):
    write_report(rows(new=True), tmp_path, {})
    for name in ("frontier_override.png", "frontier_gpu.png"):
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000
    assert "![RPI vs cloud compute](frontier_gpu.png)" in (tmp_path / "report.md").read_text()
