"""Reading request input: query parameters, JSON bodies, form and multipart bodies, fields.

Every failure is an `ApiError` with a message that says what was wrong (bad JSON, a content
type we do not read, a field of the wrong type), which each API renders in its own shape.
Messages for fields follow Django REST framework's wording, which the IMAP2API seed's
clients see verbatim; the other shapes show them as "field: message".

This is the input boundary of every route, so it refuses here what nothing behind it could
hold: JSON nested deeper than `MAX_JSON_DEPTH` or of more than `MAX_JSON_VALUES` values,
text (in JSON, a form, a multipart field, the query string or a path segment) holding a lone
surrogate ("\\ud800", which json.loads accepts but no database or reply can encode) or NUL
(which PostgreSQL's text columns refuse: a 500 there, a stored NUL on SQLite), a number that
is not finite, an integer outside the signed 64-bit range (`INT64_MIN`..`INT64_MAX`, what a
BIGINT column keeps), digits other than ASCII 0-9, and (in `string_field(..., line=True)`,
for names) control characters, or (`multiline=True`, for messages) those other than TAB, CR
and LF. Ids in paths go through `IdConverter`, the `int` converter of every route (at most
`ID_MAX`, what an id column holds), and every other path segment through `TextConverter`.
"""

from __future__ import annotations

import binascii
import email.parser
import email.policy
import io
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from email.message import Message
from typing import Any, BinaryIO
from urllib.parse import parse_qsl

from multipart import MultipartSegment
from twisted.web.iweb import IRequest
from werkzeug.exceptions import NotFound
from werkzeug.routing import BaseConverter, UnicodeConverter

from mailcore.text import (
    CONTROL_CHARACTER,
    CONTROL_IN_TEXT,
    HOLDS_NUL,
    has_control,
    has_control_multiline,
    not_text,
)
from mailcore.uploads import MalformedUpload, form_boundary, multipart_events
from web.errors import ApiError, field_error, too_large

JSON_TYPES = ("application/json",)
FORM_TYPE = "application/x-www-form-urlencoded"
MULTIPART_TYPE = "multipart/form-data"

# A body in a content type we do not read: 415 Unsupported Media Type (RFC 9110 15.5.16,
# "content ... in a format not supported by this method on the target resource"). The
# apps whose document lists the statuses its clients know answer 400 instead
# (ApiApp.unsupported_media_status).
UNSUPPORTED_MEDIA_STATUS = 415

REQUIRED = "This field is required."
BLANK = "This field may not be blank."
NOT_A_STRING = "Not a valid string."
NOT_A_BOOLEAN = "Must be a valid boolean."
NOT_AN_INTEGER = "A valid integer is required."
NOT_UTF8 = "The value is not valid UTF-8."
NESTED_PARTS = "The part holds parts of its own (multipart or message); send text or a file."

# What an integer column holds (SQLite INTEGER, PostgreSQL BIGINT).
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
# What an id (every table's primary key) holds: PostgreSQL's INTEGER. A larger number sent
# to PostgreSQL is an "integer out of range" error, not a row that is not there.
ID_MAX = 2**31 - 1
# Our documents are a few levels deep; this leaves room and bounds every walk over them.
MAX_JSON_DEPTH = 32
# Values in one JSON document (every object, array, key's value, array item and scalar).
# Our request documents hold a few dozen; a list of folder names or recipients some
# hundreds. The bound keeps decoding and checking a hostile body short: 1 MiB of `{}` or of
# one-letter keys is some 300,000 values, and decoding and walking them kept the reactor
# 1-5 s.
MAX_JSON_VALUES = 10_000
# A multipart/form-data body (not an upload path's, mailcore.uploads): its parts, and the
# headers of each. Our forms have a few fields; the Mail API's files come one a part. A
# form-encoded body has as many fields at most.
MAX_FORM_PARTS = 256
MAX_PART_HEADERS = 16

_INTEGER = re.compile(r"[+-]?[0-9]{1,20}")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart body."""

    name: str
    filename: str
    content_type: str
    data: bytes


# -- text and integers ----------------------------------------------------------------------


def parse_int(text: str) -> int | None:
    """A base-10 integer in ASCII digits (an optional sign) within the signed 64-bit range,
    or None. `str.isdigit` and `int` also take other scripts' digits ("١٢") and any length."""
    if not _INTEGER.fullmatch(text):
        return None
    value = int(text)
    return value if INT64_MIN <= value <= INT64_MAX else None


