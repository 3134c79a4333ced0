"""The llama.cpp backend's deterministic mode: a session's rows are bit-identical however its tokens
are split into passes and whatever other sessions share the call (cloud/backends/llama_backend.py).

Equality is exact (np.array_equal), never a tolerance. The fast mode is shown to differ on the same
inputs, so that these tests can tell the two apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from handoff.cloud.backend import ForwardItem
from handoff.shared.errors import ModelError
from handoff.shared.models import ModelRef

TOKENS = [int(t) % 1000 for t in range(17, 17 + 7 * 40, 7)]  # 40 ids, not a natural text
PROMPT = list(range(300, 340))


def backend(path: Path, deterministic: bool, **kw):
    """A tiny-sized llama.cpp backend (its deterministic path: kw's, else the default "single")."""
    from handoff.cloud.backends.llama_backend import LlamaCppBackend

    kw = {"max_sequences": 6, "max_context": 512, "n_batch": 64, "threads": 2} | kw
    return LlamaCppBackend(ModelRef("gguf", path, path.name), deterministic=deterministic, **kw)


def scored(b, chunk: int, tokens=TOKENS, prompt=PROMPT, others: int = 0, others_first: bool = True):
    """Full log-probability rows of `tokens` after `prompt`, fed `chunk` tokens per forward() call.

    Returns:
        [len(tokens), V] float64.
    """
    extra = [b.new_sequence() for _ in range(others)]
    for j, o in enumerate(extra):  # other sessions with their own, different histories
        b.forward([ForwardItem(o, list(range(500 + 50 * j, 500 + 50 * j + 13 + 29 * j)), 1, 4)])
    s = b.new_sequence()
    try:
        b.forward([ForwardItem(s, prompt, 1, 4)])
        rows = []
        for i in range(0, len(tokens), chunk):
            part = tokens[i : i + chunk]
            item = ForwardItem(s, part, len(part), 4, full_rows=True)
            neighbours = [ForwardItem(o, [700 + i + j] * (j + 1 + i % 3), 1, 4) for j, o in enumerate(extra)]
            items = [*neighbours, item] if others_first else [item, *neighbours]
            out = b.forward(items)
            rows.append(out[items.index(item)].full_logprobs)
        return np.concatenate(rows)
    finally:
        for seq in [s, *extra]:
            b.release(seq)


@pytest.fixture(scope="module", params=["f32", "q4_k_m"])
def model(request, tiny_gguf_a: Path, tiny_gguf_q4k: Path) -> Path:
    """The tiny F32 model and the tiny Q4_K_M one (the real models' quantized kernels)."""
    return tiny_gguf_a if request.param == "f32" else tiny_gguf_q4k


@pytest.fixture(params=["single", "padded"])
def path_kind(request) -> str:
    """Deterministic mode's two canonical computations."""
    return request.param


def test_fast_mode_rows_depend_on_the_split(model: Path) -> None:
    with backend(model, deterministic=False) as b:
        whole, ones = scored(b, 40), scored(b, 1)
    assert not np.array_equal(whole, ones)  # what deterministic mode removes


@pytest.mark.parametrize("chunk", [1, 3, 8, 13])
def test_deterministic_rows_do_not_depend_on_the_split(model: Path, chunk: int, path_kind: str) -> None:
    with backend(model, deterministic=True, deterministic_path=path_kind) as b:
        assert np.array_equal(scored(b, chunk), scored(b, 40))


@pytest.mark.parametrize(("others", "first"), [(1, True), (3, True), (3, False)])
def test_deterministic_rows_do_not_depend_on_other_sessions(
    model: Path, others: int, first: bool, path_kind: str
) -> None:
    with backend(model, deterministic=True, deterministic_path=path_kind) as b:
        alone = scored(b, 1)
        assert np.array_equal(scored(b, 1, others=others, others_first=first), alone)
        assert np.array_equal(scored(b, 8, others=others, others_first=first), alone)


def test_deterministic_rows_hold_past_a_kv_block_boundary(tiny_gguf_q4k: Path, path_kind: str) -> None:
    # 300 tokens of history: attention spans more than one 256-cell block of the cache.
    long_prompt = [int(t) % 1000 for t in range(3, 3 + 11 * 300, 11)]
    with backend(tiny_gguf_q4k, deterministic=True, deterministic_path=path_kind) as b:
        whole = scored(b, 40, prompt=long_prompt)
        assert np.array_equal(scored(b, 1, prompt=long_prompt), whole)
        assert np.array_equal(scored(b, 5, prompt=long_prompt, others=2), whole)


def test_deterministic_padding_leaves_no_cells_behind(tiny_gguf_q4k: Path) -> None:
    from handoff.cloud.backends.llama_calls import padded_rows

    assert [padded_rows(n) for n in (1, 7, 8, 9, 12, 13)] == [8, 8, 8, 12, 12, 16]
    with backend(tiny_gguf_q4k, deterministic=True, deterministic_path="padded") as b:
        s = b.new_sequence()
        b.forward([ForwardItem(s, PROMPT, 1, 4)])
        b.forward([ForwardItem(s, TOKENS[:3], 3, 4)])
        assert s.length == len(PROMPT) + 3
        # The cache holds exactly the real tokens: position len(PROMPT) + 3 is the next free one.
        assert b._lib.llama_memory_seq_pos_max(b._mem, s.seq_id) == len(PROMPT) + 2
        b.truncate(s, len(PROMPT) + 1)
        again = b.forward([ForwardItem(s, TOKENS[1:3], 2, 4, full_rows=True)])[0].full_logprobs
        b.release(s)
        assert np.array_equal(again, scored(b, 40)[1:3])


def test_the_self_check_refuses_a_machine_where_the_split_matters(tiny_gguf_a: Path, monkeypatch) -> None:
    from handoff.cloud.backends import llama_calls

    # Without the padding, the tiny F32 model's rows depend on the split (one row takes another kernel).
    monkeypatch.setattr(llama_calls, "padded_rows", lambda n: n)
    with pytest.raises(ModelError, match="not bit-invariant"):
        backend(tiny_gguf_a, deterministic=True, deterministic_path="padded")


def test_the_self_check_refuses_single_calls_that_are_really_batched(tiny_gguf_a: Path, monkeypatch) -> None:
    from handoff.cloud.backends import llama_backend

    fast = llama_backend.LlamaCppBackend._chunks

    def batched(self, rows):  # what "single" must not do: all of a forward's rows in one call
        self.deterministic = False
        try:
            yield from fast(self, rows)
        finally:
            self.deterministic = True

    monkeypatch.setattr(llama_backend.LlamaCppBackend, "_chunks", batched)
    with pytest.raises(ModelError, match="not bit-invariant"):
        backend(tiny_gguf_a, deterministic=True, deterministic_path="single")


@pytest.mark.real_models
@pytest.mark.slow
def test_default_cloud_model_is_batch_invariant_in_deterministic_mode() -> None:
    from handoff.shared.models import ensure_model

    path = ensure_model("qwen2.5-coder-1.5b-instruct-q4_k_m")
    for kind in ("single", "padded"):
        with backend(path, deterministic=True, deterministic_path=kind, max_sequences=4, n_batch=128) as b:
            whole = scored(b, 40)
            assert np.array_equal(scored(b, 1), whole), kind
            assert np.array_equal(scored(b, 8, others=2), whole), kind


def test_a_single_sequence_backend_checks_itself(tiny_gguf_q4k: Path) -> None:
    with backend(tiny_gguf_q4k, deterministic=True, max_sequences=1) as b:
        assert b.deterministic and b.active_sequences == 0


def test_padded_calls_share_only_blocks_of_one_length_one_per_sequence() -> None:
    """The padded path's call plan on hand-made rows (cloud/backends/llama_calls.py)."""
    from handoff.cloud.backends.llama_calls import PAD_TOKEN, padded_calls

    def item(i: int, sid: int, n: int, start: int) -> list[tuple[int, int, int, int, int]]:
        return [(i, 100 + j, start + j, sid, j) for j in range(n)]

    # Sequences 5, 2, 7 with 3, 8 and 20 new tokens; step 16: blocks 3 -> 8, 8 -> 8, 16 + (4 -> 8).
    rows = item(0, 5, 3, 40) + item(1, 2, 8, 10) + item(2, 7, 20, 0)
    calls = list(padded_calls(rows, 16))
    shape = [[(r[3], r[1] == PAD_TOKEN and r[4] == -1) for r in call] for call, _ in calls]
    # Round 0: the two 8-row blocks share a call (by seq id: 2 then 5), the 16-row one is alone;
    # round 1: sequence 7's second block, after its first.
    assert [len(c) for c, _ in calls] == [16, 16, 8]
    assert [sid for sid, _ in shape[0][::8]] == [2, 5] and {sid for sid, _ in shape[1]} == {7}
    assert sum(pad for _, pad in shape[0]) == 5 and sum(pad for _, pad in shape[2]) == 4
    assert calls[0][1] == [(5, 43)] and calls[1][1] == [] and calls[2][1] == [(7, 20)]
    # Every real row exactly once, each sequence's rows in order.
    real = [r for c, _ in calls for r in c if r[4] >= 0]
    assert sorted(real) == sorted(rows)
    for sid in (2, 5, 7):
        positions = [r[2] for r in real if r[3] == sid]
        assert positions == sorted(positions)
    # Blocks share a call only up to step rows: 3 sequences of 8 rows with step 16 make 2 calls.
    three = item(0, 0, 8, 0) + item(1, 1, 8, 0) + item(2, 2, 8, 0)
    assert [len(c) for c, _ in padded_calls(three, 16)] == [16, 8]
