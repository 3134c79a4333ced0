"""Decision logic of three policy ingredients, kept pure so that they can be tested without models.

- SkipGate: the edge skips uploading its distribution at positions where it is confident and sends
  only the token id (in the spirit of U-HLM, Oh et al., arXiv 2412.12687). window_divergence and
  skipped_kl say how a window with such positions is judged.
- BudgetController: adjusts the threshold tau online to hold a target fraction of cloud tokens over a
  sliding window of committed tokens.
- TokenScorer and trigger_cut: a pluggable per-token score (the top-k KL, Q's entropy, or any external
  function such as a reward model) and the cut it implies, with the semantics of
  edge.controller.window_cut (in the spirit of reward-based cloud assistance, arXiv 2409.13757).

Everything works on numpy arrays; shapes are given in comments and checked at entry, and a bad shape
or value raises ShapeError naming the argument.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from handoff.shared.divergence import AGGREGATIONS, aggregate, first_over, real_1d
from handoff.shared.errors import ShapeError

__all__ = [
    "BudgetConfig",
    "BudgetController",
    "CallableScorer",
    "EntropyScorer",
    "KLScorer",
    "SkipGate",
    "TokenScorer",
    "WindowView",
    "skipped_kl",
    "trigger_cut",
    "window_divergence",
]

GateKind = Literal["off", "entropy", "top1"]
GATE_KINDS: tuple[str, ...] = ("off", "entropy", "top1")
CutKind = Literal["seed", "rollback"]
CUT_KINDS: tuple[str, ...] = ("seed", "rollback")


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _int_array(name: str, x: Any, ndim: int, expected: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ShapeError(f"{name}: expected shape {expected}, got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ShapeError(f"{name}: expected integer token ids of shape {expected}, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ShapeError(f"{name}: expected non-negative token ids, got {int(arr.min())}")
    return arr


def _same_length(name: str, arr: np.ndarray, ref_name: str, n: int) -> None:
    if arr.shape[0] != n:
        raise ShapeError(f"{name}: expected {n} positions (as {ref_name}), got shape {arr.shape}")


def _finite_float(name: str, x: Any) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"{name}: expected a real number, got {x!r}") from exc
    if not math.isfinite(value):
        raise ShapeError(f"{name}: expected a finite number, got {x!r}")
    return value


def _count(name: str, x: Any) -> int:
    # bool is an int subclass; True as a token count is a bug upstream, not a 1.
    if isinstance(x, bool) or not isinstance(x, int | np.integer):
        raise ShapeError(f"{name}: expected an integer, got {x!r}")
    return int(x)


def _check_kls(name: str, arr: np.ndarray) -> None:
    """KLs are >= 0 or +inf; NaN is allowed by the caller's choice (it means 'not scored')."""
    if (arr < 0.0).any():
        raise ShapeError(f"{name}: expected divergences >= 0, got a minimum of {float(np.nanmin(arr))}")


# --------------------------------------------------------------------------------------------------
# 1. Uplink skip gate
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkipGate:
    """Which positions the edge uploads only as a token id, without its top-k distribution.

    Where Q is confident, P rarely disagrees enough to trigger a handoff, so the distribution is not
    worth its uplink bytes (U-HLM, arXiv 2412.12687, skips the upload on the small model's
    uncertainty). Both tests are inclusive, so entropy_max = 0 still skips one-hot positions.

    kind: "off" uploads everything; "entropy" skips where Q's entropy <= entropy_max; "top1" skips
        where Q's top-1 probability >= top1_min.
    entropy_max: nats.
    top1_min: a probability in (0, 1].
    """

    kind: GateKind = "off"
    entropy_max: float = 0.5
    top1_min: float = 0.9

    def __post_init__(self) -> None:
        if self.kind not in GATE_KINDS:
            raise ShapeError(f"kind: expected one of {GATE_KINDS}, got {self.kind!r}")
        if not (math.isfinite(self.entropy_max) and self.entropy_max >= 0.0):
            raise ShapeError(f"entropy_max: expected a finite number >= 0 nats, got {self.entropy_max!r}")
        if not 0.0 < self.top1_min <= 1.0:  # also rejects NaN
            raise ShapeError(f"top1_min: expected a probability in (0, 1], got {self.top1_min!r}")

    def confident(self, entropy: Any, top1_logprob: Any) -> np.ndarray:
        """Positions where the edge skips uploading its distribution (only the token id is sent).

        Args:
            entropy: [n] Q's entropy in nats at each position, finite and >= 0.
            top1_logprob: [n] Q's largest log-probability at each position, <= 0 (-inf allowed).

        Returns:
            [n] bool, True where the distribution is not uploaded; all False when kind is "off".
        """
        ent = real_1d("entropy", entropy)  # [n]
        top1 = real_1d("top1_logprob", top1_logprob)  # [n]
        _same_length("top1_logprob", top1, "entropy", ent.shape[0])
        if not np.isfinite(ent).all() or (ent < 0.0).any():
            raise ShapeError("entropy: expected finite values >= 0 nats")
        if (top1 > 0.0).any():
            raise ShapeError(f"top1_logprob: expected log-probabilities <= 0, got {float(top1.max())}")
        if self.kind == "entropy":
            return ent <= self.entropy_max
        if self.kind == "top1":
            # Compared in log space: exp() of a log-probability near 0 rounds, log(top1_min) is exact
            # enough that a position at exactly top1_min counts as confident.
            return top1 >= math.log(self.top1_min)
        return np.zeros(ent.shape, dtype=bool)


