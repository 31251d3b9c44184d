"""Identity: users, passwords and credentials, on the synchronous test store and a Clock."""

from __future__ import annotations

import datetime
import hmac
from typing import Any
from unittest import mock

from argon2 import PasswordHasher
from sqlalchemy import Connection, insert, inspect, select, update
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailcore.identity import Identity, IdentityError, User, passwords
from mailcore.identity import secrets as creds
from mailcore.identity import service as identity_service
from mailcore.identity.service import EXPIRED_KEPT_SECONDS, RESOLVED_TTL, name_key, utc
from mailcore.store.schema import credentials, users
from mailcore.workers import CpuPool
from tests.support.db import (
    DatabaseMixin,
    engine_query_plans,
    full_scans,
    synchronous_database,
    transaction_answers,
)
from tests.support.passwords import production_hashing

START = 1_800_000_000.0  # 2027-01-15, an arbitrary fixed "now" for the Clock


class IdentityTestCase(TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START)
        self.db = synchronous_database()
        self.identity = Identity(self.db, self.clock, CpuPool.for_tests(), session_ttl=3600)

    async def user(
        self, name: str = "alice", password: str | None = "s3cret", **kwargs: Any  # noqa: S107
    ) -> User:
        return await self.identity.create_user(
            name, kwargs.pop("email", f"{name}@Example.TEST"), password, **kwargs
        )

    async def assertRefused(self, field: str | None, coro: Any) -> IdentityError:
        """The coroutine raises IdentityError naming `field`, with a one-line message."""
        with self.assertRaises(IdentityError) as caught:
            await coro
        self.assertEqual(caught.exception.field, field)
        self.assertNotIn("\n", caught.exception.message)
        self.assertTrue(caught.exception.message)
        return caught.exception

    async def deactivate(self, user_id: int) -> None:
        def txn(conn: Connection) -> None:
            conn.execute(update(users).where(users.c.id == user_id).values(is_active=False))

        await self.db.run("deactivate", txn)

    async def credential_row(self, credential_id: int) -> dict[str, Any]:
        def txn(conn: Connection) -> dict[str, Any]:
            row = conn.execute(
                select(credentials).where(credentials.c.id == credential_id)
            ).one()
            found = dict(row._mapping)
            for key in ("created_at", "expires_at", "last_used_at", "revoked_at"):
                found[key] = utc(found[key])
            return found

        return await self.db.read("credential_row", txn)


