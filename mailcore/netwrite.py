"""Writing to a TCP connection at once instead of on the next reactor turn.

Twisted's `transport.write` buffers the bytes, registers the socket for writability and
sends on the next reactor turn: an `epoll_ctl` to start, the reactor's dispatch, the `send`,
and an `epoll_ctl` to stop, for every reply. An SMTP relay writes many small replies and
commands per message, and that round costs more than the send itself. `write_now` sends at
once when nothing is buffered ahead of the bytes (so order is kept), and gives Twisted
whatever the socket did not take; anything it is not sure of (TLS, a connection closing, a
transport that is not plain TCP, an error) goes through `transport.write` as usual, where
Twisted's own handling applies.

It reads `twisted.internet.tcp.Connection` attributes (`_tempDataBuffer`, `dataBuffer`,
`offset`, `TLS`, `_writeDisconnected`) that are not public; `tests/test_netwrite.py` pins
them, so a Twisted upgrade that changes them fails there, not in production.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def write_now(transport: Any, data: bytes) -> None:
    """Send `data` on `transport`, at once when that is safe; see the module docstring."""
    if (
        type(transport) in _PLAIN
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
        and data
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error Twisted's own write path will report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


_PLAIN = (tcp.Server, tcp.Client)
