"""Protecmail domains and address lists: ownership (404/409), validation, plans (403), the
operator's next-hop policy, and the envelope on every reply."""

from __future__ import annotations

import uuid
from typing import Any

from twisted.trial.unittest import TestCase

from mailcore.config import Config
from mailcore.identity import User
from tests.support.quarantine import Gateway, message, stopper
from tests.support.web import Web

SEED_DOMAIN = {
    "domain": "protecmail.fr",
    "redirectTo": "aspmx.l.google.com",
    "spamAction": 0,
    "virusAction": 0,
    "sendResume": True,
}
BASE_FIELDS = {"domain", "redirectTo", "spamAction", "virusAction", "sendResume"}
AGENCY = {
    "resumeTemplateSubject": "[{count}] messages in quarantine",
    "resumeTemplateBody": "Hello {email},\n{items}",
    "resumeTemplateResume": "{date} {mailfrom} {subject} {link}",
    "resumeLinkHostname": "quarantine.example.test",
    "resumeReplyTo": "support@example.test",
}


def build_web(config: Config | None = None) -> Web:
    """A Web over a fresh Core (invoice PDFs render on its synchronous CPU pool)."""
    return Web.build(config)


class Client:
    """One user's Api-Key in front of a Web."""

    def __init__(self, test: TestCase, web: Web, user: User, key: str) -> None:
        self.test = test
        self.web = web
        self.user = user
        self.key = key

    async def call(self, method: str, path: str, body: Any = None,
                   status: int = 200) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"headers": {"Api-Key": self.key}}
        if body is not None:
            kwargs["json"] = body
        got, _, reply = await self.web.call(method, path, **kwargs)
        self.test.assertEqual(got, status, (method, path, reply))
        self.test.assertIsInstance(reply, dict)
        uuid.UUID(reply["request_id"])
        self.test.assertIs(reply["success"], status == 200, reply)
        if status != 200:
            self.test.assertIsInstance(reply["msg"], str)
        result: dict[str, Any] = reply
        return result


class DomainTestCase(TestCase):
    config: Config | None = None

    async def setUp(self) -> None:  # type: ignore[override]
        self.web = build_web(self.config)
        self.alice = await self.client("alice", "standard")
        self.bob = await self.client("bob", "agency")

    async def client(self, name: str, plan: str = "free") -> Client:
        user = await self.web.core.identity.create_user(name, f"{name}@example.test",
                                                        plan=plan)
        return Client(self, self.web, user, await self.web.credential(user))


