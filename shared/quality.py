"""Quality figures of a hybrid run against its small-only and large-only baselines.

Pure functions on per-task outcome arrays: relative performance improvement (RPI) with a paired
bootstrap interval, accuracy with a Wilson score interval, and the oracle handoff positions of a
greedy run. Inputs are checked at entry; a ShapeError names the argument, the expected shape and
the actual one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from handoff.shared.errors import ShapeError

__all__ = ["BootstrapCI", "accuracy_ci", "bootstrap_rpi", "cluster_rpi", "oracle_positions", "rpi"]


@dataclass(frozen=True)
class BootstrapCI:
    """A paired-bootstrap estimate of RPI and its percentile interval.

    estimate is the RPI of the full sample (None when small and large tie on it); low/high are the
    interval bounds, None when more than half of the resamples (or the full sample) are undefined.
    undefined_fraction is the share of resamples dropped because their denominator was 0.
    n_clusters: how many clusters the resamples drew (tasks sharing a prompt are one cluster;
    None: every task its own, the tasks taken as independent).
    """

    estimate: float | None
    low: float | None
    high: float | None
    undefined_fraction: float
    n_resamples: int
    n_clusters: int | None = None


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _as_outcomes(name: str, x: Any) -> np.ndarray:
    """Return per-task outcomes as an int64 [n_tasks] array of 0/1; bool, int or float 0/1 accepted."""
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ShapeError(f"{name}: expected a [n_tasks] array of 0/1, got {type(x).__name__}") from exc
    if arr.ndim != 1:
        raise ShapeError(f"{name}: expected shape [n_tasks], got {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ShapeError(f"{name}: expected bool or 0/1 outcomes of shape [n_tasks], got dtype {arr.dtype}")
    if arr.shape[0] < 1:
        raise ShapeError(f"{name}: expected at least one task, got shape {arr.shape}")
    if arr.dtype.kind != "b" and not np.isin(arr, (0, 1)).all():
        bad = arr[~np.isin(arr, (0, 1))][0]
        raise ShapeError(f"{name}: expected outcomes 0/1 or bool, got {bad!r}")
    return arr.astype(np.int64)


def _as_paired(small: Any, large: Any, hybrid: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check three outcome arrays of the same tasks in the same order: all [n_tasks]."""
    s = _as_outcomes("small", small)  # [n_tasks]
    lg = _as_outcomes("large", large)  # [n_tasks]
    h = _as_outcomes("hybrid", hybrid)  # [n_tasks]
    for name, arr in (("large", lg), ("hybrid", h)):
        if arr.shape != s.shape:
            raise ShapeError(f"{name}: expected shape {s.shape} (same tasks as small), got {arr.shape}")
    return s, lg, h


def _as_clusters(clusters: Any, n_tasks: int) -> tuple[np.ndarray, int]:
    """Cluster labels [n_tasks] (any hashable values) -> (int64 ids 0..C-1 [n_tasks], C)."""
    labels = list(clusters)
    if len(labels) != n_tasks:
        raise ShapeError(f"clusters: expected shape [{n_tasks}] (one label per task), got [{len(labels)}]")
    index: dict[Any, int] = {}
    ids = np.asarray([index.setdefault(c, len(index)) for c in labels], dtype=np.int64)  # [n_tasks]
    return ids, len(index)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence: expected a level in (0, 1), got {confidence}")


