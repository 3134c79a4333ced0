"""Vocabulary alignment and the intersection KL between models with different tokenizers.

Math on hand-made vocabularies against an independent reference (each distribution pushed onto the
shared tokens plus one rest bucket, then the plain KL); tiny models with other ids (a shuffled
vocabulary) and with a smaller tokenizer.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.shared.alignment import (
    VocabAlignment,
    align,
    alignment_for,
    intersection_draft,
    intersection_kl,
    token_pieces,
)
from handoff.shared.errors import ShapeError

# Q: 6 tokens, P: 7; shared texts: a, b, cd, e (P spells "e" twice: its lower id stands for it).
Q_PIECES = [b"a", b"b", b"cd", b"x", None, b"e"]
P_PIECES = [b"e", b"cd", b"y", b"a", b"e", None, b"b"]


def reference_kl(p: np.ndarray, q: np.ndarray, a: VocabAlignment, rest_margin: float = 0.0) -> float:
    """KL(P_S || Q_S) from full distributions: shared tokens one by one, everything else one bucket.

    rest_margin: added to Q's rest as topk_kl does (its documented guard against rounding, which
    lowers the rest term by rest_p * log(1 + margin / rest_q)); 0 gives the plain KL.
    """
    shared_q = np.flatnonzero(a.q_to_p >= 0)
    p_s = np.append(p[a.q_to_p[shared_q]], 1.0 - p[a.q_to_p[shared_q]].sum())
    q_s = np.append(q[shared_q], 1.0 - q[shared_q].sum() + rest_margin)
    keep = p_s > 0
    return float(np.sum(p_s[keep] * np.log(p_s[keep] / q_s[keep])))


def test_align_maps_shared_texts_both_ways() -> None:
    a = align(Q_PIECES, P_PIECES, "q", "p")
    assert a.q_to_p.tolist() == [3, 6, 1, -1, -1, 0]
    assert a.p_to_q.tolist() == [5, 2, -1, 0, -1, -1, 1]
    assert a.size == 4
    np.testing.assert_array_equal(a.q_ids_in_p(np.array([[0, 3, 5]])), [[3, 7 + 3, 0]])
    with pytest.raises(ShapeError):
        a.q_ids_in_p(np.array([6]))
    with pytest.raises(ShapeError, match="p_ids"):
        intersection_kl(np.array([[7]]), np.array([[0.0]]), np.array([[0]]), np.array([[0.0]]), a)
    with pytest.raises(ShapeError, match="inverse"):
        VocabAlignment(np.array([1, -1]), np.array([-1, -1]), "", "")


def test_alignment_round_trips_through_its_file(tmp_path) -> None:
    a = align(Q_PIECES, P_PIECES, "qd", "pd")
    a.save(tmp_path / "a.npz")
    b = VocabAlignment.load(tmp_path / "a.npz")
    assert (b.q_digest, b.p_digest) == ("qd", "pd")
    np.testing.assert_array_equal(b.q_to_p, a.q_to_p)
    np.testing.assert_array_equal(b.p_to_q, a.p_to_q)


def _dist(rng: np.random.Generator, n: int, spread: float) -> np.ndarray:
    x = rng.normal(0.0, spread, n)
    return np.exp(x) / np.exp(x).sum()


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31), spread=st.floats(0.1, 4.0), kp=st.integers(1, 7), kq=st.integers(1, 6))
def test_intersection_kl_is_the_reference_with_full_views_and_a_lower_bound_with_top_k(
    seed, spread, kp, kq
) -> None:
    a = align(Q_PIECES, P_PIECES)
    rng = np.random.default_rng(seed)
    p, q = _dist(rng, 7, spread), _dist(rng, 6, spread)
    ref = reference_kl(p, q, a)

    def view(dist, k):
        ids = np.argsort(-dist, kind="stable")[:k]
        return ids[None, :], np.log(dist[ids])[None, :]

    full = intersection_kl(*view(p, 7), *view(q, 6), a)
    assert full[0] == pytest.approx(reference_kl(p, q, a, rest_margin=1e-8), rel=1e-9, abs=1e-9)
    assert full[0] <= ref + 1e-12
    p_ids, p_lp = view(p, kp)
    q_ids, q_lp = view(q, kq)
    assert intersection_kl(p_ids, p_lp, q_ids, q_lp, a)[0] <= ref + 1e-9
    # P's values at Q's ids (where P has the token) tighten the bound but keep it.
    at = np.where(a.q_to_p[q_ids] >= 0, np.log(p[np.maximum(a.q_to_p[q_ids], 0)]), -np.inf)
    tighter = intersection_kl(p_ids, p_lp, q_ids, q_lp, a, p_logprobs_at_q_ids=at)[0]
    assert intersection_kl(p_ids, p_lp, q_ids, q_lp, a)[0] - 1e-9 <= tighter <= ref + 1e-9


def test_the_same_distribution_in_two_id_spaces_has_zero_divergence() -> None:
    order = np.array([3, 0, 4, 1, 2])
    pieces = [b"a", b"b", b"c", b"d", b"e"]
    a = align([pieces[i] for i in order], pieces)  # Q's id i is P's id order[i]
    p = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    q = p[order]
    p_ids = np.argsort(-p)[None, :3]
    q_ids = np.argsort(-q)[None, :3]
    kl = intersection_kl(p_ids, np.log(p[p_ids]), q_ids, np.log(q[q_ids]), a)
    assert kl[0] == pytest.approx(0.0, abs=1e-12)


def test_tiny_models_with_other_ids_or_another_tokenizer(
    tiny_gguf_a, tiny_gguf_a_permuted, tiny_gguf_small_vocab, tmp_path
) -> None:
    from handoff.edge.runner import EdgeRunner

    # Shuffled ids: every text token is shared, and the models are one model over texts.
    a = alignment_for(tiny_gguf_a_permuted, tiny_gguf_a, tmp_path)
    pieces = token_pieces(tiny_gguf_a)
    assert a.size == sum(p is not None for p in pieces) > 900
    again = alignment_for(tiny_gguf_a_permuted, tiny_gguf_a, tmp_path)  # from the cache file
    np.testing.assert_array_equal(again.q_to_p, a.q_to_p)
    assert len(list(tmp_path.glob("alignment-*.npz"))) == 1
    text = "def add(a, b):\n    return a + b\n"
    with (
        EdgeRunner(tiny_gguf_a_permuted, k=8, n_ctx=256, n_threads=1) as q,
        EdgeRunner(tiny_gguf_a, k=8, n_ctx=256, n_threads=1) as p,
    ):
        q_ids, p_ids = q.model.tokenize(text), p.model.tokenize(text)
        assert [a.q_to_p[t] for t in q_ids] == p_ids  # the same tokens, other ids
        q.start(q_ids[:1])
        p.start(p_ids[:1])
        q_views = q.score_appended(q_ids[1:])
        p_views = p.score_appended(p_ids[1:])
    kl = intersection_kl(
        np.stack([v[0] for v in p_views]), np.stack([v[1] for v in p_views]),
        np.stack([v[0] for v in q_views]), np.stack([v[1] for v in q_views]), a,
    )  # fmt: skip
    assert np.all(kl < 1e-5), kl

    # A smaller tokenizer: its 600 text tokens are all A's too (the same first tokens of Qwen2.5),
    # the special tokens are not text, and the same text splits into more, shorter tokens.
    small = alignment_for(tiny_gguf_small_vocab, tiny_gguf_a, tmp_path)
    assert small.size == sum(p is not None for p in token_pieces(tiny_gguf_small_vocab))
    with (
        EdgeRunner(tiny_gguf_small_vocab, k=8, n_ctx=256, n_threads=1) as q,
        EdgeRunner(tiny_gguf_a, k=8, n_ctx=256, n_threads=1) as p,
    ):
        assert len(q.model.tokenize(text)) > len(p.model.tokenize(text))
        eos_q, eos_p = q.model.token_id("<|im_end|>"), p.model.token_id("<|im_end|>")
    assert eos_q != eos_p and small.q_to_p[eos_q] == -1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_tli_drafts_and_verification_sample_ps_distribution(temperature) -> None:
    """Q drafts from its shared tokens only; P verifies them as its own: the output is P's sampling."""
    from scipy.stats import chisquare

    from handoff.shared.sampling import SamplingSettings
    from handoff.shared.speculative import target_distribution, verify_draft

    a = align(Q_PIECES, P_PIECES)
    rng = np.random.default_rng(3)
    p_lp = np.log(_dist(rng, 7, 1.5))
    q_lp = np.log(_dist(rng, 6, 1.5))
    settings = SamplingSettings(temperature=temperature, seed=1)
    target = target_distribution(p_lp, settings)
    order = np.argsort(-q_lp, kind="stable")[:4]  # Q's top-4: "x" (unshared) may be among them
    ids, probs = intersection_draft(order, q_lp[order], settings, a)
    assert set(ids.tolist()) <= set(a.q_to_p[a.q_to_p >= 0].tolist()) and probs.sum() == pytest.approx(1.0)
    n, out = 20_000, np.zeros(7)
    draws = np.random.default_rng(4)
    for i in range(n):
        x = ids[draws.choice(ids.size, p=probs)]
        verdict = verify_draft(np.array([x]), ids[None, :], probs[None, :], np.stack([target, target]),
                               [np.random.default_rng((5, i, 0)), np.random.default_rng((5, i, 1))])  # fmt: skip
        out[x if verdict.accepted else verdict.next_token] += 1
    support = target > 0
    assert chisquare(out[support], target[support] * n).pvalue > 0.001
    # Greedy: the draft is Q's likeliest shared token, and what stands is P's argmax.
    greedy = SamplingSettings()
    ids, probs = intersection_draft(order, q_lp[order], greedy, a)
    verdict = verify_draft(ids[:1], ids[None, :], probs[None, :], np.stack([target_distribution(p_lp, greedy)] * 2),
                           [np.random.default_rng(0), np.random.default_rng(1)])  # fmt: skip
    assert (ids[0] if verdict.accepted else verdict.next_token) == int(np.argmax(p_lp))
    # No shared token in Q's top-k: nothing to draft.
    unshared = np.array([3, 4])  # "x" and a special token
    assert intersection_draft(unshared, q_lp[unshared], settings, a)[0].size == 0