class DomainTests(DomainTestCase):
    # Next hops on documentation (non-global) and loopback addresses: the operator allows
    # them ([queue], mailcore.queue.nexthop).
    config = Config(sections={"queue": {"allow_private": True, "allow_loopback": True}})

    async def test_add_get_list_and_delete_a_domain(self) -> None:
        reply = await self.alice.call("POST", "/api/v1/domain/protecmail.fr", SEED_DOMAIN)
        self.assertEqual(set(reply), {"request_id", "success"})
        got = await self.alice.call("GET", "/api/v1/domain/protecmail.fr")
        self.assertEqual(got["data"], SEED_DOMAIN)
        await self.alice.call("POST", "/api/v1/domain/example.tld",
                              {"redirectTo": "in.example.tld"})
        listed = await self.alice.call("GET", "/api/v1/domain/all")
        self.assertEqual(listed["data"], ["example.tld", "protecmail.fr"])
        defaults = await self.alice.call("GET", "/api/v1/domain/EXAMPLE.tld")
        self.assertEqual(defaults["data"], {
            "domain": "example.tld", "redirectTo": "in.example.tld", "spamAction": 0,
            "virusAction": 0, "sendResume": False,
        })
        await self.alice.call("DELETE", "/api/v1/domain/protecmail.fr")
        await self.alice.call("DELETE", "/api/v1/domains/example.tld")
        self.assertEqual((await self.alice.call("GET", "/api/v1/domain/all"))["data"], [])
        await self.alice.call("GET", "/api/v1/domain/protecmail.fr", status=404)
        await self.alice.call("DELETE", "/api/v1/domains/protecmail.fr", status=404)

    async def test_the_seeds_misspelt_post_path_adds_a_domain(self) -> None:
        await self.alice.call("POST", "/api/v1/domais/protecmail.fr", SEED_DOMAIN)
        self.assertEqual((await self.alice.call("GET", "/api/v1/domain/all"))["data"],
                         ["protecmail.fr"])
        stored = await self.web.core.domains.get("protecmail.fr", owner_id=self.alice.user.id)
        assert stored is not None
        self.assertEqual((stored.redirect_host, stored.send_resume), ("aspmx.l.google.com", True))

    async def test_put_changes_only_the_fields_given(self) -> None:
        await self.alice.call("POST", "/api/v1/domain/protecmail.fr", SEED_DOMAIN)
        await self.alice.call("PUT", "/api/v1/domain/protecmail.fr",
                              {"domain": "protecmail.fr", "redirectTo": "in.mail.protecmail.com",
                               "spamAction": 1})
        got = await self.alice.call("GET", "/api/v1/domain/protecmail.fr")
        self.assertEqual(got["data"], {**SEED_DOMAIN, "redirectTo": "in.mail.protecmail.com",
                                       "spamAction": 1})
        await self.alice.call("PUT", "/api/v1/domain/protecmail.fr", {"sendResume": False})
        got = await self.alice.call("GET", "/api/v1/domain/protecmail.fr")
        self.assertEqual((got["data"]["sendResume"], got["data"]["spamAction"]), (False, 1))
        stored = await self.web.core.domains.get("protecmail.fr")
        assert stored is not None
        self.assertEqual((stored.redirect_host, stored.redirect_port, stored.spam_action),
                         ("in.mail.protecmail.com", 25, 1))

    async def test_redirect_spellings_are_parsed_and_shown_back(self) -> None:
        await self.alice.call("POST", "/api/v1/domain/protecmail.fr", SEED_DOMAIN)
        for given, host, port, shown in [
            ("mx.example.test:2525", "mx.example.test", 2525, "mx.example.test:2525"),
            ("192.0.2.7", "192.0.2.7", 25, "192.0.2.7"),
            ("[192.0.2.7]:587", "192.0.2.7", 587, "192.0.2.7:587"),
            ("[2001:db8::1]:2525", "2001:db8::1", 2525, "[2001:db8::1]:2525"),
            ("[IPv6:2001:DB8::2]", "2001:db8::2", 25, "[2001:db8::2]"),
            ("MX.Example.TEST.", "mx.example.test", 25, "mx.example.test"),
            ("127.0.0.1:2526", "127.0.0.1", 2526, "127.0.0.1:2526"),
        ]:
            await self.alice.call("PUT", "/api/v1/domain/protecmail.fr", {"redirectTo": given})
            stored = await self.web.core.domains.get("protecmail.fr")
            assert stored is not None
            self.assertEqual((stored.redirect_host, stored.redirect_port), (host, port), given)
            got = await self.alice.call("GET", "/api/v1/domain/protecmail.fr")
            self.assertEqual(got["data"]["redirectTo"], shown)

    async def test_an_ipv6_zone_index_in_redirect_to_is_a_400(self) -> None:
        # A global address with a zone index passed every check: the text after "%" (CR LF,
        # any length) was stored as the next hop, and one over 255 characters was a 500 on
        # PostgreSQL (varchar(255)).
        await self.alice.call("POST", "/api/v1/domain/protecmail.fr", SEED_DOMAIN)
        for given in ("[2a00:1450:4001:81c::200e%\r\nRCPT TO:<x@y.test>]",
                      "2a00:1450:4001:81c::200e%eth0",
                      "[2a00:1450:4001:81c::200e%" + "x" * 300 + "]:2525"):
            reply = await self.alice.call("PUT", "/api/v1/domain/protecmail.fr",
                                          {"redirectTo": given}, status=400)
            self.assertEqual(list(reply["data"]), ["redirectTo"])
            self.assertIn("zone index", reply["msg"])
        await self.alice.call("POST", "/api/v1/domain/example.tld",
                              {"redirectTo": "[2a00:1450:4001:81c::200e%eth0]"}, status=400)
        got = await self.alice.call("GET", "/api/v1/domain/protecmail.fr")
        self.assertEqual(got["data"]["redirectTo"], SEED_DOMAIN["redirectTo"])

    async def test_a_hosted_domain_object_can_be_put_back_as_read(self) -> None:
        # Domain info shows "hosted": true and redirectTo "" for a domain the operator
        # hosts; a client PUTting that object back with one change got 400 "unknown field:
        # hosted", and without hosted 400 "redirectTo is empty".
        await self.web.core.domains.add("hosted.test", self.alice.user.id, "", hosted=True)
        got = await self.alice.call("GET", "/api/v1/domain/hosted.test")
        self.assertEqual((got["data"]["hosted"], got["data"]["redirectTo"]), (True, ""))
        await self.alice.call("PUT", "/api/v1/domain/hosted.test",
                              {**got["data"], "spamAction": 1})
        again = await self.alice.call("GET", "/api/v1/domain/hosted.test")
        self.assertEqual(again["data"], {**got["data"], "spamAction": 1})
        for body in ({"hosted": False}, {"hosted": 1}, {"hosted": None}):
            reply = await self.alice.call("PUT", "/api/v1/domain/hosted.test", body, status=400)
            self.assertEqual(list(reply["data"]), ["hosted"])
        await self.alice.call("POST", "/api/v1/domain/protecmail.fr", SEED_DOMAIN)
        await self.alice.call("PUT", "/api/v1/domain/protecmail.fr", {"hosted": False})
        await self.alice.call("PUT", "/api/v1/domain/protecmail.fr", {"hosted": True},
                              status=400)
        await self.alice.call("PUT", "/api/v1/domain/protecmail.fr", {"redirectTo": ""},
                              status=400)
        await self.alice.call("POST", "/api/v1/domain/example.tld",
                              {"redirectTo": "", "hosted": True}, status=400)
        stored = await self.web.core.domains.get("hosted.test")
        assert stored is not None
        self.assertTrue(stored.hosted)

    async def test_bad_input_is_a_400_naming_the_field(self) -> None:
        await self.alice.call("POST", "/api/v1/domain/protecmail.fr", SEED_DOMAIN)
        for body, words in [
            ({"spamAction": 2}, "spamAction"),
            ({"spamAction": True}, "spamAction"),
            ({"virusAction": "1"}, "virusAction"),
            ({"virusAction": 1.0}, "virusAction"),
            ({"sendResume": 1}, "sendResume"),
            ({"sendResume": "true"}, "sendResume"),
            ({"redirectTo": ""}, "redirectTo"),
            ({"redirectTo": None}, "redirectTo"),
            ({"redirectTo": 25}, "redirectTo"),
            ({"redirectTo": "mx example"}, "redirectTo"),
            ({"redirectTo": "mx.example.test:99999"}, "redirectTo"),
            ({"redirectTo": "[mx.example.test]:25"}, "redirectTo"),
            ({"domain": "other.fr"}, "domain"),
            ({"colour": "red"}, "unknown field: colour"),
        ]:
            reply = await self.alice.call("PUT", "/api/v1/domain/protecmail.fr", body,
                                          status=400)
            self.assertIn(words, reply["msg"], body)
        reply = await self.alice.call("POST", "/api/v1/domain/protecmail.com",
                                      {"spamAction": 3, "sendResume": "no"}, status=400)
        self.assertEqual(set(reply["data"]), {"spamAction", "sendResume", "redirectTo"})
        await self.alice.call("POST", "/api/v1/domain/localhost", {"redirectTo": "mx.test"},
                              status=400)
        await self.alice.call("POST", "/api/v1/domain/x.fr", [SEED_DOMAIN], status=400)
        got = await self.alice.call("GET", "/api/v1/domain/protecmail.fr")
        self.assertEqual(got["data"], SEED_DOMAIN)

    async def test_a_domain_served_for_someone_else_is_409_on_post_and_404_elsewhere(
        self,
    ) -> None:
        await self.bob.call("POST", "/api/v1/domain/bob.example", {"redirectTo": "mx.bob.test"})
        await self.bob.call("PUT", "/api/v1/domain/bob.example/addresses/postmaster")
        reply = await self.alice.call("POST", "/api/v1/domain/bob.example",
                                      {"redirectTo": "mx.alice.test"}, status=409)
        self.assertIn("already served", reply["msg"])
        await self.alice.call("POST", "/api/v1/domais/BOB.example",
                              {"redirectTo": "mx.alice.test"}, status=409)
        for method, path, body in [
            ("GET", "/api/v1/domain/bob.example", None),
            ("PUT", "/api/v1/domain/bob.example", {"spamAction": 1}),
            ("DELETE", "/api/v1/domain/bob.example", None),
            ("DELETE", "/api/v1/domains/bob.example", None),
            ("GET", "/api/v1/domain/bob.example/addresses", None),
            ("PUT", "/api/v1/domain/bob.example/addresses/alice", None),
            ("DELETE", "/api/v1/domain/bob.example/addresses/postmaster", None),
            ("DELETE", "/api/v1/domain/bob.example/postmaster", None),
        ]:
            reply = await self.alice.call(method, path, body, status=404)
            self.assertEqual(reply["msg"], "No such domain: bob.example.", (method, path))
        self.assertEqual((await self.alice.call("GET", "/api/v1/domain/all"))["data"], [])
        got = await self.bob.call("GET", "/api/v1/domain/bob.example")
        self.assertEqual((got["data"]["redirectTo"], got["data"]["spamAction"]),
                         ("mx.bob.test", 0))
        addresses = await self.bob.call("GET", "/api/v1/domain/bob.example/addresses")
        self.assertEqual(addresses["data"], ["postmaster"])
        await self.bob.call("POST", "/api/v1/domain/bob.example", {"redirectTo": "mx.bob.test"},
                            status=409)

    async def test_every_route_wants_a_key_and_answers_401_envelopes(self) -> None:
        for method, path in [
            ("GET", "/api/v1/domain/all"), ("GET", "/api/v1/domain/x.fr"),
            ("POST", "/api/v1/domain/x.fr"), ("POST", "/api/v1/domais/x.fr"),
            ("PUT", "/api/v1/domain/x.fr"), ("DELETE", "/api/v1/domain/x.fr"),
            ("DELETE", "/api/v1/domains/x.fr"), ("GET", "/api/v1/domain/x.fr/addresses"),
            ("PUT", "/api/v1/domain/x.fr/addresses/a"),
            ("DELETE", "/api/v1/domain/x.fr/addresses/a"), ("DELETE", "/api/v1/domain/x.fr/a"),
            ("GET", "/api/v1/tanks"), ("GET", "/api/v1/tolens"),
            ("GET", "/api/v1/token/daily-average"), ("GET", "/api/v1/invoices"),
            ("GET", "/api/v1/invoices/1"),
        ]:
            status, _, body = await self.web.call(method, path, headers={"Api-Key": "nope"})
            self.assertEqual((status, body["success"]), (401, False), (method, path))
            self.assertEqual(set(body), {"request_id", "success", "msg"})

    async def test_wrong_methods_are_405_envelopes(self) -> None:
        for method, path in [("GET", "/api/v1/domains/x.fr"), ("POST", "/api/v1/domain/all"),
                             ("PUT", "/api/v1/tanks")]:
            status, headers, body = await self.web.call(
                method, path, headers={"Api-Key": self.alice.key}
            )
            if status == 400:  # POST domain/all is the POST of a domain called "all"
                self.assertEqual(path, "/api/v1/domain/all")
                continue
            self.assertEqual((status, body["success"]), (405, False), (method, path))
            self.assertIn("allow", headers)


