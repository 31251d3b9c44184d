"""Wiring the queue for the Core: `build_queue` makes the Spool the SMTP server commits
into, the QueueRunner that delivers, the QueueService that sweeps, renews leases and stops
them in order, and the NextHopPolicy every delivery's addresses are checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.internet.interfaces import IReactorTime

from mailcore.config import Config
from mailcore.queue.journal import ResultJournal
from mailcore.queue.metrics import QueueMetrics
from mailcore.queue.nexthop import Listeners, NextHopPolicy
from mailcore.queue.pipeline import Pipeline
from mailcore.queue.routing import MXResolver, Router
from mailcore.queue.runner import Connector, QueueRunner
from mailcore.queue.service import QueueService
from mailcore.queue.settings import QueueSettings
from mailcore.queue.spool import (
    GROUP_GATHER,
    STREAM_LINGER,
    Spool,
    relaxed_twin,
)
from mailcore.smtp.settings import SMTPSettings
from mailcore.store import Database


@dataclass
class Queue:
    """The queue's parts as the Core holds them."""

    settings: QueueSettings
    spool: Spool
    runner: QueueRunner
    service: QueueService
    metrics: QueueMetrics
    next_hops: NextHopPolicy


def build_queue(
    config: Config,
    db: Database,
    clock: IReactorTime,
    registry: CollectorRegistry,
    *,
    reactor: Any = None,
    connector: Connector | None = None,
    pipeline: Pipeline | None = None,
    resolver: MXResolver | None = None,
    settings: QueueSettings | None = None,
    listeners: Listeners | None = None,
) -> Queue:
    """Spool, runner and service for one node. `reactor` is needed for real connections;
    `listeners` are our own SMTP listeners (default: those of `config.smtp_endpoints`)."""
    settings = settings or QueueSettings.from_config(config)
    metrics = QueueMetrics(registry)
    if listeners is None:
        listeners = Listeners(config.smtp_endpoints)
    next_hops = NextHopPolicy.from_config(config, settings, listeners)
    if connector is None:
        from mailcore.queue.connector import TCPConnector

        connector = TCPConnector(reactor if reactor is not None else clock, settings,
                                 config.hostname, next_hops)
    sts = None
    if settings.mta_sts:
        from mailcore.queue.mtasts import PolicyFetcher, PolicyFinder

        sts = PolicyFinder(db, clock, settings, PolicyFetcher(
            reactor if reactor is not None else clock, settings))
    router = Router(db, clock, settings, resolver, sts=sts)
    runner = QueueRunner(
        db, clock, settings, metrics, router, connector, pipeline or Pipeline(), config.hostname,
        max_hops=SMTPSettings.from_config(config).max_hops,  # the hop limit is [smtp]'s
    )
    spool = Spool(
        db, clock, settings, metrics, runner, reporting_mta=config.hostname,
        results_db=relaxed_twin(db, reactor if reactor is not None else clock),
        linger=STREAM_LINGER if db.threaded else 0.0,
        gather=GROUP_GATHER if db.threaded else 0.0,
        # The results journal lives in the data directory (unit tests' in-memory stores
        # have none).
        journal=ResultJournal(config.data_dir) if db.threaded else None,
    )
    runner.spool = spool
    service = QueueService(db, clock, settings, spool, runner)
    return Queue(settings, spool, runner, service, metrics, next_hops)

