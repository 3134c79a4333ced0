"""`handoff router budget`: the router's operating point for an override-token budget, on validation.

A gated router has two knobs: the router's threshold (which positions P checks) and the override
gate's threshold (which of P's disagreements become override tokens). Each pair is one point of the
RPI-per-cloud-token frontier. Offline, along P's own text on held-out prompts, every pair has an
override share, a check share and the share of generations whose answer-changing disagreements are
all corrected ("kept": P's answer kept). With generations P got wrong labelled too, a P-wrong one
counts as answered when its first uncorrected disagreement is rescuing (Q's token leads P to a
passing answer). The budget's point is the one that answers the most within the budget. Only
validation prompts choose it, never test tasks.

With escalations (K, recall after), the gate also gets a per-response budget: after K corrections in
one generation its threshold rises to the one for the second recall (OverrideGate.escalate_after),
walked along each generation in order as the edge would (override.escalated_corrections).

With a turn M > 1 (`--turn`, the router's router_turn) each correction is a handoff of M tokens: the
walk skips the M - 1 positions P writes after it (override.turn_corrections), which are neither
checked, nor override tokens, nor corrections towards K, and settle any disagreement there; a point
then reports them as "other" (P's other cloud tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from handoff.edge.policy.override import escalated_corrections, turn_corrections
from handoff.edge.policy.router import RouterModel
from handoff.edge.routing.data import RouterData, gate_rows
from handoff.edge.routing.report import corrected_stats, gate_projection
from handoff.edge.routing.train import choose_threshold, recall_threshold
from handoff.shared.errors import ShapeError

__all__ = ["best_within", "operating_points"]


def operating_points(
    router: RouterModel,
    data: RouterData,
    classes: np.ndarray,
    surface: np.ndarray,
    fractions: Sequence[float],
    recalls: Sequence[float],
    escalations: Sequence[tuple[int, float]] = (),
    turn: int = 1,
) -> list[dict[str, Any]]:
    """Every (checked fraction, gate recall[, escalation]) on held-out labelled data.

    The router's threshold checks `fraction` of the positions; the gate's threshold keeps `recall` of
    the divergent disagreements, taken alone (as `router override --target-recall` sets it). Each
    escalation (K, recall_after) with recall_after <= recall adds a point whose gate, after K
    corrections in a generation, keeps only recall_after's threshold.

    Args:
        router: a router with an override gate.
        data: held-out rows with continuation labels (labels = divergent) and, when the gate reads
            them, Q's hidden states.
        classes, surface: [V] the vocabulary's token classes and surface-form ids.
        fractions: checked fractions, each in (0, 1]; recalls: gate recalls, each in (0, 1].
        escalations: (K >= 0 corrections, recall_after in (0, 1]) pairs; none: one threshold each.
        turn: cloud tokens per correction (RouterPolicy's turn), >= 1.

    Returns:
        one dict per point: fraction, recall_target, router_threshold, gate_threshold, escalate_after,
        recall_after and threshold_after (None without escalation), turn, taken (share of disagreements
        the gate takes, every position checked, no turns), and at_threshold's checked, overrides,
        recall (divergent disagreements settled), precision, reproduced ("kept"), counted on the
        corrected positions, and other (the turns' other cloud tokens).
    """
    gate = router.override
    if gate is None:
        raise ValueError("this router has no override gate (handoff router override)")
    for name, values in (("fractions", fractions), ("recalls", recalls)):
        if not values or not all(0.0 < float(v) <= 1.0 for v in values):
            raise ShapeError(f"{name}: expected shares in (0, 1], got {list(values)}")
    if not all(int(k) >= 0 and 0.0 < float(r) <= 1.0 for k, r in escalations):
        raise ShapeError(f"escalations: expected (K >= 0, recall in (0, 1]) pairs, got {list(escalations)}")
    if not data.labels.any():
        raise ShapeError("operating points need divergent disagreements (continuation labels)")
    rows, _, _ = gate_rows(data, classes, surface, gate_projection(router, gate.hidden_dims))
    probs = gate.probabilities(rows)  # [D], D = data.disagreements.sum()
    divergent = data.labels[data.disagreements]  # [D]
    scores = router.probabilities(router.rows(data.scalars, data.hidden))  # [N]
    full = np.zeros(len(scores))  # [N] the gate's probability at each disagreement
    full[data.disagreements] = probs
    checked = [(float(f), choose_threshold(scores, float(f))) for f in fractions]  # router thresholds
    points = []
    for r in recalls:
        gate_threshold = recall_threshold(probs[divergent], float(r))
        plans = [(None, None, None)] + [
            (int(k), float(ra), max(gate_threshold, recall_threshold(probs[divergent], float(ra))))
            for k, ra in escalations if float(ra) <= float(r)
        ]  # fmt: skip
        for k, r_after, t_after in plans:
            plan = (gate_threshold, k, t_after)
            every = escalated_corrections(data.disagreements, full, data.group, *plan)  # [N]
            taken = float(every[data.disagreements].mean())
            for f, threshold in checked:
                flagged = scores >= threshold
                corrected, covered = turn_corrections(
                    flagged & data.disagreements, full, data.group, *plan, turn=turn
                )  # [N], [N]
                points.append({
                    "fraction": f, "recall_target": float(r), "router_threshold": threshold,
                    "gate_threshold": gate_threshold, "escalate_after": k, "recall_after": r_after,
                    "threshold_after": t_after, "turn": turn, "taken": taken,
                    **corrected_stats(data, flagged, corrected, covered),
                })  # fmt: skip
    return points


def best_within(
    points: Sequence[dict[str, Any]], max_overrides: float, max_checked: float = 1.0, max_cloud: float = 1.0
) -> dict[str, Any] | None:
    """The point that answers the most generations with overrides <= max_overrides, checked <=
    max_checked and all cloud tokens (overrides + other: a turn's tokens) <= max_cloud ("answers":
    P's answer kept, or, on labelled P-wrong generations, rescued by Q).

    Ties go to fewer override tokens, then to fewer checks (the cheaper point), then to the higher
    divergent recall. None when no point fits.
    """
    fit = [
        p
        for p in points
        if p["overrides"] <= max_overrides
        and p["checked"] <= max_checked
        and p["overrides"] + p.get("other", 0.0) <= max_cloud
    ]
    if not fit:
        return None
    return max(fit, key=lambda p: (p["answers"], -p["overrides"], -p["checked"], p["recall"] or 0.0))
