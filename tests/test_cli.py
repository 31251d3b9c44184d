"""The `mailcore` admin command, run as a real subprocess against a temp data directory.

Every command, and every mistake: a mistake exits 1 with one line on stderr, never a
traceback. Keys and tokens printed by the CLI are checked to work by resolving them through
Identity on the same store afterwards.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
import time
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

from sqlalchemy import text
from twisted.internet import defer, threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailcore.cli import print_table
from mailcore.config import Config
from mailcore.identity import Identity
from mailcore.identity import secrets as creds
from mailcore.safedrop.files import STALE_UPLOAD
from mailcore.store.migrate import current_revision, head_revision
from mailcore.workers import CpuPool
from tests.support.cli import CliTestCase, cli_env
from tests.support.db import open_database_at
from tests.support.pg import create_test_database
from tests.support.reactor import get_reactor
from tests.support.servers import free_port

T = TypeVar("T")


async def gather(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run coroutines concurrently; their results in order."""
    return await defer.gatherResults(
        [defer.Deferred.fromCoroutine(c) for c in coroutines], consumeErrors=True
    )


class IdentityCliTestCase(CliTestCase):
    """A CLI test that checks what the CLI wrote through Identity on the same store."""

    async def identity(self, url: str | None = None) -> Identity:
        """Identity on the same store the CLI wrote, with a real thread pool and clock."""
        db = await open_database_at(self, url or Config(data_dir=self.data_dir).database_url)
        cpu = CpuPool(get_reactor())
        self.addCleanup(cpu.stop)
        return Identity(db, get_reactor(), cpu)


class InitTests(IdentityCliTestCase):
    async def test_init_creates_data_dir_schema_and_certificate(self) -> None:
        self.data_dir = self.base / "nested" / "var"
        out = await self.ok("init")
        lines = out.splitlines()
        self.assertEqual(lines[0], f"data directory: {self.data_dir}")
        self.assertEqual(lines[1], f"database: sqlite:///{self.data_dir / 'mailcore.sqlite'}")
        self.assertEqual(lines[2], f"TLS certificate: {self.data_dir / 'tls' / 'cert.pem'}")
        self.assertTrue((self.data_dir / "tls" / "key.pem").exists())
        self.assertEqual((self.data_dir / "tls" / "key.pem").stat().st_mode & 0o077, 0)
        identity = await self.identity()
        self.assertEqual(
            await threads.deferToThread(current_revision, identity.db.engine), head_revision()
        )
        # Running it again changes nothing and still succeeds.
        self.assertEqual(await self.ok("init"), out)

    async def test_init_makes_everything_private_under_a_usual_umask(self) -> None:
        previous = os.umask(0o022)  # the CLI inherits it: it must not make 0644 files
        self.addCleanup(os.umask, previous)
        await self.ok("init")
        await self.ok("user", "add", "alice", "--email", "alice@example.test", "--password", "pw")
        self.assertEqual(stat.S_IMODE(self.data_dir.stat().st_mode), 0o700)
        made = [p for p in self.data_dir.rglob("*") if p.is_file()]
        self.assertIn(self.data_dir / "mailcore.sqlite", made)
        for path in made:
            self.assertEqual(stat.S_IMODE(path.stat().st_mode) & 0o077, 0, path)

    async def test_relative_data_dir_is_resolved_against_cwd(self) -> None:
        result = await self.run_cli("--data-dir", "rel", "init")
        self.assertEqual(result.status, 0, result.err)
        self.assertIn(f"data directory: {self.base / 'rel'}", result.out)
        self.assertTrue((self.base / "rel" / "mailcore.sqlite").exists())


class HelpTests(CliTestCase):
    async def test_help_lists_the_commands_and_exits_0(self) -> None:
        top, sub = await gather([self.run_cli("--help"), self.run_cli("user", "add", "--help")])
        self.assertEqual((top.status, sub.status), (0, 0), top.err + sub.err)
        for command in ("init", "user", "apikey", "token"):
            self.assertIn(command, top.out)
        self.assertIn("--password", sub.out)
        self.assertIn("stdin", sub.out)


