"""Q's hidden states along traced generations, recomputed in one batched pass each (router features)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from handoff.edge.routing.data import Generation
from handoff.edge.runner import EdgeRunner

__all__ = ["hidden_states"]

logger = logging.getLogger(__name__)


def hidden_states(
    model: Path, generations: Sequence[Generation], *, threads: int = 2, batch: int = 1
) -> list[np.ndarray]:
    """Per generation, [n_i, d] float32: Q's last hidden state where each of its tokens was predicted.

    Args:
        model: Q's GGUF file (the edge model the router is for).
        generations: cloud-only generations (their prompt and P's tokens).
        threads: llama.cpp threads.
        batch: positions per decode. 1 gives exactly the states the runner sees while generating
            (one token per decode); larger batches are faster but differ on a quantized model by a
            few per cent (docs/bench_edge.md).
    """
    longest = max((len(g.prompt_ids) + len(g.tokens) for g in generations), default=0)
    out: list[np.ndarray] = []
    with EdgeRunner(model, k=1, n_ctx=max(512, longest + 8), n_threads=threads, hidden=True) as runner:
        for g in tqdm(generations, desc="Q's hidden states", unit="generation", leave=False, disable=None):
            scores = runner.score_sequence(list(g.prompt_ids), g.tokens.tolist(), batch=batch)
            out.append(np.asarray(scores.hidden, dtype=np.float32))
    logger.info("hidden states of %d generations", len(out))
    return out
