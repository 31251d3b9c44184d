"""safedrop against the real daemon (twistd on free ports, a temp data dir): a 1 GiB upload
keeps the daemon's peak RSS within 64 MB of what it was before (twisted.web spools the
body to a temp file; the upload is parsed from it a chunk at a time into its final place),
and an upload cut off halfway leaves no file and no row; a download cut off and resumed
with Range counts as the recipient's download (read_remove removes the drop)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from tests.support.pages import csrf_cookie, csrf_field
from tests.support.reactor import get_reactor
from tests.support.safedrop_daemon import SafedropDaemonTestCase

GIB = 1024**3
CHUNK = 256 * 1024
BOUNDARY = b"upload-boundary-7f3a"


def peak_rss_kib(pid: int) -> int:
    """VmHWM: the most resident memory the process has had, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@implementer(IPullProducer)
class _Body:
    """Writes `size` bytes of file data framed as one multipart part, as it is pulled;
    with `stop_after`, aborts the connection after that many bytes of file data."""

    def __init__(self, protocol: _Upload, size: int, stop_after: int | None) -> None:
        self.protocol = protocol
        self.left = size
        self.sent = 0
        self.stop_after = stop_after
        self.epilogue_sent = False

    def resumeProducing(self) -> None:
        transport: Any = self.protocol.transport
        assert transport is not None
        if self.stop_after is not None and self.sent >= self.stop_after:
            transport.unregisterProducer()
            transport.abortConnection()
            return
        if self.left:
            n = min(CHUNK, self.left)
            transport.write(bytes([self.sent // CHUNK % 251]) * n)
            self.left -= n
            self.sent += n
            return
        if not self.epilogue_sent:
            self.epilogue_sent = True
            transport.write(b"\r\n--" + BOUNDARY + b"--\r\n")
            transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.left = 0


class _Upload(Protocol):
    def __init__(self, path: str, token: str, size: int, stop_after: int | None) -> None:
        self.path = path
        self.token = token
        self.size = size
        self.stop_after = stop_after
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        head = (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"the_file\"; "
                b"filename=\"big.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n")
        tail = b"\r\n--" + BOUNDARY + b"--\r\n"
        length = len(head) + self.size + len(tail)
        transport: Any = self.transport
        assert transport is not None
        transport.write(
            f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            f"X-Auth-Token: {self.token}\r\nContent-Length: {length}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY.decode()}\r\n\r\n".encode()
            + head
        )
        transport.registerProducer(_Body(self, self.size, self.stop_after), False)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.received)


class BigUploadTests(SafedropDaemonTestCase):
    async def upload(self, path: str, token: str, size: int,
                     stop_after: int | None = None) -> bytes:
        endpoint = TCP4ClientEndpoint(get_reactor(), "127.0.0.1", self.http_port)
        protocol = _Upload(path, token, size, stop_after)
        await connectProtocol(endpoint, protocol)
        return await protocol.done

    async def test_a_1_gib_upload_keeps_rss_low_and_a_cut_one_leaves_nothing(self) -> None:
        daemon = await self.start_as_alice()
        http, base, auth = self.http, self.base_url, self.auth
        token = str(auth["X-Auth-Token"])
        response = await http.post(base + "/dropbundles", data={"subject": "big"},
                                   headers=auth)
        bundle = json.loads(await treq.content(response))
        files = f"/dropbundles/{bundle['id']}/dropfiles"

        # Cut off halfway: nothing stays.
        await self.upload(files, token, 64 * 1024 * 1024, stop_after=32 * 1024 * 1024)
        response = await http.get(base + files, headers=auth)
        self.assertEqual(json.loads(await treq.content(response)), [])
        stored = self.data_dir / "safedrop"
        self.assertEqual([p for p in stored.rglob("*") if p.is_file()], [])

        before = peak_rss_kib(daemon.pid)
        reply = await self.upload(files, token, GIB)
        self.assertIn(b"HTTP/1.1 200 ", reply.split(b"\r\n", 1)[0] + b" ")
        after = peak_rss_kib(daemon.pid)
        self.assertLess(after - before, 64 * 1024, (before, after))
        body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["the_file"], "big.bin")
        [saved] = [p for p in (stored / str(bundle["id"])).iterdir()]
        self.assertEqual(saved.stat().st_size, GIB)
        self.assertEqual(list((stored / "tmp").iterdir()), [])


class _Download(Protocol):
    """GET `path` (with `Range`, when given); with `stop_after`, drops the connection once
    that many bytes of the body have come."""

    def __init__(self, path: str, headers: str = "", stop_after: int | None = None) -> None:
        self.request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                        f"{headers}\r\n").encode()
        self.stop_after = stop_after
        self.received = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.stop_after is not None and len(self.body()) >= self.stop_after:
            transport: Any = self.transport
            transport.abortConnection()

    def body(self) -> bytes:
        return self.received.partition(b"\r\n\r\n")[2]

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(self.received)