class IdConverter(BaseConverter):
    """`<int:name>` in every route (`web.openapi.RouteTable` installs it): ASCII digits, at
    most `maximum` (`ID_MAX`). A bigger number names nothing: a 404 like any unknown id,
    instead of an overflow in the database driver. (It raises NotFound rather than
    Werkzeug's ValidationError, which would make the router answer 405 when another rule of
    the same path takes other methods.)"""

    regex = r"[0-9]+"
    part_isolating = True
    weight = 50
    maximum = ID_MAX

    def to_python(self, value: str) -> int:
        number = parse_int(value) if len(value) <= len(str(self.maximum)) else None
        if number is None or not 0 <= number <= self.maximum:
            raise NotFound()
        return number

    def to_url(self, value: Any) -> str:
        return str(int(value))


class BigIdConverter(IdConverter):
    """`<bigint:name>`: a number that is not a row id but a key in a BIGINT column (a
    contact's, derived from its address), at most `INT64_MAX`."""

    maximum = INT64_MAX


class TextConverter(UnicodeConverter):
    """A path segment as text (`<name>`, `<string:name>`; `web.openapi.RouteTable` installs
    it): one holding NUL or a lone surrogate (`%00`, `%ED%A0%80`) names nothing, a 404 like
    any unknown id, instead of a PostgreSQL error (a mail's public id, a user name, an
    address looked up in the store)."""

    def to_python(self, value: str) -> str:
        if not_text(value):
            raise NotFound()
        return value


def media_type(request: IRequest) -> str:
    """The request's media type, lower-case, without parameters ("" when absent)."""
    raw = request.getHeader(b"content-type") or b""
    return raw.split(b";", 1)[0].strip().decode("latin-1").lower()


def is_json_type(media: str) -> bool:
    return media in JSON_TYPES or (media.startswith("application/") and media.endswith("+json"))


class QueryParams(Mapping[str, str]):
    """The query string's parameters, each read as one value. A parameter given more than
    once with different values (`?count=5&count=500`, `?send&send=0`) is a 400 naming it
    when it is read (`given_twice`), as a form's field or a JSON key is on the APIs that
    take one value a field: keeping either would be a guess at what the client meant, and
    no API's document defines a parameter that repeats. The same value twice is taken; a
    parameter the route does not read is never looked at. With `last_wins` the last value
    is taken instead, as Django's QueryDict.get does: the IMAP2API's (web.imap2api.queries),
    whose clients the seed's Django REST framework service answered so."""

    def __init__(self, lists: Mapping[str, list[str]], *, last_wins: bool = False) -> None:
        self._lists = lists
        self._last_wins = last_wins

    def __getitem__(self, name: str) -> str:
        values = self._lists[name]
        if self._last_wins:
            return values[-1]
        if any(value != values[0] for value in values):
            raise given_twice(name, "parameter")
        return values[0]

    def __contains__(self, name: object) -> bool:
        return name in self._lists

    def __iter__(self) -> Iterator[str]:
        return iter(self._lists)

    def __len__(self) -> int:
        return len(self._lists)


def query_params(request: IRequest, *, last_wins: bool = False) -> QueryParams:
    """Query-string parameters of the URI only (never the body), each one value
    (QueryParams: one given twice with different values is a 400 when read, or with
    `last_wins` its last value)."""
    return QueryParams(query_lists(request), last_wins=last_wins)


def query_lists(request: IRequest) -> dict[str, list[str]]:
    """Query-string parameters of the URI only, each with every value it is given."""
    uri: bytes = request.uri
    _, _, query = uri.partition(b"?")
    try:
        text = query.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "The query string is not valid UTF-8.") from None
    # Percent-escapes that are not UTF-8 become lone surrogates, as in `parse_form`.
    params: dict[str, list[str]] = {}
    for name, value in parse_qsl(text, keep_blank_values=True, errors="surrogateescape"):
        problem = _escaped_problem(name) or _escaped_problem(value)
        if problem:
            raise ApiError(400, f"The query string is not text: {problem}",
                           fields={name: [problem]})
        params.setdefault(name, []).append(value)
    return params


def _escaped_problem(text: str) -> str | None:
    """Why percent-decoded `text` (parse_qsl with "surrogateescape": a lone surrogate is a
    byte that was not UTF-8) is not text, or None."""
    problem = not_text(text)
    return NOT_UTF8 if problem is not None and problem != HOLDS_NUL else problem


