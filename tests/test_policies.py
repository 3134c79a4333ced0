"""Tests of the policy core's parts on hand-made arrays: the skip gate, the budget controller, scorers and cuts."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.edge.policy import (
    BudgetConfig,
    BudgetController,
    CallableScorer,
    EntropyScorer,
    KLScorer,
    SkipGate,
    TokenScorer,
    WindowView,
    skipped_kl,
    trigger_cut,
    window_divergence,
)
from handoff.shared.errors import ShapeError

PROPS = settings(max_examples=150, deadline=None)
NAN = math.nan
INF = math.inf


# --------------------------------------------------------------------------------------------------
# Skip gate
# --------------------------------------------------------------------------------------------------


def test_gate_off_uploads_everything() -> None:
    out = SkipGate().confident([0.0, 0.1, 5.0], [0.0, -0.01, -3.0])
    assert out.dtype == bool
    assert out.tolist() == [False, False, False]


def test_gate_entropy_is_inclusive_at_the_bound() -> None:
    gate = SkipGate(kind="entropy", entropy_max=0.5)
    ent = np.array([0.0, 0.4999, 0.5, np.nextafter(0.5, 1.0), 3.0])
    out = gate.confident(ent, np.zeros(5))  # top1 ignored by this kind
    assert out.tolist() == [True, True, True, False, False]


def test_gate_entropy_max_zero_skips_only_one_hot_positions() -> None:
    out = SkipGate(kind="entropy", entropy_max=0.0).confident([0.0, 1e-12], [0.0, -1e-12])
    assert out.tolist() == [True, False]


def test_gate_top1_compares_probabilities_inclusively() -> None:
    gate = SkipGate(kind="top1", top1_min=0.9)
    top1 = np.array([0.0, math.log(0.95), math.log(0.9), math.log(0.8999), -INF])
    out = gate.confident(np.full(5, 9.0), top1)  # entropy ignored by this kind
    assert out.tolist() == [True, True, True, False, False]


def test_gate_top1_min_one_skips_only_certain_positions() -> None:
    out = SkipGate(kind="top1", top1_min=1.0).confident([0.0, 0.0], [0.0, -1e-15])
    assert out.tolist() == [True, False]


def test_gate_empty_window() -> None:
    assert SkipGate(kind="entropy").confident([], []).shape == (0,)


@pytest.mark.parametrize(
    ("entropy", "top1", "match"),
    [
        ([0.1, 0.2], [0.0], "top1_logprob: expected 2 positions"),
        ([[0.1]], [0.0], r"entropy: expected shape \[n\]"),
        ([NAN], [0.0], "entropy: expected values without NaN"),
        ([-0.1], [0.0], "entropy: expected finite values >= 0"),
        ([INF], [0.0], "entropy: expected finite values >= 0"),
        ([0.1], [0.1], "top1_logprob: expected log-probabilities <= 0"),
        ([0.1], [NAN], "top1_logprob: expected values without NaN"),
        (["a"], [0.0], "entropy: expected a real-valued array"),
    ],
)
def test_gate_rejects_bad_input(entropy: list, top1: list, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        SkipGate(kind="entropy").confident(entropy, top1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "sometimes"},
        {"entropy_max": -0.1},
        {"entropy_max": NAN},
        {"top1_min": 0.0},
        {"top1_min": 1.5},
        {"top1_min": NAN},
    ],
)
def test_gate_rejects_bad_config(kwargs: dict) -> None:
    with pytest.raises(ShapeError):
        SkipGate(**kwargs)


# --------------------------------------------------------------------------------------------------
# Windows with skipped positions
# --------------------------------------------------------------------------------------------------


def test_window_divergence_all_skipped_or_empty_is_zero() -> None:
    assert window_divergence([NAN, NAN, NAN], "max") == 0.0
    assert window_divergence([NAN], "mean") == 0.0
    assert window_divergence([], "max") == 0.0


def test_window_divergence_aggregates_over_the_uploaded_positions() -> None:
    kls = [NAN, 0.2, NAN, 0.6, 0.1]
    assert window_divergence(kls, "max") == pytest.approx(0.6)
    # Mean over the three that have a KL, not diluted by the two skipped ones.
    assert window_divergence(kls, "mean") == pytest.approx(0.3)
    assert window_divergence([0.3, NAN, INF], "max") == INF
    assert window_divergence([0.3, NAN, INF], "mean") == INF


def test_window_divergence_without_skips_matches_plain_aggregation() -> None:
    kls = np.array([0.05, 0.4, 0.2])
    assert window_divergence(kls, "max") == 0.4
    assert window_divergence(kls, "mean") == pytest.approx(np.mean(kls))


@pytest.mark.parametrize(
    ("kls", "how", "match"),
    [
        ([0.1, -0.2], "max", "kls: expected divergences >= 0"),
        ([[0.1]], "max", r"kls: expected shape \[n\]"),
        ([0.1], "median", "aggregation: expected one of"),
    ],
)
def test_window_divergence_rejects_bad_input(kls: list, how: str, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        window_divergence(kls, how)


def test_skipped_kl_counts_skipped_positions_as_zero() -> None:
    out = skipped_kl([NAN, 0.3, INF, NAN])
    assert out.dtype == np.float64
    assert out.tolist() == [0.0, 0.3, INF, 0.0]
    # For "max" the two views of a skipped position agree (KLs are >= 0).
    kls = [NAN, 0.3, 0.7, NAN]
    assert float(np.max(skipped_kl(kls))) == window_divergence(kls, "max")
    with pytest.raises(ShapeError, match="kls: expected divergences >= 0"):
        skipped_kl([-1.0])


# --------------------------------------------------------------------------------------------------
# Budget controller
# --------------------------------------------------------------------------------------------------

CHECK = 8  # tokens per check point in the synthetic plants


def plant_fraction(tau: float) -> float:
    """Synthetic plant: the cloud fraction at threshold tau, a known decreasing function."""
    return float(np.clip(0.5 * math.exp(-tau / 0.3), 0.0, 1.0))


def tau_star(target: float) -> float:
    """The tau at which plant_fraction gives target."""
    return 0.3 * math.log(0.5 / target)


def simulate(
    ctl: BudgetController, fraction: Callable[[float], float], tokens: int, carry: float = 0.0
) -> tuple[np.ndarray, np.ndarray, float]:
    """Run check points of CHECK tokens; cloud tokens per check point by deterministic error diffusion.

    The rounding carries its remainder from one check point to the next, so the mean cloud fraction
    over many check points is exactly fraction(tau) with integer counts at each.

    Returns:
        ([m] tau after each update, [m] cloud tokens of each update, the rounding carry).
    """
    taus, clouds = [], []
    for _ in range(tokens // CHECK):
        carry += CHECK * fraction(ctl.tau)
        cloud = min(math.floor(carry + 1e-12), CHECK)
        carry -= cloud
        clouds.append(cloud)
        taus.append(ctl.update(CHECK, cloud))
    return np.array(taus), np.array(clouds), carry


def tokens_to_reach(taus: np.ndarray, target_tau: float, rel: float) -> int:
    """Tokens until tau first comes within rel of target_tau."""
    hit = np.flatnonzero(np.abs(taus / target_tau - 1.0) <= rel)
    assert hit.size, f"tau never came within {rel:.0%} of {target_tau}"
    return int(hit[0] + 1) * CHECK


@pytest.mark.parametrize("target", [0.05, 0.1, 0.2, 0.3])
def test_budget_converges_to_the_target_without_oscillating(target: float) -> None:
    cfg = BudgetConfig(target=target)
    ctl = BudgetController(cfg)
    taus, clouds, _ = simulate(ctl, plant_fraction, tokens=24_000)

    # Held: the fraction over the last 1,000 tokens is within +-0.03 of the target.
    last = clouds[-1000 // CHECK :]
    assert abs(last.sum() / 1000 - target) <= 0.03

    # Settled: tau barely moves over the last 500 tokens.
    tail = taus[-500 // CHECK :]
    assert np.std(tail) <= 0.02 * np.mean(tail)

    # Monotone approach: tau moves from tau_init towards tau* and never overshoots it by more than 5%.
    ts = tau_star(target)
    side = math.copysign(1.0, ts - cfg.tau_init)
    assert np.max(side * (taus - ts)) <= 0.05 * ts
    # No ringing: the steps of tau never change sign with growing amplitude; here they keep one sign.
    steps = np.diff(np.log(np.concatenate([[cfg.tau_init], taus])))
    moving = steps[steps != 0.0]
    flips = np.flatnonzero(np.sign(moving[1:]) != np.sign(moving[:-1]))
    for i in flips[1:]:
        assert abs(moving[i + 1]) <= abs(moving[flips[0] + 1]) + 1e-12
    assert flips.size <= 2


def test_budget_converges_with_bursty_handoffs() -> None:
    """A seeded plant closer to the controller: a check point either keeps its window or hands over
    with a burst of 4 cloud tokens, with a probability decreasing in tau."""
    cfg = BudgetConfig(target=0.15)
    ctl = BudgetController(cfg)
    rng = np.random.default_rng(1234)
    tokens, clouds, taus = [], [], []
    for _ in range(8_000):
        p_handoff = 0.6 * math.exp(-ctl.tau / 0.4)
        if rng.random() < p_handoff:
            keep = int(rng.integers(0, CHECK))  # rollback: the edge tokens before the cut, then M = 4
            n, c = keep + 4, 4
        else:
            n, c = CHECK, 0
        tokens.append(n)
        clouds.append(c)
        taus.append(ctl.update(n, c))
    tokens_a, clouds_a = np.array(tokens), np.array(clouds)
    half = len(tokens) // 2
    assert abs(clouds_a[half:].sum() / tokens_a[half:].sum() - cfg.target) <= 0.02
    tail = np.array(taus[half:])
    assert np.std(tail) <= 0.15 * np.mean(tail)


def test_budget_is_deterministic() -> None:
    runs = [simulate(BudgetController(BudgetConfig(target=0.1)), plant_fraction, 4_000)[0] for _ in range(2)]
    assert np.array_equal(runs[0], runs[1])


def test_budget_moves_tau_the_right_way_and_respects_the_dead_band() -> None:
    cfg = BudgetConfig(target=0.1, window=64, deadband=0.01)
    more = BudgetController(cfg)
    assert more.update(8, 4) > cfg.tau_init  # more cloud than target: raise tau, fewer handoffs
    less = BudgetController(cfg)
    assert less.update(8, 0) < cfg.tau_init  # less cloud than target: lower tau
    inside = BudgetController(cfg)
    for _ in range(20):  # 11 % cloud over 100 tokens: inside the dead band
        assert inside.update(100, 11) == cfg.tau_init
    assert inside.observed_fraction == pytest.approx(0.11)


def test_budget_window_slides_over_whole_events() -> None:
    ctl = BudgetController(BudgetConfig(window=16))
    assert ctl.observed_fraction is None
    assert ctl.update(0, 0) == ctl.config.tau_init  # nothing committed: nothing changes
    assert ctl.observed_fraction is None
    ctl.update(8, 8)
    ctl.update(8, 0)
    assert ctl.observed_fraction == 0.5
    ctl.update(8, 0)  # the first event leaves the 16-token window
    assert ctl.observed_fraction == 0.0
    ctl.update(100, 50)  # an event longer than the window is kept whole
    assert ctl.observed_fraction == 0.5


def test_budget_step_per_token_does_not_depend_on_the_check_interval() -> None:
    cfg = BudgetConfig(target=0.1, window=64)
    a, b = BudgetController(cfg), BudgetController(cfg)
    for _ in range(16):
        a.update(64, 32)
    for _ in range(64):
        b.update(16, 8)
    assert math.log(a.tau) == pytest.approx(math.log(b.tau), rel=0.02)


def test_budget_one_huge_event_moves_tau_at_most_one_window_step() -> None:
    cfg = BudgetConfig(target=0.0, window=16, gain=0.5, deadband=0.0)
    ctl = BudgetController(cfg)
    ctl.update(10_000, 10_000)  # e = 1
    assert math.log(ctl.tau) == pytest.approx(math.log(cfg.tau_init) + cfg.gain)


def test_budget_anti_windup_at_the_lower_bound() -> None:
    """An unreachable target (the edge never disagrees: no handoffs at any tau) parks tau at tau_min;
    once the target is reachable again tau leaves the bound within a window and converges as fast as
    a controller that started at the bound."""
    cfg = BudgetConfig(target=0.1)
    ctl = BudgetController(cfg)
    taus, _, _ = simulate(ctl, lambda tau: 0.0, tokens=24_000)
    assert taus[-1] == cfg.tau_min
    assert np.all(taus[-1000:] == cfg.tau_min)  # parked, nothing accumulated beyond the bound

    after, _, _ = simulate(ctl, plant_fraction, tokens=24_000)
    left = int(np.flatnonzero(after > cfg.tau_min)[0] + 1) * CHECK
    assert left <= cfg.window

    fresh, _, _ = simulate(
        BudgetController(BudgetConfig(target=0.1, tau_init=cfg.tau_min)), plant_fraction, 24_000
    )
    ts = tau_star(cfg.target)
    assert tokens_to_reach(after, ts, 0.1) <= tokens_to_reach(fresh, ts, 0.1) + cfg.window
    assert abs(after[-1] / ts - 1.0) <= 0.1


def test_budget_anti_windup_at_the_upper_bound() -> None:
    """The cloud needed everywhere whatever tau (half of each window) parks tau at tau_max; recovery
    is as prompt as from a fresh start at the bound."""
    cfg = BudgetConfig(target=0.1)
    ctl = BudgetController(cfg)
    taus, _, _ = simulate(ctl, lambda tau: 0.5, tokens=16_000)
    assert np.all(taus[-500:] == cfg.tau_max)

    after, _, _ = simulate(ctl, plant_fraction, tokens=40_000)
    left = int(np.flatnonzero(after < cfg.tau_max)[0] + 1) * CHECK
    assert left <= cfg.window  # the old, all-cloud events must first leave the window

    fresh, _, _ = simulate(
        BudgetController(BudgetConfig(target=0.1, tau_init=cfg.tau_max)), plant_fraction, 40_000
    )
    ts = tau_star(cfg.target)
    assert tokens_to_reach(after, ts, 0.1) <= tokens_to_reach(fresh, ts, 0.1) + cfg.window


@PROPS
@given(
    target=st.floats(0.0, 1.0),
    window=st.integers(1, 512),
    gain=st.floats(0.01, 50.0),
    bounds=st.tuples(st.floats(1e-4, 100.0), st.floats(1e-4, 100.0), st.floats(1e-4, 100.0)),
    events=st.lists(st.tuples(st.integers(0, 600), st.floats(0.0, 1.0)), max_size=60),
)
def test_budget_tau_stays_within_bounds(
    target: float,
    window: int,
    gain: float,
    bounds: tuple[float, float, float],
    events: list[tuple[int, float]],
) -> None:
    lo, init, hi = sorted(bounds)
    cfg = BudgetConfig(target=target, window=window, gain=gain, tau_min=lo, tau_init=init, tau_max=hi)
    ctl = BudgetController(cfg)
    assert ctl.tau == init
    for n, share in events:
        tau = ctl.update(n, round(n * share))
        assert lo <= tau <= hi
        assert tau == ctl.tau
        fraction = ctl.observed_fraction
        assert fraction is None or 0.0 <= fraction <= 1.0


@pytest.mark.parametrize(
    ("n", "c", "match"),
    [
        (8, 9, "0 <= n_cloud <= n_tokens"),
        (8, -1, "0 <= n_cloud <= n_tokens"),
        (-8, 0, "0 <= n_cloud <= n_tokens"),
        (8.0, 1, "n_tokens: expected an integer"),
        (8, True, "n_cloud: expected an integer"),
    ],
)
def test_budget_rejects_bad_updates(n: object, c: object, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        BudgetController().update(n, c)  # type: ignore[arg-type]


def test_budget_accepts_numpy_integers() -> None:
    assert BudgetController().update(np.int64(8), np.int32(1)) > 0.0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target": 1.5},
        {"target": -0.1},
        {"window": 0},
        {"window": 2.5},
        {"gain": 0.0},
        {"gain": INF},
        {"tau_min": 0.0},
        {"tau_min": 0.5, "tau_init": 0.2},
        {"tau_init": 20.0},
        {"tau_max": INF},
        {"deadband": -0.01},
        {"deadband": 1.0},
    ],
)
def test_budget_rejects_bad_config(kwargs: dict) -> None:
    with pytest.raises(ShapeError):
        BudgetConfig(**kwargs)


# --------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------


def make_view(n: int = 3, k: int = 2, p_kls: list[float] | None = None) -> WindowView:
    return WindowView(
        token_ids=np.arange(n) + 10,
        q_topk_ids=np.arange(n * k).reshape(n, k),
        q_topk_logprobs=np.full((n, k), math.log(0.5)),
        q_entropy=np.linspace(0.1, 0.3, n),
        p_kls=None if p_kls is None else np.array(p_kls),
    )


def test_scorers_are_token_scorers_and_say_whether_they_need_the_cloud() -> None:
    for scorer, needs in [
        (KLScorer(), True),
        (EntropyScorer(), False),
        (CallableScorer(lambda w: w.q_entropy), False),
        (CallableScorer(lambda w: w.p_kls, needs_cloud=True), True),
    ]:
        assert isinstance(scorer, TokenScorer)
        assert scorer.needs_cloud is needs


def test_kl_scorer_returns_the_cloud_kls() -> None:
    out = KLScorer().scores(make_view(p_kls=[0.1, NAN, 0.5]))
    np.testing.assert_array_equal(out, [0.1, NAN, 0.5])
    out[0] = 9.0  # a copy: the view stays as it was
    assert KLScorer().scores(make_view(p_kls=[0.1, NAN, 0.5]))[0] == 0.1


def test_kl_scorer_without_cloud_scores_says_so() -> None:
    with pytest.raises(ShapeError, match=r"KLScorer needs the cloud.*not been scored by the cloud"):
        KLScorer().scores(make_view())


def test_entropy_scorer_decides_on_the_edge_alone() -> None:
    np.testing.assert_allclose(EntropyScorer().scores(make_view()), [0.1, 0.2, 0.3])


def test_callable_scorer_passes_valid_scores_through() -> None:
    def reward_gap(view: WindowView) -> list[float]:
        return [1.0 - 0.5, 1.0 - 0.9, 1.0 - 0.2]  # a reward r wrapped as 1 - r

    out = CallableScorer(reward_gap).scores(make_view())
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, [0.5, 0.1, 0.8])


def short_scores(view: WindowView) -> np.ndarray:
    return np.zeros(view.n - 1)


def nan_scores(view: WindowView) -> np.ndarray:
    return np.array([0.1, NAN, 0.2])


def text_scores(view: WindowView) -> list[str]:
    return ["a", "b", "c"]


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (short_scores, r"score function short_scores: expected scores of shape \[3\].*got \(2,\)"),
        (nan_scores, "score function nan_scores: expected finite scores, got 1 NaN or infinite"),
        (text_scores, "score function text_scores: expected real scores"),
    ],
)
def test_callable_scorer_names_the_function_on_bad_output(fn: Callable, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        CallableScorer(fn).scores(make_view())


def test_callable_scorer_that_needs_the_cloud_refuses_an_unscored_window() -> None:
    calls = []
    scorer = CallableScorer(lambda w: calls.append(w) or w.p_kls, needs_cloud=True)
    with pytest.raises(ShapeError, match="not been scored by the cloud"):
        scorer.scores(make_view())
    assert calls == []  # refused before calling it


def test_window_view_arrays_are_read_only() -> None:
    view = make_view(p_kls=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        view.q_entropy[0] = 5.0
    assert view.n == 3


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"token_ids": np.array([], dtype=np.int64)}, "n >= 1"),
        ({"token_ids": np.array([1.0, 2.0, 3.0])}, "token_ids: expected integer token ids"),
        ({"token_ids": np.array([1, -2, 3])}, "token_ids: expected non-negative"),
        ({"q_topk_ids": np.zeros((2, 2), dtype=np.int64)}, "q_topk_ids: expected 3 positions"),
        ({"q_topk_ids": np.zeros(3, dtype=np.int64)}, r"q_topk_ids: expected shape \[n, k\]"),
        ({"q_topk_logprobs": np.zeros((3, 3))}, "q_topk_logprobs: expected real values of shape"),
        ({"q_topk_logprobs": np.full((3, 2), 0.1)}, "q_topk_logprobs: expected log-probabilities <= 0"),
        ({"q_entropy": np.array([0.1, 0.2])}, "q_entropy: expected 3 positions"),
        ({"q_entropy": np.array([0.1, -0.2, 0.3])}, "q_entropy: expected finite values >= 0"),
        ({"p_kls": np.array([0.1, 0.2])}, "p_kls: expected 3 positions"),
        ({"p_kls": np.array([0.1, -0.2, 0.3])}, "p_kls: expected divergences >= 0"),
    ],
)
def test_window_view_rejects_bad_arrays(change: dict, match: str) -> None:
    fields = {
        "token_ids": np.arange(3),
        "q_topk_ids": np.arange(6).reshape(3, 2),
        "q_topk_logprobs": np.full((3, 2), -0.7),
        "q_entropy": np.array([0.1, 0.2, 0.3]),
        "p_kls": None,
    }
    with pytest.raises(ShapeError, match=match):
        WindowView(**(fields | change))


# --------------------------------------------------------------------------------------------------
# trigger_cut
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "threshold", "aggregation", "kind", "expected"),
    [
        # Under the threshold (or equal: strictly greater hands over): keep the window.
        ([0.1, 0.2, 0.05], 0.2, "max", "rollback", None),
        ([0.1, 0.2, 0.05], 0.2, "max", "seed", None),
        # max over: rollback keeps the tokens before the first position over; seed keeps all.
        ([0.1, 0.3, 0.5, 0.0], 0.2, "max", "rollback", 1),
        ([0.1, 0.3, 0.5, 0.0], 0.2, "max", "seed", 4),
        ([0.9, 0.0], 0.2, "max", "rollback", 0),
        # mean: one spike is averaged away...
        ([0.0, 0.0, 0.0, 0.6], 0.2, "mean", "rollback", None),
        # ...several are not; the cut is still at the first position over.
        ([0.0, 0.3, 0.3, 0.6], 0.2, "mean", "rollback", 1),
        ([0.0, 0.3, 0.3, 0.6], 0.2, "mean", "seed", 4),
        # NaN: not scored, never cut at, left out of the mean.
        ([NAN, 0.3, NAN], 0.2, "mean", "rollback", 1),
        ([NAN, 0.0, 0.5], 0.2, "mean", "rollback", 2),
        ([NAN, NAN], 0.2, "max", "seed", None),
        ([NAN, NAN], -5.0, "max", "rollback", None),
        ([], 0.2, "max", "seed", None),
        ([0.1, INF], 0.2, "mean", "rollback", 1),
        # Signed scores (e.g. a negated reward) with a negative threshold.
        ([-0.9, -0.2, -0.7], -0.5, "max", "rollback", 1),
    ],
)
def test_trigger_cut_examples(
    scores: list[float], threshold: float, aggregation: str, kind: str, expected: int | None
) -> None:
    assert trigger_cut(scores, threshold, aggregation, kind) == expected  # type: ignore[arg-type]


def test_trigger_cut_caps_a_mean_that_rounds_above_the_max() -> None:
    x = 0.1
    scores = np.full(3, x)
    assert float(np.mean(scores)) > x  # the rounding this guards against
    for kind in ("rollback", "seed"):
        assert trigger_cut(scores, x, "mean", kind) is None


def test_trigger_cut_with_the_entropy_scorer() -> None:
    view = make_view(n=4)  # entropies 0.1, 0.1667, 0.2333, 0.3
    assert trigger_cut(EntropyScorer().scores(view), 0.2, "max", "rollback") == 2


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (([0.1], 0.2, "median", "seed"), "aggregation: expected one of"),
        (([0.1], 0.2, "max", "handover"), "kind: expected one of"),
        (([0.1], NAN, "max", "seed"), "threshold: expected a finite number"),
        (([0.1], "high", "max", "seed"), "threshold: expected a real number"),
        (([[0.1]], 0.2, "max", "seed"), r"scores: expected shape \[n\]"),
    ],
)
def test_trigger_cut_rejects_bad_input(args: tuple, match: str) -> None:
    with pytest.raises(ShapeError, match=match):
        trigger_cut(*args)


scores_st = st.lists(
    st.one_of(st.floats(-2.0, 2.0), st.just(NAN), st.just(INF), st.sampled_from([0.0, 0.1, 0.2])),
    max_size=12,
)
thresholds_st = st.one_of(st.floats(-3.0, 3.0), st.sampled_from([0.0, 0.1, 0.2]))


@PROPS
@given(
    scores=scores_st,
    t1=thresholds_st,
    t2=thresholds_st,
    aggregation=st.sampled_from(["max", "mean"]),
    kind=st.sampled_from(["seed", "rollback"]),
)
def test_trigger_cut_never_cuts_earlier_with_a_higher_threshold(
    scores: list[float], t1: float, t2: float, aggregation: str, kind: str
) -> None:
    lo, hi = sorted((t1, t2))

    def keep(t: float) -> float:
        cut = trigger_cut(scores, t, aggregation, kind)  # type: ignore[arg-type]
        return math.inf if cut is None else cut  # None keeps everything: the latest "cut"

    assert keep(lo) <= keep(hi)


@PROPS
@given(scores=scores_st, t=thresholds_st, aggregation=st.sampled_from(["max", "mean"]))
def test_trigger_cut_rollback_cuts_at_a_position_over_the_threshold(
    scores: list[float], t: float, aggregation: str
) -> None:
    cut = trigger_cut(scores, t, aggregation, "rollback")
    seed = trigger_cut(scores, t, aggregation, "seed")
    assert (cut is None) == (seed is None)  # the kinds agree on whether to hand over
    if cut is not None:
        assert seed == len(scores)
        assert scores[cut] > t
        assert not any(s > t for s in scores[:cut])  # NaN compares False: never a cut point
