"""The P-vs-Q report and model info on the tiny models; vocabulary mismatch against the real edge model."""

from __future__ import annotations

import json

import pytest

from handoff.shared.compare import compare
from handoff.shared.errors import VocabularyMismatch
from handoff.shared.llama_cpp_model import LlamaCppModel
from handoff.shared.model_info import load_model_info
from handoff.shared.models import ModelRef
from handoff.shared.settings import HandoffSettings
from handoff.shared.vocab import check_vocabularies


def open_model(path):
    return LlamaCppModel(path, n_ctx=512, n_threads=1)


@pytest.fixture(scope="module")
def prompt_ids(tiny_gguf_a):
    with open_model(tiny_gguf_a) as m:
        return m.tokenize(m.chat_prompt([{"role": "user", "content": "Sort a list in Python."}]))


def test_a_model_against_itself_has_zero_divergence(tiny_gguf_a, prompt_ids):
    with open_model(tiny_gguf_a) as p, open_model(tiny_gguf_a) as q:
        result = compare(p, q, prompt_ids, max_tokens=12, k=5)
    assert len(result.rows) == 12
    assert result.summary["kl_max"] < 1e-9
    assert result.summary["top1_agreement"] == 1.0
    assert result.summary["flagged_fraction"] == 0.0


def test_different_models_are_flagged(tiny_gguf_a, tiny_gguf_b, prompt_ids):
    with open_model(tiny_gguf_a) as p, open_model(tiny_gguf_b) as q:
        result = compare(p, q, prompt_ids, max_tokens=12, k=5, threshold=0.5)
    s = result.summary
    assert s["kl_mean"] > 1.0 and s["flagged_fraction"] > 0.5
    for row in result.rows:
        assert 0.0 <= row.kl_topk <= row.kl + 1e-9  # lower bound, position by position
    # P's greedy continuation is what P itself generates.
    with open_model(tiny_gguf_a) as p:
        p.eval(prompt_ids)
        for row in result.rows:
            assert row.token_id == int(p.next_logits().argmax())
            p.eval([row.token_id])


def test_near_model_is_mostly_below_threshold(tiny_gguf_a, tiny_gguf_a_near, prompt_ids):
    with open_model(tiny_gguf_a) as p, open_model(tiny_gguf_a_near) as q:
        result = compare(p, q, prompt_ids, max_tokens=12, k=20, threshold=0.5)
    assert 0.0 < result.summary["kl_mean"] < 0.2
    assert result.summary["flagged_fraction"] < 0.2


def test_info_of_a_tiny_gguf(tiny_gguf_a, tmp_path):
    settings = HandoffSettings(cache_dir=tmp_path)
    info, vocab = load_model_info(ModelRef("gguf", tiny_gguf_a, "tiny-a"), settings)
    assert (info.architecture, info.vocab_size, info.context_length) == ("qwen2", 1022, 2048)
    assert info.quantization == "ALL_F32"
    assert info.parameter_count > 100_000
    assert vocab.tokens[1001] == b"<|im_start|>"
    again, _ = load_model_info(ModelRef("gguf", tiny_gguf_a, "tiny-a"), settings)  # from the cache
    assert again == info


def test_tiny_vocabulary_differs_from_the_real_one(tiny_gguf_a, edge_gguf_path, tmp_path):
    """The tiny tokenizer keeps ids 0..999 and renumbers the specials after them: id 1000 differs."""
    _, tiny = load_model_info(
        ModelRef("gguf", tiny_gguf_a, "tiny-a.gguf"), HandoffSettings(cache_dir=tmp_path)
    )
    _, real = load_model_info(ModelRef("gguf", edge_gguf_path, "edge.gguf"))  # the user cache: parsed once
    with pytest.raises(VocabularyMismatch, match=r"first differing ids: 1000 \('<\|endoftext\|>' vs"):
        check_vocabularies(tiny, real)


def test_divergence_cli_refuses_mismatched_vocabularies(tiny_gguf_a, run_handoff):
    proc = run_handoff("divergence", "--edge", tiny_gguf_a)
    assert proc.returncode == 2
    assert "first differing ids: 1000" in proc.stderr and "Traceback" not in proc.stderr


def test_divergence_cli_json_on_tiny_models(tiny_gguf_a, tiny_gguf_b, run_handoff):
    proc = run_handoff(
        "divergence", "--cloud", tiny_gguf_a, "--edge", tiny_gguf_b, "--max-tokens", "6", "--top-k", "10", "--json",
        env={"HANDOFF_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["top_k"] == 10 and len(report["positions"]) == 6
    assert report["cloud"]["vocab_size"] == report["edge"]["vocab_size"] == 1022
