"""The real default pair, end to end (fetched by `make test` before pytest runs)."""

from __future__ import annotations

import json
import math
import shutil

import pytest

from handoff.shared.model_info import load_model_info
from handoff.shared.models import REGISTRY, ModelRef, ensure_model, sha256_file
from handoff.shared.settings import DEFAULT_CLOUD_MODEL, DEFAULT_EDGE_MODEL
from handoff.shared.vocab import check_vocabularies

pytestmark = pytest.mark.real_models


@pytest.fixture(scope="module")
def pair():
    return ensure_model(DEFAULT_EDGE_MODEL), ensure_model(DEFAULT_CLOUD_MODEL)


def test_fetched_files_match_the_published_sha256(pair):
    for name, path in zip((DEFAULT_EDGE_MODEL, DEFAULT_CLOUD_MODEL), pair, strict=True):
        spec = REGISTRY[name]
        assert path.stat().st_size == spec.size
        assert sha256_file(path) == spec.sha256


def test_info_reports_the_fields(pair, run_handoff):
    proc = run_handoff("models", "info", DEFAULT_EDGE_MODEL, "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["architecture"] == "qwen2"
    assert info["quantization"] == "Q4_K_M"
    assert info["context_length"] == 32768
    assert info["vocab_size"] == 151936
    assert 0.4e9 < info["parameter_count"] < 0.7e9
    assert len(info["fingerprint_sha256"]) == 64
    cloud = json.loads(run_handoff("models", "info", DEFAULT_CLOUD_MODEL, "--json").stdout)
    assert 1.4e9 < cloud["parameter_count"] < 1.9e9
    assert cloud["fingerprint_sha256"] == info["fingerprint_sha256"]  # same vocabulary


def test_the_pair_shares_its_vocabulary(pair):
    (_, q_vocab), (_, p_vocab) = (load_model_info(ModelRef("gguf", p, p.name)) for p in pair)
    check_vocabularies(p_vocab, q_vocab)
    assert q_vocab.fingerprint == p_vocab.fingerprint
    assert q_vocab.tokens[151644] == b"<|im_start|>"


def test_verify_detects_a_flipped_byte_in_a_real_model(pair, tmp_path, run_handoff):
    spec = REGISTRY[DEFAULT_EDGE_MODEL]
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    copy = cache / "models" / spec.filename
    shutil.copyfile(pair[0], copy)
    env = {"HANDOFF_CACHE_DIR": str(cache)}
    ok = run_handoff("models", "verify", DEFAULT_EDGE_MODEL, env=env)
    assert ok.returncode == 0, ok.stderr
    with open(copy, "r+b") as f:
        f.seek(spec.size // 2)
        byte = f.read(1)
        f.seek(spec.size // 2)
        f.write(bytes([byte[0] ^ 0x40]))
    bad = run_handoff("models", "verify", DEFAULT_EDGE_MODEL, env=env)
    assert bad.returncode == 1
    assert "corrupt: sha256" in bad.stderr and "Traceback" not in bad.stderr
    listed = json.loads(run_handoff("models", "list", "--json", env=env).stdout)
    assert not next(r for r in listed if r["name"] == DEFAULT_EDGE_MODEL)["fetched"]


def test_divergence_report_on_the_default_pair(pair, run_handoff):
    proc = run_handoff("divergence", "--json", "--max-tokens", "24")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    rows, summary = report["positions"], report["summary"]
    assert 1 <= len(rows) <= 24 and summary["positions"] == len(rows)
    for r in rows:
        assert 0.0 <= r["kl_topk"] <= r["kl"] + 1e-6  # the top-k estimate is a lower bound
        assert math.isfinite(r["kl"]) and r["q_entropy"] >= 0
    # Same family, same tokenizer: the models mostly agree (DESIGN: 85-92% top-1 on code).
    assert summary["top1_agreement"] >= 0.6
    assert 0.0 < summary["kl_mean"] < 2.0
    assert summary["kl_topk_fraction"] > 0.8
    assert report["edge"]["fingerprint"] == report["cloud"]["fingerprint"]


def test_hybrid_generation_on_the_default_pair(pair, tmp_path, run_handoff):
    """The real pair end to end through real gRPC: `handoff generate` with its embedded verifier (KL
    rollback; the default policy is test_default_policy.py's)."""
    trace = tmp_path / "trace.jsonl"
    proc = run_handoff("generate", "--prompt", "Write a Python function that adds two numbers.", "--max-tokens", "24",
                   "--policy", "rollback", "--threshold", "0.3", "--trace", str(trace), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["tokens"] == 24 or summary["stop_reason"] == "stop_token"
    assert summary["by_source"]["edge"] > 0  # the pair agrees on most of a short code answer
    assert summary["check_points"] >= 1 and summary["bytes_sent"] > 0 and summary["text"].strip()
    records = [json.loads(line) for line in trace.read_text().splitlines()]
    assert [r["record"] for r in records] == ["generation"] + ["token"] * summary["tokens"] + ["summary"]
    assert "".join(r["text"] for r in records[1:-1]) == summary["text"]
    assert all(r["checked"] for r in records[1:-1])
