"""The learned edge router: a small model on Q's own view that says which positions P must check.

RouterModel is the file `handoff router train` writes (JSON): the feature standardisation, an optional
projection of Q's hidden state, a logistic regression or a small MLP, the gate threshold chosen on
validation data, and the model pair's vocabulary fingerprint (a router refuses another vocabulary).
Inference is plain numpy. RouterPolicy is the "router" policy kind: a gated correction policy (see
edge/gated.py): positions whose score is under the threshold are committed at once, unchecked by
design; the others wait for P's check and are corrected where P's choice differs.

After R2R (Fu et al., "R2R: Efficiently Navigating Divergent Reasoning Paths with Small-Large Model
Token Routing", arXiv 2505.21600): the router decides from the small model's state alone, before the
large model is consulted; here P checks the flagged positions instead of always generating them.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from handoff.edge.policy.core import CorrectionPolicy, HandoffPolicy, WindowDecision, register_policy
from handoff.edge.policy.features import SCALAR_FEATURES, scalar_features, token_classes
from handoff.edge.policy.override import OverrideGate, override_features
from handoff.shared.errors import HandoffError, ShapeError

if TYPE_CHECKING:
    from handoff.edge.policy.config import PolicyConfig
    from handoff.edge.policy.triggers import TokenScorer, WindowView
    from handoff.shared.vocab import Vocabulary

__all__ = ["ROUTER_VERSION", "RouterMismatch", "RouterModel", "RouterPolicy", "load_router"]

ROUTER_VERSION = 1


class RouterMismatch(HandoffError):
    """A router file made for another model pair (another vocabulary), or of an unknown format."""


def _pack(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "f32": base64.b64encode(a.tobytes()).decode("ascii")}


def _unpack(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(d["f32"]), dtype="<f4").reshape(d["shape"]).astype(np.float64)


@dataclass(frozen=True)
class RouterModel:
    """A trained router: features -> probability that P's choice differs from Q's at a position.

    Fields (d = Q's hidden size, r = projected dims, f = len(SCALAR_FEATURES) + r):
        mean, scale: [f] standardisation of the feature rows.
        layers: [(W [in, out], b [out]), ...]; one layer: logistic regression; more: an MLP with ReLU
            between layers; the last layer has out = 1 (a logit).
        threshold: probability at or above which a position is checked (chosen on validation data).
        hidden_mean: [d], hidden_proj: [d, r]: the hidden state's projection; None without it.
        vocab_digest, vocab_size: the pair's vocabulary fingerprint (shared.vocab).
        meta: how it was trained and what it scored (free-form, written by the trainer).
        override: the override gate, applied where a check's answer disagrees with Q; None: every
            disagreement is corrected.
        turn: cloud tokens at a gated correction that the thresholds were chosen for (PolicyConfig.
            router_turn, which replaces it when set); 1: the correction alone.
    """

    mean: np.ndarray
    scale: np.ndarray
    layers: tuple[tuple[np.ndarray, np.ndarray], ...]
    threshold: float
    vocab_digest: str
    vocab_size: int
    hidden_mean: np.ndarray | None = None
    hidden_proj: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    override: OverrideGate | None = None  # which of P's disagreements to take (edge/policy/override.py)
    turn: int = 1

    def __post_init__(self) -> None:
        f = self.n_features
        if self.mean.shape != (f,) or self.scale.shape != (f,):
            raise ShapeError(
                f"router: mean and scale must be [{f}], got {self.mean.shape}, {self.scale.shape}"
            )
        if not self.layers:
            raise ShapeError("router: no layers")
        width = f
        for i, (w, b) in enumerate(self.layers):
            if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
                raise ShapeError(
                    f"router layer {i}: expected W [{width}, out] and b [out], got {w.shape}, {b.shape}"
                )
            width = w.shape[1]
        if width != 1:
            raise ShapeError(f"router: the last layer must have one output, got {width}")
        if (self.hidden_mean is None) != (self.hidden_proj is None):
            raise ShapeError("router: hidden_mean and hidden_proj go together")
        if self.hidden_proj is not None and self.hidden_mean is not None:
            if self.hidden_proj.ndim != 2 or self.hidden_mean.shape != (self.hidden_proj.shape[0],):
                raise ShapeError(
                    f"router: hidden_proj [d, r] and hidden_mean [d], got {self.hidden_proj.shape}, "
                    f"{self.hidden_mean.shape}"
                )
        if not 0.0 <= self.threshold <= 1.0:
            raise ShapeError(f"router: threshold must be a probability, got {self.threshold}")
        if not _is_turn(self.turn):
            raise ShapeError(f"router: turn must be an integer >= 1, got {self.turn!r}")
        if self.override is not None and self.override.hidden_dims > self.hidden_dims:
            raise ShapeError(
                f"router: the override gate reads {self.override.hidden_dims} projected hidden-state "
                f"features, the router projects {self.hidden_dims}"
            )

    @property
    def hidden_dims(self) -> int:
        """r: projected hidden-state features (0: the router does not use the hidden state)."""
        return 0 if self.hidden_proj is None else int(self.hidden_proj.shape[1])

    @property
    def hidden_size(self) -> int | None:
        """d: the hidden size it expects, None without the hidden state."""
        return None if self.hidden_proj is None else int(self.hidden_proj.shape[0])

    @property
    def n_features(self) -> int:
        return len(SCALAR_FEATURES) + self.hidden_dims

    def rows(self, scalars: np.ndarray, hidden: np.ndarray | None) -> np.ndarray:
        """Feature rows: the scalar features, then the projected hidden state.

        Args:
            scalars: [n, len(SCALAR_FEATURES)] (features.scalar_features).
            hidden: [n, d] Q's last hidden states; required when the router uses them, else ignored.

        Returns:
            [n, f].
        """
        scalars = np.asarray(scalars, dtype=np.float64)
        if scalars.ndim != 2 or scalars.shape[1] != len(SCALAR_FEATURES):
            raise ShapeError(f"scalars: expected [n, {len(SCALAR_FEATURES)}], got {scalars.shape}")
        if self.hidden_proj is None:
            return scalars
        if hidden is None:
            raise ShapeError(
                "this router uses Q's hidden state: the runner must return it (EdgeRunner hidden)"
            )
        return np.concatenate([scalars, self.project(hidden, scalars.shape[0])], axis=1)

    def project(self, hidden: np.ndarray, n: int, dims: int | None = None) -> np.ndarray:
        """[n, d] Q's last hidden states -> [n, dims] their first `dims` (default all r) principal
        directions of the router's projection (the override gate reads the first ones)."""
        if self.hidden_proj is None or self.hidden_mean is None:
            raise ShapeError("this router does not use Q's hidden state")
        h = np.asarray(hidden, dtype=np.float64)
        if h.shape != (n, self.hidden_size):
            raise ShapeError(f"hidden: expected [{n}, {self.hidden_size}], got {h.shape}")
        return (h - self.hidden_mean) @ self.hidden_proj[:, :dims]

    def logits(self, rows: np.ndarray) -> np.ndarray:
        """[n, f] feature rows -> [n] logits."""
        x = (np.asarray(rows, dtype=np.float64) - self.mean) / self.scale
        for i, (w, b) in enumerate(self.layers):
            x = x @ w + b
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        return x[:, 0]

    def probabilities(self, rows: np.ndarray) -> np.ndarray:
        """[n, f] feature rows -> [n] probability that the position needs P."""
        return 1.0 / (1.0 + np.exp(-np.clip(self.logits(rows), -60.0, 60.0)))

    def check_vocabulary(self, vocabulary: Vocabulary) -> None:
        """Refuse a vocabulary other than the one the router was trained on (RouterMismatch)."""
        fp = vocabulary.fingerprint
        if fp.digest.hex() != self.vocab_digest or fp.vocab_size != self.vocab_size:
            raise RouterMismatch(
                f"the router was trained for vocabulary {self.vocab_digest[:16]} ({self.vocab_size} tokens); "
                f"the edge model's is {fp.short} ({fp.vocab_size} tokens): train one for this model pair "
                "(handoff router train)"
            )

    # -- the file ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "handoff-router",
            "version": ROUTER_VERSION,
            "features": [*SCALAR_FEATURES, *(f"hidden_pc_{i}" for i in range(self.hidden_dims))],
            "vocab_digest": self.vocab_digest,
            "vocab_size": self.vocab_size,
            "threshold": self.threshold,
            "mean": _pack(self.mean),
            "scale": _pack(self.scale),
            "layers": [{"w": _pack(w), "b": _pack(b)} for w, b in self.layers],
            "hidden_mean": None if self.hidden_mean is None else _pack(self.hidden_mean),
            "hidden_proj": None if self.hidden_proj is None else _pack(self.hidden_proj),
            "meta": self.meta,
            **({} if self.override is None else {"override": self.override.to_json(_pack)}),
            **({} if self.turn == 1 else {"turn": self.turn}),
        }

    def save(self, path: Path | str) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RouterModel:
        if not isinstance(data, dict) or data.get("format") != "handoff-router":
            raise RouterMismatch("not a handoff router file")
        if data.get("version") != ROUTER_VERSION:
            raise RouterMismatch(
                f"router file version {data.get('version')}, this edge reads {ROUTER_VERSION}"
            )
        if data.get("features", [])[: len(SCALAR_FEATURES)] != list(SCALAR_FEATURES):
            raise RouterMismatch("the router was trained on other features than this edge computes")
        hm, hp = data.get("hidden_mean"), data.get("hidden_proj")
        return cls(
            mean=_unpack(data["mean"]),
            scale=_unpack(data["scale"]),
            layers=tuple((_unpack(layer["w"]), _unpack(layer["b"])) for layer in data["layers"]),
            threshold=float(data["threshold"]),
            vocab_digest=str(data["vocab_digest"]),
            vocab_size=int(data["vocab_size"]),
            hidden_mean=None if hm is None else _unpack(hm),
            hidden_proj=None if hp is None else _unpack(hp),
            meta=dict(data.get("meta") or {}),
            override=None if data.get("override") is None else _override(data["override"]),
            turn=_turn(data.get("turn", 1)),
        )


