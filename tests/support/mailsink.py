"""Test helpers for the queue and delivery tests: a byte-exact SMTP sink of ours, a
scripted connector for Clock-driven runner tests, and served-domain fixtures.

`SinkProtocol` is a small receiving ESMTP server that keeps every message's DATA exactly as
it arrived (after undoing dot-stuffing), so a test can compare bodies byte for byte. It can
offer STARTTLS and then refuse it (454) or break the handshake, and answer chosen recipients
with chosen replies.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import Connection, insert, select
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from mailcore.queue.routing import Hop
from mailcore.queue.runner import Connector
from mailcore.smtp.client import Reply, SMTPClientError, TLSFailed, TransactionResult
from mailcore.store import Database
from mailcore.store.schema import domains, mailboxes, users
from tests.support.fetchenv import thd_make_user

REPO = str(__import__("pathlib").Path(__file__).resolve().parent.parent.parent)

# -- served domains ---------------------------------------------------------------------------

_owner_counter = itertools.count(1)


def thd_add_domain(
    conn: Connection, name: str, host: str, port: int, require_tls: bool = False,
    tls: str | None = None, vouched: bool = False,
) -> int:
    """Insert a served domain (and an owner when none exists); returns the domain id.

    `tls` is the domain's own outbound TLS policy (None: the queue default);
    `require_tls` is the DomainService shorthand for tls "verify"; `vouched`: as the
    operator's adds (`mailcore.queue.model.VOUCHED`), not as the API's."""
    now = datetime.datetime.now(datetime.UTC)
    owner = conn.execute(select(users.c.id).limit(1)).scalar()
    if owner is None:
        n = next(_owner_counter)
        owner = conn.execute(
            insert(users).values(
                username=f"owner{n}", email=f"owner{n}@example.test", nic=f"N{n}",
                created_at=now,
            ).returning(users.c.id)
        ).scalar_one()
    return int(
        conn.execute(
            insert(domains).values(
                owner_id=owner, name=name, redirect_host=host, redirect_port=port,
                tls="verify" if require_tls else tls, created_at=now,
                verified_at=now if vouched else None,
            ).returning(domains.c.id)
        ).scalar_one()
    )


async def add_domain(db: Database, name: str, host: str, port: int, **kw: Any) -> int:
    return await db.run("test_add_domain", thd_add_domain, name, host, port, **kw)


# -- a byte-exact sink ----------------------------------------------------------------------



async def add_hosted_mailbox(db: Database, address: str) -> int:
    """A user bob, the served domain hosted.test and a Mail API mailbox `address` of bob's,
    written straight into the store; bob's id."""
    owner: int = await db.run("user", thd_make_user, "bob")
    domain = await db.run("domain", thd_add_domain, "hosted.test", "mx.hosted.test", 25)
    await db.run("box", lambda c: c.execute(insert(mailboxes).values(
        address=address, owner_id=owner, created_at=1.0, domain_id=domain)))
    return owner

@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes


@dataclass
class SinkState:
    """What every connection to one sink shares: received messages and the script."""

    messages: list[Received] = field(default_factory=list)
    rcpt_reply: Callable[[str], bytes | None] = lambda _addr: None
    mail_reply: bytes | None = None  # sent to MAIL instead of 250
    answer_quit: bool = True  # False: QUIT is neither answered nor closes the connection
    data_reply: Callable[[Received], bytes | None] = lambda _msg: None
    # None: not offered; "ok" | "refuse" | "broken" | "inject" (an EHLO reply of its own
    # sent in clear right behind the 220, in the same write, before the handshake)
    starttls: str | None = None
    tls_context: Any = None
    pipelining: bool = True
    eight_bit: bool = True  # offer 8BITMIME
    # Sent at the first line of a message's data instead of reading on to its end: the data
    # mode ends there, and the rest is read as commands (a hop that took something for the
    # end of the data, or lies).
    early_reply: bytes | None = None
    connections: int = 0
    commands: list[bytes] = field(default_factory=list)
    arrived: list[defer.Deferred[None]] = field(default_factory=list)

    async def wait_for(self, count: int) -> None:
        while len(self.messages) < count:
            d: defer.Deferred[None] = defer.Deferred()
            self.arrived.append(d)
            await d


