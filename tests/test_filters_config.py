"""Building the chain from the `[filters]` TOML section: defaults, every filter, errors."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

import filters.config
from filters._net import Address, client_endpoint, parse_address
from filters.builtin import DANGEROUS_NAME, BuiltinFilter, BuiltinSettings, default_scores
from filters.chain import FilterChain
from filters.clamd import ClamdClient
from filters.config import build_chain
from filters.rspamd import RspamdClient, target
from filters.spamd import SpamdClient
from mailcore.config import ConfigError, config_from_toml
from mailcore.workers import CpuPool
from tests.support.filterd import attachment, multipart, text_part

FULL_TOML = """
[filters]
enabled = ["builtin", "clamd", "spamd", "rspamd"]
threshold = 6.0
score_mode = "sum"

[filters.builtin]
fail_open = true
timeout = 12
threshold = 4.0
dangerous_extensions = ["exe", ".DOCM"]
zip_max_entries = 50
max_parts = 200
limits_action = "spam"

[filters.builtin.scores]
MISSING_DATE = 0

[filters.spamd]
address = "/run/spamd.sock"
timeout = 7.5
command = "REPORT"
max_size = 2000000
oversize = "fail"

[filters.clamd]
address = "[::1]:3310"
chunk_size = 8192
max_size = 0
oversize = "skip"

