"""KL divergence between the cloud model P and the edge model Q, from full or top-k views.

Everything is computed in float64 with plain numpy so that the edge and the cloud get the same
numbers. Inputs are checked at entry and a ShapeError names the argument, the expected shape and
the actual one.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np

from handoff.shared.errors import ShapeError

__all__ = [
    "AGGREGATIONS",
    "aggregate",
    "entropy",
    "first_over",
    "kl_divergence",
    "log_softmax",
    "log_softmax_and_entropy",
    "top_k",
    "topk_kl",
]

AGGREGATIONS: tuple[str, ...] = ("max", "mean")


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _as_float(name: str, x: Any, *, min_ndim: int = 1, expected: str = "[..., V]") -> np.ndarray:
    """Return x as a float64 array with at least min_ndim axes and a non-empty last axis."""
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise ShapeError(f"{name}: expected an array of shape {expected}, got {type(x).__name__}") from exc
    if arr.dtype.kind not in "biuf":
        raise ShapeError(f"{name}: expected a real-valued array of shape {expected}, got dtype {arr.dtype}")
    if arr.ndim < min_ndim:
        raise ShapeError(f"{name}: expected shape {expected}, got {arr.shape}")
    if min_ndim >= 1 and arr.shape[-1] < 1:
        raise ShapeError(f"{name}: expected shape {expected} with a non-empty last axis, got {arr.shape}")
    return arr.astype(np.float64, copy=False)


def _check_logprobs(name: str, arr: np.ndarray) -> None:
    """Reject NaN and +inf; -inf is a legitimate log of a zero probability."""
    if np.isnan(arr).any():
        count = int(np.isnan(arr).sum())
        raise ShapeError(f"{name}: expected log-probabilities without NaN, got {count} NaN")
    if np.isposinf(arr).any():
        raise ShapeError(f"{name}: expected log-probabilities <= 0, got +inf")


def _check_same_shape(name: str, arr: np.ndarray, ref_name: str, ref: np.ndarray) -> None:
    if arr.shape != ref.shape:
        raise ShapeError(f"{name}: expected shape {ref.shape} (same as {ref_name}), got {arr.shape}")


def _as_ids(name: str, x: Any, expected: str) -> np.ndarray:
    """Return token ids as an int64 [n, k] array; ids must be non-negative and unique per row."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ShapeError(f"{name}: expected shape {expected}, got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ShapeError(f"{name}: expected integer token ids of shape {expected}, got dtype {arr.dtype}")
    if arr.shape[1] < 1:
        raise ShapeError(f"{name}: expected shape {expected} with k >= 1, got {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ShapeError(f"{name}: expected non-negative token ids, got {int(arr.min())}")
    # Sorting each row puts duplicates next to each other.
    srt = np.sort(arr, axis=1)
    dup = srt[:, 1:] == srt[:, :-1]  # [n, k - 1]
    if dup.any():
        row = int(np.flatnonzero(dup.any(axis=1))[0])
        tok = int(srt[row, 1:][dup[row]][0])
        raise ShapeError(f"{name}: expected distinct ids in each row, got id {tok} twice in row {row}")
    return arr


def _unit_float(name: str, x: Any) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"{name}: expected a float in [0, 1], got {x!r}") from exc
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ShapeError(f"{name}: expected a float in [0, 1], got {x!r}")
    return value


