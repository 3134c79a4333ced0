"""The budget-holding threshold: tau tuned online to hold a target fraction of cloud tokens."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from handoff.edge.policy.checks import count
from handoff.shared.errors import ShapeError

__all__ = ["BudgetConfig", "BudgetController"]


@dataclass(frozen=True)
class BudgetConfig:
    """Constants of the budget-holding threshold (see BudgetController).

    The defaults here are the conservative ones the unit tests' plants are tuned on (gain 0.5, window
    256: lam ~0.08-0.13, slow and quiet); the product's are PolicyConfig's (budget_gain 2.0,
    budget_window 128: lam ~0.3-0.5, about eight times faster, tau noisier), which PolicyConfig passes here.

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
      is 0.15-0.25 between tau = 0.1 and 1 nats in the policy grid of docs/policy_defaults.md, so the
      product default gain 2.0 (PolicyConfig.budget_gain) gives lam ~0.3-0.5: monotone, with a
      margin of 1.3-2x to the 0.65 bound; this class's default gain 0.5 gives lam ~0.08-0.13. On the
      test plant f = 0.5 exp(-tau / 0.3) the slope is 0.1-0.2 (lam ~0.2-0.4 at gain 2.0; overshoot
      appears near gain 10, lam ~1-2, as predicted). No proportional term: on a static plant it
      would act on the lagged measurement and is what makes such loops ring.
    - Anti-windup: the integrator state is log tau and it is clamped to the bounds, so an unreachable
      target (the edge never disagrees; the cloud is needed everywhere) parks tau at a bound with
      nothing accumulated beyond it, and the first update with an error of the other sign moves tau
      off the bound.
    - Dead band: once |e| <= deadband tau stops moving, so the rounding of cloud bursts in the
      measurement does not make tau chatter around its set point.

    Tuning: the time constant is about window / lam tokens (product defaults, window 128 and lam
    0.3-0.5: ~250-450 tokens; this class's, window 256 and lam ~0.08-0.13: ~2,000-3,500 tokens), so
    the budget is held over a few answers at best, not within one. Measure
    |df/dlog tau| from a tau sweep (slope of the cloud fraction against ln tau around the target) and
    keep lam = gain * slope below ~0.65 for a monotone approach; gain 2.0 allows slopes up to ~0.3.
    A longer window smooths handoff bursts (each handoff commits up to M cloud tokens at once) but
    slows the loop in proportion; keep it >= ~15 check intervals (128 tokens = 16 intervals of 8).
    The dead band stops chatter entirely once it covers the measurement's quantisation (one handoff
    burst, about M / window: 0.03 at M = 4, window 128); the default 0.01 is below that, so tau may
    chatter by gain * |e| * N / window per check point (~0.4% at the product's gain 2.0, N = 8),
    which is harmless; 0 tracks exactly. The sampling noise of handoffs, about
    sqrt(target * M / window), is averaged over the loop's time constant (1 / lam windows), not by
    the dead band, so the product's faster loop leaves tau noisier (on the bursty test plant of
    tests/test_policies.py, std/mean of tau ~0.18 at gain 2.0, window 128 against <= 0.15 at the
    defaults here). tau_min and tau_max bound what the budget may do to quality and to cost.

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
        n = count("n_tokens", n_tokens)
        c = count("n_cloud", n_cloud)
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
