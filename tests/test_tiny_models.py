"""The tiny test models: same tokens and same distributions in llama.cpp and transformers.

Everything else in the suite that uses `tiny_gguf_*` relies on these properties: if llama.cpp and
transformers disagreed on a tiny model, a test of the edge (llama.cpp) against the cloud
(transformers) would measure the runtimes, not the models.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from handoff.shared.divergence import kl_divergence, log_softmax
from handoff.shared.llama_cpp_model import LlamaCppModel
from handoff.shared.tiny_gguf import (
    NEAR_SCALE,
    SEED_A,
    SEED_NEAR,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNUSED,
    sha256_of,
    write_tiny_qwen2_gguf,
)

N_CTX = 512
# One thread, not two: a tiny model gains nothing from a second thread, and on a 2-core machine with
# any other busy process llama.cpp's two threads wait on each other at every op. Measured while
# another process held one core: 106 one-token decodes took 0.07 s with 1 thread, 0.36-31 s with 2.
LLAMA_THREADS = 1
N_GREEDY = 8
# llama.cpp keeps its KV cache in F16; transformers computes in F32. DESIGN measured KL ~2e-7.
RUNTIME_KL_MAX = 1e-3

CHAT_PROMPT = (
    "<|im_start|>system\nYou are a helpful coding assistant.<|im_end|>\n"
    "<|im_start|>user\nWrite a Python function that returns the sum of a list.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
PLAIN_PROMPT = "The quick brown fox jumps over the lazy dog. def total(items):\n    return sum(items)\n"
PROMPTS = {"chat": CHAT_PROMPT, "plain": PLAIN_PROMPT}

TOKENIZER_STRINGS = [
    "<|im_start|>user\nhello<|im_end|>\n",
    CHAT_PROMPT,
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)  # slow\n",
    "for (int i = 0; i < 10; ++i) { x[i] = i * 3.14159f; }\t\t// 12345678",
    "naïve café — Ünïcödé: 日本語のテキスト, emoji 🙂👍🏽, Ελληνικά, العربية",
    "   leading spaces, trailing spaces   \n\n\n  and blank lines\r\n",
    "<|fim_prefix|>def f():\n    <|fim_suffix|>\n<|fim_middle|>",
    '<tool_call>\n{"name": "f"}\n</tool_call><|endoftext|>',
]


# --------------------------------------------------------------------------------------------------
# Runtimes
# --------------------------------------------------------------------------------------------------


def open_llama(path: Path) -> LlamaCppModel:
    return LlamaCppModel(path, n_ctx=N_CTX, n_threads=LLAMA_THREADS)


def llama_greedy(llm, prompt_ids: Sequence[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy continuation of `n` tokens and the log-probs each was chosen from: ([n], [n, V])."""
    llm.reset()
    llm.eval(list(prompt_ids))
    tokens, rows = [], []
    for _ in range(n):
        row = llm.next_logprobs()
        tokens.append(int(np.argmax(row)))
        rows.append(row)
        llm.eval([tokens[-1]])
    return tokens, np.stack(rows)


def llama_position_logprobs(llm, ids: Sequence[int]) -> np.ndarray:
    """Next-token log-probs after every prefix of `ids` ([len(ids), V]), one token per decode."""
    llm.reset()
    rows = []
    for token in ids:
        llm.eval([token])
        rows.append(llm.next_logprobs())
    return np.stack(rows)


def hf_position_logprobs(model, ids: Sequence[int]) -> np.ndarray:
    """Next-token log-probs after every prefix of `ids` ([len(ids), V]) from one forward pass."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([list(ids)], dtype=torch.long)).logits[0]
    return log_softmax(logits.to(torch.float64).numpy())


@pytest.fixture(scope="module")
def llama_a(tiny_gguf_a: Path):
    llm = open_llama(tiny_gguf_a)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def hf_a(tiny_gguf_a: Path):
    """(model, tokenizer) of tiny model A in transformers, float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(tiny_gguf_a.parent), tiny_gguf_a.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return model, tokenizer