def skipped_kl(kls: Any) -> np.ndarray:
    """Per-position KLs with the skipped positions (NaN: no distribution uploaded) set to 0.

    The edge skipped those positions because it was confident, so they count as no divergence: a
    rollback never cuts at one, and a max over the window is unchanged by them (KLs are >= 0).

    Args:
        kls: [n] top-k KL(P || Q) in nats, >= 0 (+inf allowed), NaN where no distribution was uploaded.

    Returns:
        [n] float64, NaN replaced by 0.0.
    """
    arr = real_1d("kls", kls, allow_nan=True)  # [n]
    _check_kls("kls", arr)
    return np.where(np.isnan(arr), 0.0, arr)


def window_divergence(kls: Any, aggregation: str) -> float:
    """A window's divergence from per-position KLs where some positions were not uploaded.

    The max or mean is taken over the positions that have a KL; a window where none has gives 0.0
    (the edge was confident everywhere). For "max" this equals aggregating skipped_kl(kls); for
    "mean" the skipped positions are left out rather than counted as 0, so that tau keeps the same
    meaning whatever fraction of positions the gate skips.

    Args:
        kls: [n] top-k KL(P || Q) in nats, >= 0 (+inf allowed), NaN where no distribution was uploaded;
            n may be 0.
        aggregation: one of AGGREGATIONS ("max" or "mean").

    Returns:
        The aggregated divergence in nats, 0.0 when no position has a KL.
    """
    arr = real_1d("kls", kls, allow_nan=True)  # [n]
    _check_kls("kls", arr)
    if aggregation not in AGGREGATIONS:
        raise ShapeError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    scored = arr[~np.isnan(arr)]  # [m], m <= n
    return aggregate(scored, aggregation) if scored.size else 0.0


