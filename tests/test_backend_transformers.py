"""The transformers backend on the tiny Qwen2 GGUFs (CPU): views, incremental and batched scoring, caches.

The reference everywhere is a plain full forward pass of the model transformers loads from the same
GGUF, over the whole sequence, without any cache: whatever the backend does with KV caches, padding
and batching must give the same distributions.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from handoff.cloud.backend import ForwardItem, views_from_logits
from handoff.shared.divergence import kl_divergence
from handoff.shared.errors import CapacityError, HandoffError, ShapeError
from handoff.shared.models import ModelRef, resolve
from handoff.shared.settings import HandoffSettings

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from handoff.cloud.backends import transformers_backend as tb  # noqa: E402
from handoff.cloud.backends.transformers_backend import TransformersBackend  # noqa: E402

V = 1022  # the tiny models' vocabulary and output rows
ALL_IDS = list(range(V))
KL_MAX = 1e-4  # per row, backend vs reference (both float32)
LOGPROB_TOL = 1e-4  # max abs log-prob difference


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, V, n).tolist()


@pytest.fixture(scope="module")
def cache_settings(tmp_path_factory) -> HandoffSettings:
    return HandoffSettings(cache_dir=tmp_path_factory.mktemp("tf-backend-cache"))


@pytest.fixture(scope="module")
def ref_a(tiny_gguf_a: Path) -> ModelRef:
    return ModelRef("gguf", tiny_gguf_a, "tiny-a")


@pytest.fixture(scope="module")
def backend(ref_a, cache_settings) -> TransformersBackend:
    with TransformersBackend(ref_a, device="cpu", dtype="float32", settings=cache_settings) as be:
        yield be


@pytest.fixture(scope="module")
def reference(tiny_gguf_a: Path):
    """log_softmax of a plain full forward pass of the GGUF-loaded model: tokens -> [len, V] float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf_a.parent), gguf_file=tiny_gguf_a.name, dtype=torch.float32
    ).eval()

    def logprobs(toks: list[int]) -> np.ndarray:
        with torch.inference_mode():
            logits = model(torch.tensor([toks])).logits[0]
        return torch.log_softmax(logits.double(), -1).numpy()

    return logprobs


def full_rows(backend, seq, toks: list[int], n_out: int | None = None, k: int = 8):
    """Append `toks` and return (output, [n_out, V] log-probs read back through `gather`)."""
    n_out = len(toks) if n_out is None else n_out
    out = backend.forward([ForwardItem(seq, toks, n_out, k, gather=[ALL_IDS] * n_out)])[0]
    return out, (np.stack(out.gathered) if n_out else np.zeros((0, V)))


def assert_rows_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert kl_divergence(want, got).max() < KL_MAX
    assert np.abs(got - want).max() < LOGPROB_TOL


# --------------------------------------------------------------------------------------------------
# 1. views of one sequence


def test_views_equal_a_full_forward_pass(backend, reference):
    toks = tokens(1, 24)
    want = reference(toks)  # [24, V]
    seq = backend.new_sequence()
    gather = [[5, 17, toks[j + 1] if j + 1 < 24 else 0] for j in range(20)]
    item = ForwardItem(seq, toks, 20, 10, gather=gather, full_last=True)
    out = backend.forward([item])[0]
    expect = views_from_logits(want[-20:], item)  # the host implementation, on the reference rows

    assert out.topk_ids.dtype == np.int32 and out.topk_ids.shape == (20, 10)
    assert out.topk_logprobs.dtype == np.float64
    np.testing.assert_array_equal(out.topk_ids, expect.topk_ids)
    np.testing.assert_allclose(out.topk_logprobs, expect.topk_logprobs, atol=LOGPROB_TOL)
    for got_row, want_row in zip(out.gathered, expect.gathered, strict=True):
        assert got_row.dtype == np.float64
        np.testing.assert_allclose(got_row, want_row, atol=LOGPROB_TOL)
    assert out.last_logprobs.shape == (V,) and out.last_logprobs.dtype == np.float64
    assert_rows_close(out.last_logprobs[None], want[-1:])
    assert backend.sequence_length(seq) == 24

    # Every row's full distribution, read back through gather.
    seq2 = backend.new_sequence()
    _, rows = full_rows(backend, seq2, toks)
    assert_rows_close(rows, want)
    # ...and returned whole (full_rows: speculative drafts need P's distribution at every position).
    seq3 = backend.new_sequence()
    whole = backend.forward([ForwardItem(seq3, toks, 5, 10, full_rows=True)])[0].full_logprobs
    assert whole.shape == (5, V) and whole.dtype == np.float64
    assert_rows_close(whole, want[-5:])
    backend.release(seq)
    backend.release(seq2)
    backend.release(seq3)


