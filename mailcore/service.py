"""Assembling the daemon: the store first, then the services, then the listeners.

`makeService` runs the schema migrations before it returns (the reactor is not running yet,
so blocking here is safe), which guarantees no listener opens on an old schema. Services stop
in reverse order: listeners close first, in-flight work finishes, the store closes last.
`makeService`'s last step moves what start-up built out of the cyclic garbage collector's
sight (`settle_heap`).
"""

from __future__ import annotations

import faulthandler
import gc
import signal
import sys
from types import FrameType

from sqlalchemy.exc import SQLAlchemyError
from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailcore.config import Config, ConfigError, DaemonOptions
from mailcore.core import Core
from mailcore.fetch.secrets import SecretError, check_key_blocking
from mailcore.fetch.settings import FetchSettings
from mailcore.files import restrict_umask
from mailcore.logfilter import LogLimiterService
from mailcore.logrotation import LogSettings
from mailcore.privileges import acting_as, daemon_ids
from mailcore.queue.settings import QueueSettings
from mailcore.startup import (
    DataDirLock,
    check_database_url,
    check_listeners,
    check_logfile,
    check_tables,
    check_tls_files,
    database_error,
    ensure_data_dir,
    ensure_files_dir,
    listen_error,
    report_config_errors,
    unix_socket_path,
)
from mailcore.store import Database
from mailcore.store.dbclock import DatabaseTime
from mailcore.store.migrate import check_writable
from mailcore.store.settings import StoreSettings
from mailcore.tls import ensure_certificate

log = Logger()


class Options(DaemonOptions):
    """`twistd mailcore` options. From here on a configuration mistake (ConfigError, from
    the file, `makeService` or a listener) is one line on stderr and exit status 1."""

    def postOptions(self) -> None:
        report_config_errors()
        super().postOptions()


class StoreService(service.Service):
    """Owns the Database: starts its thread pool, closes it after everything else stops."""

    name = "store"

    def __init__(self, db: Database) -> None:
        self.db = db

    def startService(self) -> None:
        super().startService()
        # open() is a coroutine: it must be driven, or the pool never starts (no SQL runs).
        self._opened = Deferred.fromCoroutine(self.db.open())

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self.db.close())


class OrderedMultiService(service.MultiService):
    """A MultiService that stops its children one at a time, the last started first.

    Twisted's MultiService stops every child at once, so the store would close while the
    queue or a listener still finishes in-flight work that needs it (and that work, and
    with it SIGTERM, would hang). Here each child has stopped before the next one stops.

    With a `clock`, the stop ends after `stop_timeout` seconds whatever is still stopping
    (`[store] stop_timeout`: a database that does not answer holds the queue's last
    commits and the store's close for ever): the children not yet stopped are told to stop
    all at once and not waited for, and twistd exits.
    """

    def __init__(self, clock: IReactorTime | None = None, stop_timeout: float = 60.0) -> None:
        super().__init__()
        self.clock = clock
        self.stop_timeout = stop_timeout
        self._current = "none"  # the child stopping now

    def privilegedStartService(self) -> None:
        # twistd opens the listeners here; one that cannot is one line, not a traceback.
        # (MultiService's, one child at a time: the line names the listener's socket.)
        service.Service.privilegedStartService(self)
        for child in self:
            try:
                child.privilegedStartService()
            except (CannotListenError, OverflowError, OSError) as e:
                # A port in use, out of range; a unix: socket's lock file that cannot be
                # made, or that names another user's process.
                error = listen_error(e, unix_socket_path(getattr(child, "endpoint", None)))
                log.critical("mailcore: {message}", message=str(error))
                raise error from None

    def stopService(self) -> Deferred[None]:
        service.Service.stopService(self)  # not MultiService's, which stops all at once
        stopping = Deferred.fromCoroutine(self._stop_in_order())
        if self.clock is None or stopping.called:
            return stopping
        stopped: Deferred[None] = Deferred()
        timer = self.clock.callLater(self.stop_timeout, self._gave_up, stopped)

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not stopped.called:
                stopped.callback(None)

        stopping.addBoth(done)
        return stopped

    def _gave_up(self, stopped: Deferred[None]) -> None:
        waiting = [_service_name(child) for child in reversed(list(self)) if child.running]
        log.critical("mailcore: the stop did not finish within [store] stop_timeout "
                     "({timeout:g} s) and ends now (a database that does not answer?); still "
                     "stopping: {current}; not stopped: {others}. Nothing acknowledged is "
                     "lost", timeout=self.stop_timeout, current=self._current,
                     others=", ".join(waiting) or "none")
        # The rest are told to stop without being waited for: those that need nothing of
        # the store are done at once (the log is written, the data directory's lock let go).
        for child in reversed(list(self)):
            if child.running:
                maybeDeferred(child.stopService).addErrback(_stop_failed, _service_name(child))
        stopped.callback(None)

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            self._current = _service_name(child)
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("stopping {service} failed", service=child)


