"""Reading input: JSON, forms, multipart, query strings and fields, with clear 400s; and the
same errors as each API shows them."""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from typing import Any

from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from mailcore.uploads import TransferDecoder, decoded_least, encoded_bound
from tests.support.web import Web
from web.errors import ApiError
from web.parsing import (
    MAX_FORM_PARTS,
    MAX_JSON_DEPTH,
    MAX_JSON_VALUES,
    Upload,
    bool_field,
    collect_fields,
    int_field,
    parse_int,
    query_params,
    read_fields,
    read_json,
    read_json_object,
    string_field,
)

LIMIT = 1024
NUL = "The value holds NUL (U+0000), which no text field takes."


def request(body: bytes = b"", content_type: str | None = None, uri: bytes = b"/") -> Any:
    req: Any = DummyRequest([b""])
    req.content = io.BytesIO(body)
    req.uri = uri
    if content_type is not None:
        req.requestHeaders.setRawHeaders(b"content-type", [content_type.encode()])
    return req


class JsonTests(TestCase):
    def test_an_object_is_read(self) -> None:
        data = read_json_object(request(b'{"a": 1}', "application/json"), LIMIT)
        self.assertEqual(data, {"a": 1})

    def test_json_with_charset_and_suffix_types_is_read(self) -> None:
        for ctype in ("application/json; charset=utf-8", "application/merge-patch+json"):
            self.assertEqual(read_json_object(request(b"{}", ctype), LIMIT), {})

    def test_an_empty_body_is_an_empty_object(self) -> None:
        self.assertEqual(read_json_object(request(b"", "application/json"), LIMIT), {})
        self.assertEqual(read_json_object(request(b""), LIMIT), {})

    def test_bad_json_says_where(self) -> None:
        e = self.assertRaises(
            ApiError, read_json_object, request(b'{"a": ', "application/json"), LIMIT
        )
        self.assertEqual(e.status, 400)
        self.assertTrue(e.message.startswith("JSON parse error - Expecting value"), e.message)

    def test_nan_is_refused(self) -> None:
        e = self.assertRaises(
            ApiError, read_json_object, request(b'{"a": NaN}', "application/json"), LIMIT
        )
        self.assertIn("NaN is not valid JSON", e.message)

    def test_non_utf8_is_refused(self) -> None:
        e = self.assertRaises(
            ApiError, read_json_object, request(b'{"a": "\xff"}', "application/json"), LIMIT
        )
        self.assertIn("UTF-8", e.message)

    def test_a_non_object_is_refused(self) -> None:
        e = self.assertRaises(
            ApiError, read_json_object, request(b"[1, 2]", "application/json"), LIMIT
        )
        self.assertEqual(e.message, "Invalid data. Expected a JSON object, but got array.")

    def test_null_is_not_an_object(self) -> None:
        e = self.assertRaises(
            ApiError, read_json_object, request(b" null ", "application/json"), LIMIT
        )
        self.assertEqual(e.status, 400)
        self.assertEqual(e.message, "Invalid data. Expected a JSON object, but got null.")

    def test_nesting_past_the_limit_is_a_400_at_any_depth(self) -> None:
        for depth in (MAX_JSON_DEPTH + 1, 5000, 200_000):
            body = b'{"a":' + b"[" * depth + b"]" * depth + b"}"
            e = self.assertRaises(
                ApiError, read_json_object, request(body, "application/json"), len(body)
            )
            self.assertEqual(e.status, 400)
            self.assertEqual(
                e.message, f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels."
            )
        fits = b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1)
        self.assertEqual(
            read_json_object(request(b'{"a":' + fits + b"}", "application/json"), LIMIT)["a"],
            json.loads(fits),
        )

    def test_a_lone_surrogate_is_refused_anywhere_in_the_document(self) -> None:
        for body in (b'{"a": "\\ud800"}', b'{"\\udfff": 1}', b'{"a": [{"b": ["x\\udc00"]}]}'):
            e = self.assertRaises(
                ApiError, read_json_object, request(body, "application/json"), LIMIT
            )
            self.assertEqual(e.status, 400)
            self.assertIn("lone surrogate", e.message)
        # A pair is one character, and is text.
        pair = read_json_object(request(b'{"a": "\\ud83d\\ude00"}', "application/json"), LIMIT)
        self.assertEqual(pair, {"a": "\U0001f600"})

    def test_nul_is_refused_naming_the_top_level_field_that_holds_it(self) -> None:
        for body, fields in ((b'{"a": "x\\u0000"}', {"a": [NUL]}),
                             (b'{"a": 1, "b": [{"c": ["\\u0000"]}]}', {"b": [NUL]})):
            e = self.assertRaises(
                ApiError, read_json_object, request(body, "application/json"), LIMIT
            )
            self.assertEqual((e.status, e.fields), (400, fields))
        for body in (b'["\\u0000"]', b'{"a\\u0000": 1}'):
            e = self.assertRaises(ApiError, read_json, request(body, "application/json"), LIMIT)
            self.assertEqual((e.status, e.fields), (400, None))
            self.assertIn("NUL", e.message)

    def test_a_document_of_too_many_values_is_refused_before_it_is_decoded(self) -> None:
        """1 MiB of JSON (the default json_max_body) holds some 300,000 values; decoding
        and checking them kept the reactor for 1-5 s. More than MAX_JSON_VALUES is refused
        from a count in the text, without decoding it."""
        MIB = 1024 * 1024
        hostile = [
            json.dumps({f"k{i:05d}": 0 for i in range(90_000)}, separators=(",", ":")),
            "[" + ",".join(["{}"] * 300_000) + "]",
            "[" + ",".join(['"a"'] * 250_000) + "]",
            "[" + "[]" * (MAX_JSON_VALUES + 1) + "]",  # brackets only, no comma
        ]
        decoded: list[str] = []
        real_loads = json.loads

        def loads(text: str, **kwargs: Any) -> Any:
            decoded.append(text)
            return real_loads(text, **kwargs)

        self.patch(json, "loads", loads)
        for text in hostile:
            body = text.encode()
            self.assertLessEqual(len(body), MIB)
            e = self.assertRaises(ApiError, read_json, request(body, "application/json"), MIB)
            self.assertEqual((e.status, e.message),
                             (400, f"JSON parse error - more than {MAX_JSON_VALUES} values."))
        self.assertEqual(decoded, [])
        # Fewer fit, whatever commas and brackets their strings hold (escaped quotes too).
        fits = list(range(MAX_JSON_VALUES - 1))
        self.assertEqual(read_json(request(json.dumps(fits).encode(), "application/json"),
                                   MIB), fits)
        strings = {"a": ',[{"\\' * 20_000, "b": "\\", "c": '"' + "," * 20_000}
        self.assertEqual(read_json(request(json.dumps(strings).encode(), "application/json"),
                                   MIB), strings)

    def test_a_number_beyond_a_double_is_refused(self) -> None:
        e = self.assertRaises(
            ApiError, read_json_object, request(b'{"a": 1e999}', "application/json"), LIMIT
        )
        self.assertEqual(e.message, "JSON parse error - a number is out of range.")

    def test_wrong_content_type_is_a_415_naming_it(self) -> None:
        # (The Mail API, safedrop and the pages answer it 400: ApiApp.unsupported_media_status.)
        e = self.assertRaises(ApiError, read_json_object, request(b"{}", "text/plain"), LIMIT)
        self.assertEqual(e.status, 415)
        self.assertIn('"text/plain"', e.message)
        self.assertIn("application/json", e.message)

    def test_json_longer_than_the_limit_is_a_413(self) -> None:
        body = json.dumps({"a": "x" * LIMIT}).encode()
        e = self.assertRaises(ApiError, read_json_object, request(body, "application/json"), LIMIT)
        self.assertEqual(e.status, 413)