def real_1d(name: str, x: Any, *, allow_nan: bool = False) -> np.ndarray:
    """x as a float64 [n] array, checked: real-valued, one-dimensional, NaN only when allow_nan."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "biuf":
        raise ShapeError(f"{name}: expected a real-valued array of shape [n], got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ShapeError(f"{name}: expected shape [n], got {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
    if not allow_nan and np.isnan(arr).any():
        raise ShapeError(f"{name}: expected values without NaN, got {int(np.isnan(arr).sum())} NaN")
    return arr


# --------------------------------------------------------------------------------------------------
# Full-vocabulary math
# --------------------------------------------------------------------------------------------------


def _log1p_sum_others(shifted: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(shifted))) for slices whose maximum is 0, as log1p of the sum without that 0.

    log(1 + s) of a rounded 1 + s keeps only ~16 - log10(1/s) digits of s; log1p(s) keeps all, which
    is what makes 1 - exp(result) (the mass left outside a set) accurate when it is tiny.
    """
    e = np.exp(shifted)
    np.put_along_axis(e, np.argmax(shifted, axis=axis, keepdims=True), 0.0, axis=axis)
    return np.log1p(np.sum(e, axis=axis, keepdims=True))


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Stable log(sum(exp(x))) along axis; all -inf (an empty set of mass) gives -inf, not NaN."""
    m = np.max(x, axis=axis, keepdims=True)
    # An all -inf slice would give -inf - -inf = NaN; shifting by 0 there is exact, and the sum of
    # the others is then 0, so the result is m = -inf.
    shifted = x - np.where(np.isfinite(m), m, 0.0)
    return np.squeeze(m + _log1p_sum_others(shifted, axis), axis=axis)


def log_softmax(logits: Any, axis: int = -1) -> np.ndarray:
    """Normalise logits into log-probabilities in float64, stably (max-shifted logsumexp).

    Args:
        logits: [..., V] finite real logits.
        axis: the vocabulary axis.

    Returns:
        [..., V] float64 log-probabilities; exp of each slice along axis sums to 1.
    """
    x = _as_float("logits", logits)
    try:
        axis = operator.index(axis)
        x.shape[axis]
    except (TypeError, IndexError) as exc:
        raise ShapeError(f"axis: expected an int in [-{x.ndim}, {x.ndim}), got {axis!r}") from exc
    if x.shape[axis] < 1:
        raise ShapeError(f"logits: expected a non-empty axis {axis}, got shape {x.shape}")
    # -inf is a masked logit (shared/constraints.py): probability 0. NaN and +inf are errors, and so
    # is a row with nothing finite (no distribution at all).
    if np.isnan(x).any() or np.isposinf(x).any() or not np.isfinite(x).any(axis=axis).all():
        raise ShapeError(
            "logits: expected finite values (or -inf for masked ids, at least one finite per row), got "
            f"{int(np.isnan(x).sum())} NaN, {int(np.isposinf(x).sum())} +inf"
        )
    # The largest entry becomes 0, so exp cannot overflow; a gap beyond the float range gives -inf,
    # which is the right log-probability (exp underflows to 0 anyway).
    with np.errstate(over="ignore"):
        shifted = x - np.max(x, axis=axis, keepdims=True)
    return shifted - _log1p_sum_others(shifted, axis)


def log_softmax_and_entropy(logits: np.ndarray) -> tuple[np.ndarray, float]:
    """Log-softmax in float64 and the entropy of the same distribution, with one exp over V.

    The log-probabilities are bit-identical to `log_softmax` (same operations:
    max-shift, then subtract log1p of the sum of the others). Calling log_softmax and then
    `entropy` would exponentiate the row twice and re-check it twice: 2.9 ms
    against 1.2 ms for V = 151,936 on the 2-core box, where a 0.5B token takes ~25 ms.
    With Z = sum exp(shifted) = 1 + s, log p = shifted - log Z and
    H = -sum p log p = log Z - sum(exp(shifted) * shifted) / Z.

    Args:
        logits: float [V] raw logits of one position.

    Returns:
        (logprobs float64 [V], entropy in nats as a float >= 0).
    """
    shifted = np.array(logits, dtype=np.float64)  # [V], a fresh array we may modify in place
    if shifted.ndim != 1 or shifted.size == 0:
        raise ShapeError(f"logits: expected shape [V], got {shifted.shape}")
    top = int(np.argmax(shifted))
    peak = shifted[top]
    if not np.isfinite(peak):
        raise ShapeError(f"logits: expected finite values, got a maximum of {peak}")
    shifted -= peak
    e = np.exp(shifted)  # [V]
    # einsum, not np.dot: on this machine np.dot of two 151k vectors goes through a threaded BLAS
    # and takes ~8 ms; einsum's plain loop takes ~0.16 ms. The peak's term is 0 * 1 either way.
    weighted = float(np.einsum("i,i->", e, shifted))
    if not np.isfinite(weighted):  # -inf or NaN logits: 0 * -inf would poison the entropy
        raise ShapeError("logits: expected finite values, got non-finite entries")
    e[top] = 0.0
    others = float(np.sum(e))
    log_z = float(np.log1p(others))
    shifted -= log_z
    ent = log_z - weighted / (1.0 + others)
    return shifted, max(ent, 0.0)


def logits_view(
    logits: Any, k: int, at_ids: Any | None = None
) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
    """One position's view from raw logits: top-k log-probabilities, entropy, log-probabilities at ids.

    The edge pays this every token, so it avoids float64 work over the vocabulary: numpy's float32
    exp is SIMD-vectorised and float64's is not (0.24 ms against 3 ms for V = 151,936 on the 2-core
    box, where a 0.5B token takes ~32 ms). Sums are accumulated in float64 (Z) or are relative
    (entropy): log-probabilities are within ~1e-7 (relative) of log_softmax's, the entropy within ~1e-6
    nats. The top-k is searched among entries within 12 nats of the peak when there are at least k
    of them (then the exact top-k is among them), else over the whole row.

    Args:
        logits: [V] raw logits (float32 as llama.cpp returns them, or float64).
        k: entries to return, 1 <= k <= V; ordered by descending value, ties to the lower id.
        at_ids: [m] ids whose log-probabilities are wanted too, or None.

    Returns:
        (ids int32 [k], logprobs float64 [k], entropy in nats >= 0, logprobs at at_ids float64 [m]).
    """
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0 or x.dtype.kind != "f":
        raise ShapeError(f"logits: expected a float array of shape [V], got {x.dtype} {x.shape}")
    x = x.astype(np.float32, copy=False)
    try:
        k = operator.index(k)
    except TypeError as exc:
        raise ShapeError(f"k: expected an int in [1, {x.size}], got {k!r}") from exc
    if not 1 <= k <= x.size:
        raise ShapeError(f"k: expected 1 <= k <= V = {x.size}, got {k}")
    peak = x[int(np.argmax(x))]
    if not np.isfinite(peak):
        raise ShapeError(f"logits: expected finite values, got a maximum of {peak}")
    shifted = x - peak  # float32 [V], <= 0
    e = np.exp(shifted)  # float32 [V]
    z = float(e.sum(dtype=np.float64))
    weighted = float(np.einsum("i,i->", e, shifted))  # relative error ~1e-7 is plenty for an entropy
    if np.isnan(weighted) and not np.isnan(x).any():
        # Masked ids (-inf, shared/constraints.py) give 0 * -inf; their term is 0. Only constrained rows pay this.
        weighted = float(np.einsum("i,i->", e, np.maximum(shifted, np.float32(-1e30))))
    if not np.isfinite(weighted) or np.isnan(z):
        raise ShapeError("logits: expected finite values, got non-finite entries")
    log_z = math.log(z)
    ent = max(log_z - weighted / z, 0.0)
    cand = np.flatnonzero(shifted >= -12.0)  # [c]
    if cand.size >= k:
        ids, vals = top_k(shifted[cand], k)
        ids = cand[ids].astype(np.int32)
    else:  # a peaked row, or one masked by a constraint (top_k searches those among finite entries)
        ids, vals = top_k(shifted, k)
    at = np.empty(0)
    if at_ids is not None:
        a = np.asarray(at_ids)
        if a.ndim != 1 or (a.size and (a.dtype.kind not in "iu" or a.min() < 0 or a.max() >= x.size)):
            raise ShapeError(
                f"at_ids: expected integer ids in [0, {x.size}) of shape [m], got {a.dtype} {a.shape}"
            )
        at = shifted[a].astype(np.float64) - log_z
    return ids, vals.astype(np.float64) - log_z, ent, at


def top_k(logprobs: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest entries of the last axis, by descending value, ties broken by lower id.

    Args:
        logprobs: [..., V] real values (log-probabilities or logits); NaN is rejected.
        k: how many to keep, 1 <= k <= V.

    Returns:
        (ids, values): ids int32 [..., k] and values [..., k] (float64, or the input's float dtype).
    """
    x = np.asarray(logprobs)
    if x.dtype.kind not in "biuf":
        raise ShapeError(f"logprobs: expected a real-valued array of shape [..., V], got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ShapeError(f"logprobs: expected shape [..., V] with V >= 1, got {x.shape}")
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    if np.isnan(x).any():
        raise ShapeError(f"logprobs: expected values without NaN, got {int(np.isnan(x).sum())} NaN")
    vocab = x.shape[-1]
    try:
        k = operator.index(k)
    except TypeError as exc:
        raise ShapeError(f"k: expected an int in [1, {vocab}], got {k!r}") from exc
    if not 1 <= k <= vocab:
        raise ShapeError(f"k: expected 1 <= k <= V = {vocab}, got {k}")

    lead = x.shape[:-1]
    flat = x.reshape(-1, vocab)  # [rows, V]
    finite = np.count_nonzero(flat > -np.inf, axis=-1)  # [rows]
    if k < vocab and (finite < vocab).any():
        # Rows masked by a constraint (-inf at most ids): the top-k is searched among the finite
        # entries, then the lowest -inf ids if there are fewer than k. Partitioning a row of ~V equal
        # -inf values is slow (3-9 ms at V = 151,936 against ~1 ms) and its ties need the exact redo.
        ids = np.empty((flat.shape[0], k), dtype=np.int32)
        for r in range(flat.shape[0]):
            if finite[r] == vocab:  # an unmasked row beside masked ones
                ids[r] = top_k(flat[r], k)[0]
                continue
            fin = np.flatnonzero(flat[r] > -np.inf)
            if fin.size > k:
                fin = fin[top_k(flat[r, fin], k)[0]]
            else:
                fin = fin[np.argsort(-flat[r, fin], kind="stable")]
                fin = np.concatenate([fin, np.flatnonzero(flat[r] == -np.inf)[: k - fin.size]])
            ids[r] = fin
        vals = np.take_along_axis(flat, ids.astype(np.int64), axis=-1)
        return ids.reshape((*lead, k)), vals.reshape((*lead, k))
    if k == vocab:
        cand = np.broadcast_to(np.arange(vocab), flat.shape).copy()  # [rows, k]
    else:
        # argpartition is O(V), a full sort of 151936 entries is not; positions >= V - k hold the top k.
        cand = np.argpartition(flat, vocab - k, axis=-1)[:, vocab - k :]  # [rows, k]
        # argpartition picks arbitrarily among entries equal to the k-th value; where such ties
        # straddle the boundary, redo that row exactly so that the lowest ids win.
        cand_vals = np.take_along_axis(flat, cand, axis=-1)  # [rows, k]
        kth = cand_vals.min(axis=-1, keepdims=True)  # [rows, 1]
        n_eq_cand = (cand_vals == kth).sum(axis=-1)
        n_eq_all = (flat == kth).sum(axis=-1)
        for r in np.flatnonzero(n_eq_all > n_eq_cand):
            above = np.flatnonzero(flat[r] > kth[r])
            equal = np.flatnonzero(flat[r] == kth[r])[: k - above.size]
            cand[r] = np.concatenate([above, equal])
    cand = np.sort(cand, axis=-1)  # ascending ids, so a stable sort by value breaks ties by id
    vals = np.take_along_axis(flat, cand, axis=-1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    ids = np.take_along_axis(cand, order, axis=-1).astype(np.int32)
    vals = np.take_along_axis(vals, order, axis=-1)
    return ids.reshape((*lead, k)), vals.reshape((*lead, k))


def _kl_terms(p_lp: np.ndarray, q_lp: np.ndarray) -> np.ndarray:
    """Elementwise p * (log p - log q) with 0 * log(0 / q) = 0 and p * log(p / 0) = +inf."""
    with np.errstate(invalid="ignore", over="ignore"):
        terms = np.exp(p_lp) * (p_lp - q_lp)
    # p = 0: the term is 0 whatever q is (this also covers -inf - -inf = NaN).
    terms = np.where(np.isneginf(p_lp), 0.0, terms)
    # q = 0 < p: the formula already gives +inf; stated explicitly so it never depends on rounding.
    return np.where(np.isneginf(q_lp) & ~np.isneginf(p_lp), np.inf, terms)


def kl_divergence(p_logprobs: Any, q_logprobs: Any) -> np.ndarray:
    """Full-vocabulary KL(P || Q) in nats along the last axis.

    Terms with p = 0 contribute 0; q = 0 where p > 0 gives +inf. The result is clipped at 0 because
    rounding can make the KL of (nearly) equal distributions come out as -1e-17.

    Args:
        p_logprobs: [..., V] log-probabilities of P (-inf allowed, NaN not).
        q_logprobs: [..., V] log-probabilities of Q, same shape.

    Returns:
        [...] float64, >= 0, possibly +inf.
    """
    p = _as_float("p_logprobs", p_logprobs)
    q = _as_float("q_logprobs", q_logprobs)
    _check_same_shape("q_logprobs", q, "p_logprobs", p)
    _check_logprobs("p_logprobs", p)
    _check_logprobs("q_logprobs", q)
    return np.maximum(np.sum(_kl_terms(p, q), axis=-1), 0.0)


def entropy(logprobs: Any) -> np.ndarray:
    """Shannon entropy in nats along the last axis; -inf entries (p = 0) contribute 0.

    Args:
        logprobs: [..., V] log-probabilities (-inf allowed, NaN not).

    Returns:
        [...] float64, clipped at 0 (rounding of a one-hot slice must not give -0.0 or -1e-17).
    """
    lp = _as_float("logprobs", logprobs)
    _check_logprobs("logprobs", lp)
    # exp(-inf) = 0 already; replacing the -inf factor avoids 0 * -inf = NaN.
    terms = -np.exp(lp) * np.where(np.isneginf(lp), 0.0, lp)
    return np.maximum(np.sum(terms, axis=-1), 0.0)


# --------------------------------------------------------------------------------------------------
# KL from top-k views
# --------------------------------------------------------------------------------------------------


def topk_kl(
    p_ids: Any,
    p_logprobs: Any,
    q_ids: Any,
    q_logprobs: Any,
    p_logprobs_at_q_ids: Any | None = None,
    q_logprobs_at_p_ids: Any | None = None,
    rest_floor: float = 1e-12,
    rest_margin: float = 1e-8,
    concept_of: Any | None = None,
) -> np.ndarray:
    """Coarse-grained KL(P || Q) per position from top-k views; a lower bound of the full KL.

    Per row, S is the set of ids where both probabilities are known: P's ids that are also Q's,
    plus Q's ids when p_logprobs_at_q_ids is given, plus P's ids when q_logprobs_at_p_ids is given.
    Each id in S is its own bucket and one "rest" bucket holds the remaining mass of each side,
    rest_p = 1 - sum_S p and rest_q = 1 - sum_S q (computed as -expm1(logsumexp), clipped at 0):

        KL = sum_{i in S} p_i (log p_i - log q_i)
             + rest_p (log rest_p - log max(rest_q + rest_margin, rest_floor))

    with 0 log 0 = 0, and the total clipped at 0.

    Lower bound: the buckets partition the vocabulary, and merging outcomes never increases KL
    (log-sum inequality: sum_j p_j log(p_j / q_j) >= (sum_j p_j) log(sum_j p_j / sum_j q_j), i.e. the
    data-processing inequality for the map id -> bucket). Raising rest_q (margin, floor) only lowers
    the value, because KL decreases in each q, so the result is <= the full-vocabulary KL(P || Q)
    whenever the views are exact log-probabilities of P and Q. A threshold on this value is therefore
    a threshold that the true KL exceeds too. The estimate gets tighter as S grows, and equals the
    full KL when S is the whole vocabulary (up to rounding: the rest then holds ~1e-16 of P's mass).

    Why the margin: rest_q is 1 minus a sum close to 1 of float64 values, so it is known only to
    about 1e-15 absolute (the views themselves sum to 1 only that well). When rest_q is tiny, log rest_q
    turns that into a large error (1e-15 / 1e-12 is 0.1 %), which can put the estimate ABOVE the full
    KL. Using rest_q + rest_margin, the top of its uncertainty with ample headroom, keeps the bound
    under rounding and caps the rounding error of the rest term at about rest_p * 1e-15 / rest_margin
    (1e-7 nats). The value given up is rest_p * log(1 + rest_margin / rest_q), which matters only when
    Q puts less than ~1e-7 outside S while P does not, where the KL is large either way (with P's
    rest 0.3 against Q's 1e-9, the rest term reads 5.1 instead of 5.9 nats). Views rounded from
    float32 are known only to ~1e-7: pass a rest_margin of ~1e-5 for them.

    Where an id's value is known twice on one side (P's top-k and p_logprobs_at_q_ids, or Q's top-k
    and q_logprobs_at_p_ids), the model's own top-k value is used.

    Over concepts (concept_of given: a concept id per token id, handoff.shared.concepts): the ids of
    S that share a concept form one bucket instead of one each, so " The" and "the" stop counting as
    a disagreement when both are in S. The buckets {S ∩ c} and the rest still partition the
    vocabulary, and they merge the token buckets above, so by the same inequality

        concept KL <= top-k KL <= full KL(P || Q).

    It is not a bound on the KL between the two models' complete concept distributions, which top-k
    views cannot give (a concept's ids outside S are in the rest bucket).

    Args:
        p_ids: [n, kp] integer ids of P's top-k, distinct within a row.
        p_logprobs: [n, kp] P's log-probabilities at p_ids.
        q_ids: [n, kq] integer ids of Q's top-k, distinct within a row.
        q_logprobs: [n, kq] Q's log-probabilities at q_ids.
        p_logprobs_at_q_ids: [n, kq] P's log-probabilities at q_ids (sent by the cloud), or None.
        q_logprobs_at_p_ids: [n, kp] Q's log-probabilities at p_ids, or None.
        rest_floor: the smallest rest_q used in the log, in [0, 1]; > 0 keeps the result finite when
            Q's known ids hold all of Q's mass but not all of P's (only binds if above rest_margin).
        rest_margin: added to rest_q before flooring, in [0, 1]; see above. 0 gives the plain formula
            with max(rest_q, rest_floor), which can exceed the full KL by rounding.
        concept_of: [V] integer concept id of every token id (V > every id in the views), or None:
            one bucket per id.

    Returns:
        [n] float64 KL estimates in nats, >= 0, +inf where a known q is 0 and its p is not.
    """
    # Shapes and values, checked at entry.
    p_ids_a = _as_ids("p_ids", p_ids, "[n, kp]")  # [n, kp]
    n, kp = p_ids_a.shape
    q_ids_a = _as_ids("q_ids", q_ids, "[n, kq]")  # [n, kq]
    if q_ids_a.shape[0] != n:
        raise ShapeError(f"q_ids: expected shape [{n}, kq] (n from p_ids), got {q_ids_a.shape}")
    kq = q_ids_a.shape[1]

    def values(name: str, x: Any, shape: tuple[int, int], what: str) -> np.ndarray:
        arr = _as_float(name, x, min_ndim=0, expected=f"[n, {what}] = {list(shape)}")
        if arr.shape != shape:
            raise ShapeError(f"{name}: expected shape [n, {what}] = {list(shape)}, got {arr.shape}")
        _check_logprobs(name, arr)
        return arr

    p_lp = values("p_logprobs", p_logprobs, (n, kp), "kp")  # [n, kp]
    q_lp = values("q_logprobs", q_logprobs, (n, kq), "kq")  # [n, kq]
    p_at_q = None
    if p_logprobs_at_q_ids is not None:
        p_at_q = values("p_logprobs_at_q_ids", p_logprobs_at_q_ids, (n, kq), "kq")  # [n, kq]
    q_at_p = None
    if q_logprobs_at_p_ids is not None:
        q_at_p = values("q_logprobs_at_p_ids", q_logprobs_at_p_ids, (n, kp), "kp")  # [n, kp]
    floor = _unit_float("rest_floor", rest_floor)
    margin = _unit_float("rest_margin", rest_margin)

    # Which of Q's ids each of P's ids matches (k is ~20, so the [n, kp, kq] compare is cheap).
    eq = p_ids_a[:, :, None] == q_ids_a[:, None, :]  # [n, kp, kq]
    p_in_q = eq.any(axis=2)  # [n, kp]
    q_in_p = eq.any(axis=1)  # [n, kq]
    match = eq.argmax(axis=2)  # [n, kp] column in Q's view, meaningful where p_in_q

    # Part 1: P's ids. p from P's top-k; q from Q's top-k where Q has the id (its own value wins),
    # else from q_logprobs_at_p_ids when given.
    q_for_p = np.take_along_axis(q_lp, match, axis=1)  # [n, kp]
    if q_at_p is not None:
        q_for_p = np.where(p_in_q, q_for_p, q_at_p)
        p_side_known = np.ones_like(p_in_q)
    else:
        p_side_known = p_in_q
    # Part 2: Q's ids that P's top-k lacks (the rest were counted in part 1); known only through
    # p_logprobs_at_q_ids.
    if p_at_q is not None:
        q_side_known = ~q_in_p  # [n, kq]
        p_for_q = p_at_q
    else:
        q_side_known = np.zeros_like(q_in_p)
        p_for_q = np.full_like(q_lp, -np.inf)

    # The set S, laid out as [n, kp + kq] with unknown slots masked to p = q = 0 (log -inf) so that
    # they add nothing to the terms or to the sums.
    known = np.concatenate([p_side_known, q_side_known], axis=1)  # [n, kp + kq]
    p_s = np.where(known, np.concatenate([p_lp, p_for_q], axis=1), -np.inf)  # [n, kp + kq]
    q_s = np.where(known, np.concatenate([q_for_p, q_lp], axis=1), -np.inf)  # [n, kp + kq]

    if concept_of is not None:
        p_s, q_s = _merge_by_concept(p_s, q_s, np.concatenate([p_ids_a, q_ids_a], axis=1), concept_of)
    inside = np.sum(_kl_terms(p_s, q_s), axis=1)  # [n]

    # 1 - sum(p) loses everything below 1e-16 when sum(p) ~ 1; -expm1(logsumexp) keeps it.
    rest_p = np.maximum(-np.expm1(_logsumexp(p_s, axis=1)), 0.0)  # [n]
    rest_q = np.maximum(-np.expm1(_logsumexp(q_s, axis=1)), 0.0)  # [n]
    with np.errstate(divide="ignore", invalid="ignore"):
        rest = rest_p * (np.log(rest_p) - np.log(np.maximum(rest_q + margin, floor)))
    rest = np.where(rest_p > 0.0, rest, 0.0)  # 0 log 0 = 0
    return np.maximum(inside + rest, 0.0)


def _merge_by_concept(
    p_s: np.ndarray, q_s: np.ndarray, slot_ids: np.ndarray, concept_of: Any
) -> tuple[np.ndarray, np.ndarray]:
    """S's log-masses summed per concept: [n, m] arrays with each concept's mass in one slot, -inf elsewhere.

    Args:
        p_s, q_s: [n, m] log-probabilities of S's slots (-inf where a slot is not in S).
        slot_ids: [n, m] the token id of each slot.
        concept_of: [V] concept id of each token id.
    """
    concepts = np.asarray(concept_of)
    if concepts.ndim != 1 or concepts.dtype.kind not in "iu":
        raise ShapeError(
            f"concept_of: expected integer concept ids of shape [V], got {concepts.shape} {concepts.dtype}"
        )
    if slot_ids.size and int(slot_ids.max()) >= concepts.shape[0]:
        raise ShapeError(
            f"concept_of: has {concepts.shape[0]} entries; the views hold id {int(slot_ids.max())}"
        )
    groups = concepts[slot_ids]  # [n, m]
    out_p = np.full_like(p_s, -np.inf)
    out_q = np.full_like(q_s, -np.inf)
    for r in range(p_s.shape[0]):  # n is a window (~8-16 rows): a loop is clearer than a segmented sum
        uniq, inverse = np.unique(groups[r], return_inverse=True)
        for out, src in ((out_p, p_s), (out_q, q_s)):
            merged = np.full(uniq.shape[0], -np.inf)
            np.logaddexp.at(merged, inverse, src[r])
            out[r, : uniq.shape[0]] = merged
    return out_p, out_q


# --------------------------------------------------------------------------------------------------
# Windows of per-position values
# --------------------------------------------------------------------------------------------------


def aggregate(values: Any, how: str) -> float:
    """Reduce per-position divergences of a window to one number.

    Args:
        values: [n] real values, n >= 1, no NaN (+inf allowed: a KL can be infinite).
        how: one of AGGREGATIONS ("max" or "mean").

    Returns:
        The max or the mean of values, as a float.
    """
    arr = real_1d("values", values)
    if how not in AGGREGATIONS:
        raise ShapeError(f"how: expected one of {AGGREGATIONS}, got {how!r}")
    if arr.size == 0:
        raise ShapeError("values: expected shape [n] with n >= 1, got (0,)")
    return float(np.max(arr)) if how == "max" else float(np.mean(arr))


def first_over(values: Any, threshold: float) -> int | None:
    """Index of the first value strictly greater than threshold.

    Args:
        values: [n] real values (n may be 0), no NaN.
        threshold: a real number, not NaN.

    Returns:
        The smallest i with values[i] > threshold, or None if there is none.
    """
    arr = real_1d("values", values)
    try:
        t = float(threshold)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"threshold: expected a real number, got {threshold!r}") from exc
    if np.isnan(t):
        raise ShapeError("threshold: expected a real number, got nan")
    over = np.flatnonzero(arr > t)
    return int(over[0]) if over.size else None
