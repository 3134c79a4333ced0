"""The override gate: once P has answered a check, which of its disagreements are worth a cloud token.

An argmax disagreement (P's most likely token is not Q's) is not always a mistake: Q may write "Let's"
where P writes "To", and the answer comes out the same. Continuation labels (`handoff router label`,
edge/routing/continuations.py; R2R's divergent vs neutral, Fu et al., arXiv 2505.21600) say which
disagreements change the answer: about a third on the default pair. Neither Q's confidence (AUC 0.54)
nor P's margin (0.60) tells the two kinds apart alone; with both models' views, the classes of the two
tokens and the position, a logistic regression does (held-out AUC in docs/router.md). The gate runs
on the edge where a check's answer lands: a disagreement scored under its threshold keeps Q's token
(no override, no cloud token); the others are corrected as before.

The gate lives in the router file (RouterModel.override, `handoff router override`), so it shares the
router's vocabulary fingerprint. With `--hidden-dims R` it also reads the first R of the router's
projected hidden-state features at the position (R2R routes on the small model's last hidden state
for the same reason: it carries the context the scalar features do not): no extra decode, as the
router already projects that state for its own decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from handoff.edge.policy.features import TOKEN_CLASSES
from handoff.shared.errors import ShapeError

__all__ = [
    "OVERRIDE_FEATURES",
    "OverrideGate",
    "escalated_corrections",
    "override_features",
    "turn_corrections",
]

_DIGIT, _WORD_START, _WORD_PIECE, _SPACE, _SYMBOL = (
    TOKEN_CLASSES.index(c) for c in ("digit", "word_start", "word_piece", "whitespace", "symbol")
)

OVERRIDE_FEATURES: tuple[str, ...] = (
    "p_top1_logprob",  # P's log-probability of its own choice
    "p_margin",  # log P(P's choice) - log P(Q's token), the latter floored at P's k-th value
    "p_topk_entropy",  # -sum p log p over P's top-k
    "q_top1_logprob",
    "q_margin_to_p",  # log Q(Q's token) - log Q(P's choice), the latter floored at Q's k-th value
    "q_entropy",
    "log_offset",  # log(1 + tokens since the prompt's end)
    "q_digit",
    "p_digit",
    "both_digit",
    "both_word",  # both tokens start or continue a word
    "q_symbol",
    "p_symbol",
    "q_whitespace",
    "p_whitespace",
    "same_surface",  # the two tokens' texts are equal up to case and leading whitespace
)


def _feature_names(hidden_dims: int) -> list[str]:
    """A gate's feature names in row order: the override features, then its hidden-state columns."""
    return [*OVERRIDE_FEATURES, *(f"hidden_pc_{i}" for i in range(hidden_dims))]


