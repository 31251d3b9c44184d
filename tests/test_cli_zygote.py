"""The test suite's CLI zygote (tests/support/cli_zygote.py): a command run through it
(tests.support.cli.cli_command) ends as `python -m mailcore.cli` would, on its stderr too."""

from __future__ import annotations

import os
import socket
import sys

from twisted.internet import threads
from twisted.trial.unittest import SkipTest, TestCase

from tests.support.cli import HERE, cli_command, cli_env
from tests.support.reactor import get_reactor
from tests.support.servers import run_command, tempdir_for


class ZygoteStderrTests(TestCase):
    async def test_what_the_imports_write_on_stderr_is_the_commands(self) -> None:
        """A warning the CLI's imports print (PYTHONWARNINGS=default shows the
        DeprecationWarning of twisted.mail.pop3client) was printed in the zygote, on its
        log, once: a command through it had nothing on stderr where `python -m
        mailcore.cli` had the warning, so a test of "nothing on stderr" passed where the
        real command does not."""
        env = {**cli_env(), "PYTHONWARNINGS": "default"}
        base = tempdir_for(self, "mailcore-cli-zygote-")
        args = ("--data-dir", str(base / "var"), "user", "list")
        direct = await run_command([sys.executable, "-m", "mailcore.cli", *args], env=env,
                                   cwd=base)
        if "Warning" not in direct.err:
            raise SkipTest("no import of the CLI prints a warning now: nothing to compare")
        zygote = await cli_command(*args, env=env, cwd=base)
        self.assertEqual((zygote.status, zygote.out, zygote.err),
                         (direct.status, direct.out, direct.err))


def _answer(listener: socket.socket, how: bytes) -> None:
    """Be the zygote for one client (blocks): take its request, answer `how`."""
    conn, _ = listener.accept()
    with conn:
        _, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        for fd in fds:
            os.close(fd)
        conn.send(how)


class ZygoteClientTests(TestCase):
    async def ended(self, how: bytes) -> tuple[int | None, int | None, str]:
        """How cli_client.py ends when its zygote says the command ended `how`."""
        path = str(tempdir_for(self, "mailcore-cli-zygote-") / "socket")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.addCleanup(listener.close)
        listener.bind(path)
        listener.listen(1)
        reactor = get_reactor()
        answered = threads.deferToThreadPool(reactor, reactor.getThreadPool(), _answer,
                                             listener, how)
        result = await run_command([sys.executable, str(HERE / "cli_client.py"), path,
                                    "user", "list"], env=cli_env(), timeout=30)
        await answered
        return result.status, result.signal, result.err

    async def test_a_command_killed_by_sigkill_ends_the_client_so(self) -> None:
        """signal.signal(SIGKILL, SIG_DFL) raises: the client of a command the kernel's
        OOM killer (or anyone) killed with SIGKILL exited 1 with a traceback of its own."""
        self.assertEqual(await self.ended(b"signal 9"), (None, 9, ""))
        self.assertEqual(await self.ended(b"signal 15"), (None, 15, ""))
        self.assertEqual(await self.ended(b"exit 3"), (3, None, ""))