def test_the_edge_aligns_with_the_clouds_vocabulary_over_grpc(
    tiny_gguf_a, tiny_gguf_a_permuted, tmp_path
) -> None:
    """GetInfo serves the cloud's token bytes in ranges; the client aligns and caches, as alignment_for does."""
    from handoff.edge.cloud_harness import llama_backend_factory, run, running_server, vocabulary_of
    from handoff.shared.errors import VerifierError

    local = token_pieces(tiny_gguf_a_permuted)
    digest = vocabulary_of(tiny_gguf_a_permuted).fingerprint.digest.hex()

    async def go():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
            first = await client.alignment(local, digest, tmp_path / "edge")
            again = await client.alignment(local, digest, tmp_path / "edge")  # from the cache file
            with pytest.raises(VerifierError) as e:
                await client.info(token_pieces=(0, 70_000))
            return first, again, e.value

    first, again, error = run(go())
    reference = alignment_for(tiny_gguf_a_permuted, tiny_gguf_a, tmp_path / "reference")
    np.testing.assert_array_equal(first.q_to_p, reference.q_to_p)
    np.testing.assert_array_equal(again.p_to_q, reference.p_to_q)
    assert (first.q_digest, first.p_digest) == (reference.q_digest, reference.p_digest)
    assert error.code == "INVALID_ARGUMENT" and "token piece range" in str(error)


