"""Two real daemons sharing one PostgreSQL and their uploaded files: with one shared
`--files-dir` an attachment posted through one node downloads through the other and neither
logs a complaint; with each node's files in its own data directory the node started second
logs an error naming `files_dir` (mailcore.nodes.files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support.mailsink import Daemon
from tests.support.pg import create_test_database
from tests.support.reactor import get_reactor
from tests.support.servers import tempdir_for
from tests.test_gateway_mailapi import prepare

PAYLOAD = bytes(range(256)) * 1200


def headers(token: str, content_type: str = "") -> dict[bytes | str, bytes | str]:
    found: dict[bytes | str, bytes | str] = {"Auth-Key": token}
    if content_type:
        found["Content-Type"] = content_type
    return found


def log_of(daemon: Daemon) -> str:
    path = Path(daemon.directory) / "twistd.log"
    return path.read_text(errors="replace") if path.exists() else ""


class SharedFilesTests(TestCase):
    timeout = 180

    async def start(self, shared: bool) -> tuple[Daemon, Daemon, dict[str, str]]:
        url = await create_test_database(self)
        base = tempdir_for(self)
        files = base / "shared-files" if shared else None
        a = Daemon(base / "a", db_url=url, name="node-a", files_dir=files)
        b = Daemon(base / "b", db_url=url, name="node-b", files_dir=files)
        tokens = prepare(a, 9)  # no mail leaves: any next-hop port will do
        await a.start()
        self.addCleanup(a.stop)
        await a.process.wait_for_port(a.http_port, timeout=30)
        await b.start()  # second: a's row and markers are there to check
        self.addCleanup(b.stop)
        await b.process.wait_for_port(b.http_port, timeout=30)
        pool = HTTPConnectionPool(get_reactor(), persistent=False)
        self.http = HTTPClient(Agent(get_reactor(), pool=pool))
        return a, b, tokens

    async def post_attachment(self, node: Daemon, token: str) -> str:
        raw = (b'--B\r\nContent-Disposition: form-data; name="subject"\r\n\r\nfiles\r\n'
               b'--B\r\nContent-Disposition: form-data; name="attachment"; filename="d.bin"'
               b"\r\nContent-Type: application/octet-stream\r\n\r\n" + PAYLOAD +
               b"\r\n--B--\r\n")
        response = await self.http.request(
            "POST", f"http://127.0.0.1:{node.http_port}/api/v1/mail/",
            headers=headers(token, "multipart/form-data; boundary=B"),
            data=raw)
        reply: Any = json.loads(await treq.content(response))
        self.assertIn("id", reply, (response.code, reply))  # kept as a draft
        return str(reply["id"])

    async def download(self, node: Daemon, token: str, mail_id: str) -> tuple[int, bytes]:
        response = await self.http.request(
            "GET", f"http://127.0.0.1:{node.http_port}/api/v1/mail/{mail_id}/attachments/1",
            headers=headers(token))
        return response.code, await treq.content(response)

    async def test_an_attachment_posted_through_one_node_downloads_through_the_other(
        self,
    ) -> None:
        a, b, tokens = await self.start(shared=True)
        mail_id = await self.post_attachment(a, tokens["bob"])
        self.assertEqual(await self.download(b, tokens["bob"], mail_id), (200, PAYLOAD))
        mail_id = await self.post_attachment(b, tokens["joe"])
        self.assertEqual(await self.download(a, tokens["joe"], mail_id), (200, PAYLOAD))
        self.assertFalse(any((a.data_dir / "mailapi").glob("files/*/*")))
        for daemon in (a, b):
            self.assertNotIn("files_dir", log_of(daemon))

    async def test_a_node_that_cannot_see_the_others_files_says_so(self) -> None:
        a, b, tokens = await self.start(shared=False)
        self.assertNotIn("files_dir", log_of(a))
        text = log_of(b)
        self.assertEqual(text.count("files_dir: node "), 1)  # once, not again by its timer
        self.assertIn(str(b.data_dir / "mailapi" / "nodes"), text)
        # What the error is about: the file is on node a's disk only.
        mail_id = await self.post_attachment(a, tokens["bob"])
        self.assertEqual(await self.download(a, tokens["bob"], mail_id), (200, PAYLOAD))
        code, _ = await self.download(b, tokens["bob"], mail_id)
        self.assertNotEqual(code, 200)


