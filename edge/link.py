"""The edge's link to the cloud: timeouts and retry (LinkConfig), the live session with its fallback,
background probing and resynchronisation (CloudLink).

When the cloud is unreachable or slower than a timeout, the edge keeps generating alone (its tokens
committed unchecked); CloudLink probes the cloud with exponential backoff and, once it answers, the
controller reopens a session with the prompt and every committed token (resynchronisation).
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any

from handoff.edge.records import GenerationResult
from handoff.edge.verifier_client import RemoteSession, VerifierClient
from handoff.shared.errors import ShapeError, VerifierError

__all__ = ["TRANSIENT", "CloudLink", "LinkConfig", "describe", "within"]

logger = logging.getLogger(__name__)


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


class CloudLink:
    """The edge's connection to the cloud: the live session, failure, probing and resynchronisation."""

    def __init__(
        self,
        client: VerifierClient,
        open_kwargs: dict[str, Any],
        config: LinkConfig,
        result: GenerationResult,
        *,
        routing_key: str | None = None,
    ) -> None:
        self.client = client
        self.open_kwargs = open_kwargs
        self.config = config
        self.result = result
        self.session: RemoteSession | None = None
        self.reachable = asyncio.Event()
        self._prober: asyncio.Task | None = None
        self._sessions: list[RemoteSession] = []
        # One key for the generation's sessions: a resync goes back to the replica holding its cache.
        self.routing_key = routing_key or uuid.uuid4().hex

    def alive(self) -> bool:
        """True while the session is usable; a session found broken starts the fallback."""
        if self.session is not None and self.session.failed is not None:
            self.fail(self.session.failed)
        return self.session is not None

    async def open(self, context: Sequence[int], *, first: bool) -> bool:
        """Open a session whose prompt is `context` (prompt + committed tokens); False if that failed."""
        try:
            session = await within(
                self.client.open_session(context, routing_key=self.routing_key, **self.open_kwargs),
                self.config.open_timeout_s,
            )
        except (VerifierError, TimeoutError, OSError) as e:
            if not isinstance(e, VerifierError) or e.code in TRANSIENT:
                self.fail(e)
                return False
            raise  # a refusal retrying cannot fix: a different vocabulary, a bad argument
        self.session = session
        self._sessions.append(session)
        self.result.servers.append(session.server_id)
        if first:  # for the latency simulator: the open carries the vocabulary fingerprint
            self.result.open_bytes = (session.bytes_sent, session.bytes_received)
        self.reachable.clear()
        if not first:
            self.result.resyncs += 1
            self.result.resync_reused_tokens += session.reused_tokens
            logger.info(
                "cloud back: session resynchronised at %d tokens on %s (%d from its kept cache)",
                len(context),
                session.server_id,
                session.reused_tokens,
            )
        return True

    def fail(self, error: BaseException) -> None:
        """The cloud is gone or too slow: drop the session and probe in the background until it answers."""
        self.result.cloud_failures += 1
        logger.warning("cloud unavailable (%s): the edge continues alone, unchecked", describe(error))
        if self.session is not None:
            self.session.abort()
            self.session = None
        if self._prober is None or self._prober.done():
            self.reachable.clear()
            self._prober = asyncio.get_running_loop().create_task(self._probe(), name="cloud-probe")

    async def _probe(self) -> None:
        attempt = 0
        while True:
            await asyncio.sleep(self.config.backoff(attempt))
            try:
                await within(self.client.info(), self.config.open_timeout_s)
            except (VerifierError, TimeoutError, OSError) as e:
                logger.debug("cloud probe %d failed: %s", attempt, describe(e))
                attempt += 1
                continue
            self.reachable.set()
            return

    def totals(self) -> tuple[int, int]:
        return (sum(s.bytes_sent for s in self._sessions), sum(s.bytes_received for s in self._sessions))

    def compute_s(self) -> float:
        """The cloud's compute for this generation: every session's replies' compute_s, summed."""
        return sum(s.compute_s for s in self._sessions)

    async def close(self) -> None:
        """Close the session politely and record the cloud's compute in the result (whatever happens)."""
        try:
            if self._prober is not None:
                self._prober.cancel()
                await asyncio.gather(self._prober, return_exceptions=True)
            if self.session is not None:
                try:
                    await within(self.session.close(), self.config.open_timeout_s)
                except TimeoutError:
                    self.session.abort()
                self.session = None
        finally:
            # Here and not in the controller: the link is what reads the replies.
            self.result.cloud_compute_s = self.compute_s()


# A cloud that answers with these is busy or gone, not refusing us: retry later.
TRANSIENT = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED"})


async def within(request: Awaitable, seconds: float):
    """Await with a time limit (TimeoutError); unlike 3.11's wait_for, never swallows a cancellation."""
    async with asyncio.timeout(seconds):
        return await request


def describe(error: BaseException) -> str:
    return str(error) or type(error).__name__
