"""Tests of shared.quality: hand-computed RPI, bootstrap and Wilson intervals, oracle positions, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.shared.errors import HandoffError, ShapeError
from handoff.shared.quality import BootstrapCI, accuracy_ci, bootstrap_rpi, oracle_positions, rpi

PROPS = settings(max_examples=100, deadline=None)


# --------------------------------------------------------------------------------------------------
# RPI
# --------------------------------------------------------------------------------------------------


def test_rpi_hand_computed() -> None:
    small = np.array([1, 0, 0, 0, 0, 1, 0, 0, 0, 0], dtype=bool)  # 2/10
    large = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 1], dtype=bool)  # 7/10
    hybrid = np.array([1, 1, 1, 0, 0, 1, 0, 0, 0, 0], dtype=bool)  # 4/10
    # (0.4 - 0.2) / (0.7 - 0.2) = 0.4
    assert rpi(small, large, hybrid) == pytest.approx(0.4)
    assert rpi(small, large, small) == 0.0
    assert rpi(small, large, large) == 1.0


def test_rpi_accepts_ints_and_lists() -> None:
    assert rpi([0, 0, 1, 0], [1, 1, 1, 0], [1, 0, 1, 1]) == pytest.approx((3 - 1) / (3 - 1))
    assert rpi(np.array([0.0, 1.0]), np.array([1.0, 1.0]), np.array([0.0, 0.0])) == pytest.approx(-1.0)


def test_rpi_can_exceed_one_and_be_negative() -> None:
    small = [0, 0, 0, 0]
    large = [1, 0, 0, 0]
    assert rpi(small, large, [1, 1, 0, 0]) == pytest.approx(2.0)
    assert rpi([1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]) == pytest.approx(-1.0)


def test_rpi_negative_denominator() -> None:
    # Small beats large: denominator (0.25 - 0.75) < 0; a hybrid at 0.5 is halfway, RPI 0.5.
    small = [1, 1, 1, 0]
    large = [1, 0, 0, 0]
    assert rpi(small, large, [1, 1, 0, 0]) == pytest.approx(0.5)
    assert rpi(small, large, large) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("small", "large"),
    [([1, 1, 1], [1, 1, 1]), ([0, 0, 0], [0, 0, 0]), ([1, 0, 0], [0, 0, 1])],
    ids=["both-solve", "both-fail", "same-count"],
)
def test_rpi_none_when_tied(small: list[int], large: list[int]) -> None:
    assert rpi(small, large, [1, 0, 1]) is None


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([1, 0], [1, 0, 1], [1, 0]), "large: expected shape"),
        (([1, 0], [1, 0], [1]), "hybrid: expected shape"),
        (([[1, 0]], [[1, 0]], [[1, 0]]), r"small: expected shape \[n_tasks\]"),
        (([], [], []), "at least one task"),
        (([1, 2], [1, 0], [1, 0]), "0/1"),
        (([1, 0], [0.5, 0], [1, 0]), "0/1"),
        ((["a", "b"], [1, 0], [1, 0]), "dtype"),
    ],
)
def test_rpi_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        rpi(*args)
    with pytest.raises(ShapeError, match=match):
        bootstrap_rpi(*args, n_resamples=10)


def test_shape_error_is_a_handoff_error() -> None:
    with pytest.raises(HandoffError):
        rpi([1], [1, 0], [1])


# --------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------


def _tasks(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n tasks with accuracies about 0.3 (small), 0.8 (large), 0.6 (hybrid), positively correlated."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n)
    return difficulty < 0.3, difficulty < 0.8, difficulty < 0.6


def test_bootstrap_contains_estimate_and_is_deterministic() -> None:
    small, large, hybrid = _tasks(60)
    ci = bootstrap_rpi(small, large, hybrid, n_resamples=1000, seed=7)
    assert isinstance(ci, BootstrapCI)
    assert ci.estimate == rpi(small, large, hybrid)
    assert ci.low is not None and ci.high is not None
    assert ci.low <= ci.estimate <= ci.high
    assert ci.n_resamples == 1000
    assert 0.0 <= ci.undefined_fraction < 0.5
    assert bootstrap_rpi(small, large, hybrid, n_resamples=1000, seed=7) == ci
    assert bootstrap_rpi(small, large, hybrid, n_resamples=1000, seed=8) != ci


def test_bootstrap_narrows_with_more_tasks() -> None:
    few = bootstrap_rpi(*_tasks(40), n_resamples=1000)
    many = bootstrap_rpi(*_tasks(1000), n_resamples=1000)
    assert few.low is not None and few.high is not None and many.low is not None and many.high is not None
    assert many.high - many.low < 0.5 * (few.high - few.low)


def test_bootstrap_of_baselines_is_exact() -> None:
    small, large, _ = _tasks(50)
    zero = bootstrap_rpi(small, large, small, n_resamples=200)
    one = bootstrap_rpi(small, large, large, n_resamples=200)
    assert (zero.estimate, zero.low, zero.high) == (0.0, 0.0, 0.0)
    assert (one.estimate, one.low, one.high) == (1.0, 1.0, 1.0)


def test_bootstrap_tied_estimate_has_no_interval() -> None:
    ci = bootstrap_rpi([1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0], n_resamples=500)
    assert ci.estimate is None and ci.low is None and ci.high is None
    assert 0.0 < ci.undefined_fraction < 1.0


def test_bootstrap_drops_undefined_resamples() -> None:
    # One task of 10 separates the models: a resample misses it, and ties, with probability
    # 0.9^10 ≈ 0.35. Those resamples are dropped; the others all give RPI 1 for hybrid == large.
    small = np.zeros(10, dtype=bool)
    large = np.zeros(10, dtype=bool)
    large[0] = True
    ci = bootstrap_rpi(small, large, large, n_resamples=2000)
    assert 0.30 < ci.undefined_fraction < 0.40
    assert (ci.estimate, ci.low, ci.high) == (1.0, 1.0, 1.0)


def test_bootstrap_all_undefined() -> None:
    # Both models solve the same tasks: every resample ties.
    outcomes = [1, 1, 0, 1]
    ci = bootstrap_rpi(outcomes, outcomes, [1, 1, 1, 1], n_resamples=100)
    assert ci == BootstrapCI(None, None, None, 1.0, 100)


def test_bootstrap_bad_parameters() -> None:
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_rpi([1, 0], [1, 1], [1, 1], n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_rpi([1, 0], [1, 1], [1, 1], confidence=1.0)


# --------------------------------------------------------------------------------------------------
# Wilson interval
# --------------------------------------------------------------------------------------------------


def test_wilson_known_values() -> None:
    # Newcombe (1998), "Two-sided confidence intervals for the single proportion", worked examples, score
    # method without continuity correction: 81/263 -> 0.2553 to 0.3662; 0/20 -> 0 to 0.1611.
    acc, low, high = accuracy_ci(np.array([1] * 81 + [0] * 182))
    assert acc == pytest.approx(81 / 263)
    assert (low, high) == (pytest.approx(0.2553, abs=5e-5), pytest.approx(0.3662, abs=5e-5))
    acc, low, high = accuracy_ci(np.zeros(20, dtype=bool))
    assert (acc, low) == (0.0, 0.0)
    assert high == pytest.approx(0.1611, abs=5e-5)


def test_wilson_hand_computed() -> None:
    # 8/10 at 95%: z = 1.959964; centre (0.8 + z²/20) / (1 + z²/10) = 0.71674,
    # half-width z/(1 + z²/10) * sqrt(0.016 + z²/400) = 0.22658.
    acc, low, high = accuracy_ci([True] * 8 + [False] * 2)
    assert acc == 0.8
    assert low == pytest.approx(0.4902, abs=1e-4)
    assert high == pytest.approx(0.9433, abs=1e-4)


def test_wilson_all_correct_and_levels() -> None:
    acc, low, high = accuracy_ci([1] * 20)
    assert (acc, high) == (1.0, 1.0)
    assert low == pytest.approx(1 - 0.1611, abs=5e-5)
    wide = accuracy_ci([1, 0] * 10, confidence=0.99)
    narrow = accuracy_ci([1, 0] * 10, confidence=0.80)
    assert wide[1] < narrow[1] < 0.5 < narrow[2] < wide[2]


def test_wilson_bad_input() -> None:
    with pytest.raises(ShapeError, match="correct"):
        accuracy_ci(np.zeros((2, 2)))
    with pytest.raises(ShapeError, match="at least one task"):
        accuracy_ci([])
    with pytest.raises(ValueError, match="confidence"):
        accuracy_ci([1, 0], confidence=0.0)


# --------------------------------------------------------------------------------------------------
# Oracle positions
# --------------------------------------------------------------------------------------------------


def test_oracle_positions_hand_made() -> None:
    p_tokens = np.array([15, 220, 17, 284, 19, 198])
    q_top1 = np.array([15, 220, 18, 284, 19, 151643])
    out = oracle_positions(p_tokens, q_top1)
    np.testing.assert_array_equal(out, [2, 5])
    assert out.dtype == np.int64


def test_oracle_positions_edge_cases() -> None:
    assert oracle_positions(np.array([], dtype=np.int64), np.array([], dtype=np.int64)).shape == (0,)
    np.testing.assert_array_equal(oracle_positions([1, 2, 3], [1, 2, 3]), np.array([], dtype=np.int64))
    np.testing.assert_array_equal(oracle_positions(np.array([1, 2], np.uint32), [3, 4]), [0, 1])


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        ([1, 2, 3], [1, 2], "q_top1_ids: expected shape"),
        ([[1, 2]], [[1, 2]], r"token_ids: expected shape \[n\]"),
        ([1.0, 2.0], [1, 2], "token_ids: expected integer"),
        ([1, 2], [1.0, 2.0], "q_top1_ids: expected integer"),
    ],
)
def test_oracle_positions_bad_input(a: list, b: list, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        oracle_positions(a, b)


# --------------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------------


@st.composite
def _paired_outcomes(draw: st.DrawFn) -> tuple[list[bool], list[bool], list[bool]]:
    n = draw(st.integers(min_value=1, max_value=30))
    outcomes = st.lists(st.booleans(), min_size=n, max_size=n)
    return draw(outcomes), draw(outcomes), draw(outcomes)


@PROPS
@given(_paired_outcomes())
def test_rpi_baselines_property(data: tuple[list[bool], list[bool], list[bool]]) -> None:
    small, large, hybrid = data
    value = rpi(small, large, hybrid)
    if sum(small) == sum(large):
        assert value is None
        assert rpi(small, large, large) is None
    else:
        assert value is not None
        assert rpi(small, large, large) == 1.0
        assert rpi(small, large, small) == 0.0
        # RPI is affine in the hybrid's accuracy: exactly the hand formula.
        assert value == pytest.approx((sum(hybrid) - sum(small)) / (sum(large) - sum(small)))
