"""The memory the inbound server's sessions hold for DATA (`[smtp] max_data_memory`): the
octets of the messages being received, from a message's first octet until the spool has
committed it or it was refused, counted in all and by client address, and whether a
message has room for more.

Without it `max_connections` sessions could each hold a message of `max_message_size` (200
x 50 MB: 10 GB) and the daemon be killed for memory. A session whose message finds no
room reads it to its end without keeping it and answers 452 4.3.1 (mailcore.smtp.server).
The factory holds the one `DataMemory` its sessions share.
"""

from __future__ import annotations

from mailcore.smtp.settings import SMTPSettings

# The first octets of each message that `[smtp] max_data_memory` never refuses (see
# DataMemory.hold): sessions may hold max_connections times this beyond it.
DATA_FREE = 1024 * 1024


class DataMemory:
    """The octets of DATA the sessions hold, against `max_data_memory` and each client
    address's share of it (see `hold`)."""

    def __init__(self, settings: SMTPSettings) -> None:
        self.settings = settings
        # Octets of DATA the sessions hold in memory now: from a message's first octet until
        # the spool has committed it or it was refused (see `hold`), in all and by client
        # address (as the connection caps count them).
        self.buffered = 0
        self.buffered_by: dict[str, int] = {}
        self.data_free = DATA_FREE
        self.address_share = max(
            settings.max_message_size,
            settings.max_data_memory * settings.max_connections_per_ip
            // settings.max_connections)

    def hold(self, address: str | None, held: int, more: int) -> bool:
        """Count `more` octets of a message that holds `held` already, from the client
        `address`; False (nothing counted) when there is no room for them.

        A message's first `data_free` octets (DATA_FREE) always have room, so that the
        usual small mail is never refused for memory, however much large mail is in
        flight; past them, all sessions together hold at most `max_data_memory`, and one
        client address at most `address_share` of it (the share its connections have of
        `max_connections`, at least one message of `max_message_size`): a sender cannot
        fill the budget alone from one address, and refuse everyone's large mail."""
        if held + more > self.data_free:
            if self.buffered + more > self.settings.max_data_memory:
                return False
            if address is not None and (
                    self.buffered_by.get(address, 0) + more > self.address_share):
                return False
        self.buffered += more
        if address is not None:
            self.buffered_by[address] = self.buffered_by.get(address, 0) + more
        return True

    def let_go(self, address: str | None, count: int) -> None:
        """Count out `count` octets `hold` counted in."""
        if not count:
            return
        self.buffered -= count
        if address is not None:
            left = self.buffered_by.get(address, 0) - count
            if left > 0:
                self.buffered_by[address] = left
            else:
                self.buffered_by.pop(address, None)
