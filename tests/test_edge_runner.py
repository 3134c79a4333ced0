"""The edge runner on the tiny models: steps, sampling, append/score, rollback and bad input.

The reference is `LlamaCppModel` driven by hand with the same sequence of eval calls, so the
distributions must match to rounding, not just approximately.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from handoff.edge.runner import EdgeRunner, EdgeStep
from handoff.shared.divergence import entropy, log_softmax, top_k
from handoff.shared.errors import ShapeError
from handoff.shared.llama_cpp_model import LlamaCppModel
from handoff.shared.sampling import SamplingSettings, sample_token, sampling_distribution

# One thread: on a 2-core machine shared with other test runs, two llama.cpp threads wait on each other.
THREADS = 1
N_CTX = 256
N_VOCAB = 1022
K = 8
LP_ATOL = 1e-6
REGEN_ATOL = 1e-4  # a position evaluated a second time after a rollback, see below
TEXT = "<|im_start|>user\nWrite a short story about a cat.<|im_end|>\n<|im_start|>assistant\n"
EXTRA = "Once upon a time"


@pytest.fixture
def make_runner(tiny_gguf_a: Path):
    made: list[EdgeRunner] = []

    def make(path: Path = tiny_gguf_a, **kw) -> EdgeRunner:
        kw = {"k": K, "n_ctx": N_CTX, "n_threads": THREADS, **kw}
        runner = EdgeRunner(path, **kw)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close()


@pytest.fixture
def make_ref(tiny_gguf_a: Path):
    made: list[LlamaCppModel] = []

    def make(path: Path = tiny_gguf_a) -> LlamaCppModel:
        model = LlamaCppModel(path, n_ctx=N_CTX, n_threads=THREADS)
        made.append(model)
        return model

    yield make
    for model in made:
        model.close()


@pytest.fixture
def prompt(make_ref) -> list[int]:
    return make_ref().tokenize(TEXT)


def assert_view(top_ids, top_lp, ent, logprobs: np.ndarray) -> None:
    """A top-k view (ids, log-probs, entropy) matches the full log-probability row it came from."""
    ref_ids, _ = top_k(logprobs, K)
    np.testing.assert_array_equal(top_ids, ref_ids)
    assert top_ids.dtype == np.int32 and top_ids.shape == (K,)
    assert top_lp.dtype == np.float64 and top_lp.shape == (K,)
    assert np.all(np.diff(top_lp) <= 0), "top-k log-probs must be sorted descending"
    np.testing.assert_allclose(top_lp, logprobs[top_ids], rtol=0, atol=LP_ATOL)
    # The runner works in float32 with float64 sums (shared.divergence.logits_view): ~1e-7 relative.
    assert ent == pytest.approx(float(entropy(logprobs)), abs=1e-6)


# --------------------------------------------------------------------------------------------------
# 1. Greedy steps


def test_greedy_steps_match_reference(make_runner, make_ref, prompt) -> None:
    runner, ref = make_runner(), make_ref()
    runner.start(prompt)
    ref.eval(prompt)
    assert runner.length == len(prompt)
    steps = []
    for i in range(24):
        logits = ref.next_logits()
        logprobs = log_softmax(logits)
        step = runner.step()
        assert isinstance(step, EdgeStep)
        assert step.position == len(prompt) + i
        assert step.token_id == int(np.argmax(logits))
        assert step.topk_ids[0] == step.token_id
        assert_view(step.topk_ids, step.topk_logprobs, step.entropy, logprobs)
        assert step.sampled_logprob == 0.0
        assert step.seconds > 0
        ref.eval([step.token_id])
        steps.append(step.token_id)
    assert runner.tokens == prompt + steps
    assert runner.length == len(prompt) + len(steps)
    assert runner.detokenize(steps) == ref.detokenize(steps)
    assert runner.stop_token_ids == frozenset(ref.stop_token_ids())


def test_logprobs_are_bit_identical_to_log_softmax(make_runner, prompt) -> None:
    """The fused log-softmax + entropy is the shared log_softmax exactly, not just close to it."""
    from handoff.shared.divergence import log_softmax_and_entropy

    runner = make_runner()
    runner.start(prompt)
    logits = runner.model.next_logits()
    logprobs, ent = log_softmax_and_entropy(logits)
    np.testing.assert_array_equal(logprobs, log_softmax(logits))
    assert ent == pytest.approx(float(entropy(logprobs)), abs=1e-12)
    # A wide, V-sized row like the real model's, and a near-one-hot one.
    rng = np.random.default_rng(0)
    for row in (rng.standard_normal(151_936).astype(np.float32) * 4, np.array([0.0, -40.0, -50.0])):
        logprobs, ent = log_softmax_and_entropy(row)
        np.testing.assert_array_equal(logprobs, log_softmax(row))
        assert ent == pytest.approx(float(entropy(logprobs)), rel=1e-12, abs=1e-15)


# --------------------------------------------------------------------------------------------------
# 2. Seeded sampling

SAMPLED = SamplingSettings(temperature=0.8, top_p=0.9, seed=5)


def generate(runner: EdgeRunner, prompt: list[int], n: int) -> list[EdgeStep]:
    runner.start(prompt)
    return [runner.step() for _ in range(n)]


def test_seeded_sampling_is_reproducible(make_runner, make_ref, prompt) -> None:
    n = 24
    first, second = make_runner(sampling=SAMPLED), make_runner(sampling=SAMPLED)
    steps = generate(first, prompt, n)
    a = [s.token_id for s in steps]
    assert [s.token_id for s in generate(second, prompt, n)] == a  # another runner
    # start() again: the prompt's KV is reused and draws are keyed by position, so the same tokens.
    assert [s.token_id for s in generate(first, prompt, n)] == a
    other = make_runner(sampling=SamplingSettings(temperature=0.8, top_p=0.9, seed=6))
    assert [s.token_id for s in generate(other, prompt, n)] != a

    # The draws are shared.sampling.sample_token's (the cloud's) with the same seed, and
    # sampled_logprob is the log-probability under the tempered, nucleus-cut distribution.
    ref = make_ref()
    ref.eval(prompt)
    diffs = []
    for step in steps:
        logprobs = log_softmax(ref.next_logits())
        assert sample_token(logprobs, SAMPLED, SAMPLED.rng_for(step.position)) == step.token_id
        probs = sampling_distribution(logprobs, SAMPLED)
        assert step.sampled_logprob == pytest.approx(np.log(probs[step.token_id]), abs=1e-12)
        diffs.append(step.sampled_logprob - logprobs[step.token_id])
        assert_view(step.topk_ids, step.topk_logprobs, step.entropy, logprobs)  # views stay at T = 1
        ref.eval([step.token_id])
    assert np.abs(diffs).max() > 0.01  # the sampled log-prob is not the model's (T = 1) one


# --------------------------------------------------------------------------------------------------
# 3. Sampling follows the model's distribution

N_DRAWS = 2000
MAX_BINS = 20
# 0.999 quantiles of the chi-square distribution, by degrees of freedom (scipy.stats.chi2.ppf(0.999,
# df), df = 1 ... 19). The draws are seeded, so the test is deterministic; the quantile says how
# unlikely a false rejection would have been.
CHI2_999 = {
    1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322, 8: 26.124,
    9: 27.877, 10: 29.588, 11: 31.264, 12: 32.909, 13: 34.528, 14: 36.123, 15: 37.697,
    16: 39.252, 17: 40.790, 18: 42.312, 19: 43.820,
}  # fmt: skip


def chi_square(draws: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of the draws against a hypothesised distribution, and its degrees of freedom.

    Tokens are taken by descending hypothesised probability and grouped greedily into bins of at
    least 1 / MAX_BINS of the mass (a heavy token is a bin of its own), so every expected count is
    >= N_DRAWS / MAX_BINS = 100, far above the 5 the chi-square approximation needs.

    Args:
        draws: [n] sampled token ids.
        probs: [V] hypothesised probabilities.

    Returns:
        (statistic, number of bins - 1).
    """
    order = np.argsort(-probs, kind="stable")
    bins = np.empty(probs.size, dtype=np.int64)
    b, mass = 0, 0.0
    for tid in order:
        bins[tid] = b
        mass += probs[tid]
        if mass >= 1.0 / MAX_BINS:
            b, mass = b + 1, 0.0
    if mass > 0.0:  # a thin last bin joins the one before it
        bins[bins == b] = b - 1
    n_bins = int(bins.max()) + 1
    expected = np.bincount(bins, weights=probs, minlength=n_bins) * draws.size  # [n_bins]
    assert expected.min() >= 5, expected
    counts = np.bincount(bins[draws], minlength=n_bins)  # [n_bins]
    return float(np.sum((counts - expected) ** 2 / expected)), n_bins - 1


