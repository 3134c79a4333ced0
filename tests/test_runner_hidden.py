"""Q's last hidden state on the edge runner (the learned router's feature), and score_sequence.

The hidden state is llama.cpp's final-normed output of the last layer (pooling NONE, read with
llama_get_embeddings_ith): checked against the input of transformers' lm_head on the same tiny GGUF,
and against llama.cpp's own logits through the output matrix.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from handoff.edge.runner import EdgeRunner
from handoff.shared.errors import ShapeError
from handoff.shared.sampling import SamplingSettings

THREADS = 1  # see tests/test_edge_runner.py: two threads wait on each other on a busy 2-core box
N_CTX = 256
K = 8
N_EMBD = 64  # the tiny models' hidden size
N_STEPS = 12
TEXT = "<|im_start|>user\nWrite a short story about a cat.<|im_end|>\n<|im_start|>assistant\n"
# Batched vs one-token decodes of the tiny F32 model, measured: 1.5e-6 (log-probs), 7e-7 (hidden,
# entries up to ~3.3); the bounds leave room for other CPUs' kernels.
BATCH_LP_ATOL = 1e-4
BATCH_HIDDEN_ATOL = 1e-4
# llama.cpp keeps K/V in F16, transformers computes in F32: measured 7.5e-4 on the hidden states.
HF_HIDDEN_ATOL = 5e-3
# llama.cpp's logits against W_out @ its hidden state (both F32 here): measured 1e-6.
HEAD_ATOL = 1e-4


@pytest.fixture
def make_runner(tiny_gguf_a: Path):
    made: list[EdgeRunner] = []

    def make(**kw) -> EdgeRunner:
        runner = EdgeRunner(tiny_gguf_a, **{"k": K, "n_ctx": N_CTX, "n_threads": THREADS, **kw})
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close()


@pytest.fixture(scope="module")
def hf_model(tiny_gguf_a: Path):
    """Tiny model A in transformers, float32, eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_gguf_a.parent), gguf_file=tiny_gguf_a.name, dtype=torch.float32
    )
    return model.eval()


def prompt_ids(runner: EdgeRunner) -> list[int]:
    return runner.model.tokenize(TEXT)


def steps(runner: EdgeRunner, n: int = N_STEPS) -> list:
    return [runner.step() for _ in range(n)]


def test_hidden_shape_dtype_and_off_by_default(make_runner) -> None:
    off = make_runner()
    assert off.hidden is False
    off.start(prompt_ids(off))
    assert off.next_hidden() is None
    assert all(s.hidden is None for s in steps(off, 3))

    on = make_runner(hidden=True)
    assert on.next_hidden() is None  # empty context
    on.start(prompt_ids(on))
    for s in steps(on, 3):
        assert s.hidden.shape == (N_EMBD,) and s.hidden.dtype == np.float32
        assert np.all(np.isfinite(s.hidden)) and np.abs(s.hidden).max() > 0
        assert not s.hidden.flags.writeable


@pytest.mark.parametrize("sampling", [SamplingSettings(), SamplingSettings(temperature=0.8, seed=7)])
def test_hidden_on_changes_no_token_and_no_topk(make_runner, sampling: SamplingSettings) -> None:
    off, on = make_runner(sampling=sampling), make_runner(sampling=sampling, hidden=True)
    runs = []
    for runner in (off, on):
        runner.start(prompt_ids(runner))
        first = steps(runner, 5)
        runner.append([100, 200, 300])
        runner.truncate(runner.length - 2)
        runs.append(first + steps(runner, 5))
    for a, b in zip(*runs, strict=True):
        assert (a.position, a.token_id) == (b.position, b.token_id)
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)  # the same logits, bit for bit
        assert (a.entropy, a.token_logprob, a.sampled_logprob) == (
            b.entropy,
            b.token_logprob,
            b.sampled_logprob,
        )


def test_hidden_follows_append_truncate_and_toggle(make_runner) -> None:
    ref = make_runner(hidden=True)
    ids = prompt_ids(ref)
    ref.start(ids)
    ref_steps = steps(ref, 6)
    # Step i's hidden state is the one after token i - 1: read it back after each kind of call (an
    # append of 3 computes their K/V in one batch, the reference one at a time: hence allclose).
    runner = make_runner()
    runner.start(ids)
    runner.hidden = True  # mid-context: the last prompt token is evaluated again
    np.testing.assert_allclose(runner.next_hidden(), ref_steps[0].hidden, atol=1e-6)
    runner.append([s.token_id for s in ref_steps[:3]])
    np.testing.assert_allclose(runner.next_hidden(), ref_steps[3].hidden, atol=1e-6)
    runner.truncate(len(ids) + 1)
    np.testing.assert_allclose(runner.next_hidden(), ref_steps[1].hidden, atol=1e-6)
    h = runner.next_hidden()
    runner.append_scored(ref_steps[1].token_id)
    np.testing.assert_array_equal(h, ref_steps[1].hidden)
    np.testing.assert_allclose(runner.next_hidden(), ref_steps[2].hidden, atol=1e-6)
    runner.hidden = False
    assert runner.next_hidden() is None and runner.step().hidden is None


