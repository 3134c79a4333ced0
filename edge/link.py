"""The edge's link to the cloud: timeouts and retry (LinkConfig)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from handoff.shared.errors import ShapeError


@dataclass(frozen=True)
class LinkConfig:
    """How the edge treats a slow or unreachable cloud."""

    check_timeout_s: float = 10.0  # a check point unanswered this long: the cloud counts as gone
    token_timeout_s: float = 10.0  # the same between two cloud tokens of a handoff
    open_timeout_s: float = 10.0  # opening (or resynchronising) a session
    retry_initial_s: float = 0.25  # first wait before probing an unreachable cloud again
    retry_max_s: float = 8.0
    retry_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if min(self.check_timeout_s, self.token_timeout_s, self.open_timeout_s, self.retry_initial_s) <= 0:
            raise ShapeError("timeouts and retry_initial_s must be > 0")
        if self.retry_max_s < self.retry_initial_s or self.retry_multiplier < 1.0:
            raise ShapeError("retry_max_s must be >= retry_initial_s and retry_multiplier >= 1")

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before probe number `attempt` (0-based): exponential, capped, +-20% jitter."""
        base = min(self.retry_max_s, self.retry_initial_s * self.retry_multiplier**attempt)
        return base * random.uniform(0.8, 1.2)
