"""The learned router's features: what the edge knows of a position before the cloud says anything.

Pure functions on arrays. One row per position t of a generation (t counted from the prompt's end):

- Q's top-`TOPK_FEATURES` log-probabilities (descending), Q's entropy, the margin between its two
  most likely tokens, its top-1 probability;
- the class of Q's chosen token (digit, word start, word piece, whitespace, symbol, special);
- log(1 + t), and the previous position's entropy and top-1 probability (a position after an
  uncertain one is more often a disagreement);
- optionally Q's last hidden state, projected on a few principal directions (the projection is
  learned with the router and stored in its file).

Cf. R2R (Fu et al., arXiv 2505.21600): a router on the small model's top logits, token and hidden
state; CITER (arXiv 2502.01976) and Co-LLM (arXiv 2403.03870) route on the small model's state too.
"""

from __future__ import annotations

import numpy as np

from handoff.shared.errors import ShapeError

__all__ = [
    "SCALAR_FEATURES",
    "TOKEN_CLASSES",
    "TOPK_FEATURES",
    "scalar_features",
    "token_classes",
]

TOPK_FEATURES = 8
TOKEN_CLASSES: tuple[str, ...] = ("digit", "word_start", "word_piece", "whitespace", "symbol", "special")
SCALAR_FEATURES: tuple[str, ...] = (
    *(f"q_logprob_{i}" for i in range(TOPK_FEATURES)),
    "q_entropy",
    "q_margin",
    "q_top1_prob",
    *(f"class_{c}" for c in TOKEN_CLASSES),
    "log_position",
    "prev_entropy",
    "prev_top1_prob",
)

# GPT-2 byte-level BPE (Qwen, Llama 3, ...) writes a space as U+0120, a newline as U+010A, a tab as U+0109.
_BYTE_LEVEL = str.maketrans({"\u0120": " ", "\u010a": "\n", "\u0109": "\t", "\u2581": " "})


def _token_class(token: bytes) -> int:
    text = token.decode("utf-8", errors="replace").translate(_BYTE_LEVEL)
    if len(text) > 2 and text.startswith("<") and text.endswith(">"):
        return TOKEN_CLASSES.index("special")
    stripped = text.strip()
    if not stripped:
        return TOKEN_CLASSES.index("whitespace")
    if any(c.isdigit() for c in stripped):
        return TOKEN_CLASSES.index("digit")
    if stripped[0].isalpha() or stripped[0] == "_":
        return TOKEN_CLASSES.index("word_start" if text[0].isspace() else "word_piece")
    return TOKEN_CLASSES.index("symbol")


def token_classes(tokens: tuple[bytes, ...] | list[bytes]) -> np.ndarray:
    """The class of every token of a vocabulary (an index into TOKEN_CLASSES).

    Args:
        tokens: [V] token strings by id (shared.vocab.Vocabulary.tokens).

    Returns:
        int8 [V].
    """
    return np.fromiter((_token_class(t) for t in tokens), dtype=np.int8, count=len(tokens))


def scalar_features(
    topk_logprobs: np.ndarray,
    entropy: np.ndarray,
    token_class: np.ndarray,
    position: np.ndarray,
    prev_entropy: np.ndarray,
    prev_top1_logprob: np.ndarray,
) -> np.ndarray:
    """The router's features without the hidden state, one row per position.

    Args:
        topk_logprobs: [n, k] Q's top-k log-probabilities, descending, k >= 2 (k < TOPK_FEATURES is
            padded with the last value).
        entropy: [n] Q's entropy (nats).
        token_class: [n] the class of Q's chosen token (token_classes()).
        position: [n] tokens since the prompt's end (>= 0).
        prev_entropy: [n] the previous position's entropy (0 at the first).
        prev_top1_logprob: [n] the previous position's top-1 log-probability (0 at the first).

    Returns:
        float64 [n, len(SCALAR_FEATURES)].
    """
    lp = np.asarray(topk_logprobs, dtype=np.float64)
    if lp.ndim != 2 or lp.shape[1] < 2:
        raise ShapeError(f"topk_logprobs: expected [n, k >= 2], got shape {lp.shape}")
    n = lp.shape[0]
    cols = {
        "entropy": np.asarray(entropy, dtype=np.float64),
        "token_class": np.asarray(token_class),
        "position": np.asarray(position, dtype=np.float64),
        "prev_entropy": np.asarray(prev_entropy, dtype=np.float64),
        "prev_top1_logprob": np.asarray(prev_top1_logprob, dtype=np.float64),
    }
    for name, col in cols.items():
        if col.shape != (n,):
            raise ShapeError(f"{name}: expected shape ({n},), got {col.shape}")
    if n and (cols["token_class"].min() < 0 or cols["token_class"].max() >= len(TOKEN_CLASSES)):
        raise ShapeError(f"token_class: expected classes in [0, {len(TOKEN_CLASSES)})")
    lp = np.maximum(lp, -30.0)  # -inf (a masked token) would poison a linear model
    top = lp[:, :TOPK_FEATURES]  # [n, <=8]
    if top.shape[1] < TOPK_FEATURES:
        top = np.concatenate([top, np.repeat(top[:, -1:], TOPK_FEATURES - top.shape[1], axis=1)], axis=1)
    onehot = np.zeros((n, len(TOKEN_CLASSES)))
    onehot[np.arange(n), cols["token_class"].astype(np.int64)] = 1.0
    return np.column_stack(
        [
            top,  # [n, 8]
            cols["entropy"],
            lp[:, 0] - lp[:, 1],
            np.exp(lp[:, 0]),
            onehot,  # [n, 6]
            np.log1p(np.maximum(cols["position"], 0.0)),
            cols["prev_entropy"],
            np.exp(np.maximum(cols["prev_top1_logprob"], -30.0)),
        ]
    )
