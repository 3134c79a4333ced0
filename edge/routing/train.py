"""Fit the edge router: a logistic regression (or a small MLP) on Q's features, in numpy.

The hidden state is reduced to its first principal directions on the training rows; the features
are standardised; the gate threshold is the validation scores' quantile that checks the target
fraction of positions (never chosen on test data).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from handoff.edge.policy.features import SCALAR_FEATURES
from handoff.edge.policy.override import OverrideGate
from handoff.edge.policy.router import RouterModel
from handoff.edge.routing.data import RouterData
from handoff.shared.errors import ShapeError

__all__ = [
    "TrainConfig",
    "choose_threshold",
    "fit_logistic",
    "fit_mlp",
    "pca",
    "train_override",
    "train_router",
]


@dataclass(frozen=True)
class TrainConfig:
    """How the router is fitted.

    model: "logistic" or "mlp" (one hidden ReLU layer of mlp_width).
    hidden_dims: principal directions of Q's hidden state used as features (0: none).
    l2: L2 penalty on the weights (standardised features).
    target_checked: the fraction of validation positions the threshold sends to P.
    """

    model: Literal["logistic", "mlp"] = "logistic"
    hidden_dims: int = 16
    l2: float = 1e-2
    mlp_width: int = 32
    mlp_epochs: int = 400
    target_checked: float = 0.15
    seed: int = 0
    # Only these scalar features (SCALAR_FEATURES names); () = all. A one-feature router is the
    # single-signal gate (e.g. Q's entropy) with a threshold chosen the same way: a baseline.
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.model not in ("logistic", "mlp"):
            raise ShapeError(f"model: expected logistic or mlp, got {self.model!r}")
        if not 0.0 < self.target_checked < 1.0:
            raise ShapeError(f"target_checked: expected a fraction in (0, 1), got {self.target_checked}")
        unknown = [f for f in self.only if f not in SCALAR_FEATURES]
        if unknown:
            raise ShapeError(f"only: unknown features {unknown}; choose from {SCALAR_FEATURES}")
        if self.hidden_dims < 0 or self.mlp_width < 1 or self.mlp_epochs < 1 or self.l2 < 0:
            raise ShapeError("hidden_dims >= 0, mlp_width >= 1, mlp_epochs >= 1 and l2 >= 0 expected")


def pca(h: np.ndarray, r: int, *, max_rows: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The mean and the first r principal directions of rows h.

    Args:
        h: [N, d] hidden states.
        r: directions, 1 <= r <= d.

    Returns:
        mean [d], proj [d, r] (orthonormal columns, scaled by 1/singular value * sqrt(N) so that the
        projected features have unit variance).
    """
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 2 or not 1 <= r <= h.shape[1] or h.shape[0] < 2:
        raise ShapeError(f"pca: expected [N >= 2, d >= r] rows with r >= 1, got {h.shape} and r={r}")
    rows = h
    if h.shape[0] > max_rows:  # the directions of a random subset are as good and far cheaper
        rows = h[np.random.default_rng(seed).choice(h.shape[0], max_rows, replace=False)]
    mean = rows.mean(axis=0)
    _, s, vt = np.linalg.svd(rows - mean, full_matrices=False)
    scale = np.sqrt(rows.shape[0] - 1) / np.maximum(s[:r], 1e-12)
    return mean, vt[:r].T * scale


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float, *, iterations: int = 50
) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method (IRLS).

    Args:
        x: [N, f] standardised features.
        y: [N] 0/1 labels.
        l2: penalty on w (not on the bias), per row: the loss is mean log-loss + l2/2 |w|^2.

    Returns:
        w [f], b.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ShapeError(f"fit_logistic: expected x [N, f] and y [N], got {x.shape}, {y.shape}")
    n, f = x.shape
    xb = np.concatenate([x, np.ones((n, 1))], axis=1)  # [N, f + 1]
    theta = np.zeros(f + 1)
    reg = np.full(f + 1, l2)
    reg[-1] = 0.0
    for _ in range(iterations):
        p = _sigmoid(xb @ theta)
        grad = xb.T @ (p - y) / n + reg * theta
        hess = (xb * (p * (1 - p))[:, None]).T @ xb / n + np.diag(reg + 1e-9)
        delta = np.linalg.solve(hess, grad)
        theta -= delta
        if np.max(np.abs(delta)) < 1e-8:
            break
    return theta[:-1], float(theta[-1])