class FormTests(TestCase):
    def test_a_form_of_too_many_fields_is_refused_before_it_is_split(self) -> None:
        """1 MiB of `a=&` is 349,000 fields: splitting and checking them held the reactor
        for 1-2.5 s. More than MAX_FORM_PARTS is a 400, counted first."""
        form = "application/x-www-form-urlencoded"
        body = b"a=&" * 349_000
        started = time.process_time()
        e = self.assertRaises(ApiError, read_fields, request(body, form), len(body))
        self.assertLess(time.process_time() - started, 0.5)
        self.assertEqual(e.status, 400)
        self.assertIn("Max number of fields exceeded", e.message)
        fits = b"&".join(b"f%d=v" % i for i in range(MAX_FORM_PARTS))
        self.assertEqual(len(read_fields(request(fits, form), len(fits))), MAX_FORM_PARTS)

    def test_form_fields_are_strings_and_the_last_value_wins(self) -> None:
        req = request(b"a=1&b=x%20y&a=2&empty=", "application/x-www-form-urlencoded")
        self.assertEqual(read_fields(req, LIMIT), {"a": "2", "b": "x y", "empty": ""})

    def test_once_refuses_a_field_given_again_with_another_value(self) -> None:
        form = "application/x-www-form-urlencoded"
        req = request(b"to=a%40x.test&b=1&to=b%40x.test", form)
        e = self.assertRaises(ApiError, read_fields, req, LIMIT, once=True)
        self.assertEqual((e.status, e.fields), (400, {"to": [
            "The field is given more than once, with different values; it takes one "
            "value."]}))
        req = request(b"to=a&b=1&to=a", form)
        self.assertEqual(read_fields(req, LIMIT, once=True), {"to": "a", "b": "1"})
        mp = "multipart/form-data; boundary=XyZ"
        body = b"".join(b'--XyZ\r\nContent-Disposition: form-data; name="to"\r\n\r\n'
                        + v + b"\r\n" for v in (b"a", b"b")) + b"--XyZ--\r\n"
        e = self.assertRaises(ApiError, read_fields, request(body, mp), LIMIT, once=True)
        self.assertEqual((e.status, list(e.fields or ())), (400, ["to"]))
        self.assertEqual(read_fields(request(body, mp), LIMIT), {"to": "b"})

    def test_percent_escapes_that_are_not_utf8_are_a_400_naming_each_field(self) -> None:
        form = "application/x-www-form-urlencoded"
        req = request(b"subject=caf%C3%A9&to=%E2%82%AC", form)
        self.assertEqual(read_fields(req, LIMIT), {"subject": "caf\u00e9", "to": "\u20ac"})
        # Latin-1, a bare continuation byte, an encoded surrogate: U+FFFD on the old code.
        req = request(b"subject=caf%E9&message=%FF%FE&name=ok&x=%ED%A0%80", form)
        e = self.assertRaises(ApiError, read_fields, req, LIMIT)
        self.assertEqual((e.status, e.fields), (400, {
            "message": ["The value is not valid UTF-8."], "subject": [
                "The value is not valid UTF-8."], "x": ["The value is not valid UTF-8."]}))
        e = self.assertRaises(ApiError, read_fields, request(b"caf%E9=1", form), LIMIT)
        self.assertEqual((e.status, e.fields), (400, None))
        # NUL is UTF-8, but no text any field takes.
        e = self.assertRaises(ApiError, read_fields, request(b"a=1&b=x%00", form), LIMIT)
        self.assertEqual((e.status, e.fields), (400, {"b": [NUL]}))
        e = self.assertRaises(ApiError, read_fields, request(b"a%00=1", form), LIMIT)
        self.assertEqual((e.status, e.fields), (400, None))

    def test_json_is_accepted_where_forms_are(self) -> None:
        req = request(b'{"a": true}', "application/json")
        self.assertEqual(read_fields(req, LIMIT), {"a": True})

    def test_multipart_gives_text_fields_and_uploads(self) -> None:
        body = (
            b"--XyZ\r\n"
            b'Content-Disposition: form-data; name="subject"\r\n\r\n'
            b"Lorem \xc3\xa9\r\n"
            b"--XyZ\r\n"
            b'Content-Disposition: form-data; name="the_file"; filename="file1.txt"\r\n'
            b"Content-Type: text/plain\r\n\r\n"
            b"hello\r\nworld\r\n"
            b"--XyZ--\r\n"
        )
        fields = read_fields(request(body, "multipart/form-data; boundary=XyZ"), LIMIT)
        self.assertEqual(fields["subject"], "Lorem \u00e9")
        self.assertEqual(
            fields["the_file"], Upload("the_file", "file1.txt", "text/plain", b"hello\r\nworld")
        )

    def test_multipart_without_boundary_is_a_400(self) -> None:
        e = self.assertRaises(
            ApiError, read_fields, request(b"junk", "multipart/form-data"), LIMIT
        )
        self.assertEqual(e.status, 400)

    def test_a_part_holding_parts_is_a_400_naming_it(self) -> None:
        # The parser reads such a part as a message of its own, whose decoded payload is
        # None: the field used to be "" (a PUT wiped what it named).
        for head in (b"Content-Type: multipart/mixed; boundary=c\r\n\r\n"
                     b"--c\r\n\r\nhello\r\n--c--\r\n",
                     b'Content-Type: message/rfc822\r\n\r\nSubject: hi\r\n\r\nhello\r\n'):
            for disposition in (b'name="message"', b'name="message"; filename="m.eml"'):
                body = (b"--b1\r\nContent-Disposition: form-data; " + disposition + b"\r\n"
                        + head + b"--b1--\r\n")
                req = request(body, "multipart/form-data; boundary=b1")
                e = self.assertRaises(ApiError, read_fields, req, LIMIT)
                self.assertEqual((e.status, list(e.fields or {})), (400, ["message"]), body)

    def test_a_part_naming_its_field_twice_is_a_400(self) -> None:
        # `name="subject"; name="message"`: the email package read the first (a PUT's
        # subject changed) where the multipart parser, and safedrop's and the Mail API's
        # uploads, read the last. Refused, as a field given twice is; the same name twice
        # is taken.
        body = (b'--b1\r\nContent-Disposition: form-data; name="subject"; name="message"'
                b"\r\n\r\nhi\r\n--b1--\r\n")
        e = self.assertRaises(ApiError, read_fields,
                              request(body, "multipart/form-data; boundary=b1"), LIMIT)
        self.assertEqual((e.status, e.message), (400, "Malformed multipart body: a part's "
                         "Content-Disposition gives name more than once, with different "
                         "values."))
        # A parameter the multipart parser skips (`x.y`) hid `; name=bcc` in its value: the
        # parser read the field as bcc, the email package as to (the Mail API moved an
        # address from to into bcc).
        for hidden in (b'name="to"; x.y="; name=bcc"', b'name="to"; x=\t"; name=bcc"',
                       b'x.y="; name=bcc"'):
            e = self.assertRaises(ApiError, read_fields, request(
                body.replace(b'name="subject"; name="message"', hidden),
                "multipart/form-data; boundary=b1"), LIMIT)
            self.assertEqual(e.status, 400, hidden)
            self.assertRegex(e.message, "Malformed multipart body: a part's Content-Disposition "
                             "gives name (more than once|in a way that parsers)")
        same = body.replace(b'name="message"', b"name=subject")
        self.assertEqual(read_fields(request(same, "multipart/form-data; boundary=b1"), LIMIT),
                         {"subject": "hi"})

    def test_a_body_with_a_content_encoding_is_a_415(self) -> None:
        body = b'{"subject": "hi"}'
        for coding in ("gzip", "deflate, identity", "br", "X-Gzip", "zstd", "utf-8, gzip"):
            req = request(body, "application/json")
            req.requestHeaders.setRawHeaders(b"content-encoding", [coding.encode()])
            e = self.assertRaises(ApiError, read_fields, req, LIMIT)
            self.assertEqual((e.status, e.headers), (415, {"Accept-Encoding": "identity"}))
        # A value that is not a coding that transforms a body (a charset sent by mistake,
        # as an IMAP2API client's login did) is the body as it is, as Django read it.
        for coding in ("identity", "", "utf-8", "UTF8", "none", "binary", "8bit",
                       "identity, utf-8"):
            req = request(body, "application/json")
            req.requestHeaders.setRawHeaders(b"content-encoding", [coding.encode()])
            self.assertEqual(read_fields(req, LIMIT), {"subject": "hi"})
        req = request(b"", "application/json")  # no body, nothing coded
        req.requestHeaders.setRawHeaders(b"content-encoding", [b"gzip"])
        self.assertEqual(read_fields(req, LIMIT), {})

    def test_a_body_without_its_closing_boundary_is_a_400(self) -> None:
        whole = b'--b1\r\nContent-Disposition: form-data; name="subject"\r\n\r\nSubject\r\n'
        for cut in (whole[:-3], whole, whole + b"--b1\r\n", whole + b"--b1"):
            req = request(cut, "multipart/form-data; boundary=b1")
            e = self.assertRaises(ApiError, read_fields, req, LIMIT)
            self.assertEqual(
                (e.status, e.message),
                (400, "Malformed multipart body: it ends before its closing boundary."), cut)
        # Closed (with or without the last CRLF, after a preamble): read as ever.
        for body in (whole + b"--b1--\r\n", whole + b"--b1--", b"hi\r\n" + whole + b"--b1--"):
            req = request(body, "multipart/form-data; boundary=b1")
            self.assertEqual(read_fields(req, LIMIT), {"subject": "Subject"}, body)

    def test_a_body_of_many_parts_is_refused_before_they_are_read(self) -> None:
        part = b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nx\r\n'
        body = part * (MAX_FORM_PARTS + 1) + b"--b--\r\n"
        req = request(body, "multipart/form-data; boundary=b")
        e = self.assertRaises(ApiError, read_fields, req, len(body))
        self.assertEqual(e.status, 400)
        self.assertIn("Maximum segment count exceeded", e.message)
        body = part * MAX_FORM_PARTS + b"--b--\r\n"
        req = request(body, "multipart/form-data; boundary=b")
        self.assertEqual(read_fields(req, len(body)), {"a": "x"})

    def test_a_field_of_many_lines_is_read_in_time_linear_in_its_bytes(self) -> None:
        # The email package took about a second a MiB of empty lines here, on the reactor
        # thread; boundaries found with bytes.find take milliseconds.
        lines = b"\n" * (8 * 1024 * 1024)
        body = (b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\n' + lines
                + b"\r\n--b--\r\n")
        req = request(body, "multipart/form-data; boundary=b")
        started = time.monotonic()
        fields = read_fields(req, len(body))
        self.assertLess(time.monotonic() - started, 2.0)
        self.assertEqual(fields, {"a": lines.decode()})

    def test_other_types_are_refused_with_the_accepted_list(self) -> None:
        e = self.assertRaises(ApiError, read_fields, request(b"<x/>", "application/xml"), LIMIT)
        self.assertIn("application/x-www-form-urlencoded", e.message)

    def test_a_body_without_type_is_refused_but_an_empty_one_is_no_fields(self) -> None:
        self.assertRaises(ApiError, read_fields, request(b"a=1"), LIMIT)
        self.assertEqual(read_fields(request(b""), LIMIT), {})


