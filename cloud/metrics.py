"""Prometheus metrics of the verifier service (one registry per service, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class CloudMetrics:
    """Sessions, tokens, batch sizes, queue wait and forward time."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("handoff_cloud_sessions", "Open sessions.", registry=r)
        self.sessions_opened = Counter("handoff_cloud_sessions_opened", "Sessions opened.", registry=r)
        self.sessions_closed = Counter(
            "handoff_cloud_sessions_closed", "Sessions ended, by how.", ["reason"], registry=r
        )
        self.tokens_appended = Counter(
            "handoff_cloud_tokens_appended", "Edge tokens streamed in.", registry=r
        )
        self.tokens_scored = Counter(
            "handoff_cloud_tokens_scored", "Positions returned at check points.", registry=r
        )
        self.tokens_generated = Counter(
            "handoff_cloud_tokens_generated", "Tokens generated on handoffs.", registry=r
        )
        self.requests = Counter(
            "handoff_cloud_requests", "Session requests, by kind and status.", ["kind", "code"], registry=r
        )
        self.batch_items = Histogram(
            "handoff_cloud_batch_items", "Sessions per forward pass.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "handoff_cloud_batch_tokens",
            "New tokens per forward pass.",
            buckets=(1, 4, 16, 64, 256, 1024, 4096, 16384),
            registry=r,
        )
        self.queue_wait = Histogram(
            "handoff_cloud_queue_wait_seconds",
            "Time a request waited for the model.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.forward_time = Histogram(
            "handoff_cloud_forward_seconds",
            "Time of one batched forward pass.",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Counter(
            "handoff_cloud_compute_seconds",
            "Forward-pass seconds attributed to sessions (a batched pass split by tokens fed).",
            registry=r,
        )
        self.resumed_tokens = Counter(
            "handoff_cloud_resumed_tokens",
            "Prompt tokens a new session took from a broken session's kept cache instead of prefilling them.",
            registry=r,
        )
        self.queue_depth = Gauge("handoff_cloud_queue_depth", "Requests waiting for the model.", registry=r)
