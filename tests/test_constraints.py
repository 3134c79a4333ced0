"""Constraints (grammar, penalties, logit bias) applied identically by the edge and the cloud.

Tiers: the math on hand-made arrays; the grammar engine on the tiny models' tokenizer; generations on
tiny models through a real gRPC verifier: greedy exact under a constraint = cloud-only under it,
the exact policy's samples follow P's constrained distribution (chi-square), every output parses.
"""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.shared.constraints import (
    Constraint,
    ConstraintError,
    ConstraintState,
    RowAdjust,
    adjust_logits,
    adjust_rows,
    json_schema_grammar,
    lark_grammar,
    merge_bias,
    penalty_bias,
    unpack_mask,
)
from handoff.shared.divergence import log_softmax
from handoff.shared.sampling import SamplingSettings
from handoff.shared.wire import constraint_from_proto, constraint_to_proto

NEG_INF = -np.inf
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "size", "kind"],
    "additionalProperties": False,
}


def _row(ids=(), values=(), allowed=None) -> RowAdjust:
    return RowAdjust(
        np.asarray(ids, dtype=np.int64),
        np.asarray(values, dtype=np.float32),
        None if allowed is None else np.asarray(allowed, dtype=bool),
    )


# -- math ---------------------------------------------------------------------------------------


def test_adjust_logits_biases_then_masks() -> None:
    logits = np.array([1.0, 2.0, 3.0, 4.0, 5.0], dtype=np.float32)
    out = adjust_logits(logits, _row([0, 3], [10.0, -1.0], [True, True, False, True]))
    # id 2 masked, id 4 past the mask's width: never allowed.
    np.testing.assert_array_equal(out, np.array([11.0, 2.0, NEG_INF, 3.0, NEG_INF], dtype=np.float32))
    assert out.dtype == np.float32 and logits[0] == 1.0  # a copy
    assert adjust_logits(logits, None) is logits
    with pytest.raises(ConstraintError, match="allows no token"):
        adjust_logits(logits, _row(allowed=[False] * 5))


def test_adjusted_rows_normalise_over_the_allowed_ids() -> None:
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    rows = [_row(allowed=[True, False, True, False]), None]
    lp = log_softmax(adjust_rows(logits, rows))
    np.testing.assert_allclose(np.exp(lp[0]), [0.25, 0.0, 0.75, 0.0])
    np.testing.assert_allclose(np.exp(lp[1]), [0.25] * 4)
    with pytest.raises(Exception, match="adjustments"):
        adjust_rows(logits, [None])


def test_penalties_follow_openais_formula() -> None:
    counts = {3: 2, 7: 1}
    ids, bias = penalty_bias(counts, frequency=0.5, presence=0.25)
    got = dict(zip(ids.tolist(), bias.tolist(), strict=True))
    # logit[j] -= c[j] * frequency + (c[j] > 0) * presence
    assert got == pytest.approx({3: -(2 * 0.5) - 0.25, 7: -(1 * 0.5) - 0.25})
    assert penalty_bias(counts, 0.0, 0.0)[0].size == 0
    ids, values = merge_bias((np.array([3, 9]), np.array([1.0, 2.0])), (ids, bias))
    assert dict(zip(ids.tolist(), values.tolist(), strict=True)) == pytest.approx(
        {3: -0.25, 7: -0.75, 9: 2.0}
    )


def test_unpack_mask_is_little_endian_per_word() -> None:
    words = np.array([0b101, -(2**31)], dtype=np.int32)  # ids 0 and 2; id 63 (the top bit of word 1)
    mask = unpack_mask(words, 64)
    assert np.flatnonzero(mask).tolist() == [0, 2, 63]
    assert unpack_mask(words, 3).tolist() == [True, False, True]
    with pytest.raises(Exception, match="bitmask"):
        unpack_mask(words, 65)