class PlanTests(DomainTestCase):
    async def test_send_resume_is_refused_on_the_free_plan(self) -> None:
        carol = await self.client("carol", "free")
        reply = await carol.call("POST", "/api/v1/domain/protecmail.fr", SEED_DOMAIN,
                                 status=403)
        self.assertIn("sendResume", reply["msg"])
        self.assertIn("Free plan", reply["msg"])
        self.assertEqual(reply["data"], {"plan": "free"})
        self.assertEqual((await carol.call("GET", "/api/v1/domain/all"))["data"], [])
        await carol.call("POST", "/api/v1/domain/protecmail.fr",
                         {**SEED_DOMAIN, "sendResume": False})
        await carol.call("PUT", "/api/v1/domain/protecmail.fr", {"sendResume": True},
                         status=403)

    async def test_templates_link_hostname_and_reply_to_are_agency_only(self) -> None:
        await self.alice.call("POST", "/api/v1/domain/alice.example", SEED_DOMAIN | {
            "domain": "alice.example"})
        for name, value in AGENCY.items():
            reply = await self.alice.call("PUT", "/api/v1/domain/alice.example",
                                          {name: value}, status=403)
            self.assertIn(name, reply["msg"])
            self.assertIn("only on the Agency plan", reply["msg"])
            self.assertIn("Standard plan", reply["msg"])
        await self.alice.call("PUT", "/api/v1/domain/alice.example",
                              {name: None for name in AGENCY})
        await self.bob.call("POST", "/api/v1/domain/bob.example",
                            {"redirectTo": "mx.bob.test", "sendResume": True, **AGENCY})
        got = await self.bob.call("GET", "/api/v1/domain/bob.example")
        self.assertEqual(got["data"], {
            "domain": "bob.example", "redirectTo": "mx.bob.test", "spamAction": 0,
            "virusAction": 0, "sendResume": True, **AGENCY,
        })
        await self.bob.call("PUT", "/api/v1/domain/bob.example",
                            {"resumeReplyTo": "", "resumeTemplateBody": None})
        got = await self.bob.call("GET", "/api/v1/domain/bob.example")
        self.assertNotIn("resumeReplyTo", got["data"])
        self.assertNotIn("resumeTemplateBody", got["data"])
        self.assertEqual(got["data"]["resumeLinkHostname"], "quarantine.example.test")

    async def test_agency_values_are_validated(self) -> None:
        await self.bob.call("POST", "/api/v1/domain/bob.example", {"redirectTo": "mx.bob.test"})
        for body, words in [
            ({"resumeReplyTo": "not an address"}, "resumeReplyTo"),
            ({"resumeLinkHostname": "bad host"}, "resumeLinkHostname"),
            ({"resumeTemplateSubject": 5}, "resumeTemplateSubject"),
        ]:
            reply = await self.bob.call("PUT", "/api/v1/domain/bob.example", body, status=400)
            self.assertIn(words, reply["msg"])

    async def test_after_a_downgrade_the_stored_object_can_still_be_sent_back(self) -> None:
        await self.bob.call("POST", "/api/v1/domain/bob.example",
                            {"redirectTo": "mx.bob.test", "sendResume": True, **AGENCY})
        await self.web.core.identity.set_plan(self.bob.user.id, "free")
        current = (await self.bob.call("GET", "/api/v1/domain/bob.example"))["data"]
        await self.bob.call("PUT", "/api/v1/domain/bob.example", {**current, "spamAction": 1})
        reply = await self.bob.call("PUT", "/api/v1/domain/bob.example",
                                    {**current, "resumeReplyTo": "other@example.test"},
                                    status=403)
        self.assertIn("Free plan", reply["msg"])
        got = await self.bob.call("GET", "/api/v1/domain/bob.example")
        self.assertEqual(got["data"], {**current, "spamAction": 1})


