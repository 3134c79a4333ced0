"""One model instance serving generations one at a time, in arrival order, from a bounded queue.

`GenerationQueue` owns the Assistant's generate(): a single worker task takes jobs first come first
served; a job submitted while `max_queue` others wait is refused with `QueueFull` (HTTP 429) and an
estimate of when to retry. Cancelling a job (its client went away) drops it from the queue, or
cancels the asyncio task running its generation, which stops the controller at its next await and
closes its cloud session. Prometheus metrics (one registry per queue) count requests, tokens by
source, handoffs, check points, queue depth and time to the first token.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from handoff.edge.records import GenerationResult, OnToken, TokenRecord
from handoff.shared.constraints import Constraint
from handoff.shared.sampling import SamplingSettings

logger = logging.getLogger(__name__)

_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Generator(Protocol):
    """What the queue needs of an Assistant."""

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        *,
        sampling: SamplingSettings | None = None,
        on_token: OnToken | None = None,
        constraint: Constraint | None = None,
    ) -> GenerationResult: ...


class ServeMetrics:
    """Prometheus metrics of the HTTP API (own registry, so that tests can run several servers)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "handoff_edge_requests",
            "API requests, by endpoint and outcome.",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.tokens = Counter(
            "handoff_edge_tokens",
            "Generated tokens, by source (edge, cloud, corrected, ensembled).",
            ["source"],
            registry=r,
        )
        self.unchecked = Counter(
            "handoff_edge_unchecked_tokens",
            "Edge tokens the cloud never checked (it was unreachable).",
            registry=r,
        )
        self.prompt_tokens = Counter(
            "handoff_edge_prompt_tokens", "Prompt tokens of started generations.", registry=r
        )
        self.handoffs = Counter("handoff_edge_handoffs", "Times generation moved to the cloud.", registry=r)
        self.check_points = Counter(
            "handoff_edge_check_points", "Check points sent to the cloud.", registry=r
        )
        self.generations = Counter(
            "handoff_edge_generations",
            "Generations, by how they ended (stop_token, stopped, max_tokens, context_full, "
            "cloud_unavailable, cancelled, error).",
            ["reason"],
            registry=r,
        )
        self.queue_depth = Gauge("handoff_edge_queue_depth", "Requests waiting for the model.", registry=r)
        self.busy = Gauge("handoff_edge_busy", "1 while a generation runs.", registry=r)
        self.queue_wait = Histogram(
            "handoff_edge_queue_wait_seconds",
            "Time a request waited for the model.",
            buckets=_SECONDS,
            registry=r,
        )
        self.first_token = Histogram(
            "handoff_edge_time_to_first_token_seconds",
            "From a request's arrival (queueing included) to its first committed token.",
            buckets=_SECONDS,
            registry=r,
        )
        self.generation_time = Histogram(
            "handoff_edge_generation_seconds", "Wall time of a generation.", buckets=_SECONDS, registry=r
        )


class QueueFull(Exception):
    """The queue holds max_queue waiting requests already."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"{waiting} requests are waiting for the model")
        self.waiting = waiting
        self.retry_after = retry_after


class ServerStopping(Exception):
    """The server shut down before the job ran."""


@dataclass(eq=False)
class Job:
    """One generation request: what to generate, and what the worker reports back."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingSettings
    on_token: Callable[[TokenRecord], bool | None] | None = None  # True: stop here
    on_event: Callable[[str], None] | None = None  # "start" when it runs, "end" when it is over
    constraint: Constraint | None = None  # grammar, penalties, logit bias (shared/constraints.py)
    # Filled in by the queue
    ahead: int = 0  # jobs running or waiting when it arrived
    t_arrival: float = 0.0
    t_started: float | None = None
    t_first_token: float | None = None
    state: str = "new"  # waiting, running, done, cancelled
    cancel_requested: bool = False
    records: list[TokenRecord] = field(default_factory=list)
    done: asyncio.Future | None = None  # GenerationResult, or the generation's exception; cancelled
    task: asyncio.Task | None = None

    @property
    def queue_wait_s(self) -> float | None:
        return None if self.t_started is None else self.t_started - self.t_arrival

    def _notify(self, event: str) -> None:
        if self.on_event is not None:
            self.on_event(event)


