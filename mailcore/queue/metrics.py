"""The queue's Prometheus metrics, registered once on the Core's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class QueueMetrics:
    """Counters of accepted/delivered/deferred/bounced, the depth gauge, the send memory's
    gauges (octets held, attempts waiting), delivery latency."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.accepted = Counter(
            "mailcore_queue_accepted", "Messages committed to the spool", registry=registry
        )
        self.delivered = Counter(
            "mailcore_queue_delivered", "Recipients delivered to their next hop",
            registry=registry,
        )
        self.deferred = Counter(
            "mailcore_queue_deferred", "Recipient delivery attempts that failed temporarily",
            registry=registry,
        )
        self.bounced = Counter(
            "mailcore_queue_bounced", "Recipients that failed permanently", registry=registry
        )
        self.depth = Gauge(
            "mailcore_queue_depth", "Active (queued or deferred) recipients in the queue",
            registry=registry,
        )
        self.send_memory = Gauge(
            "mailcore_queue_send_memory_bytes",
            "Octets of message bodies outbound delivery attempts hold ([queue] "
            "max_send_memory)", registry=registry,
        )
        self.send_waiting = Gauge(
            "mailcore_queue_send_memory_waiting",
            "Outbound delivery attempts waiting for room in [queue] max_send_memory",
            registry=registry,
        )
        self.latency = Histogram(
            "mailcore_delivery_latency_seconds",
            "Time from acceptance to delivery, per recipient",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 14400, 86400),
            registry=registry,
        )
