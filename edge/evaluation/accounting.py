"""The cloud's share of a run, each part on its own, from its result rows (GenerationResult.accounting).

Per run (and suite): override tokens (P's token replaced Q's), other cloud tokens (handoff runs, seed
and bonus tokens), checked positions (edge positions P scored), round trips, bytes each way, and the
cloud's compute seconds — as fractions of the output tokens, per task, per token and per 1,000 tokens.

Rows recorded before a field existed lack it: a figure that needs it is None ("unknown"), never a
guess. Override and other cloud tokens are known on every row (they are `corrected_tokens` and
`cloud_tokens` under their old names).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["ACCOUNTING_FIELDS", "oracle_cloud_seconds", "run_accounting"]

# Row fields added with the accounting; rows written before them lack them.
ACCOUNTING_FIELDS = (
    "override_tokens",
    "other_cloud_tokens",
    "checked_positions",
    "round_trips",
    "cloud_seconds",
)


def _known_sum(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The sum of a field over rows, or None if any row lacks it (an older row)."""
    values = [r.get(key) for r in rows]
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))


def _per(num: float | None, den: float, scale: float = 1.0) -> float | None:
    return None if num is None or not den else scale * num / den


def run_accounting(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The cloud's share of one run's rows (in one suite, or pooled).

    Args:
        rows: result rows (edge/evaluation/runner.py), old or new.

    Returns:
        override_tokens, other_cloud_tokens, ensembled_tokens (the edge placed the ensemble's token:
        safe), checked_positions, round_trips, cloud_seconds (totals; None where a row lacks the
        field), and override_fraction, other_cloud_fraction, ensembled_fraction, checked_fraction (per
        output token; checked positions include drafts a cut dropped, so this can pass 1),
        round_trips_per_task, gpu_seconds_per_1k_tokens (the cloud's compute seconds per
        1,000 output tokens: GPU-seconds on a GPU cloud, CPU-seconds on the CPU one).
    """
    tokens = sum(int(r["tokens"]) for r in rows)
    override = sum(int(r.get("override_tokens", r["corrected_tokens"])) for r in rows)
    other = sum(int(r.get("other_cloud_tokens", r["cloud_tokens"])) for r in rows)
    ensembled = sum(int(r.get("ensembled_tokens", 0)) for r in rows)  # rows before safe existed: none
    checked = _known_sum(rows, "checked_positions")
    trips = _known_sum(rows, "round_trips")
    seconds = _known_sum(rows, "cloud_seconds")
    return {
        "override_tokens": override,
        "other_cloud_tokens": other,
        "ensembled_tokens": ensembled,
        "checked_positions": None if checked is None else int(checked),
        "round_trips": None if trips is None else int(trips),
        "cloud_seconds": seconds,
        "override_fraction": _per(override, tokens),
        "other_cloud_fraction": _per(other, tokens),
        "ensembled_fraction": _per(ensembled, tokens),
        "checked_fraction": _per(checked, tokens),
        "round_trips_per_task": _per(trips, len(rows)),
        "gpu_seconds_per_1k_tokens": _per(seconds, tokens, 1000.0),
    }


def oracle_cloud_seconds(large_rows: Sequence[Mapping[str, Any]], cloud_tokens: int) -> float | None:
    """A lower bound of the oracle's cloud compute: its cloud tokens at cloud-only's seconds per token.

    The oracle hands P only the positions where Q's greedy token differs from P's; this prices each
    at what P spent per generated token in the large (cloud-only) run. It leaves out keeping P's
    cache in step with the edge's tokens, so a real router pays more.

    Args:
        large_rows: the large run's rows on the oracle's tasks.
        cloud_tokens: the oracle's cloud-produced tokens.

    Returns:
        Seconds, or None when the large rows did not record cloud seconds.
    """
    seconds = _known_sum(large_rows, "cloud_seconds")
    tokens = sum(int(r["tokens"]) for r in large_rows)
    if seconds is None or not tokens:
        return None
    return seconds / tokens * cloud_tokens
