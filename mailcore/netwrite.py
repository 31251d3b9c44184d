"""Writing to a TCP connection at once instead of on the next reactor turn.

Twisted's `transport.write` buffers the bytes, registers the socket for writability and
sends on the next reactor turn: an `epoll_ctl` to start, the reactor's dispatch, the `send`,
and an `epoll_ctl` to stop, for every reply. An SMTP relay writes many small replies and
commands per message, and that round costs more than the send itself. `write_now` sends at
once when nothing is buffered ahead of the bytes (so order is kept), and gives Twisted
whatever the socket did not take; anything it is not sure of (TLS, a connection closing, a
transport that is not plain TCP, an error) goes through `transport.write` as usual, where
Twisted's own handling applies.

`close_now` does the same for the end of a connection: `transport.loseConnection` stops
reading, registers the socket for writability and closes it on the next reactor turn, once
the buffer it holds is sent; with nothing held (the last reply went out through
`write_now`) that is two `epoll_ctl`s and a dispatch for nothing, per SMTP session. It
closes at once, as `loseConnection` itself does for a transport whose writing side is shut
(`_writeDisconnected`): the socket is shut down and closed, and the protocol's
`connectionLost` runs before it returns.

It reads `twisted.internet.tcp.Connection` attributes (`_tempDataBuffer`, `dataBuffer`,
`offset`, `TLS`, `_writeDisconnected`) that are not public; `tests/test_netwrite.py` pins
them, so a Twisted upgrade that changes them fails there, not in production.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import main, tcp
from twisted.python.failure import Failure


def write_now(transport: Any, data: bytes) -> None:
    """Send `data` on `transport`, at once when that is safe; see the module docstring."""
    if data and _idle(transport):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0  # EAGAIN, or an error Twisted's own write path will report
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


_PLAIN = (tcp.Server, tcp.Client)


def close_now(transport: Any) -> bool:
    """Close `transport` at once when it holds nothing unsent and has no producer (True:
    its protocol's connectionLost has run); else `loseConnection` as usual (False: the
    close comes later). See the module docstring."""
    if _idle(transport) and transport.producer is None:
        # (FileDescriptor.connectionLost takes it out of the reactor, tcp.Connection's
        # shuts the socket down and closes it, then tells the protocol.)
        transport.connectionLost(Failure(main.CONNECTION_DONE))
        return True
    transport.loseConnection()
    return False


def _idle(transport: Any) -> bool:
    """Whether `transport` is plain TCP, open, and holds no bytes of ours unsent."""
    return (
        type(transport) in _PLAIN
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnected
        and not transport._tempDataBuffer
        and transport.offset == len(transport.dataBuffer)
    )
