"""The uplink skip gate: the edge sends only the token id where Q is confident (SkipGate).

In the spirit of U-HLM (Oh et al., arXiv 2412.12687), which skips the upload on the small model's
uncertainty. window_divergence and skipped_kl say how a window with such positions is judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from handoff.edge.policy.checks import check_kls, same_length
from handoff.shared.divergence import AGGREGATIONS, aggregate, real_1d
from handoff.shared.errors import ShapeError

__all__ = ["GATE_KINDS", "GateKind", "SkipGate", "skipped_kl", "window_divergence"]

GateKind = Literal["off", "entropy", "top1"]
GATE_KINDS: tuple[str, ...] = ("off", "entropy", "top1")


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
        same_length("top1_logprob", top1, "entropy", ent.shape[0])
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
    check_kls("kls", arr)
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
    check_kls("kls", arr)
    if aggregation not in AGGREGATIONS:
        raise ShapeError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    scored = arr[~np.isnan(arr)]  # [m], m <= n
    return aggregate(scored, aggregation) if scored.size else 0.0
