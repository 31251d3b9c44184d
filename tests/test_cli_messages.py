"""The CLI's mistakes in one style: the option that sets the field at fault (`--redirect-to`,
not the API's `redirectTo`), no capital to start and no full stop, no library's own text."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from mailcore.cli import in_cli_words, plain
from tests.support.cli import CliTestCase


class WordingTests(SynchronousTestCase):
    def test_the_field_becomes_its_option(self) -> None:
        options = {"redirectTo": "--redirect-to", "email": "--email", "Price": "--price"}
        cases = [
            # The field starts the message: it is replaced.
            (("redirectTo 'mx:0': port must be a number.", "redirectTo"),
             "--redirect-to 'mx:0': port must be a number."),
            # It does not: the option is put in front.
            (("Enter a valid email address.", "email"), "--email: enter a valid email address"),
            # No field, but the first word names it (in any case).
            (("Price 'x' is not a number.", None), "--price 'x' is not a number."),
            (("Email is taken.", "email"), "--email is taken."),
            # A field with no option of the CLI: the message as it is.
            (("A user with that username already exists.", "username"),
             "A user with that username already exists."),
        ]
        for (message, field), expected in cases:
            self.assertEqual(in_cli_words(message, field, options), expected)

    def test_plain_style(self) -> None:
        self.assertEqual(plain("No such domain: x.test."), "no such domain: x.test")
        self.assertEqual(plain("A user with that email already exists."),
                         "a user with that email already exists")
        self.assertEqual(plain("URL: enter a valid URL."), "URL: enter a valid URL")
        self.assertEqual(plain("--db x: unknown driver"), "--db x: unknown driver")
        self.assertEqual(plain("[smtp] unknown key: colour"), "[smtp] unknown key: colour")


class CliMessageTests(CliTestCase):
    async def test_refusals_name_the_options(self) -> None:
        await self.ok("user", "add", "alice", "--email", "alice@example.test",
                      "--password", "pw")
        add = ("domain", "add", "customer.test", "--owner", "alice")
        cases: list[tuple[tuple[str, ...], str]] = [
            ((*add, "--redirect-to", "mx:0"),
             "--redirect-to 'mx:0': port must be a number from 1 to 65535"),
            ((*add, "--redirect-to", "169.254.169.254"),
             "--redirect-to: this server does not relay to 169.254.169.254: "),
            (("domain", "add", "bad_name.test", "--owner", "alice", "--redirect-to", "mx.test"),
             "domain name 'bad_name.test' is not a valid host name (letters, digits and "
             "hyphens, in dot-separated labels of 1 to 63)"),
            (("domain", "set", "nowhere.test", "--tls", "may"), "no such domain: nowhere.test"),
            (("user", "add", "bob", "--email", "not-an-address", "--password", "pw"),
             "--email: enter a valid email address"),
            (("user", "add", "alice", "--email", "other@example.test", "--password", "pw"),
             "a user with that username already exists"),
            (("tokens", "buy", "alice", "5", "--price", "lots"),
             "--price 'lots' is not a number"),
            (("webhook", "add", "alice", "ftp://hooks.example.test/"),
             "URL: enter a valid URL: the scheme must be http or https"),
        ]
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self.mc(*args)) for args, _ in cases]
        )
        for (args, expected), result in zip(cases, results, strict=True):
            self.assertOneLineError(result, context=args)
            line = result.err.rstrip("\n").removeprefix("mailcore: ")
            self.assertTrue(line.startswith(expected), (args, line))
            self.assertFalse(line.endswith("."), line)