def _as_ids(name: str, x: Any) -> np.ndarray:
    """Return token ids as an int64 [n] array."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ShapeError(f"{name}: expected shape [n], got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ShapeError(f"{name}: expected integer token ids of shape [n], got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------------
# RPI
# --------------------------------------------------------------------------------------------------


def rpi(small: Any, large: Any, hybrid: Any) -> float | None:
    """Relative performance improvement of a hybrid run over the small model, scaled by the large one.

    RPI = (acc_hybrid − acc_small) / (acc_large − acc_small): 0 is the small model's accuracy, 1 the
    large model's. This is the figure the original KL-threshold switching method reports, plotted
    against the threshold, for a small and a large model on auto-checked reasoning tasks (the
    project's design notes: "relative performance improvement"). It can be negative (the hybrid does
    worse than the small model) or above 1, and the denominator may be negative (small beats large).

    Args:
        small: per-task outcomes of the small-only run, bool or 0/1, shape [n_tasks].
        large: the large-only run on the same tasks in the same order, [n_tasks].
        hybrid: the hybrid run on the same tasks in the same order, [n_tasks].

    Returns:
        RPI, or None when acc_large == acc_small (undefined: the tasks do not separate the models).
    """
    s, lg, h = _as_paired(small, large, hybrid)
    # Same n for all three: the ratio of accuracies is the ratio of integer counts, which makes the
    # tie test exact instead of a float comparison.
    denominator = int(lg.sum()) - int(s.sum())
    if denominator == 0:
        return None
    return (int(h.sum()) - int(s.sum())) / denominator


def bootstrap_rpi(
    small: Any,
    large: Any,
    hybrid: Any,
    *,
    clusters: Any | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> BootstrapCI:
    """RPI with a paired-bootstrap percentile interval.

    Each resample draws n_tasks task indices with replacement and applies the same indices to all
    three arrays, so that the correlation between the runs (they answer the same tasks) is kept.
    With clusters, it draws whole clusters instead (a cluster bootstrap): tasks that share a prompt
    share one greedy generation per run, so they are not independent samples of a policy's
    behaviour, and drawing them one by one makes the interval too narrow.
    Resamples whose small and large accuracies tie have no RPI; they are dropped and counted in
    undefined_fraction. All resamples are drawn and reduced at once with numpy.

    Args:
        small: per-task outcomes of the small-only run, bool or 0/1, shape [n_tasks].
        large: the large-only run on the same tasks in the same order, [n_tasks].
        hybrid: the hybrid run on the same tasks in the same order, [n_tasks].
        clusters: [n_tasks] a label per task (equal labels: one cluster, e.g. the prompt's digest);
            None: each task alone (the same draws as before clusters existed).
        n_resamples: bootstrap resamples, >= 1.
        confidence: two-sided level of the percentile interval, in (0, 1).
        seed: seed of the numpy Generator; the same seed gives the same interval.

    Returns:
        A BootstrapCI. low/high are None when more than half of the resamples are undefined, or when
        the full-sample estimate itself is undefined (an interval around a ratio whose denominator
        straddles 0 would be meaningless).
    """
    s, lg, h = _as_paired(small, large, hybrid)
    if n_resamples < 1:
        raise ValueError(f"n_resamples: expected >= 1, got {n_resamples}")
    _check_confidence(confidence)
    estimate = rpi(s, lg, h)
    n_tasks = s.shape[0]

    rng = np.random.default_rng(seed)
    stacked = np.stack([s, lg, h])  # [3, n_tasks]
    n_clusters = None
    if clusters is not None:
        ids, n_clusters = _as_clusters(clusters, n_tasks)
        stacked = np.stack([np.bincount(ids, weights=x, minlength=n_clusters) for x in stacked])  # [3, C]
    n_units = stacked.shape[1]
    idx = rng.integers(0, n_units, size=(n_resamples, n_units))  # [n_resamples, n_units]
    counts = stacked[:, idx].sum(axis=2)  # [3, n_resamples]: correct answers per resample
    numerator = counts[2] - counts[0]  # [n_resamples]
    denominator = counts[1] - counts[0]  # [n_resamples]
    defined = denominator != 0  # [n_resamples]
    undefined_fraction = float(1.0 - defined.mean())

    if estimate is None or undefined_fraction > 0.5:
        return BootstrapCI(estimate, None, None, undefined_fraction, n_resamples, n_clusters)
    values = numerator[defined] / denominator[defined]  # [n_defined]
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [alpha, 1.0 - alpha])
    return BootstrapCI(estimate, float(low), float(high), undefined_fraction, n_resamples, n_clusters)


def cluster_rpi(small: Any, large: Any, hybrid: Any, clusters: Any) -> float | None:
    """RPI with each cluster (e.g. each distinct prompt) counted once, at its tasks' mean outcome.

    Where several tasks share a prompt (a suite that checks one prompt's answer against several
    unit tests), a greedy run writes one text for all of them, and per task that one generation
    counts as many times as the prompt repeats. Counted per cluster, it counts once.

    Args:
        small, large, hybrid: [n_tasks] outcomes of the same tasks, as rpi's.
        clusters: [n_tasks] a label per task.

    Returns:
        RPI over cluster means, or None when small and large tie on them.
    """
    s, lg, h = _as_paired(small, large, hybrid)
    ids, c = _as_clusters(clusters, s.shape[0])
    size = np.bincount(ids, minlength=c)  # [C]
    mean = np.stack([np.bincount(ids, weights=x, minlength=c) / size for x in (s, lg, h)]).sum(axis=1)  # [3]
    denominator = float(mean[1] - mean[0])
    if abs(denominator) < 1e-12:
        return None
    return float((mean[2] - mean[0]) / denominator)


# --------------------------------------------------------------------------------------------------
# Accuracy
# --------------------------------------------------------------------------------------------------


def accuracy_ci(correct: Any, *, confidence: float = 0.95) -> tuple[float, float, float]:
    """Accuracy with a Wilson score interval.

    The Wilson interval keeps its coverage near the nominal level for the small task counts and the
    accuracies near 0 or 1 an evaluation sees, where the normal (Wald) interval collapses to a point.

    Args:
        correct: per-task outcomes, bool or 0/1, shape [n_tasks].
        confidence: two-sided level, in (0, 1).

    Returns:
        (accuracy, low, high), all in [0, 1].
    """
    c = _as_outcomes("correct", correct)  # [n_tasks]
    _check_confidence(confidence)
    n = c.shape[0]
    p = float(c.sum()) / n
    z = NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)
    z2 = z * z
    scale = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / scale
    half = (z / scale) * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    # Clip rounding (0/n gives a lower bound of ~1e-17, not 0).
    return p, max(0.0, center - half), min(1.0, center + half)


# --------------------------------------------------------------------------------------------------
# Oracle
# --------------------------------------------------------------------------------------------------


def oracle_positions(token_ids: Any, q_top1_ids: Any) -> np.ndarray:
    """Positions the cloud must produce for greedy hybrid generation to reproduce P's greedy text.

    Input is a "full" trace of a cloud-only greedy run: P's tokens along its own text and, at every
    one of those positions, Q's argmax token given the same prefix. Hybrid generation with both
    models greedy follows P's text as long as every token so far is P's, so at each position the
    prefix is P's own and the edge would emit exactly q_top1_ids[i]. Where that equals P's token the
    edge can produce it; where it differs the cloud must, or the text leaves P's. Every returned
    position is therefore necessary and together they suffice: the set is the minimum, a lower bound
    of the cloud share of any handoff policy that reproduces P's text (an oracle policy that knows
    where Q's greedy choice is wrong and hands over for exactly those tokens).

    Args:
        token_ids: P's greedy tokens along its text, integer [n].
        q_top1_ids: Q's argmax at the same positions, integer [n].

    Returns:
        The indices where the two differ, int64 [n_differ], ascending.
    """
    p_ids = _as_ids("token_ids", token_ids)  # [n]
    q_ids = _as_ids("q_top1_ids", q_top1_ids)  # [n]
    if q_ids.shape != p_ids.shape:
        raise ShapeError(f"q_top1_ids: expected shape {p_ids.shape} (same as token_ids), got {q_ids.shape}")
    return np.flatnonzero(p_ids != q_ids).astype(np.int64)
