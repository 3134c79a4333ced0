"""Token sampling shared by the edge and the cloud, so that a seed means the same on both sides.

Sampling is done on the host in float64 with numpy's PCG64 generator: the same distribution and the
same seed give the same token on any machine and with either backend.

A seeded draw is keyed by (seed, position), not by how many draws came before: a draft the edge
throws away (a rollback, a window drafted while a check point was in flight) does not shift later
draws, so the edge, the cloud and every policy draw the same token at the same position from the
same distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from handoff.shared.errors import ShapeError


@dataclass(frozen=True)
class SamplingSettings:
    """How to pick the next token. temperature 0 = greedy (argmax, ties to the lower id)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ShapeError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ShapeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ShapeError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def rng_for(
        self, position: int, fallback: np.random.Generator | None = None, stream: int = 0
    ) -> np.random.Generator:
        """The generator for the draw at `position`: keyed by (seed, position) when seeded.

        Args:
            position: index of the token being drawn in the whole context (prompt included).
            fallback: the session's own generator, used unseeded (a fresh one if None).
            stream: another independent stream at the same position (0: the token draw itself;
                the verifier of a speculative draft uses 1, independent of the edge's draw).
        """
        if self.seed is None:
            return fallback if fallback is not None else np.random.default_rng()
        key = [self.seed & 0xFFFF_FFFF_FFFF_FFFF, int(position)]
        return np.random.default_rng([*key, int(stream)] if stream else key)


def sampling_distribution(logprobs: np.ndarray, settings: SamplingSettings) -> np.ndarray:
    """The distribution a token is drawn from: temperature, then top-k, then top-p (nucleus).

    Args:
        logprobs: [V] log-probabilities of the model (temperature 1).
        settings: sampling settings; must not be greedy.

    Returns:
        [V] float64 probabilities summing to 1, zero outside the kept set.
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    if lp.ndim != 1 or lp.size == 0:
        raise ShapeError(f"logprobs: expected shape [V], got {lp.shape}")
    scaled = lp / settings.temperature
    scaled -= scaled.max()
    probs = np.exp(scaled)
    order = np.argsort(-scaled, kind="stable")  # descending, ties to the lower id
    keep = len(order)
    if settings.top_k:
        keep = min(keep, settings.top_k)
    if settings.top_p < 1.0:
        cum = np.cumsum(probs[order]) / probs.sum()
        # Smallest prefix whose mass reaches top_p (the token that crosses it is kept).
        keep = min(keep, int(np.searchsorted(cum, settings.top_p, side="left")) + 1)
    mask = np.zeros_like(probs)
    mask[order[:keep]] = 1.0
    probs *= mask
    return probs / probs.sum()


def draw(logprobs: np.ndarray, settings: SamplingSettings, rng: np.random.Generator) -> tuple[int, float]:
    """Pick the next token and its log-probability under the distribution it was drawn from.

    Args:
        logprobs: [V] log-probabilities of the model (temperature 1).
        settings: sampling settings.
        rng: the session's generator (one uniform draw per non-greedy token).

    Returns:
        (token id, its log-probability under the sampling distribution; 0.0 when greedy).
    """
    lp = np.asarray(logprobs)
    if lp.ndim != 1 or lp.size == 0:
        raise ShapeError(f"logprobs: expected shape [V], got {lp.shape}")
    if settings.greedy:
        return int(np.argmax(lp)), 0.0
    probs = sampling_distribution(lp, settings)
    # Inverse-CDF with one uniform draw: one random number per token, whatever V is.
    u = rng.random()
    idx = int(np.searchsorted(np.cumsum(probs), u, side="right"))
    idx = min(idx, int(np.flatnonzero(probs)[-1]))
    return idx, float(np.log(probs[idx]))


def sample_token(logprobs: np.ndarray, settings: SamplingSettings, rng: np.random.Generator) -> int:
    """Pick the next token id from [V] log-probabilities (see draw)."""
    return draw(logprobs, settings, rng)[0]