class ForbiddenRedirectTests(DomainTestCase):
    """The deprecated `[protecmail] forbidden_redirects` still refuses its networks, even
    those `[queue]` allows."""

    config = Config(sections={
        "protecmail": {"forbidden_redirects": [
            "127.0.0.0/8", "::1/128", "10.0.0.0/8", "169.254.0.0/16"]},
        "queue": {"allow_private": True, "allow_loopback": True},
    })

    async def test_a_forbidden_next_hop_is_refused(self) -> None:
        for target in ("127.0.0.1", "127.1.2.3:2525", "[::1]:25", "[::ffff:127.0.0.1]",
                       "10.1.2.3", "localhost", "mail.localhost:25", "169.254.169.254"):
            reply = await self.alice.call("POST", "/api/v1/domain/alice.example",
                                          {"redirectTo": target}, status=400)
            self.assertIn("does not relay to", reply["msg"], target)
        await self.alice.call("POST", "/api/v1/domain/alice.example",
                              {"redirectTo": "192.0.2.1"})
        await self.alice.call("PUT", "/api/v1/domain/alice.example",
                              {"redirectTo": "[127.0.0.1]:25"}, status=400)
        got = await self.alice.call("GET", "/api/v1/domain/alice.example")
        self.assertEqual(got["data"]["redirectTo"], "192.0.2.1")


    async def test_a_next_hop_refused_since_may_be_put_back_unchanged(self) -> None:
        # Set before the operator's policy came to refuse it: a client PUTting back the
        # object it read (another field changed) is not refused for it; a change is.
        await self.alice.call("POST", "/api/v1/domain/alice.example",
                              {"redirectTo": "192.0.2.1"})
        service = self.web.core.domains
        policy, service.redirects = service.redirects, None
        await service.update("alice.example", {"redirect_to": "10.1.2.3:2525"})
        service.redirects = policy
        data = (await self.alice.call("GET", "/api/v1/domain/alice.example"))["data"]
        self.assertEqual(data["redirectTo"], "10.1.2.3:2525")
        data["sendResume"] = not data["sendResume"]
        await self.alice.call("PUT", "/api/v1/domain/alice.example", data)
        got = (await self.alice.call("GET", "/api/v1/domain/alice.example"))["data"]
        self.assertEqual(got, data)
        for target in ("10.1.2.3", "10.1.2.3:2526", "127.0.0.1:2525"):
            await self.alice.call("PUT", "/api/v1/domain/alice.example",
                                  {"redirectTo": target}, status=400)
        got = (await self.alice.call("GET", "/api/v1/domain/alice.example"))["data"]
        self.assertEqual(got["redirectTo"], "10.1.2.3:2525")