def test_sampling_frequencies_match_model(make_runner, make_ref, prompt, tiny_gguf_b: Path) -> None:
    # Draws at one position keyed by (seed, position): a new seed for each (start() reuses the prompt).
    runner = make_runner()
    draws = np.empty(N_DRAWS, dtype=np.int64)
    for i in range(N_DRAWS):
        runner.start(prompt, SamplingSettings(temperature=1.0, seed=11_000 + i))
        step = runner.step()
        assert step.position == len(prompt)
        draws[i] = step.token_id

    ref_a = make_ref()
    ref_a.eval(prompt)
    p_a = np.exp(log_softmax(ref_a.next_logits()))  # [V]
    stat, df = chi_square(draws, p_a)
    assert df >= 5, "too few bins for a meaningful test"
    assert stat < CHI2_999[df], f"the draws do not follow the model: chi2 = {stat:.1f}, df = {df}"

    # The same test rejects a wrong distribution: model B's at the same position.
    ref_b = make_ref(tiny_gguf_b)
    ref_b.eval(prompt)
    p_b = np.exp(log_softmax(ref_b.next_logits()))  # [V]
    stat_b, df_b = chi_square(draws, p_b)
    assert stat_b > 10 * CHI2_999[df_b], f"B's distribution should be rejected: chi2 = {stat_b:.1f}"


