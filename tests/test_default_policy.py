"""Policy "auto", the default of generate, chat and serve-edge: the shipped router on the default pair,
the KL rollback policy on any other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from handoff.edge.policy import PolicyConfig, RouterModel, load_router
from handoff.edge.policy.default import AUTO, auto_policy, shipped_router
from handoff.edge.policy.features import SCALAR_FEATURES
from handoff.edge.settings import EdgeSettings


def test_auto_is_the_default_and_its_fallback_is_rollback(monkeypatch) -> None:
    settings = EdgeSettings()
    assert settings.policy == AUTO and settings.policy_config().kind == "rollback"
    assert EdgeSettings(policy="correction").policy_config().kind == "correction"
    monkeypatch.setenv("HANDOFF_EDGE_POLICY", "rollback")
    assert EdgeSettings().policy == "rollback"


def test_the_shipped_router_is_package_data_with_its_calibration() -> None:
    router = load_router(shipped_router())
    assert router.hidden_dims == 64 and router.override is not None and router.override.hidden_dims == 64
    calibration = router.meta["calibration"]
    assert router.threshold == pytest.approx(0.09593, abs=5e-6) and calibration["target_checked"] == 0.2
    assert router.threshold != calibration["file_threshold"]  # the validation runs moved it


def test_auto_falls_back_to_rollback_on_another_vocabulary(tiny_gguf_a, tmp_path: Path) -> None:
    from handoff.edge.cloud_harness import vocabulary_of

    vocab = vocabulary_of(tiny_gguf_a)
    base = PolicyConfig(threshold=0.4)
    assert auto_policy(base, vocab) == base  # the shipped router is the default pair's
    # A router file made for this vocabulary (--router) is taken, with deferred checks.
    f = len(SCALAR_FEATURES)
    path = tmp_path / "r.json"
    fp = vocab.fingerprint
    RouterModel(np.zeros(f), np.ones(f), ((np.zeros((f, 1)), np.zeros(1)),), 0.5, fp.digest.hex(),
                fp.vocab_size).save(path)  # fmt: skip
    mine = PolicyConfig(router=str(path))
    chosen = auto_policy(mine, vocab)
    assert chosen.kind == "router" and chosen.router == str(path) and chosen.defer_checks
    assert chosen.top_k == mine.top_k and chosen.lookahead_windows == mine.lookahead_windows
    assert auto_policy(mine, vocab, plain=False) == mine  # a cross-tokenizer session or experts


@pytest.mark.real_models
def test_generate_on_the_default_pair_runs_the_shipped_router(edge_gguf_path, tmp_path: Path, run_handoff):
    trace = tmp_path / "trace.jsonl"
    proc = run_handoff("generate", "--prompt", "Compute 27 * 10 * 4 - 17. Give the final answer as 'Answer: <n>'.",
                       "--max-tokens", "48", "--trace", str(trace), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    policy = records[0]["policy"]
    assert policy["kind"] == "router" and policy["defer_checks"] is True
    assert Path(policy["router"]) == shipped_router()
    tokens = records[1:-1]
    checked = sum(r["checked"] for r in tokens)
    # Most positions are committed unchecked by design; every check sent was of a committed position.
    assert 0 < checked < len(tokens) and all(
        r["unchecked"] == "by_design" for r in tokens if not r["checked"]
    )
    assert summary["check_points"] == checked == summary["accounting"]["checked_positions"]
    assert summary["accounting"]["other_cloud_tokens"] == 0
    assert all(r["gate_score"] is not None for r in tokens)
