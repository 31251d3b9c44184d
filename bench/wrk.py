"""The benchmarks' wrk runs: one `wrk --latency` with an Authorization header, its output
parsed into requests/s, p50 and p99 latency (ms) and the count of non-2xx/3xx replies.

Not a benchmark itself: bench/fetch.py, bench/mailapi.py and bench/scale.py import it as a
sibling (directly or through fetch.wrk).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile

from procs import need

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def ms(text: str) -> float:
    """A wrk latency ("812.00us", "1.20ms", "2.01s") in milliseconds."""
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if not m:
        raise ValueError(text)
    return float(m.group(1)) * _UNITS[m.group(2)]


# Every request's URL made unique by a parameter the APIs ignore ("_", as browsers' cache
# busters do): the daemon keeps a rendered page for a repeated URL, and a leg that measures
# reading must not be answered from it. Each wrk thread numbers its own requests.
_FRESH = """
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
local n = 0
function request()
  n = n + 1
  return wrk.format(nil, wrk.path .. "%s_=" .. id .. "-" .. n)
end
"""


def wrk(url: str, token: str, duration: int, connections: int,
        scheme: str = "Token", fresh: bool = False) -> dict[str, float]:
    """wrk on `url` for `duration` s at `connections` connections, two threads (one for a
    single connection: wrk refuses fewer connections than threads), each request with
    `Authorization: {scheme} {token}`; {"rps", "p50", "p99", "errors"}. With `fresh`, every
    request's URL is a new one (see _FRESH), so no reply can come from a kept page."""
    threads = 2 if connections >= 2 else 1
    with contextlib.ExitStack() as stack:
        options: list[str] = []
        if fresh:
            script = stack.enter_context(tempfile.NamedTemporaryFile("w", suffix=".lua"))
            script.write(_FRESH % ("&" if "?" in url else "?"))
            script.flush()
            options = ["-s", script.name]
        result = subprocess.run(
            [need("wrk", "wrk"), f"-t{threads}", f"-c{connections}", f"-d{duration}s",
             "--latency", "-H", f"Authorization: {scheme} {token}", *options, url],
            capture_output=True, check=False, text=True,
        )
    if result.returncode != 0:
        raise SystemExit(f"wrk failed: {result.stderr}")
    out = result.stdout
    found = {key: re.search(pattern, out) for key, pattern in (
        ("rps", r"Requests/sec:\s+([\d.]+)"), ("p50", r"\s50%\s+(\S+)"),
        ("p99", r"\s99%\s+(\S+)"))}
    if any(m is None for m in found.values()):
        raise SystemExit(f"wrk printed no figures: {out}")
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {"rps": float(found["rps"].group(1)),  # type: ignore[union-attr]
            "p50": ms(found["p50"].group(1)),  # type: ignore[union-attr]
            "p99": ms(found["p99"].group(1)),  # type: ignore[union-attr]
            "errors": float(bad.group(1)) if bad else 0.0}
