"""A property-based fuzz of the whole HTTP surface, generated from the daemon's /openapi.json.

A real daemon (`twistd mailcore` on free loopback ports, a temp data dir) gets a user with a
credential for every security scheme the document names, a domain, an address, an IMAP
server and a webhook to aim at; then schemathesis (its CLI, in a subprocess, so that trial's
reactor keeps running) sends a bounded, derandomized set of generated requests to every
operation: positive and negative cases, boundary values, a short stateful phase. The test
fails on any 5xx and on any reply whose status, content type or body the document does not
allow for that operation.

Left out: `POST …/imap-servers/{id}/sync/`, the one operation that makes the daemon connect
to a host the request names (tests.test_web_imap2api syncs against real loopback servers).
The daemon is also told to connect nowhere (`[fetch] deny_networks` all) and its periodic
sync never comes due during the run, so no traffic leaves loopback.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import treq
from treq.client import HTTPClient
from twisted.web.client import Agent, HTTPConnectionPool

from tests.support.cli import cli_command
from tests.support.reactor import get_reactor
from tests.support.servers import run_command
from tests.test_daemon import DaemonTestCase, _env

ST = (
    sys.executable,
    "-c",
    "import sys; from schemathesis.cli import schemathesis; sys.argv[0] = 'st'; "
    "sys.exit(schemathesis())",
)
# Per operation in the fuzzing and stateful phases; with --generation-deterministic the same
# cases every run. The coverage phase's boundary, negative and unexpected-method cases (most
# of the run's some 8,000 requests) do not count against it.
MAX_EXAMPLES = 5
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
# Creating a Dropmyemail account logs in to the server it names first, which means resolving
# generated host names: not fuzzed (tests/test_dropmyemail_*.py cover its input).
NOT_FUZZED = ("imap2api.sync_server.post", "imap2api.sync_server.post_1",
              "dropmyemail.create_account.post")
EMAIL = "alice@example.test"
DOMAIN = "fuzz.example.test"
CONFIG = """\
[fetch]
# Never reached in a run, and nothing to reach anyway.
tick = 86400
sync_interval = 86400
deny_networks = ["0.0.0.0/0", "::/0"]

[web]
# The fuzz is one user sending thousands of requests: let them reach the handlers.
imap2api_user_rate = "1000000/hour"
imap2api_anonymous_rate = "1000000/hour"
dropmyemail_token_rate = "1000000/second"
oauth_token_rate = "1000000/second"
oauth_client_failure_rate = "1000000/hour"
protecmail_user_rate = "1000000/second"
mailapi_user_rate = "1000000/second"
safedrop_user_rate = "1000000/second"
bad_credential_rate = "1000000/hour"
"""


def toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's for these ASCII values)."""
    return json.dumps(value)


def tested_labels(events: Path) -> set[str]:
    """"METHOD /path" of every operation that a schemathesis run sent requests to (a
    scenario of it finished, not skipped)."""
    labels: set[str] = set()
    for line in events.read_text(encoding="utf-8").splitlines():
        finished = json.loads(line).get("ScenarioFinished")
        if finished and finished.get("status") != "skip":
            labels.add(finished["recorder"]["label"])
    return labels - {"Stateful tests"}


