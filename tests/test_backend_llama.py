"""The llama.cpp backend: one context, many sequences, batched `llama_decode`, on the tiny models.

The reference is `shared.llama_cpp_model.LlamaCppModel` (the edge's runner) evaluating one position
at a time: a check point's rows must be the distributions the edge would have seen from the same
model. Batching, splitting, truncation and release must never change a sequence's rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from handoff.cloud.backend import ForwardItem, ForwardOutput
from handoff.cloud.backends.llama_backend import LlamaCppBackend
from handoff.shared.divergence import kl_divergence, top_k
from handoff.shared.errors import CapacityError, HandoffError, ModelError, ShapeError
from handoff.shared.llama_cpp_model import LlamaCppModel
from handoff.shared.models import ModelRef
from handoff.shared.settings import HandoffSettings

# One thread: on a 2-core machine shared with other test runs, two llama.cpp threads wait on each other.
THREADS = 1
N_VOCAB = 1022
K = 8
KL_MAX = 1e-4  # llama.cpp vs llama.cpp; measured ~2e-6 (flash attention) and ~0 (without)
LOGPROB_TOL = 1e-3  # the backend against itself (batched vs alone, split vs whole): measured 0
# The backend against LlamaCppModel, whose F16 KV cache is filled one token at a time and which runs
# without flash attention: single log-probs differ by up to ~4e-3 (KL stays ~1e-6).
REF_LOGPROB_TOL = 1e-2


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> HandoffSettings:
    return HandoffSettings(cache_dir=tmp_path_factory.mktemp("llama_backend_cache"))


@pytest.fixture(scope="module")
def ref_a(tiny_gguf_a: Path) -> ModelRef:
    return ModelRef("gguf", tiny_gguf_a, "tiny-a")


@pytest.fixture
def make_backend(ref_a: ModelRef, settings: HandoffSettings):
    made: list[LlamaCppBackend] = []

    def make(**kw) -> LlamaCppBackend:
        kw = {"max_sequences": 4, "max_context": 256, "threads": THREADS, "n_batch": 64, **kw}
        backend = LlamaCppBackend(ref_a, settings=settings, **kw)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture(scope="module")
def reference(tiny_gguf_a: Path):
    """Full log-prob rows from LlamaCppModel, one position at a time (cached per token prefix)."""
    model = LlamaCppModel(tiny_gguf_a, n_ctx=512, n_threads=THREADS)
    cache: dict[tuple[int, ...], np.ndarray] = {}

    def rows(tokens: Sequence[int]) -> np.ndarray:
        key = tuple(tokens)
        if key not in cache:
            model.reset()
            out = []
            for t in tokens:
                model.eval([t])
                out.append(model.next_logprobs())
            cache[key] = np.array(out)
        return cache[key]

    yield rows
    model.close()


def tokens(seed: int, n: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, N_VOCAB, n).tolist()


def full_item(seq, toks: list[int], n_out: int | None = None) -> ForwardItem:
    """An item whose gather asks for every id: the gathered rows are the full log-prob rows."""
    n_out = len(toks) if n_out is None else n_out
    return ForwardItem(seq, toks, n_out, K, gather=[list(range(N_VOCAB))] * n_out)


def full_rows(out: ForwardOutput) -> np.ndarray:
    return np.array(out.gathered).reshape(-1, N_VOCAB)


def assert_rows_close(a: ForwardOutput, b: ForwardOutput, tol: float = LOGPROB_TOL) -> None:
    assert a.topk_ids.shape == b.topk_ids.shape
    assert np.abs(a.topk_logprobs - b.topk_logprobs).max(initial=0.0) < tol
    np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
    for ga, gb in zip(a.gathered, b.gathered, strict=True):
        assert (ga is None) == (gb is None)
        if ga is not None:
            assert np.abs(ga - gb).max(initial=0.0) < tol


# --------------------------------------------------------------------------------------------------
# Identity and lifetime


def test_info_and_vocabulary(make_backend) -> None:
    backend = make_backend()
    info = backend.info
    assert info.backend == "llama.cpp"
    assert info.device == "cpu"
    assert info.vocab_size == N_VOCAB
    assert info.model_id == "tiny-a"
    assert info.architecture == "qwen2"
    assert info.dtype == info.quantization
    assert len(backend.vocabulary.tokens) == N_VOCAB


def test_load_errors(tmp_path: Path, settings: HandoffSettings, tiny_gguf_a: Path) -> None:
    import gguf

    with pytest.raises(ModelError):
        LlamaCppBackend(ModelRef("gguf", tmp_path / "missing.gguf", "missing"), settings=settings)
    with pytest.raises(ModelError, match="GGUF"):
        LlamaCppBackend(ModelRef("hf", tmp_path, "dir"), settings=settings)
    # A valid GGUF header with a vocabulary but no tensors: readable metadata, no loadable model.
    empty = tmp_path / "no-tensors.gguf"
    writer = gguf.GGUFWriter(str(empty), "qwen2")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="could not load"):
        LlamaCppBackend(ModelRef("gguf", empty, "empty"), settings=settings, threads=THREADS)


def test_close_is_idempotent_and_final(make_backend) -> None:
    backend = make_backend()
    seq = backend.new_sequence()
    backend.close()
    backend.close()
    with pytest.raises(HandoffError, match="closed"):
        backend.forward([ForwardItem(seq, [1], 1, K)])
    with pytest.raises(HandoffError, match="closed"):
        backend.new_sequence()
    backend.release(seq)  # cleanup after close is harmless


# --------------------------------------------------------------------------------------------------
# 1. Same distributions as the edge runner


@pytest.mark.parametrize(
    ("kv_unified", "flash_attn"), [(True, True), (True, False), (False, True), (False, False)]
)
def test_views_match_llama_cpp_model(make_backend, reference, kv_unified: bool, flash_attn: bool) -> None:
    toks = tokens(1, 24)
    ref = reference(toks)
    backend = make_backend(kv_unified=kv_unified, flash_attn=flash_attn)
    seq = backend.new_sequence()
    gather = [[toks[j + 1] if j + 1 < len(toks) else 0, 5, 900] for j in range(len(toks))]
    out = backend.forward([ForwardItem(seq, toks, len(toks), K, gather=gather, full_last=True)])[0]
    assert backend.sequence_length(seq) == len(toks)
    assert out.topk_ids.shape == (len(toks), K) and out.topk_ids.dtype == np.int32
    assert out.topk_logprobs.dtype == np.float64

    # full rows through a gather of every id
    backend.truncate(seq, 0)
    rows = full_rows(backend.forward([full_item(seq, toks)])[0])
    assert rows.shape == ref.shape
    assert kl_divergence(ref, rows).max() < KL_MAX
    # ...and returned whole (full_rows)
    backend.truncate(seq, 0)
    whole = backend.forward([ForwardItem(seq, toks, 4, K, full_rows=True)])[0].full_logprobs
    assert whole.shape == (4, ref.shape[1]) and kl_divergence(ref[-4:], whole).max() < KL_MAX
    assert np.allclose(np.exp(rows).sum(axis=-1), 1.0)

    ref_ids, ref_vals = top_k(ref, K)
    np.testing.assert_array_equal(out.topk_ids, ref_ids)
    assert np.abs(out.topk_logprobs - ref_vals).max() < REF_LOGPROB_TOL
    for j, g in enumerate(gather):
        assert np.abs(out.gathered[j] - ref[j, g]).max() < REF_LOGPROB_TOL
    assert out.last_logprobs is not None and out.last_logprobs.shape == (N_VOCAB,)
    assert kl_divergence(ref[-1], out.last_logprobs) < KL_MAX


def test_only_last_rows_and_no_rows(make_backend, reference) -> None:
    toks = tokens(2, 12)
    ref = reference(toks)
    backend = make_backend()
    seq = backend.new_sequence()
    out = backend.forward([full_item(seq, toks, n_out=3)])[0]
    assert kl_divergence(ref[-3:], full_rows(out)).max() < KL_MAX
    more = tokens(3, 4)
    empty = backend.forward([ForwardItem(seq, more, 0, K)])[0]
    assert empty.topk_ids.shape == (0, K) and empty.gathered == [] and empty.last_logprobs is None
    assert backend.sequence_length(seq) == 16
    nothing = backend.forward([ForwardItem(seq, [], 0, K)])[0]
    assert nothing.topk_ids.shape == (0, K)
    assert backend.sequence_length(seq) == 16
    assert backend.forward([]) == []


# --------------------------------------------------------------------------------------------------
# 2. Incremental scoring


def test_incremental_equals_from_scratch(make_backend, reference) -> None:
    toks = tokens(4, 30)
    ref = reference(toks)
    backend = make_backend()
    seq = backend.new_sequence()
    pieces = [10, 3, 1, 5, 4, 7]
    rows, start = [], 0
    for n in pieces:
        out = backend.forward([full_item(seq, toks[start : start + n])])[0]
        rows.append(full_rows(out))
        start += n
        assert backend.sequence_length(seq) == start
    rows = np.concatenate(rows)
    assert kl_divergence(ref, rows).max() < KL_MAX

    scratch = backend.new_sequence()
    whole = full_rows(backend.forward([full_item(scratch, toks)])[0])
    assert np.abs(whole - rows).max() < LOGPROB_TOL


# --------------------------------------------------------------------------------------------------
# 3. Batching across sequences


@pytest.mark.parametrize("kv_unified", [True, False])
def test_batched_equals_alone(make_backend, kv_unified: bool) -> None:
    prompts = [tokens(10 + i, n) for i, n in enumerate((3, 17, 8, 30))]
    news = [tokens(20 + i, n) for i, n in enumerate((1, 6, 4, 2))]
    n_outs = [1, 17, 2, 30]

    alone_backend = make_backend(kv_unified=kv_unified)
    alone_prompt, alone_new = [], []
    for p, nw, n_out in zip(prompts, news, n_outs, strict=True):
        seq = alone_backend.new_sequence()
        alone_prompt.append(alone_backend.forward([full_item(seq, p, n_out)])[0])
        alone_new.append(alone_backend.forward([full_item(seq, nw)])[0])
        alone_backend.release(seq)

    backend = make_backend(max_sequences=8, kv_unified=kv_unified)
    # non-consecutive seq ids, in non-increasing order in the batch
    handles = [backend.new_sequence() for _ in range(8)]
    seqs = [handles[6], handles[1], handles[3], handles[4]]
    for h in handles:
        if h not in seqs:
            backend.release(h)

    outs = backend.forward([full_item(s, p, n) for s, p, n in zip(seqs, prompts, n_outs, strict=True)])
    for out, ref in zip(outs, alone_prompt, strict=True):
        assert_rows_close(out, ref)
    assert [backend.sequence_length(s) for s in seqs] == [len(p) for p in prompts]

    outs = backend.forward([full_item(s, nw) for s, nw in zip(seqs, news, strict=True)])
    for out, ref in zip(outs, alone_new, strict=True):
        assert_rows_close(out, ref)

    # a third round with only some of the sequences, and one of them freshly started
    seqs[2] = backend.new_sequence()
    outs = backend.forward([full_item(seqs[2], prompts[2], n_outs[2]), full_item(seqs[0], [7, 8])])
    assert_rows_close(outs[0], alone_prompt[2])
    check = alone_backend.new_sequence()
    alone_backend.forward([ForwardItem(check, prompts[0] + news[0], 0, K)])
    assert_rows_close(outs[1], alone_backend.forward([full_item(check, [7, 8])])[0])


# --------------------------------------------------------------------------------------------------
# 4. Batches larger than n_batch


def test_split_into_several_decodes(make_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [tokens(30, 9), tokens(31, 19), tokens(32, 12)]  # 40 tokens
    # The fast mode: sequences share calls of up to n_batch tokens.
    big = make_backend(n_batch=512, deterministic=False)
    small = make_backend(n_batch=16, deterministic=False)

    import llama_cpp.llama_cpp as lib

    calls: list[int] = []
    real = lib.llama_decode

    def counting(ctx, batch):
        calls.append(batch.n_tokens)
        return real(ctx, batch)

    expected = [big.forward([full_item(big.new_sequence(), p)])[0] for p in prompts]
    monkeypatch.setattr(lib, "llama_decode", counting)
    seqs = [small.new_sequence() for _ in prompts]
    outs = small.forward([full_item(s, p) for s, p in zip(seqs, prompts, strict=True)])
    assert calls == [16, 16, 8]
    for out, ref in zip(outs, expected, strict=True):
        assert_rows_close(out, ref)

    # one sequence alone, longer than n_batch
    calls.clear()
    seq = small.new_sequence()
    out = small.forward([full_item(seq, prompts[0] + prompts[1] + prompts[2])])[0]
    assert calls == [16, 16, 8]
    whole = big.new_sequence()
    assert_rows_close(out, big.forward([full_item(whole, prompts[0] + prompts[1] + prompts[2])])[0])

    # Deterministic mode: blocks padded to a multiple of 4 rows (at least 8); blocks of one length
    # from different sequences share a call up to n_batch rows; the rows equal bit for bit however
    # they were split and shared.
    det_big = make_backend(n_batch=512, deterministic=True, deterministic_path="padded")
    det_small = make_backend(n_batch=16, deterministic=True, deterministic_path="padded")
    det_mid = make_backend(n_batch=24, deterministic=True, deterministic_path="padded")
    single = make_backend(n_batch=16, deterministic=True, deterministic_path="single")
    monkeypatch.setattr(lib, "llama_decode", real)
    exact = [det_big.forward([full_item(det_big.new_sequence(), p)])[0] for p in prompts]
    monkeypatch.setattr(lib, "llama_decode", counting)
    calls.clear()
    outs = det_small.forward([full_item(det_small.new_sequence(), p) for p in prompts])
    # Blocks: 9 -> 12; 19 -> 16 + (3 -> 8); 12. The two 12s would make 24 > n_batch: apart.
    assert calls == [12, 12, 16, 8]
    calls.clear()
    shared = det_mid.forward([full_item(det_mid.new_sequence(), p) for p in prompts])
    assert calls == [24, 20]  # the two 12-row blocks in one call; 19 -> 20
    calls.clear()
    single.forward([full_item(single.new_sequence(), p) for p in prompts])
    assert calls == [1] * 40  # "single": the one-token decode path, one call per token
    for out, ref in zip([*outs, *shared], exact + exact, strict=True):
        assert np.array_equal(out.topk_logprobs, ref.topk_logprobs) and np.array_equal(
            out.topk_ids, ref.topk_ids
        )


def test_failed_decode_rolls_back(make_backend, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = make_backend(n_batch=8)
    import llama_cpp.llama_cpp as lib

    a, b = backend.new_sequence(), backend.new_sequence()
    backend.forward([ForwardItem(a, tokens(40, 5), 0, K), ForwardItem(b, tokens(41, 3), 0, K)])
    real = lib.llama_decode
    calls: list[int] = []

    def failing_second(ctx, batch):
        calls.append(batch.n_tokens)
        return 1 if len(calls) == 2 else real(ctx, batch)

    new_a, new_b = tokens(42, 7), tokens(43, 6)  # 13 tokens: two decodes, the second fails
    monkeypatch.setattr(lib, "llama_decode", failing_second)
    with pytest.raises(HandoffError, match="llama_decode failed with code 1"):
        backend.forward([full_item(a, new_a), full_item(b, new_b)])
    monkeypatch.setattr(lib, "llama_decode", real)
    assert (backend.sequence_length(a), backend.sequence_length(b)) == (5, 3)

    outs = backend.forward([full_item(a, new_a), full_item(b, new_b)])
    fresh = make_backend()
    for out, prefix, new in ((outs[0], tokens(40, 5), new_a), (outs[1], tokens(41, 3), new_b)):
        s = fresh.new_sequence()
        fresh.forward([ForwardItem(s, prefix, 0, K)])
        assert_rows_close(out, fresh.forward([full_item(s, new)])[0])


# --------------------------------------------------------------------------------------------------
# 5. Truncate and release


def test_truncate_then_reappend(make_backend, reference) -> None:
    backend = make_backend()
    seq = backend.new_sequence()
    prompt, new, other = tokens(50, 20), tokens(51, 8), tokens(52, 6)
    backend.forward([ForwardItem(seq, prompt, 0, K)])
    first = backend.forward([full_item(seq, new)])[0]
    backend.truncate(seq, 20)
    assert backend.sequence_length(seq) == 20
    again = backend.forward([full_item(seq, new)])[0]
    assert_rows_close(again, first)

    # cut into the prompt and continue differently: as if the prompt had been that short
    backend.truncate(seq, 12)
    rows = full_rows(backend.forward([full_item(seq, other)])[0])
    ref = reference(prompt[:12] + other)[12:]
    assert kl_divergence(ref, rows).max() < KL_MAX
    backend.truncate(seq, 18)  # same length: nothing to drop
    backend.truncate(seq, 0)
    assert backend.sequence_length(seq) == 0
    for bad in (-1, 1):
        with pytest.raises(ShapeError):
            backend.truncate(seq, bad)


def test_release_frees_the_id(make_backend) -> None:
    backend = make_backend(max_sequences=3)
    seqs = [backend.new_sequence() for _ in range(3)]
    with pytest.raises(CapacityError):
        backend.new_sequence()
    backend.forward([ForwardItem(seqs[1], tokens(60, 10), 0, K)])
    backend.release(seqs[1])
    backend.release(seqs[1])  # releasing twice is harmless
    assert backend.active_sequences == 2
    reused = backend.new_sequence()
    assert backend.sequence_length(reused) == 0
    with pytest.raises(CapacityError):
        backend.new_sequence()
    # the reused id starts from an empty cache: same rows as a fresh backend
    toks = tokens(61, 6)
    fresh = make_backend()
    assert_rows_close(
        backend.forward([full_item(reused, toks)])[0],
        fresh.forward([full_item(fresh.new_sequence(), toks)])[0],
    )
    # the old handle is dead, even though its id lives again
    with pytest.raises(HandoffError, match="released"):
        backend.forward([ForwardItem(seqs[1], [1], 1, K)])
    with pytest.raises(HandoffError, match="released"):
        backend.sequence_length(seqs[1])
    with pytest.raises(HandoffError):
        backend.truncate(seqs[1], 0)
    with pytest.raises(HandoffError, match="not a sequence"):
        backend.forward([ForwardItem(fresh.new_sequence(), [1], 1, K)])


# --------------------------------------------------------------------------------------------------
# 6. Bad input


def test_bad_input_changes_nothing(make_backend) -> None:
    backend = make_backend(max_context=32)
    a, b = backend.new_sequence(), backend.new_sequence()
    backend.forward([ForwardItem(a, tokens(70, 10), 0, K)])
    good = tokens(71, 4)
    for bad_tokens in ([5, N_VOCAB], [-1], [10**9]):
        with pytest.raises(ShapeError, match="out of range"):
            backend.forward([full_item(a, good), ForwardItem(b, bad_tokens, 1, K)])
    with pytest.raises(ShapeError):
        backend.forward([ForwardItem(a, good, 5, K)])  # more rows than tokens
    with pytest.raises(ShapeError):
        backend.forward([ForwardItem(a, good, 2, K, gather=[[1]])])
    with pytest.raises(ShapeError, match="same sequence"):
        backend.forward([ForwardItem(a, good, 1, K), ForwardItem(a, good, 1, K)])
    assert (backend.sequence_length(a), backend.sequence_length(b)) == (10, 0)

    with pytest.raises(CapacityError, match="max_context"):
        backend.forward([ForwardItem(b, tokens(72, 5), 0, K), ForwardItem(a, tokens(73, 23), 1, K)])
    assert (backend.sequence_length(a), backend.sequence_length(b)) == (10, 0)
    backend.forward([ForwardItem(a, tokens(73, 22), 1, K)])  # exactly max_context is fine
    assert backend.sequence_length(a) == 32
    with pytest.raises(CapacityError):
        backend.forward([ForwardItem(a, [1], 1, K)])

    # the cache is still right after all that
    out = backend.forward([full_item(b, good)])[0]
    fresh = make_backend()
    assert_rows_close(out, fresh.forward([full_item(fresh.new_sequence(), good)])[0])


def test_full_context_per_sequence(make_backend) -> None:
    """Every sequence can hold max_context tokens at the same time (the KV pool is big enough)."""
    backend = make_backend(max_sequences=3, max_context=100, n_batch=128)
    seqs = [backend.new_sequence() for _ in range(3)]
    outs = backend.forward([ForwardItem(s, tokens(80 + i, 100), 1, K) for i, s in enumerate(seqs)])
    assert [backend.sequence_length(s) for s in seqs] == [100, 100, 100]
    assert all(o.topk_ids.shape == (1, K) for o in outs)