def body_file(request: IRequest) -> BinaryIO | None:
    """The request body as the file twisted.web spooled it to (None: no body), refused with
    415 (`coded_body`) when its Content-Encoding transforms it (gzip, br...): every route
    reads or stores the bytes as they came, so a gzip body would be parsed as JSON or a form
    (a misleading 400) or stored as a file's bytes."""
    content: BinaryIO | None = request.content
    if content is None:
        return None
    codings = content_codings(request)
    if codings:
        content.seek(0)
        empty = not content.read(1)
        content.seek(0)
        if not empty:
            raise coded_body(codings)
    return content


# The content codings that transform a body (RFC 9110 8.4.1, the IANA registry), which
# nothing here decodes. Any other value is read as identity: clients send
# `Content-Encoding: utf-8` (or UTF8, none, binary, 8bit) with a plain body, which the seed's
# Django services ignored, and an IMAP2API client's login did so.
TRANSFORMING_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "br", "compress",
                                  "x-compress", "zstd"})


def content_codings(request: IRequest) -> list[str]:
    """The Content-Encoding codings of the request that transform a body; any other value
    (identity, a charset named by mistake) is no coding."""
    raw = request.requestHeaders.getRawHeaders(b"content-encoding") or []
    codings = (c.strip().lower() for h in raw for c in h.decode("latin-1").split(","))
    return [c for c in codings if c in TRANSFORMING_CODINGS]


def coded_body(codings: list[str]) -> ApiError:
    """The 415 of a body with a content coding: RFC 9110 15.5.16 ("the content is in a
    format not supported ... or the server is unwilling to decode it"), with Accept-Encoding
    saying that only uncoded bodies are taken (12.5.3). Nothing here decodes one: a gzip
    body's small size would pass the body limits that count its bytes, and its decoded
    size is unbounded. The APIs that answer a body of the wrong type with 400 answer this
    with 400 too (ApiApp.unsupported_media_status)."""
    named = ", ".join(codings)
    return ApiError(UNSUPPORTED_MEDIA_STATUS,
                    f'Content-Encoding "{named}" is not supported on a request body; send '
                    "the body uncoded.", headers={"Accept-Encoding": "identity"})


def read_body(request: IRequest, limit: int) -> bytes:
    """The request body, refused with 413 when longer than `limit` bytes, and with 415
    when it carries a Content-Encoding (`body_file`)."""
    content = body_file(request)
    if content is None:
        return b""
    content.seek(0)
    data: bytes = content.read(limit + 1)
    content.seek(0)
    if len(data) > limit:
        raise too_large(limit)
    return data