class SinkProtocol(LineReceiver):
    delimiter = b"\r\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, state: SinkState) -> None:
        self.state = state
        self._reset()
        self._in_data = False
        self._data: list[bytes] = []

    def _reset(self) -> None:
        self.mail_from: str | None = None
        self.rcpts: list[str] = []

    def connectionMade(self) -> None:
        self.state.connections += 1
        self.sendLine(b"220 sink.test ESMTP test sink")

    def lineReceived(self, line: bytes) -> None:
        if self._in_data:
            if self.state.early_reply is not None:
                self._in_data = False
                self._reset()
                self.sendLine(self.state.early_reply)
                return
            if line == b".":
                self._in_data = False
                data = b"".join(self._data)
                self._data = []
                msg = Received(self.mail_from or "", list(self.rcpts), data)
                reply = self.state.data_reply(msg)
                if reply is None:
                    self.state.messages.append(msg)
                    reply = b"250 2.0.0 Ok: queued"
                    arrived, self.state.arrived = self.state.arrived, []
                    for d in arrived:
                        d.callback(None)
                self._reset()
                self.sendLine(reply)
                return
            self._data.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
            return
        self.state.commands.append(line)
        verb = line.split(b" ", 1)[0].upper()
        arg = line[len(verb) :].strip()
        if verb == b"EHLO":
            caps = [b"250-sink.test", b"250-SIZE 100000000"]
            if self.state.eight_bit:
                caps.append(b"250-8BITMIME")
            if self.state.pipelining:
                caps.append(b"250-PIPELINING")
            if self.state.starttls and not getattr(self, "_tls", False):
                caps.append(b"250-STARTTLS")
            caps.append(b"250 ENHANCEDSTATUSCODES")
            self.transport.write(b"\r\n".join(caps) + b"\r\n")  # type: ignore[union-attr]
        elif verb == b"HELO":
            self.sendLine(b"250 sink.test")
        elif verb == b"STARTTLS":
            mode = self.state.starttls
            if mode == "refuse":
                self.sendLine(b"454 4.7.0 TLS not available due to temporary reason")
            elif mode == "broken":
                self.sendLine(b"220 2.0.0 Ready to start TLS")
                self.transport.write(b"this is not a TLS record\r\n" * 4)  # type: ignore[union-attr]
                self.transport.loseConnection()  # type: ignore[union-attr]
            else:
                injected = b"250-sink.test\r\n250 AUTH PLAIN\r\n" if mode == "inject" else b""
                self.transport.write(  # type: ignore[union-attr]
                    b"220 2.0.0 Ready to start TLS\r\n" + injected)
                self.clearLineBuffer()
                self._tls = True
                self.transport.startTLS(self.state.tls_context)  # type: ignore[union-attr]
        elif verb == b"MAIL":
            if self.state.mail_reply is not None:
                self.sendLine(self.state.mail_reply)
                return
            self.mail_from = arg.split(b":", 1)[1].split(b">")[0].lstrip(b" <").decode()
            self.rcpts = []
            self.sendLine(b"250 2.1.0 Ok")
        elif verb == b"RCPT":
            if self.mail_from is None:
                self.sendLine(b"503 5.5.1 need MAIL")
                return
            address = arg.split(b":", 1)[1].split(b">")[0].lstrip(b" <").decode()
            reply = self.state.rcpt_reply(address)
            if reply is None:
                self.rcpts.append(address)
                reply = b"250 2.1.5 Ok"
            self.sendLine(reply)
        elif verb == b"DATA":
            if not self.rcpts:
                self.sendLine(b"554 5.5.1 no valid recipients")
                return
            self._in_data = True
            self.sendLine(b"354 End data with <CR><LF>.<CR><LF>")
        elif verb == b"RSET":
            self._reset()
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == b"NOOP":
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == b"QUIT":
            if not self.state.answer_quit:
                return
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()  # type: ignore[union-attr]
        else:
            self.sendLine(b"502 5.5.2 command not recognized")


class SinkFactory(Factory):
    def __init__(self, state: SinkState) -> None:
        self.state = state

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        return SinkProtocol(self.state)


# -- scripted sessions for Clock-driven runner tests -------------------------------------------