class DefaultRedirectPolicyTests(DomainTestCase):
    config = Config()

    async def test_only_public_addresses_are_allowed_by_default(self) -> None:
        for target in ("0.0.0.0", "169.254.169.254", "[fe80::1]", "224.0.0.1", "[::]",  # noqa: S104
                       "127.0.0.1:2526", "localhost", "10.1.2.3", "192.168.1.1", "[fd00::1]"):
            await self.alice.call("POST", "/api/v1/domain/alice.example",
                                  {"redirectTo": target}, status=400)
        await self.alice.call("POST", "/api/v1/domain/alice.example",
                              {"redirectTo": "93.184.216.34:2525"})


class AddressTests(DomainTestCase):
    async def setUp(self) -> None:  # type: ignore[override]
        await super().setUp()
        await self.alice.call("POST", "/api/v1/domain/example.tld", {"redirectTo": "mx.test"})

    async def addresses(self) -> list[str]:
        reply = await self.alice.call("GET", "/api/v1/domain/example.tld/addresses")
        data: list[str] = reply["data"]
        return data

    async def test_add_list_and_remove_addresses(self) -> None:
        self.assertEqual(await self.addresses(), [])
        for local in ("postmaster", "John", "jane@EXAMPLE.tld"):
            reply = await self.alice.call("PUT", f"/api/v1/domain/example.tld/addresses/{local}")
            self.assertEqual(set(reply), {"request_id", "success"})
        self.assertEqual(await self.addresses(), ["jane", "john", "postmaster"])
        domains = self.web.core.domains
        await domains.refresh()  # what the SMTP server answers RCPTs from
        self.assertEqual([domains.accepts(x, "example.tld") for x in ("JOHN", "joe")],
                         [True, False])
        again = await self.alice.call("PUT", "/api/v1/domain/example.tld/addresses/john")
        self.assertEqual(again["msg"], "john@example.tld was already listed.")
        await self.alice.call("DELETE", "/api/v1/domain/example.tld/addresses/jane")
        await self.alice.call("DELETE", "/api/v1/domain/example.tld/John")
        self.assertEqual(await self.addresses(), ["postmaster"])
        reply = await self.alice.call("DELETE", "/api/v1/domain/example.tld/addresses/jane",
                                      status=404)
        self.assertIn("not in the address list", reply["msg"])

    async def test_bad_addresses_are_400(self) -> None:
        for local in ("a..b", "x@other.tld", "%20", "a" * 65):
            await self.alice.call("PUT", f"/api/v1/domain/example.tld/addresses/{local}",
                                  status=400)
        self.assertEqual(await self.addresses(), [])

    async def test_unknown_domains_are_404(self) -> None:
        await self.alice.call("GET", "/api/v1/domain/nowhere.tld/addresses", status=404)
        await self.alice.call("PUT", "/api/v1/domain/nowhere.tld/addresses/a", status=404)
        await self.alice.call("PUT", "/api/v1/domain/not_a_name/addresses/a", status=404)


