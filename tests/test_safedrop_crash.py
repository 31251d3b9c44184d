"""safedrop against the real daemon killed with SIGKILL while uploads are being stored:
every upload it answered 200 has its row and its whole file after the kill (the file is
fsynced and renamed into place, its directory fsynced, before the row that names it
commits, and the row commits before the answer), and no row names a missing or short file.
And while links are being opened: every opening recorded as told (opened_receipt_at) has its
receipt in the queue after the kill (one transaction records the one and queues the other).
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import os
import signal
import sqlite3
from typing import Any

import treq
from twisted.internet import defer

from tests.support.safedrop_daemon import SafedropDaemonTestCase
from tests.support.servers import free_port
from tests.test_web_safedrop_api import MULTIPART, multipart_file
from tests.test_web_safedrop_pages import LINK

SIZE = 200_000  # bytes per file: each upload spends a while on its file and its fsyncs
IN_FLIGHT = 6
ANSWERED_BEFORE_KILL = 24


class UploadCrashTests(SafedropDaemonTestCase):
    async def test_every_answered_upload_survives_kill_9(self) -> None:
        daemon = await self.start_as_alice()
        http, base, auth = self.http, self.base_url, self.auth
        response = await http.post(base + "/dropbundles", data={"subject": "crash"},
                                   headers=auth)
        bundle = json.loads(await treq.content(response))
        url = f"{base}/dropbundles/{bundle['id']}/dropfiles"
        headers: dict[Any, Any] = {**auth, **MULTIPART}
        answered: dict[int, str] = {}  # file id -> sha256 of the bytes sent
        killed = defer.Deferred[None]()
        sent = 0

        async def one(n: int) -> None:
            data = os.urandom(SIZE) + b"%d" % n
            try:
                response = await http.post(url, data=multipart_file(f"f{n}.bin", data),
                                           headers=headers)
                body = await treq.content(response)
            except Exception:
                return  # cut off by the kill: never answered
            if response.code == 200:
                answered[json.loads(body)["id"]] = hashlib.sha256(data).hexdigest()
            if len(answered) >= ANSWERED_BEFORE_KILL and not killed.called:
                os.kill(daemon.pid, signal.SIGKILL)  # uploads still in flight
                killed.callback(None)

        async def lane() -> None:
            nonlocal sent
            while not killed.called:
                sent += 1
                await one(sent)

        await defer.gatherResults([defer.Deferred.fromCoroutine(lane())
                                   for _ in range(IN_FLIGHT)])
        await daemon.stop()
        self.assertGreaterEqual(len(answered), ANSWERED_BEFORE_KILL)
        db = sqlite3.connect(self.data_dir / "mailcore.sqlite")
        self.addCleanup(db.close)
        rows = dict(db.execute("SELECT id, sha256 FROM drop_files WHERE bundle_id = ?",
                               (bundle["id"],)).fetchall())
        for file_id, sha256 in answered.items():
            self.assertEqual(rows.get(file_id), sha256, f"answered file {file_id} lost")
        stored = self.data_dir / "safedrop" / str(bundle["id"])
        for file_id, sha256 in rows.items():
            path = stored / sha256
            self.assertTrue(path.is_file(), f"row {file_id} names no file")
            self.assertEqual(hashlib.sha256(path.read_bytes()).hexdigest(), sha256)


RECIPIENTS = 100
OPEN_IN_FLIGHT = 8
OPENED_BEFORE_KILL = 40


class OpenReceiptCrashTests(SafedropDaemonTestCase):
    async def test_every_opening_recorded_as_told_has_its_receipt_after_kill_9(
            self) -> None:
        """email_receipt_when=2: 100 recipients' links opened 8 at a time, the daemon
        killed once 40 pages were answered. Recorded in one commit and queued in the next,
        an opening the kill caught between the two stayed recorded as told with no receipt
        queued, never to be sent (its recipient's next opening is not the first)."""
        config = self.base / "mailcore.toml"
        # Mail waits in the queue (its next hop refuses connections), bodies and all.
        config.write_text(
            '[web]\nsafedrop_user_rate = "1000/second"\n'
            f'[queue]\nrelayhost = "127.0.0.1:{free_port()}"\nallow_loopback = true\n',
            encoding="utf-8")
        daemon = await self.start_as_alice("--config", str(config))
        http, base, auth = self.http, self.base_url, self.auth
        response = await http.post(base + "/dropbundles",
                                    data={"subject": "crash", "email_receipt_when": "2"},
                                    headers=auth)
        bundle = json.loads(await treq.content(response))["id"]
        for n in range(RECIPIENTS):
            response = await http.post(
                f"{base}/dropbundles/{bundle}/dropbundlerecipients",
                data={"email": f"r{n}@example.org"}, headers=auth)
            self.assertEqual(response.code, 200, await treq.content(response))
        upload: dict[Any, Any] = {**auth, **MULTIPART}
        response = await http.post(f"{base}/dropbundles/{bundle}/dropfiles",
                                   data=multipart_file("a.txt", b"data"), headers=upload)
        self.assertEqual(response.code, 200, await treq.content(response))
        response = await http.get(f"{base}/dropbundles/{bundle}?send", headers=auth)
        self.assertEqual(response.code, 200, await treq.content(response))
        await treq.content(response)
        db = sqlite3.connect(self.data_dir / "mailcore.sqlite")
        self.addCleanup(db.close)
        links = [m.group(1) for (body,) in db.execute(
            "SELECT body FROM queue_messages WHERE kind = 'notification'")
            if (m := LINK.search(bytes(body).decode("ascii", "replace")))]
        self.assertEqual(len(links), RECIPIENTS)
        answered = 0
        killed = defer.Deferred[None]()

        async def lane() -> None:
            nonlocal answered
            while links and not killed.called:
                link = links.pop()
                try:
                    response = await http.get(base + link)
                    await treq.content(response)
                except Exception:
                    return  # cut off by the kill
                if response.code == 200:
                    answered += 1
                if answered >= OPENED_BEFORE_KILL and not killed.called:
                    os.kill(daemon.pid, signal.SIGKILL)  # openings still in flight
                    killed.callback(None)

        await defer.gatherResults([defer.Deferred.fromCoroutine(lane())
                                   for _ in range(OPEN_IN_FLIGHT)])
        await daemon.stop()
        self.assertGreaterEqual(answered, OPENED_BEFORE_KILL)
        told = {email for (email,) in db.execute(
            "SELECT email FROM drop_recipients WHERE opened_receipt_at IS NOT NULL")}
        receipts: list[str] = []
        for (body,) in db.execute(
                "SELECT m.body FROM queue_messages m JOIN queue_recipients r "
                "ON r.message_id = m.id WHERE r.address = 'alice@example.test'"):
            message: Any = email.message_from_bytes(bytes(body), policy=email.policy.default)
            receipts.append(message.get_content().split()[0])
        self.assertGreaterEqual(len(told), answered)
        self.assertEqual(sorted(receipts), sorted(told),
                         f"{len(told)} openings recorded as told, {len(receipts)} receipts")