class UserTests(IdentityTestCase):
    async def test_create_user_with_profile(self) -> None:
        user = await self.user(
            "alice", first_name="Alice", city="Lyon", plan="agency", phone="+33 1 23"
        )
        self.assertEqual(user.username, "alice")
        self.assertEqual(user.email, "alice@example.test")  # domain lower-cased
        self.assertEqual(user.plan, "agency")
        self.assertTrue(user.is_active)
        self.assertTrue(user.nic.startswith("MC-"))
        self.assertEqual(user.created_at, datetime.datetime.fromtimestamp(START, datetime.UTC))
        profile = user.profile()
        self.assertEqual(
            set(profile),
            {"nic", "first_name", "last_name", "email", "organisation", "tva_intra", "address",
             "city", "zip", "country", "phone"},
        )
        self.assertEqual((profile["first_name"], profile["city"]), ("Alice", "Lyon"))
        self.assertEqual(profile["last_name"], "")
        self.assertEqual(await self.identity.get_user(user.id), user)

    async def test_email_local_part_keeps_its_case(self) -> None:
        user = await self.user("bob", email="  Bob.Smith@EXAMPLE.test ")
        self.assertEqual(user.email, "Bob.Smith@example.test")

    async def test_an_email_spelling_an_encoded_word_is_refused(self) -> None:
        # The operator's `mailcore user add`: mail naming the user (safedrop's notifications
        # and receipts) could not be written (CR LF) or would show the text it encodes.
        for email in ("=?utf-8?q?=0d=0aBcc:_evil=40x.test?=@example.test",
                      "=?utf-8?b?DQpCY2M6IGV2aWxAeC50ZXN0?=@example.test",
                      "=?utf-8?q?Your_account_is_closed?=@example.test"):
            await self.assertRefused("email", self.identity.create_user("eve", email))
        user = await self.user("bob", email="a=?b@example.test")  # no word: as before
        self.assertEqual(user.email, "a=?b@example.test")

    async def test_an_email_holding_a_bidi_control_is_refused(self) -> None:
        # Found attacking safedrop's pages: a user's own profile edit (Protecmail) made
        # "billing<U+202E>gro.knab@example.test", shown to a drop's recipients as the
        # sender's address, read "billing" and the rest reversed.
        bob = await self.user("bob", email="bob@example.test")
        for email in ("billing\u202egro.knab@example.test", "a\u200fb@example.test",
                      "ann@exa\u2067mple.test"):
            await self.assertRefused("email", self.identity.create_user("eve", email))
            await self.assertRefused("email", self.identity.update_profile(
                bob.id, {"email": email}))
        unchanged = await self.identity.get_user(bob.id)
        assert unchanged is not None
        self.assertEqual(unchanged.email, "bob@example.test")

    async def test_user_without_password(self) -> None:
        user = await self.user("nopw", password=None)
        self.assertIsNone(await self.identity.authenticate_password(user.username, ""))
        self.assertIsNone(await self.identity.authenticate_password(user.username, "x"))

    async def test_validation_errors(self) -> None:
        await self.assertRefused("username", self.identity.create_user("a b", "a@x.test"))
        await self.assertRefused("username", self.identity.create_user("", "a@x.test"))
        await self.assertRefused("username", self.identity.create_user("x" * 151, "a@x.test"))
        await self.assertRefused("email", self.identity.create_user("a", "not-an-email"))
        await self.assertRefused("email", self.identity.create_user("a", "a@b@c"))
        await self.assertRefused("email", self.identity.create_user("a", "a" * 65 + "@x.test"))
        too_long = "a" * 64 + "@" + "d" * 200 + ".test"  # fits the pattern, not the column
        await self.assertRefused("email", self.identity.create_user("a", too_long))
        await self.assertRefused("plan", self.identity.create_user("a", "a@x.test", plan="gold"))
        await self.assertRefused("password", self.identity.create_user("a", "a@x.test", ""))
        await self.assertRefused(
            "password", self.identity.create_user("a", "a@x.test", "p" * 1025)
        )
        await self.assertRefused(
            "shoe_size", self.identity.create_user("a", "a@x.test", shoe_size="44")
        )
        await self.assertRefused("zip", self.identity.create_user("a", "a@x.test", zip="9" * 40))
        self.assertEqual(await self.identity.list_users(), [])

    async def test_duplicate_username_and_email(self) -> None:
        await self.user("alice")
        await self.assertRefused("username", self.user("ALICE", email="other@example.test"))
        await self.assertRefused("email", self.user("alice2", email="alice@EXAMPLE.test"))
        self.assertEqual(len(await self.identity.list_users()), 1)

    async def test_the_store_refuses_a_name_in_another_case_the_check_missed(self) -> None:
        """On PostgreSQL two creations can both pass the check in the code before either
        commits (READ COMMITTED); the store's lower() indexes (0040) refuse the second."""
        alice = await self.user("alice", email="alice@example.test")
        bob = await self.user("bob", email="bob@example.test")
        with mock.patch("mailcore.identity.service._thd_name_taken", return_value=False):
            await self.assertRefused(None, self.identity.create_user(
                "ALICE", "other@example.test", "pw"))
            await self.assertRefused(None, self.identity.create_user(
                "carol", "Alice@example.test", "pw"))
            await self.assertRefused("email", self.identity.update_profile(
                bob.id, {"email": "ALICE@example.test"}))
        self.assertEqual(await self.identity.list_users(), [alice, bob])

    async def test_find_user_by_name_or_email(self) -> None:
        alice = await self.user("alice")
        self.assertEqual(await self.identity.find_user("ALICE"), alice)
        self.assertEqual(await self.identity.find_user("alice@example.test"), alice)
        self.assertIsNone(await self.identity.find_user("nobody"))

    async def test_a_non_ascii_address_is_one_user_in_every_case_and_form(self) -> None:
        """SQLite's lower() folds ASCII only: "Éloise@…" was stored as typed, so neither
        "Éloise@…" nor "ÉLOISE@…" found it, and "éloise@…" could be a second user (even
        set through PUT /api/v1/user) that those spellings then found instead."""
        eloise = await self.user("eloise", email="Éloise@X.test")
        self.assertEqual(eloise.email, "éloise@x.test")
        for typed in ("Éloise@x.test", "ÉLOISE@X.TEST", "e\u0301loise@x.test"):
            self.assertEqual(await self.identity.find_user(typed), eloise, typed)
            self.assertEqual(
                await self.identity.authenticate_password(typed, "s3cret"), eloise, typed)
        for typed in ("éloise@x.test", "E\u0301LOISE@x.test"):
            await self.assertRefused("email", self.user("mallory", email=typed))
        mallory = await self.user("mallory")
        await self.assertRefused(
            "email", self.identity.update_profile(mallory.id, {"email": "éloise@x.test"}))

    async def test_an_internationalised_domain_is_one_user_in_either_spelling(self) -> None:
        """An address is stored with its domain in A-labels, as domains are: one given with
        U-labels was stored so and not found by its xn-- spelling, nor the other way."""
        jo = await self.user("jo", email="jo@Bücher.example")
        self.assertEqual(jo.email, "jo@xn--bcher-kva.example")
        for typed in ("jo@bücher.example", "JO@BÜCHER.EXAMPLE", "jo@XN--BCHER-KVA.example"):
            self.assertEqual(await self.identity.find_user(typed), jo, typed)
            self.assertEqual(
                await self.identity.authenticate_password(typed, "s3cret"), jo, typed)
        await self.assertRefused("email", self.user("jo2", email="jo@xn--bcher-kva.example"))
        await self.assertRefused("email", self.user("jo3", email="jo@BÜCHER.example"))
        self.assertEqual(name_key(" Jo@Bücher.Example"), "jo@xn--bcher-kva.example")
        self.assertEqual(name_key("alice"), "alice")  # a name without "@" as before
        self.assertEqual(name_key("a@b_c.test"), "a@b_c.test")  # no host name: as typed

    async def test_an_address_stored_with_u_labels_before_is_found_both_ways(self) -> None:
        ann = await self.user("ann", email="ann@example.test")

        def legacy(conn: Connection) -> None:  # as normalise_email stored it until now
            conn.execute(update(users).where(users.c.id == ann.id).values(
                email="ann@bücher.example"))

        await self.db.run("legacy", legacy)
        for typed in ("ann@bücher.example", "ann@xn--bcher-kva.example", "ANN@BÜCHER.example"):
            found = await self.identity.authenticate_password(typed, "s3cret")
            self.assertEqual(found and found.id, ann.id, typed)
        await self.assertRefused("email", self.user("ann2", email="ann@xn--bcher-kva.example"))

    async def test_one_users_email_is_no_other_users_username(self) -> None:
        """A name finds a username first, else an email: a user named like another's
        address took that address's logins and CLI commands."""
        alice = await self.user("alice", email="alice@x.test")
        await self.assertRefused("username", self.user("Alice@X.test", email="m@x.test"))
        carol = await self.user("carol@y.test", email="carol@z.test")
        await self.assertRefused("email", self.user("dave", email="CAROL@y.test"))
        await self.assertRefused(
            "email", self.identity.update_profile(alice.id, {"email": "carol@y.test"}))
        # A user's own username may be its own address.
        await self.identity.update_profile(carol.id, {"email": "carol@y.test"})
        self.assertEqual(await self.identity.find_user("alice@x.test"), alice)

    async def test_list_users_in_creation_order(self) -> None:
        for name in ("carol", "alice", "bob"):
            await self.user(name, password=None)
        names = [u.username for u in await self.identity.list_users()]
        self.assertEqual(names, ["carol", "alice", "bob"])

    async def test_set_plan(self) -> None:
        alice = await self.user()
        await self.identity.set_plan(alice.id, "standard")
        user = await self.identity.get_user(alice.id)
        assert user is not None
        self.assertEqual(user.plan, "standard")
        await self.assertRefused("plan", self.identity.set_plan(alice.id, "platinum"))

    async def test_update_profile(self) -> None:
        alice = await self.user()
        await self.user("bob")
        user = await self.identity.update_profile(
            alice.id, {"city": "Paris", "nic": "ignored", "email": "new@Example.test"}
        )
        self.assertEqual(
            (user.city, user.email, user.nic), ("Paris", "new@example.test", alice.nic)
        )
        update = self.identity.update_profile
        await self.assertRefused("email", update(alice.id, {"email": "bob@example.test"}))
        await self.assertRefused("plan", update(alice.id, {"plan": "agency"}))
        await self.assertRefused("city", update(alice.id, {"city": 3}))
        await self.assertRefused("zip", update(alice.id, {"zip": "1" * 33}))
        await self.assertRefused("city", update(alice.id, {"city": "c" * 300}))
        unchanged = await self.identity.get_user(alice.id)
        assert unchanged is not None
        self.assertEqual((unchanged.city, unchanged.zip), ("Paris", ""))


    async def test_a_stored_email_refused_since_is_taken_back_unchanged(self) -> None:
        """An email stored before its spelling was refused (a local part spelling an RFC
        2047 word) does not make a profile edit that echoes it back a 400: a client PUTs
        the whole profile, and the user could change no other field. A new such email is
        still refused, and so is that spelling for another user."""
        alice = await self.user()
        bob = await self.user("bob")
        stored = "=?utf-8?b?DQpCY2M6IGV2aWxAeC50ZXN0?=@example.test"

        def txn(conn: Connection) -> None:
            conn.execute(update(users).where(users.c.id == alice.id).values(email=stored))

        await self.db.run("store_old_spelling", txn)
        user = await self.identity.update_profile(alice.id, {"email": stored, "city": "Oslo"})
        self.assertEqual((user.email, user.city), (stored, "Oslo"))
        update_profile = self.identity.update_profile
        await self.assertRefused("email", update_profile(
            alice.id, {"email": "=?utf-8?q?other?=@example.test"}))
        await self.assertRefused("email", update_profile(bob.id, {"email": stored}))
        unchanged = await self.identity.get_user(bob.id)
        assert unchanged is not None
        self.assertEqual(unchanged.email, "bob@example.test")