def _stop_failed(failure: Failure, name: str) -> None:
    log.failure("stopping {service} failed", failure, service=name)


def _service_name(child: service.IService) -> str:
    return str(getattr(child, "name", None) or type(child).__name__)


class SignalsWhileStopping(service.Service):
    """A SIGTERM or SIGINT that comes while the daemon stops is one line.

    Twisted's handler calls `reactor.stop()` for each: the second, while the services
    still finish their work, raised ReactorNotRunning, logged as a traceback ("while
    calling from thread"). When the reactor begins to shut down, the handlers it installed
    are replaced by one that says the daemon is stopping already (SIGKILL ends it at
    once). A handler that is not the reactor's (twistd started without them) is left."""

    name = "signals-while-stopping"

    def __init__(self, reactor: IReactorCore) -> None:
        self.reactor = reactor

    def startService(self) -> None:
        super().startService()
        self.reactor.addSystemEventTrigger("before", "shutdown", self.stopping)

    def stopping(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            if getattr(signal.getsignal(number), "__self__", None) is self.reactor:
                signal.signal(number, self.again)

    def again(self, number: int, frame: object) -> None:
        # In a signal handler: the line is logged by the reactor, as Twisted's own is.
        self.reactor.callFromThread(  # type: ignore[attr-defined]
            log.info, "received {signal} while stopping: the daemon is stopping already "
            "(SIGKILL ends it at once)", signal=signal.Signals(number).name)


def build_core(config: Config, reactor: IReactorCore, *, check_secrets: bool = False,
               named: bool = False, writable: bool = False) -> Core:
    """The data dir, the migrated store, the TLS pair and every mailcore service. Blocks.
    `check_secrets` (the daemon): a ConfigError when the fetch key cannot open the secrets
    the database holds (mailcore.fetch.secrets.check_key_blocking). `named` (the daemon): its
    PostgreSQL sessions carry the node's id ([queue] node_id) after "mailcore". `writable`
    (the daemon): a ConfigError when the database takes no writes (a read-only file).

    What it creates is private to this user: the process umask gets 077 first (the CLI
    comes here first; see mailcore.files)."""
    restrict_umask()
    ensure_data_dir(config)
    ensure_files_dir(config)
    store = StoreSettings.from_config(config.section("store"))
    node = QueueSettings.from_config(config).node_id if named else ""
    db = Database(config.database_url, reactor,  # type: ignore[arg-type]
                  max_threads=store.threads, read_threads=store.read_threads, node=node,
                  idle_in_transaction_timeout=store.idle_in_transaction_timeout)
    db.migrate_blocking()
    if writable:
        check_writable(db.engine, db.engine.url.render_as_string(hide_password=True))
    if check_secrets:
        try:
            check_key_blocking(db.engine, config.data_dir,
                               FetchSettings.from_section(config.section("fetch")).secret_key)
        except SecretError as e:
            raise ConfigError(str(e)) from None
    cert, key = ensure_certificate(
        config.data_dir, config.tls_cert, config.tls_key, config.hostname
    )
    # The services read the database server's clock: nodes sharing the store judge each
    # other's leases by it, whatever their own clocks say (mailcore.store.dbclock).
    time = DatabaseTime(reactor)  # type: ignore[arg-type]
    time.follow_blocking(db.engine)
    core = Core.build(config, db, time, tls_cert=cert, tls_key=key)  # type: ignore[arg-type]
    if check_secrets:
        core.fetch.load_key()  # the fetch password key file, before the reactor runs
        if core.shared_store:  # other nodes: do they see its files, hold its keys?
            core.node_registry.announce_blocking(db.engine)
    return core


def makeService(options: DaemonOptions) -> service.MultiService:
    """The whole daemon as one MultiService (called by the twistd plugin)."""
    from twisted.internet import reactor

    # twistd changes to its --rundir (the current directory by default) after this returns:
    # a relative --data-dir would name another directory for the services than the one
    # the store was made in (the Mail API's file sweep failed, its uploads too).
    config: Config = options.config.absolute()
    # Before anything is written: the data dir, the database, its WAL, the lock file and
    # twistd's log file (opened when this returns) are private to this user.
    restrict_umask()
    # Every mistake is found before anything is written; then this daemon takes its data
    # directory (SQLite) before it migrates.
    check_tables(config, reactor)
    check_listeners(config, reactor)
    check_database_url(config)
    twistd_options = getattr(options, "parent", None)
    check_logfile(twistd_options)
    # Started as root with `twistd --uid`: built as that user (mailcore.privileges).
    with acting_as(daemon_ids(twistd_options), config.data_dir):
        check_tls_files(config)
        lock = DataDirLock.acquire(config)
        try:
            core = build_core(config, reactor,  # type: ignore[arg-type]
                              check_secrets=True, named=True, writable=True)
        except SQLAlchemyError as e:
            raise database_error(config, e) from None
        # No database connection may cross twistd's fork into the background: on SQLite
        # the child kept the parent's connection (made for the migrations) without its
        # locks and read an old snapshot through it, blind to what the CLI wrote. The pool
        # makes new ones.
        core.db.engine.dispose()
        from web.root import build_site

        site = build_site(core)  # (its pages key too)
    top = OrderedMultiService(reactor,  # type: ignore[arg-type]
                              StoreSettings.from_config(config.section("store")).stop_timeout)
    # First in, last out: repeated log lines stay limited until the end of the shutdown.
    LogLimiterService(  # type: ignore[arg-type]
        reactor, rotation=LogSettings.from_config(config.section("log"))
    ).setServiceParent(top)
    SignalsWhileStopping(reactor).setServiceParent(top)  # type: ignore[arg-type]
    if lock is not None:
        lock.setServiceParent(top)
    StoreService(core.db).setServiceParent(top)
    for svc in core.background_services():
        svc.setServiceParent(top)
    for description in config.http_endpoints:
        http = StreamServerEndpointService(
            core.tls_listeners.endpoint(reactor, description), site)
        http._raiseSynchronously = True  # a port in use fails the start, as strports does
        http.setServiceParent(top)
    for svc in core.listener_services(reactor):  # type: ignore[arg-type]
        svc.setServiceParent(top)
    # The `ssl:` listeners' certificates, looked at again every minute (mailcore.tlslisten).
    for reloader in core.tls_listeners.services():
        reloader.setServiceParent(top)
    log.info(
        "mailcore starting: data {data}, database {db}",
        data=str(config.data_dir.resolve()),
        db=core.db.engine.url.render_as_string(hide_password=True),
    )
    settle_heap()
    enable_stack_dumps()
    return top


def enable_stack_dumps() -> None:
    """`kill -USR2` writes every thread's Python stack to stderr (faulthandler): what a
    daemon that stopped answering, or takes long to shut down, is doing; the daemon carries
    on. (SIGUSR1 is twistd's: it rotates the log.) Called in the main thread.

    The dump is made by a Python signal handler, which Python runs in the main thread
    between two bytecodes, holding the GIL, so no other thread changes its frames while
    they are read. faulthandler's own handler (`faulthandler.register`) dumps inside the
    C signal handler while the other threads run: it read frames they were popping and
    killed the daemon with SIGSEGV, within a few signals under load (CPython gh-116008).
    A reactor stuck in Python code (a loop, a wait on a lock, a blocking call) still
    dumps at once, which is the hang this is for; one stuck in a C call that holds the GIL
    dumps when that call returns.
    """
    stderr = sys.stderr.fileno()  # twistd replaces sys.stderr when its logging starts

    def dump(signum: int, frame: FrameType | None) -> None:
        faulthandler.dump_traceback(stderr, all_threads=True)

    signal.signal(signal.SIGUSR2, dump)


def settle_heap() -> None:
    """Collect start-up's garbage, then freeze what is left (`gc.freeze`). Blocks.

    Start-up leaves some 150,000 objects that live as long as the process (modules, the
    schema, compiled statements, the settings). In the oldest generation, every full
    collection walked them all, holding the GIL for 100-250 ms on this machine kind, every
    few seconds under load: the reactor and every pool thread stood still, and those pauses
    were the HTTP APIs' p99 at 16 connections (the 1M-message list: 122-140 ms, frozen 41-59
    ms). Frozen, they are never walked again; what the daemon allocates later is collected
    as before. Called when the reactor does not run yet, so the one collection here delays
    no one.
    """
    gc.collect()
    gc.freeze()
