"""Replies written a piece at a time when the client goes away midway (web.pacing)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import cast

from twisted.internet.error import ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web import http
from twisted.web.iweb import IRequest
from twisted.web.test.requesthelper import DummyChannel

from web.jsonstream import stream_base64_member
from web.pacing import paced


def request_on_a_channel() -> http.Request:
    request = http.Request(DummyChannel())  # type: ignore[arg-type]
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    return request


class PacingTests(TestCase):
    def test_the_producer_is_unregistered_at_the_end(self) -> None:
        request = request_on_a_channel()
        with paced(cast(IRequest, request)) as pacer:
            self.assertIs(request.producer, pacer)
        self.assertIsNone(request.producer)

    async def test_a_stream_whose_client_went_away_ends_quietly(self) -> None:
        """A lost connection takes the request's channel (Request.connectionLost): the
        streamer stops at the next piece and its way out does not fail on the gone channel
        (AttributeError: 'NoneType' object has no attribute 'unregisterProducer', logged as
        an unhandled error by the Dropmyemail .eml download, the Mail API's attachment
        download and the drop page alike)."""
        request = request_on_a_channel()
        sent: list[int] = []

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(10):
                if i == 2:  # the transport stops its producer, the channel ends the request
                    producer = request.producer
                    assert producer is not None
                    producer.stopProducing()
                    request.connectionLost(Failure(ConnectionLost("client went away")))
                sent.append(i)
                yield b"abc"

        await stream_base64_member(cast(IRequest, request), {"id": 1}, "data", 30, chunks())
        self.assertLess(len(sent), 10)
