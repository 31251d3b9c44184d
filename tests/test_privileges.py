"""Started as root: `twistd --uid` builds the daemon as that user, and the admin CLI run as
root on that user's data directory becomes that user (mailcore.privileges).

The switches are process-wide, so the daemon's and the CLI's run in a child process. The
child first builds once as root on another directory: what start-up imports is then loaded,
whoever may read the interpreter's own files (on this machine kind Python lives under
root's 0700 home, which the unprivileged user cannot read).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial.unittest import SkipTest, TestCase

from mailcore.config import ConfigError
from mailcore.privileges import acting_as, as_data_dir_owner, daemon_ids

NOBODY = 65534

DAEMON = """
import json, os, sqlite3, sys
from pathlib import Path
from twisted.scripts._twistd_unix import ServerOptions
from mailcore.service import makeService

def build(data, *twistd):
    options = ServerOptions()
    options.parseOptions([*twistd, "mailcore", "--data-dir", data,
                          "--http", "tcp:0:interface=127.0.0.1",
                          "--smtp", "tcp:0:interface=127.0.0.1"])
    makeService(options.subOptions)

warm, data = sys.argv[1:]
build(warm)
build(data, "--uid", "65534", "--gid", "65534")
owners = {str(p.relative_to(data)): (p.lstat().st_uid, p.lstat().st_gid)
          for p in Path(data).rglob("*")}
os.setgid(65534)
os.setuid(65534)
db = sqlite3.connect(os.path.join(data, "mailcore.sqlite"))
db.execute("CREATE TABLE probe (x)")
db.commit()
print(json.dumps({"owners": owners, "euid": os.geteuid()}))
sys.stdout.flush()
os._exit(0)
"""

CLI = """
import json, os, sys
from pathlib import Path
from twisted.internet.testing import MemoryReactorClock
from mailcore.config import Config
from mailcore.privileges import as_data_dir_owner
from mailcore.service import build_core

warm, data = sys.argv[1:]
build_core(Config(data_dir=Path(warm)), MemoryReactorClock()).db.engine.dispose()
as_data_dir_owner(Path(data))
build_core(Config(data_dir=Path(data)), MemoryReactorClock()).db.engine.dispose()
owners = {str(p.relative_to(data)): p.lstat().st_uid for p in Path(data).rglob("*")}
print(json.dumps({"owners": owners, "uid": os.getuid()}))
sys.stdout.flush()
os._exit(0)
"""


def root_only() -> None:
    if os.geteuid() != 0:
        raise SkipTest("switching users needs root")


class RootTests(TestCase):
    def setUp(self) -> None:
        root_only()
        # Somewhere the unprivileged user may pass through (trial's directory, made under
        # the daemon's umask 077, is not).
        base = Path(tempfile.mkdtemp(prefix="mailcore-privileges-"))
        self.addCleanup(shutil.rmtree, base)
        base.chmod(0o711)
        for p in (base, *base.parents):
            if not os.stat(p).st_mode & 0o001:
                raise SkipTest(f"{p} is closed to other users")
        self.base = base

    def child(self, script: str, *args: str) -> dict[str, object]:
        done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                              text=True, timeout=120, cwd=Path(__file__).parent.parent)
        self.assertEqual(done.returncode, 0, done.stderr[-3000:])
        result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
        return result

    def test_twistd_uid_builds_everything_as_that_user(self) -> None:
        data = self.base / "var"
        result = self.child(DAEMON, str(self.base / "warm"), str(data))
        owners = result["owners"]
        assert isinstance(owners, dict)
        self.assertIn("mailcore.sqlite", owners)
        self.assertIn("fetch.key", owners)
        self.assertIn("mailcore.lock", owners)
        self.assertEqual({name: ids for name, ids in owners.items()
                          if ids != [NOBODY, NOBODY]}, {})
        self.assertEqual(os.stat(data).st_uid, NOBODY)
        # Before: all of it was root's, mode 0600, and the daemon could open none of it.

    def test_the_cli_as_root_on_the_daemon_users_directory_becomes_that_user(self) -> None:
        data = self.base / "var"
        data.mkdir(mode=0o700)
        os.chown(data, NOBODY, NOBODY)
        result = self.child(CLI, str(self.base / "warm"), str(data))
        self.assertEqual(result["uid"], NOBODY)
        owners = result["owners"]
        assert isinstance(owners, dict)
        self.assertIn("mailcore.sqlite", owners)
        self.assertEqual({n: uid for n, uid in owners.items() if uid != NOBODY}, {})

    def test_a_data_directory_with_roots_files_is_refused_naming_the_chown(self) -> None:
        data = self.base / "var"
        data.mkdir(mode=0o700)
        os.chown(data, NOBODY, NOBODY)
        (data / "mailcore.sqlite").write_bytes(b"")  # left by an earlier start as root
        with self.assertRaises(ConfigError) as caught, acting_as((NOBODY, NOBODY), data):
            self.fail("not refused")
        self.assertEqual(
            str(caught.exception),
            f"data directory {data}: mailcore.sqlite not owned by uid {NOBODY}, the user the "
            f"daemon runs as (--uid); give it that user: chown -R {NOBODY}:{NOBODY} {data}")
        self.assertEqual(os.geteuid(), 0)

    def test_the_block_runs_as_the_user_and_root_comes_back(self) -> None:
        data = self.base / "new" / "var"
        seen: list[tuple[int, int]] = []
        with acting_as((NOBODY, NOBODY), data):
            seen.append((os.geteuid(), os.getegid()))
        self.assertEqual(seen, [(NOBODY, NOBODY)])
        self.assertEqual((os.geteuid(), os.getegid()), (0, 0))
        self.assertEqual((os.stat(data).st_uid, os.stat(data).st_mode & 0o777),
                         (NOBODY, 0o700))


class IdsTests(TestCase):
    def test_no_switch_without_uid_or_as_root_again(self) -> None:
        self.assertIsNone(daemon_ids(None))
        self.assertIsNone(daemon_ids({"uid": None, "gid": None}))
        self.assertIsNone(daemon_ids({"uid": 0, "gid": None}))

    def test_a_uid_without_gid_takes_the_users_group(self) -> None:
        root_only()
        self.assertEqual(daemon_ids({"uid": NOBODY, "gid": None}), (NOBODY, 65534))
        self.assertEqual(daemon_ids({"uid": NOBODY, "gid": 0}), (NOBODY, 0))

    def test_nothing_to_do_for_no_ids_or_a_root_owned_directory(self) -> None:
        data = Path(self.mktemp())
        with acting_as(None, data):
            pass
        self.assertFalse(data.exists())
        data.mkdir()
        as_data_dir_owner(data)  # root's (or ours, not as root): nobody to become
        self.assertEqual(os.geteuid(), os.stat(data).st_uid if os.geteuid() else 0)
