"""The default policy ("auto"): the learned router shipped for the default pair, rollback elsewhere.

On the default pair (Qwen2.5-Coder 0.5B / 1.5B, Q4_K_M), the router with Q's hidden state and its
override gate, checks deferred behind an unanswered check, gave P's quality on 300 held-out tasks
(RPI 1.01) at 4.7 % override tokens and 19.1 % of positions checked, and, simulated at 50 ms RTT,
0.81 x the edge's tokens/s at 0.20 x P's GPU time (docs/router.md, "The override gate on Q's hidden
state"). The file (edge/routers/default_pair.json) holds that router with the threshold calibrated on
validation runs, and the vocabulary fingerprint it was trained on: another model pair, a cross-tokenizer
session or a mixture of experts falls back to the KL rollback policy, as before the router.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from importlib.resources import files
from pathlib import Path

from handoff.edge.policy.config import PolicyConfig
from handoff.edge.policy.router import RouterMismatch, load_router
from handoff.shared.vocab import Vocabulary

__all__ = ["AUTO", "auto_policy", "shipped_router"]

logger = logging.getLogger(__name__)

AUTO = "auto"  # EdgeSettings.policy's default: resolved by auto_policy once Q's vocabulary is known


def shipped_router() -> Path:
    """The router file shipped for the default model pair (package data)."""
    return Path(str(files("handoff.edge") / "routers" / "default_pair.json"))


def auto_policy(fallback: PolicyConfig, vocabulary: Vocabulary, *, plain: bool = True) -> PolicyConfig:
    """The policy "auto" stands for: the router when its file fits Q's vocabulary, else `fallback`.

    Args:
        fallback: the settings' policy (kind rollback); its other fields carry over to the router
            (top_k, lookahead_windows, ...), and its `router`, when set, replaces the shipped file.
        vocabulary: Q's vocabulary.
        plain: False for a session the router cannot drive (another tokenizer on the cloud, a mixture
            of experts): the fallback.

    Returns:
        kind "router" with the file and deferred checks, or `fallback` unchanged.
    """
    if not plain:
        return fallback
    path = fallback.router or str(shipped_router())
    try:
        load_router(path).check_vocabulary(vocabulary)
    except RouterMismatch as e:
        logger.info("policy auto: %s; using %s", e, fallback.kind)
        return fallback
    logger.info("policy auto: the learned router %s", path)
    return replace(fallback, kind="router", router=path, defer_checks=True)
