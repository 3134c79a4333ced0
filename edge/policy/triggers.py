"""What a window of edge tokens is judged on: pluggable per-token scores and the cut they imply.

A TokenScorer gives each position of a window a score (the top-k KL, Q's entropy, or any external
function such as a reward model, in the spirit of reward-based cloud assistance, arXiv 2409.13757);
trigger_cut turns a window's scores into a handoff: none, keep the window (seed) or cut at the first
position over the threshold (rollback). Everything works on numpy arrays; shapes are given in
comments and checked at entry, and a bad shape or value raises ShapeError naming the argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from handoff.edge.policy.checks import check_kls, finite_float, int_array, same_length
from handoff.shared.divergence import AGGREGATIONS, real_1d
from handoff.shared.errors import ShapeError

__all__ = [
    "CUT_KINDS",
    "CallableScorer",
    "CutKind",
    "EntropyScorer",
    "KLScorer",
    "TokenScorer",
    "WindowView",
    "checked_scores",
    "cut_checked",
    "trigger_cut",
]

CutKind = Literal["seed", "rollback"]
CUT_KINDS: tuple[str, ...] = ("seed", "rollback")


@dataclass(frozen=True)
class WindowView:
    """What a scorer sees of a window of edge tokens (arrays are converted and checked at creation).

    token_ids: [n] int, the edge's tokens, n >= 1.
    q_topk_ids: [n, k] int, Q's top-k ids at each position.
    q_topk_logprobs: [n, k] float, Q's log-probabilities at q_topk_ids (<= 0, -inf allowed).
    q_entropy: [n] float, Q's entropy in nats (>= 0, finite).
    p_kls: [n] float top-k KL(P || Q) in nats (>= 0, +inf allowed, NaN where the edge skipped the
        upload), or None when the cloud has not scored the window.
    p_top1_ids: [n] int, P's most likely token at each position (from the check point's top-k), or
        None when the cloud has not scored the window.
    p_topk_ids: [n, kp] int, P's top-k ids at each position (the check point's answer), or None.
    p_topk_logprobs: [n, kp] float, P's log-probabilities at p_topk_ids (<= 0), or None.
    p_logprobs_at_q: [n, k] float, P's log-probabilities at q_topk_ids (NaN rows where the edge
        skipped the upload), or None.
    expert_kls: [n, E] float, each expert's top-k KL(P || expert) when a mixture of experts drafts
        (edge/mixture.py), or None.
    expert_top1_ids: [n, E] int, each expert's most likely token at each position, or None.
    offsets: [n] int, tokens since the prompt's end at each position (>= 0), or None.
    q_hidden: [n, d] float, Q's last hidden state where each token was predicted (EdgeStep.hidden),
        or None when the runner does not return it.
    """

    token_ids: np.ndarray
    q_topk_ids: np.ndarray
    q_topk_logprobs: np.ndarray
    q_entropy: np.ndarray
    p_kls: np.ndarray | None = None
    p_top1_ids: np.ndarray | None = None
    p_topk_ids: np.ndarray | None = None
    p_topk_logprobs: np.ndarray | None = None
    p_logprobs_at_q: np.ndarray | None = None
    expert_kls: np.ndarray | None = None
    expert_top1_ids: np.ndarray | None = None
    offsets: np.ndarray | None = None
    q_hidden: np.ndarray | None = None

    def __post_init__(self) -> None:
        ids = int_array("token_ids", self.token_ids, 1, "[n]")  # [n]
        n = ids.shape[0]
        if n < 1:
            raise ShapeError("token_ids: expected shape [n] with n >= 1, got (0,)")
        topk_ids = int_array("q_topk_ids", self.q_topk_ids, 2, "[n, k]")  # [n, k]
        same_length("q_topk_ids", topk_ids, "token_ids", n)
        if topk_ids.shape[1] < 1:
            raise ShapeError(f"q_topk_ids: expected shape [n, k] with k >= 1, got {topk_ids.shape}")
        topk_lp = _logprob_array(
            "q_topk_logprobs", self.q_topk_logprobs, topk_ids.shape, False, "q_topk_ids"
        )  # [n, k]
        ent = real_1d("q_entropy", self.q_entropy)  # [n]
        same_length("q_entropy", ent, "token_ids", n)
        if not np.isfinite(ent).all() or (ent < 0.0).any():
            raise ShapeError("q_entropy: expected finite values >= 0 nats")
        kls = None
        if self.p_kls is not None:
            kls = real_1d("p_kls", self.p_kls, allow_nan=True)  # [n]
            same_length("p_kls", kls, "token_ids", n)
            check_kls("p_kls", kls)
        p_top1 = None
        if self.p_top1_ids is not None:
            p_top1 = int_array("p_top1_ids", self.p_top1_ids, 1, "[n]")  # [n]
            same_length("p_top1_ids", p_top1, "token_ids", n)
        p_ids, p_lp, p_at_q = self._p_views(n, topk_ids.shape)
        e_kls, e_top1 = self._expert_views(n)
        offsets = None
        if self.offsets is not None:
            offsets = int_array("offsets", self.offsets, 1, "[n]")  # [n]
            same_length("offsets", offsets, "token_ids", n)
            if (offsets < 0).any():
                raise ShapeError("offsets: expected tokens since the prompt's end, >= 0")
        hidden = None
        if self.q_hidden is not None:
            hidden = np.asarray(self.q_hidden, dtype=np.float64)  # [n, d]
            if hidden.ndim != 2 or hidden.shape[0] != n or not np.isfinite(hidden).all():
                raise ShapeError(f"q_hidden: expected finite [{n}, d], got {hidden.shape}")
        # Frozen: store the checked arrays (read-only, so a scorer cannot change what the next sees).
        for name, arr in (
            ("token_ids", ids),
            ("q_topk_ids", topk_ids),
            ("q_topk_logprobs", topk_lp),
            ("q_entropy", ent),
            ("p_kls", kls),
            ("p_top1_ids", p_top1),
            ("p_topk_ids", p_ids),
            ("p_topk_logprobs", p_lp),
            ("p_logprobs_at_q", p_at_q),
            ("expert_kls", e_kls),
            ("expert_top1_ids", e_top1),
            ("offsets", offsets),
            ("q_hidden", hidden),
        ):
            if arr is not None:
                arr = arr.copy()
                arr.flags.writeable = False
            object.__setattr__(self, name, arr)

    def _p_views(self, n: int, q_shape: tuple[int, ...]) -> tuple[np.ndarray | None, ...]:
        """The checked P views (None where not given)."""
        p_ids = p_lp = p_at_q = None
        if (self.p_topk_ids is None) != (self.p_topk_logprobs is None):
            raise ShapeError("p_topk_ids, p_topk_logprobs: give both or neither")
        if self.p_topk_ids is not None:
            p_ids = int_array("p_topk_ids", self.p_topk_ids, 2, "[n, kp]")  # [n, kp]
            same_length("p_topk_ids", p_ids, "token_ids", n)
            p_lp = _logprob_array(
                "p_topk_logprobs", self.p_topk_logprobs, p_ids.shape, False, "p_topk_ids"
            )  # [n, kp]
        if self.p_logprobs_at_q is not None:
            p_at_q = _logprob_array(
                "p_logprobs_at_q", self.p_logprobs_at_q, q_shape, True, "q_topk_ids"
            )  # [n, k]
        return p_ids, p_lp, p_at_q

    def _expert_views(self, n: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The checked expert arrays (both or neither)."""
        if (self.expert_kls is None) != (self.expert_top1_ids is None):
            raise ShapeError("expert_kls, expert_top1_ids: give both or neither")
        if self.expert_kls is None:
            return None, None
        top1 = int_array("expert_top1_ids", self.expert_top1_ids, 2, "[n, E]")  # [n, E]
        same_length("expert_top1_ids", top1, "token_ids", n)
        kls = np.asarray(self.expert_kls, dtype=np.float64)  # [n, E]
        if kls.shape != top1.shape:
            raise ShapeError(f"expert_kls: expected shape {top1.shape} (as expert_top1_ids), got {kls.shape}")
        check_kls("expert_kls", kls)
        return kls, top1

    @property
    def n(self) -> int:
        return int(self.token_ids.shape[0])


