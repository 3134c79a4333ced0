"""`handoff router evaluate`'s figures: the router against single-feature gates, per suite, held out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from handoff.edge.policy.override import OverrideGate, escalated_corrections
from handoff.edge.policy.router import RouterModel
from handoff.edge.routing.data import RouterData, gate_rows, split_by_prompt
from handoff.edge.routing.metrics import BASELINE_GATES, at_threshold, auc, baseline_scores, curve
from handoff.edge.routing.train import TrainConfig, train_override, train_router

__all__ = [
    "corrected_stats",
    "evaluate_override",
    "evaluate_router",
    "gate_projection",
    "leave_one_suite_out",
    "override_leave_one_suite_out",
    "with_config",
]


def _scores(router: RouterModel, data: RouterData) -> np.ndarray:
    return router.probabilities(router.rows(data.scalars, data.hidden)) if len(data.labels) else np.zeros(0)


def evaluate_router(router: RouterModel, data: RouterData, fractions: Sequence[float]) -> dict[str, Any]:
    """The router at its threshold, and every gate's frontier (checked fraction -> recall, reproduced).

    Args:
        router: the trained router.
        data: held-out rows (test traces).
        fractions: checked fractions of the frontier, each in (0, 1).

    Returns:
        {"positions", "generations", "disagreement_rate", "router": {...}, "gates": {name: {...}},
        "by_suite": {suite: {...}}}.
    """
    scores = _scores(router, data)
    gates = {"router": scores} | {g: baseline_scores(data.scalars, g) for g in BASELINE_GATES}
    out: dict[str, Any] = {
        "positions": len(data.labels),
        "generations": len(data.generations),
        "disagreement_rate": float(data.disagreements.mean()) if len(data.labels) else None,
        "label_rate": float(data.labels.mean()) if len(data.labels) else None,
        "labels": "continuation" if any(g.divergent is not None for g in data.generations) else "argmax",
        "router": at_threshold(scores, data.labels, data.group, router.threshold, data.disagreements),
        "gates": {
            name: {
                "auc": auc(s, data.labels),
                "curve": curve(s, data.labels, data.group, fractions, data.disagreements),
            }
            for name, s in gates.items()
        },
        "by_suite": {},
    }
    suites = np.asarray([g.suite for g in data.generations])
    for suite in sorted(set(suites.tolist())):
        part = data.subset(suites == suite)
        s = _scores(router, part)
        out["by_suite"][suite] = at_threshold(
            s, part.labels, part.group, router.threshold, part.disagreements
        ) | {
            "auc": auc(s, part.labels),
            "positions": len(part.labels),
        }
    return out


def leave_one_suite_out(
    train: RouterData,
    val: RouterData | None,
    test: RouterData,
    config: TrainConfig,
    *,
    vocab_digest: str,
    vocab_size: int,
    val_every: int = 4,
) -> dict[str, Any]:
    """For each suite: train on the other suites' training rows, threshold on their validation rows
    (val's, or held-out prompts of theirs when val is None), test on the held-out suite's test rows:
    how the router does on a kind of task it never saw."""
    out: dict[str, Any] = {}

    def suites(d: RouterData) -> np.ndarray:
        return np.asarray([g.suite for g in d.generations])

    for suite in sorted(set(suites(test).tolist())):
        others = train.subset(suites(train) != suite)
        if val is None:
            fit, held = split_by_prompt(others, val_every)
        else:
            fit, held = others, val.subset(suites(val) != suite)
        router = train_router(fit, held, config, vocab_digest=vocab_digest, vocab_size=vocab_size)
        part = test.subset(suites(test) == suite)
        s = _scores(router, part)
        out[suite] = at_threshold(s, part.labels, part.group, router.threshold, part.disagreements) | {
            "auc": auc(s, part.labels)
        }
    return out


def with_config(router: RouterModel) -> TrainConfig:
    """The TrainConfig a router was trained with (from its file's meta), for retraining it elsewhere."""
    cfg = router.meta.get("train_config") or {}
    return replace(TrainConfig(), **{k: v for k, v in cfg.items() if k in TrainConfig.__dataclass_fields__})


def gate_projection(router: RouterModel, dims: int) -> Callable[[np.ndarray], np.ndarray] | None:
    """[N, d] hidden states -> [N, dims] the first `dims` of the router's projection; None for 0."""
    if dims == 0:
        return None
    if dims > router.hidden_dims:
        raise ValueError(f"the router projects {router.hidden_dims} hidden-state features, not {dims}")
    return lambda h: router.project(h, len(h), dims)


def corrected_stats(
    data: RouterData, flagged: np.ndarray, take: np.ndarray, covered: np.ndarray | None = None
) -> dict[str, Any]:
    """at_threshold's figures counted of the corrections (flagged [N] and taken [N] by the gate);
    "checked" stays the flags' share.

    With turns (covered [N]: the positions P writes after a correction, turn_corrections), a covered
    position is P's token: not checked, not an override, and a disagreement there is settled;
    "other" is their share (P's other cloud tokens, 0 without turns).

    With P-wrong generations labelled (Generation.rescuing), "reproduced" ("kept") counts the other
    generations only, "rescued" is the share of P-wrong ones whose first uncorrected disagreement is
    rescuing (Q's token there, continued by P, passes), and "answers" the share of all generations
    answered right along P's text: kept or rescued. Without them "answers" equals "reproduced".
    """
    cover = np.zeros(len(flagged), dtype=bool) if covered is None else np.asarray(covered, dtype=bool)
    corrected = flagged & take & ~cover  # [N]
    settled = corrected | cover  # [N] P's token at the position
    wrong = np.asarray([g.rescuing is not None for g in data.generations], dtype=bool)  # [G]
    right_rows = ~wrong[data.group]  # [N]
    stats = at_threshold(settled.astype(np.float64), data.labels, data.group, 0.5, data.disagreements)
    del stats["threshold"]
    stats |= {
        "checked": float((flagged & ~cover).mean()),
        "overrides": float((corrected & data.disagreements).mean()) if len(corrected) else 0.0,
        "precision": float(data.labels[corrected].mean()) if corrected.any() else None,
        "other": float(cover.mean()) if len(cover) else 0.0,
    }
    if not wrong.any():
        return {**stats, "rescued": None, "answers": stats["reproduced"]}
    missed = np.bincount(data.group[data.labels & ~settled & right_rows], minlength=len(wrong))  # [G]
    kept = int(((missed == 0) & ~wrong).sum())
    rescued = 0
    start = np.concatenate([[0], np.cumsum([len(g.tokens) for g in data.generations])])  # rows per generation
    for i in np.flatnonzero(wrong):
        g = data.generations[i]
        left = np.flatnonzero(g.disagreements & ~settled[start[i] : start[i + 1]])  # no P token, in order
        rescued += bool(len(left) and g.rescuing[left[0]])
    n_right = int((~wrong).sum())
    return {
        **stats,
        "reproduced": kept / n_right if n_right else None,
        "rescued": rescued / int(wrong.sum()),
        "answers": (kept + rescued) / len(wrong),
    }


def evaluate_override(
    router: RouterModel,
    data: RouterData,
    classes: np.ndarray,
    surface: np.ndarray,
    fractions: Sequence[float],
) -> dict[str, Any]:
    """The router's override gate on held-out traces, alone and behind the router's flags.

    A flagged disagreement becomes an override token only where the gate takes it; a labelled one
    (continuation labels: divergent) the gate declines is missed like an unflagged one.

    Args:
        router: a router with an override gate.
        data: held-out rows (with continuation labels for the recall figures).
        classes, surface: [V] the vocabulary's token classes and surface-form ids.
        fractions: checked fractions of the frontier.

    Returns:
        {"threshold", "disagreements", "auc", "taken"} of the gate alone, and "every_position" (every
        position checked), "router" (at the router's threshold) and "curve" (at each checked
        fraction), each with checked, overrides, recall, precision and reproduced as in
        metrics.at_threshold, counted on the corrected positions (flagged and taken).
    """
    gate = router.override
    if gate is None:
        raise ValueError("this router has no override gate (handoff router override)")
    rows, labels, _group = gate_rows(data, classes, surface, gate_projection(router, gate.hidden_dims))
    probs = gate.probabilities(rows) if len(rows) else np.zeros(0)
    full = np.zeros(len(data.labels))  # [N] the gate's probability at each disagreement
    full[data.disagreements] = probs

    def corrected(flagged: np.ndarray) -> np.ndarray:  # [N], an escalating gate walks each generation
        return escalated_corrections(
            flagged & data.disagreements, full, data.group, gate.threshold, gate.escalate_after,
            gate.threshold_after,
        )  # fmt: skip

    take = corrected(np.ones(len(data.labels), dtype=bool))  # [N]

    def combined(flagged: np.ndarray, target: float | None) -> dict[str, Any]:
        return {"target": target, **corrected_stats(data, flagged, corrected(flagged))}

    scores = _scores(router, data)
    return {
        "threshold": gate.threshold,
        "disagreements": len(rows),
        "auc": auc(probs, labels) if len(rows) else None,
        "taken": float(take[data.disagreements].mean()) if len(rows) else None,
        "every_position": combined(np.ones(len(data.labels), dtype=bool), 1.0),
        "router": combined(scores >= router.threshold, None),
        "curve": [
            combined(scores >= np.quantile(scores, 1.0 - f, method="higher"), float(f)) for f in fractions
        ],
    }


def override_leave_one_suite_out(
    gate: OverrideGate,
    train: RouterData,
    test: RouterData,
    classes: np.ndarray,
    surface: np.ndarray,
    *,
    val_every: int = 4,
    project: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict[str, Any]:
    """For each suite: fit the override gate (its file's target recall and penalty) on the other
    suites' labelled training disagreements, threshold it on their held-out prompts, and score it on
    the held-out suite's test disagreements: AUC, share taken, recall of the divergent ones.

    project: the gate's hidden-state columns (gate_projection), None when it reads none.
    """
    target, l2 = float(gate.meta.get("target_recall", 0.9)), float(gate.meta.get("l2", 1e-2))
    train_suites = np.asarray([g.suite for g in train.generations])
    test_suites = np.asarray([g.suite for g in test.generations])
    out: dict[str, Any] = {}
    for suite in sorted(set(test_suites.tolist())):
        fit, held = split_by_prompt(train.subset(train_suites != suite), val_every)
        x, y, _ = gate_rows(fit, classes, surface, project)
        vx, vy, _ = gate_rows(held, classes, surface, project)
        g = train_override(x, y, vx, vy, target, l2=l2, hidden_dims=gate.hidden_dims)
        tx, ty, _ = gate_rows(test.subset(test_suites == suite), classes, surface, project)
        taken = g.overrides(tx)
        out[suite] = {
            "disagreements": len(ty),
            "auc": auc(g.probabilities(tx), ty) if len(ty) else None,
            "taken": float(taken.mean()) if len(ty) else None,
            "recall": float(taken[ty].mean()) if ty.any() else None,
        }
    return out