class UserTests(IdentityCliTestCase):
    async def test_user_add_list_and_set_plan(self) -> None:
        out = await self.ok("user", "add", "alice", "--email", "alice@Example.TEST",
                            "--password", "s3cret")
        self.assertIn("alice", out)
        # Without --password: one line from the pipe.
        await self.ok("user", "add", "bob", "--email", "bob@example.test", "--plan", "agency",
                      stdin=b"piped-pw\n")
        await self.ok("user", "set-plan", "alice", "standard")

        lines = (await self.ok("user", "list")).splitlines()
        self.assertEqual(lines[0].split(), ["USERNAME", "EMAIL", "PLAN", "ACTIVE", "CREATED"])
        rows = [line.split() for line in lines[1:]]
        self.assertEqual(
            [row[:4] for row in rows],
            [["alice", "alice@example.test", "standard", "yes"],
             ["bob", "bob@example.test", "agency", "yes"]],
        )
        self.assertRegex(lines[1], r"\d{4}-\d\d-\d\d \d\d:\d\d$")

        identity = await self.identity()
        alice = await identity.authenticate_password("alice", "s3cret")
        bob = await identity.authenticate_password("bob", "piped-pw")
        assert alice is not None and bob is not None
        self.assertEqual((alice.plan, bob.plan), ("standard", "agency"))

    async def test_password_from_pipe_keeps_inner_spaces_and_drops_crlf(self) -> None:
        await self.ok("user", "add", "carol", "--email", "c@example.test",
                      stdin=b" two words \r\nsecond line ignored\n")
        identity = await self.identity()
        self.assertIsNotNone(await identity.authenticate_password("carol", " two words "))

    async def test_empty_user_list_prints_the_header(self) -> None:
        self.assertEqual((await self.ok("user", "list")).split(),
                         ["USERNAME", "EMAIL", "PLAN", "ACTIVE", "CREATED"])


