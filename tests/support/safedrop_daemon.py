"""The real daemon (tests.test_daemon.DaemonTestCase) with user alice, her API key and her
safedrop session on it, its queue relaying to an SMTP sink on 127.0.0.1: what the safedrop
tests against twistd start from."""

from __future__ import annotations

import email
import email.policy
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support.cli import cli_command
from tests.support.mailsink import SinkFactory, SinkState
from tests.support.reactor import get_reactor
from tests.support.servers import ServerProcess
from tests.test_daemon import DaemonTestCase, _env
from tests.test_web_safedrop_pages import LINK


class SafedropDaemonTestCase(DaemonTestCase):
    async def start_as_alice(self, *options: str) -> ServerProcess:
        """Add alice (alice@example.test) and an API key, start the daemon (`options` go to
        the CLI and to the daemon, such as `--config FILE`) and log in: `self.http`,
        `self.base_url` and `self.auth` (her X-Auth-Token) for the API calls."""
        # Through the CLI zygote (tests.support.cli): not ~1,000 modules imported again
        # for each command.
        cli = ["--data-dir", str(self.data_dir), *options]
        made = await cli_command(
            *cli, "user", "add", "alice", "--email", "alice@example.test", "--password", "pw",
            env=_env(), cwd=self.base)
        self.assertEqual(made.status, 0, made.err)
        key = await cli_command(*cli, "apikey", "create", "alice", env=_env(), cwd=self.base)
        self.assertEqual(key.status, 0, key.err)
        daemon = await self.start_daemon(*options)
        pool = HTTPConnectionPool(get_reactor(), persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(get_reactor(), pool=pool))
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        login: dict[bytes | str, bytes | str] = {
            "X-Auth-User": "alice@example.test", "X-Auth-Key": key.out.strip()}
        response = await self.http.get(self.base_url + "/auth", headers=login)
        await treq.content(response)
        self.auth: dict[bytes | str, bytes | str] = {
            "X-Auth-Token": response.headers.getRawHeaders("X-Auth-Token")[0]}
        return daemon

    async def start_with_sink(self) -> ServerProcess:
        """`start_as_alice`, with every mail the queue sends relayed to `self.sink`."""
        self.sink = SinkState()
        listener = await TCP4ServerEndpoint(get_reactor(), 0, interface="127.0.0.1").listen(
            SinkFactory(self.sink))
        self.addCleanup(listener.stopListening)
        config = self.base / "mailcore.toml"
        # A notification is queued unleased, for the queue's sweeper to take within
        # poll_interval (mailcore.queue.spool.thd_queue): 0.5 s, not the 5 s default.
        config.write_text(
            f'[queue]\nrelayhost = "127.0.0.1:{listener.getHost().port}"\n'
            "allow_loopback = true\npoll_interval = 0.5\n", encoding="utf-8")
        return await self.start_as_alice("--config", str(config))

    async def delivered_link(self, recipient: str) -> str:
        """The drop link (its path) in the text of the first message the sink received for
        `recipient` (waits for it)."""
        while True:
            for received in self.sink.messages:
                if recipient in received.rcpts:
                    message: Any = email.message_from_bytes(received.data,
                                                            policy=email.policy.default)
                    body = message.get_body(("plain", "html")).get_content()
                    match = LINK.search(body)
                    assert match is not None, body
                    return match.group(1)
            await self.sink.wait_for(len(self.sink.messages) + 1)