class FakeSession:
    """Stands in for SMTPSession: answers per recipient from the connector's script."""

    def __init__(self, connector: ScriptedConnector, hop: Hop) -> None:
        self.connector = connector
        self.hop = hop
        self.extensions: dict[str, str] = {"PIPELINING": "", "8BITMIME": ""}
        if connector.offer_starttls:
            self.extensions["STARTTLS"] = ""
        self.transactions = 0
        self.usable = True
        self.tls = False

    async def starttls(self, creator: Any) -> None:
        self.connector.tls_attempts += 1
        if self.connector.starttls_error is not None:
            self.usable = False
            raise self.connector.starttls_error
        if self.connector.starttls_fails:
            self.usable = False
            raise TLSFailed("STARTTLS refused: 454 4.7.0 not now", code=454)
        self.tls = True

    async def send(self, mail_from: str, recipients: list[str], body: bytes) -> TransactionResult:
        self.transactions += 1
        c = self.connector
        if c.hold is not None:
            await c.hold
        if self.hop.host in c.stalled:  # a tarpit: each send waits for its own release
            release: defer.Deferred[None] = defer.Deferred()
            c.stalled[self.hop.host].append(release)
            await release
        if c.break_during_send:
            self.usable = False
            raise SMTPClientError("connection lost: gone")
        rcpt_replies = [Reply(*c.reply_for(r)) for r in recipients]
        accepted = [r for r, rep in zip(recipients, rcpt_replies, strict=True) if rep.ok]
        data = Reply(250, ("2.0.0 Ok: queued",))
        if accepted:
            c.delivered.append((self.hop, mail_from, accepted, body, self.tls))
        else:
            data = Reply(554, ("5.5.1 no valid recipients",))
        return TransactionResult(Reply(250, ("2.1.0 Ok",)), rcpt_replies, data)

    async def quit(self) -> None:
        self.usable = False
        self.connector.quits += 1

    def abort(self) -> None:
        self.usable = False


class ScriptedConnector(Connector):
    """Connections that succeed or fail as the test says; deliveries are recorded."""

    def __init__(self) -> None:
        self.down: set[Hop] = set()
        self.replies: dict[str, tuple[int, tuple[str, ...]]] = {}
        self.delivered: list[tuple[Hop, str, list[str], bytes, bool]] = []
        self.connects: list[Hop] = []
        self.offer_starttls = False
        self.starttls_fails = False
        self.starttls_error: Exception | None = None  # what STARTTLS raises, if anything
        self.tls_attempts = 0
        self.verified: list[bool] = []  # the `verify` flag of every TLS context asked for
        self.quits = 0
        self.hold: defer.Deferred[None] | None = None
        # Hosts whose sends each wait until the test fires their Deferred (in this list).
        self.stalled: dict[str, list[defer.Deferred[None]]] = {}
        self.break_during_send = False
        self.peer_name_mismatch = False
        self.stall_connect = False  # connections that never open (nor fail)
        # Hosts whose connections open or fail when the test fires their Deferred (here).
        self.pending: dict[str, list[defer.Deferred[Any]]] = {}

    def reply_for(self, address: str) -> tuple[int, tuple[str, ...]]:
        return self.replies.get(address, (250, ("2.1.5 Ok",)))

    def connect(self, hop: Hop) -> defer.Deferred[Any]:
        self.connects.append(hop)
        if self.stall_connect:
            return defer.Deferred()
        if hop.host in self.pending:
            pending: defer.Deferred[Any] = defer.Deferred()
            self.pending[hop.host].append(pending)
            return pending
        if hop in self.down:
            return defer.fail(ConnectionRefusedError("Connection refused"))
        return defer.succeed(FakeSession(self, hop))

    def tls_creator(self, hop: Hop, verify: bool) -> Any:
        self.verified.append(verify)
        return object()

    def check_peer(self, session: Any, hop: Hop) -> None:
        if self.peer_name_mismatch:
            raise ValueError("certificate names someone else")

    def addresses(self) -> list[str]:
        return [a for _hop, _f, rcpts, _b, _t in self.delivered for a in rcpts]


# -- a whole queue on a Clock ---------------------------------------------------------------