def _unsupported(media: str, accepted: Iterable[str]) -> ApiError:
    shown = media or "(none)"
    return ApiError(
        UNSUPPORTED_MEDIA_STATUS,
        f'Unsupported media type "{shown}" in request; send {" or ".join(accepted)}.',
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_TOO_DEEP = f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels."
_TOO_MANY = f"JSON parse error - more than {MAX_JSON_VALUES} values."
# What opens MAX_JSON_DEPTH + 1 levels at once (in a text without its strings, spaces or
# colons, where `{` is written `[`).
_DEEP_RUN = "[" * (MAX_JSON_DEPTH + 1)


def _bound(text: str) -> int:
    return text.count(",") + text.count("[") + text.count("{")


def _count_values(text: str) -> None:
    """Refuse a document of more than MAX_JSON_VALUES values before it is decoded.

    Each value after an array's or object's first follows a comma, and each array or
    object opens with a bracket, so commas and opening brackets bound the values from
    above. Counted in the text first (C speed; strings may hold some); only a text over the
    bound is counted again without its strings (cut out at their unescaped quotes: a
    backslash only ever stands in a string). Deep nesting gets the depth message."""
    if _bound(text) < MAX_JSON_VALUES:
        return
    unescaped = text.replace("\\\\", "").replace('\\"', "")
    bare = "".join(unescaped.split('"')[0::2])
    if _bound(bare) < MAX_JSON_VALUES:
        return
    if _DEEP_RUN in "".join(bare.split()).replace(":", "").replace("{", "["):
        raise ApiError(400, _TOO_DEEP)
    raise ApiError(400, _TOO_MANY)


def decode_json(data: bytes, *, once: bool = False) -> Any:
    """Strict JSON from bytes (UTF-8, no NaN/Infinity, numbers that fit a double, at most
    `MAX_JSON_DEPTH` levels and `MAX_JSON_VALUES` values, text without lone surrogates), or
    a 400 saying what broke. With `once`, a key an object gives again with another value
    is a 400 naming it, as a form's field is (parse_form); else the last value wins."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "JSON parse error - the body is not valid UTF-8.") from None
    _count_values(text)
    try:
        document = json.loads(text, parse_constant=_reject_constant,
                              object_pairs_hook=_one_value_object if once else None)
    except RecursionError:
        raise ApiError(400, _TOO_DEEP) from None
    except ValueError as e:
        raise ApiError(400, f"JSON parse error - {e}") from None
    _check_document(document)
    return document


def _one_value_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's pairs as a dict, a key given again with another value refused."""
    document = dict(pairs)
    if len(document) != len(pairs):
        for name, value in pairs:
            if document[name] != value:
                raise given_twice(name)
    return document


def _check_document(document: Any) -> None:
    """Walk a decoded document (without recursion) for what `decode_json` refuses. NUL is
    a 400 naming the top-level field that holds it (an error of the document itself when
    the document is not an object)."""
    pending: list[tuple[Any, int, str | None]] = [(document, 1, None)]
    while pending:
        value, depth, field = pending.pop()
        if isinstance(value, str):
            if "\x00" in value:
                if field is None:
                    raise ApiError(400, "JSON parse error - a string holds NUL (\\u0000), "
                                   "which no field takes.")
                raise field_error(field, HOLDS_NUL)
            if not_text(value):
                raise ApiError(400, "JSON parse error - a string holds a lone surrogate "
                               "(\\ud800-\\udfff), which is not text.")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ApiError(400, "JSON parse error - a number is out of range.")
        elif isinstance(value, dict | list):
            if depth > MAX_JSON_DEPTH:
                raise ApiError(400, _TOO_DEEP)
            if isinstance(value, dict):
                pending.extend((k, depth, field) for k in value)
                pending.extend((v, depth + 1, k if depth == 1 else field)
                               for k, v in value.items())
            else:
                pending.extend((v, depth + 1, field) for v in value)


_JSON_TYPE_NAMES = {
    type(None): "null", bool: "boolean", int: "number", float: "number", str: "string",
    list: "array",
}


_EMPTY: Any = object()


def read_json(request: IRequest, limit: int, empty: Any = None, *, once: bool = False
              ) -> Any:
    """The JSON document in the body; an empty body is `empty` (a JSON null is None);
    `once` as in decode_json."""
    data = read_body(request, limit)
    media = media_type(request)
    if not data.strip():
        if media and not is_json_type(media):
            raise _unsupported(media, JSON_TYPES)
        return empty
    if not is_json_type(media):
        raise _unsupported(media, JSON_TYPES)
    return decode_json(data, once=once)


def read_json_object(request: IRequest, limit: int, *, once: bool = False
                     ) -> dict[str, Any]:
    """A JSON object from the body (an empty body is an empty object; null is not); `once`
    as in decode_json."""
    document = read_json(request, limit, empty=_EMPTY, once=once)
    if document is _EMPTY:
        return {}
    if not isinstance(document, dict):
        kind = _JSON_TYPE_NAMES.get(type(document), type(document).__name__)
        raise ApiError(400, f"Invalid data. Expected a JSON object, but got {kind}.")
    return document


def read_fields(
    request: IRequest,
    limit: int,
    *,
    accept_json: bool = True,
    accept_form: bool = True,
    accept_multipart: bool = True,
    untyped_form: bool = False,
    once: bool = False,
) -> dict[str, Any]:
    """Input fields from a JSON object, a form-encoded body or a multipart body.

    JSON keeps its types; form fields are strings (the last value of a repeated name wins,
    unless `once`: a name given again with another value is then a 400, see parse_form, as
    is a JSON key given again, see decode_json);
    multipart file parts become `Upload`s. An empty body without a type is no fields; a
    body without a type is read as form-encoded when `untyped_form` (an API whose
    published examples send forms without a Content-Type), else refused.
    """
    media = media_type(request)
    accepted = [
        *(JSON_TYPES if accept_json else ()),
        *((FORM_TYPE,) if accept_form else ()),
        *((MULTIPART_TYPE,) if accept_multipart else ()),
    ]
    if accept_json and is_json_type(media):
        return read_json_object(request, limit, once=once)
    if accept_form and media == FORM_TYPE:
        return parse_form(read_body(request, limit), once=once)
    if accept_multipart and media == MULTIPART_TYPE:
        return parse_multipart(
            request.getHeader(b"content-type") or b"",
            read_body(request, limit),
            once=once,
        )
    if not media:
        body = read_body(request, limit)
        if accept_form and untyped_form:
            return parse_form(body, once=once)
        if not body.strip():
            return {}
    raise _unsupported(media, accepted)


def parse_form(data: bytes, *, once: bool = False) -> dict[str, str]:
    """An application/x-www-form-urlencoded body; the last value of a repeated name wins,
    unless `once`: a name given again with another value is then a 400 naming it (an API
    whose fields each hold one value, where keeping one of two silently would lose what
    the client meant: a form of `to=a&to=b`, as clients send a list, mailed only b).

    Percent-escapes must spell UTF-8 too (`caf%E9` is Latin-1): a 400 naming each such field,
    where parse_qsl's default would store U+FFFD in place of what the client meant. More
    than MAX_FORM_PARTS fields are a 400, counted before the body is split (1 MiB of `a=&`
    took 1-2.5 s of the reactor).
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "The form body is not valid UTF-8.") from None
    try:
        # Bytes that are not UTF-8 become lone surrogates (which UTF-8 never decodes to).
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False,
                          errors="surrogateescape", max_num_fields=MAX_FORM_PARTS)
    except ValueError as e:
        raise ApiError(400, f"Malformed form body: {e}") from None
    if any(not_text(name) for name, _ in pairs):
        raise ApiError(400, "The form body is not text: a field name is not valid UTF-8 or "
                       "holds NUL.")
    bad = {name: problem for name, value in pairs
           for problem in (_escaped_problem(value),) if problem}
    if bad:
        raise ApiError(400, "; ".join(f"{name}: {bad[name]}" for name in sorted(bad)),
                       fields={name: [message] for name, message in bad.items()})
    fields = dict(pairs)
    if once:
        for name, value in pairs:
            if fields[name] != value:
                raise given_twice(name)
    return fields


def given_twice(name: str, what: str = "field") -> ApiError:
    """The 400 for a field a form gives more than once with different values (`once`), or
    (`what` "parameter") a query parameter (QueryParams)."""
    return field_error(name, f"The {what} is given more than once, with different values; "
                       "it takes one value.")


def parse_multipart(content_type: bytes, data: bytes, *, once: bool = False
                    ) -> dict[str, Any]:
    """A multipart/form-data body: text fields as str, file parts as Upload (the last
    part of a repeated name wins, unless `once`: a text field given again with another
    value is then a 400, as in parse_form).

    The body is split by `mailcore.uploads.multipart_events` (boundaries found with
    `bytes.find`: linear in the body, whatever its lines), at most `MAX_FORM_PARTS` parts of
    at most `MAX_PART_HEADERS` headers each; only each part's header section goes through
    the email package (names, RFC 2231 filenames, charsets as before). Parsing the whole
    body with `email.parser` took time in its number of lines and parts, on the reactor
    thread: 24 MiB of newlines in one field held every connection of the daemon for 24 s.
    """
    boundary = form_boundary(content_type.decode("latin-1"))
    if boundary is None:
        raise ApiError(400, "Malformed multipart body: no boundary or no parts.")
    fields: dict[str, Any] = {}
    part: Message | None = None
    chunks: list[bytes] = []
    try:
        for event in multipart_events(io.BytesIO(data), boundary,
                                      max_header_count=MAX_PART_HEADERS,
                                      max_segment_count=MAX_FORM_PARTS):
            if isinstance(event, MultipartSegment):
                part, chunks = _part_headers(event), []
            elif isinstance(event, bytes):
                chunks.append(event)
            elif part is not None:
                name, value = _part_value(part, b"".join(chunks))
                if once and isinstance(value, str) and fields.get(name, value) != value:
                    raise given_twice(name)
                fields[name] = value
                part, chunks = None, []
    except MalformedUpload as e:
        if "Unexpected end" in str(e):
            # A body cut short: its last part would be stored truncated.
            raise ApiError(400, "Malformed multipart body: it ends before its closing "
                           "boundary.") from None
        raise ApiError(400, str(e)) from None
    return fields


def _part_headers(segment: MultipartSegment) -> Message:
    """A part's header section as an email message without a body."""
    head = "".join(f"{name}: {value}\r\n" for name, value in segment.headerlist) + "\r\n"
    return email.parser.BytesHeaderParser(policy=email.policy.HTTP).parsebytes(
        head.encode("utf-8", "surrogateescape"))


def _part_value(part: Message, raw: bytes) -> tuple[str, Any]:
    """A part's field name and value: text, or an Upload for a file part."""
    name = part.get_param("name", header="content-disposition")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "Malformed multipart body: a part has no name.")
    if part.get_content_maintype() in ("multipart", "message"):
        # Parts of its own, which are neither a value nor a file's bytes.
        raise field_error(name, NESTED_PARTS)
    encoding = str(part.get("content-transfer-encoding", "")).strip().lower()
    try:
        if encoding == "base64":
            raw = binascii.a2b_base64(raw)
        elif encoding == "quoted-printable":
            raw = binascii.a2b_qp(raw)
    except binascii.Error:
        raise field_error(name, f"The value is not valid {encoding}.") from None
    filename = part.get_filename()
    if filename is not None:
        return name, Upload(name, filename, part.get_content_type(), raw)
    try:
        text = raw.decode(part.get_content_charset() or "utf-8")
    except (UnicodeError, LookupError):
        raise field_error(name, NOT_UTF8) from None
    problem = not_text(text)
    if problem:
        raise field_error(name, problem)
    return name, text


