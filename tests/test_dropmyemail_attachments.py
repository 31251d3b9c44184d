"""Dropmyemail's attachments and contacts against a real Dovecot: a corpus with non-ASCII
file names (RFC 2231 and RFC 2047), nested multiparts, a forwarded message/rfc822 and a vCard
is backed up, then its attachments are listed, sorted, searched and read back (each file
described by libmagic), and its correspondents served as vCards that parse."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import vobject
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.trial.unittest import TestCase

from mailcore.fetch.tls import client_tls
from tests.support.dovecot import DovecotClassMixin
from tests.support.imap2api import LiveApi, live_api
from tests.support.oauth import access_token
from tests.test_dropmyemail_dovecot import ADDRESS_LOGINS, bearer


def png() -> bytes:
    """A valid 1x1 PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


PNG = png()
VCARD = (b"BEGIN:VCARD\r\nVERSION:3.0\r\nFN:Zo\xc3\xab Example\r\n"
         b"EMAIL:zoe@example.test\r\nTEL:+33 1 23 45 67 89\r\nEND:VCARD\r\n")


def b64(data: bytes) -> str:
    return base64.encodebytes(data).decode().replace("\n", "\r\n")


def corpus() -> list[bytes]:
    nested = (
        "From: Ana <ana@example.test>\r\nTo: me@example.test\r\nSubject: nested\r\n"
        "Date: Mon, 06 Nov 2023 10:00:00 +0000\r\nMessage-ID: <n1@example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=outer\r\n\r\n"
        "--outer\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
        "--inner\r\nContent-Type: text/plain\r\n\r\nsee the picture\r\n"
        "--inner\r\nContent-Type: text/html\r\n\r\n<p>see the picture</p>\r\n--inner--\r\n"
        "--outer\r\nContent-Type: image/png\r\nContent-Transfer-Encoding: base64\r\n"
        "Content-Disposition: attachment; filename=\"=?UTF-8?B?"
        + base64.b64encode("日本の写真.png".encode()).decode() + "?=\"\r\n\r\n"
        + b64(PNG) + "--outer--\r\n"
    ).encode()
    forwarded_inner = (
        "From: Bo <bo@example.test>\r\nTo: ana@example.test\r\nSubject: original\r\n"
        "Date: Sun, 05 Nov 2023 09:00:00 +0000\r\nMessage-ID: <o1@example.test>\r\n\r\n"
        "the original text\r\n"
    )
    forwarded = (
        "From: Ana <ana@example.test>\r\nTo: me@example.test\r\nSubject: Fwd: original\r\n"
        "Date: Tue, 07 Nov 2023 10:00:00 +0000\r\nMessage-ID: <f1@example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=fw\r\n\r\n"
        "--fw\r\nContent-Type: text/plain\r\n\r\nforwarding\r\n"
        "--fw\r\nContent-Type: message/rfc822\r\n"
        "Content-Disposition: attachment; filename=original.eml\r\n\r\n"
        + forwarded_inner + "--fw--\r\n"
    ).encode()
    card = (
        "From: Zoe <zoe@example.test>\r\nTo: me@example.test\r\nSubject: my card\r\n"
        "Date: Wed, 08 Nov 2023 10:00:00 +0000\r\nMessage-ID: <c1@example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=vc\r\n\r\n"
        "--vc\r\nContent-Type: text/plain\r\n\r\nhere\r\n"
        "--vc\r\nContent-Type: text/vcard; charset=utf-8\r\n"
        "Content-Disposition: attachment; filename*=utf-8''Zo%C3%AB.vcf\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n" + b64(VCARD) + "--vc--\r\n"
    ).encode()
    pdf = (
        "From: Bo <bo@example.test>\r\nTo: me@example.test\r\nSubject: invoice\r\n"
        "Date: Thu, 09 Nov 2023 10:00:00 +0000\r\nMessage-ID: <p1@example.test>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=pd\r\n\r\n"
        "--pd\r\nContent-Type: text/plain\r\n\r\ninvoice attached\r\n"
        "--pd\r\nContent-Type: application/octet-stream\r\n"
        "Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9.pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        + b64(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n") + "--pd--\r\n"
    ).encode()
    return [nested, forwarded, card, pdf]


