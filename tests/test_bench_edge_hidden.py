"""scripts/bench_edge.py --hidden both on the tiny model: it runs and reports consistent results.

A smoke test of the benchmark's hidden-state rounds, not a timed test: no ratio is compared with a
target here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # e2e: the benchmark script in a real process


def test_bench_edge_hidden_both(edge_gguf_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench_edge_hidden.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_edge.py"), "--model", "tiny", "--max-tokens", "12",
         "--repeats", "1", "--threads", "1", "--hidden", "both", "--json-out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    hidden = json.loads(out.read_text())["hidden"]
    summary = hidden["summary"]
    for key in ("plain_tok_s", "hidden_off_tok_s", "hidden_on_tok_s", "on_ratio", "off_ratio", "on_vs_off"):
        assert summary[key] > 0, key
    # Greedy everywhere, and the hidden state changes nothing: same tokens, same views bit for bit.
    assert summary["tokens_match"] is True and summary["views_identical"] is True
    (round_,) = hidden["rounds"]
    assert sorted(round_["order"]) == ["hidden_off", "hidden_on", "plain"]
    by_batch = {d["batch"]: d for d in hidden["scoring"]}
    assert set(by_batch) == {256, 1}
    exact = by_batch[1]  # one decode per token: the step path itself
    assert exact["tokens"] >= 1 and exact["topk_same"] == exact["tokens"]
    assert exact["hidden_max_abs"] == exact["token_logprob_max_abs"] == exact["topk_logprobs_max_abs"] == 0.0
    assert by_batch[256]["hidden_rel_l2_max"] < 1e-3  # the tiny F32 model: batched agrees to rounding
    assert "hidden off" in proc.stdout and "score_sequence(batch=1)" in proc.stdout