def test_constraint_fields_are_checked_and_rounded_to_the_wire() -> None:
    c = Constraint.build(frequency_penalty=0.3, presence_penalty=None, logit_bias={"5": 1.1, 2: -100})
    assert c.logit_bias == ((2, -100.0), (5, float(np.float32(1.1))))
    assert c.frequency_penalty == float(np.float32(0.3)) and c.presence_penalty == 0.0 and c.active
    assert not Constraint().active
    back, start = constraint_from_proto(constraint_to_proto(c, 17))
    assert back == c and start == 17
    assert constraint_to_proto(Constraint(), 3) is None and constraint_to_proto(None, 3) is None
    for bad in ({"frequency_penalty": 2.5}, {"presence_penalty": float("nan")}, {"logit_bias": {1: 101}}):
        with pytest.raises(ConstraintError):
            Constraint.build(**bad)
    with pytest.raises(ConstraintError, match="outside"):
        Constraint.build(logit_bias={10: 1.0}).check_ids(10)


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("accept"), st.integers(0, 5)), st.tuples(st.just("cut"), st.integers(0, 8))
        ),
        max_size=30,
    )
)
def test_penalty_state_after_rollbacks_equals_a_fresh_replay(ops) -> None:
    c = Constraint.build(frequency_penalty=0.7, presence_penalty=-0.4, logit_bias={1: 3.0})
    state = ConstraintState(c)
    for op, arg in ops:
        if op == "accept":
            state.accept(arg)
        else:
            state.truncate(min(arg, state.length))
    fresh = ConstraintState(c)
    fresh.extend(state.tokens)
    logits = np.zeros(6, dtype=np.float32)
    np.testing.assert_array_equal(adjust_logits(logits, state.row()), adjust_logits(logits, fresh.row()))


# -- the grammar engine on the tiny models' vocabulary --------------------------------------------