class GenerationQueue:
    """A single worker running jobs in arrival order; at most max_queue jobs wait behind it."""

    def __init__(self, generator: Generator, *, max_queue: int, metrics: ServeMetrics | None = None) -> None:
        """Describe the queue; start() starts the worker.

        Args:
            generator: the Assistant (anything with its generate()).
            max_queue: requests that may wait while one runs (0: only when idle).
            metrics: where to count; a fresh registry if None.
        """
        self.generator = generator
        self.max_queue = max_queue
        self.metrics = metrics or ServeMetrics()
        self._waiting: collections.deque[Job] = collections.deque()
        self._wakeup = asyncio.Event()
        self._running: Job | None = None
        self._worker: asyncio.Task | None = None
        self._stopping = False
        self._mean_s: float | None = None  # moving average of generation time, for Retry-After
        self.completed = 0  # generations that ran to their end
        self.cancelled = 0  # generations stopped because their client went away

    @property
    def depth(self) -> int:
        """Jobs waiting (not counting the running one)."""
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        return self._running is not None

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="edge-generation-worker")

    async def stop(self) -> None:
        """Stop the worker: the running generation is cancelled, waiting jobs fail with ServerStopping."""
        self._stopping = True
        while self._waiting:
            job = self._waiting.popleft()
            job.state = "cancelled"
            if job.done is not None and not job.done.done():
                job.done.set_exception(ServerStopping("the server is shutting down"))
            job._notify("end")
        self.metrics.queue_depth.set(0)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the running job, at the mean pace of past generations."""
        mean = self._mean_s if self._mean_s is not None else 1.0
        return max(1, math.ceil(mean))

    def submit(self, job: Job) -> Job:
        """Queue a job (returns at once; await job.done for its result).

        Raises:
            QueueFull: max_queue jobs are waiting already.
            ServerStopping: the server is shutting down.
        """
        if self._stopping:
            raise ServerStopping("the server is shutting down")
        # Count what is admitted and unfinished, not what waits: a job the worker has not taken yet (it
        # gets its turn at the next await) is the one that runs next, not one more waiting.
        admitted = len(self._waiting) + (self._running is not None)
        if admitted > self.max_queue:
            raise QueueFull(admitted - 1, self.retry_after())
        job.ahead = admitted
        job.t_arrival = job.t_arrival or time.perf_counter()
        job.state = "waiting"
        job.done = asyncio.get_running_loop().create_future()
        # A client that left never reads its job's error: mark it read so asyncio does not log it.
        job.done.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._waiting.append(job)
        self.metrics.queue_depth.set(len(self._waiting))
        self._wakeup.set()
        return job

    def cancel(self, job: Job) -> bool:
        """Its client went away: drop the job from the queue, or stop its generation. True if it was live."""
        if job.state == "waiting":
            self._waiting.remove(job)
            self.metrics.queue_depth.set(len(self._waiting))
            job.state = "cancelled"
            self.metrics.generations.labels("cancelled").inc()
            if job.done is not None and not job.done.done():
                job.done.cancel()
            logger.info("a waiting request was cancelled (its client went away)")
            return True
        if job.state == "running" and job.task is not None and not job.task.done():
            self._cancel_once(job)
            return True
        return False

    @staticmethod
    def _cancel_once(job: Job) -> None:
        """Stop a running job's generation: cancel its task once, and flag it.

        Once only: a second cancellation would land in the generation's own cleanup (closing its
        cloud session) and cut it short, leaving its llama.cpp thread running on a model that the
        next generation, or the shutdown, then uses or frees. The flag covers a cancellation that
        never arrives: on Python 3.11 asyncio.wait_for (which the controller uses) swallows one that
        lands as its awaitable completes; on_token then stops the generation at its next token.
        """
        if not job.cancel_requested:
            job.cancel_requested = True
            assert job.task is not None
            job.task.cancel()

    async def _run(self) -> None:
        while True:
            while not self._waiting:
                self._wakeup.clear()
                await self._wakeup.wait()
            job = self._waiting.popleft()
            self.metrics.queue_depth.set(len(self._waiting))
            self._running = job
            self.metrics.busy.set(1)
            try:
                await self._execute(job)
            finally:
                self._running = None
                self.metrics.busy.set(0)

    async def _execute(self, job: Job) -> None:
        job.state = "running"
        job.t_started = time.perf_counter()
        self.metrics.queue_wait.observe(job.t_started - job.t_arrival)
        self.metrics.prompt_tokens.inc(len(job.prompt_ids))
        job._notify("start")

        def on_token(record: TokenRecord) -> bool | None:
            if job.cancel_requested:
                return True
            job.records.append(record)
            if job.t_first_token is None:
                job.t_first_token = time.perf_counter()
                self.metrics.first_token.observe(job.t_first_token - job.t_arrival)
            return job.on_token(record) if job.on_token is not None else None

        job.task = asyncio.get_running_loop().create_task(
            self._generate(job, on_token), name="edge-generation"
        )
        try:
            # wait() and not `await task`: the task's own cancellation (the client left) must not be
            # mistaken for the worker's (the server stops).
            await asyncio.wait({job.task})
        except asyncio.CancelledError:  # the server stops
            self._cancel_once(job)
            await asyncio.wait({job.task})
            self._finish(job)
            raise
        self._finish(job)

    def _generate(self, job: Job, on_token: Callable[[TokenRecord], bool | None]) -> Awaitable[Any]:
        return self.generator.generate(
            job.prompt_ids,
            job.max_tokens,
            sampling=job.sampling,
            on_token=on_token,
            constraint=job.constraint,
        )

    def _finish(self, job: Job) -> None:
        task, done = job.task, job.done
        assert task is not None and done is not None and task.done()
        m = self.metrics
        counts = collections.Counter(r.source for r in job.records)
        for source in ("edge", "cloud", "corrected", "ensembled"):
            m.tokens.labels(source).inc(counts.get(source, 0))
        m.unchecked.inc(sum(r.source == "edge" and not r.checked for r in job.records))
        elapsed = time.perf_counter() - (job.t_started or job.t_arrival)
        m.generation_time.observe(elapsed)
        if task.cancelled() or job.cancel_requested:
            if not task.cancelled():
                task.exception()  # read (and dropped): nobody waits for it any more
            job.state = "cancelled"
            self.cancelled += 1
            m.generations.labels("cancelled").inc()
            logger.info("generation cancelled after %d tokens", len(job.records))
            if not done.done():
                done.cancel()
        else:
            job.state = "done"
            error = task.exception()
            if error is not None:
                m.generations.labels("error").inc()
                logger.warning("generation failed: %s", error, exc_info=error)
                if not done.done():
                    done.set_exception(error)
            else:
                result: GenerationResult = task.result()
                self.completed += 1
                m.generations.labels(result.stop_reason or "unknown").inc()
                m.handoffs.inc(result.handoffs)
                m.check_points.inc(result.check_points)
                # Only whole generations teach the pace: a cancelled one says nothing about it.
                self._mean_s = elapsed if self._mean_s is None else 0.7 * self._mean_s + 0.3 * elapsed
                if not done.done():
                    done.set_result(result)
        job._notify("end")