def fit_mlp(
    x: np.ndarray, y: np.ndarray, width: int, epochs: int, l2: float, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """A one-hidden-layer ReLU MLP on the log-loss, full-batch Adam.

    Args:
        x: [N, f] standardised features; y: [N] 0/1 labels.

    Returns:
        ((W1 [f, width], b1 [width]), (W2 [width, 1], b2 [1])).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n, f = x.shape
    params = [
        rng.normal(0, np.sqrt(2 / f), (f, width)),
        np.zeros(width),
        rng.normal(0, np.sqrt(1 / width), (width, 1)),
        np.zeros(1),
    ]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    lr, b1, b2 = 1e-2, 0.9, 0.999
    for t in range(1, epochs + 1):
        w1, c1, w2, c2 = params
        a = x @ w1 + c1  # [N, width]
        hdn = np.maximum(a, 0.0)
        p = _sigmoid((hdn @ w2 + c2)[:, 0])  # [N]
        d_out = ((p - y) / n)[:, None]  # [N, 1]
        d_hdn = (d_out @ w2.T) * (a > 0)
        grads = [x.T @ d_hdn + l2 * w1, d_hdn.sum(axis=0), hdn.T @ d_out + l2 * w2, d_out.sum(axis=0)]
        for i, g in enumerate(grads):
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            params[i] = params[i] - lr * (m[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + 1e-8)
    return (params[0], params[1]), (params[2], params[3])


def choose_threshold(scores: np.ndarray, target_checked: float) -> float:
    """The probability at or over which about target_checked of these (validation) scores lie."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1 or scores.size == 0:
        raise ShapeError(f"scores: expected a non-empty [N], got {scores.shape}")
    return float(np.quantile(scores, 1.0 - target_checked, method="higher"))


def recall_threshold(positives: np.ndarray, target_recall: float) -> float:
    """The gate probability at or over which target_recall of these [N] positives' scores lie."""
    return float(np.quantile(np.asarray(positives, dtype=np.float64), 1.0 - target_recall, method="lower"))


def train_router(
    train: RouterData,
    val: RouterData,
    config: TrainConfig,
    *,
    vocab_digest: str,
    vocab_size: int,
    meta: dict[str, Any] | None = None,
) -> RouterModel:
    """Fit a router on train, choose its threshold on val.

    Args:
        train, val: feature rows and labels (with hidden states when config.hidden_dims > 0).
        config: the fit.
        vocab_digest, vocab_size: the pair's vocabulary fingerprint, recorded in the router.
        meta: recorded in the router file as is (data, commands).
    """
    if not train.labels.any() or train.labels.all():
        raise ShapeError("training data needs both labels (positions where the models agree and differ)")
    hidden_mean = hidden_proj = None
    x_train, x_val = train.scalars, val.scalars
    if config.hidden_dims:
        if train.hidden is None or val.hidden is None:
            raise ShapeError("hidden_dims > 0 needs Q's hidden states in the training and validation data")
        hidden_mean, hidden_proj = pca(train.hidden, config.hidden_dims, seed=config.seed)
        x_train = np.concatenate([x_train, (train.hidden - hidden_mean) @ hidden_proj], axis=1)
        x_val = np.concatenate([x_val, (val.hidden - hidden_mean) @ hidden_proj], axis=1)
    mean = x_train.mean(axis=0)
    scale = np.where(x_train.std(axis=0) > 1e-9, x_train.std(axis=0), 1.0)
    used = np.ones(x_train.shape[1], dtype=bool)  # [f] the columns the fit sees; the others weigh 0
    if config.only:
        used[:] = False
        used[[SCALAR_FEATURES.index(f) for f in config.only]] = True
    z = ((x_train - mean) / scale)[:, used]
    y = train.labels.astype(np.float64)
    if config.model == "logistic":
        w, b = fit_logistic(z, y, config.l2)
        layers: tuple[tuple[np.ndarray, np.ndarray], ...] = ((w[:, None], np.asarray([b])),)
    else:
        layers = fit_mlp(z, y, config.mlp_width, config.mlp_epochs, config.l2, config.seed)
    first_w = np.zeros((x_train.shape[1], layers[0][0].shape[1]))
    first_w[used] = layers[0][0]
    layers = ((first_w, layers[0][1]), *layers[1:])
    draft = RouterModel(mean, scale, layers, 0.5, vocab_digest, vocab_size, hidden_mean, hidden_proj)
    threshold = choose_threshold(draft.probabilities(x_val), config.target_checked)
    return RouterModel(
        mean, scale, layers, threshold, vocab_digest, vocab_size, hidden_mean, hidden_proj,
        meta={"train_config": asdict(config), **(meta or {})},
    )  # fmt: skip


def train_override(
    rows: np.ndarray,
    labels: np.ndarray,
    val_rows: np.ndarray,
    val_labels: np.ndarray,
    target_recall: float,
    *,
    l2: float = 1e-2,
    hidden_dims: int = 0,
    meta: dict[str, Any] | None = None,
) -> OverrideGate:
    """Fit the override gate (logistic) on disagreements; its threshold keeps target_recall of the
    validation disagreements that change the answer.

    Args:
        rows, val_rows: [N, f] override_features rows of argmax disagreements (training, validation).
        labels, val_labels: [N] bool, divergent (continuation labels).
        target_recall: share of the validation's divergent disagreements the gate must still override.
        hidden_dims: how many of the rows' last columns are the router's projected hidden state
            (data.gate_rows); the rest are override_features.
    """
    rows, val_rows = np.asarray(rows, dtype=np.float64), np.asarray(val_rows, dtype=np.float64)
    labels, val_labels = np.asarray(labels, dtype=bool), np.asarray(val_labels, dtype=bool)
    if rows.ndim != 2 or labels.shape != (rows.shape[0],) or val_labels.shape != (val_rows.shape[0],):
        raise ShapeError(f"expected rows [N, f] and labels [N], got {rows.shape}, {labels.shape}")
    if not labels.any() or labels.all() or not val_labels.any():
        raise ShapeError("the override gate needs divergent and neutral training disagreements, "
                         "and divergent validation ones")  # fmt: skip
    if not 0.0 < target_recall <= 1.0:
        raise ShapeError(f"target_recall: expected a fraction in (0, 1], got {target_recall}")
    mean = rows.mean(axis=0)
    scale = np.where(rows.std(axis=0) > 1e-9, rows.std(axis=0), 1.0)
    w, b = fit_logistic((rows - mean) / scale, labels.astype(np.float64), l2)
    draft = OverrideGate(mean, scale, w, b, 0.0, hidden_dims=hidden_dims)
    threshold = recall_threshold(draft.probabilities(val_rows)[val_labels], target_recall)
    return OverrideGate(
        mean,
        scale,
        w,
        b,
        threshold,
        {"target_recall": target_recall, **(meta or {})},
        hidden_dims=hidden_dims,
    )