# --------------------------------------------------------------------------------------------------
# 4. Appending foreign tokens


def test_append_then_step_equals_direct_evaluation(make_runner, make_ref, prompt) -> None:
    runner, ref = make_runner(), make_ref()
    extra = ref.tokenize(EXTRA)
    runner.start(prompt)
    runner.append(extra)
    runner.append([])  # nothing to do
    assert runner.length == len(prompt) + len(extra)
    assert runner.tokens == prompt + extra

    # Reference: the same eval calls on a bare LlamaCppModel.
    ref.eval(prompt)
    ref.eval(extra)
    for _ in range(8):
        logprobs = log_softmax(ref.next_logits())
        step = runner.step()
        assert step.position == ref.n_past
        assert step.token_id == int(np.argmax(logprobs))
        assert_view(step.topk_ids, step.topk_logprobs, step.entropy, logprobs)
        ref.eval([step.token_id])

    # Prompt and extra in one start(): a different batch split, same tokens up to rounding.
    direct = make_runner()
    direct.start(prompt + extra)
    runner.truncate(len(prompt) + len(extra))
    for _ in range(8):
        a, b = runner.step(), direct.step()
        assert a.token_id == b.token_id
        np.testing.assert_array_equal(a.topk_ids[:3], b.topk_ids[:3])
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-2)


def test_score_appended_matches_step_by_step(make_runner, make_ref, prompt) -> None:
    runner, ref = make_runner(), make_ref()
    extra = ref.tokenize(EXTRA)
    runner.start(prompt)
    views = runner.score_appended(extra)
    assert len(views) == len(extra)
    assert runner.tokens == prompt + extra
    assert runner.score_appended([]) == []

    ref.eval(prompt)
    for tid, (top_ids, top_lp, ent) in zip(extra, views, strict=True):
        assert_view(top_ids, top_lp, ent, log_softmax(ref.next_logits()))
        ref.eval([tid])
    # The next step continues after the scored tokens.
    logprobs = log_softmax(ref.next_logits())
    step = runner.step()
    assert step.position == len(prompt) + len(extra)
    assert step.token_id == int(np.argmax(logprobs))
    assert_view(step.topk_ids, step.topk_logprobs, step.entropy, logprobs)

    # A scored token's first view is what step() would have reported at that position.
    again = make_runner()
    again.start(prompt)
    first = again.step()
    np.testing.assert_array_equal(first.topk_ids, views[0][0])
    np.testing.assert_allclose(first.topk_logprobs, views[0][1], rtol=0, atol=LP_ATOL)


# --------------------------------------------------------------------------------------------------
# 5. Rollback


def test_replace_tail_is_truncate_then_append_in_one_pass(make_runner, prompt) -> None:
    """A correction in place: roll back and put another token there, one decode instead of two."""
    a, b = make_runner(), make_runner()
    for r in (a, b):
        r.start(prompt)
        for _ in range(6):
            r.step()
    calls = []
    evaluate = b.model.eval
    b.model.eval = lambda ids, **kw: (calls.append(list(ids)), evaluate(ids, **kw))[1]
    other = (a.tokens[len(prompt) + 3] + 1) % 900
    a.truncate(len(prompt) + 3)
    a.append([other])
    b.replace_tail(len(prompt) + 3, [other])
    assert calls == [[other]]  # no second look at the token before it
    assert b.tokens == a.tokens == prompt + a.tokens[len(prompt) : len(prompt) + 3] + [other]
    for _ in range(4):
        x, y = a.step(), b.step()
        assert (x.position, x.token_id) == (y.position, y.token_id)
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, rtol=0, atol=REGEN_ATOL)
    with pytest.raises(ShapeError, match="cannot roll"):
        b.replace_tail(b.length + 1, [other])


