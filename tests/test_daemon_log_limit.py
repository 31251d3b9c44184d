"""The real daemon bounds its log: a flood of refused HTTP connections from one address
leaves ten lines and a summary in its log, not one line per connection; twistd's
`--logfile` is rotated within the `[log]` table's bounds, and rotated files beyond `keep`
are deleted."""

from __future__ import annotations

import re
import signal

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from mailcore.logfilter import BURST
from tests.support.reactor import get_reactor
from tests.support.servers import sleep
from tests.test_daemon import DaemonTestCase

REFUSAL = "refused an HTTP connection from 127.0.0.1: too many connections from your address"


class Reader(Protocol):
    """Reads what the server sends until it closes."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[bytes] = Deferred()
        self.answered: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if not self.answered.called:
            self.answered.callback(data)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self.closed.callback(self.received)


class DaemonLogLimitTests(DaemonTestCase):
    async def connect(self) -> Reader:
        endpoint = TCP4ClientEndpoint(get_reactor(), "127.0.0.1", self.http_port)
        return await connectProtocol(endpoint, Reader())

    async def hold(self) -> tuple[Reader, int]:
        """The one connection this address may have, kept alive after a request answered
        on it, and how many tries were refused first: the start-up probe's connection may
        still hold the slot for a moment after its reply, and a refused try here would
        leave the slot to one of the flood's connections (answered nothing, closed idle a
        minute later)."""
        for tries in range(100):
            reader = await self.connect()
            assert reader.transport is not None
            reader.transport.write(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            if not (await reader.answered).startswith(b"HTTP/1.1 503 "):
                return reader, tries
            await reader.closed
            await sleep(0.05)
        raise AssertionError("the start-up probe's connection was never let go")

    async def test_a_flood_of_refusals_gives_a_bounded_log(self) -> None:
        config = self.base / "mailcore.toml"
        config.write_text("[web]\nmax_connections_per_ip = 1\n")
        daemon = await self.start_daemon("--config", str(config))
        held, refused_first = await self.hold()
        self.addCleanup(lambda: held.transport.loseConnection() if held.transport else None)
        refused = [await self.connect() for _ in range(100)]
        replies = await gatherResults([r.closed for r in refused])
        self.assertEqual([r[:12] for r in replies if not r.startswith(b"HTTP/1.1 503 ")], [])
        status = await daemon.stop(grace=10.0)  # the summary is written at the latest then
        self.assertIn(status, (0, -signal.SIGTERM))
        lines = [line for line in daemon.stdout_path.read_text().splitlines()
                 if REFUSAL in line]
        self.assertEqual(len(lines), BURST + 1, "\n".join(lines))
        # One more when the start-up probe's request was refused too (the port probe before
        # it still held the slot).
        suppressed = 100 + refused_first - BURST
        self.assertRegex(lines[-1], rf"… ({suppressed}|{suppressed + 1}) more like this "
                                    rf"suppressed in the last 60 s: {re.escape(REFUSAL)}")

    async def test_the_log_file_keeps_no_more_rotated_files_than_configured(self) -> None:
        config = self.base / "mailcore.toml"
        config.write_text("[log]\nrotate_length = 2000\nkeep = 2\n")
        logs = self.base / "logs"
        logs.mkdir()
        for n in range(1, 6):  # rotated files of an earlier run
            (logs / f"twistd.log.{n}").write_text("an earlier run\n")
        daemon = await self.start_daemon(
            "--config", str(config), twistd_options=["--logfile", str(logs / "twistd.log")])
        pool = HTTPConnectionPool(get_reactor(), persistent=False)
        http = HTTPClient(Agent(get_reactor(), pool=pool))
        for n in range(60):  # an access-log line each, about 9 KB in all
            response = await http.get(f"http://127.0.0.1:{self.http_port}/no-such-page-{n}")
            await treq.content(response)
        await pool.closeCachedConnections()
        status = await daemon.stop(grace=10.0)
        self.assertIn(status, (0, -signal.SIGTERM))
        self.assertEqual(sorted(p.name for p in logs.iterdir()),
                         ["twistd.log", "twistd.log.1", "twistd.log.2"])
        texts = "".join(p.read_text() for p in logs.iterdir())
        self.assertNotIn("an earlier run", texts)
        self.assertIn("/no-such-page-59 404", texts)
