"""A separate process that migrates a database to head when told to, for the start-up race.

Usage: python -m tests.support.migrate_child DB_URL. It prints "ready" once imported and
connected, migrates when a line arrives on stdin, then prints "OK" or "FAIL <error>".
"""

from __future__ import annotations

import sys

from sqlalchemy import create_engine

from mailcore.store.migrate import upgrade_to_head


def main(url: str) -> None:
    engine = create_engine(url)
    engine.connect().close()
    print("ready", flush=True)
    sys.stdin.readline()
    try:
        upgrade_to_head(engine)
    except Exception as e:
        print("FAIL", type(e).__name__, str(e).splitlines()[0] if str(e) else "", flush=True)
    else:
        print("OK", flush=True)
    engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1])
