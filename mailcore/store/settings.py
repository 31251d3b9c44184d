"""The `[store]` table: how many threads run the database's work.

```toml
[store]
threads = 4         # writes and long reads (backups, searches, sweeps)
read_threads = 2    # the lane of short reads (list pages, lookups); default 1 on SQLite
stop_timeout = 60   # seconds the daemon's stop (SIGTERM) waits for its services, which
                    # wait on the store; then it exits without closing it (see below)
idle_in_transaction_timeout = 30  # PostgreSQL: seconds a transaction may wait on its node
                                  # before its session is ended (see below)
```

Every thread holds a database connection while it works, and each thread of the read lane
keeps its own between reads: a node opens at most `threads + read_threads + 1` connections,
and PostgreSQL's `max_connections` must cover that for every node sharing it (and the CLI).

The defaults suit a small host with the database on it. SQLite writes one transaction at a
time whatever `threads` is, and one read thread there was faster than several (they spent
more time handing Python's lock round than reading). On PostgreSQL, more read threads pay
when the server has cores of its own to run them (its own host, reached over a network,
where each read also waits on the round trip); on a two-core host with PostgreSQL on it,
two beat four (mailcore.store.database). Measure before raising them.

`stop_timeout` bounds a stop on a database that does not answer (a frozen or hung server:
the queue's last commits, the store's close and its threads would wait for it for ever).
Past it the daemon logs what it gave up and exits with its pool threads still waiting:
nothing acknowledged is lost (a 250 or a 201 came after its commit; the results journal
replays delivery results at the next start, and leases run out), and a message whose
commit was under way is answered nothing, so its client sends it again.

`idle_in_transaction_timeout` bounds how long a node stopped in the middle of a transaction
(a frozen VM, SIGSTOP) holds the row locks the other nodes sharing a PostgreSQL wait for:
PostgreSQL's `idle_in_transaction_session_timeout` on every connection, and the silence
after which mailcore.store.stuck ends a session stopped in the middle of a statement. Our
transactions run from first statement to commit with milliseconds between statements; a
shorter bound stops the other nodes' mail acceptance for less time, a longer one suits a
host whose threads may be held off the CPU for longer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mailcore.config import ConfigError, is_positive_number, refuse_unknown

MAX_THREADS = 64


@dataclass(frozen=True)
class StoreSettings:
    threads: int = 4
    read_threads: int | None = None  # None: 1 on SQLite, 2 on PostgreSQL
    stop_timeout: float = 60.0
    idle_in_transaction_timeout: float = 30.0

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> StoreSettings:
        refuse_unknown("store", section, cls)
        values: dict[str, Any] = {}
        for key in ("threads", "read_threads"):
            if key in section:
                v = section[key]
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_THREADS:
                    raise ConfigError(f"[store] {key} must be a whole number from 1 to "
                                      f"{MAX_THREADS}")
                values[key] = v
        if "stop_timeout" in section:
            if not is_positive_number(section["stop_timeout"]):
                raise ConfigError("[store] stop_timeout must be a positive number")
            values["stop_timeout"] = float(section["stop_timeout"])
        if "idle_in_transaction_timeout" in section:
            v = section["idle_in_transaction_timeout"]
            if not is_positive_number(v) or v < 1:
                raise ConfigError("[store] idle_in_transaction_timeout must be a number of "
                                  "seconds, at least 1")
            values["idle_in_transaction_timeout"] = float(v)
        return cls(**values)
