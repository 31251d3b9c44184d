"""`mailcore domain …` and `mailcore address …`, run as real subprocesses on a temp data dir.

What the CLI writes is what a daemon's DomainService then serves (checked on the same
store); every mistake exits 1 with one line on stderr.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from mailcore.gateway.domains import DomainService
from mailcore.queue.routing import Hop, Router
from mailcore.queue.settings import QueueSettings
from tests.support.cli import CliTestCase
from tests.support.db import open_database_at
from tests.support.reactor import get_reactor


class DomainCliTests(CliTestCase):
    timeout = 300  # dozens of CLI runs in a row (each a process of ~1.5 s of CPU)
    tempdir_prefix = "mailcore-cli-domains-"

    async def test_domains_and_addresses_end_to_end(self) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@users.test", "--password", "x")
        await self.ok("user", "add", "bob", "--email", "bob@users.test", "--password", "x")
        # A next hop on a documentation (non-global) address: the operator allows it.
        config = self.base / "private.toml"
        config.write_text("[queue]\nallow_private = true\n")
        out = await self.ok("-c", str(config), "domain", "add", "Bücher.DE", "--owner", "alice",
                            "--redirect-to", "[2001:db8::1]:2525", "--spam-action", "1",
                            "--require-tls")
        self.assertEqual(out, "serving xn--bcher-kva.de (bücher.de) for alice: mail goes to "
                              "[2001:db8::1]:2525, TLS verify\n")
        await self.ok("domain", "add", "example.com", "--owner", "bob@users.test",
                      "--redirect-to", "mx.example.net")
        await self.refused("domain", "add", "EXAMPLE.com", "--owner", "alice",
                           "--redirect-to", "mx.example.net", fragment="already served")
        await self.refused("domain", "add", "other.test", "--owner", "carol",
                           "--redirect-to", "mx.example.net", fragment="no such user: carol")
        await self.refused("domain", "add", "bad_name.test", "--owner", "alice",
                           "--redirect-to", "mx.example.net", fragment="not a valid host name")
        await self.refused("domain", "add", "other.test", "--owner", "alice",
                           "--redirect-to", "mx:0", fragment="port must be a number")
        await self.refused("domain", "add", "other.test", "--owner", "alice",
                           "--redirect-to", "mx", "--spam-action", "2", fragment="invalid choice")

        listing = (await self.ok("domain", "list")).splitlines()
        self.assertEqual(listing[0].split(), ["DOMAIN", "OWNER", "REDIRECT", "TO", "SPAM",
                                              "VIRUS", "TLS"])
        self.assertEqual([line.split() for line in listing[1:]], [
            ["example.com", "bob", "mx.example.net", "quarantine", "quarantine",
             "verify-if-offered", "(default)"],
            ["xn--bcher-kva.de", "alice", "[2001:db8::1]:2525", "tag", "quarantine",
             "verify"],
        ])
        only_alice = (await self.ok("domain", "list", "--owner", "alice")).splitlines()
        self.assertEqual([line.split()[0] for line in only_alice[1:]], ["xn--bcher-kva.de"])

        self.assertEqual(await self.ok("address", "add", "example.com", "John"),
                         "example.com: accepting john\n")
        await self.ok("address", "add", "example.com", "postmaster")
        self.assertIn("already", await self.ok("address", "add", "example.com", "JOHN"))
        await self.refused("address", "add", "example.com", "bad..local",
                           fragment="not a valid dot-atom")
        await self.refused("address", "add", "nowhere.test", "john", fragment="no such domain")
        self.assertEqual(await self.ok("address", "list", "example.com"), "john\npostmaster\n")

        # a daemon's snapshot on the same store sees exactly this
        db = await open_database_at(self, f"sqlite:///{self.data_dir / 'mailcore.sqlite'}")
        served = DomainService(db, get_reactor())
        await served.refresh()
        self.assertTrue(served.accepts("john", "example.com"))
        self.assertFalse(served.accepts("jane", "example.com"))
        self.assertTrue(served.accepts("anyone", "bücher.de"))
        bucher = served.lookup("xn--bcher-kva.de")
        assert bucher is not None
        self.assertEqual((bucher.redirect_host, bucher.redirect_port, bucher.require_tls,
                          bucher.spam_action), ("2001:db8::1", 2525, True, 1))

        await self.ok("address", "remove", "example.com", "john")
        await self.refused("address", "remove", "example.com", "john",
                           fragment="not in the address list")
        self.assertEqual(await self.ok("domain", "remove", "example.com"),
                         "no longer serving example.com\n")
        await self.refused("domain", "remove", "example.com", fragment="no such domain")
        await served.refresh()
        self.assertIsNone(served.lookup("example.com"))

    async def test_a_domains_tls_policy_is_set_changed_and_routed(self) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@users.test", "--password", "x")
        out = await self.ok("domain", "add", "selfsigned.test", "--owner", "alice",
                            "--redirect-to", "mx.selfsigned.test", "--tls", "may")
        self.assertEqual(out, "serving selfsigned.test for alice: mail goes to "
                              "mx.selfsigned.test, TLS may\n")
        out = await self.ok("domain", "add", "plain.test", "--owner", "alice",
                            "--redirect-to", "mx.plain.test")
        self.assertTrue(out.endswith(", TLS verify-if-offered (default)\n"), out)
        await self.refused("domain", "add", "other.test", "--owner", "alice",
                           "--redirect-to", "mx", "--tls", "sometimes", fragment="invalid choice")
        await self.refused("domain", "add", "other.test", "--owner", "alice",
                           "--redirect-to", "mx", "--tls", "may", "--require-tls",
                           fragment="not allowed with argument")

        out = await self.ok("domain", "set", "plain.test", "--tls", "verify")
        self.assertEqual(out, "plain.test: mail goes to mx.plain.test, TLS verify, "
                              "spam: quarantine, viruses: quarantine\n")
        out = await self.ok("domain", "set", "selfsigned.test", "--tls", "default",
                            "--redirect-to", "mx2.selfsigned.test:2525")
        self.assertIn("mx2.selfsigned.test:2525, TLS verify-if-offered (default)", out)
        await self.ok("domain", "set", "selfsigned.test", "--tls", "none")
        await self.refused("domain", "set", "plain.test", fragment="nothing to change")
        await self.refused("domain", "set", "nowhere.test", "--tls", "may",
                           fragment="no such domain")
        await self.refused("domain", "set", "plain.test", "--tls", "maybe",
                           fragment="invalid choice")

        listing = (await self.ok("domain", "list")).splitlines()
        self.assertEqual([line.split()[5:] for line in listing[1:]], [["verify"], ["none"]])

        # the queue default comes from [queue] tls, and the list says which one applies
        config = self.base / "mailcore.toml"
        config.write_text('[queue]\ntls = "may"\n')
        await self.ok("-c", str(config), "domain", "set", "plain.test", "--tls", "default")
        listing = (await self.ok("-c", str(config), "domain", "list")).splitlines()
        self.assertEqual([line.split()[5:] for line in listing[1:]],
                         [["may", "(default)"], ["none"]])

        # what the daemon's router makes of it, on the same store
        db = await open_database_at(self, f"sqlite:///{self.data_dir / 'mailcore.sqlite'}")
        served = DomainService(db, get_reactor())
        await served.refresh()
        selfsigned, plain = served.lookup("selfsigned.test"), served.lookup("plain.test")
        assert selfsigned is not None and plain is not None
        self.assertEqual((selfsigned.tls, plain.tls), ("none", None))
        router = Router(db, Clock(), QueueSettings(node_id="n"))
        self.assertEqual(await router.route(selfsigned.id, "b@selfsigned.test"),
                         Hop("mx2.selfsigned.test", 2525, "none"))
        self.assertEqual((await router.route(plain.id, "b@plain.test")).tls,
                         "verify-if-offered")

    async def test_usage_mistakes_are_one_line(self) -> None:
        await self.refused("domain", fragment="required")
        await self.refused("domain", "add", "example.com", fragment="required")
        await self.refused("address", "add", "example.com", fragment="required")
