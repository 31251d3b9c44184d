"""How the Core builds the inbound server: [smtp] settings, listeners, the domain service."""

from __future__ import annotations

from pathlib import Path

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from mailcore.config import Config, ConfigError
from mailcore.core import Core
from mailcore.gateway.callout import VerdictSweeper
from mailcore.gateway.quarantine import QuarantineSettings
from mailcore.smtp.server import SMTPServerFactory
from mailcore.smtp.settings import SMTPSettings
from tests.support.db import synchronous_database
from tests.support.testca import shared_pki


class SettingsTests(TestCase):
    def test_defaults(self) -> None:
        settings = SMTPSettings.from_config(Config(hostname="mx.example.net"))
        self.assertEqual(settings, SMTPSettings(
            hostname="mx.example.net", max_message_size=52428800, max_recipients=100,
            max_connections=200, max_connections_per_ip=20, idle_timeout=300.0,
            command_timeout=120.0, max_session_time=3600.0, max_errors=20,
            max_junk_commands=100,
            max_line_length=1000, max_command_length=512,
        ))

    def test_the_smtp_table(self) -> None:
        config = Config(sections={"smtp": {
            "max_message_size": 1000000, "max_recipients": 5, "max_connections": 7,
            "max_connections_per_ip": 2, "idle_timeout": 30, "command_timeout": 4.5,
            "max_errors": 3, "max_junk_commands": 10, "max_session_time": 600,
            "listen": ["tcp:25"],
        }})
        settings = SMTPSettings.from_config(config)
        self.assertEqual((settings.max_message_size, settings.max_recipients,
                          settings.max_connections, settings.max_connections_per_ip,
                          settings.idle_timeout, settings.command_timeout, settings.max_errors,
                          settings.max_junk_commands, settings.max_session_time),
                         (1000000, 5, 7, 2, 30, 4.5, 3, 10, 600))

    def test_bad_values_are_config_errors(self) -> None:
        for key, value in (("max_recipients", 0), ("max_recipients", 2.5),
                           ("idle_timeout", "long"), ("max_errors", True),
                           ("max_junk_commands", 0), ("max_junk_commands", 1.5),
                           ("max_session_time", 0), ("max_session_time", "1h"),
                           ("max_line_length", 20)):
            with self.subTest(key=key, value=value):
                with self.assertRaises(ConfigError):
                    SMTPSettings.from_config(Config(sections={"smtp": {key: value}}))

    def test_the_stress_keys(self) -> None:
        default = SMTPSettings.from_config(Config())
        self.assertEqual((default.stress_idle_timeout, default.stress_max_errors,
                          default.stress_max_junk_commands), (10, 1, 1))
        settings = SMTPSettings.from_config(Config(sections={"smtp": {
            "stress_idle_timeout": 2.5, "stress_max_errors": 3,
            "stress_max_junk_commands": 100}}))
        self.assertEqual((settings.stress_idle_timeout, settings.stress_max_errors,
                          settings.stress_max_junk_commands), (2.5, 3, 100))
        # Stress only shortens: more than the usual value is refused.
        for table in ({"stress_idle_timeout": 0}, {"stress_idle_timeout": "10s"},
                      {"stress_idle_timeout": 301}, {"stress_max_errors": 0},
                      {"stress_max_errors": 1.5}, {"stress_max_errors": True},
                      {"stress_max_junk_commands": -1}, {"stress_max_junk_commands": 101},
                      {"idle_timeout": 30, "stress_idle_timeout": 31},
                      {"max_errors": 5, "stress_max_errors": 6}):
            with self.subTest(table=table):
                with self.assertRaisesRegex(ConfigError, r"^\[smtp\] stress_"):
                    SMTPSettings.from_config(Config(sections={"smtp": table}))
        # stress_min_data_rate: octets a second, a whole number; 0 turns it off
        self.assertEqual(default.stress_min_data_rate, 500)
        for value in (0, 2000):
            settings = SMTPSettings.from_config(Config(sections={"smtp": {
                "stress_min_data_rate": value}}))
            self.assertEqual(settings.stress_min_data_rate, value)
        for bad in (-1, 1.5, True, "500"):
            with self.subTest(stress_min_data_rate=bad):
                with self.assertRaisesRegex(ConfigError, r"stress_min_data_rate must be a "
                                            r"positive number or 0"):
                    SMTPSettings.from_config(Config(sections={"smtp": {
                        "stress_min_data_rate": bad}}))
        # an idle_timeout under the default stress_idle_timeout is no error: stress keeps it
        # (StressTests.test_stress_never_lengthens_the_idle_timeout)
        SMTPSettings.from_config(Config(sections={"smtp": {"idle_timeout": 5}}))

    def test_hop_limit_and_postmaster(self) -> None:
        default = SMTPSettings.from_config(Config(hostname="mx.example.net"))
        self.assertEqual((default.max_hops, default.postmaster_address),
                         (50, "postmaster@mx.example.net"))
        settings = SMTPSettings.from_config(Config(sections={"smtp": {
            "max_hops": 30, "postmaster": "abuse@operator.example"}}))
        self.assertEqual((settings.max_hops, settings.postmaster_address),
                         (30, "abuse@operator.example"))

    def test_nothing_from_the_config_can_split_an_smtp_line(self) -> None:
        """The hostname goes into greetings, EHLO and Received; postmaster into RCPT TO; the
        quarantine's digest_sender into MAIL FROM."""
        for postmaster in ("a@b.example\r\nRCPT TO:<victim@elsewhere.example>",
                           "a@b.example\n", "a\x00@b.example", "a b@b.example",
                           "a%elsewhere.example@b.example", "postmaster", 7):
            with self.subTest(postmaster=postmaster):
                with self.assertRaisesRegex(ConfigError, r"^\[smtp\] postmaster"):
                    SMTPSettings.from_config(Config(sections={"smtp": {
                        "postmaster": postmaster}}))
        for hostname in ("mx.example\r\n250 injected", "mx example", "mx\x00", ""):
            with self.subTest(hostname=hostname):
                with self.assertRaisesRegex(ConfigError, "^hostname"):
                    SMTPSettings.from_config(Config(hostname=hostname))
        with self.assertRaisesRegex(ConfigError, "^hostname 'bücher.example' .* its xn-- form"):
            SMTPSettings.from_config(Config(hostname="bücher.example"))
        with self.assertRaisesRegex(ConfigError, r"the default, from hostname\); set it"):
            SMTPSettings.from_config(Config(hostname="mx_1.example"))
        for sender in ("digest@gw.example\r\nRCPT TO:<victim@elsewhere.example>",
                       "digest@gw.example\n", "di gest@gw.example", "digest"):
            with self.subTest(digest_sender=sender):
                with self.assertRaisesRegex(ConfigError, r"^\[quarantine\] digest_sender"):
                    QuarantineSettings.from_config({"digest_sender": sender})
        self.assertEqual(QuarantineSettings.from_config(
            {"digest_sender": "digest@gw.example"}).digest_sender, "digest@gw.example")


