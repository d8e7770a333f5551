"""The service's Prometheus metrics (`GET /metrics`), in a registry of its own: two apps in one process (tests,
a page beside the API) never share or clash over counters."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("cbir_requests", "HTTP requests answered", ["method", "endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("cbir_request_seconds", "time from request to response", ["method", "endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue_depth = Gauge("cbir_queue_depth", "requests waiting for or in the model pass",
                                 registry=self.registry)
        self.batch_size = Histogram("cbir_batch_size", "requests answered by one detector / encoder / store pass",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.errors = Counter("cbir_errors", "refused or failed requests by kind", ["kind"], registry=self.registry)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
