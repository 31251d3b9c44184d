"""What the web layer tells the operator: Prometheus metrics per API and status, and an
access log that names the user but never a credential."""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.logwriter import TEXT_KEY, UNIQUE_KEY
from tests.support.web import PASSWORD, Web
from web.accesslog import RedactionRule, redacted_path, redacted_target
from web.context import new_request_id
from web.root import build_site


class MetricsTests(TestCase):
    async def test_requests_are_counted_per_api_method_and_status(self) -> None:
        web = Web.build()
        alice = await web.user()
        key = await web.credential(alice)
        await web.call("GET", "/api/v1/ping", headers={"Api-Key": key})
        await web.call("GET", "/api/v1/ping", headers={"Api-Key": key})
        await web.call("GET", "/api/v1/ping")
        await web.call("GET", "/nothing")
        await web.call("POST", "/api-token-auth/", json={"username": "alice", "password": "x"})
        registry = web.core.metrics

        def count(api: str, method: str, status: str) -> Any:
            return registry.get_sample_value(
                "mailcore_http_requests_total", {"api": api, "method": method, "status": status}
            )

        self.assertEqual(count("protecmail", "GET", "200"), 2)
        self.assertEqual(count("protecmail", "GET", "401"), 1)
        self.assertEqual(count("meta", "GET", "404"), 1)
        self.assertEqual(count("imap2api", "POST", "400"), 1)
        self.assertEqual(
            registry.get_sample_value(
                "mailcore_http_request_duration_seconds_count", {"api": "protecmail"}
            ),
            3,
        )

    async def test_latency_is_measured_on_the_injected_clock(self) -> None:
        web = Web.build()
        real_check = web.core.identity.authenticate_password

        async def slow_check(name: str, password: str) -> Any:
            web.clock.advance(0.2)
            return await real_check(name, password)

        identity: Any = web.core.identity
        identity.authenticate_password = slow_check
        await web.call("POST", "/api/v1/auth/", data={"username": "a", "password": "b"})
        total = web.core.metrics.get_sample_value(
            "mailcore_http_request_duration_seconds_sum", {"api": "mailapi"}
        )
        self.assertAlmostEqual(total, 0.2)

    async def test_metrics_endpoint_serves_prometheus_text(self) -> None:
        web = Web.build()
        await web.call("GET", "/api/v1/ping")
        status, headers, body = await web.call("GET", "/metrics")
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"][0].startswith("text/plain"))
        text = body.decode()
        self.assertIn(
            'mailcore_http_requests_total{api="protecmail",method="GET",status="401"} 1.0', text
        )
        self.assertIn("# TYPE mailcore_http_request_duration_seconds histogram", text)

    async def test_metrics_can_be_restricted_or_turned_off(self) -> None:
        web = Web.build(Config(sections={"web": {"metrics_allow": ["10.0.0.0/8"]}}))
        status, _, body = await web.call("GET", "/metrics")  # StubTreq is 127.0.0.1
        self.assertEqual((status, body["error"]), (403, "Metrics are not served to this client."))
        web = Web.build(Config(sections={"web": {"metrics_allow": ["127.0.0.0/8"]}}))
        self.assertEqual((await web.call("GET", "/metrics"))[0], 200)
        web = Web.build(Config(sections={"web": {"metrics": False}}))
        self.assertEqual((await web.call("GET", "/metrics"))[0], 403)