class PasswordTests(IdentityTestCase):
    """With the production Argon2 parameters (the other tests hash with cheap ones)."""

    def setUp(self) -> None:
        super().setUp()
        production_hashing(self)

    async def test_password_is_hashed_with_argon2id(self) -> None:
        alice = await self.user(password="correct horse")

        def stored(conn: Connection) -> str:
            return str(
                conn.execute(select(users.c.password_hash).where(users.c.id == alice.id))
                .scalar_one()
            )

        hashed = await self.db.read("hash", stored)
        self.assertTrue(hashed.startswith("$argon2id$"), hashed)
        self.assertNotIn("correct horse", hashed)
        self.assertFalse(passwords.needs_rehash(hashed))

    async def test_right_password(self) -> None:
        alice = await self.user(password="s3cret")
        self.assertEqual(await self.identity.authenticate_password("alice", "s3cret"), alice)
        self.assertEqual(
            await self.identity.authenticate_password("ALICE@example.test", "s3cret"), alice
        )

    async def test_wrong_password(self) -> None:
        await self.user(password="s3cret")
        self.assertIsNone(await self.identity.authenticate_password("alice", "S3cret"))
        self.assertIsNone(await self.identity.authenticate_password("alice", ""))
        self.assertIsNone(await self.identity.authenticate_password("alice", "s" * 5000))

    async def test_unknown_user_costs_a_hash_too(self) -> None:
        """An unknown name is verified against a dummy hash: same work, no enumeration."""
        hasher = mock.Mock(wraps=passwords._hasher)
        with mock.patch.object(passwords, "_hasher", hasher):
            self.assertIsNone(await self.identity.authenticate_password("ghost", "s3cret"))
        hasher.verify.assert_called_once_with(passwords._dummy_hash(), "s3cret")

    async def test_inactive_user_cannot_log_in(self) -> None:
        alice = await self.user(password="s3cret")
        await self.deactivate(alice.id)
        self.assertIsNone(await self.identity.authenticate_password("alice", "s3cret"))

    async def test_set_password(self) -> None:
        alice = await self.user(password="old")
        await self.identity.set_password(alice.id, "new")
        self.assertIsNone(await self.identity.authenticate_password("alice", "old"))
        self.assertEqual(await self.identity.authenticate_password("alice", "new"), alice)
        await self.assertRefused("password", self.identity.set_password(alice.id, ""))


    async def stored_hash(self, user_id: int) -> str:
        def txn(conn: Connection) -> str:
            return str(conn.execute(
                select(users.c.password_hash).where(users.c.id == user_id)).scalar_one())

        return await self.db.read("stored_hash", txn)

    async def set_stored_hash(self, user_id: int, hashed: str) -> None:
        def txn(conn: Connection) -> None:
            conn.execute(update(users).where(users.c.id == user_id).values(password_hash=hashed))

        await self.db.run("set_stored_hash", txn)

    async def test_a_hash_with_old_parameters_is_upgraded_at_login(self) -> None:
        """A hash made with other Argon2 parameters (say, before passwords.py raised them) is
        replaced by one with today's at the next right password; the login is as before and
        a credential made for it is not taken for one made across a password change."""
        alice = await self.user(password=None)
        old = _OLD_HASHER.hash("s3cret")
        await self.set_stored_hash(alice.id, old)
        self.assertTrue(passwords.needs_rehash(old))
        self.assertIsNone(await self.identity.authenticate_password("alice", "wrong"))
        self.assertEqual(await self.stored_hash(alice.id), old)  # only a right password
        found = await self.identity.authenticate_password("alice", "s3cret")
        self.assertEqual(found, alice)
        assert found is not None
        upgraded = await self.stored_hash(alice.id)
        self.assertNotEqual(upgraded, old)
        self.assertFalse(passwords.needs_rehash(upgraded))
        self.assertTrue(passwords.verify_password(upgraded, "s3cret"))
        await self.identity.create_credential(
            alice.id, "page", login=True, password_stamp=found.password_stamp)
        self.assertEqual(await self.identity.authenticate_password("alice", "s3cret"), alice)
        self.assertEqual(await self.stored_hash(alice.id), upgraded)  # once

    async def test_a_password_change_during_the_upgrade_wins(self) -> None:
        alice = await self.user(password=None)
        await self.set_stored_hash(alice.id, _OLD_HASHER.hash("s3cret"))
        gated = _GatedCpu()
        identity = Identity(self.db, self.clock, gated, session_ttl=3600)
        login = defer.ensureDeferred(identity.authenticate_password("alice", "s3cret"))
        self.assertEqual(len(gated.held), 1)  # the new hash is being made
        await self.identity.set_password(alice.id, "changed")
        changed = await self.stored_hash(alice.id)
        gated.release()
        found = self.successResultOf(login)
        self.assertEqual(found, alice)  # the password was right when checked
        self.assertEqual(await self.stored_hash(alice.id), changed)
        assert found is not None
        await self.assertRefused("password", self.identity.create_credential(
            alice.id, "page", login=True, password_stamp=found.password_stamp))


