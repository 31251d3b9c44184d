"""The `[web]` table of the configuration and what the site takes from it."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.trial.unittest import TestCase

from mailcore.config import Config, ConfigError
from tests.support.web import make_core
from web.ratelimit import Rate
from web.root import build_site
from web.settings import WebSettings


def settings(**web: Any) -> WebSettings:
    return WebSettings.from_config(Config(sections={"web": dict(web)}))


class WebSettingsTests(TestCase):
    def test_defaults_follow_the_config(self) -> None:
        s = WebSettings.from_config(Config(http_max_body=5000, session_token_ttl=90))
        self.assertEqual((s.max_body, s.json_max_body, s.session_token_ttl), (5000, 5000, 90))
        s = WebSettings.from_config(Config())
        self.assertEqual(s.json_max_body, 1024 * 1024)
        self.assertEqual(s.login_rate, Rate(100, 3600))
        self.assertEqual(s.imap2api_user_rate, Rate(1000, 3600))
        self.assertEqual(s.imap2api_anonymous_rate, Rate(100, 3600))
        self.assertEqual(s.dropmyemail_token_rate, Rate(20, 1))
        self.assertEqual(s.oauth_token_rate, Rate(20, 2))  # 20 at once, then 10 a second
        self.assertEqual((s.protecmail_user_rate, s.mailapi_user_rate, s.safedrop_user_rate),
                         (Rate(20, 1), Rate(20, 1), Rate(20, 1)))
        self.assertEqual(s.bad_credential_rate, Rate(100, 3600))
        # /metrics (no credential) for loopback clients only, unless [web] metrics_allow says.
        self.assertFalse(s.metrics_allowed("192.0.2.1"))
        self.assertFalse(s.metrics_allowed("2001:db8::1"))
        self.assertTrue(s.metrics_allowed("127.0.0.1"))
        self.assertTrue(s.metrics_allowed("::1"))
        self.assertTrue(WebSettings.from_config(
            Config(sections={"web": {"metrics_allow": []}})).metrics_allowed("192.0.2.1"))

    def test_values_are_read(self) -> None:
        s = settings(login_rate="5/minute", dropmyemail_token_rate="50/second",
                     oauth_token_rate="30/3s", metrics_allow=["127.0.0.1/32", "::1"],
                     idle_timeout=30)
        self.assertEqual(s.login_rate, Rate(5, 60))
        self.assertEqual(s.dropmyemail_token_rate, Rate(50, 1))
        self.assertEqual(s.oauth_token_rate, Rate(30, 3))
        self.assertEqual(s.metrics_allow, (ipaddress.ip_network("127.0.0.1/32"),
                                           ipaddress.ip_network("::1/128")))
        self.assertTrue(s.metrics_allowed("::1"))
        self.assertFalse(s.metrics_allowed("10.1.2.3"))
        self.assertFalse(s.metrics_allowed(None))
        self.assertEqual(s.idle_timeout, 30.0)
        self.assertIsNone(settings(login_rate=0).login_rate)
        self.assertEqual(settings().oauth_client_failure_rate, Rate(100, 3600))
        self.assertEqual(settings(oauth_client_failure_rate="5/minute").oauth_client_failure_rate,
                         Rate(5, 60))
        self.assertIsNone(settings(oauth_client_failure_rate=0).oauth_client_failure_rate)
        self.assertEqual(settings().trusted_proxies, ())  # nobody's forwarding is believed
        self.assertEqual(settings(trusted_proxies=["127.0.0.1", "10.0.0.0/8"]).trusted_proxies,
                         (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8")))

    def test_mistakes_name_the_key(self) -> None:
        cases: list[tuple[dict[str, Any], str]] = [
            ({"nope": 1}, "[web] unknown key: nope"),
            ({"login_rate": "lots"}, "[web] login_rate"),
            ({"login_rate": 5}, "[web] login_rate"),
            ({"protecmail_user_rate": "fast"}, "[web] protecmail_user_rate"),
            ({"bad_credential_rate": 0}, "[web] bad_credential_rate"),
            ({"metrics": "yes"}, "[web] metrics must be true or false"),
            ({"metrics_allow": ["not a net"]}, "[web] metrics_allow"),
            ({"trusted_proxies": ["10.0.0.0/33"]}, "[web] trusted_proxies"),
            ({"trusted_proxies": [5]}, "[web] trusted_proxies must be a list of networks"),
            ({"json_max_body": -1}, "[web] json_max_body"),
            ({"idle_timeout": True}, "[web] idle_timeout"),
            ({"header_timeout": 0}, "[web] header_timeout"),
            ({"body_timeout": "5"}, "[web] body_timeout"),
            ({"max_connections": -1}, "[web] max_connections"),
            ({"max_connections_per_ip": 1.5}, "[web] max_connections_per_ip"),
        ]
        for web, words in cases:
            error = self.assertRaises(ConfigError, settings, **web)
            self.assertIn(words, str(error))

    def test_the_site_takes_its_limits(self) -> None:
        core, _ = make_core(Config(http_max_body=4096, sections={"web": {
            "idle_timeout": 15, "header_timeout": 7, "body_timeout": 70,
            "max_connections": 40, "max_connections_per_ip": 4,
        }}))
        site = build_site(core)
        self.assertEqual(site.max_body, 4096)  # type: ignore[attr-defined]
        self.assertEqual(site.timeOut, 15)
        self.assertFalse(site.displayTracebacks)
        connections = site.connections  # type: ignore[attr-defined]
        self.assertEqual((connections.max_total, connections.max_per_address), (40, 4))
        channel = site.buildProtocol(None)
        self.assertEqual((channel.header_timeout, channel.body_timeout), (7.0, 70.0))
        self.assertEqual(connections.total, 1)

    def test_connection_defaults(self) -> None:
        s = WebSettings.from_config(Config())
        self.assertEqual((s.max_connections, s.max_connections_per_ip), (500, 50))
        self.assertEqual((s.idle_timeout, s.header_timeout, s.body_timeout),
                         (60.0, 30.0, 300.0))
