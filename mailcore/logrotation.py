"""The `[log]` table: how large twistd's log file grows, and how many old ones are kept.

twistd rotates its `--logfile` every 1,000,000 bytes and keeps every rotated file
(`twistd.log.1`, `.2`, …) for ever. A relay writes a few lines per message, so left alone
the log directory grows until the disk is full. The daemon bounds it:

```toml
[log]
rotate_length = 10000000   # bytes written to the log file before it is rotated
keep = 10                  # rotated files kept (twistd.log.1 … twistd.log.10); 0: every one
```

So the log takes at most about `rotate_length * (keep + 1)` bytes (110 MB by default): at
each rotation the oldest file beyond `keep` is deleted, including files an earlier run left.
`kill -USR1` still rotates at once (twistd's signal) under the same bound. With `keep = 0`
no file is deleted, for operators whose own tools prune the log. A log written to stdout
(`-n` without `--logfile`) or to syslog is left to whatever reads it.

`LogLimiterService` (mailcore.logfilter) applies the settings when the daemon starts, to the
file twistd opened.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from twisted.python.logfile import LogFile

from mailcore.config import ConfigError, unknown_key


@dataclass(frozen=True)
class LogSettings:
    """The `[log]` table (see the module docstring)."""

    rotate_length: int = 10_000_000
    keep: int = 10

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> LogSettings:
        """Settings from `[log]`; a bad value raises ConfigError naming it."""
        known = {f.name for f in fields(cls)}
        values: dict[str, int] = {}
        for key, value in section.items():
            if key not in known:
                raise unknown_key("log", key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"[log] {key} must be an integer")
            if key == "rotate_length" and value < 1:
                raise ConfigError("[log] rotate_length must be a positive number of bytes")
            if key == "keep" and value < 0:
                raise ConfigError("[log] keep must not be negative")
            values[key] = value
        return cls(**values)

    def apply(self, out: object) -> bool:
        """Bound `out`, the file a text log observer writes to, when it is a rotating log
        file (twistd's `--logfile`); whether it was one."""
        if not isinstance(out, LogFile):
            return False
        out.rotateLength = self.rotate_length
        out.maxRotatedFiles = self.keep or None
        return True