# Cheaper parameters than passwords.py's: a hash an older release could have stored.
_OLD_HASHER = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1)


class _GatedCpu(CpuPool):
    """A synchronous CpuPool that holds back each hash_password until `release`."""

    def __init__(self) -> None:
        super().__init__(None, synchronous=True)
        self.held: list[tuple[defer.Deferred[Any], Any, tuple[Any, ...]]] = []

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        if fn is not passwords.hash_password:
            return super().run(fn, *args, **kwargs)
        d: defer.Deferred[Any] = defer.Deferred()
        self.held.append((d, fn, args))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, fn, args in held:
            d.callback(fn(*args))


class CredentialTests(IdentityTestCase):
    async def test_create_list_and_resolve_api_key(self) -> None:
        alice = await self.user()
        secret, info = await self.identity.create_credential(alice.id, "apikey", label="ci")
        self.assertTrue(creds.well_formed(secret))
        self.assertGreaterEqual(len(secret) * 4, 128)  # hex: 4 bits a character
        self.assertEqual(info.prefix, secret[: creds.PREFIX_LEN])
        self.assertEqual((info.kind, info.label, info.scopes), ("apikey", "ci", ("*",)))
        self.assertIsNone(info.expires_at)
        self.assertFalse(info.revoked)
        self.assertEqual(await self.identity.list_credentials(alice.id), [info])
        self.assertEqual(await self.identity.list_credentials(alice.id, "token"), [])

        principal = await self.identity.resolve(secret, ("apikey",))
        assert principal is not None
        self.assertEqual(principal.user, alice)
        self.assertEqual((principal.credential_id, principal.kind), (info.id, "apikey"))
        self.assertTrue(principal.allows("anything"))

    async def test_secrets_are_random(self) -> None:
        alice = await self.user()
        made = {(await self.identity.create_credential(alice.id, "token"))[0] for _ in range(20)}
        self.assertEqual(len(made), 20)

    async def test_resolve_refuses_wrong_kind_and_garbage(self) -> None:
        alice = await self.user()
        secret, _ = await self.identity.create_credential(alice.id, "token")
        self.assertIsNone(await self.identity.resolve(secret, ("apikey", "session")))
        self.assertIsNotNone(await self.identity.resolve(secret, ("apikey", "token")))
        for garbage in ("", "x" * 40, secret.upper(), secret + "0", secret[:-1]):
            self.assertIsNone(await self.identity.resolve(garbage, ("token",)))

    async def test_unknown_kind_and_unknown_user(self) -> None:
        alice = await self.user()
        await self.assertRefused(None, self.identity.create_credential(alice.id, "password"))
        await self.assertRefused(None, self.identity.create_credential(9999, "apikey"))
        await self.assertRefused(
            "label", self.identity.create_credential(alice.id, "apikey", label="l" * 256)
        )

    async def test_scopes(self) -> None:
        alice = await self.user()
        secret, info = await self.identity.create_credential(
            alice.id, "token", scopes=("mail:read", "mail:send")
        )
        self.assertEqual(info.scopes, ("mail:read", "mail:send"))
        principal = await self.identity.resolve(secret, ("token",))
        assert principal is not None
        self.assertEqual(principal.scopes, ("mail:read", "mail:send"))
        self.assertTrue(principal.allows("mail:read"))
        self.assertFalse(principal.allows("admin"))

    async def test_revoke_by_prefix(self) -> None:
        alice = await self.user()
        bob = await self.user("bob")
        secret, info = await self.identity.create_credential(alice.id, "apikey")
        other, _ = await self.identity.create_credential(alice.id, "apikey")
        # Another user cannot revoke alice's key, even knowing its prefix.
        self.assertEqual(await self.identity.revoke_credential(bob.id, info.prefix), 0)
        self.assertEqual(await self.identity.revoke_credential(alice.id, info.prefix), 1)
        self.assertIsNone(await self.identity.resolve(secret, ("apikey",)))
        self.assertIsNotNone(await self.identity.resolve(other, ("apikey",)))
        listed = {c.prefix: c.revoked for c in await self.identity.list_credentials(alice.id)}
        self.assertEqual(listed, {info.prefix: True, other[: creds.PREFIX_LEN]: False})
        # Revoking again changes nothing.
        self.assertEqual(await self.identity.revoke_credential(alice.id, info.prefix), 0)

    async def test_revoke_needs_four_characters_and_escapes_wildcards(self) -> None:
        alice = await self.user()
        secret, _ = await self.identity.create_credential(alice.id, "apikey")
        await self.assertRefused("prefix", self.identity.revoke_credential(alice.id, secret[:3]))
        self.assertEqual(await self.identity.revoke_credential(alice.id, "%%%%"), 0)
        self.assertEqual(await self.identity.revoke_credential(alice.id, "____"), 0)
        self.assertEqual(await self.identity.revoke_credential(alice.id, secret[:5]), 1)

    async def test_revoke_by_kind(self) -> None:
        alice = await self.user()
        token, info = await self.identity.create_credential(alice.id, "token")
        self.assertEqual(await self.identity.revoke_credential(alice.id, info.prefix, "apikey"), 0)
        self.assertIsNotNone(await self.identity.resolve(token, ("token",)))

    async def test_inactive_user_credentials_do_not_resolve(self) -> None:
        alice = await self.user()
        secret, _ = await self.identity.create_credential(alice.id, "apikey")
        await self.deactivate(alice.id)
        self.assertIsNone(await self.identity.resolve(secret, ("apikey",)))

    async def test_session_expires_after_its_ttl(self) -> None:
        alice = await self.user()
        secret, info = await self.identity.create_credential(alice.id, "session")
        assert info.expires_at is not None
        self.assertEqual(info.expires_at - info.created_at, datetime.timedelta(seconds=3600))
        self.clock.advance(3599)
        self.assertIsNotNone(await self.identity.resolve(secret, ("session",)))
        self.clock.advance(1)
        self.assertIsNone(await self.identity.resolve(secret, ("session",)))

    async def test_a_page_login_is_not_a_safedrop_session_nor_the_reverse(self) -> None:
        alice = await self.user()
        page, info = await self.identity.create_credential(alice.id, "page", scopes=("pages",))
        session, _ = await self.identity.create_credential(alice.id, "session")
        assert info.expires_at is not None  # a page login expires like a session
        self.assertIsNone(await self.identity.resolve(page, ("session",)))
        self.assertIsNone(await self.identity.resolve(session, ("page",)))
        self.assertIsNotNone(await self.identity.resolve(page, ("page",)))

    async def test_expired_sessions_are_purged_by_the_sweeper(self) -> None:
        """A day after they expired, sessions are deleted; live ones and tokens without an
        expiry stay. The sweeper runs at start and then every interval on the clock."""
        from mailcore.identity.service import EXPIRED_KEPT_SECONDS, CredentialSweeper

        alice = await self.user()
        _, old = await self.identity.create_credential(alice.id, "session")
        _, token = await self.identity.create_credential(alice.id, "token")
        sweeper = CredentialSweeper(self.identity, self.clock, every=3600)
        sweeper.startService()
        self.addCleanup(sweeper.stopService)
        self.clock.advance(EXPIRED_KEPT_SECONDS)  # `old` expired a day minus an hour ago
        _, fresh = await self.identity.create_credential(alice.id, "session")
        ids = {c.id for c in await self.identity.list_credentials(alice.id)}
        self.assertEqual(ids, {old.id, token.id, fresh.id})
        self.clock.advance(7200)  # two sweeps later: `old` expired over a day ago
        ids = {c.id for c in await self.identity.list_credentials(alice.id)}
        self.assertEqual(ids, {token.id, fresh.id})
        sweeper.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    async def test_session_ttl_is_configurable(self) -> None:
        identity = Identity(self.db, self.clock, CpuPool.for_tests(), session_ttl=60)
        alice = await self.user()
        secret, _ = await identity.create_credential(alice.id, "session")
        self.clock.advance(59)
        self.assertIsNotNone(await identity.resolve(secret, ("session",)))
        self.clock.advance(1)
        self.assertIsNone(await identity.resolve(secret, ("session",)))

    async def test_explicit_ttl_and_non_expiring_tokens(self) -> None:
        alice = await self.user()
        short, _ = await self.identity.create_credential(alice.id, "apikey", ttl=10)
        forever, info = await self.identity.create_credential(alice.id, "token")
        self.assertIsNone(info.expires_at)
        self.clock.advance(10 * 365 * 86400)
        self.assertIsNone(await self.identity.resolve(short, ("apikey",)))
        self.assertIsNotNone(await self.identity.resolve(forever, ("token",)))

    async def test_login_tokens_never_expire_by_default(self) -> None:
        alice = await self.user()
        secret, info = await self.identity.create_credential(alice.id, "token", login=True)
        self.assertIsNone(info.expires_at)
        self.clock.advance(10 * 365 * 86400)
        self.assertIsNotNone(await self.identity.resolve(secret, ("token",)))

    async def test_login_tokens_live_login_ttl_after_the_login(self) -> None:
        identity = Identity(self.db, self.clock, CpuPool.for_tests(), login_ttl=86400)
        alice = await self.user()
        login, _ = await identity.create_credential(alice.id, "token", login=True)
        printed, _ = await identity.create_credential(alice.id, "token")
        self.clock.advance(86399)
        self.assertIsNotNone(await identity.resolve(login, ("token",)))
        self.clock.advance(1)
        self.assertIsNone(await identity.resolve(login, ("token",)))
        self.assertIsNotNone(await identity.resolve(printed, ("token",)))

    async def test_login_tokens_end_login_idle_after_their_last_use(self) -> None:
        identity = Identity(self.db, self.clock, CpuPool.for_tests(), login_idle=3600)
        alice = await self.user()
        used, _ = await identity.create_credential(alice.id, "token", login=True)
        unused, _ = await identity.create_credential(alice.id, "token", login=True)
        printed, _ = await identity.create_credential(alice.id, "token")
        for _ in range(10):  # used every 50 minutes: lives on
            self.clock.advance(3000)
            self.assertIsNotNone(await identity.resolve(used, ("token",)))
        self.assertIsNone(await identity.resolve(unused, ("token",)))
        self.assertIsNotNone(await identity.resolve(printed, ("token",)))
        # In use the whole time, with its last use written every five minutes at most.
        for _ in range(30):
            self.clock.advance(299)
            self.assertIsNotNone(await identity.resolve(used, ("token",)))
        self.clock.advance(3600)
        self.assertIsNone(await identity.resolve(used, ("token",)))
        # The sweeper removes the idle ones a day after they ended; the others stay.
        self.clock.advance(EXPIRED_KEPT_SECONDS + 1)
        self.assertEqual(await identity.purge_expired(), 2)
        self.assertEqual([c.label for c in await identity.list_credentials(alice.id)], [""])

    async def test_a_user_keeps_the_newest_login_tokens(self) -> None:
        identity = Identity(self.db, self.clock, CpuPool.for_tests(), logins_kept=3)
        alice = await self.user()
        bob = await self.user("bob")
        _, bobs = await identity.create_credential(bob.id, "token", login=True)
        printed, _ = await identity.create_credential(alice.id, "token")
        made = [await identity.create_credential(alice.id, "token", login=True)
                for _ in range(5)]
        left = [c.id for c in await identity.list_credentials(alice.id, "token")]
        self.assertEqual(len(left), 4)
        self.assertEqual(left[1:], [info.id for _, info in made[2:]])
        for secret, _ in made[:2]:
            self.assertIsNone(await identity.resolve(secret, ("token",)))
        for secret, _ in made[2:]:
            self.assertIsNotNone(await identity.resolve(secret, ("token",)))
        self.assertIsNotNone(await identity.resolve(printed, ("token",)))
        self.assertEqual([c.id for c in await identity.list_credentials(bob.id)], [bobs.id])

    async def test_a_login_past_the_kept_ones_ends_the_token_unused_the_longest(self) -> None:
        # The seed's login (DRF) gives one token that lives for ever, so a script may log
        # in for every run while a service holds the token it got at its start: the
        # logins removed the oldest token, the one in use too (401 "Invalid token.").
        identity = Identity(self.db, self.clock, CpuPool.for_tests(), logins_kept=3)
        alice = await self.user()
        held, held_info = await identity.create_credential(alice.id, "token", login=True)
        made = []
        for _ in range(6):
            self.clock.advance(400)  # past the 5 minutes between writes of the last use
            self.assertIsNotNone(await identity.resolve(held, ("token",)))
            made.append(await identity.create_credential(alice.id, "token", login=True))
        left = [c.id for c in await identity.list_credentials(alice.id, "token")]
        self.assertEqual(sorted(left), [held_info.id, made[-2][1].id, made[-1][1].id])
        self.assertIsNotNone(await identity.resolve(held, ("token",)))
        self.assertIsNone(await identity.resolve(made[0][0], ("token",)))
        # With one kept, the login's own token is the one kept.
        one = Identity(self.db, self.clock, CpuPool.for_tests(), logins_kept=1)
        newest, _ = await one.create_credential(alice.id, "token", login=True)
        self.assertIsNotNone(await one.resolve(newest, ("token",)))
        self.assertIsNone(await one.resolve(held, ("token",)))

    async def test_a_user_keeps_the_newest_safedrop_sessions(self) -> None:
        alice = await self.user()
        _, key = await self.identity.create_credential(alice.id, "apikey")
        page, _ = await self.identity.create_credential(alice.id, "page")
        with mock.patch("mailcore.identity.service.SESSIONS_KEPT", 3):
            made = [await self.identity.create_credential(alice.id, "session",
                                                          parent_id=key.id)
                    for _ in range(5)]
        left = [c.id for c in await self.identity.list_credentials(alice.id, "session")]
        self.assertEqual(left, [info.id for _, info in made[2:]])
        self.assertIsNone(await self.identity.resolve(made[0][0], ("session",)))
        self.assertIsNotNone(await self.identity.resolve(made[-1][0], ("session",)))
        self.assertIsNotNone(await self.identity.resolve(page, ("page",)))
        self.assertEqual(len(await self.identity.list_credentials(alice.id, "apikey")), 1)

    async def test_a_user_keeps_the_newest_page_sessions(self) -> None:
        # Each login on the OAuth pages makes a page session; they were kept until they
        # expired (and a day more), however many a script logging in made.
        alice = await self.user()
        session, _ = await self.identity.create_credential(alice.id, "session")
        with mock.patch("mailcore.identity.service.SESSIONS_KEPT", 3):
            made = [await self.identity.create_credential(alice.id, "page")
                    for _ in range(5)]
        left = [c.id for c in await self.identity.list_credentials(alice.id, "page")]
        self.assertEqual(left, [info.id for _, info in made[2:]])
        self.assertIsNone(await self.identity.resolve(made[0][0], ("page",)))
        self.assertIsNotNone(await self.identity.resolve(made[-1][0], ("page",)))
        self.assertIsNotNone(await self.identity.resolve(session, ("session",)))

    async def test_a_session_ends_when_its_parent_key_is_revoked(self) -> None:
        alice = await self.user()
        key, key_info = await self.identity.create_credential(alice.id, "apikey")
        other_key, _ = await self.identity.create_credential(alice.id, "apikey")
        session, _ = await self.identity.create_credential(
            alice.id, "session", parent_id=key_info.id
        )
        unrelated, _ = await self.identity.create_credential(alice.id, "session")
        self.assertIsNotNone(await self.identity.resolve(session, ("session",)))
        self.assertEqual(await self.identity.revoke_credential(alice.id, key_info.prefix), 1)
        self.assertIsNone(await self.identity.resolve(session, ("session",)))
        # Sessions of other keys, and sessions with no parent, live on.
        self.assertIsNotNone(await self.identity.resolve(other_key, ("apikey",)))
        self.assertIsNotNone(await self.identity.resolve(unrelated, ("session",)))
        self.assertIsNone(await self.identity.resolve(key, ("apikey",)))

    async def test_a_parent_must_be_a_credential_of_the_same_user(self) -> None:
        alice = await self.user()
        bob = await self.user("bob")
        _, bobs = await self.identity.create_credential(bob.id, "apikey")
        for parent in (bobs.id, bobs.id + 1000):
            await self.assertRefused(None, self.identity.create_credential(
                alice.id, "session", parent_id=parent
            ))
        self.assertEqual(await self.identity.list_credentials(alice.id), [])

    async def test_a_session_ends_when_its_parent_key_expires_or_is_deleted(self) -> None:
        alice = await self.user()
        _, short = await self.identity.create_credential(alice.id, "apikey", ttl=60)
        session, _ = await self.identity.create_credential(
            alice.id, "session", parent_id=short.id, ttl=3600
        )
        self.clock.advance(59)
        self.assertIsNotNone(await self.identity.resolve(session, ("session",)))
        self.clock.advance(1)
        self.assertIsNone(await self.identity.resolve(session, ("session",)))

        _, key = await self.identity.create_credential(alice.id, "apikey")
        _, child = await self.identity.create_credential(alice.id, "session", parent_id=key.id)

        def delete_key(conn: Connection) -> None:
            conn.execute(credentials.delete().where(credentials.c.id == key.id))

        await self.db.run("delete_key", delete_key)
        remaining = {c.id for c in await self.identity.list_credentials(alice.id)}
        self.assertNotIn(child.id, remaining)  # ON DELETE CASCADE

    async def test_last_used_at_is_throttled(self) -> None:
        """Resolving refreshes last_used_at at most every five minutes (reads stay reads)."""
        alice = await self.user()
        secret, info = await self.identity.create_credential(alice.id, "apikey")
        self.assertIsNone(info.last_used_at)
        first = self.identity.now()
        await self.identity.resolve(secret, ("apikey",))
        self.assertEqual((await self.credential_row(info.id))["last_used_at"], first)

        with mock.patch.object(self.db, "run", wraps=self.db.run) as run:
            self.clock.advance(300)
            await self.identity.resolve(secret, ("apikey",))
            run.assert_not_called()
        self.assertEqual((await self.credential_row(info.id))["last_used_at"], first)

        self.clock.advance(1)
        await self.identity.resolve(secret, ("apikey",))
        last = (await self.identity.list_credentials(alice.id))[0].last_used_at
        self.assertEqual(last, first + datetime.timedelta(seconds=301))

    async def test_prefix_lookup_compares_every_candidate_in_constant_time(self) -> None:
        """Rows sharing a prefix are all checked with hmac.compare_digest; only the match wins."""
        alice = await self.user()
        bob = await self.user("bob")
        secret, info = await self.identity.create_credential(alice.id, "apikey")
        # A forged row for bob with the same prefix and another digest.
        twin = secret[: creds.PREFIX_LEN] + "0" * (len(secret) - creds.PREFIX_LEN)
        if twin == secret:
            twin = secret[: creds.PREFIX_LEN] + "1" * (len(secret) - creds.PREFIX_LEN)

        def forge(conn: Connection) -> None:
            conn.execute(
                insert(credentials).values(
                    user_id=bob.id, kind="apikey", prefix=info.prefix,
                    digest=creds.digest(twin), created_at=self.identity.now(),
                )
            )

        await self.db.run("forge", forge)
        with mock.patch.object(
            creds.hmac, "compare_digest", wraps=hmac.compare_digest
        ) as compare:
            principal = await self.identity.resolve(secret, ("apikey",))
        assert principal is not None
        self.assertEqual(principal.user.id, alice.id)
        self.assertEqual(compare.call_count, 2)
        twin_principal = await self.identity.resolve(twin, ("apikey",))
        assert twin_principal is not None
        self.assertEqual(twin_principal.user.id, bob.id)
        # Same prefix, unknown rest: no match.
        wrong = secret[: creds.PREFIX_LEN] + "f" * (len(secret) - creds.PREFIX_LEN)
        if wrong not in (secret, twin):
            self.assertIsNone(await self.identity.resolve(wrong, ("apikey",)))

    async def test_no_secret_is_stored_in_clear(self) -> None:
        """Every column of every row, searched for each password and secret handed out."""
        alice = await self.user("alice", password="pa55-alice-XYZ")
        bob = await self.user("bob", password="pa55-bob-XYZ")
        handed_out = ["pa55-alice-XYZ", "pa55-bob-XYZ"]
        for user in (alice, bob):
            for kind in ("apikey", "token", "session"):
                secret, _ = await self.identity.create_credential(user.id, kind, label=kind)
                handed_out.append(secret)
                await self.identity.resolve(secret, (kind,))

        def every_value(conn: Connection) -> list[Any]:
            values: list[Any] = []
            for table in inspect(conn).get_table_names():
                for row in conn.exec_driver_sql(f'SELECT * FROM "{table}"'):
                    values.extend(row)
            return values

        values = await self.db.read("dump", every_value)
        self.assertGreater(len(values), 20)
        for value in values:
            if isinstance(value, str):
                text = value.lower()
            elif isinstance(value, bytes | bytearray | memoryview):
                raw = bytes(value)
                text = raw.decode("latin-1").lower() + raw.hex()
            else:
                continue
            for secret in handed_out:
                self.assertNotIn(secret.lower(), text)