def test_info_and_vocabulary(backend, ref_a):
    info = backend.info
    assert (info.backend, info.device, info.dtype) == ("transformers", "cpu", "float32")
    assert info.vocab_size == V == len(backend.vocabulary.tokens)
    assert info.architecture == "qwen2" and info.context_length == 2048 and info.model_id == "tiny-a"


# --------------------------------------------------------------------------------------------------
# 2. incremental scoring


def test_incremental_scoring_equals_scoring_from_scratch(backend, reference):
    toks = tokens(2, 30)
    want = reference(toks)
    seq = backend.new_sequence()
    out, _ = full_rows(backend, seq, toks[:11], n_out=0)  # prefill only
    assert out.topk_ids.shape == (0, 8) and out.gathered == [] and out.last_logprobs is None
    pos = 11
    for n in (3, 1, 7, 2, 6):
        _, rows = full_rows(backend, seq, toks[pos : pos + n])
        assert_rows_close(rows, want[pos : pos + n])
        pos += n
    assert backend.sequence_length(seq) == pos == 30
    backend.release(seq)


def test_cache_grows_past_its_first_capacity(backend, reference):
    # 300 tokens: deterministic mode reserves whole attention blocks of 256 keys from the start
    toks = tokens(3, 300)
    want = reference(toks)
    seq = backend.new_sequence()
    full_rows(backend, seq, toks[:60], n_out=0)
    first = seq.capacity
    for pos in range(60, 300, 20):
        _, rows = full_rows(backend, seq, toks[pos : pos + 20], n_out=2)
        assert_rows_close(rows, want[pos + 18 : pos + 20])
    assert seq.capacity > first >= 60
    backend.release(seq)


# --------------------------------------------------------------------------------------------------
# 3. batching


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_batch_equals_each_sequence_alone(ref_a, cache_settings, reference, attn):
    be = TransformersBackend(
        ref_a, device="cpu", settings=cache_settings, attn_implementation=attn, deterministic=False
    )  # the padded batch of the fast path (tests/test_batch_invariance_transformers.py: deterministic mode)
    prompts = [tokens(10, 9), [], tokens(11, 17), tokens(12, 2)]  # past lengths differ, one is empty
    rounds = [
        [(5, 5), (4, 2), (1, 1), (8, 3)],  # (new tokens, n_out) per sequence
        [(2, 2), (6, 6), (9, 4), (1, 1)],  # a second round: the caches the batch left must be right
    ]
    batched = [be.new_sequence() for _ in prompts]
    alone = [be.new_sequence() for _ in prompts]  # the same tokens, one sequence per call
    be.forward([ForwardItem(s, p, 0, 1) for s, p in zip(batched, prompts, strict=True)])
    for s, p in zip(alone, prompts, strict=True):
        be.forward([ForwardItem(s, p, 0, 1)])
    history = [list(p) for p in prompts]
    for r, spec in enumerate(rounds):
        new = [tokens(100 * r + i, n) for i, (n, _) in enumerate(spec)]

        def item(seq, toks, n_out):
            return ForwardItem(seq, toks, n_out, 6, gather=[ALL_IDS] * n_out, full_last=True)

        outs = be.forward([item(s, new[i], spec[i][1]) for i, s in enumerate(batched)])  # one batched call
        for i, out in enumerate(outs):
            single = be.forward([item(alone[i], new[i], spec[i][1])])[0]
            history[i] += new[i]
            n_out = spec[i][1]
            got = np.stack(out.gathered)
            assert np.abs(got - np.stack(single.gathered)).max() < LOGPROB_TOL
            np.testing.assert_array_equal(out.topk_ids, single.topk_ids)
            assert_rows_close(got, reference(history[i])[-n_out:])
            np.testing.assert_allclose(out.last_logprobs, got[-1], atol=1e-6)
            assert be.sequence_length(batched[i]) == be.sequence_length(alone[i]) == len(history[i])
    be.close()


