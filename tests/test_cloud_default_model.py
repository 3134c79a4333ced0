"""The default cloud model (1.5B) served end to end over gRPC by both backends on CPU.

transformers runs in bf16 (the dtype the cloud uses on GPUs); llama.cpp runs the Q4_K_M GGUF.
Their distributions at the same positions must agree: mean KL < 0.01.
"""

from __future__ import annotations

import numpy as np
import pytest

from handoff.edge.cloud_harness import run, running_server, score_all
from handoff.shared.divergence import topk_kl
from handoff.shared.model_info import load_model_info
from handoff.shared.models import ensure_model, resolve
from handoff.shared.settings import DEFAULT_CLOUD_MODEL
from handoff.shared.wire import topk_from_proto

pytestmark = [pytest.mark.real_models, pytest.mark.slow]

K = 64


@pytest.fixture(scope="module")
def cloud_ref():
    ensure_model(DEFAULT_CLOUD_MODEL)
    return resolve(DEFAULT_CLOUD_MODEL, "cloud")


@pytest.fixture(scope="module")
def vocab(cloud_ref):
    return load_model_info(cloud_ref)[1]


@pytest.fixture(scope="module")
def text(cloud_ref):
    """A chat prompt and a continuation, as token ids of the real tokenizer."""
    from handoff.shared.llama_cpp_model import LlamaCppModel

    with LlamaCppModel(cloud_ref.path, n_ctx=256, n_threads=2) as m:
        prompt = m.tokenize(
            m.chat_prompt([{"role": "user", "content": "Write a Python function to merge two sorted lists."}])
        )
        cont = m.tokenize("def merge(a, b):\n    result = []\n    i = j = 0\n    while i < len(a)")
    return prompt, cont


def _factory(cloud_ref, backend: str):
    def load():
        if backend == "transformers":
            from handoff.cloud.backends.transformers_backend import TransformersBackend

            return TransformersBackend(cloud_ref, device="cpu", dtype="bfloat16", max_context=512, threads=2)
        from handoff.cloud.backends.llama_backend import LlamaCppBackend

        return LlamaCppBackend(cloud_ref, max_sequences=2, max_context=512, threads=2)

    return load


def _serve(cloud_ref, vocab, text, backend: str, q_views=None):
    """Score the continuation (two check points) and let the cloud generate 8 greedy tokens."""
    prompt, cont = text

    async def scenario():
        async with running_server(_factory(cloud_ref, backend), max_top_k=K, max_context=512) as (_, client):
            info = await client.info()
            s = await client.open_session(prompt, vocab, top_k=K)
            scores = await score_all(s, len(prompt), cont, [6, len(cont) - 6], topk=q_views)
            generated = [t.token_id async for t in s.handoff(8)]
            await s.close()
            return info, scores, generated

    return run(scenario())


def _views(scores):
    return [topk_from_proto(s.topk) for s in scores]


def test_both_backends_serve_the_default_model_and_agree(cloud_ref, vocab, text):
    prompt, cont = text
    info_t, scores_t, gen_t = _serve(cloud_ref, vocab, text, "transformers")
    assert (info_t.backend, info_t.dtype, info_t.device) == ("transformers", "bfloat16", "cpu")
    # llama.cpp gets transformers' top-k ids as the "edge" views, so it returns its log-probabilities
    # there too; then transformers gets llama.cpp's ids the same way: every id in either top-k is
    # known on both sides and the KL below runs over their union plus the rest.
    views_t = _views(scores_t)
    info_l, scores_l, gen_l = _serve(cloud_ref, vocab, text, "llama.cpp", q_views=views_t)
    assert info_l.backend == "llama.cpp"
    views_l = _views(scores_l)
    _, scores_t2, _ = _serve(cloud_ref, vocab, text, "transformers", q_views=views_l)

    kl = []
    for j in range(len(cont)):
        (l_ids, l_lp), (t_ids, t_lp) = views_l[j], views_t[j]
        l_at_t = np.asarray(scores_l[j].logprobs_at_edge_topk, dtype=np.float64)
        t_at_l = np.asarray(scores_t2[j].logprobs_at_edge_topk, dtype=np.float64)
        kl.append(
            topk_kl(
                l_ids[None], l_lp[None], t_ids[None], t_lp[None], l_at_t[None], t_at_l[None], rest_margin=1e-5
            )[0]
        )
        assert scores_l[j].position == scores_t[j].position == len(prompt) + j
    kl = np.array(kl)
    assert kl.mean() < 0.01, kl
    top1 = np.mean([views_l[j][0][0] == views_t[j][0][0] for j in range(len(cont))])
    assert top1 >= 0.9
    # Greedy generation from the same point: the same text, up to a rare bf16-vs-Q4 flip.
    assert np.mean(np.array(gen_t) == np.array(gen_l)) >= 0.75, (gen_t, gen_l)
    assert info_t.vocab.digest == info_l.vocab.digest


def test_transformers_second_start_uses_the_converted_weights(cloud_ref, monkeypatch):
    """The dequantized weights are cached: a second backend start does not convert the GGUF again."""
    from handoff.cloud.backends import transformers_backend

    def no_conversion(*args, **kwargs):
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(transformers_backend, "convert_gguf", no_conversion)
    backend = transformers_backend.TransformersBackend(
        cloud_ref, device="cpu", dtype="bfloat16", max_context=256, threads=2
    )
    try:
        assert backend.info.dtype == "bfloat16"
    finally:
        backend.close()