class ResolvedSecretTests(IdentityTestCase):
    """A secret that resolved a moment ago resolves again from memory, for RESOLVED_TTL."""

    async def revoke_elsewhere(self, credential_id: int) -> None:
        """Revoke the way another node or the CLI would: in the store, not through us."""
        def txn(conn: Connection) -> None:
            conn.execute(update(credentials).where(credentials.c.id == credential_id)
                         .values(revoked_at=utc(datetime.datetime.now(datetime.UTC))))

        await self.db.run("revoke_elsewhere", txn)

    async def test_a_change_made_elsewhere_counts_within_the_ttl(self) -> None:
        alice = await self.user()
        token, info = await self.identity.create_credential(alice.id, "token")
        self.assertIsNotNone(await self.identity.resolve(token, ("token",)))
        await self.revoke_elsewhere(info.id)
        self.assertIsNotNone(await self.identity.resolve(token, ("token",)))
        self.clock.advance(RESOLVED_TTL)
        self.assertIsNone(await self.identity.resolve(token, ("token",)))

    async def test_a_deactivated_user_is_refused_within_the_ttl(self) -> None:
        alice = await self.user()
        token, _ = await self.identity.create_credential(alice.id, "token")
        self.assertIsNotNone(await self.identity.resolve(token, ("token",)))
        await self.deactivate(alice.id)
        self.clock.advance(RESOLVED_TTL)
        self.assertIsNone(await self.identity.resolve(token, ("token",)))

    async def test_our_own_changes_count_at_once(self) -> None:
        alice = await self.user()
        token, info = await self.identity.create_credential(alice.id, "token")
        principal = await self.identity.resolve(token, ("token",))
        assert principal is not None
        await self.identity.update_profile(alice.id, {"first_name": "Alice"})
        again = await self.identity.resolve(token, ("token",))
        assert again is not None
        self.assertEqual(again.user.profile()["first_name"], "Alice")
        await self.identity.revoke_credential(alice.id, info.prefix)
        self.assertIsNone(await self.identity.resolve(token, ("token",)))

    async def test_expiry_is_checked_at_every_use(self) -> None:
        alice = await self.user()
        key, key_info = await self.identity.create_credential(alice.id, "apikey", ttl=10)
        session, _ = await self.identity.create_credential(
            alice.id, "session", parent_id=key_info.id)
        self.clock.advance(9.5)
        self.assertIsNotNone(await self.identity.resolve(session, ("session",)))
        self.clock.advance(0.5)  # the parent expires inside the session's memory window
        self.assertIsNone(await self.identity.resolve(session, ("session",)))
        self.assertIsNone(await self.identity.resolve(key, ("apikey",)))

    async def test_the_kinds_asked_for_are_part_of_the_memory(self) -> None:
        alice = await self.user()
        token, _ = await self.identity.create_credential(alice.id, "token")
        self.assertIsNotNone(await self.identity.resolve(token, ("token",)))
        self.assertIsNone(await self.identity.resolve(token, ("session",)))
        self.assertIsNone(await self.identity.resolve(token + "x", ("token",)))


