"""HTTP metrics in the Core's Prometheus registry: requests and latency per API and status."""

from __future__ import annotations

import weakref
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Latency buckets from 5 ms to 30 s: logins (Argon2) sit near 100 ms, uploads much higher.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

_by_registry: weakref.WeakKeyDictionary[CollectorRegistry, HttpMetrics] = (
    weakref.WeakKeyDictionary()
)


class HttpMetrics:
    """The HTTP collectors of one registry (made once per registry, however many sites)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "mailcore_http_requests",
            "HTTP requests served, by API, method and status.",
            ["api", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "mailcore_http_request_duration_seconds",
            "Time from a request's arrival to the end of its reply, by API.",
            ["api"],
            buckets=_BUCKETS,
            registry=registry,
        )
        # The labelled children, looked up once each (`labels()` takes a lock and builds
        # its key on every call; every request makes two). Bounded: a few APIs, eight
        # method labels, the status codes we send.
        self._counts: dict[tuple[str, str, int], Any] = {}
        self._latencies: dict[str, Any] = {}

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> HttpMetrics:
        metrics = _by_registry.get(registry)
        if metrics is None:
            metrics = _by_registry[registry] = cls(registry)
        return metrics

    def observe(self, api: str, method: str, status: int, seconds: float) -> None:
        label = method if method in _KNOWN_METHODS else "other"
        count = self._counts.get((api, label, status))
        if count is None:
            count = self._counts[(api, label, status)] = self.requests.labels(
                api=api, method=label, status=str(status))
        count.inc()
        latency = self._latencies.get(api)
        if latency is None:
            latency = self._latencies[api] = self.latency.labels(api=api)
        latency.observe(max(0.0, seconds))


def exposition(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in Prometheus text format, and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