class CapTests(DomainTestCase):
    """[domains] max_per_user and max_addresses: at the cap one more is a 409 envelope and
    nothing is stored; under it, and for other users or domains, adding works."""

    config = Config(sections={"queue": {"allow_private": True},
                              "domains": {"max_per_user": 2, "max_addresses": 3}})

    async def test_a_user_has_at_most_max_per_user_domains(self) -> None:
        for name in ("one.test", "two.test"):
            await self.alice.call("POST", f"/api/v1/domain/{name}", {"redirectTo": "10.0.0.1"})
        reply = await self.alice.call("POST", "/api/v1/domain/three.test",
                                      {"redirectTo": "10.0.0.1"}, status=409)
        self.assertEqual(reply["msg"],
                         "A user may have at most 2 domains; delete one to add another.")
        self.assertIsNone(await self.web.core.domains.get("three.test"))
        self.assertEqual((await self.alice.call("GET", "/api/v1/domain/all"))["data"],
                         ["one.test", "two.test"])
        # Another user's count is its own; a deleted domain makes room.
        await self.bob.call("POST", "/api/v1/domain/three.test", {"redirectTo": "10.0.0.1"})
        await self.alice.call("DELETE", "/api/v1/domain/one.test")
        await self.alice.call("POST", "/api/v1/domain/four.test", {"redirectTo": "10.0.0.1"})

    async def test_a_domain_lists_at_most_max_addresses(self) -> None:
        for name in ("one.test", "two.test"):
            await self.alice.call("POST", f"/api/v1/domain/{name}", {"redirectTo": "10.0.0.1"})
        for local in ("a", "b", "c"):
            await self.alice.call("PUT", f"/api/v1/domain/one.test/addresses/{local}")
        reply = await self.alice.call("PUT", "/api/v1/domain/one.test/addresses/d",
                                      status=409)
        self.assertEqual(reply["msg"], "one.test may list at most 3 addresses; remove one to "
                                       "add another.")
        listed = await self.alice.call("GET", "/api/v1/domain/one.test/addresses")
        self.assertEqual(listed["data"], ["a", "b", "c"])
        # One already listed is still the 200 it was; another domain has its own list.
        await self.alice.call("PUT", "/api/v1/domain/one.test/addresses/a")
        await self.alice.call("PUT", "/api/v1/domain/two.test/addresses/d")
        await self.alice.call("DELETE", "/api/v1/domain/one.test/addresses/a")
        await self.alice.call("PUT", "/api/v1/domain/one.test/addresses/d")

    async def test_the_caps_default_to_1000_domains_and_10000_addresses(self) -> None:
        web = build_web()
        self.assertEqual((web.core.domains.max_per_user, web.core.domains.max_addresses),
                         (1000, 10_000))


