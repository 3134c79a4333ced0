"""scripts/gpu_profile.py: an estimated GPU profile the simulator loads, labelled, reproducible, roofline-shaped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from handoff.edge.simulation.cloud_latency import CloudLatencyModel

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "gpu_profile_h200_1.5b_estimated.json"


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gpu") / "profile.json"
    proc = subprocess.run(
        [sys.executable, "scripts/gpu_profile.py", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ESTIMATED" in proc.stdout and "GPU-s per 1,000 tokens" in proc.stdout
    return out


def test_the_committed_profile_is_what_the_script_writes(written: Path):
    assert json.loads(written.read_text()) == json.loads(COMMITTED.read_text())


def test_labelled_estimated_with_its_derivation(written: Path):
    data = json.loads(written.read_text())
    assert data["estimated"] is True and data["profile"]["estimated"] is True
    d = data["derivation"]
    assert d["numbers"]["kv_bytes_per_token"] == 2 * 28 * 2 * 128 * 2  # layers, KV heads, head dim, bf16
    assert d["numbers"]["weight_bytes"] == pytest.approx(1_543_714_304 * 2)
    assert 100 < d["numbers"]["roofline_crossover_tokens_per_pass"] < 200
    assert CloudLatencyModel.from_bench(written).estimated


def test_roofline_shape(written: Path):
    m = CloudLatencyModel.from_bench(written)
    # Memory-bound: a check of 8 costs what one decode step costs; a long prefill is compute-bound.
    assert m.check_s(8) == pytest.approx(m.decode_s(), rel=0.01)
    assert m.open_s(2048) > 3 * m.open_s(128)
    # Batching amortizes the weights: per-session device time falls with sessions.
    assert m.gpu_seconds_per_token(16) < m.gpu_seconds_per_token(1) / 10
    assert 1e-3 < m.decode_s() < 5e-3  # milliseconds per token for a 1.5B model on this GPU


def test_a_simulated_table_says_estimated(written: Path, tmp_path: Path):
    from handoff.edge.simulation.run import run_simulation
    from handoff.edge.simulation.simulate import EdgeModel

    trace = tmp_path / "t.jsonl"
    lines = [
        {"record": "generation", "prompt_ids": list(range(16)), "policy": {"check_interval": 4}},
        *({"record": "token", "position": 16 + i, "token_id": 5, "source": "cloud"} for i in range(4)),
        {"record": "summary", "mode": "cloud", "open_bytes": [100, 50]},
    ]
    trace.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    rows = run_simulation([trace], CloudLatencyModel.from_bench(written), tmp_path / "sim", rtts_ms=(50.0,),
                          edge=EdgeModel(token_s=0.03))  # fmt: skip
    assert rows[0]["gpu_estimated"] is True
    md = (tmp_path / "sim" / "simulate.md").read_text()
    assert "GPU s/1k tok (estimated)" in md and "**The cloud profile is estimated**" in md
