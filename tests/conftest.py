"""Session fixtures shared by the test suite.

Tiny Qwen2 models (see `tiny_gguf.py`): the real Qwen2.5 tokenizer cut down to ~1,000 tokens, random
weights, < 1 MB each. They load in llama.cpp and in transformers and give the same distributions in
both, so the whole edge/cloud pipeline can be tested in seconds without the real models' compute.
The only real file they need is the edge GGUF, read once per session for its tokenizer metadata.

Heavy imports (llama_cpp, torch, transformers, shared.models) stay inside the fixtures and tests that
need them: collecting the suite must stay fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from handoff.shared.tiny_gguf import (
    NEAR_SCALE,
    SEED_A,
    SEED_B,
    SEED_NEAR,
    TinyTokenizer,
    extract_tokenizer,
    write_tiny_qwen2_gguf,
)

EDGE_MODEL = "qwen2.5-coder-0.5b-instruct-q4_k_m"


@pytest.fixture(scope="session")
def edge_gguf_path() -> Path:
    """The verified edge GGUF (fetched into the model cache on first use; `make test` fetches it first)."""
    from handoff.shared.models import ensure_model

    return ensure_model(EDGE_MODEL)


@pytest.fixture(scope="session")
def tiny_tokenizer(edge_gguf_path: Path) -> TinyTokenizer:
    """The first 1,000 Qwen2.5 tokens, their merges and the special tokens (read once: ~10 s)."""
    return extract_tokenizer(edge_gguf_path, keep=1000)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for every tiny GGUF: `from_pretrained(dir, gguf_file=name)` takes the folder."""
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_gguf_a(tiny_tokenizer: TinyTokenizer, tiny_model_dir: Path) -> Path:
    """Tiny Qwen2, seed 1."""
    return write_tiny_qwen2_gguf(tiny_model_dir / "tiny-a.gguf", tiny_tokenizer, SEED_A)


@pytest.fixture(scope="session")
def tiny_gguf_b(tiny_tokenizer: TinyTokenizer, tiny_model_dir: Path) -> Path:
    """Tiny Qwen2, seed 2: other weights, same tokenizer. Disagrees with A by several nats."""
    return write_tiny_qwen2_gguf(tiny_model_dir / "tiny-b.gguf", tiny_tokenizer, SEED_B)


@pytest.fixture(scope="session")
def tiny_gguf_a_near(tiny_tokenizer: TinyTokenizer, tiny_model_dir: Path) -> Path:
    """A's weights plus a little noise: KL(A || A-near) is small (~0.02 nats) but not zero."""
    return write_tiny_qwen2_gguf(
        tiny_model_dir / "tiny-a-near.gguf",
        tiny_tokenizer,
        SEED_NEAR,
        perturb_from_seed=SEED_A,
        perturb_scale=NEAR_SCALE,
    )
