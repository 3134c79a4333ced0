"""Divergence over concepts: the maps (surface forms, clusters of P's output embeddings), the KL over
them (a lower bound of the top-k KL, itself a lower bound of the full KL), and the policy plumbing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.edge.evaluation.runner import variant_spec
from handoff.edge.policy import PolicyConfig
from handoff.shared.concepts import (
    ConceptMap,
    cluster_concepts,
    concept_map_path,
    load_or_build,
    surface_concepts,
    token_text,
)
from handoff.shared.divergence import kl_divergence, log_softmax, top_k, topk_kl
from handoff.shared.errors import ShapeError
from handoff.shared.vocab import Vocabulary

# Byte-level BPE strings as GGUFs store them: "Ġ" is a space, "Ċ" a newline.
TOKENS = [
    b"The",
    b"\xc4\xa0The",
    b"the",
    b"\xc4\xa0the",
    b"THE",
    b"\xc4\xa0",
    b"\xc4\x8a",
    b"<|im_end|>",
    b"cat",
    b"Cat",
]


def test_token_text_decodes_byte_level_bpe():
    assert [token_text(t) for t in TOKENS[:8]] == ["The", " The", "the", " the", "THE", " ", "\n", None]


def test_surface_concepts_fold_case_and_leading_space_only():
    m = surface_concepts(Vocabulary(tuple(TOKENS)))
    c = m.concept_of
    assert len({int(c[i]) for i in range(5)}) == 1  # The, " The", the, " the", THE
    assert c[5] != c[6] and c[5] not in c[:5] and c[7] not in c[:7]  # space, newline, control: alone
    assert c[8] == c[9] and c[8] != c[0]
    assert m.n_concepts == 5 and m.merged_tokens() == 7


def test_char_concepts_group_tokens_by_their_first_character():
    from handoff.shared.concepts import char_concepts, first_char

    c = char_concepts(Vocabulary(tuple(TOKENS))).concept_of
    texts = [token_text(t) for t in TOKENS]
    for i in range(len(TOKENS)):
        for j in range(len(TOKENS)):
            same = texts[i] is not None and texts[j] is not None and texts[i][0] == texts[j][0]
            assert (c[i] == c[j]) == (same or i == j), (TOKENS[i], TOKENS[j])
    assert first_char("é!".encode()) == "é" and first_char(b"\xa9x") == "\\xa9" and first_char(b"") is None


def test_cluster_concepts_recover_planted_groups():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 32)) * 5
    labels = np.repeat(np.arange(3), 40)
    emb = centers[labels] + 0.1 * rng.standard_normal((120, 32))
    m = cluster_concepts(emb, 3, dims=16)
    # The same partition as the planted one, whatever the cluster numbers.
    assert len(set(zip(labels.tolist(), m.concept_of.tolist(), strict=True))) == 3
    with pytest.raises(ShapeError):
        cluster_concepts(emb, 500)
    with pytest.raises(ShapeError):
        ConceptMap(np.array([[0, 1]]), "cluster")


def test_concept_maps_are_cached_by_fingerprint(tmp_path):
    vocab = Vocabulary(tuple(TOKENS))
    path = concept_map_path(tmp_path, vocab, "surface", 0)
    built = load_or_build(path, lambda: surface_concepts(vocab).concept_of)
    assert path.is_file()
    again = load_or_build(path, lambda: pytest.fail("rebuilt a cached map"))
    assert (again == built).all()
    other = Vocabulary((*TOKENS, b"dog"))
    assert concept_map_path(tmp_path, other, "surface", 0) != path


def test_surface_forms_of_one_word_are_no_disagreement():
    """P says " The", Q says "The": several nats over tokens, nothing over surface forms."""
    vocab = Vocabulary(tuple(TOKENS))
    concept_of = surface_concepts(vocab).concept_of
    p = np.log(np.array([[0.05, 0.9, 0.01, 0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025, 0.0]]) + 1e-12)
    q = np.log(np.array([[0.9, 0.05, 0.01, 0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025, 0.0]]) + 1e-12)
    p, q = log_softmax(p), log_softmax(q)
    p_ids, p_lp = top_k(p, 5)
    q_ids, q_lp = top_k(q, 5)
    p_at_q = np.take_along_axis(p, q_ids, axis=1)
    token = topk_kl(p_ids, p_lp, q_ids, q_lp, p_at_q)[0]
    surface = topk_kl(p_ids, p_lp, q_ids, q_lp, p_at_q, concept_of=concept_of)[0]
    assert token > 2.0 and surface < 1e-6


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    vocab=st.integers(6, 40),
    k=st.integers(1, 6),
    n_concepts=st.integers(1, 12),
    with_p_at_q=st.booleans(),
)
def test_concept_kl_is_below_token_kl_is_below_full_kl(seed, vocab, k, n_concepts, with_p_at_q):
    rng = np.random.default_rng(seed)
    p = log_softmax(rng.standard_normal((3, vocab)) * 3)  # [n, V]
    q = log_softmax(rng.standard_normal((3, vocab)) * 3)  # [n, V]
    concept_of = rng.integers(0, n_concepts, size=vocab)  # [V]
    k = min(k, vocab)
    p_ids, p_lp = top_k(p, k)
    q_ids, q_lp = top_k(q, k)
    p_at_q = np.take_along_axis(p, q_ids, axis=1) if with_p_at_q else None
    full = kl_divergence(p, q)  # [n]
    token = topk_kl(p_ids, p_lp, q_ids, q_lp, p_at_q)
    concept = topk_kl(p_ids, p_lp, q_ids, q_lp, p_at_q, concept_of=concept_of)
    assert (concept <= token + 1e-9).all() and (token <= full + 1e-9).all()
    # One concept per id is the token KL.
    identity = topk_kl(p_ids, p_lp, q_ids, q_lp, p_at_q, concept_of=np.arange(vocab))
    np.testing.assert_allclose(identity, token, rtol=1e-12, atol=1e-12)


def test_concept_map_must_cover_the_views():
    ids = np.array([[0, 5]])
    lp = np.log(np.array([[0.6, 0.4]]))
    with pytest.raises(ShapeError, match="concept_of"):
        topk_kl(ids, lp, ids, lp, concept_of=np.arange(3))
    with pytest.raises(ShapeError, match="concept_of"):
        topk_kl(ids, lp, ids, lp, concept_of=np.zeros(8))  # not integers


def test_the_divergence_is_a_policy_setting_and_an_eval_variant():
    assert PolicyConfig(divergence="surface").divergence == "surface"
    with pytest.raises(ShapeError, match="divergence"):
        PolicyConfig(divergence="words")
    with pytest.raises(ShapeError, match="concepts"):
        PolicyConfig(concepts=1)
    spec = variant_spec("concept:0.3", PolicyConfig())
    assert (
        spec.name == "concept-tau0.3" and spec.policy.divergence == "concept" and spec.policy.threshold == 0.3
    )
    assert variant_spec("surface:1", PolicyConfig()).policy.divergence == "surface"


def test_surface_divergence_through_real_grpc(tiny_gguf_a, tiny_gguf_b):
    """Q = tiny B, P = tiny A in a server on port 0: the KL over surface forms drives the policy."""
    from handoff.edge.cloud_harness import generate_with_server

    token = generate_with_server(tiny_gguf_a, tiny_gguf_b, PolicyConfig(check_interval=4), 24)
    surface = generate_with_server(
        tiny_gguf_a, tiny_gguf_b, PolicyConfig(check_interval=4, divergence="surface"), 24
    )
    for result in (token, surface):
        assert len(result.tokens) == 24 and result.check_points > 0
    # These two models never agree within tau, so both texts are P's greedy one: the same positions
    # in the same contexts, where the surface KL is at most the token KL and below it somewhere.
    assert surface.tokens == token.tokens
    pairs = [(a.kl, b.kl) for a, b in zip(token.records, surface.records, strict=True)]
    assert all(a is not None and b is not None and np.isfinite(a) and 0.0 <= b <= a + 1e-9 for a, b in pairs)
    assert any(b < a - 1e-3 for a, b in pairs)