class HttpFuzzTests(DaemonTestCase):
    timeout = 600

    async def cli(self, *args: str) -> str:
        config = self.base / "mailcore.toml"
        result = await cli_command("--data-dir", str(self.data_dir), "--config", str(config),
                                   *args, env=_env(), cwd=self.base)
        self.assertEqual(result.status, 0, result.err)
        return result.out.strip()

    async def request(
        self, http: HTTPClient, method: str, path: str, headers: dict[str, str],
        body: Any = None,
    ) -> tuple[int, dict[str, list[str]], Any]:
        url = f"http://127.0.0.1:{self.http_port}{path}"
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["json"] = body
        response = await http.request(method, url, **kwargs)
        raw = await treq.content(response)
        found = {k.decode().lower(): [v.decode() for v in vs]
                 for k, vs in response.headers.getAllRawHeaders()}
        return response.code, found, json.loads(raw) if raw else None

    async def seed(self, http: HTTPClient, token: str, key: str) -> dict[str, list[Any]]:
        """Objects for the generated requests to find, by the parameter names they take."""
        auth = {"Authorization": f"Token {token}"}
        status, _, body = await self.request(
            http, "POST", f"/api/v1/domain/{DOMAIN}", {"Api-Key": key},
            {"redirectTo": "mx.example.net"})
        self.assertEqual(status, 200, body)
        status, _, body = await self.request(
            http, "PUT", f"/api/v1/domain/{DOMAIN}/addresses/info", {"Api-Key": key})
        self.assertEqual(status, 200, body)
        status, _, server = await self.request(
            http, "POST", "/api/imap-servers/", auth,
            {"host": "imap.example.net", "username": "alice", "password": "pw"})
        self.assertEqual(status, 201, server)
        status, _, hook = await self.request(
            http, "POST", "/api/webhooks/", auth, {"url": "https://hooks.example.net/"})
        self.assertEqual(status, 201, hook)
        return {
            "domain": [DOMAIN],
            "address": ["info", f"info@{DOMAIN}"],
            "target": [DOMAIN, f"info@{DOMAIN}"],
            "server_id": [server["id"]],
            "webhook_id": [hook["id"]],
        }

    async def oauth_token(self, http: HTTPClient) -> str:
        """A Dropmyemail access token, the way an app gets one: register the app, log in and
        allow on the authorization page, exchange the code."""
        out = await self.cli("oauth", "app", "add", "Fuzz", "--owner", "alice",
                             "--redirect-uri", "https://app.example.test/cb")
        uid = re.search(r"^uid: (\S+)$", out, re.M)
        secret = re.search(r"^secret: (\S+)$", out, re.M)
        assert uid and secret, out
        base = f"http://127.0.0.1:{self.http_port}"
        page = (f"{base}/oauth/authorize?client_id={uid.group(1)}&response_type=code"
                "&scope=read+write&redirect_uri=https%3A%2F%2Fapp.example.test%2Fcb")
        cookies: dict[str, str] = {}

        async def call(method: str, data: dict[str, str] | None = None) -> Any:
            cookie: dict[bytes | str, bytes | str] = {
                "Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}
            response = await http.request(method, page, data=data, allow_redirects=False,
                                          headers=cookie)
            body = await treq.content(response)
            for line in response.headers.getRawHeaders(b"set-cookie", []):
                name, _, rest = line.decode().partition("=")
                cookies[name.strip()] = rest.split(";", 1)[0]
            return response, body

        _, body = await call("GET")
        csrf = re.search(rb'name="csrf_token" value="([^"]+)"', body)
        assert csrf, body
        form = {"csrf_token": csrf.group(1).decode()}
        response, _ = await call("POST", {**form, "action": "login", "username": "alice",
                                          "password": "s3cret-Pa55"})
        self.assertEqual(response.code, 303)
        _, body = await call("GET")  # the consent form: its token is for the new session
        csrf = re.search(rb'name="csrf_token" value="([^"]+)"', body)
        assert csrf, body
        response, _ = await call("POST", {"csrf_token": csrf.group(1).decode(),
                                          "decision": "allow"})
        self.assertEqual(response.code, 302)
        location = response.headers.getRawHeaders(b"location")[0].decode()
        code = re.search(r"[?&]code=([^&]+)", location)
        assert code, location
        response = await http.request("POST", f"{base}/oauth/token", data={
            "grant_type": "authorization_code", "code": unquote(code.group(1)),
            "redirect_uri": "https://app.example.test/cb", "client_id": uid.group(1),
            "client_secret": secret.group(1)})
        reply = json.loads(await treq.content(response))
        self.assertEqual(response.code, 200, reply)
        return str(reply["access_token"])

    def st_config(
        self, credentials: dict[str, str], known: dict[str, list[Any]],
        schemes: dict[str, dict[str, Any]],
    ) -> str:
        """schemathesis.toml: a credential for each security scheme (an API key, or a bearer
        token for OAuth 2 and HTTP bearer), and the seeded objects as likely path values."""
        missing = set(schemes) - set(credentials)
        self.assertFalse(missing, f"give the fuzz a credential for {sorted(missing)}")
        lines = []
        for name, scheme in sorted(schemes.items()):
            kind = "api_key" if scheme["type"] == "apiKey" else "bearer"
            lines += [f"[auth.openapi.{name}]", f"{kind} = {toml_string(credentials[name])}"]
        for name, values in sorted(known.items()):
            lines += [f"[dictionaries.{name}]", f"values = {json.dumps(values)}"]
        lines.append("[parameters]")
        for name in sorted(known):
            lines.append(f'"path.{name}" = {{ dictionary = "{name}", probability = 0.5 }}')
        return "\n".join(lines) + "\n"

    async def test_no_reply_is_a_server_error_or_breaks_the_document(self) -> None:
        self.base.joinpath("mailcore.toml").write_text(CONFIG, encoding="utf-8")
        await self.cli("user", "add", "alice", "--email", EMAIL, "--password", "s3cret-Pa55")
        key = await self.cli("apikey", "create", "alice")
        token = await self.cli("token", "create", "alice")
        daemon = await self.start_daemon("--config", str(self.base / "mailcore.toml"))

        pool = HTTPConnectionPool(get_reactor(), persistent=False)
        http = HTTPClient(Agent(get_reactor(), pool=pool))
        status, headers, _ = await self.request(
            http, "GET", "/", {"X-Auth-User": EMAIL, "X-Auth-Key": key})
        self.assertEqual(status, 204)
        session = headers["x-auth-token"][0]
        known = await self.seed(http, token, key)
        access_token = await self.oauth_token(http)
        status, _, document = await self.request(http, "GET", "/openapi.json", {})
        self.assertEqual(status, 200)
        await pool.closeCachedConnections()

        credentials = {
            "imap2apiToken": f"Token {token}",
            "mailapiAuthKey": token,
            "protecmailApiKey": key,
            "safedropApiKey": key,
            "safedropUser": EMAIL,
            "safedropToken": session,
            "dropmyemailOAuth": access_token,
            "dropmyemailAccessToken": access_token,
        }
        schemes = document["components"]["securitySchemes"]
        st_toml = self.base / "schemathesis.toml"
        st_toml.write_text(self.st_config(credentials, known, schemes), encoding="utf-8")
        # What should be tested: every operation but those left out, and the document
        # itself (schemathesis never fuzzes the schema it reads).
        expected = {
            f"{method.upper()} {path}"
            for path, item in document["paths"].items() for method, operation in item.items()
            if method != "parameters" and operation["operationId"] not in NOT_FUZZED
        } - {"GET /openapi.json"}
        excluded = [arg for op in NOT_FUZZED for arg in ("--exclude-operation-id", op)]
        events = self.base / "events.ndjson"

        result = await run_command(
            [*ST, "--config-file", str(st_toml), "--no-color", "run",
             f"http://127.0.0.1:{self.http_port}/openapi.json",
             "--checks", ",".join(CHECKS), "--max-examples", str(MAX_EXAMPLES),
             "--generation-deterministic", "--workers", "1", "--request-timeout", "20",
             "--output-truncate", "false", "--report", "ndjson",
             "--report-ndjson-path", str(events), *excluded],
            env=_env(), cwd=self.base, timeout=480,
        )
        output = result.out + result.err
        report = output[-20000:]
        self.assertEqual(result.status, 0, report)
        self.assertEqual(tested_labels(events), expected, report)
        self.assertRegex(output, r"\d+ generated, \d+ passed")
        self.assertTrue(daemon.running, daemon.log())
        self.assertNotIn("Traceback", daemon.log(limit=10**7))
        await self.stop_cleanly(daemon)