def _logprob_array(name: str, values: Any, shape: tuple[int, ...], allow_nan: bool, like: str) -> np.ndarray:
    """values as float64 log-probabilities of `shape` (the shape of `like`), <= 0; NaN only if allowed."""
    arr = np.asarray(values)
    if arr.dtype.kind not in "biuf" or arr.shape != shape:
        raise ShapeError(
            f"{name}: expected real values of shape {shape} (as {like}), got {arr.shape} {arr.dtype}"
        )
    arr = arr.astype(np.float64)
    if (not allow_nan and np.isnan(arr).any()) or (arr[~np.isnan(arr)] > 0.0).any():
        raise ShapeError(f"{name}: expected log-probabilities <= 0" + ("" if allow_nan else " without NaN"))
    return arr


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


def checked_scores(scores: Any) -> np.ndarray:
    """A window's scores as a checked float64 [n] array (NaN allowed: not scored)."""
    return real_1d("scores", scores, allow_nan=True)


def cut_checked(scores: np.ndarray, threshold: float, aggregation: str, kind: CutKind) -> int | None:
    """trigger_cut on inputs already checked (checked_scores; a finite threshold; valid names).

    The one place where a window's scores are compared with tau.

    Args:
        scores: [n] float64 from checked_scores.
        threshold: finite, in the scores' unit.
        aggregation: one of AGGREGATIONS.
        kind: one of CUT_KINDS.

    Returns:
        As trigger_cut.
    """
    scored = scores[~np.isnan(scores)]  # [m]
    if scored.size == 0:
        return None
    top = float(np.max(scored))
    # A computed mean can round above the max; capping it keeps "over" implying a position over, so
    # the cut always exists and moves monotonically with the threshold.
    level = top if aggregation == "max" else min(float(np.mean(scored)), top)
    if level <= threshold:
        return None
    if kind == "seed":
        return int(scores.shape[0])
    over = np.flatnonzero(scores > threshold)  # NaN compares False: never a cut point
    return int(over[0]) if over.size else 0  # over.size is 0 only on NaN levels; 0 as before


def trigger_cut(scores: Any, threshold: float, aggregation: str, kind: CutKind) -> int | None:
    """Where a scored window hands over (the rule HandoffPolicy.decide_scores applies).

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
    arr = checked_scores(scores)  # [n]
    t = finite_float("threshold", threshold)
    if aggregation not in AGGREGATIONS:
        raise ShapeError(f"aggregation: expected one of {AGGREGATIONS}, got {aggregation!r}")
    if kind not in CUT_KINDS:
        raise ShapeError(f"kind: expected one of {CUT_KINDS}, got {kind!r}")
    return cut_checked(arr, t, aggregation, kind)