class CoreWiringTests(TestCase):
    def core(self, config: Config, *, tls: bool = True) -> tuple[Core, MemoryReactorClock]:
        reactor = MemoryReactorClock()
        cert = key = None
        if tls:
            cert, key = shared_pki().write_server_pair(Path(self.mktemp()))
        core = Core.build(config, synchronous_database(), reactor, tls_cert=cert, tls_key=key)
        return core, reactor

    def test_one_listener_per_endpoint_sharing_one_factory(self) -> None:
        config = Config(smtp_endpoints=("tcp:2525:interface=127.0.0.1", "tcp:2526"),
                        hostname="mx.example.net")
        core, reactor = self.core(config)
        services = core.listener_services(reactor)
        self.assertEqual(len(services), 2)
        for svc in services:
            assert isinstance(svc, StreamServerEndpointService)
            svc.startService()
            self.addCleanup(svc.stopService)
        self.assertEqual([(port, interface) for port, _, _, interface in reactor.tcpServers],
                         [(2525, "127.0.0.1"), (2526, "")])
        factories = {id(factory) for _, factory, _, _ in reactor.tcpServers}
        self.assertEqual(len(factories), 1)
        factory = reactor.tcpServers[0][1]
        assert isinstance(factory, SMTPServerFactory)
        self.assertIs(factory.directory, core.domains)
        self.assertIsNotNone(factory.tls)
        self.assertEqual(factory.settings.hostname, "mx.example.net")
        self.assertIs(factory.sink, core.spool)
        self.assertIs(factory.stress_gauge, core.smtp_stress)
        self.assertEqual(core.metrics.get_sample_value("mailcore_smtp_stress"), 0)

    def test_without_a_certificate_no_starttls(self) -> None:
        core, _ = self.core(Config(), tls=False)
        self.assertIsNone(core.smtp_factory().tls)

    def test_the_domain_service_runs_in_the_background(self) -> None:
        core, reactor = self.core(Config(sections={"domains": {"refresh_interval": 5,
                                                               "poll_interval": 0.25}}))
        self.assertIn(core.domains, core.background_services())
        self.assertEqual((core.domains.refresh_interval, core.domains.poll_interval),
                         (5, 0.25))
        core.domains.startService()
        self.assertTrue(core.domains.loaded)
        self.assertEqual([c.getTime() for c in reactor.getDelayedCalls()], [0.25])
        core.domains.stopService()
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_recipient_verification_is_wired_only_when_on(self) -> None:
        core, _ = self.core(Config(), tls=False)
        self.assertIsNone(core.recipient_verifier)
        self.assertIsNone(core.smtp_factory().verifier)
        self.assertFalse([s for s in core.background_services()
                          if isinstance(s, VerdictSweeper)])
        core, _ = self.core(Config(sections={"smtp": {"verify_recipients": True}}), tls=False)
        verifier = core.recipient_verifier
        assert verifier is not None
        self.assertIs(core.smtp_factory().verifier, verifier)
        self.assertIs(verifier.router, core.queue.runner.router)  # delivery's own routes
        self.assertIs(verifier.connector, core.queue.runner.connector)
        self.assertIs(verifier.domains, core.domains)
        # A service of the daemon: its idle probe connections are closed when it stops.
        self.assertIn(verifier, core.background_services())
        [sweeper] = [s for s in core.background_services() if isinstance(s, VerdictSweeper)]
        self.assertIs(sweeper.verifier, verifier)
        self.assertIsNotNone(sweeper.leases)  # one node sweeps per period
        verifier.probes.labels("deliverable").inc()  # on the daemon's /metrics
        self.assertEqual(core.metrics.get_sample_value(
            "mailcore_smtp_verify_probes_total", {"result": "deliverable"}), 1)

    def test_expired_mta_sts_policies_are_swept_on_one_node(self) -> None:
        from mailcore.queue.mtasts import PolicySweeper

        core, _ = self.core(Config(), tls=False)
        [sweeper] = [s for s in core.background_services() if isinstance(s, PolicySweeper)]
        self.assertIs(sweeper.db, core.db)
        self.assertEqual(sweeper.interval(), 3600.0)
        self.assertIsNotNone(sweeper.leases)  # one node sweeps per period

    def test_bad_domains_settings_are_one_line_naming_the_key(self) -> None:
        for section, key in (({"refresh_interval": 0}, "refresh_interval"),
                             ({"poll_interval": -1}, "poll_interval"),
                             ({"poll_interval": True}, "poll_interval"),
                             ({"pol_interval": 1}, "pol_interval")):
            with self.subTest(section=section):
                with self.assertRaises(ConfigError) as cm:
                    self.core(Config(sections={"domains": section}), tls=False)
                self.assertIn("[domains]", str(cm.exception))
                self.assertIn(key, str(cm.exception))