class QueryTests(TestCase):
    def test_query_comes_from_the_uri_only(self) -> None:
        req = request(b"access_token=body", "application/x-www-form-urlencoded",
                      uri=b"/v1/accounts?type=imap&sort=email&sort=email")
        self.assertEqual(query_params(req), {"type": "imap", "sort": "email"})

    def test_a_parameter_given_twice_with_other_values_is_a_400_when_read(self) -> None:
        """The last value won (`sort=email&sort=storage` read as storage) unseen; now a
        400 naming it once the route reads it, as a form's field given twice is. The
        others are read as before, and the parameter is still seen to be present."""
        params = query_params(request(uri=b"/v1/accounts?type=imap&sort=email&sort=storage"))
        self.assertEqual((params["type"], "sort" in params, len(params)), ("imap", True, 2))
        for read in (lambda: params["sort"], lambda: params.get("sort")):
            e = self.assertRaises(ApiError, read)
            self.assertEqual((e.status, e.fields), (400, {"sort": [
                "The parameter is given more than once, with different values; it takes "
                "one value."]}))

    def test_last_wins_takes_a_parameters_last_value(self) -> None:
        # The IMAP2API's reading (web.imap2api.queries.drf_query), as Django's QueryDict.get.
        params = query_params(request(uri=b"/x?sort=email&type=imap&sort=storage"),
                              last_wins=True)
        self.assertEqual((params["sort"], params.get("type"), len(params)),
                         ("storage", "imap", 2))

    def test_a_query_that_is_not_text_is_a_400_naming_the_parameter(self) -> None:
        for query, message in ((b"q=a%00b", NUL), (b"q=caf%E9", "The value is not valid UTF-8."),
                               (b"ok=1&q%00=1", NUL)):
            e = self.assertRaises(ApiError, query_params, request(uri=b"/x?" + query))
            self.assertEqual(e.status, 400)
            self.assertEqual(list(e.fields.values()), [[message]], query)
        self.assertEqual(query_params(request(uri=b"/x?q=caf%C3%A9")), {"q": "caf\u00e9"})


