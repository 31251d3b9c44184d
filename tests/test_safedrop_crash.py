"""safedrop against the real daemon killed with SIGKILL while uploads are being stored:
every upload it answered 200 has its row and its whole file after the kill (the file is
fsynced and renamed into place, its directory fsynced, before the row that names it
commits, and the row commits before the answer), and no row names a missing or short file.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
from typing import Any

import treq
from twisted.internet import defer

from tests.support.safedrop_daemon import SafedropDaemonTestCase
from tests.test_web_safedrop_api import MULTIPART, multipart_file

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
