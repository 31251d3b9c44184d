"""JSON replies written a piece at a time: one whose last member is a long base64 string,
and one whose last member (or whole body) is a long array.

Encoding a large file into one base64 string and then into one JSON document holds the file
three or four times over. Here the members known up front are written first, then the base64
slices as an iterator makes them (or as they are read, from an async one), pausing while the
client's transport is full, then the closing quote and brace: the reply costs one slice of
memory besides what the iterator holds.
The length of the base64 text follows from the file's size, so the reply has a
Content-Length like every other JSON reply.

A HEAD gets the headers alone: the iterator is closed unread, so no file, message or row
is read for a body it would throw away (a base64 reply's Content-Length is the GET's).

An array's items (a thread's e-mails with their bodies: thousands of them, hundreds of
megabytes) are encoded and written one at a time as an async iterator yields them, read from
the store a batch at a time, with the same pauses; its length is not known up front, so the
reply is sent chunked. Any other JSON text can be written so, as its pieces come.
"""

from __future__ import annotations

import binascii
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterable, Mapping
from typing import Any, TypeVar

from twisted.web.iweb import IRequest

from web.api import is_head
from web.pacing import paced
from web.replies import JSON_TYPE, encode_json

T = TypeVar("T")


def base64_length(size: int) -> int:
    """How long the base64 text (padded, no line breaks) of `size` bytes is."""
    return 4 * ((size + 2) // 3)


async def base64_of(raw: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The base64 text (padded, no line breaks) of bytes that come a chunk at a time."""
    carry = b""
    async for piece in raw:
        data = carry + piece if carry else piece
        whole = len(data) - len(data) % 3
        carry = data[whole:]
        if whole:
            yield binascii.b2a_base64(memoryview(data)[:whole], newline=False)
    if carry:
        yield binascii.b2a_base64(carry, newline=False)


async def _each(chunks: Iterable[T] | AsyncIterable[T]) -> AsyncGenerator[T]:
    if not isinstance(chunks, AsyncIterable):
        for piece in chunks:
            yield piece
        return
    try:
        async for piece in chunks:
            yield piece
    finally:
        close = getattr(chunks, "aclose", None)
        if close is not None:  # left halfway: its reads ahead are let go now
            await close()


def _member_open(head: Mapping[str, Any], name: str, opening: bytes) -> bytes:
    """`{**head, name: ` as JSON text, then `opening` (the last member's first bytes)."""
    known = encode_json(dict(head))
    return (known[:-1] + b"," if head else b"{") + encode_json(name) + b":" + opening


async def _write_paced(request: IRequest, prefix: bytes, pieces: AsyncGenerator[bytes],
                       suffix: bytes, length: int | None = None) -> None:
    """Status 200, a JSON reply of `prefix`, each of `pieces` as it comes (pausing while the
    client's transport is full) and `suffix`; with a Content-Length when `length` is given,
    chunked otherwise. Stops when the client goes away; `pieces` is closed either way."""
    request.setResponseCode(200)
    request.setHeader(b"Content-Type", JSON_TYPE)
    if length is not None:
        request.setHeader(b"Content-Length", str(length).encode("ascii"))
    if is_head(request):  # the headers say all a HEAD gets: nothing is read for the body
        await pieces.aclose()
        return
    request.write(prefix)
    try:
        with paced(request) as pacer:
            async for piece in pieces:
                if pacer.stopped:
                    return
                request.write(piece)
                await pacer.ready()
            if not pacer.stopped:
                request.write(suffix)
    finally:
        await pieces.aclose()


async def stream_base64_member(
    request: IRequest, head: Mapping[str, Any], name: str, size: int | None,
    chunks: Iterable[bytes] | AsyncIterable[bytes],
) -> None:
    """Write `{**head, name: "<base64 of size bytes>"}` (status 200) with `chunks` as the
    base64 text (made on the spot, or read as it comes); the caller returns b""
    afterwards. `size` None: not known (a HEAD that does not make the content), so no
    Content-Length. An error after the first bytes goes up to the app's error path, which
    writes nothing more and drops the connection (web.api; closing it gently would let the
    next pipelined reply follow the cut-off one)."""
    prefix, suffix = _member_open(head, name, b'"'), b'"}'
    length = None if size is None else len(prefix) + base64_length(size) + len(suffix)
    await _write_paced(request, prefix, _each(chunks), suffix, length)


async def _encoded(items: AsyncIterable[Any]) -> AsyncGenerator[bytes]:
    """Each item as JSON text, the ones after the first with their leading comma."""
    pieces = _each(items)
    try:
        separator = b""
        async for item in pieces:
            yield separator + encode_json(item)
            separator = b","
    finally:
        await pieces.aclose()


def member_open(head: Mapping[str, Any], name: str, opening: bytes) -> bytes:
    """`{**head, name: ` as JSON text, then `opening`: the start of an object whose last
    member the caller writes on (`stream_json_text`)."""
    return _member_open(head, name, opening)


async def stream_json_text(request: IRequest, pieces: AsyncIterable[bytes]) -> None:
    """Write the JSON text `pieces` yields (status 200, chunked), each piece as it comes:
    for a reply whose nesting the other writers here do not shape. Errors after the first
    bytes: as for `stream_base64_member`."""
    await _write_paced(request, b"", _each(pieces), b"")


async def stream_json_array(
    request: IRequest, items: AsyncIterable[Any], head: Mapping[str, Any] | None = None,
    name: str = "",
) -> None:
    """Write `[item, ...]`, or with `head` `{**head, name: [item, ...]}` (status 200), each
    item encoded as `items` yields it; the caller returns b"" afterwards. Errors after the
    first bytes: as for `stream_base64_member`."""
    if head is None:
        prefix, suffix = b"[", b"]"
    else:
        prefix, suffix = _member_open(head, name, b"["), b"]}"
    await _write_paced(request, prefix, _encoded(items), suffix)