class FieldTests(TestCase):
    def test_strings(self) -> None:
        self.assertEqual(string_field({"a": "x"}, "a"), "x")
        self.assertIsNone(string_field({}, "a", required=False))
        for data, message in [
            ({}, "This field is required."),
            ({"a": None}, "This field is required."),
            ({"a": 5}, "Not a valid string."),
            ({"a": "  "}, "This field may not be blank."),
        ]:
            e = self.assertRaises(ApiError, string_field, data, "a")
            self.assertEqual(e.fields, {"a": [message]})
            self.assertEqual(e.message, f"a: {message}")
        self.assertEqual(string_field({"a": "  "}, "a", trim=False), "  ")

    def test_booleans_take_json_and_zero_one(self) -> None:
        for value, expected in [(True, True), (0, False), ("1", True), ("0", False),
                                ("true", True), ("off", False)]:
            self.assertEqual(bool_field({"b": value}, "b"), expected, value)
        self.assertRaises(ApiError, bool_field, {"b": "maybe"}, "b")
        self.assertRaises(ApiError, bool_field, {"b": 2}, "b")

    def test_integers(self) -> None:
        self.assertEqual(int_field({"n": "42"}, "n"), 42)
        self.assertEqual(int_field({"n": 7}, "n", maximum=7), 7)
        self.assertRaises(ApiError, int_field, {"n": True}, "n")
        self.assertRaises(ApiError, int_field, {"n": "4x"}, "n")
        self.assertRaises(ApiError, int_field, {"n": 41}, "n", maximum=40)

    def test_integers_fit_a_signed_64_bit_column(self) -> None:
        self.assertEqual(int_field({"n": 2**63 - 1}, "n"), 2**63 - 1)
        self.assertEqual(int_field({"n": str(-(2**63))}, "n"), -(2**63))
        for value, message in [
            (2**63, "Ensure this value is less than or equal to 9223372036854775807."),
            (10**30, "Ensure this value is less than or equal to 9223372036854775807."),
            (str(2**63), "Ensure this value is less than or equal to 9223372036854775807."),
            (-(2**63) - 1,
             "Ensure this value is greater than or equal to -9223372036854775808."),
            ("9" * 5000, "A valid integer is required."),
        ]:
            e = self.assertRaises(ApiError, int_field, {"n": value}, "n")
            self.assertEqual((e.status, e.fields), (400, {"n": [message]}))

    def test_integers_are_ascii_digits(self) -> None:
        # str.isdigit and int() take Arabic-Indic, fullwidth and other digits.
        for text in ("\u0661\u0662", "\uff11", "\u09e7", "1_000", " + 1"):
            e = self.assertRaises(ApiError, int_field, {"n": text}, "n")
            self.assertEqual(e.fields, {"n": ["A valid integer is required."]})
        self.assertIsNone(parse_int("\u0661"))
        self.assertIsNone(parse_int(str(2**63)))
        self.assertEqual(parse_int("-12"), -12)

    def test_a_line_field_refuses_control_characters(self) -> None:
        for text in ("a\x00b", "a\r\nQUIT", "tab\there", "\x7f", "c1\x85"):
            e = self.assertRaises(ApiError, string_field, {"a": text}, "a", line=True)
            self.assertEqual(
                e.fields, {"a": ["Control characters (NUL, CR, LF, TAB...) are not allowed."]}
            )
        self.assertEqual(string_field({"a": "Zoë O'Brien"}, "a", line=True), "Zoë O'Brien")
        self.assertEqual(string_field({"a": "two\nlines"}, "a"), "two\nlines")

    def test_a_string_with_a_lone_surrogate_is_refused(self) -> None:
        e = self.assertRaises(ApiError, string_field, {"a": "x\udc80"}, "a")
        self.assertEqual(e.fields, {"a": ["The value holds a lone surrogate, which is not text."]})

    def test_multipart_text_in_a_charset_that_makes_surrogates_is_refused(self) -> None:
        body = (
            b"--b\r\nContent-Disposition: form-data; name=\"name\"\r\n"
            b"Content-Type: text/plain; charset=unicode_escape\r\n\r\n"
            b"\\ud800\r\n--b--\r\n"
        )
        req = request(body, "multipart/form-data; boundary=b")
        e = self.assertRaises(ApiError, read_fields, req, LIMIT)
        self.assertEqual(
            e.fields, {"name": ["The value holds a lone surrogate, which is not text."]}
        )

    def test_collect_reports_every_bad_field(self) -> None:
        data = {"b": 3}
        e = self.assertRaises(
            ApiError,
            collect_fields,
            {"a": lambda: string_field(data, "a"), "b": lambda: string_field(data, "b")},
        )
        self.assertEqual(
            e.fields, {"a": ["This field is required."], "b": ["Not a valid string."]}
        )


