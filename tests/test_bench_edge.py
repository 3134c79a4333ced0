"""scripts/bench_edge.py end to end on the tiny model: it runs, agrees with plain llama.cpp, writes JSON.

A smoke test of the benchmark, not a timed test: no figure is compared with a target here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # e2e: the benchmark script in a real process


def test_bench_edge_tiny_writes_ratios_and_matching_tokens(edge_gguf_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench_edge.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_edge.py"), "--model", "tiny", "--max-tokens", "16",
         "--repeats", "1", "--json-out", str(out)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    summary = result["summary"]
    for key in ("ratio", "ratio_with_prefill", "plain_tok_s", "hybrid_tok_s"):
        assert summary[key] > 0, key
    # Greedy on both sides, and the cloud always agrees: the same tokens, all from the edge, checked.
    assert summary["tokens_match"] is True and summary["first_mismatch"] is None
    (pair,) = result["pairs"]
    assert pair["hybrid_tokens"] == pair["plain_tokens"] >= 1
    assert pair["handoffs"] == 0 and pair["check_points"] >= 1
    assert result["topk_overhead"]["view_us"] > 0 and result["topk_overhead"]["decode_us"] > 0
    assert "ratio" in proc.stdout and "hybrid = plain" in proc.stdout