[filters.rspamd]
address = "http://127.0.0.1:11333"
fail_open = true
threshold = 10
spam_actions = ["reject"]
"""


class BuildChainTests(TestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()

    def build(self, section: dict[str, Any]) -> FilterChain:
        return build_chain(section, reactor=self.reactor, runner=CpuPool.for_tests())

    def test_no_section_means_builtin_only(self) -> None:
        chain = self.build({})
        self.assertEqual(chain.names, ("builtin",))
        entry = chain.entries[0]
        self.assertIsInstance(entry.filter, BuiltinFilter)
        self.assertFalse(entry.fail_open)
        self.assertEqual(entry.timeout, 30.0)
        self.assertEqual((chain.threshold, chain.score_mode), (5.0, "max"))

    def test_every_key_from_toml(self) -> None:
        section = config_from_toml(tomllib.loads(FULL_TOML)).section("filters")
        chain = self.build(section)
        self.addCleanup(chain.close)
        self.assertEqual(chain.names, ("builtin", "clamd", "spamd", "rspamd"))
        self.assertEqual((chain.threshold, chain.score_mode), (6.0, "sum"))
        builtin, clamd, spamd, rspamd = chain.entries

        assert isinstance(builtin.filter, BuiltinFilter)
        settings = builtin.filter.settings
        self.assertTrue(builtin.fail_open)
        self.assertEqual(builtin.timeout, 12.0)
        self.assertEqual(settings.threshold, 4.0)
        self.assertEqual(settings.dangerous_extensions, frozenset({"exe", "docm"}))
        self.assertEqual(settings.zip.max_entries, 50)
        self.assertEqual(settings.mime.max_parts, 200)
        self.assertEqual(settings.limits_action, "spam")
        self.assertEqual(settings.score("MISSING_DATE"), 0.0)
        self.assertEqual(settings.score("MISSING_FROM"), 2.0)

        assert isinstance(spamd.filter, SpamdClient)
        self.assertEqual(spamd.filter.address, Address(path="/run/spamd.sock"))
        self.assertEqual((spamd.filter.timeout, spamd.filter.command), (7.5, "REPORT"))
        self.assertEqual(spamd.filter.max_size, 2_000_000)
        self.assertFalse(spamd.skip_oversize)

        assert isinstance(clamd.filter, ClamdClient)
        self.assertEqual(clamd.filter.address, Address(host="::1", port=3310))
        self.assertEqual((clamd.filter.chunk_size, clamd.filter.max_size), (8192, 0))
        self.assertTrue(clamd.skip_oversize)

        assert isinstance(rspamd.filter, RspamdClient)
        self.assertEqual(rspamd.filter.url, "http://127.0.0.1:11333")
        self.assertTrue(rspamd.fail_open)
        self.assertEqual(rspamd.filter.threshold, 10.0)
        self.assertEqual(rspamd.filter.spam_actions, ("reject",))

    def test_defaults_of_the_daemon_clients(self) -> None:
        chain = self.build({"enabled": ["spamd", "clamd", "rspamd"]})
        self.addCleanup(chain.close)
        spamd, clamd, rspamd = (e.filter for e in chain.entries)
        assert isinstance(spamd, SpamdClient)
        assert isinstance(clamd, ClamdClient)
        assert isinstance(rspamd, RspamdClient)
        self.assertEqual(str(spamd.address), "127.0.0.1:783")
        self.assertEqual((spamd.command, spamd.timeout, spamd.max_size),
                         ("SYMBOLS", 30.0, 1024 * 1024))
        self.assertEqual(str(clamd.address), "127.0.0.1:3310")
        self.assertEqual((clamd.timeout, clamd.max_size), (60.0, 25 * 1024 * 1024))
        self.assertEqual(rspamd.url, "http://127.0.0.1:11333")
        self.assertIsNone(rspamd.threshold)
        skip = {e.filter.name: e.skip_oversize for e in chain.entries}
        self.assertEqual(skip, {"spamd": True, "clamd": False, "rspamd": True})

    def test_no_section_builds_the_builtin_defaults(self) -> None:
        """The daemon builds its built-in filter here: with nothing configured it has the
        settings `BuiltinSettings` defaults to, scores included. The MIME structure scores
        were left out here (2 to 3 points where they fell back to the threshold, 5)."""
        builtin = self.build({}).entries[0].filter
        assert isinstance(builtin, BuiltinFilter)
        self.assertEqual(builtin.settings, dataclasses.replace(
            BuiltinSettings(), scores=builtin.settings.scores))
        self.assertEqual(dict(builtin.settings.scores), dict(BuiltinSettings().scores))

    async def test_a_long_boundary_alone_is_no_spam_by_default(self) -> None:
        boundary = "b" * 71  # past RFC 2046's 70 characters: MIME_LONG_BOUNDARY, 1 point
        verdict = await self.build({}).scan(multipart([text_part(b"hi")], boundary=boundary))
        self.assertIn("MIME_LONG_BOUNDARY", verdict.symbol_names)
        self.assertFalse(verdict.spam)

    def test_configured_but_not_enabled_is_allowed(self) -> None:
        chain = self.build({"spamd": {"address": "127.0.0.1:1783"}})
        self.assertEqual(chain.names, ("builtin",))

    def test_a_table_configured_but_not_enabled_is_checked(self) -> None:
        """A misspelt key or a bad value in the table of a filter not (yet) enabled was
        taken without a word, and refused only on the day the filter was enabled."""
        for section, expected in (
            ({"spamd": {"adress": "127.0.0.1:1783"}}, "unknown key filters.spamd.adress"),
            ({"clamd": {"timeout": -1}}, "filters.clamd.timeout must be a positive number"),
            ({"rspamd": {"spam_actions": ["junk"]}}, "unknown action 'junk'"),
            ({"enabled": ["spamd"], "builtin": {"gtube": "yes"}},
             "filters.builtin.gtube must be true or false"),
        ):
            with self.assertRaises(ConfigError, msg=repr(section)) as caught:
                self.build(section)
            self.assertIn(expected, str(caught.exception))
        chain = self.build({"enabled": ["spamd"], "builtin": {"gtube": False},
                            "rspamd": {"timeout": 5}})
        self.assertEqual(chain.names, ("spamd",))

    def test_clients_connect_where_configured(self) -> None:
        for section, where in (
            ({"enabled": ["spamd"], "spamd": {"address": "127.0.0.1:1783"}}, "tcp"),
            ({"enabled": ["clamd"], "clamd": {"address": "/run/c.sock"}}, "unix"),
        ):
            reactor = MemoryReactorClock()
            chain = build_chain(section, reactor=reactor, runner=CpuPool.for_tests())
            d = defer.Deferred.fromCoroutine(chain.entries[0].filter.scan(b"msg"))
            if where == "tcp":
                self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 1783))
            else:
                self.assertEqual(reactor.unixClients[0][0], "/run/c.sock")
            d.cancel()
            self.failureResultOf(d)
            self.assertEqual(reactor.getDelayedCalls(), [])

    async def test_builtin_settings_take_effect(self) -> None:
        chain = self.build({"builtin": {"dangerous_extensions": ["docm"]}})
        verdict = await chain.scan(multipart([attachment("macro.docm", b"x")]))
        self.assertEqual(verdict.viruses, (DANGEROUS_NAME,))
        verdict = await chain.scan(multipart([attachment("setup.exe", b"x")]))
        self.assertEqual(verdict.viruses, ())

    def test_errors_name_the_key(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"enabled": ["spamassassin"]}, "unknown filter 'spamassassin'"),
            ({"enabled": "builtin"}, "filters.enabled must be a list of strings"),
            ({"enabled": ["builtin", "builtin"]}, "listed twice"),
            ({"threshold": 0}, "filters.threshold must be a positive number"),
            ({"threshold": True}, "filters.threshold must be a number"),
            ({"score_mode": "avg"}, "filters.score_mode must be one of 'max', 'sum'"),
            ({"colour": "red"}, "unknown key filters.colour"),
            ({"builtin": {"gtube": "yes"}}, "filters.builtin.gtube must be true or false"),
            ({"builtin": {"max_parts": 0}}, "filters.builtin.max_parts must be an integer >= 1"),
            ({"builtin": {"dangerous_action": "delete"}}, "filters.builtin.dangerous_action"),
            ({"builtin": {"scores": {"GTUBE": "lots"}}}, "filters.builtin.scores.GTUBE"),
            ({"builtin": {"typo": 1}}, "unknown key filters.builtin.typo"),
            ({"builtin": 3}, "[filters.builtin] must be a table"),
            ({"enabled": ["spamd"], "spamd": {"address": "localhost:spamd"}},
             "filters.spamd.address: bad address"),
            ({"enabled": ["spamd"], "spamd": {"command": "PROCESS"}}, "filters.spamd.command"),
            ({"enabled": ["clamd"], "clamd": {"address": "::1:3310"}}, "[addr]:port"),
            ({"enabled": ["clamd"], "clamd": {"oversize": "truncate"}}, "filters.clamd.oversize"),
            ({"enabled": ["rspamd"], "rspamd": {"spam_actions": ["junk"]}},
             "unknown action 'junk'"),
            ({"enabled": ["rspamd"], "rspamd": {"address": "ftp://x"}},
             "filters.rspamd.address"),
            # A misspelt score symbol gave no points to anything, silently.
            ({"builtin": {"scores": {"MIME_LONG_BOUNDRY": 0}}},
             "unknown key filters.builtin.scores.MIME_LONG_BOUNDRY (symbols: "),
        ]
        for section, expected in cases:
            with self.assertRaises(ConfigError, msg=repr(section)) as caught:
                self.build(section)
            self.assertIn(expected, str(caught.exception), section)


# Keys whose value in filters.config's example is an example, not the default.
EXAMPLE_ONLY = {("filters", "enabled"), ("filters.builtin", "dangerous_extensions"),
                ("filters.builtin", "dangerous_types"), ("filters.rspamd", "threshold")}
ALL_FILTERS = ["builtin", "spamd", "clamd", "rspamd"]


def documented_example() -> dict[str, Any]:
    """The TOML block of filters.config's docstring, the reference of `[filters]` (a list
    written `[..., ...]` read without its `...`)."""
    match = re.search(r"```toml\n(.*?)```", filters.config.__doc__ or "", re.S)
    assert match is not None
    return tomllib.loads(re.sub(r",\s*\.\.\.\]", "]", match.group(1)))["filters"]


def key_paths(table: dict[str, Any], path: str = "filters") -> set[tuple[str, str]]:
    keys = set()
    for key, value in table.items():
        if isinstance(value, dict) and not path.endswith(".scores"):
            keys |= key_paths(value, f"{path}.{key}")
        else:
            keys.add((path, key))
    return keys


def chain_facts(chain: FilterChain) -> dict[str, Any]:
    """What a chain was configured with: its own settings and each entry's, the filters'
    plain attributes (not their clocks and endpoints)."""
    plain = (int, float, str, tuple, frozenset, type(None), Address, BuiltinSettings)
    facts: dict[str, Any] = {"threshold": chain.threshold, "score_mode": chain.score_mode}
    for entry in chain.entries:
        attributes = {k: v for k, v in vars(entry.filter).items()
                      if isinstance(v, plain) and not k.startswith("_")}
        facts[entry.filter.name] = dict(
            attributes, entry=(entry.fail_open, entry.timeout, entry.skip_oversize))
    return facts


class DocumentedExampleTests(TestCase):
    """filters.config's docstring documents every key of `[filters]` with its default: a
    key read and not documented, a key documented and refused, or a default that is not
    the one written fails here."""

    def build(self, section: dict[str, Any]) -> FilterChain:
        return build_chain(section, reactor=MemoryReactorClock(), runner=CpuPool.for_tests())

    def test_every_key_read_is_documented(self) -> None:
        read: set[tuple[str, str]] = set()
        original = filters.config._Table._get

        def recording(table: Any, key: str) -> Any:
            read.add((table.path, key))
            return original(table, key)

        self.patch(filters.config._Table, "_get", recording)
        self.build({"enabled": ALL_FILTERS})
        documented = key_paths(documented_example())
        scores = {(p, k) for p, k in documented if p == "filters.builtin.scores"}
        self.assertEqual(read - documented, set())
        self.assertEqual(documented - scores - read, set())
        self.assertEqual({k for _, k in scores}, set(default_scores()))

    def test_the_documented_values_are_the_defaults(self) -> None:
        example = documented_example()
        for path, key in EXAMPLE_ONLY:
            table = example
            for name in path.split(".")[1:]:
                table = table[name]
            del table[key]
        example["enabled"] = ALL_FILTERS
        documented = chain_facts(self.build(example))
        defaults = chain_facts(self.build({"enabled": ALL_FILTERS}))
        self.assertEqual(documented, defaults)


class AddressTests(TestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_address("127.0.0.1:783"), Address(host="127.0.0.1", port=783))
        self.assertEqual(parse_address("spamd.internal:783"),
                         Address(host="spamd.internal", port=783))
        self.assertEqual(parse_address("[::1]:3310"), Address(host="::1", port=3310))
        self.assertEqual(parse_address("/run/clamav/clamd.ctl"),
                         Address(path="/run/clamav/clamd.ctl"))
        self.assertEqual(parse_address("unix:/run/x.sock"), Address(path="/run/x.sock"))
        self.assertEqual(parse_address("localhost", 783), Address(host="localhost", port=783))
        self.assertEqual(str(Address(host="::1", port=1)), "[::1]:1")

    def test_bad_forms(self) -> None:
        for text in ("localhost", ":783", "host:0", "host:99999", "host:abc", "[::1", "unix:",
                     "::1:22", "[::1]x"):
            self.assertRaises(ValueError, parse_address, text)

    def test_rspamd_targets(self) -> None:
        self.assertEqual(target("127.0.0.1:11333"),
                         ("http://127.0.0.1:11333", Address(host="127.0.0.1", port=11333)))
        self.assertEqual(target("rspamd.internal"),
                         ("http://rspamd.internal:11333",
                          Address(host="rspamd.internal", port=11333)))
        self.assertEqual(target("https://scan.example/"),
                         ("https://scan.example", Address(host="scan.example", port=443)))
        self.assertEqual(target("/run/rspamd/normal.sock"),
                         ("http://rspamd", Address(path="/run/rspamd/normal.sock")))
        for bad in ("http://", "http://h/checkv2", "h:x"):
            self.assertRaises(ValueError, target, bad)

    def test_rspamd_over_a_unix_socket(self) -> None:
        reactor = MemoryReactorClock()
        chain = build_chain({"enabled": ["rspamd"], "rspamd": {"address": "/run/r.sock"}},
                            reactor=reactor, runner=CpuPool.for_tests())
        d = defer.Deferred.fromCoroutine(chain.entries[0].filter.scan(b"msg"))
        self.assertEqual(reactor.unixClients[0][0], "/run/r.sock")
        d.cancel()
        self.failureResultOf(d)

    def test_endpoint_kinds(self) -> None:
        reactor = MemoryReactorClock()
        kinds = {text: type(client_endpoint(reactor, parse_address(text), 5)).__name__
                 for text in ("127.0.0.1:1", "[::1]:1", "spamd.internal:1", "/run/s.sock")}
        self.assertEqual(kinds, {
            "127.0.0.1:1": "TCP4ClientEndpoint", "[::1]:1": "TCP6ClientEndpoint",
            "spamd.internal:1": "HostnameEndpoint", "/run/s.sock": "UNIXClientEndpoint"})

    def test_clock_is_the_reactor(self) -> None:
        chain = build_chain({}, reactor=Clock(), runner=CpuPool.for_tests())
        self.assertIsInstance(chain.clock, Clock)
