"""Input checks shared by the policy core's modules: a bad shape or value raises ShapeError naming it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from handoff.shared.errors import ShapeError


def int_array(name: str, x: Any, ndim: int, expected: str) -> np.ndarray:
    """x as an int64 array of non-negative token ids with ndim axes (expected: the shape, for messages)."""
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ShapeError(f"{name}: expected shape {expected}, got {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ShapeError(f"{name}: expected integer token ids of shape {expected}, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    if arr.size and arr.min() < 0:
        raise ShapeError(f"{name}: expected non-negative token ids, got {int(arr.min())}")
    return arr


def same_length(name: str, arr: np.ndarray, ref_name: str, n: int) -> None:
    if arr.shape[0] != n:
        raise ShapeError(f"{name}: expected {n} positions (as {ref_name}), got shape {arr.shape}")


def finite_float(name: str, x: Any) -> float:
    try:
        value = float(x)
    except (TypeError, ValueError) as exc:
        raise ShapeError(f"{name}: expected a real number, got {x!r}") from exc
    if not math.isfinite(value):
        raise ShapeError(f"{name}: expected a finite number, got {x!r}")
    return value


def count(name: str, x: Any) -> int:
    # bool is an int subclass; True as a token count is a bug upstream, not a 1.
    if isinstance(x, bool) or not isinstance(x, int | np.integer):
        raise ShapeError(f"{name}: expected an integer, got {x!r}")
    return int(x)


def check_kls(name: str, arr: np.ndarray) -> None:
    """KLs are >= 0 or +inf; NaN is allowed by the caller's choice (it means 'not scored')."""
    if (arr < 0.0).any():
        raise ShapeError(f"{name}: expected divergences >= 0, got a minimum of {float(np.nanmin(arr))}")