class ParseErrorsPerApiTests(TestCase):
    """The same input mistakes, as each API words them."""

    async def test_drf_bad_json(self) -> None:
        web = Web.build()
        status, _, body = await web.call(
            "POST", "/api-token-auth/", data=b'{"username":',
            headers={"Content-Type": "application/json"},
        )
        self.assertEqual(status, 400)
        self.assertTrue(body["detail"].startswith("JSON parse error"), body)

    async def test_drf_wrong_types(self) -> None:
        web = Web.build()
        status, _, body = await web.call(
            "POST", "/api-token-auth/", json={"username": ["alice"], "password": 1}
        )
        self.assertEqual(status, 400)
        self.assertEqual(
            body, {"username": ["Not a valid string."], "password": ["Not a valid string."]}
        )

    async def test_mailapi_wrong_content_type(self) -> None:
        web = Web.build()
        status, _, body = await web.call(
            "POST", "/api/v1/auth/", data=b"username=a", headers={"Content-Type": "text/plain"}
        )
        self.assertEqual(status, 400)
        self.assertIn('Unsupported media type "text/plain"', body["error"])

    async def test_a_body_of_another_type_is_415_where_the_document_allows(self) -> None:
        # RFC 9110 15.5.16; every API answered 400. DRF (IMAP2API's framework) answers
        # 415, Protecmail's document uses HTTP's response codes, Dropmyemail's takes JSON
        # only; the Mail API's and safedrop's documents list their clients' statuses (400
        # for bad input), and /oauth/token answers RFC 6749 5.2's 400 invalid_request.
        from tests.support.oauth import register
        web = Web.build()
        alice = await web.user()
        key = await web.credential(alice)
        session = await web.credential(alice, "session")
        client = await register(web, alice)
        token = str((await client.token(scope="read write"))["access_token"])
        plain = {"Content-Type": "text/plain"}
        cases = [
            ("POST", "/api-token-auth/", {}, 415, "detail"),
            ("PUT", "/api/v1/user", {"Api-Key": key}, 415, "msg"),
            ("POST", "/v1/accounts", {"Authorization": f"Bearer {token}"}, 415,
             "error_description"),
            ("POST", "/oauth/token", {}, 400, "error_description"),
            ("POST", "/api/v1/auth/", {}, 400, "error"),
            ("POST", "/api/v1/mail/", {"Auth-Key": await web.credential(alice, "token")},
             400, "message"),
            ("PUT", "/dropbundles/1", {"X-Auth-Token": session}, 400, "error"),
        ]
        for method, path, headers, expected, key_name in cases:
            status, _, body = await web.call(method, path, data=b"a=b",
                                             headers={**plain, **headers})
            self.assertEqual(status, expected, (path, body))
            self.assertIn('Unsupported media type "text/plain"', body[key_name], path)
        status, _, body = await web.call("POST", "/oauth/token", data=b"a=b", headers=plain)
        self.assertEqual(body["error"], "invalid_request")
        status, _, body = await web.call("POST", "/v1/accounts", data=b"a=b", headers={
            **plain, "Authorization": f"Bearer {token}"})
        self.assertEqual(body["error"], "unsupported_media_type")
        status, _, body = await web.call("PUT", "/api/v1/user", data=b"a=b", headers={
            **plain, "Api-Key": key})
        self.assertIs(body["success"], False)
        # The OpenAPI document lists the 415 where it is answered.
        status, _, doc = await web.call("GET", "/openapi.json")
        paths = doc["paths"]
        self.assertIn("415", paths["/api-token-auth/"]["post"]["responses"])
        self.assertIn("415", paths["/api/v1/user"]["put"]["responses"])
        self.assertIn("415", paths["/v1/accounts"]["post"]["responses"])
        self.assertNotIn("415", paths["/oauth/token"]["post"]["responses"])
        self.assertNotIn("415", paths["/api/v1/mail/"]["post"]["responses"])
        self.assertNotIn("415", paths["/api/v1/user"]["get"]["responses"])

    async def test_protecmail_bad_json_is_an_envelope(self) -> None:
        web = Web.build()
        alice = await web.user()
        key = await web.credential(alice)
        status, _, body = await web.call(
            "PUT", "/api/v1/user", data=b"{nope",
            headers={"Api-Key": key, "Content-Type": "application/json"},
        )
        self.assertEqual(status, 400)
        self.assertIs(body["success"], False)
        self.assertTrue(body["msg"].startswith("JSON parse error"))