def test_next_character_divergence_groups_shared_tokens_by_their_first_character() -> None:
    """ " hel" and " hello" start the same text: over the next character they agree, over tokens not."""
    from handoff.shared.alignment import char_concepts_across, with_stops

    q_pieces = [b" hel", b" hello", b"x", b"\xc3\xa9t\xc3\xa9", None]
    p_pieces = [b" hello", b"x", b" hel", None, b"\xc3\xa9t\xc3\xa9", b"zz"]
    a = with_stops(align(q_pieces, p_pieces), 4, 3)
    concepts = char_concepts_across(a, q_pieces)
    vp, vq = 6, 5
    assert concepts.shape == (2 * vp + vq,)
    assert concepts[0] == concepts[2] != concepts[1]  # " hello", " hel" share " "; "x" does not
    assert concepts[3] >= 2 * vp + vq  # the end of turn: its own concept
    assert len(set(concepts[vp:].tolist())) == vp + vq  # ids outside the intersection: their own
    # P is sure of " hello", Q of " hel": far apart over tokens, close over the next character.
    p_ids, p_lp = np.array([[0, 1]]), np.log(np.array([[0.9, 0.1]]))
    q_ids, q_lp = np.array([[0, 1, 2]]), np.log(np.array([[0.85, 0.05, 0.1]]))
    p_at_q = np.log(np.array([[0.001, 0.9, 0.1]]))  # P at Q's " hel", " hello", "x"
    token = intersection_kl(p_ids, p_lp, q_ids, q_lp, a, p_at_q)[0]
    char = intersection_kl(p_ids, p_lp, q_ids, q_lp, a, p_at_q, concept_of=concepts)[0]
    assert token > 1.0 and char < 0.01


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_the_next_character_divergence_is_below_the_token_divergence(seed) -> None:
    from handoff.shared.alignment import char_concepts_across

    rng = np.random.default_rng(seed)
    letters = [bytes([c]) for c in b"abc"]
    q_pieces = [rng.choice(letters) + rng.choice(letters) for _ in range(12)]
    p_pieces = list(dict.fromkeys([*q_pieces[:8], b"zz", b"zy"]))
    q_pieces = list(dict.fromkeys(q_pieces))
    a = align(q_pieces, p_pieces)
    concepts = char_concepts_across(a, q_pieces)
    p, q = _dist(rng, len(p_pieces), 2.0), _dist(rng, len(q_pieces), 2.0)
    kp, kq = min(4, len(p)), min(4, len(q))
    p_ids = np.argsort(-p)[:kp][None]
    q_ids = np.argsort(-q)[:kq][None]
    mapped = a.q_to_p[q_ids]
    p_at_q = np.where(mapped >= 0, np.log(np.maximum(p[np.maximum(mapped, 0)], 1e-300)), -np.inf)
    args = (p_ids, np.log(p[p_ids]), q_ids, np.log(q[q_ids]), a, p_at_q)
    assert intersection_kl(*args, concept_of=concepts)[0] <= intersection_kl(*args)[0] + 1e-9