# --------------------------------------------------------------------------------------------------
# 2. Budget-holding threshold
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BudgetConfig:
    """Constants of the budget-holding threshold (see BudgetController).

    target: fraction of committed tokens the cloud should produce, in [0, 1].
    window: tokens in the sliding window the fraction is measured over.
    gain: change of log tau per window of tokens per unit of error.
    tau_min, tau_max: bounds of tau in nats, 0 < tau_min <= tau_init <= tau_max.
    tau_init: tau before any update.
    deadband: no change while |observed - target| <= deadband.
    """

    target: float = 0.1
    window: int = 256
    gain: float = 0.5
    tau_min: float = 0.01
    tau_max: float = 10.0
    tau_init: float = 0.2
    deadband: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= self.target <= 1.0:
            raise ShapeError(f"target: expected a fraction in [0, 1], got {self.target!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ShapeError(f"window: expected an integer >= 1 tokens, got {self.window!r}")
        if not (math.isfinite(self.gain) and self.gain > 0.0):
            raise ShapeError(f"gain: expected a finite number > 0, got {self.gain!r}")
        if not (math.isfinite(self.tau_max) and 0.0 < self.tau_min <= self.tau_init <= self.tau_max):
            raise ShapeError(
                "expected finite 0 < tau_min <= tau_init <= tau_max, got "
                f"{self.tau_min!r}, {self.tau_init!r}, {self.tau_max!r}"
            )
        if not 0.0 <= self.deadband < 1.0:
            raise ShapeError(f"deadband: expected a fraction in [0, 1), got {self.deadband!r}")


class BudgetController:
    """Holds a target cloud-token fraction by adjusting the handoff threshold tau online.

    Law (integral action on log tau, measured over a sliding window):

        f = cloud tokens / tokens over the latest check-point events covering >= window tokens
        e = f - target
        if |e| > deadband:
            log tau <- clamp(log tau + gain * e * min(n_tokens / window, 1), log tau_min, log tau_max)

    so per window of committed tokens log tau moves by at most gain * e, whatever the check interval.

    Why it does not oscillate:
    - Monotone response: raising tau can only make fewer windows exceed it, so the cloud fraction
      f(tau) is non-increasing; more cloud than target raises tau, less lowers it (negative feedback).
    - Integral action on a smoothed measurement: the only state is log tau itself, and f is a moving
      average over `window` tokens, which delays it by about half a window and filters the 0/1
      burstiness of handoffs. With time t in windows and loop gain lam = gain * |df/dlog tau| at the
      operating point, the linearised loop is s^2 + lam (1 - e^-s) = 0; its dominant roots are real
      (a monotone approach, no overshoot) for lam < 0.65 (max of x^2 / (e^x - 1)), and it stays
      stable well beyond that. A fraction moves by much less than 1 per e-fold of tau: |df/dlog tau|
      is 0.15-0.25 between tau = 0.1 and 1 nats in the policy grid of docs/policy_defaults.md, and
      0.1-0.2 on the test plant f = 0.5 exp(-tau / 0.3), so the default gain 0.5 gives lam ~0.05-0.13,
      a margin of 5x or more (on the test plant, overshoot appears near gain 10, as predicted). No
      proportional term: on a static plant it would act on the lagged measurement and is what makes
      such loops ring.
    - Anti-windup: the integrator state is log tau and it is clamped to the bounds, so an unreachable
      target (the edge never disagrees; the cloud is needed everywhere) parks tau at a bound with
      nothing accumulated beyond it, and the first update with an error of the other sign moves tau
      off the bound.
    - Dead band: once |e| <= deadband tau stops moving, so the rounding of cloud bursts in the
      measurement does not make tau chatter around its set point.

    Tuning: the time constant is about window / lam tokens (default: ~2,000-5,000 tokens), so this is
    meant to hold a budget over many answers, not within one. Measure |df/dlog tau| from a tau sweep
    (slope of the cloud fraction against ln tau around the target) and keep gain * slope <= ~0.3;
    raise gain up to that for faster tracking. A longer window smooths handoff bursts (each handoff
    commits up to M cloud tokens at once) but slows the loop in proportion; keep it >= ~20 check
    intervals. The dead band only has to cover the measurement's quantisation (one handoff burst, about
    M / window) to stop chatter; 0 tracks exactly. The sampling noise of handoffs, about
    sqrt(target * M / window), is averaged out by the small gain, not by the dead band. tau_min and tau_max bound what the budget may do to quality and to cost.

    Deterministic: the result depends only on the sequence of updates.
    """

    def __init__(self, config: BudgetConfig | None = None) -> None:
        self.config = config if config is not None else BudgetConfig()
        self._tau = self.config.tau_init
        self._log_tau = math.log(self._tau)
        self._log_min = math.log(self.config.tau_min)
        self._log_max = math.log(self.config.tau_max)
        # (tokens, cloud) per update, oldest first; integer sums, so no floating drift over long runs.
        self._events: deque[tuple[int, int]] = deque()
        self._tokens = 0
        self._cloud = 0

    @property
    def tau(self) -> float:
        """The current threshold in nats."""
        return self._tau

    @property
    def observed_fraction(self) -> float | None:
        """Cloud fraction over the sliding window; None before any token was committed."""
        return self._cloud / self._tokens if self._tokens else None

    def update(self, n_tokens: int, n_cloud: int) -> float:
        """Record a check point or handoff and return the new tau.

        Args:
            n_tokens: tokens just committed, >= 0 (0 leaves everything unchanged).
            n_cloud: how many of them the cloud produced (cloud and corrected), 0 <= n_cloud <= n_tokens.

        Returns:
            The new tau in nats, within [tau_min, tau_max].
        """
        n = _count("n_tokens", n_tokens)
        c = _count("n_cloud", n_cloud)
        if not 0 <= c <= n:
            raise ShapeError(f"expected 0 <= n_cloud <= n_tokens, got n_cloud={c}, n_tokens={n}")
        if n == 0:
            return self.tau
        cfg = self.config
        self._events.append((n, c))
        self._tokens += n
        self._cloud += c
        # Whole events only: the window covers the latest events totalling >= window tokens, so one
        # event is never split (the measurement stays exact integers).
        while self._tokens - self._events[0][0] >= cfg.window:
            old_n, old_c = self._events.popleft()
            self._tokens -= old_n
            self._cloud -= old_c
        error = self._cloud / self._tokens - cfg.target
        if abs(error) > cfg.deadband:
            # Scaled by tokens, not by calls: the rate per token is the same for any check interval;
            # capped at one window so that one huge event cannot jump past the set point.
            step = cfg.gain * error * min(n / cfg.window, 1.0)
            self._log_tau = min(max(self._log_tau + step, self._log_min), self._log_max)
            # exp(log(x)) can round off x: at a bound tau is the bound itself, exactly.
            if self._log_tau == self._log_min:
                self._tau = cfg.tau_min
            elif self._log_tau == self._log_max:
                self._tau = cfg.tau_max
            else:
                self._tau = min(max(math.exp(self._log_tau), cfg.tau_min), cfg.tau_max)
        return self._tau


# --------------------------------------------------------------------------------------------------
# 3. Pluggable score trigger
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowView:
    """What a scorer sees of a window of edge tokens (arrays are converted and checked at creation).

    token_ids: [n] int, the edge's tokens, n >= 1.
    q_topk_ids: [n, k] int, Q's top-k ids at each position.
    q_topk_logprobs: [n, k] float, Q's log-probabilities at q_topk_ids (<= 0, -inf allowed).
    q_entropy: [n] float, Q's entropy in nats (>= 0, finite).
    p_kls: [n] float top-k KL(P || Q) in nats (>= 0, +inf allowed, NaN where the edge skipped the
        upload), or None when the cloud has not scored the window.
    """

    token_ids: np.ndarray
    q_topk_ids: np.ndarray
    q_topk_logprobs: np.ndarray
    q_entropy: np.ndarray
    p_kls: np.ndarray | None = None

    def __post_init__(self) -> None:
        ids = _int_array("token_ids", self.token_ids, 1, "[n]")  # [n]
        n = ids.shape[0]
        if n < 1:
            raise ShapeError("token_ids: expected shape [n] with n >= 1, got (0,)")
        topk_ids = _int_array("q_topk_ids", self.q_topk_ids, 2, "[n, k]")  # [n, k]
        _same_length("q_topk_ids", topk_ids, "token_ids", n)
        if topk_ids.shape[1] < 1:
            raise ShapeError(f"q_topk_ids: expected shape [n, k] with k >= 1, got {topk_ids.shape}")
        topk_lp = np.asarray(self.q_topk_logprobs)
        if topk_lp.dtype.kind not in "biuf" or topk_lp.shape != topk_ids.shape:
            raise ShapeError(
                f"q_topk_logprobs: expected real values of shape {topk_ids.shape} (as q_topk_ids), "
                f"got {topk_lp.shape} {topk_lp.dtype}"
            )
        topk_lp = topk_lp.astype(np.float64, copy=False)  # [n, k]
        if np.isnan(topk_lp).any() or (topk_lp > 0.0).any():
            raise ShapeError("q_topk_logprobs: expected log-probabilities <= 0 without NaN")
        ent = real_1d("q_entropy", self.q_entropy)  # [n]
        _same_length("q_entropy", ent, "token_ids", n)
        if not np.isfinite(ent).all() or (ent < 0.0).any():
            raise ShapeError("q_entropy: expected finite values >= 0 nats")
        kls = None
        if self.p_kls is not None:
            kls = real_1d("p_kls", self.p_kls, allow_nan=True)  # [n]
            _same_length("p_kls", kls, "token_ids", n)
            _check_kls("p_kls", kls)
        # Frozen: store the checked arrays (read-only, so a scorer cannot change what the next sees).
        for name, arr in (
            ("token_ids", ids),
            ("q_topk_ids", topk_ids),
            ("q_topk_logprobs", topk_lp),
            ("q_entropy", ent),
            ("p_kls", kls),
        ):
            if arr is not None:
                arr = arr.copy()
                arr.flags.writeable = False
            object.__setattr__(self, name, arr)

    @property
    def n(self) -> int:
        return int(self.token_ids.shape[0])


@runtime_checkable
class TokenScorer(Protocol):
    """A per-token score; higher means more reason to hand the window to the cloud.

    needs_cloud: True when scores() needs the cloud's answer (WindowView.p_kls), so the window must be
        uploaded and checked before deciding; False when the edge can decide alone.
    """

    needs_cloud: bool

    def scores(self, window: WindowView) -> np.ndarray:
        """[n] float64 scores of the window's positions (NaN: position not scored)."""
        ...


def _cloud_kls(window: WindowView, who: str) -> np.ndarray:
    if window.p_kls is None:
        raise ShapeError(
            f"{who} needs the cloud's per-position KL, but this window has not been scored by the cloud "
            "(WindowView.p_kls is None): upload and check it first (the scorer has needs_cloud=True)"
        )
    return window.p_kls


@dataclass(frozen=True)
class KLScorer:
    """The top-k KL(P || Q) from the cloud's answer: the default policy's score."""

    needs_cloud: bool = True

    def scores(self, window: WindowView) -> np.ndarray:
        """Args: window with p_kls. Returns: [n] the KLs in nats (NaN where the upload was skipped)."""
        return np.array(_cloud_kls(window, "KLScorer"), dtype=np.float64)


@dataclass(frozen=True)
class EntropyScorer:
    """Q's own entropy: hand over where the edge is uncertain; the edge decides without the cloud."""

    needs_cloud: bool = False

    def scores(self, window: WindowView) -> np.ndarray:
        """Args: window. Returns: [n] Q's entropy in nats."""
        return np.array(window.q_entropy, dtype=np.float64)


@dataclass(frozen=True)
class CallableScorer:
    """Wraps an external per-token score function, e.g. a reward model (arXiv 2409.13757).

    Scores must grow with the need for the cloud: wrap a reward r (low = bad) as -r or 1 - r. The
    output is checked: shape [n] and finite values, else ShapeError naming the function.

    fn: WindowView -> [n] real scores.
    needs_cloud: True when fn reads WindowView.p_kls (then a window without it is refused up front).
    """

    fn: Callable[[WindowView], Any]
    needs_cloud: bool = False

    @property
    def name(self) -> str:
        fn = self.fn
        return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)

    def scores(self, window: WindowView) -> np.ndarray:
        """Args: window. Returns: [n] float64 finite scores from fn."""
        who = f"score function {self.name}"
        if self.needs_cloud:
            _cloud_kls(window, who)
        out = np.asarray(self.fn(window))
        if out.dtype.kind not in "biuf":
            raise ShapeError(f"{who}: expected real scores of shape [{window.n}], got dtype {out.dtype}")
        if out.shape != (window.n,):
            raise ShapeError(f"{who}: expected scores of shape [{window.n}] (one per token), got {out.shape}")
        out = out.astype(np.float64)
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out)).sum())
            raise ShapeError(f"{who}: expected finite scores, got {bad} NaN or infinite of {window.n}")
        return out