def _is_turn(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _turn(value: Any) -> int:
    if not _is_turn(value):
        raise RouterMismatch(f"the router file's turn must be an integer >= 1, got {value!r}")
    return value


def _override(data: dict[str, Any]) -> OverrideGate:
    try:
        return OverrideGate.from_json(data, _unpack)
    except ShapeError as e:
        raise RouterMismatch(f"the router file's override gate: {e}") from None


@cache
def _load(path: str, mtime_ns: int) -> RouterModel:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RouterMismatch(f"cannot read the router file {path}: {e}") from None
    return RouterModel.from_json(data)


def load_router(path: Path | str) -> RouterModel:
    """The router in a file (cached while the file is unchanged)."""
    p = Path(path).expanduser().resolve()
    try:
        mtime = p.stat().st_mtime_ns
    except OSError as e:
        raise RouterMismatch(f"cannot read the router file {p}: {e}") from None
    return _load(str(p), mtime)


@cache
def _classes(vocabulary: Vocabulary) -> np.ndarray:
    return token_classes(vocabulary.tokens)


@cache
def _surface(vocabulary: Vocabulary) -> np.ndarray:
    from handoff.shared.concepts import surface_concepts

    return surface_concepts(vocabulary).concept_of


@register_policy("router")
class RouterPolicy(CorrectionPolicy):
    """Gated correction: a learned router on Q's view picks the positions P checks (edge/gated.py).

    Unflagged positions are committed and streamed at once (unchecked by design; P still receives
    them). A flagged position waits for P's check point of that one position and is corrected where
    P's most likely token differs from Q's (CorrectionPolicy.decide), one cloud token; with
    config.router_turn M > 1, P writes on from there for up to M tokens (a handoff, as Co-LLM's
    deferral lets the large model write until it hands back: Shen et al., arXiv 2403.03870).

    Args:
        config: config.router is the router file (required); config.gate_threshold, when set,
            replaces the file's threshold (a probability), and config.router_turn the file's turn.
    """

    round: ClassVar = "gated"

    def __init__(self, config: PolicyConfig, *, scorer: TokenScorer | None = None) -> None:
        super().__init__(config, scorer=scorer)
        if not config.router:
            raise ShapeError("the router policy needs a router file (--router PATH; handoff router train)")
        self.model = load_router(config.router)
        self.gate_threshold = self.model.threshold if config.gate_threshold is None else config.gate_threshold
        self._classes: np.ndarray | None = None
        self._surface: np.ndarray | None = None
        # (offset, entropy, top-1 log-probability) of the last gated steps, in order: a step gated
        # again at an offset (redrafted after a correction) reads its true predecessor, not the drafts
        # the correction dropped.
        self._history: list[tuple[int, float, float]] = []
        self._corrections = 0  # this generation's corrections (an escalating gate reads it)

    @property
    def needs_hidden(self) -> bool:
        """The runner must return Q's hidden state with each step."""
        return self.model.hidden_proj is not None

    def attach(self, vocabulary: Vocabulary) -> None:
        """Check the router against the edge's vocabulary; learn its token classes."""
        super().attach(vocabulary)
        self.model.check_vocabulary(vocabulary)
        self._classes = _classes(vocabulary)
        if self.model.override is not None:
            self._surface = _surface(vocabulary)

    def begin(self) -> None:
        self._history = []
        self._corrections = 0

    def gate(self, step: Any, offset: int) -> float:
        """The router's probability that P must check this edge step; also advances its history.

        The previous-position features are the last gated step's before `offset` (gating at an offset
        again forgets the steps gated at or after it).

        Args:
            step: an EdgeStep (topk_logprobs [k], entropy, token_id, hidden [d] or None).
            offset: tokens since the prompt's end at the step's position.

        Returns:
            The probability in [0, 1]; the position is checked when checks() says so.
        """
        if self._classes is None:
            raise ShapeError("RouterPolicy.attach(vocabulary) must be called before gating")
        while self._history and self._history[-1][0] >= offset:
            self._history.pop()
        prev = self._history[-1][1:] if self._history else (0.0, 0.0)
        scalars = scalar_features(
            np.asarray(step.topk_logprobs)[None, :],
            np.asarray([step.entropy]),
            self._classes[[step.token_id]],
            np.asarray([offset]),
            np.asarray([prev[0]]),
            np.asarray([prev[1]]),
        )  # [1, f]
        hidden = getattr(step, "hidden", None)
        rows = self.model.rows(scalars, None if hidden is None else np.asarray(hidden)[None, :])
        self._history.append((offset, float(step.entropy), float(step.topk_logprobs[0])))
        del self._history[:-64]  # drafts ahead are few: older steps are never read again
        return float(self.model.probabilities(rows)[0])

    def turn_tokens(self) -> int:
        """Cloud tokens at a gated correction, at most (1: the correction alone).

        config.router_turn when set, else the file's turn: the thresholds in a file were chosen for
        its turn, so `--router FILE` alone runs the operating point the file was calibrated at.
        """
        return self.model.turn if self.config.router_turn is None else self.config.router_turn

    def agrees(self, kl: float) -> bool:
        """A turn longer than the correction hands back as a handoff's does (KL <= tau, agree_tokens)."""
        return HandoffPolicy.agrees(self, kl)

    def checks(self, score: float) -> bool:
        """A position is sent to P when its router score is at or over the gate threshold."""
        return score >= self.gate_threshold

    def decide(self, view: WindowView) -> WindowDecision:
        """Correct the first disagreement with P's argmax that the override gate takes (all of them
        without a gate); the others keep Q's token. An escalating gate (OverrideGate.escalate_after)
        reads how many corrections this generation has made.

        Args:
            view: the answered window, with P's top-k and the positions' offsets.

        Returns:
            Kept up to the first disagreement the gate takes, handed over there; kept whole when it
            takes none.
        """
        gate = self.model.override
        if gate is None:
            return super().decide(view)
        if view.p_topk_ids is None or view.p_topk_logprobs is None or view.offsets is None:
            raise ShapeError("the override gate needs P's top-k answer and the offsets (WindowView)")
        if self._classes is None or self._surface is None:
            raise ShapeError("RouterPolicy.attach(vocabulary) must be called before deciding")
        differs = view.p_topk_ids[:, 0] != view.token_ids  # [n]
        if not differs.any():
            return WindowDecision(view.n, False)
        rows = override_features(
            view.token_ids, view.q_topk_ids, view.q_topk_logprobs, view.q_entropy, view.p_topk_ids,
            view.p_topk_logprobs, view.offsets, self._classes, self._surface,
        )  # fmt: skip  # [n, f]
        if gate.hidden_dims:
            if view.q_hidden is None:
                raise ShapeError("this override gate reads Q's hidden state: the window must carry it")
            rows = np.concatenate(
                [rows, self.model.project(view.q_hidden, view.n, gate.hidden_dims)], axis=1
            )  # [n, f + r]
        take = np.flatnonzero(differs & gate.overrides(rows, self._corrections))  # [m] ascending
        if not take.size:
            return WindowDecision(view.n, False)
        self._corrections += 1  # settled windows come in order, and a correction drops what follows
        return WindowDecision(int(take[0]), True)