class RemovedDomainTests(TestCase):
    async def test_mail_queued_for_a_removed_domain_never_reaches_the_next_one_added(
        self,
    ) -> None:
        # Alice's newest domain is removed while a message for it waits in the queue (its
        # server was down); Bob then adds a domain. On SQLite it got the removed domain's
        # id, and the queue, which routes by id, delivered Alice's mail to Bob's server.
        # It is bounced instead (its DSN goes to the sender through the relay host).
        gw = Gateway(Config(sections={"queue": {"relayhost": "relay.test:25"}}))
        self.addCleanup(stopper(gw))
        alice = Client(self, gw.web, await gw.owner("alice"), "")
        alice.key = await gw.web.credential(alice.user)
        bob = Client(self, gw.web, await gw.owner("bob"), "")
        bob.key = await gw.web.credential(bob.user)
        await gw.domain(alice.user, "kept.test")
        gone = await gw.domain(alice.user, "gone.test")
        queue = gw.core.queue.service
        stopping = queue.stopService()
        gw.clock.advance(60)
        await stopping
        await gw.send(message("board minutes", b"confidential"), "ceo@gone.test")
        await alice.call("DELETE", "/api/v1/domain/gone.test")
        await bob.call("POST", "/api/v1/domain/bob.test", {"redirectTo": "192.0.2.99"})
        added = await gw.core.domains.get("bob.test")
        assert added is not None
        self.assertNotEqual(added.id, gone.id)
        queue.startService()
        for _ in range(10):
            gw.clock.advance(60)
        self.assertEqual([rcpts for _f, rcpts, _b in gw.delivered()], [["spammer@x.test"]])
        self.assertEqual(gw.states()["ceo@gone.test"], "bounced")
        self.assertIn("no longer served", gw.last_errors()["ceo@gone.test"] or "")