# -- fields ---------------------------------------------------------------------------------


def collect_fields(checks: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run every field check and report all bad fields at once (as DRF does)."""
    values: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for name, check in checks.items():
        try:
            values[name] = check()
        except ApiError as e:
            if not e.fields or e.status != 400:
                raise
            for field, messages in e.fields.items():
                errors.setdefault(field, []).extend(messages)
    if errors:
        summary = "; ".join(f"{k}: {' '.join(v)}" for k, v in errors.items())
        raise ApiError(400, summary, fields=errors)
    return values


def _absent(data: Mapping[str, Any], name: str, *, required: bool) -> bool:
    """Whether field `name` is missing or null (its value is then None); 400 if required."""
    if name in data and data[name] is not None:
        return False
    if required:
        raise field_error(name, REQUIRED)
    return True


def string_field(
    data: Mapping[str, Any],
    name: str,
    *,
    required: bool = True,
    allow_blank: bool = False,
    trim: bool = True,
    max_length: int | None = None,
    line: bool = False,
    multiline: bool = False,
) -> str | None:
    """A string input; absent gives None unless required.

    With `trim` a value of spaces only counts as blank (DRF trims, except passwords). With
    `line` (names, usernames, descriptions, folder names: one line of text) a control
    character is refused, so that none reaches a log line, a header or a protocol command.
    With `multiline` (a message: text of several lines) one other than TAB, CR and LF is:
    NUL above all, which PostgreSQL's text columns refuse (a 500 instead of a 400).
    """
    if _absent(data, name, required=required):
        return None
    value = data[name]
    if not isinstance(value, str):
        raise field_error(name, NOT_A_STRING)
    if line and has_control(value):
        raise field_error(name, CONTROL_CHARACTER)
    if multiline and has_control_multiline(value):
        raise field_error(name, CONTROL_IN_TEXT)
    problem = not_text(value)
    if problem:
        raise field_error(name, problem)
    if not allow_blank and not (value.strip() if trim else value):
        raise field_error(name, BLANK)
    if max_length is not None and len(value) > max_length:
        raise field_error(name, f"Ensure this field has no more than {max_length} characters.")
    return value


def bool_field(data: Mapping[str, Any], name: str, *, required: bool = False) -> bool | None:
    """A boolean: JSON true/false, 0/1 (safedrop), or true/false/yes/no/on/off in forms."""
    if _absent(data, name, required=required):
        return None
    value = data[name]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
    raise field_error(name, NOT_A_BOOLEAN)


def int_field(
    data: Mapping[str, Any],
    name: str,
    *,
    required: bool = False,
    minimum: int | None = INT64_MIN,
    maximum: int | None = INT64_MAX,
) -> int | None:
    """An integer: a JSON integer or a string of ASCII digits; by default within the signed
    64-bit range, the most a column holds."""
    if _absent(data, name, required=required):
        return None
    value = data[name]
    if isinstance(value, bool):
        raise field_error(name, NOT_AN_INTEGER)
    if isinstance(value, str):
        text = value.strip()
        if not _INTEGER.fullmatch(text):
            raise field_error(name, NOT_AN_INTEGER)
        value = int(text)
    if not isinstance(value, int):
        raise field_error(name, NOT_AN_INTEGER)
    minimum = INT64_MIN if minimum is None else minimum
    maximum = INT64_MAX if maximum is None else maximum
    if value < minimum:
        raise field_error(name, f"Ensure this value is greater than or equal to {minimum}.")
    if value > maximum:
        raise field_error(name, f"Ensure this value is less than or equal to {maximum}.")
    return value