def test_max_batch_tokens_splits_the_call_without_changing_results(ref_a, cache_settings, backend):
    small = TransformersBackend(
        ref_a, device="cpu", settings=cache_settings, max_batch_tokens=8, deterministic=False
    )  # deterministic mode counts padded rows (multiples of 8): tests/test_batch_invariance_transformers.py
    groups = small._plan([ForwardItem(None, [1] * n, 0, 1) for n in (3, 3, 2, 9, 1)])
    assert groups == [[0, 1], [2], [3], [4]]

    def run(be):
        seqs = [be.new_sequence() for _ in range(4)]
        be.forward([ForwardItem(s, tokens(20 + i, 5 + i), 0, 1) for i, s in enumerate(seqs)])
        outs = be.forward(
            [ForwardItem(s, tokens(30 + i, 3), 3, 4, gather=[ALL_IDS] * 3) for i, s in enumerate(seqs)]
        )
        for s in seqs:
            be.release(s)
        return [np.stack(o.gathered) for o in outs]

    for a, b in zip(run(small), run(backend), strict=True):
        assert np.abs(a - b).max() < LOGPROB_TOL
    small.close()


def test_a_failed_forward_changes_no_sequence(ref_a, cache_settings, monkeypatch, reference):
    be = TransformersBackend(ref_a, device="cpu", settings=cache_settings, max_batch_tokens=4)
    a, b = be.new_sequence(), be.new_sequence()
    toks_a, toks_b = tokens(40, 6), tokens(41, 5)
    be.forward([ForwardItem(a, toks_a[:3], 0, 1), ForwardItem(b, toks_b[:2], 0, 1)])
    run = be._run_decoder
    calls = []

    def fail_second(*args, error: BaseException | None = None):
        calls.append(1)
        if len(calls) == 2:
            raise error or RuntimeError("boom")
        return run(*args)

    monkeypatch.setattr(be, "_run_decoder", fail_second)
    items = [ForwardItem(a, toks_a[3:], 3, 4), ForwardItem(b, toks_b[2:], 3, 4)]  # two calls of 3 tokens
    with pytest.raises(RuntimeError, match="boom"):
        be.forward(items)
    assert (be.sequence_length(a), be.sequence_length(b)) == (3, 2)  # the first call was undone too

    calls.clear()
    monkeypatch.setattr(be, "_run_decoder", lambda *a: fail_second(*a, error=torch.OutOfMemoryError("oom")))
    with pytest.raises(CapacityError, match="out of memory"):
        be.forward(items)
    assert (be.sequence_length(a), be.sequence_length(b)) == (3, 2)

    monkeypatch.setattr(be, "_run_decoder", run)
    outs = be.forward([ForwardItem(a, toks_a[3:], 3, 4, gather=[ALL_IDS] * 3)])
    assert_rows_close(np.stack(outs[0].gathered), reference(toks_a)[3:])
    be.close()


def test_items_without_tokens_and_k_per_item(backend):
    a, b = backend.new_sequence(), backend.new_sequence()
    outs = backend.forward([ForwardItem(a, [], 0, 4), ForwardItem(b, tokens(5, 4), 2, 3)])
    assert outs[0].topk_ids.shape == (0, 4) and backend.sequence_length(a) == 0
    assert outs[1].topk_ids.shape == (2, 3) and backend.sequence_length(b) == 4
    assert np.all(np.diff(outs[1].topk_logprobs, axis=1) <= 0)  # descending
    # gather rows may be None or empty
    out = backend.forward([ForwardItem(a, tokens(6, 3), 3, 2, gather=[None, [], [4, 4, 9]])])[0]
    assert out.gathered[0] is None and out.gathered[1].shape == (0,) and out.gathered[2].shape == (3,)
    assert out.gathered[2][0] == out.gathered[2][1]
    out = backend.forward([ForwardItem(a, tokens(7, 1), 1, 2, gather=[[]])])[0]
    assert out.gathered[0].shape == (0,)
    backend.release(a)
    backend.release(b)


# --------------------------------------------------------------------------------------------------
# 4. truncate and release