class CredentialTests(IdentityCliTestCase):
    async def test_apikey_create_prints_the_key_alone_and_it_works(self) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@example.test", "--password", "pw")
        out = await self.ok("apikey", "create", "alice", "--label", "ci")
        key = out.removesuffix("\n")
        self.assertEqual(out, key + "\n")
        self.assertTrue(creds.well_formed(key), out)

        identity = await self.identity()
        principal = await identity.resolve(key, ("apikey",))
        assert principal is not None
        self.assertEqual((principal.user.username, principal.kind), ("alice", "apikey"))

        listing = await self.ok("apikey", "list", "alice")
        self.assertNotIn(key, listing)
        header, row = listing.splitlines()
        self.assertEqual(header.split(), ["PREFIX", "LABEL", "CREATED", "LAST", "USED", "REVOKED"])
        self.assertEqual(row.split()[:2], [key[: creds.PREFIX_LEN], "ci"])
        self.assertEqual(row.split()[-1], "no")
        self.assertNotIn(" - ", row)  # resolved once: "last used" has a time

        revoked = await self.ok("apikey", "revoke", "alice", key[:6])
        self.assertIn("revoked 1", revoked)
        identity.forget_resolved()  # believed for RESOLVED_TTL after it resolved
        self.assertIsNone(await identity.resolve(key, ("apikey",)))
        self.assertEqual((await self.ok("apikey", "list", "alice")).splitlines()[1].split()[-1],
                         "yes")

    async def test_apikey_revoke_ends_the_sessions_made_with_the_key(self) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@example.test", "--password", "pw")
        key = (await self.ok("apikey", "create", "alice")).strip()
        identity = await self.identity()
        principal = await identity.resolve(key, ("apikey",))
        assert principal is not None
        # What safedrop's GET /auth makes from the key.
        session, _ = await identity.create_credential(
            principal.user.id, "session", parent_id=principal.credential_id
        )
        self.assertIsNotNone(await identity.resolve(session, ("session",)))
        await self.ok("apikey", "revoke", "alice", key[:8])
        # This Identity believes what it resolved for RESOLVED_TTL (1 s), and the CLI now
        # starts and revokes within that (the test failed once the CLI got faster).
        identity.forget_resolved()
        self.assertIsNone(await identity.resolve(session, ("session",)))

    async def test_token_create_prints_a_token_alone(self) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@example.test", "--password", "pw")
        out = await self.ok("token", "create", "alice@example.test", "--label", "imap2api")
        token = out.strip()
        self.assertEqual(out, token + "\n")
        identity = await self.identity()
        principal = await identity.resolve(token, ("token",))
        assert principal is not None
        self.assertEqual(principal.kind, "token")
        self.assertIsNone(await identity.resolve(token, ("apikey",)))
        # Tokens are not API keys: `apikey list` does not show them.
        self.assertEqual(len((await self.ok("apikey", "list", "alice")).splitlines()), 1)

    async def test_token_list_and_revoke_end_a_leaked_login_token(self) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@example.test", "--password", "pw")
        identity = await self.identity()
        alice = await identity.find_user("alice")
        assert alice is not None
        # A token /api-token-auth/ handed out, and one the CLI printed.
        login, _ = await identity.create_credential(alice.id, "token", label="api-token-auth")
        printed = (await self.ok("token", "create", "alice", "--label", "ci")).strip()
        listing = (await self.ok("token", "list", "alice")).splitlines()
        self.assertEqual([row.split()[:2] for row in listing[1:]],
                         [[login[: creds.PREFIX_LEN], "api-token-auth"],
                          [printed[: creds.PREFIX_LEN], "ci"]])
        self.assertNotIn(login, "\n".join(listing))

        self.assertIn("revoked 1 token of alice",
                      await self.ok("token", "revoke", "alice", login[: creds.PREFIX_LEN]))
        identity.forget_resolved()
        self.assertIsNone(await identity.resolve(login, ("token",)))
        self.assertIsNotNone(await identity.resolve(printed, ("token",)))
        self.assertEqual((await self.ok("token", "list", "alice")).splitlines()[1].split()[-1],
                         "yes")
        await self.refused("token", "revoke", "alice", login[: creds.PREFIX_LEN],
                           fragment="no live token of alice")