class ResumedDownloadTests(SafedropDaemonTestCase):
    async def test_a_download_cut_off_and_resumed_counts_and_read_remove_removes(
            self) -> None:
        size = 24 * 1024 * 1024  # far more than the socket buffers hold between the two
        await self.start_with_sink()
        http, base, auth = self.http, self.base_url, self.auth
        response = await http.post(base + "/dropbundles", data={"subject": "resume"},
                                   headers=auth)
        bundle = json.loads(await treq.content(response))
        self.assertTrue(bundle["read_remove"])
        response = await http.post(base + f"/dropbundles/{bundle['id']}/dropbundlerecipients",
                                   data={"email": "ann@example.org"}, headers=auth)
        self.assertEqual(response.code, 200, await treq.content(response))
        endpoint = TCP4ClientEndpoint(get_reactor(), "127.0.0.1", self.http_port)
        upload = _Upload(f"/dropbundles/{bundle['id']}/dropfiles",
                         str(auth["X-Auth-Token"]), size, None)
        await connectProtocol(endpoint, upload)
        reply = await upload.done
        file_id = json.loads(reply.split(b"\r\n\r\n", 1)[1])["id"]
        response = await http.get(base + f"/dropbundles/{bundle['id']}?send", headers=auth)
        self.assertEqual(response.code, 200, await treq.content(response))
        link = await self.delivered_link("ann@example.org")
        path = f"{link}/files/{file_id}"
        # read_remove: the download starts from the button on the page (a POST), whose
        # cookie lets the file's address download it.
        response = await http.get(base + path)
        page = await treq.content(response)
        csrf = csrf_cookie({"set-cookie": response.headers.getRawHeaders("set-cookie")})
        cookie: dict[bytes | str, bytes | str] = {"Cookie": f"mc_csrf={csrf}"}
        response = await http.post(
            base + path, data={"action": "download", "csrf_token": csrf_field(page)},
            headers=cookie, allow_redirects=False)
        self.assertEqual(response.code, 303, await treq.content(response))
        [grant] = [c.split(";")[0] for c in response.headers.getRawHeaders("set-cookie")
                   if c.startswith("mc_drop_dl=")]

        async def get(headers: str = "", stop_after: int | None = None) -> _Download:
            client = _Download(path, f"Cookie: {grant}\r\n{headers}", stop_after)
            await connectProtocol(endpoint, client)
            await client.done
            return client

        cut = await get(stop_after=1024 * 1024)
        have = cut.body()
        self.assertTrue(cut.received.startswith(b"HTTP/1.1 200 "), cut.received[:200])
        self.assertLess(len(have), size)
        response = await http.get(base + link)
        self.assertEqual(response.code, 200)  # the cut-off download is not the whole file
        await treq.content(response)
        rest = await get(f"Range: bytes={len(have)}-\r\n")
        self.assertTrue(rest.received.startswith(b"HTTP/1.1 206 "), rest.received[:200])
        self.assertEqual(len(have) + len(rest.body()), size)
        self.assertEqual(have[:CHUNK], bytes([0]) * CHUNK)  # the upload's pattern
        # Ann has every byte: read_remove ends her access and deletes the files.
        response = await http.get(base + link)
        self.assertEqual(response.code, 410)
        await treq.content(response)
        stored = self.data_dir / "safedrop" / str(bundle["id"])
        self.assertEqual([p for p in stored.rglob("*") if p.is_file()], [])