def trigger_cut(scores: Any, threshold: float, aggregation: str, kind: CutKind) -> int | None:
    """Where a scored window hands over, with the semantics of edge.controller.window_cut.

    Positions whose score is NaN (not scored, e.g. the upload was skipped) are left out of the
    aggregate and never cut at; a window with no scored position is kept.

    Args:
        scores: [n] real per-token scores, higher = more reason to hand over (+inf allowed, NaN = not
            scored), n >= 0.
        threshold: a real number, the window hands over when its aggregated score is > threshold.
        aggregation: one of AGGREGATIONS ("max" or "mean").
        kind: "seed" (keep the whole window, then hand over) or "rollback" (cut at the first position
            over the threshold).

    Returns:
        None when the window is kept on the edge; else how many of its tokens to keep: n for seed,
        the index of the first score over threshold for rollback.
    """
    arr = real_1d("scores", scores, allow_nan=True)  # [n]
    t = _finite_float("threshold", threshold)
    if aggregation not in AGGREGATIONS:
        raise ShapeError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    if kind not in CUT_KINDS:
        raise ShapeError(f"kind: expected one of {CUT_KINDS}, got {kind!r}")
    scored = arr[~np.isnan(arr)]  # [m]
    if scored.size == 0:
        return None
    # A computed mean can round above the max; capping it keeps "over" implying a position over, so
    # the cut always exists and moves monotonically with the threshold.
    level = min(aggregate(scored, aggregation), float(scored.max()))
    if level <= t:
        return None
    if kind == "seed":
        return int(arr.shape[0])
    cut = first_over(np.where(np.isnan(arr), -np.inf, arr), t)
    return 0 if cut is None else cut  # None is unreachable (level <= max); 0 mirrors window_cut
