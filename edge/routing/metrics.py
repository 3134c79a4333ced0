"""How well a gate picks the positions P must check, measured offline on full traces.

Along P's own greedy text (a cloud-only trace), a gate that flags every argmax disagreement of a
generation makes the gated correction policy write P's text exactly; one missed disagreement lets
Q's token stand there, and the text may (or may not) part from P's. So, at a gate threshold:

- checked: the fraction of positions sent to P (each costs P a forward and the edge a wait);
- recall: the fraction of disagreements flagged (each becomes an override token);
- reproduced: the fraction of generations whose every disagreement is flagged (their text is P's).

Gates compared: the router's score, and the single-feature baselines the policies had before (Q's
entropy, 1 - Q's top-1 probability, minus Q's margin).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from handoff.edge.policy.features import SCALAR_FEATURES
from handoff.shared.errors import ShapeError

__all__ = ["BASELINE_GATES", "at_threshold", "auc", "baseline_scores", "curve"]

BASELINE_GATES: tuple[str, ...] = ("entropy", "top1", "margin")


def baseline_scores(scalars: np.ndarray, gate: str) -> np.ndarray:
    """[N] a single-feature gate's scores (higher: check) from [N, len(SCALAR_FEATURES)] rows."""
    col = {name: i for i, name in enumerate(SCALAR_FEATURES)}
    if gate == "entropy":
        return scalars[:, col["q_entropy"]]
    if gate == "top1":
        return 1.0 - scalars[:, col["q_top1_prob"]]
    if gate == "margin":
        return -scalars[:, col["q_margin"]]
    raise ShapeError(f"gate: expected one of {BASELINE_GATES}, got {gate!r}")


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None without both labels."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ShapeError(f"auc: expected scores and labels [N], got {scores.shape}, {labels.shape}")
    pos, neg = int(labels.sum()), int((~labels).sum())
    if not pos or not neg:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def at_threshold(
    scores: np.ndarray,
    labels: np.ndarray,
    group: np.ndarray,
    threshold: float,
    disagreements: np.ndarray | None = None,
) -> dict[str, Any]:
    """Checked fraction, recall, precision, override tokens and reproduced generations for
    `scores >= threshold`.

    Args:
        scores: [N] gate scores; labels: [N] bool, the positions to flag (argmax disagreements, or
            continuation labels); group: [N] generation index per row.
        disagreements: [N] bool argmax disagreements, where a flag becomes an override token
            (default: labels). With continuation labels, "reproduced" is then the share of
            generations whose answer-changing disagreements are all flagged.
    """
    scores, labels, group = np.asarray(scores), np.asarray(labels, dtype=bool), np.asarray(group)
    dis = labels if disagreements is None else np.asarray(disagreements, dtype=bool)
    if not scores.shape == labels.shape == group.shape == dis.shape:
        raise ShapeError(
            f"expected [N] scores, labels, group and disagreements, got {scores.shape}, {labels.shape}, "
            f"{group.shape}, {dis.shape}"
        )
    flagged = scores >= threshold
    n_gen = int(group.max()) + 1 if group.size else 0
    missed = np.bincount(group[labels & ~flagged], minlength=n_gen)
    return {
        "threshold": float(threshold),
        "checked": float(flagged.mean()) if flagged.size else 0.0,
        "recall": float(flagged[labels].mean()) if labels.any() else None,
        "precision": float(labels[flagged].mean()) if flagged.any() else None,
        "overrides": float((flagged & dis).mean()) if flagged.size else 0.0,
        "reproduced": float((missed == 0).mean()) if n_gen else None,
    }


def curve(
    scores: np.ndarray,
    labels: np.ndarray,
    group: np.ndarray,
    fractions: Sequence[float],
    disagreements: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """at_threshold at the thresholds that check each fraction of these positions (the frontier)."""
    scores = np.asarray(scores, dtype=np.float64)
    out = []
    for frac in fractions:
        thr = float(np.quantile(scores, 1.0 - frac, method="higher")) if scores.size else 0.0
        out.append({"target": float(frac)} | at_threshold(scores, labels, group, thr, disagreements))
    return out