def test_grammar_masks_follow_the_text_and_roll_back_exactly(tiny_gguf_a) -> None:
    from handoff.edge.runner import EdgeRunner
    from handoff.shared.constraints import grammar_tokenizer

    with EdgeRunner(tiny_gguf_a, k=4, n_ctx=256, n_threads=1) as runner:
        tokenizer = grammar_tokenizer(tiny_gguf_a, runner.stop_token_ids)
        ids = runner.model.tokenize('{"name": "ab", "size": 7, "kind": "dog"}')
        stops = sorted(runner.stop_token_ids)
    state = ConstraintState(Constraint(grammar=json_schema_grammar(SCHEMA)), tokenizer)
    rows = []
    for t in ids:
        rows.append(state.row().allowed.copy())
        state.accept(t)
    assert state.finished
    assert np.flatnonzero(state.row().allowed).tolist() == stops  # only an end of generation now
    # Rolling back and replaying gives the same masks, bit for bit.
    state.truncate(3)
    for j, t in enumerate(ids[3:], start=3):
        np.testing.assert_array_equal(state.row().allowed, rows[j])
        state.accept(t)
    # A token the grammar forbids is refused and changes nothing.
    state.truncate(0)
    bad = ids[1]  # '"' cannot open a JSON object
    assert not state.row().allows(bad)
    with pytest.raises(ConstraintError, match="not allowed"):
        state.accept(bad)
    assert state.length == 0
    with pytest.raises(ConstraintError, match="not allowed"):  # several: all or none
        state.extend([ids[0], ids[0]])
    assert state.length == 0
    assert len(state.extend(ids[:3])) == 3 and state.length == 3
    with pytest.raises(ConstraintError, match="schema"):
        json_schema_grammar({"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    with pytest.raises(ConstraintError, match="grammar"):
        lark_grammar("start: undefined_rule")


# -- generations on tiny models through a real gRPC verifier -------------------------------------


def _generate(cloud, edge, policy, n, *, mode="hybrid", constraint=None, sampling=None, prompt="Give JSON."):
    from handoff.edge.cloud_harness import generate_with_server

    return generate_with_server(
        cloud, edge, policy, n, mode=mode, prompt=prompt, constraint=constraint, sampling=sampling
    )


def _text(result, edge_path) -> str:
    from handoff.shared.llama_cpp_model import LlamaCppModel

    with LlamaCppModel(edge_path, n_ctx=64, n_threads=1) as m:
        stops = m.stop_token_ids()
        return m.detokenize([t for t in result.tokens if t not in stops]).decode()


@pytest.mark.parametrize("kind", ["exact", "rollback"])
def test_greedy_under_a_schema_matches_cloud_only_and_validates(tiny_gguf_a, tiny_gguf_b, kind) -> None:
    from handoff.edge.policy import PolicyConfig

    policy = PolicyConfig(kind=kind, draft_tokens=3, threshold=0.5, check_interval=4)
    constraint = Constraint.build(
        grammar=json_schema_grammar(SCHEMA), frequency_penalty=0.4, logit_bias={5: 2.0}
    )
    cloud = _generate(tiny_gguf_a, tiny_gguf_b, policy, 80, mode="cloud", constraint=constraint)
    hybrid = _generate(tiny_gguf_a, tiny_gguf_b, policy, 80, constraint=constraint)
    edge = _generate(tiny_gguf_a, tiny_gguf_b, policy, 80, mode="edge", constraint=constraint)
    for r in (cloud, hybrid, edge):
        assert r.stop_reason == "stop_token"
        jsonschema.validate(json.loads(_text(r, tiny_gguf_b)), SCHEMA)
    if kind == "exact":
        assert hybrid.tokens == cloud.tokens
        assert hybrid.counts()["corrected"] + hybrid.counts()["cloud"] > 0  # P really decided some
    else:
        assert hybrid.check_points > 0 and any(r.kl is not None for r in hybrid.records)
        assert all(np.isfinite(r.kl) for r in hybrid.records if r.kl is not None)
    # Without the constraint the same models write no JSON at all.
    free = _generate(tiny_gguf_a, tiny_gguf_b, policy, 30, mode="cloud")
    assert free.tokens[:5] != cloud.tokens[:5]


def test_logit_bias_and_penalties_act_on_both_sides(tiny_gguf_a, tiny_gguf_b) -> None:
    from handoff.edge.policy import PolicyConfig

    policy = PolicyConfig(kind="exact", draft_tokens=3)
    favourite = 65  # "b" in the byte-level vocabulary
    forced = Constraint.build(logit_bias={favourite: 100.0})
    for mode in ("cloud", "edge", "hybrid"):
        assert set(_generate(tiny_gguf_a, tiny_gguf_b, policy, 8, mode=mode, constraint=forced).tokens) == {
            favourite
        }
    # A strong frequency penalty against the bias: the token appears, then is priced out.
    penalised = Constraint.build(logit_bias={favourite: 100.0}, frequency_penalty=2.0)
    cloud = _generate(tiny_gguf_a, tiny_gguf_b, policy, 60, mode="cloud", constraint=penalised)
    hybrid = _generate(tiny_gguf_a, tiny_gguf_b, policy, 60, constraint=penalised)
    assert hybrid.tokens == cloud.tokens
    assert 1 < cloud.tokens.count(favourite) < 60


def test_the_cloud_refuses_tokens_its_grammar_forbids(tiny_gguf_a) -> None:
    from handoff.edge.cloud_harness import (
        edge_tokens,
        llama_backend_factory,
        run,
        running_server,
        vocabulary_of,
    )
    from handoff.edge.runner import EdgeRunner
    from handoff.shared.errors import VerifierError
    from handoff.shared.wire import pb

    with EdgeRunner(tiny_gguf_a, k=4, n_ctx=256, n_threads=1) as runner:
        prompt = runner.model.tokenize("Give JSON:")
        not_json = runner.model.tokenize("hello")
        stops = sorted(runner.stop_token_ids)
    constraint = constraint_to_proto(Constraint(grammar=json_schema_grammar(SCHEMA)), len(prompt))

    async def go():
        async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
            session = await client.open_session(
                prompt, vocabulary_of(tiny_gguf_a), top_k=4, constraint=constraint,
                sampling=pb.SamplingParams(stop_token_ids=stops),
            )  # fmt: skip
            with pytest.raises(VerifierError) as e:
                await session.append(edge_tokens(len(prompt), not_json))
            return e.value

    error = run(go())
    assert error.code == "INVALID_ARGUMENT" and "not allowed by the grammar" in str(error)


@pytest.mark.slow
def test_exact_policy_samples_ps_constrained_distribution(tiny_gguf_a, tiny_gguf_b, homogeneity_p) -> None:
    """Seeded sampling under a grammar: the exact policy's first tokens follow P's own (chi-square)."""
    from handoff.edge.cloud_harness import llama_backend_factory, run, running_server, vocabulary_of
    from handoff.edge.controller import HybridGenerator
    from handoff.edge.policy import PolicyConfig
    from handoff.edge.runner import EdgeRunner

    n = 300
    constraint = Constraint.build(grammar=lark_grammar('start: ("a" | "b" | "c" | "d" | "e")+ "."'),
                                  presence_penalty=1.0)  # fmt: skip

    async def go():
        runner = EdgeRunner(tiny_gguf_b, k=8, n_ctx=256, n_threads=1)
        prompt = runner.model.tokenize("Letters:")
        out = {"exact": [], "cloud": []}
        try:
            async with running_server(llama_backend_factory(tiny_gguf_a)) as (_, client):
                for mode, base in (("exact", 0), ("cloud", 50_000)):
                    gen = HybridGenerator(runner, client, vocabulary_of(tiny_gguf_b),
                                          PolicyConfig(kind="exact", draft_tokens=2, top_k=8),
                                          mode="hybrid" if mode == "exact" else "cloud")  # fmt: skip
                    for seed in range(base, base + n):
                        r = await gen.generate(
                            prompt,
                            2,
                            sampling=SamplingSettings(temperature=1.0, seed=seed),
                            constraint=constraint,
                        )
                        out[mode].append(tuple(r.tokens))
        finally:
            runner.close()
        return out

    out = run(go())
    assert len(set(out["cloud"])) > 3  # a real distribution, not one forced sequence
    assert homogeneity_p(out["exact"], out["cloud"]) > 0.001


def test_grammar_state_after_random_rollbacks_equals_a_fresh_replay(tiny_gguf_a) -> None:
    """Accept allowed tokens (stop tokens too), roll back at random: every mask equals a fresh replay's."""
    from handoff.edge.runner import EdgeRunner
    from handoff.shared.constraints import grammar_tokenizer

    with EdgeRunner(tiny_gguf_a, k=4, n_ctx=256, n_threads=1) as runner:
        tokenizer = grammar_tokenizer(tiny_gguf_a, runner.stop_token_ids)
    constraint = Constraint(grammar=json_schema_grammar(SCHEMA), presence_penalty=0.5)
    rng = np.random.default_rng(7)
    stops = 0
    for _ in range(20):
        state = ConstraintState(constraint, tokenizer)
        for _ in range(40):
            allowed = np.flatnonzero(state.row().allowed)
            state.accept(int(rng.choice(allowed)))
            if state.tokens[-1] in tokenizer.eos_tokens or rng.random() < 0.05:
                stops += state.tokens[-1] in tokenizer.eos_tokens
                state.truncate(int(rng.integers(0, state.length)))  # over a stop token, often
                fresh = ConstraintState(constraint, tokenizer)
                fresh.extend(state.tokens)
                live, replay = state.row(), fresh.row()
                np.testing.assert_array_equal(live.allowed, replay.allowed)
                np.testing.assert_array_equal(live.bias_ids, replay.bias_ids)
    assert stops >= 5
