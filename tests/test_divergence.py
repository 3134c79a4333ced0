"""Tests of shared.divergence: worked examples, properties against brute force, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from handoff.shared.divergence import (
    AGGREGATIONS,
    aggregate,
    entropy,
    first_over,
    kl_divergence,
    log_softmax,
    log_softmax_and_entropy,
    top_k,
    topk_kl,
)
from handoff.shared.errors import HandoffError, ShapeError

LN2 = math.log(2.0)
PROPS = settings(max_examples=200, deadline=None)


def lp(*probs: float) -> np.ndarray:
    """Log-probabilities of the given probabilities (0 -> -inf)."""
    with np.errstate(divide="ignore"):
        return np.log(np.array(probs, dtype=np.float64))


# --------------------------------------------------------------------------------------------------
# Worked examples
# --------------------------------------------------------------------------------------------------


def test_aggregations_constant() -> None:
    assert AGGREGATIONS == ("max", "mean")


def test_log_softmax_two_logits() -> None:
    # exp(0) = 1, exp(ln 3) = 3, total 4 -> probabilities 1/4, 3/4.
    out = log_softmax([0.0, math.log(3.0)])
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [math.log(0.25), math.log(0.75)], rtol=0, atol=1e-15)


def test_log_softmax_is_stable_and_shift_invariant() -> None:
    # exp(1000) overflows float64; a max-shifted softmax gives [ln .5, ln .5] regardless of shift.
    out = log_softmax(np.array([[1000.0, 1000.0], [-1000.0, -1000.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[-LN2, -LN2], [-LN2, -LN2]], rtol=0, atol=1e-15)


def test_log_softmax_axis() -> None:
    # Columns [0, ln 3] normalise to [ln .25, ln .75] when axis=0.
    x = np.array([[0.0, 0.0], [math.log(3.0), math.log(3.0)]])
    out = log_softmax(x, axis=0)
    np.testing.assert_allclose(out[:, 0], [math.log(0.25), math.log(0.75)], atol=1e-15)
    np.testing.assert_allclose(out[:, 1], [math.log(0.25), math.log(0.75)], atol=1e-15)


def test_kl_worked_example() -> None:
    # P = [.5, .25, .25], Q = [.25, .5, .25]:
    # .5 ln(.5/.25) + .25 ln(.25/.5) + .25 ln 1 = .5 ln 2 - .25 ln 2 = .25 ln 2 ~ 0.1732868.
    out = kl_divergence(lp(0.5, 0.25, 0.25), lp(0.25, 0.5, 0.25))
    assert out.shape == ()
    assert out == pytest.approx(0.25 * LN2, abs=1e-15)


def test_kl_batched_and_zero_probabilities() -> None:
    p = np.stack([lp(0.5, 0.5, 0.0), lp(0.5, 0.5, 0.0), lp(1.0, 0.0, 0.0)])  # [3, 3]
    q = np.stack([lp(0.25, 0.25, 0.5), lp(0.5, 0.0, 0.5), lp(1.0, 0.0, 0.0)])  # [3, 3]
    out = kl_divergence(p, q)
    assert out.shape == (3,)
    # Row 0: p3 = 0 contributes 0; .5 ln 2 + .5 ln 2 = ln 2.
    assert out[0] == pytest.approx(LN2, abs=1e-15)
    # Row 1: q2 = 0 where p2 = .5 -> +inf.
    assert out[1] == math.inf
    # Row 2: identical one-hot distributions, -inf - -inf must not become NaN -> 0.
    assert out[2] == 0.0


def test_kl_of_identical_is_exactly_zero_not_negative() -> None:
    x = log_softmax(np.linspace(-3, 3, 7))
    assert kl_divergence(x, x) == 0.0
    assert not np.signbit(kl_divergence(x, x))


def test_entropy_worked_examples() -> None:
    # Uniform over 4: -4 * .25 ln .25 = ln 4.
    assert entropy(lp(0.25, 0.25, 0.25, 0.25)) == pytest.approx(math.log(4.0), abs=1e-15)
    # [.5, .5, 0]: the zero contributes 0 -> ln 2. One-hot -> 0.
    out = entropy(np.stack([lp(0.5, 0.5, 0.0), lp(0.0, 1.0, 0.0)]))
    np.testing.assert_allclose(out, [LN2, 0.0], atol=1e-15)


def test_top_k_orders_by_value_then_id() -> None:
    x = np.array([0.1, 0.5, 0.3, 0.5, 0.3, -np.inf])
    ids, vals = top_k(x, 4)
    # 0.5 at ids 1 and 3 -> lower id first; then 0.3 at ids 2 and 4.
    assert ids.dtype == np.int32
    assert ids.tolist() == [1, 3, 2, 4]
    assert vals.tolist() == [0.5, 0.5, 0.3, 0.3]


def test_top_k_tie_at_the_boundary_keeps_lowest_ids() -> None:
    # Seven equal values, k = 3: the kept ids must be 0, 1, 2 whatever argpartition chose.
    x = np.zeros((2, 7))
    x[1, 6] = 1.0  # second row: id 6 wins, then ties 0, 1
    ids, vals = top_k(x, 3)
    assert ids.tolist() == [[0, 1, 2], [6, 0, 1]]
    assert vals.tolist() == [[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]


def test_top_k_large_vocab_float32_batch() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 151936)).astype(np.float32)  # [2, 3, V]
    ids, vals = top_k(x, 20)
    assert ids.shape == vals.shape == (2, 3, 20)
    ref = np.argsort(-x, axis=-1, kind="stable")[..., :20]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_array_equal(vals, np.take_along_axis(x, ref, axis=-1))


def test_top_k_minus_inf_entries() -> None:
    ids, vals = top_k(lp(0.0, 0.5, 0.0, 0.5), 3)
    assert ids.tolist() == [1, 3, 0]
    assert vals[2] == -math.inf


def test_topk_kl_worked_example_with_rest_bucket() -> None:
    # Known views of one position:
    #   P top-2: id 0 -> 1/2, id 1 -> 1/4.   Q top-2: id 0 -> 1/4, id 2 -> 1/2.
    #   P at Q's ids: id 0 -> 1/2, id 2 -> 1/8.
    p_ids, p_lp = [[0, 1]], [lp(0.5, 0.25)]
    q_ids, q_lp = [[0, 2]], [lp(0.25, 0.5)]
    p_at_q = [lp(0.5, 0.125)]
    # Without extra views S = {0}: rest_p = 1 - 1/2 = 1/2, rest_q = 1 - 1/4 = 3/4.
    # KL = 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3) ~ 0.1438410.
    # (rest_margin=0 gives the plain formula; the default 1e-8 margin is tested further down.)
    out = topk_kl(p_ids, p_lp, q_ids, q_lp, rest_margin=0)
    assert out.shape == (1,)
    assert out[0] == pytest.approx(0.5 * math.log(4.0 / 3.0), abs=1e-15)
    # With P at Q's ids S = {0, 2}: rest_p = 1 - 1/2 - 1/8 = 3/8, rest_q = 1 - 1/4 - 1/2 = 1/4.
    # KL = 1/2 ln(2) + 1/8 ln(1/8 / 1/2) + 3/8 ln(3/8 / 1/4)
    #    = .5 ln 2 - .25 ln 2 + .375 ln 1.5 = .25 ln 2 + .375 ln 1.5 ~ 0.1732868 + 0.1520494 = 0.3253362.
    out = topk_kl(p_ids, p_lp, q_ids, q_lp, p_logprobs_at_q_ids=p_at_q, rest_margin=0)
    assert out[0] == pytest.approx(0.25 * LN2 + 0.375 * math.log(1.5), abs=1e-15)
    assert out[0] == pytest.approx(0.3253362, abs=1e-7)
    # Adding Q at P's ids (id 0 -> 1/4 duplicates Q's top-k; id 1 -> 1/8) makes S = {0, 1, 2}:
    # rest_p = 1 - 7/8 = 1/8, rest_q = 1 - 7/8 = 1/8.
    # KL = .5 ln 2 + .25 ln(.25/.125) + .125 ln(.125/.5) + .125 ln 1 = .5 ln2 + .25 ln2 - .25 ln2 = .5 ln 2.
    out = topk_kl(
        p_ids,
        p_lp,
        q_ids,
        q_lp,
        p_logprobs_at_q_ids=p_at_q,
        q_logprobs_at_p_ids=[lp(0.25, 0.125)],
        rest_margin=0,
    )
    assert out[0] == pytest.approx(0.5 * LN2, abs=1e-15)


def test_topk_kl_inconsistent_duplicate_uses_top_k_value() -> None:
    # p_logprobs_at_q_ids claims p(0) = 0.3 but P's own top-k says 1/2: the top-k value wins, so the
    # result is the .25 ln 2 + .375 ln 1.5 of the worked example above, and nothing is raised.
    out = topk_kl(
        [[0, 1]],
        [lp(0.5, 0.25)],
        [[0, 2]],
        [lp(0.25, 0.5)],
        p_logprobs_at_q_ids=[lp(0.3, 0.125)],
        rest_margin=0,
    )
    assert out[0] == pytest.approx(0.25 * LN2 + 0.375 * math.log(1.5), abs=1e-15)
    # Same on Q's side: q_logprobs_at_p_ids claims q(0) = 0.9, Q's top-k says 1/4 -> .5 ln 2 as above.
    out = topk_kl(
        [[0, 1]],
        [lp(0.5, 0.25)],
        [[0, 2]],
        [lp(0.25, 0.5)],
        p_logprobs_at_q_ids=[lp(0.5, 0.125)],
        q_logprobs_at_p_ids=[lp(0.9, 0.125)],
        rest_margin=0,
    )
    assert out[0] == pytest.approx(0.5 * LN2, abs=1e-15)


def test_topk_kl_rest_floor_and_infinities() -> None:
    # Q puts all its mass on id 0 (rest_q = 0), P only half (rest_p = 1/2).
    # Default: rest_q is used as max(0 + 1e-8 margin, 1e-12 floor) = 1e-8.
    # KL = .5 ln(.5/1) + .5 (ln .5 - ln 1e-8) = -ln 2 + 4 ln 10 ~ 8.5172.
    out = topk_kl([[0]], [lp(0.5)], [[0]], [lp(1.0)])
    assert out[0] == pytest.approx(-LN2 + 4 * math.log(10.0), abs=1e-12)
    # Without the margin the floor binds: -ln 2 + .5 ln(1/1e-12) = -ln 2 + 6 ln 10 ~ 13.1223.
    out = topk_kl([[0]], [lp(0.5)], [[0]], [lp(1.0)], rest_margin=0.0)
    assert out[0] == pytest.approx(-LN2 + 6 * math.log(10.0), abs=1e-12)
    # A floor above the margin binds: -ln 2 + .5 ln(1/1e-6) = -ln 2 + 3 ln 10.
    out = topk_kl([[0]], [lp(0.5)], [[0]], [lp(1.0)], rest_floor=1e-6)
    assert out[0] == pytest.approx(-LN2 + 3 * math.log(10.0), abs=1e-12)
    # rest_q = 1/4 is far above both: .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3) as in the example
    # above, up to the margin: .5 ln(.25 / (.25 + 1e-8)) ~ -2e-8.
    out = topk_kl([[0]], [lp(0.5)], [[0]], [lp(0.75)])
    assert out[0] == pytest.approx(0.5 * math.log(4.0 / 3.0), abs=3e-8)
    assert topk_kl([[0]], [lp(0.5)], [[0]], [lp(0.75)], rest_margin=0)[0] == pytest.approx(
        0.5 * math.log(4.0 / 3.0), abs=1e-15
    )
    # A known q = 0 where p > 0 is +inf; p = 0 where q = 0 adds nothing; disjoint views with no
    # extra information have S empty: both rests are 1 and the estimate is 0.
    out = topk_kl(
        [[0, 1], [3, 4], [0, 1]],
        [lp(0.5, 0.5), lp(1.0, 0.0), lp(0.5, 0.5)],
        [[1, 0], [4, 3], [2, 3]],
        [lp(0.0, 1.0), lp(0.0, 1.0), lp(0.5, 0.5)],
    )
    assert out.tolist() == [math.inf, 0.0, 0.0]


def test_topk_kl_no_rows_and_any_int_dtype() -> None:
    out = topk_kl(np.zeros((0, 3), np.int32), np.zeros((0, 3)), np.zeros((0, 2), np.uint32), np.zeros((0, 2)))
    assert out.shape == (0,)
    out = topk_kl(
        np.array([[0, 1]], np.uint16), [lp(0.5, 0.25)], np.array([[0, 2]], np.int32), [lp(0.25, 0.5)]
    )
    assert out[0] == pytest.approx(0.5 * math.log(4.0 / 3.0), abs=3e-8)


def test_aggregate_window() -> None:
    # max of [.1, .4, .2] is .4; mean is .7 / 3.
    assert aggregate([0.1, 0.4, 0.2], "max") == 0.4
    assert aggregate(np.array([0.1, 0.4, 0.2]), "mean") == pytest.approx(0.7 / 3, abs=1e-15)
    assert isinstance(aggregate([1.0], "mean"), float)
    # An infinite KL in the window dominates both.
    assert aggregate([0.1, math.inf], "max") == math.inf
    assert aggregate([0.1, math.inf], "mean") == math.inf


def test_first_over() -> None:
    assert first_over([0.1, 0.5, 0.7, 0.9], 0.6) == 2
    assert first_over([0.1, 0.5, 0.7], 0.5) == 2  # equal to the threshold does not count
    assert first_over([0.5, 0.5], 0.5) is None
    assert first_over([0.1, 0.2], 1.0) is None
    assert first_over([], 1.0) is None
    assert first_over([math.inf], 1e9) == 0
    assert isinstance(first_over(np.array([2.0]), 1), int)


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------

# Logits with some exact ties (from the small integer choices) so that tie-breaking is exercised.
_logit = st.one_of(
    st.floats(-20.0, 20.0, allow_nan=False, allow_infinity=False),
    st.sampled_from([-1.0, 0.0, 1.0]),
)


@st.composite
def distributions(draw: st.DrawFn, n_max: int = 3, masked: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Two [n, V] log-probability arrays P and Q, V in 2..60, Q sometimes equal or close to P.

    With masked, some entries are set to probability 0 (logprob -inf) and the rest renormalised.
    """
    n = draw(st.integers(1, n_max))
    vocab = draw(st.integers(2, 60))
    p_logits = draw(hnp.arrays(np.float64, (n, vocab), elements=_logit))
    how = draw(st.sampled_from(["same", "shifted", "one_changed", "independent"]))
    if how == "same":
        q_logits = p_logits.copy()
    elif how == "shifted":  # the same distribution, different logits
        q_logits = p_logits + draw(st.floats(-5.0, 5.0))
    elif how == "one_changed":
        q_logits = p_logits.copy()
        q_logits[:, draw(st.integers(0, vocab - 1))] += draw(st.floats(-3.0, 3.0))
    else:
        q_logits = draw(hnp.arrays(np.float64, (n, vocab), elements=_logit))
    p, q = log_softmax(p_logits), log_softmax(q_logits)
    if masked and draw(st.booleans()):
        # Zero probabilities: P's mask, and for Q either the same one (finite KL with -inf terms)
        # or its own (q = 0 < p happens, KL = +inf). Column 0 is never masked so rows stay non-empty.
        p_mask = draw(hnp.arrays(np.bool_, (n, vocab)))
        q_mask = p_mask.copy() if draw(st.booleans()) else draw(hnp.arrays(np.bool_, (n, vocab)))
        for x, mask in ((p, p_mask), (q, q_mask)):
            mask[:, 0] = False
            x[mask] = -np.inf
            x -= np.log(np.sum(np.exp(x), axis=1, keepdims=True))  # renormalise the rest
    return p, q


