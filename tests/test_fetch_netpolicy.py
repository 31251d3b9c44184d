"""The `[fetch]` address policy: an account whose host is (or resolves to) an address the
operator does not allow fails its sync with a clear error and no connection is ever opened;
allowed addresses connect; deny_networks wins; bad values are configuration errors."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailcore.config import ConfigError
from mailcore.fetch import FetchSettings
from tests.support.fetchenv import FetchEnv, make_env
from tests.support.reactor import get_reactor

REFUSED = "is where this server does not connect"


class _Hangup(Protocol):
    def connectionMade(self) -> None:
        self.factory.connections += 1  # type: ignore[attr-defined]
        assert self.transport is not None
        self.transport.loseConnection()


class Recorder(Factory):
    """A listener on 127.0.0.1 that counts the connections made to it and hangs up."""

    protocol = _Hangup

    def __init__(self) -> None:
        self.connections = 0


class FetchAddressPolicyTests(TestCase):
    timeout = 30

    def setUp(self) -> None:
        self.recorder = Recorder()
        port = get_reactor().listenTCP(0, self.recorder, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    async def sync(self, host: str, protocol: str = "imap", **settings: Any) -> tuple[Any, Any]:
        """Sync one account on `host`:our port with `settings`; the result and the account."""
        env: FetchEnv = await make_env(self, **settings)
        account = await env.accounts.create(
            env.user_id, host=host, port=self.port, username="u", password="p",
            protocol=protocol, use_ssl=False, start_tls=True,
            **({"email": "u@example.test"} if protocol == "pop" else {}),
        )
        result = await env.engine.sync(account.id)
        return result, await env.accounts.get(env.user_id, account.id)

    async def test_loopback_is_refused_by_default_before_any_connection(self) -> None:
        result, account = await self.sync("127.0.0.1", allow_loopback=False)
        self.assertEqual(result.status, "error")
        self.assertIn(f"127.0.0.1 {REFUSED}", result.error)
        self.assertEqual(account.sync_status, "error")
        self.assertIn(REFUSED, account.sync_error)
        self.assertEqual(self.recorder.connections, 0)

    async def test_pop3_accounts_obey_the_same_policy(self) -> None:
        result, _ = await self.sync("127.0.0.1", protocol="pop", allow_loopback=False)
        self.assertIn(REFUSED, result.error)
        self.assertEqual(self.recorder.connections, 0)

    async def test_a_name_resolving_to_a_forbidden_address_is_refused(self) -> None:
        result, account = await self.sync("localhost", allow_loopback=False)
        self.assertEqual(result.status, "error")
        self.assertIn(f"localhost {REFUSED}", result.error)
        self.assertIn(REFUSED, account.sync_error)
        self.assertEqual(self.recorder.connections, 0)

    async def test_the_user_is_not_told_what_a_name_resolves_to(self) -> None:
        events: list[dict[str, Any]] = []
        observe: Any = events.append
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        result, account = await self.sync("localhost", allow_loopback=False)
        self.assertEqual(result.error, account.sync_error)
        self.assertEqual(account.sync_error,
                         f"cannot connect to localhost:{self.port}: localhost {REFUSED} (the "
                         "operator's [fetch] address policy)")
        logged = [formatEvent(event) for event in events]
        self.assertTrue(any("127.0.0.1" in line or "::1" in line for line in logged),
                        logged)  # the operator's

    async def test_allow_loopback_lets_the_sync_connect(self) -> None:
        result, _ = await self.sync("127.0.0.1", allow_loopback=True)
        self.assertEqual(self.recorder.connections, 1)
        self.assertEqual(result.status, "error")  # our listener hangs up at once
        self.assertNotIn(REFUSED, result.error)

    async def test_allow_networks_admits_a_loopback_range(self) -> None:
        await self.sync("127.0.0.1", allow_networks=(ipaddress.ip_network("127.0.0.0/8"),),
                        allow_loopback=False)
        self.assertEqual(self.recorder.connections, 1)

    async def test_deny_networks_wins_over_allow(self) -> None:
        result, _ = await self.sync(
            "127.0.0.1", allow_loopback=True,
            allow_networks=(ipaddress.ip_network("127.0.0.0/8"),),
            deny_networks=(ipaddress.ip_network("127.0.0.1/32"),),
        )
        self.assertIn(REFUSED, result.error)
        self.assertEqual(self.recorder.connections, 0)


class FetchPolicySettingsTests(TestCase):
    def test_the_four_keys_are_parsed_into_the_policy(self) -> None:
        settings = FetchSettings.from_section({
            "allow_loopback": True, "allow_private": False,
            "allow_networks": ["10.1.2.0/24"], "deny_networks": "127.0.0.2/32",
        })
        policy = settings.address_policy()
        self.assertEqual(settings.allow_networks, (ipaddress.ip_network("10.1.2.0/24"),))
        self.assertTrue(policy.allows("127.0.0.1"))
        self.assertFalse(policy.allows("127.0.0.2"))
        self.assertTrue(policy.allows("10.1.2.3"))
        self.assertFalse(policy.allows("10.1.3.3"))
        self.assertTrue(policy.allows("93.184.216.34"))

    def test_the_default_refuses_loopback_and_private_addresses(self) -> None:
        policy = FetchSettings.from_section({}).address_policy()
        for address in ("127.0.0.1", "::1", "10.0.0.1", "192.168.1.1", "169.254.1.1",
                        "::ffff:127.0.0.1", "0.0.0.0"):  # noqa: S104
            self.assertFalse(policy.allows(address), address)

    def test_ipv6_forms_of_an_ipv4_address_are_judged_as_that_address(self) -> None:
        """6to4 (2002::/16) and NAT64 (64:ff9b::/96) carry an IPv4 address: 2002:7f00:1::
        reaches 127.0.0.1 through a 6to4 relay and was allowed as global; a NAT64 address
        was refused as reserved even when it reached a public server."""
        policy = FetchSettings.from_section({}).address_policy()
        for refused in ("2002:7f00:1::", "2002:a9fe:a9fe::1", "2002:c0a8:101::",
                        "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b::a9fe:a9fe"):
            self.assertFalse(policy.allows(refused), refused)
            reason = policy.refusal(refused) or ""
            self.assertTrue(reason.startswith(("loopback", "link-local", "private")), reason)
        for allowed in ("2002:5db8:d822::1", "64:ff9b::5db8:d822"):
            self.assertTrue(policy.allows(allowed), allowed)
        denying = FetchSettings.from_section({"deny_networks": ["64:ff9b::/96"]})
        self.assertFalse(denying.address_policy().allows("64:ff9b::5db8:d822"))

    def test_bad_values_are_configuration_errors(self) -> None:
        for bad in ({"allow_loopback": "yes"}, {"allow_private": 1},
                    {"allow_networks": ["not a network"]}, {"deny_networks": 10},
                    {"allow_networks": [10]}):
            with self.assertRaises(ConfigError, msg=repr(bad)):
                FetchSettings.from_section(bad)