class AccessLogTests(TestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []

        def collect(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "mailcore.web.access":
                self.events.append(event)

        observe: Any = collect
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    async def test_one_line_per_reply_with_user_status_bytes_and_no_secret(self) -> None:
        web = Web.build()
        alice = await web.user()
        key = await web.credential(alice)
        token = await web.credential(alice, "token")
        await web.call("GET", "/api/v1/ping", headers={"Api-Key": key})
        await web.call("GET", f"/v1/accounts?sort=email&access_token={token}")
        await web.call("POST", "/api/v1/auth/", data={"username": "alice", "password": PASSWORD})
        self.assertEqual(len(self.events), 3)
        ping, accounts, login = self.events
        self.assertEqual(
            (ping["user"], ping["method"], ping["target"], ping["status"], ping["api"]),
            ("alice", "GET", "/api/v1/ping", 200, "protecmail"),
        )
        self.assertGreater(ping["bytes"], 0)
        self.assertEqual(ping["client"], "127.0.0.1")
        self.assertEqual(accounts["target"], "/v1/accounts?sort=email&access_token=[redacted]")
        # Not an OAuth access token: refused, and still not shown.
        self.assertEqual((accounts["status"], accounts["user"]), (401, "-"))
        self.assertEqual((login["user"], login["status"]), ("alice", 200))
        for event in self.events:
            line = formatEvent(event)
            for secret in (key, token, PASSWORD):
                self.assertNotIn(secret, line)
                self.assertNotIn(secret, repr(event))
        self.assertIn("alice GET /api/v1/ping 200", formatEvent(ping))
        # Formatted once, by the access log itself, and marked as a line that cannot repeat
        # (it names its request id): the repeated-line limiter passes it on untracked.
        for event in self.events:
            self.assertEqual(event[TEXT_KEY], formatEvent(event))
            self.assertIn(f"id={event['request_id']}", event[TEXT_KEY])
            self.assertIs(event[UNIQUE_KEY], True)

    def test_request_ids_are_distinct_version_4_uuids(self) -> None:
        ids = [new_request_id() for _ in range(2000)]
        self.assertEqual(len(set(ids)), len(ids))
        for text in ids:
            value = uuid.UUID(text)
            self.assertEqual((str(value), value.version, value.variant),
                             (text, 4, uuid.RFC_4122))

    def test_redaction(self) -> None:
        self.assertEqual(redacted_target(b"/a/b"), "/a/b")
        self.assertEqual(
            redacted_target(b"/x?q=hello%20world&auth_key=s&Password=p&code=c"),
            "/x?q=hello%20world&auth_key=[redacted]&Password=[redacted]&code=[redacted]",
        )
        # OAuth authorization responses: code and state.
        self.assertEqual(redacted_target(b"/cb?code=abc&STATE=xyz&scope=read"),
                         "/cb?code=[redacted]&STATE=[redacted]&scope=read")

    def test_every_spelling_of_a_credential_in_the_query_is_hidden(self) -> None:
        """Whatever a careless client names its password or key in a query string, its value
        never reaches the log; parameters that are not credentials are still shown."""
        for name in (b"passwd", b"pwd", b"pass", b"PASSWORD", b"password", b"token",
                     b"key", b"api_key", b"Api-Key", b"x-api-key", b"apiKey", b"secret",
                     b"client_secret", b"id_token", b"new_password", b"db_pwd", b"user_pass",
                     b"passphrase", b"pass%77ord", b"+password", b"password%00", b"pass_word",
                     b"session", b"credentials"):
            shown = redacted_target(b"/api/v1/mail/?" + name + b"=hunter2&limit=5")
            self.assertNotIn("hunter2", shown, name)
            self.assertTrue(shown.endswith("=[redacted]&limit=5"), shown)
        self.assertEqual(redacted_target(b"/x?keyword=a&q=b&sort=date&page=2"),
                         "/x?keyword=a&q=b&sort=date&page=2")

    def test_secret_path_segments_are_hidden_however_the_path_is_spelt(self) -> None:
        for uri, shown in [
            (b"/quarantine/release/0101.99.mac", "/quarantine/release/[redacted]"),
            (b"/quarantine/release/0101.99.mac?x=1", "/quarantine/release/[redacted]?x=1"),
            (b"//quarantine//release/t0k/more", "//quarantine//release/[redacted]/more"),
            (b"/Quarantine/%72elease/t0k", "/Quarantine/%72elease/[redacted]"),
            (b"/quarantine/release", "/quarantine/release"),
            (b"/quarantine/other/t0k", "/quarantine/other/t0k"),
        ]:
            self.assertEqual(redacted_target(uri), shown, uri)

    def test_an_absolute_form_target_hides_what_its_path_would(self) -> None:
        """RFC 9112 §3.2.2: a request target may be a whole URI; the rule is matched from its
        path, and a user name and password in its authority are hidden."""
        for uri, shown in [
            (b"http://h/drop/t0k", "http://h/drop/[redacted]"),
            (b"http://h/drop/t0k/files/1", "http://h/drop/[redacted]/files/1"),
            (b"HTTPS://h:8443//Drop//t0k?code=c&n=1", "HTTPS://h:8443//Drop//[redacted]"
             "?code=[redacted]&n=1"),
            (b"http://h/quarantine/release/0101.99.mac",
             "http://h/quarantine/release/[redacted]"),
            (b"http://u:pw@h/quarantine/release/t0k", "http://[redacted]@h/quarantine/release/"
             "[redacted]"),
            (b"http://h/oauth/cb?state=s&code=c", "http://h/oauth/cb?state=[redacted]&code="
             "[redacted]"),
            (b"http://h?access_token=t", "http://h?access_token=[redacted]"),
            (b"http://h", "http://h"),
            (b"http://h/a/drop/t0k", "http://h/a/drop/t0k"),
            # asterisk-form and authority-form (CONNECT) have no path
            (b"*", "*"),
            (b"h:443", "h:443"),
            (b"u:pw@h:443", "[redacted]@h:443"),
            # a path without its leading slash is still a path
            (b"drop/t0k", "drop/[redacted]"),
        ]:
            self.assertEqual(redacted_target(uri), shown, uri)
        self.assertEqual(redacted_path(b"http://h/drop/t0k/files/2"),
                         "http://h/drop/[redacted]/files/2")

    def test_one_rule_names_every_secret(self) -> None:
        """A new secret URL is one more entry: `*` segments are shown, `{secret}` hidden."""
        rule = RedactionRule(params=frozenset({"code"}),
                             paths=("/drop/*/{secret}", "/d/{secret}"))
        self.assertEqual(rule.target(b"/drop/42/s3cr3t?code=c&n=1"),
                         "/drop/42/[redacted]?code=[redacted]&n=1")
        self.assertEqual(rule.target(b"/d/s3cr3t"), "/d/[redacted]")
        self.assertEqual(rule.target(b"/drop/42"), "/drop/42")

    def test_a_path_is_shown_as_it_is_unless_a_pattern_may_match_it(self) -> None:
        """The paths that hold no pattern's first segment are shown untouched without being
        split; any spelling that may match one (case, `%`, non-ASCII, the segment inside a
        longer one) is still judged segment by segment."""
        rule = RedactionRule(params=frozenset(), paths=("/drop/{secret}", "/q/r/{secret}"))
        for path, shown in [
            ("/api/emails/", "/api/emails/"),
            ("//api//emails?", "//api//emails?"),
            ("/DROP/t0k", "/DROP/[redacted]"),
            ("/Q/R/t0k/x", "/Q/R/[redacted]/x"),
            ("/dro%70/t0k", "/dro%70/[redacted]"),
            ("/api/dropbox/t0k", "/api/dropbox/t0k"),
            ("/\u00e9/drop/t0k", "/\u00e9/drop/t0k"),
            ("/drop/\u00e9t0k", "/drop/[redacted]"),
        ]:
            self.assertEqual(rule.path(path.encode()), shown, path)
        # A pattern that starts with `*` or `{secret}` may match any path.
        anywhere = RedactionRule(params=frozenset(), paths=("*/{secret}",))
        self.assertEqual(anywhere.path(b"/api/emails/"), "/api/[redacted]/")
        hidden_first = RedactionRule(params=frozenset(), paths=("{secret}",))
        self.assertEqual(hidden_first.path(b"/t0k/x"), "/[redacted]/x")

    def assert_drop_link_logged_as(self, target: str, shown: str) -> None:
        """A GET of `target` ({token} in it) through the real site is logged as `shown`."""
        web = Web.build()
        token = "T0k" * 14 + "x"
        protocol = build_site(web.core).buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        assert protocol is not None
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(f"GET {target.format(token=token)} HTTP/1.1\r\n"
                              "Host: 127.0.0.1\r\n\r\n".encode())
        self.assertIn(b"HTTP/1.1 ", transport.value())
        [event] = self.events
        self.assertEqual(event["target"], shown)
        self.assertNotIn(token, event[TEXT_KEY])
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_an_absolute_form_request_for_a_drop_link_is_logged_without_its_token(
        self
    ) -> None:
        # Served (and logged) as the path it names, on its host (RFC 9112 3.2.2).
        self.assert_drop_link_logged_as("http://127.0.0.1/drop/{token}/files/1",
                                        "/drop/[redacted]/files/1")

    def test_a_drop_link_with_an_encoded_slash_is_logged_without_its_token(self) -> None:
        """`/drop%2FTOKEN` is routed as `/drop/TOKEN` (the router decodes `%2F`), so the
        log hides the segment after an encoded slash as after a plain one."""
        self.assert_drop_link_logged_as("/drop%2F{token}%2Ffiles%2F1",
                                        "/drop%2F[redacted]%2Ffiles%2F1")
        for uri, shown in [
            (b"/Drop%2ft0k", "/Drop%2f[redacted]"),
            (b"/quarantine%2Frelease/t0k?x=1", "/quarantine%2Frelease/[redacted]?x=1"),
            (b"http://h/drop%2Ft0k", "http://h/drop%2F[redacted]"),
            (b"/a%2Fdrop/t0k", "/a%2Fdrop/t0k"),
        ]:
            self.assertEqual(redacted_target(uri), shown, uri)

    async def test_credential_headers_are_never_logged(self) -> None:
        every: list[dict[str, Any]] = []
        observe: Any = every.append
        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        web = Web.build()
        alice = await web.user()
        key = await web.credential(alice)
        token = await web.credential(alice, "token")
        wrong = "f" * 40
        for headers in (
            {"Authorization": f"Token {token}"},
            {"Authorization": f"Bearer {wrong}"},
            {"Api-Key": key},
            {"Api-Key": wrong},
            {"X-Auth-User": "alice@example.test", "X-Auth-Key": key},
            {"X-Auth-Token": wrong},
        ):
            for path in ("/api/emails/", "/api/v1/ping", "/", "/v1/accounts"):
                await web.call("GET", path, headers=headers)
        self.assertEqual(len(self.events), 24)
        for event in every:
            for secret in (key, token, wrong):
                self.assertNotIn(secret, formatEvent(event) or "")
                self.assertNotIn(secret, repr(event))
