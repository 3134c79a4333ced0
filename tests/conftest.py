"""Session fixtures shared by the test suite.

Tiny Qwen2 models (see `tiny_gguf.py`): the real Qwen2.5 tokenizer cut down to ~1,000 tokens, random
weights, < 1 MB each. They load in llama.cpp and in transformers and give the same distributions in
both, so the whole edge/cloud pipeline can be tested in seconds without the real models' compute.
The only real file they need is the edge GGUF, read once per session for its tokenizer metadata.

Heavy imports (llama_cpp, torch, transformers, shared.models) stay inside the fixtures and tests that
need them: collecting the suite must stay fast.

Test tiers, marked at collection (`pytest -m unit`, `-m "unit or tiny"`; `make test` runs all three):
- e2e: real processes of ours (the `handoff` command through the `run_handoff` fixture) or the real
  default pair (`real_models`);
- tiny: the tiny GGUF models (and the edge GGUF their tokenizer comes from), real gRPC on port 0;
- unit: everything else (math on hand-made arrays, hypothesis properties, fakes).
A tier marked by hand wins: a server or a script started some other way is marked e2e where it runs.

Test-only helpers are fixtures here (test modules cannot import conftest): `run_handoff` runs the
command, `wait_until` / `async_wait_until` wait for a condition instead of sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from handoff.shared.tiny_gguf import (
    NEAR_SCALE,
    SEED_A,
    SEED_B,
    SEED_NEAR,
    TinyTokenizer,
    extract_tokenizer,
    llama_quantize,
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
def tiny_gguf_q4k(tiny_tokenizer: TinyTokenizer, tiny_model_dir: Path) -> Path:
    """Tiny Qwen2 (hidden 256) quantized to Q4_K_M by llama.cpp: the real models' quantized kernels."""
    f32 = write_tiny_qwen2_gguf(
        tiny_model_dir / "tiny-a-256.gguf", tiny_tokenizer, SEED_A, hidden=256, ffn=512
    )
    return llama_quantize(f32, tiny_model_dir / "tiny-a-256-q4_k_m.gguf")


@pytest.fixture(scope="session")
def tiny_gguf_a_permuted(tiny_tokenizer: TinyTokenizer, tiny_model_dir: Path) -> Path:
    """Tiny A with its token ids shuffled: another vocabulary (ids), the same model over texts."""
    permuted, order = tiny_tokenizer.permuted(seed=7)
    return write_tiny_qwen2_gguf(tiny_model_dir / "tiny-a-permuted.gguf", permuted, SEED_A, vocab_order=order)


@pytest.fixture(scope="session")
def tiny_gguf_small_vocab(edge_gguf_path: Path, tiny_model_dir: Path) -> Path:
    """Tiny Qwen2 with a smaller tokenizer (the first 600 tokens and their merges): other ids for the
    special tokens, shorter tokens for the same text, so token boundaries differ from A's."""
    return write_tiny_qwen2_gguf(
        tiny_model_dir / "tiny-small-vocab.gguf", extract_tokenizer(edge_gguf_path, keep=600), SEED_B
    )


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


# --------------------------------------------------------------------------------------------------
# Tiers

TIERS = ("unit", "tiny", "e2e")
# A test that uses one of these (directly or through other fixtures) is in that tier.
E2E_FIXTURES = frozenset({"run_handoff"})
TINY_FIXTURES = frozenset(
    {"tiny_gguf_a", "tiny_gguf_b", "tiny_gguf_a_near", "tiny_tokenizer", "tiny_model_dir", "edge_gguf_path"}
)


def tier_of(item: pytest.Item) -> str:
    """The tier a collected test belongs to: a hand-set tier marker, else what its fixtures need."""
    for tier in TIERS:
        if item.get_closest_marker(tier) is not None:
            return tier
    fixtures = set(getattr(item, "fixturenames", ()))
    if item.get_closest_marker("real_models") is not None or fixtures & E2E_FIXTURES:
        return "e2e"
    if fixtures & TINY_FIXTURES:
        return "tiny"
    return "unit"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = tier_of(item)
        if item.get_closest_marker(tier) is None:
            item.add_marker(getattr(pytest.mark, tier))


# --------------------------------------------------------------------------------------------------
# The command in a real process


class HandoffCommand:
    """`python -m handoff ...` in a child process, as a user runs it (this interpreter, this checkout).

    COLUMNS is wide so that rich does not wrap the messages the tests look for; `env` adds to (or
    overrides) the inherited environment.
    """

    def argv(self, *args: Any) -> list[str]:
        return [sys.executable, "-m", "handoff", *map(str, args)]

    def environ(self, env: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "COLUMNS": "300", **(env or {})}

    def __call__(
        self,
        *args: Any,
        env: dict[str, str] | None = None,
        stdin: str | None = None,
        timeout: float = 600,
        cwd: Path | str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run to completion; stdout and stderr captured as text."""
        return subprocess.run(
            self.argv(*args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.environ(env),
            cwd=cwd,
        )

    def start(self, *args: Any, env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start without waiting (a server); stdout and stderr are text pipes. The caller stops it."""
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.environ(env),
        )


@pytest.fixture(scope="session")
def run_handoff() -> HandoffCommand:
    """The `handoff` command in a real process: `run_handoff("models", "list")`, `.start(...)`."""
    return HandoffCommand()


# --------------------------------------------------------------------------------------------------
# Waiting for a condition


def _timed_out(what: str | None, timeout: float) -> AssertionError:
    return AssertionError(f"timed out after {timeout:g} s waiting for {what or 'the condition'}")


def _wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str | None = None
) -> Any:
    """Poll `predicate` until it returns something truthy and return that; AssertionError past `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if value := predicate():
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout)
        time.sleep(interval)


async def _async_wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str | None = None,
) -> Any:
    """The same inside an event loop: the loop runs between polls; `predicate` may be a coroutine function."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise _timed_out(what, timeout)
        await asyncio.sleep(interval)


@pytest.fixture(scope="session")
def wait_until() -> Callable[..., Any]:
    """`wait_until(predicate, timeout=10, interval=0.01, what=...)`: instead of a fixed sleep before an assert."""
    return _wait_until


@pytest.fixture(scope="session")
def async_wait_until() -> Callable[..., Awaitable[Any]]:
    """`await async_wait_until(predicate, ...)`: `wait_until` for code running in an event loop."""
    return _async_wait_until


def _homogeneity_p(a: list[tuple], b: list[tuple]) -> float:
    import numpy as np
    from scipy.stats import chi2_contingency

    cats = sorted(set(a) | set(b))
    table = np.array([[a.count(c) for c in cats], [b.count(c) for c in cats]], dtype=float)
    common = table.sum(axis=0) >= 10
    table = np.column_stack([table[:, common], table[:, ~common].sum(axis=1)])
    table = table[:, table.sum(axis=0) > 0]
    return float(chi2_contingency(table).pvalue)


@pytest.fixture(scope="session")
def homogeneity_p() -> Callable[[list[tuple], list[tuple]], float]:
    """`homogeneity_p(a, b)`: chi-square p-value that two samples of continuations share one distribution
    (categories seen fewer than 10 times in both together are pooled)."""
    return _homogeneity_p