# --------------------------------------------------------------------------------------------------
# The reduced tokenizer and the files
# --------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_contents(tiny_tokenizer) -> None:
    tok = tiny_tokenizer
    n_normal = sum(t == TOKEN_NORMAL for t in tok.token_types)
    assert n_normal == 1000
    assert tok.token_types[:n_normal] == (TOKEN_NORMAL,) * n_normal
    assert tok.source_ids[:n_normal] == tuple(range(n_normal))
    specials = tok.tokens[n_normal:]
    for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>"):
        assert name in specials
    assert TOKEN_UNUSED not in tok.token_types and not any(t.startswith("[PAD") for t in tok.tokens)
    assert all(tok.token_types[tok.id_of(name)] == TOKEN_CONTROL for name in ("<|im_start|>", "<|im_end|>"))
    assert tok.tokens[tok.eos_token_id] == "<|im_end|>"
    assert tok.tokens[tok.bos_token_id] == "<|endoftext|>"
    assert tok.tokens[tok.padding_token_id] == "<|endoftext|>"
    assert (tok.model, tok.pre) == ("gpt2", "qwen2")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    vocab = set(tok.tokens)
    assert len(vocab) == tok.n_vocab
    assert tok.merges, "no merges kept"
    for merge in tok.merges:
        left, right = merge.split(" ")
        assert left in vocab and right in vocab and left + right in vocab


def test_tiny_files_small_and_deterministic(
    tiny_tokenizer, tiny_gguf_a: Path, tiny_gguf_b: Path, tiny_gguf_a_near: Path, tmp_path: Path
) -> None:
    for path in (tiny_gguf_a, tiny_gguf_b, tiny_gguf_a_near):
        assert 0 < path.stat().st_size < 5_000_000, path
    again = write_tiny_qwen2_gguf(tmp_path / "again.gguf", tiny_tokenizer, SEED_A)
    assert sha256_of(again) == sha256_of(tiny_gguf_a)
    near_again = write_tiny_qwen2_gguf(
        tmp_path / "near-again.gguf",
        tiny_tokenizer,
        SEED_NEAR,
        perturb_from_seed=SEED_A,
        perturb_scale=NEAR_SCALE,
    )
    assert sha256_of(near_again) == sha256_of(tiny_gguf_a_near)
    assert len({sha256_of(p) for p in (tiny_gguf_a, tiny_gguf_b, tiny_gguf_a_near)}) == 3


# --------------------------------------------------------------------------------------------------
# llama.cpp vs transformers
# --------------------------------------------------------------------------------------------------


def test_same_vocabulary_size(tiny_tokenizer, llama_a, hf_a) -> None:
    model, tokenizer = hf_a
    assert llama_a.n_vocab == model.config.vocab_size == len(tokenizer) == tiny_tokenizer.n_vocab
    assert model.config.tie_word_embeddings is False
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.parametrize("text", TOKENIZER_STRINGS, ids=range(len(TOKENIZER_STRINGS)))
def test_same_token_ids(llama_a, hf_a, text: str) -> None:
    _, tokenizer = hf_a
    ids = llama_a.tokenize(text)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert llama_a.detokenize(ids).decode("utf-8") == text
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hello"}],
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Sum a list in Python."},
            {"role": "assistant", "content": "sum(xs)"},
            {"role": "user", "content": "And in C?"},
        ],
    ],
    ids=["default-system", "multi-turn"],
)
def test_same_chat_template(tiny_tokenizer, llama_a, hf_a, messages) -> None:
    _, tokenizer = hf_a
    assert llama_a.metadata["tokenizer.chat_template"] == tiny_tokenizer.chat_template
    from_gguf = llama_a.chat_prompt(messages)
    from_hf = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert from_hf == from_gguf
    assert from_gguf.endswith("<|im_start|>assistant\n")
    assert f"<|im_start|>user\n{messages[-1]['content']}<|im_end|>\n" in from_gguf
    assert tokenizer(from_hf, add_special_tokens=False)["input_ids"] == llama_a.tokenize(from_gguf)