class AttachmentsAgainstDovecotTests(DovecotClassMixin, TestCase):
    timeout = 60
    extra_config = ADDRESS_LOGINS

    async def backed_up(self) -> tuple[LiveApi, str, int]:
        server = await self.dovecot()
        address = f"{server.new_user()}@example.test"
        server.add_messages(address, "INBOX", corpus())
        api = await live_api(self, {})
        ca = server.pki.ca_pem.decode()

        def trusting(host: str, *, ca_pem: str | None = None,
                     fingerprint: str | None = None) -> IOpenSSLClientConnectionCreator:
            return client_tls(host, ca_pem=ca_pem or ca, fingerprint=fingerprint)

        api.core.fetch.engine.tls_factory = trusting
        alice = await api.core.identity.create_user("alice", "alice@example.test", "pw")
        token = await access_token(api.core.oauth, alice.id)
        status, created = await bearer(api, token, "POST", "/v1/accounts", json={
            "email": address, "password": server.PASSWORD, "host": "localhost",
            "port": server.imap})
        assert status == 201, created
        result = await api.core.fetch.engine.sync(created["id"])
        assert result.status == "success", result.error
        return api, token, created["id"]

    async def test_attachments_are_listed_described_searched_and_read(self) -> None:
        api, token, account_id = await self.backed_up()
        base = f"/v1/accounts/{account_id}"
        status, page = await bearer(api, token, "GET", f"{base}/attachments?sort=filename")
        self.assertEqual(status, 200, page)
        self.assertEqual((page["count"], page["start"]), (4, 0))
        by_name: dict[str, Any] = {a["filename"]: a for a in page["attachments"]}
        self.assertEqual(sorted(by_name), sorted(
            ["日本の写真.png", "original.eml", "Zoë.vcf", "résumé.pdf"]))
        self.assertEqual([a["filename"] for a in page["attachments"]],
                         sorted(by_name))  # sorted by file name
        self.assertIn("PNG image data, 1 x 1", by_name["日本の写真.png"]["meta_data"])
        self.assertIn("PDF document, version 1.4", by_name["résumé.pdf"]["meta_data"])
        self.assertIn("vCard", by_name["Zoë.vcf"]["meta_data"])
        self.assertIn("mail", by_name["original.eml"]["meta_data"].lower())
        self.assertEqual(by_name["日本の写真.png"]["mime_type"], "image/png")
        self.assertEqual(by_name["日本の写真.png"]["size"], len(PNG))
        self.assertEqual(by_name["Zoë.vcf"]["sender"].split("<")[-1], "zoe@example.test>")

        status, shown = await bearer(api, token, "GET",
                                     f"{base}/attachments/{by_name['日本の写真.png']['id']}")
        self.assertEqual(status, 200, shown)
        self.assertEqual(base64.b64decode(shown["content"]), PNG)

        status, found = await bearer(api, token, "GET",
                                     f"{base}/attachments_search?query=r%C3%A9sum%C3%A9")
        self.assertEqual([a["filename"] for a in found["attachments"]], ["résumé.pdf"])
        status, newest = await bearer(api, token, "GET",
                                      f"{base}/attachments?sort=date&direction=desc&per_page=1")
        self.assertEqual((newest["count"], len(newest["attachments"])), (4, 1))
        self.assertEqual(newest["attachments"][0]["filename"], "résumé.pdf")
        status, _ = await bearer(api, token, "GET", f"{base}/attachments/999999")
        self.assertEqual(status, 404)

    async def test_contacts_are_the_correspondents_as_vcards(self) -> None:
        api, token, account_id = await self.backed_up()
        base = f"/v1/accounts/{account_id}"
        status, page = await bearer(api, token, "GET", f"{base}/contacts?sort=email")
        self.assertEqual(status, 200, page)
        emails = [c["email"] for c in page["contacts"]]
        # "me@example.test" is whom the corpus writes to; the account's own address is not.
        self.assertEqual(emails, ["ana@example.test", "bo@example.test", "me@example.test",
                                  "zoe@example.test"])
        self.assertEqual(page["count"], 4)
        zoe = page["contacts"][3]
        self.assertEqual((zoe["name"], zoe["phone"], zoe["filename"]),
                         ("Zoe", "+33 1 23 45 67 89", "zoe@example.test.vcf"))
        self.assertIsNotNone(zoe["backup_date"])
        status, by_name = await bearer(api, token, "GET",
                                       f"{base}/contacts?sort=name&direction=desc&per_page=1")
        self.assertEqual((by_name["count"], by_name["contacts"][0]["name"]), (4, "Zoe"))

        status, card = await bearer(api, token, "GET", f"{base}/contacts/{zoe['id']}")
        self.assertEqual(status, 200, card)
        parsed = vobject.readOne(base64.b64decode(card["content"]).decode("utf-8"))
        self.assertEqual((parsed.fn.value, parsed.email.value, parsed.tel.value),
                         ("Zoe", "zoe@example.test", "+33 1 23 45 67 89"))
        status, _ = await bearer(api, token, "GET", f"{base}/contacts/12345")
        self.assertEqual(status, 404)