def test_truncate_then_reappend_gives_the_same_rows(backend):
    toks = tokens(4, 20)
    seq = backend.new_sequence()
    _, before = full_rows(backend, seq, toks)
    backend.truncate(seq, 12)
    assert backend.sequence_length(seq) == 12
    _, again = full_rows(backend, seq, toks[12:])
    assert np.abs(again - before[12:]).max() < LOGPROB_TOL
    other = tokens(5, 8)  # a different continuation after the cut
    backend.truncate(seq, 12)
    _, rows = full_rows(backend, seq, other)
    fresh = backend.new_sequence()
    _, want = full_rows(backend, fresh, toks[:12] + other)
    assert np.abs(rows - want[12:]).max() < LOGPROB_TOL
    backend.truncate(seq, 0)
    assert backend.sequence_length(seq) == 0
    with pytest.raises(ShapeError):
        backend.truncate(seq, 1)  # longer than the sequence
    backend.release(seq)
    backend.release(fresh)


def test_release_frees_the_sequence(backend):
    before = backend.active_sequences
    seq = backend.new_sequence()
    full_rows(backend, seq, tokens(6, 10))
    assert seq.seq_id in backend._live and seq.keys
    backend.release(seq)
    assert seq.seq_id not in backend._live and not seq.alive and seq.keys == []
    assert backend.active_sequences == before
    backend.release(seq)  # a second release does nothing
    for call in (
        lambda: backend.forward([ForwardItem(seq, [1], 1, 1)]),
        lambda: backend.sequence_length(seq),
        lambda: backend.truncate(seq, 0),
    ):
        with pytest.raises(HandoffError, match="released"):
            call()
    with pytest.raises(HandoffError, match="not a sequence"):
        backend.sequence_length(object())


# --------------------------------------------------------------------------------------------------
# 5. the converted-weights cache


def test_converted_weights_are_cached_and_reused(ref_a, tmp_path, monkeypatch):
    settings = HandoffSettings(cache_dir=tmp_path)
    toks = tokens(7, 16)

    def score(be):
        seq = be.new_sequence()
        return np.stack(be.forward([ForwardItem(seq, toks, 16, 5, gather=[ALL_IDS] * 16)])[0].gathered)

    first = TransformersBackend(ref_a, device="cpu", settings=settings)
    folder = tb.converted_dir(ref_a, settings)
    assert first.load_source == "converted-now"
    assert (folder / "handoff-converted.json").is_file() and list(folder.glob("*.safetensors"))
    assert (folder / "tokenizer.json").is_file() and (folder / "config.json").is_file()
    rows_first = score(first)
    first.close()

    # The second start must not convert: make conversion impossible and time the load.
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache is there")

    monkeypatch.setattr(tb, "convert_gguf", no_conversion)
    second = TransformersBackend(ref_a, device="cpu", settings=settings)
    assert second.load_source == "converted-cache"
    np.testing.assert_array_equal(score(second), rows_first)
    second.close()

    # The converted folder is a plain Hugging Face directory: it also loads as one.
    hf = TransformersBackend(resolve(str(folder), "cloud", settings), device="cpu", settings=settings)
    assert hf.load_source == "hf"
    np.testing.assert_array_equal(score(hf), rows_first)
    hf.close()


def test_an_incomplete_conversion_is_not_trusted(ref_a, tmp_path):
    settings = HandoffSettings(cache_dir=tmp_path)
    folder = tb.converted_dir(ref_a, settings)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")  # as if interrupted: no weights, no marker
    be = TransformersBackend(ref_a, device="cpu", settings=settings)
    assert be.load_source == "converted-now"
    assert (folder / "handoff-converted.json").is_file()
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]  # no temporary folder left
    be.close()


def test_a_changed_gguf_gets_a_new_cache_key(ref_a, tmp_path):
    copy = tmp_path / "copy" / "tiny-a.gguf"
    copy.parent.mkdir()
    shutil.copy(ref_a.path, copy)
    settings = HandoffSettings(cache_dir=tmp_path)
    key = tb.converted_dir(ModelRef("gguf", copy, "copy"), settings)
    os.utime(copy, ns=(1, 1))
    assert tb.converted_dir(ModelRef("gguf", copy, "copy"), settings) != key


# --------------------------------------------------------------------------------------------------
# 6. bfloat16