@pytest.mark.parametrize("kind", sorted(PROMPTS))
def test_same_next_token_distribution(llama_a, hf_a, kind: str) -> None:
    model, _ = hf_a
    prompt = llama_a.tokenize(PROMPTS[kind])
    greedy, llama_lp = llama_greedy(llama_a, prompt, N_GREEDY)
    # One forward pass over the prompt and the greedy tokens gives the same N_GREEDY positions:
    # the last prompt position, then after each greedy token but the last.
    hf_lp = hf_position_logprobs(model, prompt + greedy[:-1])[len(prompt) - 1 :]
    assert hf_lp.shape == llama_lp.shape == (N_GREEDY, model.config.vocab_size)

    kl = kl_divergence(llama_lp, hf_lp)
    assert kl.max() < RUNTIME_KL_MAX, kl
    assert (hf_lp.argmax(-1) == llama_lp.argmax(-1)).all()
    assert hf_lp.argmax(-1).tolist() == greedy
    # The last prompt position on its own (llama.cpp evaluating the prompt in one batch).
    llama_a.reset()
    llama_a.eval(prompt)
    assert kl_divergence(llama_a.next_logprobs(), hf_lp[0]) < RUNTIME_KL_MAX


# --------------------------------------------------------------------------------------------------
# The models differ as intended
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_ids(llama_a) -> list[int]:
    return llama_a.tokenize(CHAT_PROMPT + "def total(items):\n    return sum(items)\n")


@pytest.fixture(scope="module")
def logprobs_a(llama_a, chat_ids) -> np.ndarray:
    return llama_position_logprobs(llama_a, chat_ids)


def test_distribution_is_not_uniform(logprobs_a: np.ndarray) -> None:
    entropy = -(np.exp(logprobs_a) * logprobs_a).sum(-1)
    uniform = math.log(logprobs_a.shape[-1])
    assert entropy.max() < uniform - 1.0, (entropy.max(), uniform)
    assert np.exp(logprobs_a).max(-1).mean() > 0.1


def test_model_b_disagrees_with_a(tiny_gguf_b: Path, chat_ids, logprobs_a: np.ndarray) -> None:
    llm = open_llama(tiny_gguf_b)
    try:
        logprobs_b = llama_position_logprobs(llm, chat_ids)
    finally:
        llm.close()
    kl = kl_divergence(logprobs_a, logprobs_b)
    assert kl.mean() > 1.0, kl


def test_model_a_near_is_close_to_a(tiny_gguf_a_near: Path, chat_ids, logprobs_a: np.ndarray) -> None:
    llm = open_llama(tiny_gguf_a_near)
    try:
        logprobs_near = llama_position_logprobs(llm, chat_ids)
    finally:
        llm.close()
    kl = kl_divergence(logprobs_a, logprobs_near)
    assert 0.0 < kl.mean() < 0.2, kl
    assert (kl > 1e-6).all(), kl  # close, but different at every position


def test_detokenize_writes_out_tokens_longer_than_32_bytes(edge_gguf_path: Path) -> None:
    """Runs of spaces that indent code are single Qwen2.5 tokens of up to ~80 bytes: llama-cpp-python's
    own detokenize (a 32-byte buffer) drops them; LlamaCppModel's must not."""
    with LlamaCppModel(edge_gguf_path, n_ctx=64, n_threads=1) as m:
        text = "def f():\n" + " " * 40 + "return 1\n<|im_end|>"
        ids = m.tokenize(text)
        assert any(len(m.detokenize([t])) > 32 for t in ids)
        assert m.detokenize(ids) == text.encode()
