"""The Core: every mailcore service wired together once, handed to web/ and to listeners.

Each service takes what it needs through its constructor (store, clock, config); the Core
only builds them in dependency order. web/ receives the Core and uses its services; it never
reaches the store directly.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService
from twisted.internet.interfaces import IReactorTCP, IReactorTime

from filters import FilterChain, build_chain
from mailcore.backup import BackupAccounts, BackupIndexer, BackupMail, BackupSettings
from mailcore.backup.jobs import BackupJobs, OldJobsSweeper, build_jobs
from mailcore.billing.invoices import BillingSettings, InvoiceService
from mailcore.billing.plans import Plans
from mailcore.billing.tokens import ChargeBatcher, TokenService, TokenSettings
from mailcore.config import Config
from mailcore.deletion import UserDeletion
from mailcore.fetch import FetchServices, build_fetch
from mailcore.fetch.jobs import JobRunner
from mailcore.gateway.callout import RecipientVerifier, VerdictSweeper
from mailcore.gateway.domains import DomainService, DomainSettings
from mailcore.gateway.filtering import (
    ChainService,
    FilteringStage,
    PipelineQuarantine,
    PolicySettings,
)
from mailcore.gateway.quarantine import QuarantineService, QuarantineSettings
from mailcore.gateway.redirects import RedirectPolicy
from mailcore.gateway.verification import DomainVerifier, VerificationSettings
from mailcore.identity import Identity
from mailcore.identity.service import CredentialSweeper
from mailcore.mailapi import MailboxService
from mailcore.mailapi.delivery import HostedAddresses, LocalMailboxes
from mailcore.mailapi.files import MailFiles
from mailcore.mailapi.mail import GoneSweeper, MailFilesSweeper, MailService
from mailcore.mailapi.outbox import OutboxSender
from mailcore.mailapi.room import MailboxRoom
from mailcore.mailapi.settings import MailApiSettings
from mailcore.messages import MessageStore
from mailcore.nodes.registry import NodeRegistry
from mailcore.oauth import OAuthProvider, OAuthPruner, OAuthSettings
from mailcore.periodic import PeriodicService
from mailcore.queue.assembly import Queue, build_queue
from mailcore.queue.mtasts import PolicySweeper
from mailcore.queue.nexthop import Listeners, ListeningEndpoint
from mailcore.queue.pipeline import Pipeline
from mailcore.queue.settings import QueueSettings
from mailcore.queue.spool import Spool
from mailcore.ratelimits import BucketSweeper, SharedBuckets
from mailcore.safedrop.model import SafedropSettings
from mailcore.safedrop.service import SafedropService, SafedropSweeper
from mailcore.safedrop.sms import SmsGateway
from mailcore.sendcaps import SendCaps, SendCapSettings, SendsSweeper
from mailcore.smtp.server import SMTPServerFactory, stress_gauge
from mailcore.smtp.settings import SMTPSettings
from mailcore.store import Database
from mailcore.store.dbclock import ClockFollower, DatabaseTime
from mailcore.store.leases import JobLeases
from mailcore.store.stuck import StuckSessionReaper
from mailcore.tls import CertificateReloader
from mailcore.tlslisten import TLSListeners
from mailcore.webhooks import WebhookPruner, Webhooks, build_webhooks
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
    # The STARTTLS pair of tls_cert and tls_key, loaded again when its files change.
    certificate: CertificateReloader | None = field(init=False)
    # The listener endpoints, and the reloaders of the `ssl:` ones' certificates.
    tls_listeners: TLSListeners = field(init=False)
    # Served domains and the RCPT snapshot; built from db/clock/config in __post_init__.
    domains: DomainService = field(init=False)
    # Fetch accounts, the sync engine and its scheduler ([fetch]); the message store.
    fetch: FetchServices = field(init=False)
    messages: MessageStore = field(init=False)
    # The OAuth 2 provider of Dropmyemail ([oauth]): apps, codes, tokens.
    oauth: OAuthProvider = field(init=False)
    # Dropmyemail's accounts ([dropmyemail]): fetch accounts with its rules on top.
    backup: BackupAccounts = field(init=False)
    backup_mail: BackupMail = field(init=False)
    # Its index (attachments' libmagic descriptions, signature phones), filled after each
    # sync and by a periodic pass that also backfills what was stored before it existed.
    backup_index: BackupIndexer = field(init=False)
    # Its migrates and restores, and the runner that runs each job on one node.
    jobs: BackupJobs = field(init=False)
    job_runner: JobRunner = field(init=False)
    # The durable spool the SMTP server commits into, and the delivery runner ([queue]);
    # our own SMTP listeners, which are never a next hop (configured, then as bound).
    queue: Queue = field(init=False)
    listeners: Listeners = field(init=False)
    spool: Spool = field(init=False)
    # Plans ([plans]), filtering token tanks ([tokens]), invoices ([billing]), and the
    # check of next hops when they are set (the queue's next-hop policy, early).
    plans: Plans = field(init=False)
    tokens: TokenService = field(init=False)
    invoices: InvoiceService = field(init=False)
    redirects: RedirectPolicy = field(init=False)
    # Webhooks ([webhooks]): told by the sync engine, sent by a background sender.
    webhooks: Webhooks = field(init=False)
    # Quarantine ([quarantine]: store, release, purge, digests) and the filter chain
    # ([filters]) the queue runner's pipeline stage scans with.
    quarantine: QuarantineService = field(init=False)
    filter_chain: FilterChain = field(init=False)
    filter_service: ChainService = field(init=False)
    # Proof of domain ownership ([protecmail] verify_domains, dns_servers, verify_*).
    verifier: DomainVerifier = field(init=False)
    # This node's claims on the background jobs that run on one node of those sharing the
    # store (named by [queue] node_id, as its queue leases are).
    leases: JobLeases = field(init=False)
    # The Mail API's hosted mailboxes and their grants (seed 002).
    mailboxes: MailboxService = field(init=False)
    # Their mail ([mailapi]) and the outbox that hands it to the spool in posting order.
    mailapi_settings: MailApiSettings = field(init=False)
    mail: MailService = field(init=False)
    outbox: OutboxSender = field(init=False)
    # safedrop ([safedrop]): drop bundles, recipients, files on disk, notifications.
    safedrop: SafedropService = field(init=False)
    # The caps on the recipients of the mail those two send for a user ([limits]).
    send_caps: SendCaps = field(init=False)
    # `mailcore user delete`: a user with everything it owns, through the services above.
    deletion: UserDeletion = field(init=False)
    # This node in the registry of the nodes sharing a PostgreSQL store (its files marker
    # under `files_dir`, its key fingerprints), and the checks that they see one files
    # directory and hold the same keys (run by the daemon, on PostgreSQL only).
    node_registry: NodeRegistry = field(init=False)
    # The rate limits that guard secrets (logins, drop passwords and codes), in the store so
    # that they hold across nodes (mailcore.ratelimits).
    rate_buckets: SharedBuckets = field(init=False)
    # /metrics' mailcore_smtp_stress, which the SMTP factory sets (one registration).
    smtp_stress: Gauge = field(init=False)
    # Recipient verification at the next hop ([smtp] verify_recipients; None when off),
    # which the SMTP factory asks at RCPT and whose expired answers a sweeper deletes.
    recipient_verifier: RecipientVerifier | None = field(init=False)

    def __post_init__(self) -> None:
        self.certificate = None
        if self.tls_cert is not None and self.tls_key is not None:
            self.certificate = CertificateReloader(self.tls_cert, self.tls_key, self.clock,
                                                   self.cpu)
        self.tls_listeners = TLSListeners(self.clock, self.cpu, self.certificate)
        self.smtp_stress = stress_gauge(self.metrics)
        self.recipient_verifier = None
        domain_settings = DomainSettings.from_config(self.config.section("domains"))
        queue_settings = QueueSettings.from_config(self.config)
        self.leases = JobLeases(self.db, queue_settings.node_id)
        verification = VerificationSettings.from_config(self.config.section("protecmail"))
        self.domains = DomainService(
            self.db, self.clock, refresh_interval=domain_settings.refresh_interval,
            poll_interval=domain_settings.poll_interval,
            verify_domains=verification.verify_domains,
            max_per_user=domain_settings.max_per_user,
            max_addresses=domain_settings.max_addresses,
        )
        self.verifier = DomainVerifier(self.domains, self.clock, verification)
        self.verifier.leases = self.leases  # one pass per period, on one node
        self.fetch = build_fetch(
            self.clock, self.db, self.cpu, self.config.data_dir, self.config.section("fetch"),
            node_id=queue_settings.node_id,
        )
        self.messages = self.fetch.messages
        self.oauth = OAuthProvider(
            self.db, self.clock, self.identity,
            OAuthSettings.from_section(self.config.section("oauth")),
        )
        self.backup = BackupAccounts(
            self.db, self.fetch.accounts, self.fetch.engine,
            BackupSettings.from_section(self.config.section("dropmyemail")),
        )
        self.backup_mail = BackupMail(self.db, self.fetch.accounts, self.messages)
        self.backup_index = BackupIndexer(self.backup_mail.index, self.clock)
        self.fetch.engine.listeners.append(self.backup_index.kick)
        self.listeners = Listeners(self.config.smtp_endpoints)
        self.queue = build_queue(
            self.config, self.db, self.clock, self.metrics, reactor=self.clock,
            listeners=self.listeners, settings=queue_settings,
        )
        self.spool = self.queue.spool
        self.plans = Plans.from_config(self.config.section("plans"))
        token_settings = TokenSettings.from_config(self.config.section("tokens"))
        self.tokens = TokenService(self.db, self.clock, self.plans, token_settings)
        self.invoices = InvoiceService(
            self.db, self.clock, self.cpu, self.tokens,
            BillingSettings.from_config(self.config.section("billing")),
        )
        self.redirects = RedirectPolicy(self.queue.next_hops)
        self.domains.redirects = self.redirects
        self.webhooks = build_webhooks(
            self.config.section("webhooks"), self.db, self.clock, self.fetch.secrets
        )
        self.webhooks.attach(self.fetch.engine)
        self.job_runner, self.jobs = build_jobs(
            self.clock, self.db, self.fetch, self.backup.settings,
            node_id=queue_settings.node_id, registry=self.metrics, webhooks=self.webhooks,
        )
        self._build_filtering()
        self.send_caps = SendCaps(
            self.db, self.clock, SendCapSettings.from_config(self.config.section("limits")),
            registry=self.metrics,
        )
        drop_settings = SafedropSettings.from_config(self.config.section("safedrop"))
        self.safedrop = SafedropService(
            self.db, self.clock, self.cpu, self.fetch.secrets, self.spool, drop_settings,
            data_dir=self.config.data_dir, files_dir=self.config.files_root,
            hostname=self.config.hostname,
            sms=SmsGateway.over(drop_settings.sms_gateway, self.clock)
            if drop_settings.sms_gateway else None,
            caps=self.send_caps, registry=self.metrics,
        )
        # Hosted mailboxes: the queue stores their mail here instead of relaying it.
        self.hosted = hosted = HostedAddresses(self.db, self.clock)
        mail_files = MailFiles(self.config.files_root / "mailapi")
        self.queue.runner.router.local = hosted
        smtp_settings = SMTPSettings.from_config(self.config)
        if smtp_settings.verify_recipients:
            self.recipient_verifier = RecipientVerifier(
                smtp_settings, self.db, self.clock, self.domains, self.queue.runner.router,
                self.queue.runner.connector, registry=self.metrics)
        self.mailapi_settings = MailApiSettings.from_config(self.config.section("mailapi"))
        self.queue.runner.local_store = LocalMailboxes(
            mail_files, self.cpu, quota_bytes=self.mailapi_settings.mailbox_quota_bytes)
        self.queue.runner.cpu = self.cpu
        self.mailboxes = MailboxService(self.db, self.clock, on_change=self._mailboxes_changed)
        self.mail = MailService(
            self.db, self.clock, self.config.hostname, mail_files, self.cpu,
            max_attachment_bytes=self.mailapi_settings.max_attachment_bytes,
            max_message_bytes=self.mailapi_settings.max_message_bytes,
            quota_bytes=self.mailapi_settings.mailbox_quota_bytes,
            max_drafts=self.mailapi_settings.max_drafts_per_mailbox,
            ride=self.spool.ride if self.spool.takes_riders else None,
            caps=self.send_caps,
        )
        self.outbox = OutboxSender(self.db, self.clock, self.spool, leases=self.leases)
        self.rate_buckets = SharedBuckets(self.db, self.clock)
        self.node_registry = NodeRegistry(
            self.db, self.clock, self.cpu, queue_settings.node_id,
            {"safedrop": self.safedrop.files.root, "mailapi": mail_files.root},
            self.config.data_dir, self.fetch.settings.secret_key,
        )
        self.mail.on_enqueued.append(self.outbox.enqueued)
        self.deletion = UserDeletion(
            self.identity, self.domains, self.mailboxes, self.mail, self.safedrop,
            self.fetch.accounts, self.messages, self.webhooks, self.oauth,
        )

    @property
    def shared_store(self) -> bool:
        """Whether other nodes may share this store (PostgreSQL; SQLite is one node's)."""
        return self.db.engine.dialect.name == "postgresql"

    def mailbox_room(self, margin: int) -> MailboxRoom:
        """The room of the nearly full hosted mailboxes, for the SMTP server's RCPT: those
        with less than `margin` bytes (its largest message) left."""
        return MailboxRoom(self.db, self.clock, self.mailapi_settings.mailbox_quota_bytes,
                           margin)

    def _mailboxes_changed(self) -> None:
        """A hosted mailbox came or went through this process: routing's cache of them is
        stale, and the RCPT snapshot catches up now rather than at its next poll."""
        self.hosted.invalidate()
        if self.domains.running:  # a daemon's snapshot; the CLI keeps none
            self.domains.tick()

    def _build_filtering(self) -> None:
        """The quarantine ([quarantine]) and the filtering pipeline stage ([filters],
        [pipeline]) that the queue runner runs before delivery."""
        self.quarantine = QuarantineService(
            self.db, self.clock, QuarantineSettings.from_config(self.config.section("quarantine")),
            self.plans, hostname=self.config.hostname,
            signer=self.config.data_dir / "quarantine.key", spool=self.spool,
            leases=self.leases, cpu=self.cpu,
        )
        self.filter_chain = build_chain(
            self.config.section("filters"), reactor=self.clock, runner=self.cpu
        )
        self.filter_service = ChainService(self.filter_chain)
        policy = PolicySettings.from_config(self.config.section("pipeline"))
        if policy.filtering:
            # A message's tokens are charged in the group commit that stores it (the spool's
            # charger); the charges the filtering still asks for share one transaction: the
            # spool's next group commit (with no commit of their own).
            charges = ChargeBatcher(self.tokens, lane=self.spool.charge)
            stage = FilteringStage(self.filter_chain, self.domains, charges, policy)
            self.spool.charger = stage
            self.queue.runner.pipeline = Pipeline(
                [stage], PipelineQuarantine(self.quarantine), max_scans=policy.max_scans
            )

    @classmethod
    def build(
        cls,
        config: Config,
        db: Database,
        clock: IReactorTime,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        cpu: CpuPool | None = None,
    ) -> Core:
        """Every service over `db`; `cpu` defaults to a real thread pool (tests hand in
        `CpuPool.for_tests()`)."""
        cpu = cpu or CpuPool(clock)  # type: ignore[arg-type]
        identity = Identity(
            db, clock, cpu, session_ttl=config.session_token_ttl,
            login_ttl=config.login_token_ttl or None,
            login_idle=config.login_token_idle or None,
            logins_kept=config.login_tokens_per_user,
        )
        core = cls(
            config=config,
            db=db,
            clock=clock,
            identity=identity,
            cpu=cpu,
            tls_cert=tls_cert,
            tls_key=tls_key,
        )
        # The fetch key is read (or made) on first use, or by the daemon before its reactor
        # runs (mailcore.service.build_core): a CLI command that uses no secret must not
        # make a new key where a lost one is missing (the daemon then says it is missing).
        core.quarantine.load_key()  # the release-link key file, likewise
        core.verifier.load_nameservers()  # /etc/resolv.conf unless dns_servers are given
        core.safedrop.prepare()  # the drop files' directories, half-written uploads removed
        core.mail.files.prepare()  # the Mail API's files, likewise
        return core

    def background_services(self) -> list[IService]:
        """Timers and workers (queue runners, sync schedulers) owned by the daemon."""
        # The filter chain first, so it is closed after the queue stopped using it.
        services: list[IService] = [self.filter_service, self.domains, self.fetch.scheduler,
                                    self.queue.service, self.quarantine, self.outbox,
                                    self.job_runner]
        if isinstance(self.clock, DatabaseTime):  # the daemon's (mailcore.service)
            services.insert(0, ClockFollower(self.clock, self.db))
            if not self.db.is_sqlite:  # several nodes may share the store
                services.insert(1, StuckSessionReaper(
                    self.db, self.clock, silent=self.db.idle_in_transaction_timeout))
        # One node of those sharing the store runs each of the leased per period: each
        # node's run would delete the same rows (and wait on the other's row locks), or
        # sweep the same shared files. (The token sweep's rollovers are also made lazily,
        # by any node's next charge of the tank.)
        services.append(self._leased(self.tokens))
        services.append(self.backup_index)
        services.extend(self._leased(sweeper) for sweeper in (
            CredentialSweeper(self.identity, self.clock), BucketSweeper(self.rate_buckets),
            SendsSweeper(self.send_caps), OAuthPruner(self.oauth),
            SafedropSweeper(self.safedrop),
            MailFilesSweeper(self.mail, self.mailapi_settings.file_sweep_interval),
            GoneSweeper(self.mail), OldJobsSweeper(self.jobs, self.clock),
            PolicySweeper(self.db, self.clock)))
        if self.recipient_verifier is not None:
            # (the verifier itself for its idle probe connections, closed at stop)
            services.append(self.recipient_verifier)
            services.append(self._leased(VerdictSweeper(self.recipient_verifier)))
        if self.shared_store:
            services.append(self.node_registry)
        if self.webhooks.sender is not None:
            services.append(self.webhooks.sender)
            services.append(self._leased(WebhookPruner(self.webhooks, self.clock)))
        if self.verifier.settings.verify_domains:
            services.append(self.verifier)
        if self.certificate is not None:
            services.append(self.certificate)
        return services

    def _leased(self, service: PeriodicService) -> PeriodicService:
        """`service`, run on one node of those sharing the store per period."""
        service.leases = self.leases
        return service

    def listener_services(self, reactor: IReactorTCP) -> list[IService]:
        """Non-HTTP listeners: one per `config.smtp_endpoints`, all sharing one SMTP factory
        (so the connection limits are global). Started after the HTTP site. The address
        each one binds is recorded in `listeners`. An `ssl:` one's certificate is loaded
        now (blocks) and again when its files change (`tls_listeners`, whose `services()`
        the caller starts)."""
        factory = self.smtp_factory()
        services: list[IService] = []
        for description in self.config.smtp_endpoints:
            endpoint = ListeningEndpoint(self.tls_listeners.endpoint(reactor, description),
                                         self.listeners)
            svc = StreamServerEndpointService(endpoint, factory)
            svc._raiseSynchronously = True  # a port in use fails the start, as strports does
            services.append(svc)
        return services

    def smtp_factory(self) -> SMTPServerFactory:
        """The inbound ESMTP factory: [smtp] settings, the domain snapshot, the spool, and
        the daemon's TLS pair for STARTTLS, replaced when its files change (`certificate`).
        Reads the certificate files the first time (blocks)."""
        certificate = self.certificate
        tls = certificate.options() if certificate is not None else None
        sink = self.spool
        settings = SMTPSettings.from_config(self.config)
        factory = SMTPServerFactory(settings, self.domains, sink, self.clock, tls=tls,
                                    room=self.mailbox_room(settings.max_message_size),
                                    verifier=self.recipient_verifier,
                                    stress_gauge=self.smtp_stress)
        if certificate is not None:
            certificate.serve(functools.partial(setattr, factory, "tls"))
        return factory
