"""Batch invariance of the transformers backend's deterministic mode (the default), by exact equality.

A sequence's views (full rows, top-k ids and log-probs, gathered log-probs, greedy tokens) must be
bit-identical however its tokens are split into forward calls and whatever other sequences share the
calls. Every comparison is np.array_equal, never a tolerance. The fast path (deterministic=False) is
shown to differ, so that the tests would catch the deterministic mode falling back to it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from handoff.cloud.backend import ForwardItem
from handoff.shared.errors import HandoffError, ModelError
from handoff.shared.models import ModelRef
from handoff.shared.settings import HandoffSettings

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from handoff.cloud.backends.transformers_backend import TransformersBackend  # noqa: E402

K = 8
LOGPROB_TOL = 1e-4  # deterministic vs fast path: the same model, other summation orders


def tokens(seed: int, n: int, limit: int = 1000) -> list[int]:
    return np.random.default_rng(seed).integers(0, limit, n).tolist()


def windows(total: int, size: int) -> list[int]:
    """`total` tokens split into windows of `size`, the last one shorter."""
    return [size] * (total // size) + ([total % size] if total % size else [])


@pytest.fixture(scope="module")
def cache_settings(tmp_path_factory) -> HandoffSettings:
    return HandoffSettings(cache_dir=tmp_path_factory.mktemp("tf-invariance-cache"))


@pytest.fixture(scope="module")
def ref_a(tiny_gguf_a: Path) -> ModelRef:
    return ModelRef("gguf", tiny_gguf_a, "tiny-a")


@pytest.fixture(scope="module")
def det(ref_a, cache_settings) -> TransformersBackend:
    with TransformersBackend(ref_a, device="cpu", dtype="float32", settings=cache_settings) as be:
        assert be.deterministic  # the default
        yield be


@pytest.fixture(scope="module")
def fast(ref_a, cache_settings) -> TransformersBackend:
    with TransformersBackend(
        ref_a, device="cpu", dtype="float32", settings=cache_settings, deterministic=False
    ) as be:
        yield be


def score(be, toks: list[int], splits: list[int], others: list[tuple[int, int]] = (), order: int = 0):
    """Append `toks` in windows `splits` and return the views of every row, stacked.

    Args:
        others: (prompt tokens, new tokens per call) of sequences that share every call.
        order: 0 = the scored sequence first, 1 = last and the others reversed, 2 = in the middle.

    Returns:
        dict of [len(toks), V] full rows, [len(toks), K] top-k ids and log-probs, [len(toks), 3]
        gathered log-probs.
    """
    assert sum(splits) == len(toks)
    seq = be.new_sequence()
    other_seqs = []
    for i, (prompt, _) in enumerate(others):
        other_seqs.append(be.new_sequence())
        be.forward([ForwardItem(other_seqs[-1], tokens(100 + i, prompt), 0, 1)])
    parts: dict[str, list[np.ndarray]] = {"full": [], "ids": [], "lp": [], "gathered": []}
    pos = 0
    for call, w in enumerate(splits):
        gather = [[3, 500, toks[pos + j]] for j in range(w)]
        mine = ForwardItem(seq, toks[pos : pos + w], w, K, gather=gather, full_rows=True)
        extra = [
            ForwardItem(s, tokens(1000 * call + i, n), 1, 4, full_last=True)
            for i, (s, (_, n)) in enumerate(zip(other_seqs, others, strict=True))
        ]
        items = [[mine, *extra], [*extra[::-1], mine], [*extra[:1], mine, *extra[1:]]][order]
        out = be.forward(items)[items.index(mine)]
        parts["full"].append(out.full_logprobs)
        parts["ids"].append(out.topk_ids)
        parts["lp"].append(out.topk_logprobs)
        parts["gathered"].append(np.stack(out.gathered))
        pos += w
    assert be.sequence_length(seq) == len(toks)  # only the real tokens count, never the padding
    for s in [seq, *other_seqs]:
        be.release(s)
    return {name: np.concatenate(p) for name, p in parts.items()}


def assert_identical(got: dict, want: dict) -> None:
    for name in want:
        assert np.array_equal(got[name], want[name]), (
            f"{name}: {np.count_nonzero(got[name] != want[name])} values differ, "
            f"max |diff| {np.abs(got[name].astype(float) - want[name]).max():.3g}"
        )


def greedy(be, prompt: list[int], splits: list[int], n: int, others: list[tuple[int, int]] = ()):
    """Append `prompt` in windows `splits`, then n greedy tokens one call each; others share every call."""
    seq = be.new_sequence()
    other_seqs = [be.new_sequence() for _ in others]
    for s, (p, _) in zip(other_seqs, others, strict=True):
        be.forward([ForwardItem(s, tokens(p, p), 0, 1)])
    step = 0

    def call(toks: list[int]) -> np.ndarray:
        nonlocal step
        step += 1
        extra = [
            ForwardItem(s, tokens(7 * step + i, m), 1, 2)
            for i, (s, (_, m)) in enumerate(zip(other_seqs, others, strict=True))
        ]
        return be.forward([*extra, ForwardItem(seq, toks, 1, 1, full_last=True)])[-1].last_logprobs

    pos = 0
    for w in splits:
        last = call(prompt[pos : pos + w])
        pos += w
    generated, lasts = [], []
    for _ in range(n):
        generated.append(int(np.argmax(last)))
        lasts.append(last)
        last = call([generated[-1]])
    for s in [seq, *other_seqs]:
        be.release(s)
    return generated, np.stack(lasts)


# --------------------------------------------------------------------------------------------------
# (a) however the tokens are split into calls


def test_splits_give_bit_identical_rows(det):
    toks = tokens(1, 40)
    whole = score(det, toks, [40])
    for splits in ([1] * 40, windows(40, 3), windows(40, 8), [5, 35], [17, 23]):
        assert_identical(score(det, toks, splits), whole)


def test_splits_across_a_key_block_boundary(det):
    """Caches that grow past one attention block of keys (256) while being scored."""
    toks = tokens(2, 270)
    whole = score(det, toks, [270])
    assert_identical(score(det, toks, [250, *windows(20, 3)]), whole)
    assert_identical(score(det, toks, windows(270, 8)), whole)


def test_truncate_and_reappend_in_other_windows(det):
    seq = det.new_sequence()
    toks = tokens(3, 30)
    det.forward([ForwardItem(seq, toks[:10], 0, 1)])
    first = det.forward([ForwardItem(seq, toks[10:], 20, K, full_rows=True)])[0]
    det.truncate(seq, 10)
    again = [
        det.forward([ForwardItem(seq, toks[10 + i : 13 + i], len(toks[10 + i : 13 + i]), K, full_rows=True)])[
            0
        ]
        for i in range(0, 20, 3)
    ]
    assert np.array_equal(np.concatenate([o.full_logprobs for o in again]), first.full_logprobs)
    det.release(seq)


# --------------------------------------------------------------------------------------------------
# (b) whatever else shares the call


OTHERS = [(7, 3), (60, 1), (2, 16)]  # (prompt, new tokens per call): other lengths, other row counts


@pytest.mark.parametrize("order", [0, 1, 2])
def test_other_sequences_in_the_call_change_nothing(det, order):
    toks = tokens(4, 40)
    alone = score(det, toks, windows(40, 8))
    assert_identical(score(det, toks, windows(40, 8), others=OTHERS, order=order), alone)
    assert_identical(score(det, toks, [1] * 40, others=OTHERS[:2], order=order), alone)


def test_calls_split_by_max_batch_tokens_change_nothing(ref_a, cache_settings, det):
    toks = tokens(5, 24)
    want = score(det, toks, windows(24, 8), others=OTHERS)
    with TransformersBackend(ref_a, device="cpu", settings=cache_settings, max_batch_tokens=16) as small:
        assert_identical(score(small, toks, windows(24, 8), others=OTHERS), want)


# --------------------------------------------------------------------------------------------------
# (c) generated tokens


def test_greedy_tokens_and_their_distributions_are_identical(det):
    prompt = tokens(6, 20)
    alone, lasts = greedy(det, prompt, [20], 12)
    for splits, others in (
        ([1] * 20, ()),
        ([8, 8, 4], [(5, 1), (33, 4)]),
        ([20], [(40, 9), (1, 1), (12, 2)]),
    ):
        got, got_lasts = greedy(det, prompt, splits, 12, others)
        assert got == alone
        assert np.array_equal(got_lasts, lasts)


# --------------------------------------------------------------------------------------------------
# the deterministic rows are the model's, and the fast path is what they are protected from


def test_deterministic_rows_match_the_fast_path_closely(det, fast):
    toks = tokens(7, 30)
    got, want = score(det, toks, windows(30, 8)), score(fast, toks, windows(30, 8))
    assert np.abs(got["full"] - want["full"]).max() < LOGPROB_TOL
    assert np.array_equal(got["ids"][:, 0], want["ids"][:, 0])  # the same argmax


def test_the_fast_path_is_not_batch_invariant(fast):
    """Measured on the tiny model: every row of the fast path differs in the last bits (~1e-5)."""
    toks = tokens(8, 40)
    whole = score(fast, toks, [40])
    assert not np.array_equal(score(fast, toks, [1] * 40)["full"], whole["full"])
    alone = score(fast, toks, windows(40, 8))
    assert not np.array_equal(score(fast, toks, windows(40, 8), others=OTHERS)["full"], alone["full"])


def test_raw_forward_in_deterministic_mode(det):
    seq = det.new_sequence()
    det.raw_forward([ForwardItem(seq, tokens(9, 13), 5, 1)])
    assert det.sequence_length(seq) == 13
    det.release(seq)


def test_the_load_time_check_refuses_a_backend_that_is_not_invariant(ref_a, cache_settings, monkeypatch):
    """Without the row padding, a call of 1 or 3 rows takes other kernels than one of 12: refused."""
    from handoff.cloud.backends import deterministic

    monkeypatch.setattr(deterministic, "padded_rows", lambda n: n)
    with pytest.raises(ModelError, match="not bit-invariant"):
        TransformersBackend(ref_a, device="cpu", settings=cache_settings)


def test_attn_implementation_needs_the_fast_path(ref_a, cache_settings):
    with pytest.raises(HandoffError, match="deterministic=False"):
        TransformersBackend(ref_a, device="cpu", settings=cache_settings, attn_implementation="sdpa")


# --------------------------------------------------------------------------------------------------
# the default cloud model


@pytest.mark.real_models
@pytest.mark.slow
def test_default_cloud_model_is_batch_invariant():
    """The 1.5B on CPU in float32: splits and other sequences leave the rows bit-identical."""
    from handoff.shared.models import ensure_model, resolve
    from handoff.shared.settings import DEFAULT_CLOUD_MODEL

    ensure_model(DEFAULT_CLOUD_MODEL)
    ref = resolve(DEFAULT_CLOUD_MODEL, "cloud")
    with TransformersBackend(ref, device="cpu", dtype="float32", max_context=512, threads=2) as be:
        toks = tokens(10, 20)
        whole = score(be, toks, [20])
        assert_identical(score(be, toks, [1] * 4 + windows(16, 3)), whole)
        assert_identical(score(be, toks, windows(20, 8), others=[(9, 2), (30, 1), (3, 5)], order=1), whole)
