"""The Core: every mailcore service wired together once, handed to web/ and to listeners.

Each service takes what it needs through its constructor (store, clock, config); the Core
only builds them in dependency order. web/ receives the Core and uses its services; it never
reaches the store directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTime

from mailcore.config import Config
from mailcore.identity import Identity
from mailcore.store import Database
from mailcore.workers import CpuPool


@dataclass
class Core:
    config: Config
    db: Database
    clock: IReactorTime
    identity: Identity
    cpu: CpuPool
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        config: Config,
        db: Database,
        clock: IReactorTime,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> Core:
        cpu = CpuPool(clock)  # type: ignore[arg-type]
        identity = Identity(db, clock, cpu, session_ttl=config.session_token_ttl)
        return cls(
            config=config,
            db=db,
            clock=clock,
            identity=identity,
            cpu=cpu,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )

    def background_services(self) -> list[IService]:
        """Timers and workers (queue runners, sync schedulers) owned by the daemon."""
        return []

    def listener_services(self, reactor: Any) -> list[IService]:
        """Non-HTTP listeners (SMTP), started after the HTTP site."""
        return []