class LifecycleTests(IdentityCliTestCase):
    async def test_disable_refuses_every_credential_and_enable_restores_them(self) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@example.test", "--password", "pw")
        key = (await self.ok("apikey", "create", "alice")).strip()
        token = (await self.ok("token", "create", "alice")).strip()
        identity = await self.identity()
        alice = await identity.find_user("alice")
        assert alice is not None
        keyed = await identity.resolve(key, ("apikey",))
        assert keyed is not None
        session, _ = await identity.create_credential(
            alice.id, "session", parent_id=keyed.credential_id)
        page, _ = await identity.create_credential(alice.id, "page", scopes=("pages",))
        credentials = [(key, "apikey"), (token, "token"), (session, "session"), (page, "page")]

        self.assertEqual(await self.ok("user", "disable", "alice@example.test"),
                         "alice: disabled\n")
        self.assertEqual((await self.ok("user", "list")).splitlines()[1].split()[3], "no")
        identity.forget_resolved()
        self.assertIsNone(await identity.authenticate_password("alice", "pw"))
        for secret, kind in credentials:
            self.assertIsNone(await identity.resolve(secret, (kind,)), kind)

        self.assertEqual(await self.ok("user", "enable", "alice"), "alice: enabled\n")
        identity.forget_resolved()
        self.assertIsNotNone(await identity.authenticate_password("alice", "pw"))
        for secret, kind in credentials:
            self.assertIsNotNone(await identity.resolve(secret, (kind,)), kind)

    async def test_delete_asks_for_yes_then_removes_the_user_and_what_it_owns(self) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@example.test", "--password", "pw")
        await self.ok("user", "add", "bob", "--email", "bob@example.test", "--password", "pw")
        await self.ok("domain", "add", "a.test", "--owner", "alice", "--local")
        await self.ok("domain", "add", "b.test", "--owner", "bob", "--local")
        await self.ok("mailbox", "add", "box@a.test", "--owner", "alice")
        await self.ok("mailbox", "add", "her@b.test", "--owner", "alice")
        key = (await self.ok("apikey", "create", "alice")).strip()
        await self.refused("user", "delete", "alice",
                           fragment="deleting alice removes it and 1 domain, 2 mailboxes, "
                           "for good; add --yes to delete")
        self.assertIn("alice", await self.ok("user", "list"))  # nothing changed
        await self.ok("user", "add", "carl", "--email", "carl@example.test", "--password", "pw")
        await self.refused("user", "delete", "carl@example.test",
                           fragment="deleting carl removes it (it owns no domain, mailbox, "
                           "account, drop, webhook or app), for good; add --yes to delete")

        out = await self.ok("user", "delete", "alice", "--yes")
        self.assertEqual(out, "removed domain a.test\nremoved mailbox box@a.test\n"
                         "removed mailbox her@b.test\ndeleted user alice\n")
        self.assertEqual([line.split()[0] for line in (await self.ok("user", "list")).splitlines()],
                         ["USERNAME", "bob", "carl"])
        self.assertNotIn("a.test", await self.ok("domain", "list"))
        self.assertNotIn("her@b.test", await self.ok("mailbox", "list"))
        identity = await self.identity()
        self.assertIsNone(await identity.resolve(key, ("apikey",)))
        await self.refused("user", "delete", "alice", "--yes", fragment="no such user: alice")

    async def test_a_deletion_cut_short_shows_and_is_finished_by_running_it_again(
        self,
    ) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@example.test", "--password", "pw")
        await self.ok("domain", "add", "a.test", "--owner", "alice", "--local")
        identity = await self.identity()
        alice = await identity.find_user("alice")
        assert alice is not None
        await identity.begin_deletion(alice.id)  # where a kill -9 after the first step leaves it
        self.assertEqual((await self.ok("user", "list")).splitlines()[1].split()[3], "deleting")
        await self.refused("user", "enable", "alice",
                           fragment="the user is being deleted: finish it with "
                           "`mailcore user delete`")
        out = await self.ok("user", "delete", "alice", "--yes")
        self.assertRegex(out.splitlines()[0],
                         r"^alice: finishing the deletion begun \d{4}-\d\d-\d\d \d\d:\d\d$")
        self.assertEqual(out.splitlines()[1:], ["removed domain a.test", "deleted user alice"])

    async def test_set_password_replaces_it_and_ends_sessions_and_login_tokens(self) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@example.test", "--password", "pw")
        token = (await self.ok("token", "create", "alice")).strip()
        identity = await self.identity()
        alice = await identity.find_user("alice")
        assert alice is not None
        page, _ = await identity.create_credential(alice.id, "page", scopes=("pages",))
        login, _ = await identity.create_credential(
            alice.id, "token", label="api-token-auth", login=True)

        self.assertEqual(await self.ok("user", "set-password", "alice", stdin=b"new-pw\n"),
                         "alice: password changed\n")
        identity.forget_resolved()
        self.assertIsNone(await identity.authenticate_password("alice", "pw"))
        self.assertIsNotNone(await identity.authenticate_password("alice", "new-pw"))
        self.assertIsNone(await identity.resolve(page, ("page",)))
        self.assertIsNone(await identity.resolve(login, ("token",)))
        self.assertIsNotNone(await identity.resolve(token, ("token",)))
        await self.refused("user", "set-password", "nobody", "--password", "x",
                           fragment="no such user: nobody")
        await self.refused("user", "disable", "nobody", fragment="no such user: nobody")

    async def test_nothing_secret_in_the_database_files(self) -> None:
        """The raw SQLite files hold no password, key or token the CLI handed out."""
        password = "CLI-password-Zq9"
        await self.ok("user", "add", "alice", "--email", "alice@example.test",
                      "--password", password)
        secrets = [password]
        for command in ("apikey", "apikey", "token"):
            secrets.append((await self.ok(command, "create", "alice")).strip())
        raw = b"".join(p.read_bytes() for p in self.data_dir.glob("mailcore.sqlite*"))
        self.assertGreater(len(raw), 0)
        for secret in secrets:
            self.assertNotIn(secret.encode(), raw)