def _logprob_of(ids: np.ndarray, logprobs: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """[n] log-probability of wanted[i] in row i of a top-k view, floored at the row's k-th value."""
    hit = ids == wanted[:, None]  # [n, k]
    return np.where(hit.any(axis=1), np.where(hit, logprobs, 0.0).sum(axis=1), logprobs.min(axis=1))


def override_features(
    token_ids: np.ndarray,
    q_topk_ids: np.ndarray,
    q_topk_logprobs: np.ndarray,
    q_entropy: np.ndarray,
    p_topk_ids: np.ndarray,
    p_topk_logprobs: np.ndarray,
    offsets: np.ndarray,
    classes: np.ndarray,
    surface: np.ndarray,
) -> np.ndarray:
    """The override gate's feature rows at checked positions.

    Args:
        token_ids: [n] Q's tokens.
        q_topk_ids, q_topk_logprobs: [n, k] Q's top-k view.
        q_entropy: [n] Q's entropy, nats.
        p_topk_ids, p_topk_logprobs: [n, kp] P's top-k view (the check point's answer); column 0 is
            P's choice.
        offsets: [n] tokens since the prompt's end.
        classes: [V] token classes (features.token_classes).
        surface: [V] surface-form ids (shared.concepts.surface_concepts): equal ids, equal text up to
            case and leading whitespace.

    Returns:
        [n, len(OVERRIDE_FEATURES)] float64.
    """
    tok = np.asarray(token_ids, dtype=np.int64)  # [n]
    n = tok.shape[0]
    q_ids, q_lp = np.asarray(q_topk_ids, dtype=np.int64), np.asarray(q_topk_logprobs, dtype=np.float64)
    p_ids, p_lp = np.asarray(p_topk_ids, dtype=np.int64), np.asarray(p_topk_logprobs, dtype=np.float64)
    ent, off = np.asarray(q_entropy, dtype=np.float64), np.asarray(offsets, dtype=np.float64)
    if tok.ndim != 1 or q_ids.ndim != 2 or q_ids.shape != q_lp.shape or q_ids.shape[0] != n:
        raise ShapeError(
            f"expected token_ids [n] and Q's view [n, k], got {tok.shape}, {q_ids.shape}, {q_lp.shape}"
        )
    if p_ids.ndim != 2 or p_ids.shape != p_lp.shape or p_ids.shape[0] != n or p_ids.shape[1] < 1:
        raise ShapeError(f"expected P's view [{n}, kp >= 1], got {p_ids.shape}, {p_lp.shape}")
    if ent.shape != (n,) or off.shape != (n,):
        raise ShapeError(f"expected q_entropy and offsets [{n}], got {ent.shape}, {off.shape}")
    p_choice = p_ids[:, 0]  # [n]
    cq, cp = classes[tok], classes[p_choice]  # [n]
    words = (_WORD_START, _WORD_PIECE)
    p_prob = np.exp(p_lp)
    cols = [
        p_lp[:, 0],
        p_lp[:, 0] - _logprob_of(p_ids, p_lp, tok),
        -(p_prob * p_lp).sum(axis=1),
        q_lp[:, 0],
        q_lp[:, 0] - _logprob_of(q_ids, q_lp, p_choice),
        ent,
        np.log1p(np.maximum(off, 0.0)),
        cq == _DIGIT,
        cp == _DIGIT,
        (cq == _DIGIT) & (cp == _DIGIT),
        np.isin(cq, words) & np.isin(cp, words),
        cq == _SYMBOL,
        cp == _SYMBOL,
        cq == _SPACE,
        cp == _SPACE,
        surface[tok] == surface[p_choice],
    ]
    return np.stack([np.asarray(c, dtype=np.float64) for c in cols], axis=1)  # [n, f]


def _walk_inputs(
    candidates: np.ndarray,
    probs: np.ndarray,
    group: np.ndarray,
    threshold: float,
    escalate_after: int | None,
    threshold_after: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A walk's arrays ([N] each), checked; an escalation needs a threshold_after >= threshold."""
    cand, p, grp = np.asarray(candidates, dtype=bool), np.asarray(probs, dtype=np.float64), np.asarray(group)
    if cand.ndim != 1 or p.shape != cand.shape or grp.shape != cand.shape:
        raise ShapeError(
            f"expected candidates, probs and group [N], got {cand.shape}, {p.shape}, {grp.shape}"
        )
    if escalate_after is not None and (threshold_after is None or threshold_after < threshold):
        raise ShapeError(
            f"escalation needs threshold_after >= threshold, got {threshold_after} < {threshold}"
        )
    return cand, p, grp


def escalated_corrections(
    candidates: np.ndarray,
    probs: np.ndarray,
    group: np.ndarray,
    threshold: float,
    escalate_after: int | None = None,
    threshold_after: float | None = None,
) -> np.ndarray:
    """Which candidate disagreements a gate corrects, walking each generation's positions in order.

    A candidate (a checked position where P's choice is not Q's token) is corrected when its gate
    probability is at or over `threshold` while the generation has made fewer than `escalate_after`
    corrections, and at or over `threshold_after` from then on (None: no escalation). What
    RouterPolicy.decide does one check at a time, on whole generations at once.

    Args:
        candidates: [N] bool, the checked disagreements.
        probs: [N] the gate's probabilities (read where candidates only).
        group: [N] int, the generation of each position; positions in order within a generation.
        threshold, escalate_after, threshold_after: as OverrideGate's (threshold_after >= threshold).

    Returns:
        [N] bool, the corrected positions.
    """
    cand, p, grp = _walk_inputs(candidates, probs, group, threshold, escalate_after, threshold_after)
    base = cand & (p >= threshold)  # [N]
    if escalate_after is None:
        return base
    # Stricter after K corrections, so the first K base takes are corrections and every later
    # correction is a base take too: count base takes per generation.
    starts = np.flatnonzero(np.r_[True, grp[1:] != grp[:-1]]) if len(grp) else np.zeros(0, dtype=np.int64)
    sizes = np.diff(np.r_[starts, len(grp)])  # [G'] positions per generation
    earlier = np.cumsum(base) - base  # [N] base takes before each position, all generations
    taken_before = earlier - np.repeat(earlier[starts], sizes)  # [N] ... in its own generation
    return base & ((taken_before < escalate_after) | (p >= threshold_after))


def turn_corrections(
    candidates: np.ndarray,
    probs: np.ndarray,
    group: np.ndarray,
    threshold: float,
    escalate_after: int | None = None,
    threshold_after: float | None = None,
    turn: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """escalated_corrections when each correction is a turn: P writes the next turn - 1 tokens too.

    Along P's own text a turn's tokens are P's whatever Q would have written, so a candidate inside
    a turn is neither checked nor corrected (no override token, no count towards escalate_after),
    and the turn ends at its generation's end. What RouterPolicy does with router_turn = turn and
    no early hand-back (agree_tokens 0).

    Args:
        candidates, probs, group, threshold, escalate_after, threshold_after: as
            escalated_corrections's ([N] each; positions in order within a generation).
        turn: cloud tokens per correction, >= 1 (1: escalated_corrections).

    Returns:
        corrected: [N] bool, the positions P overrides (a turn's first token);
        covered: [N] bool, the other positions of the turns (P's other cloud tokens).
    """
    if not isinstance(turn, int | np.integer) or isinstance(turn, bool) or turn < 1:
        raise ShapeError(f"turn: expected an integer >= 1, got {turn!r}")
    if turn == 1:
        corrected = escalated_corrections(
            candidates, probs, group, threshold, escalate_after, threshold_after
        )
        return corrected, np.zeros_like(corrected)
    cand, p, grp = _walk_inputs(candidates, probs, group, threshold, escalate_after, threshold_after)
    corrected, covered = np.zeros(len(cand), dtype=bool), np.zeros(len(cand), dtype=bool)
    ends = np.r_[np.flatnonzero(grp[1:] != grp[:-1]) + 1, len(grp)]  # [G'] end of each generation's rows
    end_of = np.repeat(ends, np.diff(np.r_[0, ends]))  # [N] the end of each row's generation
    base = cand & (p >= threshold)  # [N] only these can be corrected
    free_from, count, last = 0, 0, None
    for i in np.flatnonzero(base):
        if grp[i] != last:
            free_from, count, last = 0, 0, grp[i]
        if i < free_from:
            continue  # inside a turn: P writes this token
        if escalate_after is not None and count >= escalate_after and p[i] < threshold_after:
            continue
        corrected[i], count = True, count + 1
        free_from = min(i + turn, int(end_of[i]))
        covered[i + 1 : free_from] = True
    return corrected, covered


@dataclass(frozen=True)
class OverrideGate:
    """A logistic regression: override features -> probability that taking Q's token changes the answer.

    Fields (f = len(OVERRIDE_FEATURES) + hidden_dims): mean, scale [f] standardise the rows; weights
    [f], bias; threshold: a disagreement is overridden (P's token taken) when its probability is at or
    over it, chosen on validation data; hidden_dims: how many of the router's projected hidden-state
    features (RouterModel.project, first columns) follow the override features in a row, 0 for none;
    meta: how it was trained and what it scored.
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    threshold: float
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    hidden_dims: int = field(default=0, kw_only=True)
    escalate_after: int | None = field(default=None, kw_only=True)
    threshold_after: float | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if self.hidden_dims < 0:
            raise ShapeError(f"override gate: hidden_dims must be >= 0, got {self.hidden_dims}")
        if (self.escalate_after is None) != (self.threshold_after is None):
            raise ShapeError("override gate: escalate_after and threshold_after go together")
        if self.escalate_after is not None and (
            self.escalate_after < 0 or not self.threshold <= self.threshold_after <= 1.0
        ):
            raise ShapeError(
                "override gate: expected escalate_after >= 0 and threshold <= threshold_after <= 1, got "
                f"{self.escalate_after}, {self.threshold} / {self.threshold_after}"
            )
        f = self.n_features
        for name in ("mean", "scale", "weights"):
            if np.shape(getattr(self, name)) != (f,):
                raise ShapeError(f"override gate: {name} must be [{f}], got {np.shape(getattr(self, name))}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ShapeError(f"override gate: threshold must be a probability, got {self.threshold}")

    @property
    def n_features(self) -> int:
        return len(OVERRIDE_FEATURES) + self.hidden_dims

    @property
    def feature_names(self) -> list[str]:
        return _feature_names(self.hidden_dims)

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """[n, f] rows (override_features, then hidden_dims projected hidden-state columns) -> [n]
        probabilities."""
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self.n_features:
            raise ShapeError(f"rows: expected [n, {self.n_features}], got {rows.shape}")
        z = ((rows - self.mean) / self.scale) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))

    def threshold_at(self, corrections: int) -> float:
        """The threshold after this many corrections in the current generation."""
        if self.escalate_after is not None and corrections >= self.escalate_after:
            return float(self.threshold_after)  # type: ignore[arg-type]
        return self.threshold

    def overrides(self, rows: np.ndarray, corrections: int = 0) -> np.ndarray:
        """[n] bool: which of these disagreements take P's token, after `corrections` corrections in
        this generation."""
        return self.probabilities(rows) >= self.threshold_at(corrections)

    def to_json(self, pack) -> dict[str, Any]:
        """The gate as the router file's "override" object (arrays through the file's `pack`)."""
        return {
            "features": self.feature_names,
            "hidden_dims": self.hidden_dims,
            "mean": pack(self.mean),
            "scale": pack(self.scale),
            "weights": pack(self.weights),
            "bias": float(self.bias),
            "threshold": float(self.threshold),
            **(
                {}
                if self.escalate_after is None
                else {
                    "escalate_after": int(self.escalate_after),
                    "threshold_after": float(self.threshold_after),
                }
            ),
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], unpack) -> OverrideGate:
        hidden_dims = int(data.get("hidden_dims", 0))
        names = _feature_names(hidden_dims)
        if list(data.get("features", [])) != names:
            raise ShapeError(f"override gate: features {data.get('features')} are not {names}")
        return cls(
            mean=unpack(data["mean"]),
            scale=unpack(data["scale"]),
            weights=unpack(data["weights"]),
            bias=float(data["bias"]),
            threshold=float(data["threshold"]),
            hidden_dims=hidden_dims,
            escalate_after=None if data.get("escalate_after") is None else int(data["escalate_after"]),
            threshold_after=None if data.get("threshold_after") is None else float(data["threshold_after"]),
            meta=dict(data.get("meta") or {}),
        )
