"""What the daemon and the CLI create is private: the data dir 0700, the database, its WAL
and shared-memory files and every key 0600, even when the process started with the usual
login umask 022. The daemon (its log file too) is checked in tests.test_daemon, the CLI in
tests.test_cli. A key or certificate left empty by a crash is made again."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any
from unittest import mock

from twisted.trial.unittest import TestCase

from mailcore import files
from mailcore.config import Config
from mailcore.fetch.secrets import SecretBox
from mailcore.files import (
    private_directory,
    private_file,
    remove_if_older,
    restrict_umask,
    secret_key_file,
    unlink_if_same,
)
from mailcore.service import build_core
from mailcore.store.engine import make_engine
from mailcore.tls import ensure_certificate, server_context
from tests.support.reactor import get_reactor
from tests.support.servers import tempdir_for


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


class UmaskTestCase(TestCase):
    def setUp(self) -> None:
        self.base = tempdir_for(self, "mailcore-files-")
        previous = os.umask(0o022)  # a usual login umask: what we must not inherit
        self.addCleanup(os.umask, previous)


class BuildCoreTests(UmaskTestCase):
    def assertPrivate(self, data_dir: Path) -> None:
        database = data_dir / "mailcore.sqlite"
        wal, shm = Path(f"{database}-wal"), Path(f"{database}-shm")
        self.assertTrue(wal.exists() and shm.exists())  # the store is open: WAL mode
        self.assertEqual(mode(data_dir), 0o700)
        self.assertEqual(mode(data_dir / "tls"), 0o700)
        for private in (database, wal, shm, data_dir / "tls" / "key.pem",
                        data_dir / "fetch.key", data_dir / "quarantine.key"):
            self.assertEqual(mode(private), 0o600, private.name)

    async def test_data_dir_database_wal_and_keys_are_private(self) -> None:
        data_dir = self.base / "nested" / "var"
        core = build_core(Config(data_dir=data_dir), get_reactor())
        await core.db.open()
        try:
            await core.identity.create_user("alice", "alice@example.test", "pw")
            core.fetch.load_key()
            core.quarantine.signer.sign("1", 0)
            self.assertPrivate(data_dir)
        finally:
            core.cpu.stop()
            await core.db.close()
        # What the process makes afterwards (twistd's log file) is private too.
        self.assertEqual(os.umask(0o077) & 0o077, 0o077)


class HelperTests(UmaskTestCase):
    def test_a_new_database_file_is_0600_whatever_the_umask(self) -> None:
        url = f"sqlite:///{self.base / 'plain.sqlite'}"
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
                for suffix in ("", "-wal", "-shm"):
                    self.assertEqual(mode(self.base / f"plain.sqlite{suffix}"), 0o600, suffix)
        finally:
            engine.dispose()

    def test_existing_files_and_directories_keep_their_mode(self) -> None:
        shared = self.base / "shared"
        shared.mkdir()
        os.chmod(shared, 0o750)  # noqa: S103 - an operator's choice, which must be kept
        private_directory(shared)
        self.assertEqual(mode(shared), 0o750)
        kept = shared / "kept"
        kept.write_bytes(b"x")
        os.chmod(kept, 0o640)
        private_file(kept)
        self.assertEqual((mode(kept), kept.read_bytes()), (0o640, b"x"))

    def test_restrict_umask_adds_077_and_keeps_a_stricter_one(self) -> None:
        os.umask(0o027)
        self.assertEqual(restrict_umask(), 0o027)
        self.assertEqual(os.umask(0o277), 0o077)
        restrict_umask()
        self.assertEqual(os.umask(0o022), 0o277)


class CrashLeftoverTests(UmaskTestCase):
    """A key or certificate file left empty (a process killed between making the file and
    writing it, or a power loss before unsynced data reached the disk) is made again:
    nothing was ever signed or encrypted with it, and refusing it stopped every start."""

    def test_an_empty_secret_key_file_is_made_again(self) -> None:
        path = self.base / "quarantine.key"
        path.touch()
        key = secret_key_file(path)
        self.assertEqual(len(key), 32)
        self.assertEqual((path.read_bytes(), mode(path)), (key, 0o600))
        self.assertEqual(secret_key_file(path), key)
        self.assertEqual(os.listdir(self.base), ["quarantine.key"])  # no temp file left

    def test_an_empty_fetch_key_is_made_again(self) -> None:
        path = self.base / "fetch.key"
        path.touch()
        box = SecretBox.from_data_dir(self.base)
        self.assertEqual(mode(path), 0o600)
        self.assertEqual(SecretBox.from_data_dir(self.base).decrypt(box.encrypt("pw")), "pw")
        self.assertEqual(os.listdir(self.base), ["fetch.key"])

    def test_an_empty_certificate_is_made_again(self) -> None:
        cert, key = ensure_certificate(self.base, None, None, "mx.example.test")
        server_context(cert, key)
        cert.write_bytes(b"")
        self.assertEqual(ensure_certificate(self.base, None, None, "mx.example.test"),
                         (cert, key))
        server_context(cert, key)  # loads: a whole pair again
        self.assertEqual((mode(cert), mode(key)), (0o600, 0o600))
        self.assertEqual(sorted(os.listdir(cert.parent)), ["cert.pem", "key.pem"])

    def test_a_short_key_is_still_refused(self) -> None:
        path = self.base / "pages.key"
        path.write_bytes(b"short")
        with self.assertRaises(ValueError):
            secret_key_file(path)
        self.assertEqual(path.read_bytes(), b"short")


class DurableDirectoryTests(TestCase):
    def recorded(self) -> tuple[Path, list[Path]]:
        """A new temp dir, and the directories fsynced from now on (in order)."""
        from mailcore import files, uploads

        synced: list[Path] = []
        real = files.fsync_directory

        def recording(path: Path) -> None:
            synced.append(path)
            real(path)

        self.patch(files, "fsync_directory", recording)
        self.patch(uploads, "fsync_directory", recording)
        return tempdir_for(self, "mailcore-durable-"), synced

    def test_each_directory_made_is_recorded_in_its_parent(self) -> None:
        # A file fsynced and renamed into a new directory, and that directory fsynced, could
        # still vanish on a power loss: the new directory's own entry was never synced.
        from mailcore import files

        base, synced = self.recorded()
        made = files.durable_directory(base / "a" / "b")
        self.assertEqual(made, base / "a" / "b")
        self.assertEqual(mode(made), 0o700)
        self.assertEqual(synced, [base, base / "a"])
        synced.clear()
        files.durable_directory(base / "a" / "b")  # there already: nothing to record
        self.assertEqual(synced, [])

    def test_an_upload_kept_in_a_new_directory_records_it(self) -> None:
        from mailcore import uploads

        base, synced = self.recorded()
        with uploads.SpoolFile(base / "tmp") as spool:
            spool.write(b"data")
            spool.keep(base / "files" / "7" / "f")
        self.assertEqual(synced, [base, base / "files", base / "files" / "7"])
        self.assertEqual((base / "files" / "7" / "f").read_bytes(), b"data")

    def test_the_upload_directories_made_at_start_are_recorded(self) -> None:
        # The drop files and the Mail API's files hang off directories made at start;
        # an upload records only the directories it makes itself, so without this the
        # first upload's file, fsynced and renamed, could vanish with `safedrop` or
        # `mailapi/files` on a power loss.
        from mailcore.mailapi.files import MailFiles
        from mailcore.safedrop.files import DropFiles

        base, synced = self.recorded()
        DropFiles(base / "safedrop").prepare()
        MailFiles(base / "mailapi").prepare()
        self.assertEqual(synced, [base, base, base / "mailapi"])
        synced.clear()
        DropFiles(base / "safedrop").prepare()  # there already: nothing to record
        MailFiles(base / "mailapi").prepare()
        self.assertEqual(synced, [])


class RemovalRaceTests(TestCase):
    """Removing a content-named file while another writer outside our lock (another node on
    shared storage) writes the same name again, just after we looked at it: the file it
    wrote stays, and nothing is left in the graveyard."""

    def race(self, judge: str) -> tuple[Path, Path]:
        base = tempdir_for(self)
        graveyard = private_directory(base / "tmp")
        path = base / "f"
        path.write_bytes(b"same bytes")
        os.utime(path, (1, 1))
        inode = path.stat().st_ino
        real_stat = Path.stat
        fired: list[bool] = []

        def stat(p: Path, *args: Any, **kwargs: Any) -> os.stat_result:
            result = real_stat(p, *args, **kwargs)
            if p == path and not fired:
                fired.append(True)
                tmp = base / "other-writer"
                tmp.write_bytes(b"same bytes")
                os.replace(tmp, path)  # a new inode, written now
            return result

        synced: list[Path] = []
        real_fsync = files.fsync_directory

        def fsync_directory(p: Path) -> None:
            synced.append(p)
            real_fsync(p)

        with mock.patch.object(Path, "stat", stat), \
                mock.patch.object(files, "fsync_directory", fsync_directory):
            if judge == "inode":
                unlink_if_same(path, inode, graveyard)
            else:
                self.assertFalse(remove_if_older(path, graveyard, 1000.0))
        self.assertEqual(fired, [True])
        # The writer's file is durable in its place again (not only in the page cache).
        self.assertEqual(synced, [base])
        return path, graveyard

    def test_taking_back_keeps_the_file_written_again(self) -> None:
        path, graveyard = self.race("inode")
        self.assertEqual(path.read_bytes(), b"same bytes")
        self.assertEqual(list(graveyard.iterdir()), [])

    def test_the_sweep_keeps_the_file_written_again(self) -> None:
        path, graveyard = self.race("age")
        self.assertEqual(path.read_bytes(), b"same bytes")
        self.assertEqual(list(graveyard.iterdir()), [])

    def test_without_a_writer_the_file_goes(self) -> None:
        base = tempdir_for(self)
        graveyard = private_directory(base / "tmp")
        (base / "old").write_bytes(b"x")
        os.utime(base / "old", (1, 1))
        self.assertTrue(remove_if_older(base / "old", graveyard, 1000.0))
        (base / "mine").write_bytes(b"y")
        unlink_if_same(base / "mine", (base / "mine").stat().st_ino, graveyard)
        self.assertEqual(sorted(p.name for p in base.iterdir()), ["tmp"])
        self.assertEqual(list(graveyard.iterdir()), [])
