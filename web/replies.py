"""Writing replies: JSON bodies with the right status, content type and headers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson
from twisted.web.iweb import IRequest

from mailcore.webhooks.payload import json_default
from web.context import context_of

JSON_TYPE = b"application/json; charset=utf-8"


def encode_json(body: Any) -> bytes:
    """Compact UTF-8 JSON (the seeds' examples are compact), written by orjson; a float
    with no JSON form (NaN, Infinity) is written as null; a time (what
    mailcore.webhooks.payload.moment_json leaves as it is: UTC) as `iso` writes it, with Z.

    What orjson refuses (integers past 64 bits, text UTF-8 cannot hold) takes the standard
    library's path. There, text that UTF-8 cannot hold (a lone surrogate, stored before
    input was checked for them) is written as a JSON escape ("\\ud800") rather than
    failing the reply.
    """
    try:
        return orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_UTC_Z)
    except orjson.JSONEncodeError:
        pass
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
                      default=json_default)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(body, separators=(",", ":"), allow_nan=False,
                          default=json_default).encode("ascii")


def content_disposition(name: str) -> str:
    """RFC 6266: an ASCII fallback and the exact name as RFC 8187 `filename*`."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\%' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def set_headers(request: IRequest, headers: Mapping[str, str] | None) -> None:
    for name, value in (headers or {}).items():
        request.setHeader(name.encode("latin-1"), value.encode("latin-1"))


def challenge_401(request: IRequest, status: int) -> None:
    """A 401 without a WWW-Authenticate of its own gets its app's (ApiApp.challenge):
    RFC 9110 11.6.1 has every 401 carry one."""
    if status != 401 or request.responseHeaders.hasHeader(b"www-authenticate"):
        return
    challenge = context_of(request).challenge
    if challenge is not None:
        request.setHeader(b"WWW-Authenticate", challenge.encode("latin-1"))


def json_reply(
    request: IRequest,
    body: Any,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """Set the status and headers of a JSON reply and return its bytes."""
    return encoded_json_reply(request, encode_json(body), status, headers)


def encoded_json_reply(
    request: IRequest,
    encoded: bytes,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """`json_reply` of a body already encoded (a kept page)."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", JSON_TYPE)
    request.setHeader(b"Content-Length", str(len(encoded)).encode("ascii"))
    set_headers(request, headers)
    challenge_401(request, status)
    return encoded


def empty_reply(
    request: IRequest, status: int = 204, headers: Mapping[str, str] | None = None
) -> bytes:
    """A reply without a body (safedrop's 204 from the auth server)."""
    request.setResponseCode(status)
    set_headers(request, headers)
    challenge_401(request, status)
    return b""