def kl_reference(p: np.ndarray, q: np.ndarray) -> float:
    """KL(P || Q) of one row, with a plain Python loop and math.log."""
    total = 0.0
    for a, b in zip(p.tolist(), q.tolist(), strict=True):
        pa = math.exp(a)
        if pa == 0.0:
            continue
        if b == -math.inf:
            return math.inf
        total += pa * (math.log(pa) - b)
    return total


def topk_kl_reference(
    p_ids: list[int],
    p_lp: list[float],
    q_ids: list[int],
    q_lp: list[float],
    p_at_q: list[float] | None,
    q_at_p: list[float] | None,
    rest_floor: float = 1e-12,
    rest_margin: float = 1e-8,
) -> float:
    """Brute-force coarse-grained KL of one row with sets and dicts."""
    p_known = dict(zip(p_ids, p_lp, strict=True))
    if p_at_q is not None:
        for i, v in zip(q_ids, p_at_q, strict=True):
            p_known.setdefault(i, v)  # P's own top-k value wins
    q_known = dict(zip(q_ids, q_lp, strict=True))
    if q_at_p is not None:
        for i, v in zip(p_ids, q_at_p, strict=True):
            q_known.setdefault(i, v)
    both = set(p_known) & set(q_known)
    total = 0.0
    for i in both:
        pi, qi = math.exp(p_known[i]), math.exp(q_known[i])
        if pi == 0.0:
            continue
        if qi == 0.0:
            return math.inf
        total += pi * (math.log(pi) - math.log(qi))
    rest_p = max(0.0, 1.0 - math.fsum(math.exp(p_known[i]) for i in both))
    rest_q = max(0.0, 1.0 - math.fsum(math.exp(q_known[i]) for i in both))
    if rest_p > 0.0:
        total += rest_p * (math.log(rest_p) - math.log(max(rest_q + rest_margin, rest_floor)))
    return max(total, 0.0)