def test_truncate_regenerates_the_same_tokens(make_runner, prompt) -> None:
    runner = make_runner()
    runner.start(prompt)
    first = [runner.step() for _ in range(10)]
    runner.truncate(runner.length)  # a no-op
    assert runner.length == len(prompt) + 10
    for cut in (7, 3, 0):
        runner.truncate(len(prompt) + cut)
        assert runner.length == len(prompt) + cut
        assert runner.tokens == prompt + [s.token_id for s in first[:cut]]
        for want in first[cut : cut + 3]:
            got = runner.step()
            assert got.position == want.position
            assert got.token_id == want.token_id
            np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
            # Re-evaluated positions may land in other KV cells, which changes llama.cpp's float32
            # summation order: measured ~1e-6, against nats-sized differences between tokens.
            np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, rtol=0, atol=REGEN_ATOL)
            assert got.entropy == pytest.approx(want.entropy, abs=REGEN_ATOL)
    # Rolling back into the prompt works too.
    runner.truncate(4)
    assert runner.tokens == prompt[:4]
    runner.truncate(0)
    assert runner.length == 0
    with pytest.raises(ShapeError, match="no tokens evaluated"):
        runner.step()


# --------------------------------------------------------------------------------------------------
# 6. Bad input and lifetime


def test_bad_input(make_runner, prompt) -> None:
    runner = make_runner()
    with pytest.raises(ShapeError, match="no tokens evaluated"):
        runner.step()  # nothing started
    with pytest.raises(ShapeError, match="at least one token"):
        runner.start([])
    for bad in ([N_VOCAB], [-1], [1, 2, 10**6]):
        with pytest.raises(ShapeError, match="out of range"):
            runner.start(bad)
    with pytest.raises(ShapeError, match="integer token ids"):
        runner.start([1.5, 2.0])
    with pytest.raises(ShapeError, match="sequence of token ids"):
        runner.append("hello")
    with pytest.raises(ShapeError, match="score_appended: the context is empty"):
        runner.score_appended([1])

    runner.start(prompt)
    n = runner.length
    with pytest.raises(ShapeError, match=r"out of range \[0, 1022\): \[1022\]"):
        runner.append([5, N_VOCAB])
    with pytest.raises(ShapeError, match="out of range"):
        runner.score_appended([5, 6, -3])
    assert runner.length == n  # nothing half-appended
    with pytest.raises(ShapeError, match="context overflow"):
        runner.append([5] * (N_CTX - n + 1))
    for length in (n + 1, -1):
        with pytest.raises(ShapeError, match="cannot roll a context"):
            runner.truncate(length)
    with pytest.raises(ShapeError, match="expected an int length"):
        runner.truncate(2.5)
    assert runner.length == n
    runner.step()  # still usable

    for k in (0, N_VOCAB + 1, 2.0):
        with pytest.raises(ShapeError, match="k: expected"):
            make_runner(k=k)


def test_full_context(make_runner, prompt) -> None:
    runner = make_runner(sampling=SamplingSettings(temperature=1.0, seed=3))
    long_prompt = prompt + [5] * (runner.n_ctx - len(prompt) - 2)  # llama.cpp may round n_ctx up
    runner.start(long_prompt)
    a = runner.step()
    runner.step()
    with pytest.raises(ShapeError, match="context is full"):
        runner.step()
    with pytest.raises(ShapeError, match=r"prompt_ids: .* do not fit"):
        runner.start([*long_prompt, 1, 2, 3])
    runner.start(long_prompt)
    assert runner.step().token_id == a.token_id


def test_wraps_a_loaded_model_and_closes(tiny_gguf_a: Path, make_ref, prompt) -> None:
    model = make_ref()
    with EdgeRunner(model, k=K) as runner:
        assert runner.model is model
        runner.start(prompt)
        runner.step()
    assert model.n_past == len(prompt) + 1  # a loaded model is the caller's: still open
    with EdgeRunner(tiny_gguf_a, k=K, n_ctx=512, n_threads=THREADS) as owned:
        assert owned.n_ctx == 512
        owned.start(prompt)
        assert owned.step().topk_ids.shape == (K,)
    owned.close()  # closing twice is harmless
