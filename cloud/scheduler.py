"""Batching: forward requests of many sessions go to the model together.

Every backend call runs on one worker thread (the model is not thread-safe and blocking calls stay
off the event loop). Requests that arrive while a forward pass runs are batched into the next one,
up to max_batch_items sessions and max_batch_tokens new tokens: continuous batching at check-point
granularity.

Before a pass starts, the scheduler waits up to batch_wait_s for more requests while fewer are
queued than sessions are open. Without it, the sessions answered by one pass are still sending
their next request (a network round trip) when the model frees up, the next pass takes only the
one request that was already waiting, and the sessions split into out-of-step groups that never
share a pass again (measured on the 1.5B on CPU: 16 sessions at 0.81 of the raw batched throughput).

Compute accounting: each pass is timed on the model thread (perf_counter around `backend.forward`)
and split among its items in proportion to the new tokens each fed: a pass's cost grows with its
tokens (prefill, check points), and a decode batch, one token per item, splits evenly. An item's
share is what the service reports to its session as `compute_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from handoff.cloud.backend import Backend, ForwardItem, ForwardOutput
from handoff.cloud.metrics import CloudMetrics
from handoff.shared.errors import CapacityError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Forwarded:
    """One item's result and the forward pass that computed it."""

    output: ForwardOutput
    seconds: float  # duration of the whole batched pass
    batch_items: int  # sessions that shared it
    share_s: float = 0.0  # this item's share of `seconds` (by tokens fed; see the module docstring)


@dataclass
class _Pending:
    item: ForwardItem
    future: asyncio.Future[Forwarded]
    enqueued: float


class BatchScheduler:
    """Queue of forward requests, drained into batched forward passes on the model thread."""

    def __init__(
        self,
        backend: Backend,
        metrics: CloudMetrics,
        *,
        max_queue: int = 1024,
        max_batch_items: int = 64,
        max_batch_tokens: int = 8192,
        batch_wait_s: float = 0.0,
        open_sessions: Callable[[], int] = lambda: 0,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_batch_items = max_batch_items
        self.max_batch_tokens = max_batch_tokens
        self.batch_wait_s = batch_wait_s
        self._open_sessions = open_sessions
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="model")
        self._pending: deque[_Pending] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batch-scheduler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for p in self._pending:
            if not p.future.done():
                p.future.set_exception(CapacityError("the service is shutting down"))
        self._pending.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a backend call (truncate, release, ...) on the model thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def forward(self, item: ForwardItem) -> Forwarded:
        """Queue one item for the next batched forward pass.

        Returns:
            The item's output, with the duration and size of the forward pass that computed it.

        Raises:
            CapacityError: the queue is full.
        """
        if len(self._pending) >= self.max_queue:
            raise CapacityError(f"the model's queue is full ({self.max_queue} requests waiting); retry later")
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(item, future, time.perf_counter()))
        self.metrics.queue_depth.set(len(self._pending))
        self._wake.set()
        return await future

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        tokens = 0
        while self._pending and len(batch) < self.max_batch_items:
            nxt = self._pending[0]
            if nxt.future.done():  # its session went away while it waited
                self._pending.popleft()
                continue
            n = len(nxt.item.tokens)
            if batch and tokens + n > self.max_batch_tokens:
                break
            batch.append(self._pending.popleft())
            tokens += n
        self.metrics.queue_depth.set(len(self._pending))
        return batch

    async def _gather_more(self) -> bool:
        """Wait (at most batch_wait_s) while open sessions may still add to the next batch; True if work is queued."""
        deadline = time.perf_counter() + self.batch_wait_s
        while 0 < len(self._pending) < min(self._open_sessions(), self.max_batch_items):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                break
        return bool(self._pending)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (await self._gather_more()) and (batch := self._take_batch()):
                now = time.perf_counter()
                for p in batch:
                    self.metrics.queue_wait.observe(now - p.enqueued)
                items = [p.item for p in batch]
                try:
                    outputs, seconds = await loop.run_in_executor(self._executor, self._timed_forward, items)
                except Exception as e:  # a bad item fails its batch; the sessions report it
                    logger.warning("forward pass of %d items failed: %s", len(items), e)
                    for p in batch:
                        if not p.future.done():
                            p.future.set_exception(e)
                    continue
                self.metrics.forward_time.observe(seconds)
                self.metrics.batch_items.observe(len(items))
                self.metrics.batch_tokens.observe(sum(len(i.tokens) for i in items))
                for p, out, share in zip(batch, outputs, split_seconds(seconds, items), strict=True):
                    if not p.future.done():
                        p.future.set_result(Forwarded(out, seconds, len(items), share))

    def _timed_forward(self, items: list[ForwardItem]) -> tuple[list[ForwardOutput], float]:
        """On the model thread: the pass and its duration, without the event loop's scheduling delays."""
        start = time.perf_counter()
        outputs = self.backend.forward(items)
        return outputs, time.perf_counter() - start


def split_seconds(seconds: float, items: list[ForwardItem]) -> list[float]:
    """A batched pass's seconds split among its items by the tokens each fed (evenly if none fed any).

    Args:
        seconds: the pass's duration.
        items: the batch.

    Returns:
        One share per item, summing to seconds.
    """
    fed = [len(i.tokens) for i in items]
    total = sum(fed)
    if total == 0:
        return [seconds / len(items)] * len(items)
    return [seconds * n / total for n in fed]
