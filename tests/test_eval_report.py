"""Tests of edge.evaluation.report on hand-made result rows: figures, Markdown, JSON and plots."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from handoff.edge.evaluation.report import (
    ALL_SUITES,
    markdown,
    plot_frontier,
    plot_rpi_vs_threshold,
    summarize,
    write_report,
)
from handoff.shared.errors import HandoffError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RUNS: dict[str, tuple[str, float | None, int | None]] = {
    "small": ("small", None, None),
    "large": ("large", None, None),
    "h-0.1": ("hybrid", 0.1, 8),
    "h-0.5": ("hybrid", 0.5, 8),
}


def row(run: str, suite: str, i: int, correct: bool, answer: str, tokens: int, **kw: Any) -> dict[str, Any]:
    """One result row; the cost fields not given are those of an edge-only answer."""
    mode, threshold, interval = RUNS[run]
    r: dict[str, Any] = {
        "run": run,
        "mode": mode,
        "threshold": threshold,
        "check_interval": interval,
        "suite": suite,
        "task_id": f"{suite}-{i:04d}",
        "correct": correct,
        "answer": answer,
        "expected": "?",
        "tokens": tokens,
        "cloud_tokens": 0,
        "corrected_tokens": 0,
        "unchecked_tokens": 0,
        "handoffs": 0,
        "check_points": 0,
        "bytes_sent": 0,
        "bytes_received": 0,
        "seconds": 2.0,
        "first_token_s": 0.25,
        "stop_reason": "stop_token",
        "oracle_positions": None,
    }
    r.update(kw)
    return r


def hybrid_cost(cloud: int, corrected: int, handoffs: int) -> dict[str, Any]:
    return {
        "cloud_tokens": cloud,
        "corrected_tokens": corrected,
        "handoffs": handoffs,
        "check_points": 2,
        "bytes_sent": 300,
        "bytes_received": 120,
    }


def make_rows() -> list[dict[str, Any]]:
    """Two suites; the figures the tests expect are worked out in the comments.

    arith (4 tasks): small 1/4, large 3/4, h-0.1 3/4 (RPI 1), h-0.5 2/4 (RPI 0.5).
    sort (3 tasks):  small 1/3, large 3/3, h-0.1 2/3 (RPI 0.5), h-0.5 1/3 (RPI 0).
    all (7 tasks):   small 2/7, large 6/7, h-0.1 5/7 (RPI 3/4), h-0.5 3/7 (RPI 1/4).
    """
    rows: list[dict[str, Any]] = []
    # arith: expected answers 1, 2, 3, 4.
    small_ok, small_ans = [True, False, False, False], ["1", "x", "y", "z"]
    large_ok, large_ans = [True, True, True, False], ["1", "2", "3", "w"]
    oracle = [2, 3, 5, 4]
    for i in range(4):
        rows.append(row("small", "arith", i, small_ok[i], small_ans[i], 10))
        full_trace = {"cloud_tokens": 20, "oracle_positions": oracle[i]}
        rows.append(row("large", "arith", i, large_ok[i], large_ans[i], 20, **full_trace))
        rows.append(row("h-0.1", "arith", i, large_ok[i], large_ans[i], 12, **hybrid_cost(4, 2, 1)))
        rows.append(row("h-0.5", "arith", i, [True, True, False, False][i], "?", 10, **hybrid_cost(1, 1, 1)))
    # sort
    small_ok = [False, False, True]
    oracle = [1, 2, 0]
    for i in range(3):
        rows.append(row("small", "sort", i, small_ok[i], "s" if small_ok[i] else "bad", 5))
        rows.append(row("large", "sort", i, True, "s", 8, cloud_tokens=8, oracle_positions=oracle[i]))
        rows.append(row("h-0.1", "sort", i, [True, False, True][i], "?", 6, **hybrid_cost(2, 0, 1)))
        rows.append(row("h-0.5", "sort", i, small_ok[i], "?", 5, **hybrid_cost(0, 0, 0)))
    # Scrambled: the summary must order the runs itself.
    return rows[::-1]


@pytest.fixture(scope="module")
def summary() -> dict[str, Any]:
    return summarize(make_rows())


# --------------------------------------------------------------------------------------------------
# summarize
# --------------------------------------------------------------------------------------------------


def test_runs_and_suites_order(summary: dict[str, Any]) -> None:
    assert [r["run"] for r in summary["runs"]] == ["small", "h-0.1", "h-0.5", "large"]
    assert summary["suites"] == [ALL_SUITES, "arith", "sort"]
    json.dumps(summary, allow_nan=False)  # JSON-ready


def test_accuracy(summary: dict[str, Any]) -> None:
    arith = summary["by_suite"]["arith"]
    assert arith["small_accuracy"] == 0.25 and arith["large_accuracy"] == 0.75 and arith["tie"] is False
    acc = arith["runs"]["h-0.5"]["accuracy"]
    assert (acc["value"], acc["correct"], acc["n"]) == (0.5, 2, 4)
    assert acc["low"] < 0.5 < acc["high"]
    assert summary["by_suite"]["sort"]["runs"]["large"]["accuracy"]["value"] == 1.0
    assert summary["by_suite"][ALL_SUITES]["runs"]["small"]["accuracy"]["value"] == pytest.approx(2 / 7)


@pytest.mark.parametrize(
    ("suite", "run", "expected"),
    [
        ("arith", "small", 0.0),
        ("arith", "large", 1.0),
        ("arith", "h-0.1", 1.0),
        ("arith", "h-0.5", 0.5),
        ("sort", "h-0.1", 0.5),
        ("sort", "h-0.5", 0.0),
        (ALL_SUITES, "h-0.1", 0.75),
        (ALL_SUITES, "h-0.5", 0.25),
    ],
)
def test_rpi(summary: dict[str, Any], suite: str, run: str, expected: float) -> None:
    r = summary["by_suite"][suite]["runs"][run]["rpi"]
    assert r["estimate"] == pytest.approx(expected)
    assert r["n_resamples"] == 2000
    if r["low"] is not None:
        assert r["low"] <= r["estimate"] <= r["high"]


def test_baseline_rpi_intervals_are_points(summary: dict[str, Any]) -> None:
    small = summary["by_suite"][ALL_SUITES]["runs"]["small"]["rpi"]
    large = summary["by_suite"][ALL_SUITES]["runs"]["large"]["rpi"]
    assert (small["low"], small["high"]) == (0.0, 0.0)
    assert (large["low"], large["high"]) == (1.0, 1.0)


def test_costs(summary: dict[str, Any]) -> None:
    h = summary["by_suite"]["arith"]["runs"]["h-0.1"]
    assert h["cloud_fraction"] == pytest.approx(24 / 48)  # 4 cloud + 2 corrected of 12, four times
    assert h["handoffs_per_task"] == 1.0
    assert h["handoffs_per_100_tokens"] == pytest.approx(100 * 4 / 48)
    assert h["check_points_per_100_tokens"] == pytest.approx(100 * 8 / 48)
    assert h["up_bytes_per_token"] == pytest.approx(1200 / 48)
    assert h["down_bytes_per_token"] == pytest.approx(480 / 48)
    assert h["mean_tokens"] == 12.0
    assert (h["total_seconds"], h["mean_seconds"]) == (8.0, 2.0)
    assert h["unchecked_tokens"] == 0
    assert summary["by_suite"]["arith"]["runs"]["h-0.5"]["cloud_fraction"] == pytest.approx(0.2)
    pooled = summary["by_suite"][ALL_SUITES]["runs"]
    assert pooled["h-0.1"]["cloud_fraction"] == pytest.approx((24 + 6) / (48 + 18))
    assert pooled["small"]["cloud_fraction"] == 0.0
    assert pooled["large"]["cloud_fraction"] == 1.0


def test_oracle(summary: dict[str, Any]) -> None:
    # arith: large right and small wrong on tasks 1 and 2: 3 + 5 positions; tokens 20 + 20 (P's
    # answers) + 10 + 10 (Q's answers on tasks 0 and 3).
    o = summary["by_suite"]["arith"]["oracle"]
    assert (o["cloud_tokens"], o["tokens"], o["tasks_from_large"]) == (8, 60, 2)
    assert o["cloud_fraction"] == pytest.approx(8 / 60)
    assert o["accuracy"]["value"] == 0.75
    assert o["rpi"]["estimate"] == 1.0
    # sort: tasks 0 and 1 from large: 1 + 2 positions over 8 + 8 + 5 tokens.
    assert summary["by_suite"]["sort"]["oracle"]["cloud_fraction"] == pytest.approx(3 / 21)
    pooled = summary["by_suite"][ALL_SUITES]["oracle"]
    assert pooled["cloud_fraction"] == pytest.approx(11 / 81)
    assert pooled["accuracy"]["value"] == pytest.approx(6 / 7)
    assert pooled["rpi"]["estimate"] == 1.0


def test_oracle_exact(summary: dict[str, Any]) -> None:
    # arith: answers differ on tasks 1, 2 and 3 (large is wrong on 3 too, but differently):
    # 3 + 5 + 4 positions over 20 + 20 + 20 + 10 tokens; accuracy unchanged.
    o = summary["by_suite"]["arith"]["oracle_exact"]
    assert (o["cloud_tokens"], o["tokens"], o["tasks_from_large"]) == (12, 70, 3)
    assert o["accuracy"]["value"] == 0.75
    assert o["rpi"]["estimate"] == 1.0


def test_oracle_none_without_full_trace() -> None:
    rows = make_rows()
    for r in rows:
        if r["run"] == "large" and r["suite"] == "sort" and r["task_id"].endswith("2"):
            r["oracle_positions"] = None
    s = summarize(rows)
    assert s["by_suite"]["sort"]["oracle"] is None
    assert s["by_suite"]["sort"]["oracle_exact"] is None
    assert s["by_suite"][ALL_SUITES]["oracle"] is None
    assert s["by_suite"]["arith"]["oracle"] is not None
    assert "| oracle (P's answer where only P is right) | — | — | n/a |" in markdown(s)


def test_pairs_only_tasks_in_all_three_runs() -> None:
    # Drop h-0.5's arith task 0 (the one small gets right): RPI uses tasks 1-3 only,
    # small 0/3, large 2/3, h-0.5 1/3 -> 0.5; its accuracy uses its own 3 tasks.
    rows = [r for r in make_rows() if not (r["run"] == "h-0.5" and r["task_id"] == "arith-0000")]
    h = summarize(rows)["by_suite"]["arith"]["runs"]["h-0.5"]
    assert h["rpi"]["n_tasks"] == 3
    assert h["rpi"]["estimate"] == pytest.approx(0.5)
    assert h["accuracy"]["value"] == pytest.approx(1 / 3)


def test_tie_suite(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    rows = make_rows()
    for run in RUNS:
        for i in range(2):
            rows.append(row(run, "easy", i, True, "ok", 4, oracle_positions=0 if run == "large" else None))
    s = summarize(rows)
    easy = s["by_suite"]["easy"]
    assert easy["tie"] is True
    assert all(m["rpi"]["estimate"] is None for m in easy["runs"].values())
    text = markdown(s)
    assert "| easy | 2 | 1.00 | 1.00 | 0.00 | tie: RPI undefined |" in text
    assert "**Tie** on `easy`" in text
    with caplog.at_level(logging.WARNING, logger="handoff.edge.evaluation.report"):
        plot_rpi_vs_threshold(s, tmp_path / "rpi.png")
        plot_frontier(s, tmp_path / "frontier.png")
    assert (tmp_path / "rpi.png").read_bytes().startswith(PNG_MAGIC)
    assert (tmp_path / "frontier.png").read_bytes().startswith(PNG_MAGIC)
    assert sum("suite easy" in rec.getMessage() for rec in caplog.records) == 2


def test_only_tied_suites_still_plot(tmp_path: Path) -> None:
    rows = [row(run, "easy", 0, True, "ok", 4) for run in RUNS]
    s = summarize(rows)
    assert s["by_suite"][ALL_SUITES]["tie"] is True
    plot_rpi_vs_threshold(s, tmp_path / "rpi.png")
    plot_frontier(s, tmp_path / "frontier.png")
    assert (tmp_path / "rpi.png").stat().st_size > 0
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_bad_rows() -> None:
    good = make_rows()
    with pytest.raises(HandoffError, match="missing tokens"):
        summarize([{k: v for k, v in good[0].items() if k != "tokens"}])
    with pytest.raises(HandoffError, match="mode must be"):
        summarize([{**good[0], "mode": "medium"}])
    with pytest.raises(HandoffError, match="twice"):
        summarize([good[0], good[0]])
    small = next(r for r in good if r["mode"] == "small")
    assert small["run"] == "small"
    renamed = [{**r, "run": "q-a"} if r["mode"] == "small" else r for r in good]
    with pytest.raises(HandoffError, match="at most one small run"):
        summarize([*renamed, {**small, "run": "q-b"}])
    # Beside a baseline named "small", another edge-only run (an expert alone) is one more run.
    s = summarize([*good, {**small, "run": "small-2", "correct": not small["correct"]}])
    assert [r["run"] for r in s["runs"]][:2] == ["small", "small-2"]
    with pytest.raises(HandoffError, match="earlier rows"):
        summarize([*good, {**good[1], "task_id": "new", "threshold": 0.9}])
    with pytest.raises(HandoffError, match="reserved"):
        summarize([{**good[0], "suite": ALL_SUITES}])


# --------------------------------------------------------------------------------------------------
# Markdown, plots, report
# --------------------------------------------------------------------------------------------------


def test_markdown(summary: dict[str, Any]) -> None:
    text = markdown(summary)
    assert "## Accuracy per suite" in text
    assert "| arith | 4 | 0.25 | 0.75 | 0.50 |  |" in text
    assert "## arith" in text and "## sort" in text and "## all suites (pooled)" in text
    # The arith table: h-0.1 then h-0.5 between small and large, with their figures.
    arith = text.split("## arith")[1].split("## sort")[0]
    order = [arith.index(f"| {name} |") for name in ("small", "h-0.1", "h-0.5", "large")]
    assert order == sorted(order)
    assert "| h-0.1 | 0.1 | 8 | 4 | 0.75 [" in arith
    assert "(3/4) | 1.00 [" in arith
    assert "| 50.0% | 1.00 | 25 | 10 | 2.00 |" in arith
    assert "| h-0.5 | 0.5 | 8 | 4 | 0.50 [" in arith
    assert "(2/4) | 0.50 [" in arith
    assert "| 20.0% |" in arith
    assert "| small | — | — | 4 | 0.25 [" in arith
    assert "| 13.3% |" in arith  # oracle: 8 / 60
    assert "| 17.1% |" in arith  # exact oracle: 12 / 70
    assert "n/a" not in arith


def test_several_check_intervals_plot(tmp_path: Path) -> None:
    RUNS["h-0.1-n4"] = ("hybrid", 0.1, 4)
    try:
        rows = make_rows()
        rows += [{**r, "run": "h-0.1-n4", "check_interval": 4} for r in rows if r["run"] == "h-0.1"]
        s = summarize(rows)
    finally:
        del RUNS["h-0.1-n4"]
    assert [r["run"] for r in s["runs"]] == ["small", "h-0.1-n4", "h-0.1", "h-0.5", "large"]
    plot_rpi_vs_threshold(s, tmp_path / "rpi.png")
    plot_frontier(s, tmp_path / "frontier.png")
    assert (tmp_path / "rpi.png").stat().st_size > 0
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_write_report(tmp_path: Path) -> None:
    meta = {"command": "handoff eval --suites arith,sort", "models": ["q-0.5b", "p-7b"], "date": "2025-01-01"}
    out = tmp_path / "report"
    s = write_report(make_rows(), out, meta)
    for name in ("rpi_vs_threshold.png", "frontier.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    doc = json.loads((out / "summary.json").read_text())
    assert doc["meta"] == meta
    assert doc["by_suite"]["arith"]["runs"]["h-0.5"]["rpi"]["estimate"] == 0.5
    assert doc["runs"] == s["runs"]
    md = (out / "report.md").read_text()
    assert md.startswith("# Handoff evaluation")
    assert "- **command:** `handoff eval --suites arith,sort`" in md
    assert "- **models:** q-0.5b, p-7b" in md
    assert markdown(s) in md