def close(a: float, b: float, tol: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= tol


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 0.5 * np.sum(np.abs(np.exp(p) - np.exp(q)), axis=-1)


@PROPS
@given(distributions())
def test_prop_kl_nonnegative_and_matches_loop(pq: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pq
    out = kl_divergence(p, q)
    assert out.shape == (p.shape[0],)
    assert (out >= 0).all()
    for r in range(p.shape[0]):
        assert close(float(out[r]), kl_reference(p[r], q[r]), 1e-6)


@PROPS
@given(distributions())
def test_prop_kl_zero_iff_equal(pq: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pq
    assert np.all(kl_divergence(p, p) == 0.0)
    out = kl_divergence(p, q)
    tv = total_variation(p, q)
    for r in range(p.shape[0]):
        # Pinsker: KL >= 2 TV^2, so a meaningful difference gives a clearly positive KL ...
        if tv[r] > 1e-4:
            assert out[r] > 0.0
            assert out[r] >= 2 * tv[r] ** 2 * (1 - 1e-6)
        # ... and a KL that reads as zero means the distributions are equal up to rounding.
        if out[r] < 1e-12:
            assert tv[r] < 1e-5


@PROPS
@given(distributions(masked=False))
def test_prop_entropy_bounds(pq: tuple[np.ndarray, np.ndarray]) -> None:
    p, _ = pq
    h = entropy(p)
    assert (h >= 0).all()
    assert (h <= math.log(p.shape[1]) + 1e-12).all()
    # H(P) = ln V - KL(P || uniform).
    uniform = np.full_like(p, -math.log(p.shape[1]))
    np.testing.assert_allclose(h, math.log(p.shape[1]) - kl_divergence(p, uniform), atol=1e-9)


@PROPS
@given(distributions(), st.data())
def test_prop_top_k_matches_sorted(pq: tuple[np.ndarray, np.ndarray], data: st.DataObject) -> None:
    p, _ = pq
    k = data.draw(st.integers(1, p.shape[1]))
    ids, vals = top_k(p, k)
    assert ids.shape == vals.shape == (p.shape[0], k)
    for r in range(p.shape[0]):
        ref = sorted(range(p.shape[1]), key=lambda i: (-p[r, i], i))[:k]
        assert ids[r].tolist() == ref
        assert vals[r].tolist() == [p[r, i] for i in ref]


VIEWS = [(False, False), (True, False), (False, True), (True, True)]


def _views(p: np.ndarray, q: np.ndarray, kp: int, kq: int) -> dict[str, np.ndarray]:
    p_ids, p_lp = top_k(p, kp)
    q_ids, q_lp = top_k(q, kq)
    return {
        "p_ids": p_ids,
        "p_logprobs": p_lp,
        "q_ids": q_ids,
        "q_logprobs": q_lp,
        "p_logprobs_at_q_ids": np.take_along_axis(p, q_ids.astype(np.int64), axis=1),
        "q_logprobs_at_p_ids": np.take_along_axis(q, p_ids.astype(np.int64), axis=1),
    }


@PROPS
@given(distributions(), st.data())
def test_prop_topk_kl_bounds_and_brute_force(pq: tuple[np.ndarray, np.ndarray], data: st.DataObject) -> None:
    p, q = pq
    vocab = p.shape[1]
    kp = data.draw(st.integers(1, vocab), label="kp")
    kq = data.draw(st.one_of(st.just(kp), st.integers(1, vocab)), label="kq")
    v = _views(p, q, kp, kq)
    full = kl_divergence(p, q)
    for with_p_at_q, with_q_at_p in VIEWS:
        p_at_q = v["p_logprobs_at_q_ids"] if with_p_at_q else None
        q_at_p = v["q_logprobs_at_p_ids"] if with_q_at_p else None
        out = topk_kl(v["p_ids"], v["p_logprobs"], v["q_ids"], v["q_logprobs"], p_at_q, q_at_p)
        assert out.shape == (p.shape[0],)
        assert (out >= 0).all()
        assert (out <= full + 1e-9).all(), (with_p_at_q, with_q_at_p, out, full)
        for r in range(p.shape[0]):
            ref = topk_kl_reference(
                v["p_ids"][r].tolist(),
                v["p_logprobs"][r].tolist(),
                v["q_ids"][r].tolist(),
                v["q_logprobs"][r].tolist(),
                None if p_at_q is None else p_at_q[r].tolist(),
                None if q_at_p is None else q_at_p[r].tolist(),
            )
            assert close(float(out[r]), ref, 1e-6), (with_p_at_q, with_q_at_p, r, out[r], ref)


@PROPS
@given(distributions())
def test_prop_topk_kl_full_vocab_is_exact(pq: tuple[np.ndarray, np.ndarray]) -> None:
    p, q = pq
    vocab = p.shape[1]
    v = _views(p, q, vocab, vocab)
    out = topk_kl(**v)
    full = kl_divergence(p, q)
    for r in range(p.shape[0]):
        assert close(float(out[r]), float(full[r]), 1e-9)


@PROPS
@given(distributions(), st.data())
def test_prop_topk_kl_identical_is_zero(pq: tuple[np.ndarray, np.ndarray], data: st.DataObject) -> None:
    p, _ = pq
    vocab = p.shape[1]
    kp = data.draw(st.integers(1, vocab), label="kp")
    kq = data.draw(st.integers(1, vocab), label="kq")
    v = _views(p, p, kp, kq)
    for with_p_at_q, with_q_at_p in VIEWS:
        out = topk_kl(
            v["p_ids"],
            v["p_logprobs"],
            v["q_ids"],
            v["q_logprobs"],
            v["p_logprobs_at_q_ids"] if with_p_at_q else None,
            v["q_logprobs_at_p_ids"] if with_q_at_p else None,
        )
        assert (np.abs(out) < 1e-12).all()


@PROPS
@given(distributions(), st.data())
def test_prop_topk_kl_grows_with_more_views(pq: tuple[np.ndarray, np.ndarray], data: st.DataObject) -> None:
    # A finer partition never gives a smaller coarse KL (log-sum inequality, margin included). Both
    # sides carry the rest term's rounding error, documented as ~1e-7 nats, hence the 1e-6.
    p, q = pq
    vocab = p.shape[1]
    k = data.draw(st.integers(1, vocab))
    v = _views(p, q, k, k)
    base = topk_kl(v["p_ids"], v["p_logprobs"], v["q_ids"], v["q_logprobs"])
    one = topk_kl(v["p_ids"], v["p_logprobs"], v["q_ids"], v["q_logprobs"], v["p_logprobs_at_q_ids"])
    both = topk_kl(**v)
    assert (one >= base - 1e-6).all()
    assert (both >= one - 1e-6).all()


@PROPS
@given(hnp.arrays(np.float64, st.integers(0, 30), elements=st.floats(-10, 10)), st.floats(-10, 10))
def test_prop_first_over_and_aggregate(values: np.ndarray, threshold: float) -> None:
    i = first_over(values, threshold)
    over = [j for j, x in enumerate(values.tolist()) if x > threshold]
    assert i == (over[0] if over else None)
    if values.size:
        assert aggregate(values, "max") == max(values.tolist())
        assert aggregate(values, "mean") == pytest.approx(math.fsum(values.tolist()) / values.size, abs=1e-12)
        # The mean never exceeds the max, so a "max" trigger fires whenever a "mean" one does.
        assert aggregate(values, "mean") <= aggregate(values, "max") + 1e-12


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def test_shape_error_is_a_value_error_and_handoff_error() -> None:
    with pytest.raises(ValueError):
        kl_divergence([0.0], [0.0, 0.0])
    with pytest.raises(HandoffError):
        kl_divergence([0.0], [0.0, 0.0])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        # log_softmax
        (lambda: log_softmax(1.0), r"logits: expected shape \[\.\.\., V\], got \(\)"),
        (lambda: log_softmax(np.zeros((2, 0))), r"logits: .*got \(2, 0\)"),
        (lambda: log_softmax([0.0, np.inf]), r"logits: expected finite values"),
        (lambda: log_softmax([-np.inf, -np.inf]), r"logits: expected finite values"),
        (lambda: log_softmax([0.0, np.nan]), r"logits: expected finite values"),
        (lambda: log_softmax([0.0, 1.0], axis=1), r"axis: expected an int"),
        (lambda: log_softmax(["a", "b"]), r"logits: .*dtype"),
        # top_k
        (lambda: top_k(np.float64(1.0), 1), r"logprobs: expected shape \[\.\.\., V\].*got \(\)"),
        (lambda: top_k([0.0, np.nan], 1), r"logprobs: expected values without NaN"),
        (lambda: top_k([0.0, 1.0], 0), r"k: expected 1 <= k <= V = 2, got 0"),
        (lambda: top_k([0.0, 1.0], 3), r"k: expected 1 <= k <= V = 2, got 3"),
        (lambda: top_k([0.0, 1.0], 1.5), r"k: expected an int"),
        # kl_divergence
        (lambda: kl_divergence(0.0, [0.0]), r"p_logprobs: expected shape \[\.\.\., V\], got \(\)"),
        (lambda: kl_divergence([0.0], 0.0), r"q_logprobs: expected shape \[\.\.\., V\], got \(\)"),
        (
            lambda: kl_divergence(np.zeros((3, 5)), np.zeros((3, 4))),
            r"q_logprobs: expected shape \(3, 5\) \(same as p_logprobs\), got \(3, 4\)",
        ),
        (lambda: kl_divergence([np.nan, 0.0], [0.0, 0.0]), r"p_logprobs: .*NaN"),
        (lambda: kl_divergence([0.0, 0.0], [0.0, np.nan]), r"q_logprobs: .*NaN"),
        (lambda: kl_divergence([np.inf, 0.0], [0.0, 0.0]), r"p_logprobs: .*\+inf"),
        # entropy
        (lambda: entropy(0.0), r"logprobs: expected shape \[\.\.\., V\], got \(\)"),
        (lambda: entropy([np.nan]), r"logprobs: .*NaN"),
        # aggregate / first_over
        (lambda: aggregate([], "max"), r"values: expected shape \[n\] with n >= 1, got \(0,\)"),
        (lambda: aggregate([1.0], "median"), r"how: expected one of \('max', 'mean'\), got 'median'"),
        (lambda: aggregate([[1.0]], "max"), r"values: expected shape \[n\], got \(1, 1\)"),
        (lambda: aggregate([1.0, np.nan], "mean"), r"values: .*NaN"),
        (lambda: first_over([[1.0]], 0.5), r"values: expected shape \[n\], got \(1, 1\)"),
        (lambda: first_over([1.0, np.nan], 0.5), r"values: .*NaN"),
        (lambda: first_over([1.0], np.nan), r"threshold: expected a real number"),
    ],
)
def test_bad_input_names_the_argument(call, match: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ShapeError, match=match):
        call()


def _good() -> dict[str, np.ndarray]:
    """A valid topk_kl call with n = 2, kp = 3, kq = 2."""
    return {
        "p_ids": np.array([[0, 1, 2], [3, 4, 5]]),
        "p_logprobs": np.log(np.full((2, 3), 0.3)),
        "q_ids": np.array([[0, 7], [3, 9]]),
        "q_logprobs": np.log(np.full((2, 2), 0.4)),
        "p_logprobs_at_q_ids": np.log(np.full((2, 2), 0.3)),
        "q_logprobs_at_p_ids": np.log(np.full((2, 3), 0.1)),
    }


def test_good_topk_kl_call_is_accepted() -> None:
    assert topk_kl(**_good()).shape == (2,)


@pytest.mark.parametrize(
    ("arg", "value", "match"),
    [
        ("p_ids", np.array([0, 1, 2]), r"p_ids: expected shape \[n, kp\], got \(3,\)"),
        ("q_ids", np.array([[[0, 7]], [[3, 9]]]), r"q_ids: expected shape \[n, kq\], got \(2, 1, 2\)"),
        ("q_ids", np.array([[0, 7]]), r"q_ids: expected shape \[2, kq\] \(n from p_ids\), got \(1, 2\)"),
        ("p_ids", np.zeros((2, 0), np.int64), r"p_ids: expected shape \[n, kp\] with k >= 1, got \(2, 0\)"),
        ("p_ids", np.array([[0.0, 1, 2], [3, 4, 5]]), r"p_ids: expected integer token ids.*float64"),
        ("p_ids", np.array([[0, -1, 2], [3, 4, 5]]), r"p_ids: expected non-negative token ids, got -1"),
        (
            "q_ids",
            np.array([[0, 7], [9, 9]]),
            r"q_ids: expected distinct ids in each row, got id 9 twice in row 1",
        ),
        ("p_logprobs", np.zeros(3), r"p_logprobs: expected shape \[n, kp\] = \[2, 3\], got \(3,\)"),
        ("p_logprobs", np.zeros((2, 2)), r"p_logprobs: expected shape \[n, kp\] = \[2, 3\], got \(2, 2\)"),
        ("q_logprobs", np.zeros((2, 3)), r"q_logprobs: expected shape \[n, kq\] = \[2, 2\], got \(2, 3\)"),
        ("q_logprobs", np.array([[0.0, np.nan], [0, 0]]), r"q_logprobs: .*NaN"),
        ("p_logprobs", np.full((2, 3), np.inf), r"p_logprobs: .*\+inf"),
        (
            "p_logprobs_at_q_ids",
            np.zeros((2, 3)),
            r"p_logprobs_at_q_ids: expected shape \[n, kq\] = \[2, 2\], got \(2, 3\)",
        ),
        ("p_logprobs_at_q_ids", np.full((2, 2), np.nan), r"p_logprobs_at_q_ids: .*NaN"),
        (
            "q_logprobs_at_p_ids",
            np.zeros((2, 2)),
            r"q_logprobs_at_p_ids: expected shape \[n, kp\] = \[2, 3\], got \(2, 2\)",
        ),
        ("q_logprobs_at_p_ids", np.full((2, 3), np.nan), r"q_logprobs_at_p_ids: .*NaN"),
        ("rest_floor", -1.0, r"rest_floor: expected a float in \[0, 1\]"),
        ("rest_floor", float("nan"), r"rest_floor: expected a float in \[0, 1\]"),
        ("rest_margin", -1e-9, r"rest_margin: expected a float in \[0, 1\]"),
        ("rest_margin", "x", r"rest_margin: expected a float in \[0, 1\]"),
    ],
)
def test_topk_kl_bad_input_names_the_argument(arg: str, value: object, match: str) -> None:
    kwargs: dict[str, object] = dict(_good())
    kwargs[arg] = value
    with pytest.raises(ShapeError, match=match):
        topk_kl(**kwargs)  # type: ignore[arg-type]


def test_log_softmax_and_entropy_in_one_pass():
    # logits [0, ln 3]: p = [1/4, 3/4], H = -(1/4 ln 1/4 + 3/4 ln 3/4) = ln 4 - (3/4) ln 3
    lp, h = log_softmax_and_entropy(np.array([0.0, math.log(3.0)]))
    np.testing.assert_allclose(lp, [math.log(0.25), math.log(0.75)], atol=1e-15)
    assert h == pytest.approx(math.log(4.0) - 0.75 * math.log(3.0), abs=1e-15)
    rng = np.random.default_rng(3)
    row = rng.normal(size=5000) * 4
    lp, h = log_softmax_and_entropy(row)
    np.testing.assert_array_equal(lp, log_softmax(row))
    assert h == pytest.approx(float(entropy(log_softmax(row))), abs=1e-9)
    with pytest.raises(ShapeError, match="logits"):
        log_softmax_and_entropy(np.array([0.0, np.inf]))
    with pytest.raises(ShapeError, match=r"expected shape \[V\]"):
        log_softmax_and_entropy(np.zeros((2, 3)))


# --------------------------------------------------------------------------------------------------
# logits_view: the edge's per-token view in float32


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_logits_view_matches_the_float64_path(scale):
    from handoff.shared.divergence import log_softmax_and_entropy, logits_view

    rng = np.random.default_rng(int(scale * 10))
    logits = (rng.standard_normal(151_936) * scale).astype(np.float32)
    logits[[5, 9]] = logits.max()  # a tie at the top: the lower id first
    lp, ent = log_softmax_and_entropy(logits)
    ref_ids, ref_vals = top_k(lp, 20)
    at = np.array([0, 9, 151_935, 77])
    ids, vals, ent_v, at_v = logits_view(logits, 20, at)
    np.testing.assert_array_equal(ids, ref_ids)
    assert ids.dtype == np.int32 and ids[0] == 5 and ids[1] == 9
    np.testing.assert_allclose(vals, ref_vals, rtol=0, atol=1e-6)
    np.testing.assert_allclose(at_v, lp[at], rtol=2e-7, atol=1e-6)  # float32 rounding of x - peak
    assert ent_v == pytest.approx(ent, abs=1e-5)


def test_logits_view_falls_back_when_few_entries_are_near_the_peak():
    from handoff.shared.divergence import logits_view

    logits = np.full(1000, -50.0, dtype=np.float32)
    logits[[3, 700]] = [0.0, -1.0]  # only two within 12 nats of the peak, k = 5
    ids, vals, _, _ = logits_view(logits, 5)
    assert ids.tolist() == [3, 700, 0, 1, 2]  # then the lowest ids among the tied rest
    np.testing.assert_allclose(np.exp(vals[:2]).sum() + 998 * np.exp(vals[2]), 1.0, rtol=1e-6)


def test_logits_view_rejects_bad_input():
    from handoff.shared.divergence import logits_view

    with pytest.raises(ShapeError, match="shape"):
        logits_view(np.zeros((2, 3), dtype=np.float32), 1)
    with pytest.raises(ShapeError, match="k"):
        logits_view(np.zeros(3, dtype=np.float32), 4)
    with pytest.raises(ShapeError, match="finite"):
        logits_view(np.array([np.nan, np.inf], dtype=np.float32), 1)
    with pytest.raises(ShapeError, match="at_ids"):
        logits_view(np.zeros(3, dtype=np.float32), 1, [3])