def make_queue(
    db: Database, clock: Any, connector: Connector, *, node_id: str = "node-a", **settings: Any
) -> Any:
    """Spool, runner and service on `db` and `clock` with the scripted connector."""
    from prometheus_client import CollectorRegistry

    from mailcore.config import Config
    from mailcore.queue.assembly import build_queue
    from mailcore.queue.settings import QueueSettings

    settings.setdefault("relayhost", "relay.test:25")  # never a real MX lookup in tests
    qs = QueueSettings(node_id=node_id, **settings)
    return build_queue(
        Config(hostname="mx.test"), db, clock, CollectorRegistry(), connector=connector,
        settings=qs,
    )


def envelope(sender: str, *rcpts: tuple[str, int | None], kind: str = "relay") -> Any:
    from mailcore.smtp.envelope import Envelope, Recipient

    return Envelope(sender, tuple(Recipient(a, d) for a, d in rcpts), kind=kind)  # type: ignore[arg-type]


# -- a real daemon, and a sender that records what got a 250 ---------------------------------


def toml_value(value: Any) -> str:
    """`value` as TOML writes it (a bool is `true`/`false`, not Python's `True`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def twistd_binary() -> str:
    import sys
    from pathlib import Path

    return str(Path(sys.executable).parent / "twistd")


class Daemon:
    """`twistd -n mailcore` in its own data dir; restartable after a kill."""

    def __init__(
        self, directory: Any, *, db_url: str | None = None, queue: dict[str, Any] | None = None,
        web: dict[str, Any] | None = None, name: str = "mailcore", files_dir: Any = None,
        mailapi: dict[str, Any] | None = None, smtp: dict[str, Any] | None = None,
        store: dict[str, Any] | None = None,
    ) -> None:
        from tests.support.servers import free_ports

        self.directory = directory
        self.files_dir = files_dir  # --files-dir (nodes sharing one), else the data dir's
        self.data_dir = directory / "var"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.db_url = db_url or f"sqlite:///{self.data_dir / 'mailcore.sqlite'}"
        self.smtp_port, self.http_port = free_ports(2)
        self.name = name
        self.runs = 0
        # Limits for load from one address. Mail is filtered and charged (the defaults), but
        # an empty tank lets it through: a free plan's tank would run dry in these runs.
        # The next hops (sinks) listen on 127.0.0.1, which the operator must allow.
        lines = ["[smtp]", "max_connections = 1000", "max_connections_per_ip = 1000",
                 *(f"{key} = {toml_value(value)}" for key, value in (smtp or {}).items()), "",
                 "[tokens]", 'when_empty = "allow"', "", "[queue]", "allow_loopback = true"]
        for section, values in (("queue", queue), ("web", web), ("mailapi", mailapi),
                                ("store", store)):
            if section != "queue" and values:
                lines += ["", f"[{section}]"]
            for key, value in (values or {}).items():
                lines.append(f"{key} = {toml_value(value)}" if not isinstance(value, str) else
                             f'{key} = "{value}"')
        self.config = directory / "mailcore.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.process: Any = None

    def prepare_blocking(self, domain: str, sink_port: int) -> int:
        """Migrate the store and add the served domain (before the first start; blocks)."""
        self.copy_migrated_store()
        db = Database(self.db_url, None, synchronous=True)  # type: ignore[arg-type]
        db.migrate_blocking()  # at head already when copied
        domain_id = done(db.run("add", thd_add_domain, domain, "127.0.0.1", sink_port))
        db.engine.dispose()
        return int(domain_id)

    def copy_migrated_store(self) -> None:
        """A daemon's own SQLite store (the default `db_url`) not made yet is a copy of the
        test process's migrated one (tests.support.db), not migrated from empty again by a
        test's setup or the daemon's first start. Blocks."""
        from tests.support.db import copy_migrated_sqlite_blocking

        path = self.data_dir / "mailcore.sqlite"
        if self.db_url == f"sqlite:///{path}" and not path.exists():
            copy_migrated_sqlite_blocking(path)
            path.chmod(0o600)  # as the daemon makes it (umask 077)

    async def start(self) -> None:
        import os
        import signal

        from tests.support.servers import ServerProcess

        if self.runs == 0:
            self.copy_migrated_store()

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        self.runs += 1
        self.process = ServerProcess(
            [twistd_binary(), "-n", "--pidfile=", "-l", str(self.directory / "twistd.log"),
             "mailcore", "--data-dir", str(self.data_dir), "--db", self.db_url,
             "-c", str(self.config),
             *(["--files-dir", str(self.files_dir)] if self.files_dir is not None else []),
             "--smtp", f"tcp:{self.smtp_port}:interface=127.0.0.1:backlog=500",
             "--http", f"tcp:{self.http_port}:interface=127.0.0.1"],
            directory=self.directory, name=f"{self.name}-{self.runs}", env=env, grace=30.0,
            dump_signal=signal.SIGUSR2,  # a daemon that does not stop shows where it hangs
        ).start()
        await self.process.wait_for_port(self.smtp_port, timeout=30)

    def kill(self) -> None:
        import os
        import signal

        if self.process is not None and self.process.running():
            os.kill(self.process.pid, signal.SIGKILL)

    def pause(self, paused: bool = True) -> None:
        """Stop the process where it stands (SIGSTOP: a long GC pause, a frozen VM), or let
        it go on (SIGCONT)."""
        import os
        import signal

        if self.process is not None and self.process.running():
            os.kill(self.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    async def stop(self) -> None:
        if self.process is not None:
            self.pause(False)  # a paused process would not hear the stop
            await self.process.stop()


async def open_session(port: int, helo: str = "client.test",
                       reply_timeout: float = 30.0) -> Any:
    """An SMTPSession of ours to 127.0.0.1:port, for driving the gateway in tests:
    `reply_timeout` seconds for each reply (twice that for the one after the message's data)."""
    from twisted.internet.endpoints import TCP4ClientEndpoint

    from mailcore.smtp.client import SMTPSession, client_factory
    from tests.support.reactor import get_reactor

    reactor = get_reactor()
    proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(
        client_factory(reactor, reply_timeout)
    )
    session = SMTPSession(cast(Any, proto), helo_name=helo, data_timeout=2 * reply_timeout)
    await session.handshake()
    return session


@dataclass
class SendLog:
    """What a bulk send achieved: the sequence numbers that got a 250, and the rest."""

    accepted: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)