class BesideTheDaemonTests(CliTestCase):
    async def test_a_command_leaves_the_daemons_uploads_in_progress(self) -> None:
        """Every command prepares the data directory as the daemon does; it emptied
        safedrop's temp directory, so a drop upload the daemon was writing there lost its
        file (its rename into place failed). Only a crash's leftovers go."""
        await self.ok("init")
        tmp = self.data_dir / "safedrop" / "tmp"
        writing = tmp / "upload-writing"
        writing.write_bytes(b"half an upload")
        left = tmp / "upload-left"
        left.write_bytes(b"what a crash left")
        old = time.time() - 2 * STALE_UPLOAD
        os.utime(left, (old, old))
        await self.ok("user", "list")
        self.assertEqual(writing.read_bytes(), b"half an upload")
        self.assertFalse(left.exists())


class TableTests(SynchronousTestCase):
    def test_cells_control_characters_are_shown_escaped(self) -> None:
        """`queue list` shows a next hop's last reply: its ESC sequences and BEL are
        printed as text, never sent to the operator's terminal; the columns still align."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_table(("ID", "LAST ERROR"), [("q1", "421 busy \x1b]0;pwned\x07\x1b[2J"),
                                               ("q22", "ok")])
        self.assertEqual(out.getvalue().splitlines(), [
            "ID   LAST ERROR",
            "q1   421 busy \\x1b]0;pwned\\x07\\x1b[2J",
            "q22  ok",
        ])


class MistakeTests(CliTestCase):
    async def test_mistakes_exit_1_with_one_line(self) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@example.test", "--password", "pw")
        cases: list[tuple[tuple[str, ...], bytes, tuple[str, ...]]] = [
            (("apikey", "create", "nobody"), b"", ("no such user: nobody",)),
            (("apikey", "list", "nobody"), b"", ("no such user",)),
            (("token", "create", "nobody"), b"", ("no such user",)),
            (("user", "set-plan", "nobody", "free"), b"", ("no such user",)),
            (("user", "add", "ALICE", "--email", "x@example.test", "--password", "p"), b"",
             ("username already exists",)),
            (("user", "add", "alice2", "--email", "alice@EXAMPLE.test", "--password", "p"), b"",
             ("email already exists",)),
            (("user", "add", "bad name", "--email", "b@example.test", "--password", "p"), b"",
             ("username may contain only",)),
            (("user", "add", "dave", "--email", "not-an-email", "--password", "p"), b"",
             ("email",)),
            (("user", "add", "erin", "--email", "e@example.test"), b"", ("no password",)),
            (("user", "add", "erin", "--email", "e@example.test"), b"\n",
             ("--password must be",)),
            (("user", "add", "erin", "--email", "e@example.test", "--bogus"), b"",
             ("unrecognized arguments: --bogus",)),
            (("user", "add", "erin"), b"", ("--email",)),
            (("user", "set-plan", "alice", "gold"), b"", ("invalid choice: 'gold'",)),
            (("user",), b"", ("required",)),
            (("frobnicate",), b"", ("invalid choice",)),
            ((), b"", ("required",)),
            (("apikey", "revoke", "alice", "abc"), b"", ("at least 4 characters",)),
            (("apikey", "revoke", "alice", "ffffffff"), b"", ("no live API key",)),
        ]
        results = await gather(self.mc(*args, stdin=stdin) for args, stdin, _ in cases)
        for (args, _stdin, fragments), result in zip(cases, results, strict=True):
            self.assertOneLineError(result, *fragments, context=args)
        # None of them changed anything.
        self.assertEqual(len((await self.ok("user", "list")).splitlines()), 2)

    async def test_arguments_that_are_not_utf8_or_limits_out_of_range(self) -> None:
        """Named in one line: not a codec's complaint about a surrogate, nor SQLite's about
        an integer too large (and a negative --limit is no "no limit")."""
        await self.ok("user", "add", "alice", "--email", "alice@example.test", "--password", "pw")
        not_utf8 = os.fsdecode(b"a\xffb")
        cases: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
            (("address", "add", "example.test", not_utf8), ("argument 'a\\xffb' is not UTF-8",)),
            (("queue", "delete", not_utf8), ("argument 'a\\xffb' is not UTF-8",)),
            (("queue", "list", "--limit", "-1"), ("--limit: must be from 1 to",)),
            (("queue", "list", "--limit", str(2**64)), ("--limit: must be from 1 to",)),
            (("jobs", "list", "--limit", str(2**64)), ("--limit: must be from 1 to",)),
            (("webhook", "deliveries", "alice", "1", "--limit", str(2**64)),
             ("--limit: must be from 1 to",)),
        ]
        results = await gather(self.mc(*args) for args, _ in cases)
        for (args, fragments), result in zip(cases, results, strict=True):
            self.assertOneLineError(result, *fragments, context=args)

    async def test_bad_config_and_unreachable_database(self) -> None:
        bad_toml = self.base / "bad.toml"
        bad_toml.write_text("data_dir = \n[oops\n")
        unknown_key = self.base / "unknown.toml"
        unknown_key.write_text('colour = "blue"\n')
        wrong_type = self.base / "type.toml"
        wrong_type.write_text("session_token_ttl = \"soon\"\n")
        a_file = self.base / "file"
        a_file.write_text("")
        cases: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
            (("--config", str(self.base / "missing.toml"), "user", "list"),
             ("config file not found",)),
            (("--config", str(bad_toml), "user", "list"), ("cannot read config file",)),
            (("--config", str(unknown_key), "user", "list"), ("unknown config key: colour",)),
            (("--config", str(wrong_type), "user", "list"), ("session_token_ttl",)),
            (("--db", f"postgresql+psycopg://mc@127.0.0.1:{free_port()}/mc", "user", "list"),
             ("cannot open the store", "127.0.0.1")),
            (("--db", "nosuchdialect://x", "user", "list"),
             ("--db nosuchdialect://x: Mailcore runs on SQLite or PostgreSQL",)),
            (("--data-dir", str(a_file / "sub"), "user", "list"),
             (f"data directory {a_file / 'sub'}: not a directory",)),
        ]
        results = await gather(self.run_cli(*args) for args, _ in cases)
        for (args, fragments), result in zip(cases, results, strict=True):
            self.assertOneLineError(result, *fragments, context=args)


class ConfigTests(CliTestCase):
    async def test_config_file_and_command_line_precedence(self) -> None:
        from_file = self.base / "from-file"
        config = self.base / "mailcore.toml"
        config.write_text(f'data_dir = "{from_file}"\n')
        result = await self.run_cli("--config", str(config), "init")
        self.assertEqual(result.status, 0, result.err)
        self.assertTrue((from_file / "mailcore.sqlite").exists())
        result = await self.run_cli("--config", str(config), "--data-dir", str(self.data_dir),
                                    "init")
        self.assertEqual(result.status, 0, result.err)
        self.assertTrue((self.data_dir / "mailcore.sqlite").exists())


class PostgresTests(IdentityCliTestCase):
    async def test_cli_on_postgresql(self) -> None:
        url = await create_test_database(self)
        result = await self.run_cli("--db", url, "--data-dir", str(self.data_dir),
                                    "user", "add", "pg", "--email", "pg@example.test",
                                    "--password", "pw")
        self.assertEqual(result.status, 0, result.err)
        result = await self.run_cli("--db", url, "--data-dir", str(self.data_dir),
                                    "apikey", "create", "pg")
        self.assertEqual(result.status, 0, result.err)
        identity = await self.identity(url)
        principal = await identity.resolve(result.out.strip(), ("apikey",))
        assert principal is not None
        self.assertEqual(principal.user.username, "pg")
        self.assertFalse((self.data_dir / "mailcore.sqlite").exists())
        result = await self.run_cli("--db", url, "--data-dir", str(self.data_dir),
                                    "user", "delete", "pg", "--yes")
        self.assertEqual((result.status, result.err, result.out), (0, "", "deleted user pg\n"))
        self.assertIsNone(await identity.find_user("pg"))

    async def test_a_delete_killed_midway_is_finished_by_running_it_again(self) -> None:
        url = await create_test_database(self)
        args = ("--db", url, "--data-dir", str(self.data_dir))
        await self.ok_on(args, "user", "add", "alice", "--email", "alice@example.test",
                         "--password", "pw")
        await self.ok_on(args, "domain", "add", "a.test", "--owner", "alice", "--local")
        await self.ok_on(args, "oauth", "app", "add", "hers", "--owner", "alice",
                         "--redirect-uri", "https://h.example.com/cb")
        identity = await self.identity(url)
        db = identity.db
        # Another connection holds the domain's row: the deletion stops at its domains step
        # (after its OAuth step committed) until it is killed there.
        holder = db.engine.connect()
        self.addCleanup(threads.deferToThread, holder.close)
        hold = holder.begin()
        await threads.deferToThread(lambda: holder.execute(text(
            "SELECT id FROM domains WHERE name = 'a.test' FOR UPDATE")))
        ended: Deferred[int | None] = Deferred()

        class Ended(ProcessProtocol):
            def processEnded(self, reason: Failure) -> None:
                ended.callback(getattr(reason.value, "signal", None))

        process = get_reactor().spawnProcess(
            Ended(), sys.executable,
            [sys.executable, "-m", "mailcore.cli", *args, "user", "delete", "alice", "--yes"],
            env=cli_env(), path=str(self.base))
        waiting = text("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                       "current_database() AND wait_event_type = 'Lock'")
        for _ in range(600):
            if await db.read("waiting", lambda c: c.execute(waiting).scalar()):
                break
            await deferLater(get_reactor(), 0.1)
        else:
            self.fail("the deletion never reached the domains step")
        process.signalProcess("KILL")
        self.assertEqual(await ended, 9)
        await threads.deferToThread(hold.rollback)
        alice = await identity.find_user("alice")
        assert alice is not None
        self.assertIsNotNone(alice.deleting_at)
        self.assertFalse(alice.is_active)
        # The steps before the domains' are done: its OAuth app is gone.
        self.assertNotIn("hers", await self.ok_on(args, "oauth", "app", "list"))
        self.assertIn("a.test", await self.ok_on(args, "domain", "list"))
        out = await self.ok_on(args, "user", "delete", "alice", "--yes")
        self.assertEqual(out.splitlines()[1:], ["removed domain a.test", "deleted user alice"])
        self.assertIsNone(await identity.find_user("alice"))

    async def ok_on(self, args: tuple[str, ...], *command: str) -> str:
        result = await self.run_cli(*args, *command)
        self.assertEqual((result.status, result.err), (0, ""), command)
        return result.out