class PurgeMixin(DatabaseMixin):
    """The purge of expired credentials on a migrated store of each backend."""

    async def test_the_purge_deletes_a_batch_a_transaction_through_its_indexes(self) -> None:
        """The purge holds no long write transaction: PURGE_BATCH credentials at most each,
        the expired ones found through ix_credentials_expires_at and the idle login tokens
        through ix_credentials_login_idle (migration 0066; no batch reads the whole
        table)."""
        db = await self.open_database()
        clock = Clock()
        clock.advance(START)
        identity = Identity(db, clock, CpuPool.for_tests(), session_ttl=3600, login_idle=3600)
        alice = await identity.create_user("alice", "alice@example.test", None)
        for _ in range(3):
            await identity.create_credential(alice.id, "session")
            await identity.create_credential(alice.id, "token", login=True)
        _, printed = await identity.create_credential(alice.id, "token")
        clock.advance(3600 + EXPIRED_KEPT_SECONDS + 1)
        _, fresh = await identity.create_credential(alice.id, "session")
        _, used = await identity.create_credential(alice.id, "token", login=True)
        self.patch(identity_service, "PURGE_BATCH", 2)
        batches = transaction_answers(self, db, lambda name: name.startswith("purge_"))
        with engine_query_plans(db.engine) as plans:
            self.assertEqual(await identity.purge_expired(), 6)
        self.assertEqual(batches, [("purge_expired_credentials", 2),
                                   ("purge_expired_credentials", 1),
                                   ("purge_idle_logins", 2), ("purge_idle_logins", 1)])
        self.assertEqual({c.id for c in await identity.list_credentials(alice.id)},
                         {printed.id, fresh.id, used.id})
        self.assertEqual(full_scans(plans, "credentials"), [])
        for index in ("ix_credentials_expires_at", "ix_credentials_login_idle"):
            self.assertTrue([p for p in plans if index in p], plans)


class SQLitePurgeTests(PurgeMixin, TestCase):
    backend = "sqlite"


class PostgresPurgeTests(PurgeMixin, TestCase):
    backend = "postgresql"