def numbered_message(seq: int, size: int = 2000) -> bytes:
    head = f"From: a@x.test\r\nTo: b@customer.test\r\nSubject: seq {seq}\r\nX-Seq: {seq}\r\n\r\n"
    return head.encode() + (b"body text of a numbered message\r\n" * (size // 34 + 1))


def seq_of(data: bytes) -> int | None:
    marker = data.find(b"\r\nX-Seq: ")
    if marker < 0:
        return None
    end = data.find(b"\r\n", marker + 9)
    return int(data[marker + 9 : end])


async def send_numbered(
    ports: Any, seqs: list[int], log: SendLog, *, concurrency: int = 10,
    rcpt: str = "b@customer.test", stop: Any = None, size: int = 2000,
    reply_timeout: float = 30.0,
) -> None:
    """Send each numbered message (of about `size` bytes) once over `concurrency`
    connections (to `ports()` in turn), recording which got a 250. A failed message is not
    retried: it was never accepted. Connection failures (a daemon being killed) and replies
    that take over `reply_timeout` seconds (a daemon stopped) make that worker reconnect and go
    on."""
    from tests.support.servers import sleep

    queue = list(reversed(seqs))

    async def worker(n: int) -> None:
        session = None
        while queue and not (stop is not None and stop()):
            if session is None or not session.usable:
                try:
                    port_list = ports()
                    session = await open_session(port_list[n % len(port_list)],
                                                 reply_timeout=reply_timeout)
                except Exception:
                    session = None
                    await sleep(0.1)
                    continue
            seq = queue.pop()
            try:
                result = await session.send("a@x.test", [rcpt], numbered_message(seq, size))
            except Exception:
                log.failed.add(seq)
                session = None
                continue
            if result.data is not None and result.data.code == 250 and result.rcpts[0].ok:
                log.accepted.add(seq)
            else:
                log.failed.add(seq)
        if session is not None:
            await session.quit()

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(worker(n)) for n in range(concurrency)]
    )


def done(d: defer.Deferred[Any]) -> Any:
    """The result of a Deferred that has already fired (the synchronous test Database)."""
    out: list[Any] = []
    failures: list[Any] = []
    d.addCallbacks(out.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert out, "the Deferred has not fired"
    return out[0]