@pytest.mark.parametrize("batch", [256, 5, 1])
def test_score_sequence_matches_step_by_step(make_runner, batch: int) -> None:
    stepper = make_runner(hidden=True)
    ids = prompt_ids(stepper)
    stepper.start(ids)
    ref = steps(stepper, N_STEPS)
    tokens = [s.token_id for s in ref]

    scorer = make_runner()
    scorer.start([*ids[:5], 7, 8])  # whatever the context held, score_sequence starts afresh
    scores = scorer.score_sequence(ids, tokens, batch=batch)
    assert scores.topk_ids.shape == (N_STEPS, K) and scores.topk_ids.dtype == np.int32
    assert scores.topk_logprobs.shape == (N_STEPS, K) and scores.topk_logprobs.dtype == np.float64
    assert scores.entropy.shape == scores.token_logprob.shape == (N_STEPS,)
    assert scores.hidden.shape == (N_STEPS, N_EMBD) and scores.hidden.dtype == np.float32
    # batch = 1 decodes as the steps do: bit for bit; row 0 (the prompt's) is the step path's anyway.
    lp_atol, hidden_atol = (0.0, 0.0) if batch == 1 else (BATCH_LP_ATOL, BATCH_HIDDEN_ATOL)
    for t, s in enumerate(ref):
        np.testing.assert_array_equal(scores.topk_ids[t], s.topk_ids)
        np.testing.assert_allclose(scores.topk_logprobs[t], s.topk_logprobs, rtol=0, atol=lp_atol)
        assert scores.entropy[t] == pytest.approx(s.entropy, rel=0, abs=lp_atol)
        assert scores.token_logprob[t] == pytest.approx(s.token_logprob, rel=0, abs=lp_atol)
        np.testing.assert_allclose(scores.hidden[t], s.hidden, rtol=0, atol=hidden_atol)
    np.testing.assert_array_equal(scores.hidden[0], ref[0].hidden)
    np.testing.assert_array_equal(scores.topk_logprobs[0], ref[0].topk_logprobs)
    # The context is prompt + tokens, ready for the next step.
    assert scorer.tokens == ids + tokens
    nxt, want = scorer.step(), stepper.step()
    assert nxt.token_id == want.token_id
    np.testing.assert_allclose(nxt.topk_logprobs, want.topk_logprobs, rtol=0, atol=lp_atol)


def test_score_sequence_edges(make_runner) -> None:
    runner = make_runner()
    ids = prompt_ids(runner)
    empty = runner.score_sequence(ids, [])
    assert empty.hidden.shape == (0, N_EMBD) and empty.topk_ids.shape == (0, K)
    assert runner.tokens == ids
    one = runner.score_sequence(ids[:1], [ids[1]])  # a one-token prompt
    assert one.topk_ids.shape == (1, K) and runner.tokens == ids[:2]
    with pytest.raises(ShapeError, match="at least one token"):
        runner.score_sequence([], [1])
    with pytest.raises(ShapeError, match="do not fit"):
        runner.score_sequence(ids, [1] * N_CTX)
    with pytest.raises(ShapeError, match="batch"):
        runner.score_sequence(ids, [1], batch=0)
    with pytest.raises(ShapeError, match="out of range"):
        runner.score_sequence(ids, [1, -1])


def test_hidden_is_transformers_last_hidden_state(make_runner, hf_model) -> None:
    import torch

    runner = make_runner(hidden=True)
    ids = prompt_ids(runner)
    runner.start(ids)
    ref = steps(runner, N_STEPS)
    tokens = [s.token_id for s in ref]
    scores = make_runner().score_sequence(ids, tokens)

    with torch.no_grad():
        out = hf_model(torch.tensor([ids + tokens]), output_hidden_states=True)
        # transformers overwrites hidden_states[-1] with the final-normed last_hidden_state
        # (capture_outputs(tie_last_hidden_states=True)): it is the input of lm_head.
        last = out.hidden_states[-1][0]  # [n + T, n_embd]
        np.testing.assert_allclose(hf_model.lm_head(last).numpy(), out.logits[0].numpy(), atol=1e-5)
    at = last[len(ids) - 1 : len(ids) - 1 + N_STEPS].numpy()  # where each of the T tokens was predicted
    stepped = np.stack([s.hidden for s in ref])
    np.testing.assert_allclose(stepped, at, atol=HF_HIDDEN_ATOL)
    np.testing.assert_allclose(scores.hidden, at, atol=HF_HIDDEN_ATOL)
    # And llama.cpp's own logits are its hidden state through the output matrix.
    w = hf_model.lm_head.weight.detach().numpy()  # [V, n_embd]
    runner.start(ids)
    np.testing.assert_allclose(w @ runner.next_hidden(), runner.model.next_logits(), atol=HEAD_ATOL)


@pytest.mark.real_models
@pytest.mark.slow
def test_default_edge_model_hidden_changes_nothing(edge_gguf_path: Path) -> None:
    """On the 0.5B Q4_K_M, where a batch and one-token decodes round differently (docs/determinism.md).

    The tiny models do not show that difference, so only here would a hidden state obtained by
    re-decoding the prompt's last token without restoring its K/V cells (0.1-0.4 nats later) be caught.
    """
    made = [EdgeRunner(edge_gguf_path, k=20, n_ctx=512, n_threads=THREADS, hidden=h) for h in (False, True)]
    try:
        runs = []
        for runner in made:
            runner.start(runner.model.tokenize(TEXT))
            runs.append(steps(runner, 8))
        for a, b in zip(*runs, strict=True):
            assert a.token_id == b.token_id
            np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
            np.testing.assert_array_equal(a.topk_logprobs, b.topk_logprobs)
        assert runs[1][0].hidden.shape == (made[1].model.n_embd,) == (896,)
        # batch = 1 reproduces the steps bit for bit, on the quantized kernels too.
        ids = made[0].model.tokenize(TEXT)
        scores = made[0].score_sequence(ids, [s.token_id for s in runs[1]], batch=1)
        np.testing.assert_array_equal(scores.hidden, np.stack([s.hidden for s in runs[1]]))
        np.testing.assert_array_equal(scores.topk_logprobs, np.stack([s.topk_logprobs for s in runs[1]]))
    finally:
        for runner in made:
            runner.close()