class TransferDecoderTests(TestCase):
    """The Mail API's streamed uploads undo a part's transfer encoding a chunk at a time
    (mailcore.uploads.TransferDecoder) to the bytes parse_multipart decodes at once."""

    def test_any_cut_of_the_stream_decodes_as_the_whole(self) -> None:
        data = bytes(range(256)) * 3
        cases = [("base64", base64.encodebytes(data).replace(b"\n", b"\r\n"), data),
                 ("base64", b"aGVs bG8", b"hello"),
                 ("quoted-printable", b"caf=C3=A9 =\r\nsoft line=\r\n=3D end\r\nlast=",
                  binascii.a2b_qp(b"caf=C3=A9 =\r\nsoft line=\r\n=3D end\r\nlast="))]
        for encoding, encoded, expected in cases:
            for cut in range(len(encoded) + 1):
                for step in (1, 7, len(encoded) + 1):
                    decoder = TransferDecoder(encoding)
                    pieces = [encoded[:cut]] + [encoded[i:i + step]
                                                for i in range(cut, len(encoded), step)]
                    out = b"".join(decoder.feed(p) for p in pieces) + decoder.finish()
                    self.assertEqual(out, expected, (encoding, cut, step))

    def test_the_encoded_bound_holds_base64_and_the_least_is_never_more(self) -> None:
        # The limits checked before a body is read count its bytes: a file of n bytes is
        # at most encoded_bound(n) of them (as it is, or base64 in MIME's lines of 76 or
        # PEM's of 64, CRLF or LF), and a part of e bytes decodes to decoded_least(e) at
        # least, so a file within a limit is never refused for its encoding's size.
        for n in [*range(200), 1000, 4096, 65_537, 3 * 1024 * 1024 + 1]:
            data = b"\xff" * n
            one_line = base64.b64encode(data)
            pem = b"".join(one_line[i:i + 64] + b"\r\n" for i in range(0, len(one_line), 64))
            mime = base64.encodebytes(data)
            for sent in (data, pem, mime, mime.replace(b"\n", b"\r\n"), one_line):
                self.assertLessEqual(len(sent), encoded_bound(n), n)
                self.assertLessEqual(decoded_least(len(sent)), n, n)
            self.assertGreater(decoded_least(encoded_bound(n) + 11), n)
        self.assertEqual(decoded_least(0), 0)
