"""Prometheus metrics of one service instance (its own registry, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

disable_created_metrics()  # the *_created series only double the text Prometheus scrapes

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30,
                   60, 300)


OTHER = "other"  # the label value of every name outside the server's own vocabulary


class Metrics:
    """Label values come from the server's own vocabulary only (backend names it registers,
    endpoint templates, status codes, key names from its config): a client-chosen string would
    add a series per request, growing memory and putting the client's text into /metrics."""

    def __init__(self, backends: Iterable[str] | None = None) -> None:
        if backends is None:
            from backends.registry import registered

            backends = registered()
        self.backend_names = frozenset(backends)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("qvae_requests", "HTTP requests answered",
                                ["endpoint", "backend", "status"], registry=r)
        self.latency = Histogram("qvae_request_seconds", "HTTP request latency",
                                 ["endpoint", "backend"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("qvae_queue_depth", "requests waiting for a worker",
                                 ["resource"], registry=r)
        self.running = Gauge("qvae_running", "requests being sampled now", ["resource"],
                             registry=r)
        self.jobs_stored = Gauge("qvae_jobs_stored", "jobs held (unfetched or retained)",
                                 registry=r)
        self.qpu_seconds = Counter("qvae_qpu_seconds", "QPU access time used", ["key"],
                                   registry=r)
        self.samples = Counter("qvae_samples", "samples returned", ["backend", "served_by"],
                               registry=r)
        self.fallbacks = Counter("qvae_fallbacks", "calls a fallback backend served",
                                 ["backend"], registry=r)

    def backend_label(self, name: str) -> str:
        """`name` if this server knows the backend, `other` if not, "" when there is none."""
        return name if not name or name in self.backend_names else OTHER

    def watch(self, resource: str, queued: Callable[[], float],
              running: Callable[[], float]) -> None:
        self.queue_depth.labels(resource).set_function(queued)
        self.running.labels(resource).set_function(running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