def test_bfloat16_on_cpu_stays_close_to_float32(ref_a, cache_settings, backend):
    bf = TransformersBackend(ref_a, device="cpu", dtype="bfloat16", settings=cache_settings)
    assert bf.info.dtype == "bfloat16"
    toks = tokens(8, 40)
    s32, s16 = backend.new_sequence(), bf.new_sequence()
    full_rows(backend, s32, toks[:20], n_out=0)
    full_rows(bf, s16, toks[:20], n_out=0)
    _, p = full_rows(backend, s32, toks[20:])
    out, q = full_rows(bf, s16, toks[20:])
    assert out.topk_logprobs.dtype == np.float64
    kl = kl_divergence(p, q)
    assert kl.mean() < 0.01, kl
    backend.release(s32)
    bf.close()


# --------------------------------------------------------------------------------------------------
# 7. bad input


def test_bad_token_ids_are_shape_errors(backend):
    seq = backend.new_sequence()
    with pytest.raises(ShapeError, match="out of range"):
        backend.forward([ForwardItem(seq, [1, V], 1, 4)])
    with pytest.raises(ShapeError, match="out of range"):
        backend.forward([ForwardItem(seq, [-1], 1, 4)])
    with pytest.raises(ShapeError, match="gather"):
        backend.forward([ForwardItem(seq, [1, 2], 1, 4, gather=[[3, V + 5]])])
    with pytest.raises(ShapeError, match="k:"):
        backend.forward([ForwardItem(seq, [1, 2], 1, V + 1)])
    with pytest.raises(ShapeError, match="same sequence"):
        backend.forward([ForwardItem(seq, [1], 1, 4), ForwardItem(seq, [2], 1, 4)])
    assert backend.sequence_length(seq) == 0  # nothing was applied
    backend.release(seq)


def test_max_context_is_a_capacity_error(ref_a, cache_settings):
    be = TransformersBackend(ref_a, device="cpu", settings=cache_settings, max_context=32, max_sequences=2)
    a, b = be.new_sequence(), be.new_sequence()
    be.forward([ForwardItem(a, tokens(9, 30), 0, 1)])
    with pytest.raises(CapacityError, match="max_context=32"):
        be.forward([ForwardItem(b, [1, 2], 1, 1), ForwardItem(a, [1, 2, 3], 1, 1)])
    assert be.sequence_length(a) == 30 and be.sequence_length(b) == 0  # the whole call was refused
    be.forward([ForwardItem(a, [1, 2], 1, 1)])  # exactly max_context is fine
    assert be.sequence_length(a) == 32
    with pytest.raises(CapacityError, match="in use"):
        be.new_sequence()
    be.close()
    with pytest.raises(HandoffError, match="closed"):
        be.new_sequence()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "float8"}, "unknown dtype 'float8'"),
        ({"dtype": "fp32"}, "unknown dtype"),
        ({"device": "tpu"}, "device"),
        ({"device": "not a device"}, "unknown device"),
        ({"max_context": 0}, "max_context"),
    ],
)
def test_bad_settings_are_clear_errors(ref_a, cache_settings, kwargs, match):
    with pytest.raises(HandoffError, match=match):
        TransformersBackend(ref_a, settings=cache_settings, **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_clear_error(ref_a, cache_settings):
    with pytest.raises(HandoffError, match="no CUDA device"):
        TransformersBackend(ref_a, device="cuda", settings=cache_settings)


def test_auto_picks_cpu_float32_without_cuda():
    if torch.cuda.is_available():
        assert tb.resolve_device("auto").type == "cuda"
        assert tb.resolve_dtype("auto", tb.resolve_device("auto")) == torch.bfloat16
    else:
        assert tb.resolve_device("auto") == torch.device("cpu")
        assert tb.resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_raw_forward_advances_the_caches_like_forward(backend, reference):
    a, b = backend.new_sequence(), backend.new_sequence()
    toks = tokens(50, 14)
    assert backend.raw_forward([ForwardItem(a, toks[:10], 3, 5), ForwardItem(b, toks[:6], 0, 1)]) is None
    assert (backend.sequence_length(a), backend.sequence_length(b)) == (10, 6)
    out_a, out_b = backend.forward(
        [
            ForwardItem(a, toks[10:], 4, 5, gather=[ALL_IDS] * 4),
            ForwardItem(b, toks[6:10], 4, 5, gather=[ALL_IDS] * 4),
        ]
    )
    want = reference(toks)
    assert_rows_close(np.stack(out_a.gathered), want[10:14])
    assert_rows_close(np.stack(out_b.gathered), want[6:10])
    backend.release(a)
    backend.release(b)
